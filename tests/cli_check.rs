//! `vigil check` / `print-config` / `run` as a user runs them: the real binary, as a subprocess.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn vigil(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vigil")).args(args).output().expect("run vigil")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// Each file in tests/configs/bad/ starts with `# expect: line=N key=K msg=TEXT [secret=S]`.
#[test]
fn every_bad_config_is_rejected_with_location_and_key() {
    let dir = repo("tests/configs/bad");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(files.len() >= 20, "the corpus should cover every error kind");
    for f in files {
        let src = std::fs::read_to_string(&f).unwrap();
        let header =
            src.lines().next().unwrap().strip_prefix("# expect: ").unwrap_or_else(|| panic!("{f:?} lacks '# expect:'"));
        let (mut line, mut key, mut msg, mut secret) = ("", "", "", None);
        let mut rest = header;
        // msg= runs to ` secret=` or the end of the line.
        if let Some((a, s)) = rest.split_once(" secret=") {
            rest = a;
            secret = Some(s);
        }
        for part in ["line=", "key=", "msg="] {
            let start = rest.find(part).unwrap() + part.len();
            let end = if part == "msg=" { rest.len() } else { rest[start..].find(' ').map(|i| start + i).unwrap() };
            let v = &rest[start..end];
            match part {
                "line=" => line = v,
                "key=" => key = v,
                _ => msg = v,
            }
        }
        let path = f.to_str().unwrap();
        let out = vigil(&["check", "--config", path]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{path}: expected exit 2, stderr:\n{err}");
        let located = format!("{path}:{line}:");
        assert!(err.contains(&located), "{path}: expected {located:?} in:\n{err}");
        assert!(err.contains(&format!(": {key}: ")), "{path}: expected key {key:?} in:\n{err}");
        assert!(err.contains(msg), "{path}: expected {msg:?} in:\n{err}");
        if let Some(s) = secret {
            assert!(!err.contains(s) && !text(&out.stdout).contains(s), "{path}: secret leaked:\n{err}");
        }
    }
}

#[test]
fn shipped_configs_pass_check() {
    // The example names a model this machine does not have; the demo's is shipped.
    for (cfg, args) in [("config/vigil.example.toml", &["--no-model"][..]), ("config/demo.toml", &[])] {
        let path = repo(cfg);
        let mut all = vec!["check", "--config", path.to_str().unwrap()];
        all.extend_from_slice(args);
        let out = vigil(&all);
        assert!(out.status.success(), "{cfg}: {}", text(&out.stderr));
        let summary = text(&out.stdout);
        assert!(summary.contains(" ok: ") && summary.contains("stream") && summary.contains("broker"), "{summary}");
    }
    let demo = text(&vigil(&["check", "--config", repo("config/demo.toml").to_str().unwrap()]).stdout);
    assert!(demo.contains("model ok: ") && demo.contains("largest request"), "{demo}");
}

#[test]
fn print_config_output_passes_check() {
    let out = vigil(&["print-config"]);
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("printed.toml");
    std::fs::write(&file, &out.stdout).unwrap();
    let check = vigil(&["check", "--config", file.to_str().unwrap(), "--no-model"]);
    assert!(check.status.success(), "{}", text(&check.stderr));
    assert!(text(&check.stdout).contains("1 stream, 2 prompts, broker embedded"), "{}", text(&check.stdout));
}

#[test]
fn passwords_never_reach_output() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mqtt.pass"), "s3cretMqttPw\n").unwrap();
    let cfg = dir.path().join("vigil.toml");
    std::fs::write(
        &cfg,
        r#"
[model]
path = "m"
[mqtt]
broker = "mqtt://vigil:brokerPw9@broker.local:1883"
username = "vigil"
password_file = "mqtt.pass"
[[prompt]]
name = "caption"
text = "Describe."
[[stream]]
name = "cam"
uri = "rtsp://admin:hunter2@cam.local/s"
prompts = ["caption"]
"#,
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();
    for args in [vec!["-vv", "check", "--config", cfg], vec!["-vv", "run", "--config", cfg]] {
        let out = vigil(&args);
        let all = text(&out.stdout) + &text(&out.stderr);
        for secret in ["hunter2", "brokerPw9", "s3cretMqttPw"] {
            assert!(!all.contains(secret), "{args:?} leaked {secret}:\n{all}");
        }
    }
    // Same with an error in the file, whose message quotes the URI.
    std::fs::write(
        dir.path().join("bad.toml"),
        "[model]\npath = \"m\"\n[mqtt]\nbroker = \"http://vigil:brokerPw9@b\"\n",
    )
    .unwrap();
    let out = vigil(&["check", "--config", dir.path().join("bad.toml").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!text(&out.stderr).contains("brokerPw9"), "{}", text(&out.stderr));
}

#[test]
fn unreadable_config_is_a_clear_error() {
    let out = vigil(&["check", "--config", "/nonexistent/vigil.toml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("/nonexistent/vigil.toml") && err.contains("cannot read"), "{err}");
}

/// A copy of the shipped model, broken one way, named by a config: `check` exits 2 and says
/// which file is wrong (what `run` would only find while loading).
#[test]
fn check_catches_what_run_would_hit_in_the_model() {
    type Break = fn(&Path);
    fn edit_json(p: &Path, f: impl FnOnce(&mut serde_json::Value)) {
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(p, v.to_string()).unwrap();
    }
    fn truncate(p: &Path, keep: u64) {
        std::fs::OpenOptions::new().write(true).open(p).unwrap().set_len(keep).unwrap();
    }
    let cases: Vec<(&str, Break, &str)> = vec![
        ("missing directory", |d| std::fs::remove_dir_all(d).unwrap(), "config.json"),
        (
            "corrupt config.json",
            |d| std::fs::write(d.join("config.json"), "{\"model_type\": ").unwrap(),
            "not valid JSON",
        ),
        (
            "incomplete config.json",
            |d| {
                edit_json(&d.join("config.json"), |v| {
                    v["text_config"].as_object_mut().unwrap().remove("hidden_size");
                })
            },
            "hidden_size",
        ),
        (
            "vision patch size 0",
            |d| edit_json(&d.join("config.json"), |v| v["vision_config"]["patch_size"] = 0.into()),
            "patch_size",
        ),
        (
            "truncated safetensors",
            |d| {
                let p = d.join("model.safetensors");
                let n = std::fs::metadata(&p).unwrap().len();
                truncate(&p, n / 2)
            },
            "model.safetensors",
        ),
        (
            "bad safetensors header",
            |d| {
                let p = d.join("model.safetensors");
                let mut b = std::fs::read(&p).unwrap();
                b[8..16].copy_from_slice(b"{garbage");
                std::fs::write(&p, b).unwrap()
            },
            "model.safetensors",
        ),
        (
            "garbage tokenizer.json",
            |d| std::fs::write(d.join("tokenizer.json"), "not a tokenizer").unwrap(),
            "tokenizer.json",
        ),
        ("missing tokenizer.json", |d| std::fs::remove_file(d.join("tokenizer.json")).unwrap(), "tokenizer.json"),
        (
            "broken chat template",
            |d| std::fs::write(d.join("chat_template.jinja"), "{% for m in messages %}{{ m.content ").unwrap(),
            "template",
        ),
        (
            "processor patch size 0",
            |d| {
                edit_json(&d.join("processor_config.json"), |v| {
                    v["video_processor"]["patch_size"] = 0.into();
                })
            },
            "patch_size",
        ),
    ];
    for (what, break_it, expect) in cases {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        std::fs::create_dir(&model).unwrap();
        for f in std::fs::read_dir(repo("models/tiny-videollama3")).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, model.join(f.file_name().unwrap())).unwrap();
        }
        break_it(&model);
        let cfg = dir.path().join("vigil.toml");
        std::fs::write(
            &cfg,
            "[model]\npath = \"model\"\ndevice = \"cpu\"\ndtype = \"f32\"\n\n[[prompt]]\nname = \"q\"\ntext = \"What?\"\n\n\
             [[stream]]\nname = \"cam\"\nuri = \"rtsp://cam.local/s\"\nprompts = [\"q\"]\n",
        )
        .unwrap();
        let out = vigil(&["check", "--config", cfg.to_str().unwrap()]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: check should fail; stderr:\n{err}");
        assert!(err.contains(": model: ") && err.contains(expect), "{what}: expected {expect:?} in:\n{err}");
        let skipped = vigil(&["check", "--config", cfg.to_str().unwrap(), "--no-model"]);
        assert!(skipped.status.success(), "{what}: --no-model skips the model: {}", text(&skipped.stderr));
    }
}

#[test]
fn check_refuses_a_device_this_build_cannot_open() {
    if cfg!(feature = "cuda") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vigil.toml");
    let model = repo("models/tiny-videollama3");
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = {model:?}\ndevice = \"cuda\"\n\n[[prompt]]\nname = \"q\"\ntext = \"What?\"\n\n\
             [[stream]]\nname = \"cam\"\nuri = \"rtsp://cam.local/s\"\nprompts = [\"q\"]\n"
        ),
    )
    .unwrap();
    let out = vigil(&["check", "--config", cfg.to_str().unwrap()]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("model.device") && err.contains("--features cuda"), "{err}");
}

/// A request that cannot fit the model's context is refused by `check` and by `run` (which may
/// be started without `check`), before anything is generated.
#[test]
fn a_request_beyond_the_context_is_refused_by_check_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vigil.toml");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = {:?}\ndevice = \"cpu\"\ndtype = \"f32\"\nmax_new_tokens = 40000\n\n[mqtt]\nembedded_port = {port}\n\n\
             [[prompt]]\nname = \"q\"\ntext = \"What?\"\n\n[[stream]]\nname = \"cam\"\nuri = \"rtsp://127.0.0.1:9/s\"\nprompts = [\"q\"]\n",
            repo("models/tiny-videollama3")
        ),
    )
    .unwrap();
    let out = vigil(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("beyond the model's context of 32768"), "{}", text(&out.stderr));
    let out = vigil(&["run", "--config", cfg.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("beyond the model's context of 32768"), "{}", text(&out.stderr));
}
