//! The fused attention path end to end on the CPU, where `attention = "fused"` runs the kernels'
//! plain-Rust twin: it reproduces transformers' tokens on the fixtures (a left-padded batch
//! included), and a kernel forced to fail its self-check
//! (`VIGIL_ATTENTION_SELFCHECK_CORRUPT`) is reported, counted and replaced by the reference
//! path without changing an answer.

mod common;
mod daemon_util;
mod engine_util;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::Duration;

use candle_core::{DType, Device};
use serde_json::Value;
use vigil::config::AttentionMode;
use vigil::model::fused::{self, CheckShapes, Kernel};

/// The attention policy is process-wide: tests that set it in this process take turns.
static POLICY: Mutex<()> = Mutex::new(());

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/infer")
}

fn vigil(args: &[&str], corrupt: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vigil"));
    cmd.current_dir(root()).args(args).env_remove("RUST_LOG").env_remove(fused::CORRUPT_ENV);
    if let Some(c) = corrupt {
        cmd.env(fused::CORRUPT_ENV, c);
    }
    let out = cmd.output().expect("run vigil");
    assert!(out.status.success(), "vigil {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("expected.json")).unwrap()).unwrap()
}

fn json_lines(out: &Output) -> Vec<Value> {
    String::from_utf8(out.stdout.clone()).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn fused_attention_reproduces_transformers_tokens_in_a_left_padded_batch() {
    let exp = expected();
    let max = exp["max_new_tokens"].to_string();
    let lay = &exp["layouts"]["tf5"];
    let out = vigil(
        &[
            "infer",
            "--model",
            "ckpt_tf5",
            "--batch",
            "batch.jsonl",
            "--json",
            "--max-new-tokens",
            &max,
            "--attention",
            "fused",
        ],
        None,
    );
    let log = String::from_utf8_lossy(&out.stderr);
    for k in ["vision", "prefill", "decode"] {
        assert!(log.contains(&format!("fused attention kernel verified kernel={k}")), "{k} not verified: {log}");
    }
    let got = json_lines(&out);
    let want = lay["batch"]["results"].as_array().unwrap();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g["token_ids"], w["token_ids"], "batch row {}", g["index"]);
    }
}

#[test]
fn a_kernel_failing_its_self_check_is_reported_and_answers_do_not_change() {
    let exp = expected();
    let max = exp["max_new_tokens"].to_string();
    let case = &exp["layouts"]["tf5"]["cases"]["image_and_frames"];
    let args: Vec<String> = serde_json::from_value(case["args"].clone()).unwrap();
    let mut cmd = vec!["infer", "--model", "ckpt_tf5", "--json", "--max-new-tokens", &max, "--attention", "fused"];
    cmd.extend(args.iter().map(String::as_str));
    let out = vigil(&cmd, Some("prefill,decode"));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("fused attention kernel verified kernel=vision"), "{log}");
    for k in ["prefill", "decode"] {
        assert!(log.contains(&format!("kernel={k}")) && log.contains("failed its self-check"), "{k}: {log}");
    }
    let got = json_lines(&out);
    assert_eq!(got[0]["token_ids"], case["token_ids"]);

    // The bench reports the failure and times the reference path for that kernel.
    let out = vigil(
        &["bench", "attention", "--device", "cpu", "--tiny", "--attention", "fused", "--iters", "1", "--json"],
        Some("decode"),
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let checks = r["selfcheck"].as_array().unwrap();
    let passed = |k: &str| checks.iter().find(|c| c["kernel"] == k).unwrap()["passed"].as_bool().unwrap();
    assert!(passed("vision") && passed("prefill") && !passed("decode"), "{r:#}");
    for c in r["cases"].as_array().unwrap() {
        let want = if c["kernel"] == "decode" { "reference" } else { "fused" };
        assert_eq!(c["path"], want, "{c}");
        if want == "fused" {
            assert!(c["max_abs_diff"].as_f64().unwrap() < 1e-4, "{c}");
        }
    }
}

