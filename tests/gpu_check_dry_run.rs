//! `scripts/gpu-check.sh --device cpu`: the GPU check's steps at a tiny size, here — parity of
//! `vigil infer` with transformers on the committed fixtures (f32 and bf16), the bench, the
//! attention kernels, the engine against each request alone, and the summary — so the one
//! command a lent GPU runs is known to work before the GPU is there.

use std::process::Command;

#[test]
fn the_gpu_check_runs_on_the_cpu_and_writes_its_summary() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(root.join("scripts/gpu-check.sh"))
        .arg(out.path())
        .args(["--device", "cpu"])
        .env("VIGIL", env!("CARGO_BIN_EXE_vigil"))
        // The transformers peer is optional: without torch it is skipped and said so.
        .env("PYTHON", "python3")
        .output()
        .unwrap();
    let text = format!("{}\n{}", String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "{text}");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("summary.json")).unwrap()).unwrap();
    let p = &summary["parity"];
    assert_eq!(p["cases"], 10, "{summary:#}");
    assert_eq!(p["f32_equal"], 10, "f32 tokens differ from transformers: {summary:#}");
    assert!(p["bf16_mean_agreement"].as_f64().unwrap() > 0.5, "{summary:#}");
    let streams = &summary["bench"]["vigil_streams"];
    assert!(streams["1"].as_f64().unwrap() > 0.0 && streams["2"].as_f64().unwrap() > 0.0, "{summary:#}");
    assert!(summary["roofline"]["decode_tok_per_s"].as_f64().unwrap() > 0.0, "{summary:#}");
    // The attention step: the self-check of the three kernels (the CPU twin) and their times.
    let att = &summary["attention"];
    let checks = att["selfcheck"].as_array().unwrap();
    assert_eq!(checks.len(), 3, "{att:#}");
    assert!(checks.iter().all(|c| c["passed"] == true), "{att:#}");
    let cases: Vec<&str> = att["cases"].as_array().unwrap().iter().map(|c| c["case"].as_str().unwrap()).collect();
    assert_eq!(cases.len(), 4, "{att:#}");
    assert!(att["cases"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["path"] == "fused" && c["fused_ms"].as_f64().unwrap() > 0.0));
    // The engine step: batched answers against each request alone, both stream counts.
    let rows = summary["engine"]["rows"].as_array().unwrap();
    assert_eq!(rows.iter().map(|r| r["streams"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 8], "{summary:#}");
    assert!(rows.iter().all(|r| r["mismatches"] == 0 && r["answers"].as_u64().unwrap() > 0), "{summary:#}");
    let md = std::fs::read_to_string(out.path().join("summary.md")).unwrap();
    assert!(md.contains("parity f32: 10/10"), "{md}");
    assert!(md.contains("| attention per layer |") && md.contains("| decode |"), "{md}");
    assert!(md.contains("| engine (tiny checkpoint, f32) streams |"), "{md}");
}
