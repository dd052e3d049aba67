//! `vigil infer` end to end (real binary, real checkpoints, GStreamer decode) against
//! transformers' processor + `model.generate(do_sample=False, max_new_tokens=16)` for the same
//! requests (fixtures from `tests/reference/make_checkpoints.py infer`), and on the demo checkpoint.

mod source_util;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/infer")
}

fn vigil_in(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vigil")).current_dir(dir).args(args).output().expect("run vigil")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("expected.json")).unwrap()).unwrap()
}

fn json_lines(out: &std::process::Output) -> Vec<Value> {
    assert!(out.status.success(), "vigil failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn check(got: &Value, want: &Value, what: &str) {
    for key in ["input_ids", "prompt_tokens", "token_ids", "text", "video_tokens_kept", "stopped_on_eos"] {
        assert_eq!(got[key], want[key], "{what}: {key}");
    }
    if let Some(total) = want.get("video_tokens_total") {
        assert_eq!(&got["video_tokens_total"], total, "{what}: video_tokens_total");
    }
}

#[test]
fn single_requests_match_transformers_token_for_token() {
    let exp = expected();
    let max = exp["max_new_tokens"].to_string();
    for (layout, lay) in exp["layouts"].as_object().unwrap() {
        let ckpt = format!("ckpt_{layout}");
        for (name, case) in lay["cases"].as_object().unwrap() {
            let args: Vec<String> = serde_json::from_value(case["args"].clone()).unwrap();
            let mut a = vec!["infer", "--model", &ckpt, "--json", "--max-new-tokens", &max];
            a.extend(args.iter().map(String::as_str));
            let got = json_lines(&vigil_in(&root(), &a));
            assert_eq!(got.len(), 1);
            check(&got[0], case, &format!("{layout}/{name}"));
            for key in ["load_ms", "vision_ms", "prefill_ms", "decode_ms", "tokens_per_s"] {
                assert!(got[0][key].as_f64().is_some_and(|v| v >= 0.0), "{layout}/{name}: {key} = {}", got[0][key]);
            }
        }
    }
}

#[test]
fn pruning_cases_really_drop_tokens() {
    // Guards the fixtures: the video cases must exercise pruning, or parity says nothing about it.
    let exp = expected();
    for lay in exp["layouts"].as_object().unwrap().values() {
        for name in ["video_frames", "image_and_frames"] {
            let c = &lay["cases"][name];
            assert!(c["video_tokens_kept"].as_u64() < c["video_tokens_total"].as_u64(), "{name}: {c}");
        }
    }
}

#[test]
fn batch_matches_transformers_and_one_by_one() {
    let exp = expected();
    let max = exp["max_new_tokens"].to_string();
    for (layout, lay) in exp["layouts"].as_object().unwrap() {
        let ckpt = format!("ckpt_{layout}");
        let got = json_lines(&vigil_in(
            &root(),
            &["infer", "--model", &ckpt, "--batch", "batch.jsonl", "--json", "--max-new-tokens", &max],
        ));
        let order: Vec<String> = serde_json::from_value(lay["batch"]["order"].clone()).unwrap();
        let want = lay["batch"]["results"].as_array().unwrap();
        assert_eq!(got.len(), want.len(), "{layout}: one line per request");
        // One row stops on an EOS id from generation_config.json while the others run on.
        let stopped: Vec<bool> = got.iter().map(|g| g["stopped_on_eos"].as_bool().unwrap()).collect();
        assert!(stopped.contains(&true) && stopped.contains(&false), "{layout}: {stopped:?}");
        for (i, ((g, w), name)) in got.iter().zip(want).zip(&order).enumerate() {
            assert_eq!(g["index"], i, "{layout}: input order");
            check(g, w, &format!("{layout}/batch/{name}"));
            // The same request alone (transformers and vigil) gives the same tokens.
            assert_eq!(g["token_ids"], lay["cases"][name]["token_ids"], "{layout}/{name}: batch vs single");
            assert_eq!(g["video_tokens_total"], lay["cases"][name]["video_tokens_total"], "{layout}/{name}");
        }
    }
}

#[test]
fn human_mode_streams_the_decoded_answer() {
    let exp = expected();
    let case = &exp["layouts"]["tf5"]["cases"]["text"];
    let out = vigil_in(
        &root(),
        &[
            "infer",
            "--model",
            "ckpt_tf5",
            "--max-new-tokens",
            "16",
            "--prompt",
            "The quick brown fox jumps over the lazy dog.",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.trim_end_matches('\n'), case["text"].as_str().unwrap());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tokens/s"));
}

#[test]
fn errors_are_clear() {
    let dir = root();
    let run = |args: &[&str]| {
        let out = vigil_in(&dir, args);
        assert!(!out.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    if !cfg!(feature = "cuda") {
        let e = run(&["infer", "--model", "ckpt_tf5", "--prompt", "x", "--device", "cuda"]);
        assert!(e.contains("without CUDA") && e.contains("--features cuda"), "{e}");
    }
    let e = run(&["infer", "--model", "ckpt_tf5", "--prompt", "x", "--device", "tpu"]);
    assert!(e.contains("cuda:N"), "{e}");
    let e = run(&["infer", "--model", "no_such_dir", "--prompt", "x"]);
    assert!(e.contains("no_such_dir"), "{e}");
    let e = run(&["infer", "--model", "ckpt_tf5", "--prompt", "x", "--image", "../processor/media/bad_aspect.png"]);
    assert!(e.contains("aspect ratio"), "{e}");
    let e = run(&["infer", "--model", "ckpt_tf5", "--batch", "batch.jsonl", "--image", "../processor/media/odd.png"]);
    assert!(e.contains("--batch"), "{e}");
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"ok\"}\n{\"promt\": \"typo\"}\n").unwrap();
    let e = run(&["infer", "--model", dir.join("ckpt_tf5").to_str().unwrap(), "--batch", bad.to_str().unwrap()]);
    assert!(e.contains("bad.jsonl:2") && e.contains("promt"), "{e}");
    let e = run(&["infer", "--model", "ckpt_tf5", "--prompt", "x", "--dtype", "f64"]);
    assert!(e.contains("bf16"), "{e}");
}

/// The demo checkpoint shipped for `config/demo.toml` answers its two questions about the
/// bundled clip's three 4-second windows (sampled at 1 fps, as the demo does): a red ball moving,
/// the same ball frozen, a blue ball moving.
#[test]
fn demo_checkpoint_answers_on_the_bundled_clip() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let clip = vigil::processor::video_file::decode_video_file(&repo.join("assets/demo.mp4")).unwrap();
    assert_eq!((clip.fps, clip.frames.len()), (10.0, 120));
    let mut batch = String::new();
    for window in 0..3 {
        let frames: Vec<String> = (0..4)
            .map(|i| {
                let f = &clip.frames[window * 40 + i * 10];
                let p = dir.path().join(format!("w{window}f{i}.png"));
                image::RgbImage::from_raw(f.width as u32, f.height as u32, f.data.clone()).unwrap().save(&p).unwrap();
                p.to_string_lossy().into_owned()
            })
            .collect();
        for prompt in ["What color is the ball?", "Is the ball moving?"] {
            batch += &serde_json::json!({"prompt": prompt, "frames": frames, "fps": 1.0}).to_string();
            batch.push('\n');
        }
    }
    std::fs::write(dir.path().join("demo.jsonl"), batch).unwrap();
    let out = vigil_in(
        repo,
        &[
            "-q",
            "infer",
            "--model",
            "models/tiny-videollama3",
            "--batch",
            dir.path().join("demo.jsonl").to_str().unwrap(),
            "--json",
        ],
    );
    let got: Vec<String> = json_lines(&out).iter().map(|r| r["text"].as_str().unwrap().to_string()).collect();
    assert_eq!(got, ["red", "yes", "red", "no", "blue", "yes"]);
    for r in json_lines(&out) {
        assert_eq!(r["stopped_on_eos"], true, "{r}");
        assert!(r["video_tokens_kept"].as_u64().unwrap() < r["video_tokens_total"].as_u64().unwrap(), "{r}");
    }
}

/// The engine's path: media already in memory (`LoadedRequest::new` + `infer_loaded`) gives the
/// same tokens as the CLI / transformers.
#[test]
fn in_memory_requests_match_transformers() {
    use vigil::processor::{report::LoadedRequest, Processor, RgbImage, Video};
    let exp = expected();
    let dir = root().join("ckpt_tf5");
    let model = vigil::model::VideoLlama3ForConditionalGeneration::from_pretrained(
        &dir,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let processor = Processor::from_pretrained(&dir).unwrap();
    let media = root().join("../processor/media");
    let frames = (0..4)
        .map(|i| RgbImage::open(&media.join(format!("clip_moving_{i}.png"))))
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let video = LoadedRequest::new(
        "What is shown in this video?",
        vec![],
        vec![Video::from_frames(frames, Some(2.0)).unwrap()],
    );
    let image =
        LoadedRequest::new("Describe the image.", vec![RgbImage::open(&media.join("down.png")).unwrap()], vec![]);
    let opts =
        vigil::infer::InferOptions { generation: vigil::model::GenerationParams::greedy(16), ..Default::default() };
    let out = vigil::infer::infer_loaded(&model, &processor, &[video, image], &opts, &mut |_, _| {}).unwrap();
    let cases = &exp["layouts"]["tf5"]["cases"];
    for (r, name) in out.results.iter().zip(["video_frames", "image"]) {
        assert_eq!(serde_json::json!(r.token_ids), cases[name]["token_ids"], "{name}");
        assert_eq!(serde_json::json!(r.input_ids), cases[name]["input_ids"], "{name}");
    }
}

/// `config/demo.toml` on a fresh clone: its model section resolves to the bundled checkpoint,
/// which takes a 4-frame window at the demo's largest frame size (max_frame_pixels) quickly.
#[test]
fn demo_config_model_takes_a_full_size_window() {
    use vigil::processor::{report::LoadedRequest, Processor, RgbImage, Video};
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cfg = vigil::Config::load(&repo.join("config/demo.toml")).unwrap();
    let dir = vigil::model::load::model_dir(&cfg.model, &cfg.base_dir).unwrap();
    let model = vigil::model::load::load_model(&cfg.model, &cfg.base_dir).unwrap();
    let processor = Processor::from_pretrained(&dir).unwrap();
    let side = (cfg.defaults.max_frame_pixels as f64).sqrt() as usize; // 224 x 224 = 50176
    let frames: Vec<RgbImage> = (0..4)
        .map(|k| {
            RgbImage::new(
                side,
                side,
                (0..side * side * 3).map(|i| ((i / 3 + 7 * k * (i % side)) % 256) as u8).collect(),
            )
            .unwrap()
        })
        .collect();
    let req = LoadedRequest::new(
        &cfg.prompts[0].text,
        vec![],
        vec![Video::from_frames(frames, Some(cfg.defaults.fps)).unwrap()],
    );
    let opts =
        vigil::infer::InferOptions { generation: vigil::model::GenerationParams::greedy(16), ..Default::default() };
    let t0 = std::time::Instant::now();
    let out = vigil::infer::infer_loaded(&model, &processor, &[req], &opts, &mut |_, _| {}).unwrap();
    let took = t0.elapsed();
    let r = &out.results[0];
    // 224 px = 16 patches of 14 px; 2x2 merge: 64 tokens per frame, nothing shrunk.
    assert_eq!(r.video_tokens_total, 4 * 64, "{r:?}");
    assert!(!r.token_ids.is_empty());
    eprintln!(
        "4-frame window: {took:?} (vision {:.1} ms, prefill {:.1} ms, decode {:.1} ms)",
        out.vision_ms, out.prefill_ms, out.decode_ms
    );
    // Generous bound for loaded CI machines and unoptimised test builds; typically ~50 ms.
    assert!(took < std::time::Duration::from_secs(10), "{took:?}");
}

#[test]
fn sampling_dtype_and_pruning_flags() {
    let frames = [
        "../processor/media/clip_moving_0.png",
        "../processor/media/clip_moving_1.png",
        "../processor/media/clip_moving_2.png",
        "../processor/media/clip_moving_3.png",
    ];
    let run = |extra: &[&str]| -> Value {
        let mut a = vec![
            "infer",
            "--model",
            "ckpt_legacy",
            "--json",
            "--max-new-tokens",
            "12",
            "--fps",
            "2",
            "--prompt",
            "What is shown in this video?",
            "--frames",
        ];
        a.extend(frames);
        a.extend(extra);
        json_lines(&vigil_in(&root(), &a)).remove(0)
    };
    let greedy = run(&[]);
    let s1 = run(&["--temperature", "1.5", "--seed", "1"]);
    assert_eq!(
        s1["token_ids"],
        run(&["--temperature", "1.5", "--seed", "1"])["token_ids"],
        "seeded sampling is reproducible"
    );
    let draws: Vec<Value> =
        (2..6).map(|s| run(&["--temperature", "1.5", "--seed", &s.to_string()])["token_ids"].clone()).collect();
    assert!(
        draws.iter().any(|d| *d != s1["token_ids"]) || s1["token_ids"] != greedy["token_ids"],
        "sampling never varies"
    );
    let full = run(&["--no-pruning"]);
    assert_eq!(full["video_tokens_kept"], full["video_tokens_total"]);
    assert!(full["prompt_tokens"].as_u64() > greedy["prompt_tokens"].as_u64());
    // Reduced precision runs (no parity claim: bf16 rounds differently from transformers' f32).
    let bf16 = run(&["--dtype", "bf16"]);
    assert_eq!(bf16["input_ids"], greedy["input_ids"]);
    assert!(!bf16["token_ids"].as_array().unwrap().is_empty());
}

/// `vigil bench --shape CONFIG --random-weights` end to end at tiny shapes: the checkpoint it
/// saves loads again (second run re-uses it), the workload and figures are reported, the
/// serving path answered every (window, prompt), and a bad invocation is refused.
#[test]
fn bench_at_random_shapes_reports_every_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let weights = tmp.path().join("weights");
    let shape = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-videollama3/config.json");
    let args = [
        "bench",
        "--shape",
        shape.to_str().unwrap(),
        "--random-weights",
        "--frames",
        "4",
        "--size",
        "112x84",
        "--streams",
        "1,3",
        "--windows",
        "2",
        "--prompts",
        "3",
        "--new-tokens",
        "5",
        "--save-weights",
        weights.to_str().unwrap(),
        "--json",
    ];
    let run = || {
        let out = vigil_in(tmp.path(), &args);
        assert!(out.status.success(), "bench failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let r = run();
    assert_eq!(r["implementation"], "vigil");
    assert_eq!(r["checkpoint"], weights.to_str().unwrap());
    assert!(weights.join("model.safetensors").is_file() && weights.join("tokenizer.json").is_file());
    let w = &r["workload"];
    assert_eq!((w["frames"].as_u64(), w["width"].as_u64(), w["height"].as_u64()), (Some(4), Some(112), Some(84)));
    assert_eq!(w["questions"].as_array().unwrap().len(), 3);
    // Exactly new_tokens generated (the bench checkpoint has no EOS).
    assert_eq!(r["single"]["generated"], 5);
    assert_eq!(r["single"]["tokens"].as_array().unwrap().len(), 5);
    let kept = r["single"]["visual_tokens_kept"].as_u64().unwrap();
    let total = r["single"]["visual_tokens_total"].as_u64().unwrap();
    // 112x84 -> 4x3 merged tokens per frame; half the columns static: pruning drops some.
    assert_eq!(total, 4 * 12);
    assert!(kept < total && kept >= 12 + 3, "kept {kept} of {total}");
    let stream = r["stream"].as_array().unwrap();
    assert_eq!(stream.len(), 2);
    for (s, n) in stream.iter().zip([1u64, 3]) {
        assert_eq!(s["streams"].as_u64(), Some(n));
        assert_eq!(s["windows"].as_u64(), Some(2 * n));
        assert!(s["windows_per_s"].as_f64().unwrap() > 0.0);
        // Every window's tokens were counted: windows × prompts × new tokens over the run.
        let tok = s["generated_tok_per_s"].as_f64().unwrap() * s["seconds"].as_f64().unwrap();
        assert!((tok - (2 * n * 3 * 5) as f64).abs() < 0.5, "{tok}");
        assert_eq!(s["visual_tokens_total"].as_u64(), Some(2 * n * total));
    }
    assert!(r["vision"]["ms"].as_f64().unwrap() > 0.0);
    let again = run();
    assert_eq!(again["workload"], r["workload"], "same workload, same checksum");
    assert_eq!(again["single"]["tokens"], r["single"]["tokens"], "re-used weights give the same greedy tokens");

    let out = vigil_in(tmp.path(), &["bench", "--shape", "2b"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--random-weights"));
    // A CPU build refuses --device cuda before writing any weights.
    let gone = tmp.path().join("never");
    let out = vigil_in(
        tmp.path(),
        &["bench", "--shape", "2b", "--random-weights", "--device", "cuda", "--save-weights", gone.to_str().unwrap()],
    );
    if !cfg!(feature = "cuda") {
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("--features cuda"));
        assert!(!gone.exists());
    }
    let out = vigil_in(tmp.path(), &["bench", "--shape", "13b", "--random-weights"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected 2b, 7b or the path of a config.json"));
}

/// Media `run` handles, `infer` handles too: a variable-rate stream with no declared frame rate
/// (its rate comes from the timestamps); and what it cannot read, it says why.
#[test]
fn infer_takes_variable_rate_video_and_explains_what_it_cannot_read() {
    let dir = tempfile::tempdir().unwrap();
    // Ten frames at uneven times over 4.5 s: about 2 fps on average.
    let vfr = source_util::mjpeg_at(dir.path(), "vfr.mkv", &[0.0, 0.3, 0.5, 1.2, 1.5, 2.4, 2.6, 3.1, 4.0, 4.5]);
    let audio = source_util::clip(dir.path(), "audio.ogg", "audiotestsrc num-buffers=20 ! vorbisenc ! oggmux");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-videollama3");
    let infer = |video: &Path| {
        vigil_in(
            dir.path(),
            &[
                "-q",
                "infer",
                "--model",
                model.to_str().unwrap(),
                "--video",
                video.to_str().unwrap(),
                "--prompt",
                "What?",
                "--max-new-tokens",
                "2",
                "--json",
            ],
        )
    };
    let out = json_lines(&infer(&vfr));
    assert!(out[0]["text"].is_string(), "{out:?}");
    // Sampled at the default 1 fps from ~2 fps: more than one frame, fewer than all ten.
    let frames = out[0]["input_ids"].as_array().unwrap().len();
    assert!(out[0]["video_tokens_total"].as_u64().unwrap() > 4, "one frame only: {out:?} ({frames} ids)");
    let err = |o: std::process::Output| {
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let e = err(infer(&audio));
    assert!(e.contains("no decodable video stream"), "{e}");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let e = err(infer(Path::new(&format!("http://u:pw77@127.0.0.1:{port}/x.mp4"))));
    assert!(e.contains("cannot read the URL") && !e.contains("pw77") && !e.contains("no such file"), "{e}");
    let e = err(infer(&dir.path().join("missing.mp4")));
    assert!(e.contains("no such file"), "{e}");
}
