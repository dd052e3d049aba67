//! Exactness of the engine on checkpoint variants (copies of tests/fixtures/engine/ckpt in a
//! temp dir): a chat template that puts the question before the video (so no prefix can be
//! shared: the engine must notice and fall back, counted), and a repetition penalty from
//! generation_config.json (applied per row over its own prompt and answer).

mod engine_util;

use std::path::Path;

use engine_util::*;
use vigil::config::Config;
use vigil::engine::load_runner;

fn copy_ckpt(to: &Path) {
    for e in std::fs::read_dir(ckpt()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn config_at(dir: &Path) -> Config {
    let mut cfg = config("", "max_batch = 16");
    cfg.model.path = Some(dir.to_path_buf());
    cfg
}

/// Run windows of two streams through the engine; compare with each request alone.
fn check_exact(cfg: &Config) -> vigil::engine::EngineCounters {
    let a = frames(0, 8, 160, 120, 2.0);
    let b = frames(1, 6, 96, 128, 1.0);
    let work = vec![
        (window("a", 0, &a, 0, 6, 2.0), vec!["caption", "person", "count"]),
        (window("b", 0, &b, 0, 4, 1.0), vec!["person", "caption"]),
        (window("a", 1, &a, 2, 6, 2.0), vec!["count", "caption"]),
        (window("b", 1, &b, 2, 4, 1.0), vec!["caption"]),
    ];
    let engine = start(cfg);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut n = 0;
    for (w, names) in &work {
        engine.submit(job(w, cfg, names, &tx)).unwrap();
        n += names.len();
    }
    let got = answers(collect(&mut rx, n));
    let c = engine.counters();
    assert!(engine.shutdown(std::time::Duration::from_secs(30)));
    let runner = load_runner(cfg).unwrap();
    let mut total = 0;
    for (w, names) in &work {
        let fps = if w.stream == "a" { 2.0 } else { 1.0 };
        for name in names {
            let alone = runner.run_alone(&w.stream, w, fps, cfg.prompt(name).unwrap()).unwrap();
            let r = got.iter().find(|r| r.stream == w.stream && r.window_seq == w.seq && r.prompt == *name).unwrap();
            assert_eq!(r.tokens, alone.tokens, "{} {} {name}", w.stream, w.seq);
            assert_eq!(r.prompt_tokens, alone.prompt_tokens);
            total += r.generated_tokens;
        }
    }
    assert!(total > 10);
    c
}

#[test]
fn question_before_the_video_falls_back_to_unshared_prefills() {
    let dir = tempfile::tempdir().unwrap();
    copy_ckpt(dir.path());
    // Text parts first, then the video: the head (up to the video) differs per question.
    let template = "{% for message in messages %}<|im_start|>{{ message['role'] }}\n\
        {% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}\n{% endif %}{% endfor %}\
        {% for c in message['content'] %}{% if c['type'] == 'video' %}<|video_pad|>\n{% endif %}{% endfor %}\
        <|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    std::fs::write(dir.path().join("chat_template.jinja"), template).unwrap();
    let c = check_exact(&config_at(dir.path()));
    // Each window's first prompt owns the head; every other prompt falls back.
    assert_eq!(c.prefix_fallbacks, (3 - 1) + (2 - 1) + (2 - 1));
    assert_eq!(c.prefix_shared, 0);
    assert_eq!(c.video_prefills, 8, "one prefill per prompt");
}

#[test]
fn repetition_penalty_rows_match_alone() {
    let dir = tempfile::tempdir().unwrap();
    copy_ckpt(dir.path());
    let gen = r#"{"do_sample": false, "eos_token_id": [402], "pad_token_id": 400, "repetition_penalty": 1.3}"#;
    std::fs::write(dir.path().join("generation_config.json"), gen).unwrap();
    let cfg = config_at(dir.path());
    let c = check_exact(&cfg);
    assert_eq!(c.prefix_fallbacks, 0);
    assert_eq!(c.video_prefills, 4);
    // The penalty matters on this workload (so the comparison above covers it).
    let a = frames(0, 8, 160, 120, 2.0);
    let w = window("a", 0, &a, 0, 6, 2.0);
    let plain = load_runner(&config("", "")).unwrap();
    let penal = load_runner(&cfg).unwrap();
    let differs = ["caption", "person", "count"].iter().any(|n| {
        let p = cfg.prompt(n).unwrap();
        plain.run_alone("a", &w, 2.0, p).unwrap().tokens != penal.run_alone("a", &w, 2.0, p).unwrap().tokens
    });
    assert!(differs, "repetition_penalty changed no answer");
}