/// The process-wide switch: checks run where the mode wants the kernels, their verdicts gate
/// each kernel, and the status feeds the metrics.
#[test]
fn configure_verifies_and_gates_each_kernel() {
    let _turn = POLICY.lock().unwrap_or_else(|e| e.into_inner());
    let cpu = Device::Cpu;
    let shapes = CheckShapes::default();
    assert!(fused::configure(AttentionMode::Auto, &cpu, DType::F32, &shapes).is_empty(), "auto: no kernels on the CPU");
    assert!(!fused::uses_fused(Kernel::Prefill, &cpu, DType::F32, 128));
    let results = fused::configure(AttentionMode::Fused, &cpu, DType::F32, &shapes);
    assert_eq!(results.len(), 3);
    assert!(results.iter().all(|r| r.passed), "{results:?}");
    for k in Kernel::ALL {
        assert!(fused::uses_fused(k, &cpu, DType::F32, 128), "{k}");
        assert!(!fused::uses_fused(k, &cpu, DType::BF16, 128), "{k}: bf16 was not checked");
    }
    assert!(fused::status().iter().all(|s| s.verified == Some(true) && s.failures == 0));
    assert!(fused::configure(AttentionMode::Reference, &cpu, DType::F32, &shapes).is_empty());
    assert!(!fused::uses_fused(Kernel::Vision, &cpu, DType::F32, 72));
}

/// The engine's packed prefix prefill on the fused kernels (one prefill call per sequence,
/// through narrowed views of the packed projections): a batch of unequal windows answers as each
/// request alone does.
#[test]
fn packed_prefill_on_the_fused_kernels_is_exact() {
    let _turn = POLICY.lock().unwrap_or_else(|e| e.into_inner());
    let cfg = engine_util::config("attention = \"fused\"", "max_batch = 16");
    let (work, got, stats) = engine_util::unequal_batch(&cfg);
    assert!(fused::uses_fused(Kernel::Prefill, &Device::Cpu, DType::F32, 64), "the prefill kernel is in use");
    assert!(stats.prefix_padding_skipped > 0);
    engine_util::assert_same_as_alone(&cfg, &work, &got);
}

/// The daemon with `attention = "fused"` and one kernel forced to fail: it answers, the log warns,
/// and /metrics counts the failure per kernel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_counts_a_failed_self_check_and_still_answers() {
    use daemon_util::*;
    let dir = tempfile::tempdir().unwrap();
    let broker = common::Mosquitto::start(dir.path(), "");
    let metrics_port = common::free_port();
    let cfg = write_config(dir.path(), broker.port, metrics_port, "", &clip_stream("clip", ""));
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("dtype = \"f32\"\n"));
    std::fs::write(&cfg, text.replacen("dtype = \"f32\"\n", "dtype = \"f32\"\nattention = \"fused\"\n", 1)).unwrap();
    let mut sub = common::Sub::connect(broker.port, "fused-sub", &["vigil/#"], false).await;
    let log = dir.path().join("vigil.log");
    let mut vigil = spawn_vigil_env(&cfg, &log, &[(fused::CORRUPT_ENV, "decode")]);
    let got = answers(&mut sub, 2, Duration::from_secs(120)).await;
    assert_eq!(got.len(), 2, "log:\n{}", log_text(&log));
    let m = http_get(metrics_port, "/metrics");
    assert_eq!(metric(&m, "vigil_attention_selfcheck_failures_total{kernel=\"decode\"}"), 1.0, "{m}");
    assert_eq!(metric(&m, "vigil_attention_selfcheck_failures_total{kernel=\"vision\"}"), 0.0);
    assert_eq!(metric(&m, "vigil_attention_kernel_verified{kernel=\"decode\"}"), 0.0);
    assert_eq!(metric(&m, "vigil_attention_kernel_verified{kernel=\"prefill\"}"), 1.0);
    stop_cleanly(&mut vigil, &log);
    let text = log_text(&log);
    assert!(text.contains("failed its self-check") && text.contains("kernel=decode"), "{text}");
    sub.stop();
}
