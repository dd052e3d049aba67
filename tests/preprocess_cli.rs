//! `vigil preprocess` end to end (real binary, real GStreamer decode) against transformers'
//! processor output for the same inputs (`expected.json["cli"]`).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/processor")
}

fn vigil(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vigil")).current_dir(root()).args(args).output().expect("run vigil")
}

#[test]
fn json_matches_transformers_in_both_layouts() {
    let exp: Value = serde_json::from_str(&std::fs::read_to_string(root().join("expected.json")).unwrap()).unwrap();
    let cli = &exp["cli"];
    let args: Vec<String> = serde_json::from_value(cli["args"].clone()).unwrap();
    for ckpt in ["ckpt_tf5", "ckpt_legacy"] {
        let mut a: Vec<&str> = vec!["preprocess", "--model", ckpt, "--json"];
        a.extend(args.iter().map(String::as_str));
        let out = vigil(&a);
        assert!(out.status.success(), "{ckpt}: {}", String::from_utf8_lossy(&out.stderr));
        let got: Value = serde_json::from_slice(&out.stdout).unwrap();
        for key in [
            "input_ids",
            "prompt_tokens",
            "image_grid_thw",
            "video_grid_thw",
            "video_tokens_total",
            "video_tokens_kept",
        ] {
            assert_eq!(got[key], cli[key], "{ckpt}: {key}");
        }
        let (g, w) = (got["pixel_values_sum"].as_f64().unwrap(), cli["pixel_values_sum"].as_f64().unwrap());
        assert!((g - w).abs() <= 1e-6 * w.abs(), "{ckpt}: pixel sum {g} vs {w}");
    }
}

#[test]
fn human_output_and_pruning_switch() {
    let on = vigil(&[
        "preprocess",
        "--model",
        "ckpt_tf5",
        "--frames",
        "media/clip_static_0.png",
        "media/clip_static_1.png",
        "media/clip_static_2.png",
        "media/clip_static_3.png",
        "--fps",
        "2",
        "--prompt",
        "Anything new?",
    ]);
    assert!(on.status.success(), "{}", String::from_utf8_lossy(&on.stderr));
    let text = String::from_utf8(on.stdout).unwrap();
    assert!(
        text.contains("prompt tokens:") && text.contains("before pruning") && text.contains("grid 4x2x4"),
        "{text}"
    );
    let json = |extra: &[&str]| -> Value {
        let mut a =
            vec!["preprocess", "--model", "ckpt_tf5", "--json", "--fps", "2", "--prompt", "Anything new?", "--frames"];
        a.extend([
            "media/clip_static_0.png",
            "media/clip_static_1.png",
            "media/clip_static_2.png",
            "media/clip_static_3.png",
        ]);
        a.extend(extra);
        serde_json::from_slice(&vigil(&a).stdout).unwrap()
    };
    let (pruned, full) = (json(&[]), json(&["--no-pruning"]));
    assert_eq!(full["video_tokens_kept"], full["video_tokens_total"]);
    assert!(pruned["video_tokens_kept"].as_u64() < full["video_tokens_kept"].as_u64());
    assert!(pruned["prompt_tokens"].as_u64() < full["prompt_tokens"].as_u64());
}

#[test]
fn errors_exit_nonzero_with_a_message() {
    let out = vigil(&["preprocess", "--model", "no_such_dir", "--prompt", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no_such_dir"));
    let out = vigil(&["preprocess", "--model", "ckpt_tf5", "--image", "media/bad_aspect.png", "--prompt", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("aspect ratio"));
    let out = vigil(&["preprocess", "--model", "ckpt_tf5", "--video", "media/missing.mkv", "--prompt", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.mkv"));
}

#[test]
fn max_frames_caps_a_video() {
    let run = |extra: &[&str]| -> Value {
        let mut a = vec!["preprocess", "--model", "ckpt_tf5", "--json", "--video", "media/clip12.mkv", "--prompt", "x"];
        a.extend(extra);
        let out = vigil(&a);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    // All 12 frames without sampling; 5 with --max-frames 5 (uniform, like num_frames=5).
    assert_eq!(run(&[])["video_grid_thw"][0][0], 12);
    assert_eq!(run(&["--max-frames", "5"])["video_grid_thw"][0][0], 5);
    // With --fps the cap applies to fps sampling: 12 frames at 6 fps sampled at 4 fps = 8, capped to 6.
    assert_eq!(run(&["--fps", "4", "--max-frames", "6"])["video_grid_thw"][0][0], 6);
}
