//! `vigil run` end to end: the real binary, a real mosquitto, the shipped tiny checkpoint and
//! the bundled clip, on the CPU. Signals are real signals.

mod common;
mod daemon_util;
mod source_util;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{free_port, schema, Mosquitto, Sub};
use daemon_util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_window_gets_one_answer_per_prompt_then_sigterm_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), "");
    let metrics_port = free_port();
    // The 12 s clip at 1 fps in 4 s windows: windows 0, 1, 2 of 4 frames each.
    let cfg = write_config(dir.path(), broker.port, metrics_port, "", &clip_stream("clip", ""));
    let mut sub = Sub::connect(broker.port, "e2e-sub", &["vigil/#"], false).await;
    let log = dir.path().join("vigil.log");
    let mut vigil = spawn_vigil(&cfg, &log);

    let got = answers(&mut sub, 6, Duration::from_secs(120)).await;
    assert_eq!(got.len(), 6, "expected 3 windows x 2 prompts; log:\n{}", log_text(&log));
    let answer_schema = schema::load("answer.v1.schema.json");
    let mut ids = HashSet::new();
    let mut per_prompt: HashMap<String, Vec<u64>> = HashMap::new();
    for a in &got {
        schema::assert_valid(&answer_schema, a);
        assert!(ids.insert(a["id"].as_str().unwrap().to_string()), "duplicate id {}", a["id"]);
        let w = &a["window"];
        let seq = w["seq"].as_u64().unwrap();
        assert_eq!(w["frames"], 4, "{a}");
        assert_eq!(w["start_s"].as_f64().unwrap(), 4.0 * seq as f64, "{a}");
        assert_eq!(w["end_s"].as_f64().unwrap(), 4.0 * seq as f64 + 3.0, "{a}");
        assert_eq!(w["fps"], 1.0);
        assert!(a["visual_tokens"]["kept"].as_u64().unwrap() <= a["visual_tokens"]["total"].as_u64().unwrap());
        assert!(a["tokens"]["generated"].as_u64().unwrap() >= 1);
        let total = a["latency_ms"]["total"].as_f64().unwrap();
        assert!(total >= a["latency_ms"]["decode"].as_f64().unwrap(), "{a}");
        per_prompt.entry(a["prompt"].as_str().unwrap().to_string()).or_default().push(seq);
    }
    for p in ["caption", "motion"] {
        let mut seqs = per_prompt.remove(p).unwrap_or_default();
        seqs.sort();
        assert_eq!(seqs, vec![0, 1, 2], "prompt {p}");
    }

    let m = http_get(metrics_port, "/metrics");
    assert_eq!(metric(&m, "vigil_windows_total{stream=\"clip\"}"), 3.0);
    assert_eq!(metric(&m, "vigil_answers_total{stream=\"clip\",prompt=\"caption\"}"), 3.0);
    assert_eq!(metric(&m, "vigil_answers_total{stream=\"clip\",prompt=\"motion\"}"), 3.0);
    assert_eq!(metric(&m, "vigil_jobs_queued_total{stream=\"clip\"}"), 3.0);
    let total = metric(&m, "vigil_visual_tokens_total");
    let kept = metric(&m, "vigil_visual_tokens_kept_total");
    assert!(total > 0.0 && kept > 0.0 && kept < total, "the ball moves over a static background: {kept}/{total}");
    assert!(metric(&m, "vigil_prefix_shared_total") >= 3.0, "two prompts per window share the video prefix");
    assert!(metric(&m, "vigil_stage_seconds_count{stage=\"total\"}") == 6.0);
    assert!(metric(&m, "vigil_mqtt_published_total") >= 6.0, "answers plus states and availability");
    assert_eq!(metric(&m, "vigil_mqtt_dropped_total"), 0.0);
    assert_eq!(metric(&m, "vigil_frames_total{stream=\"clip\"}"), 12.0);
    assert_eq!(metric(&m, "vigil_frames_dropped_total{stream=\"clip\"}"), 0.0);
    // The series appears with the first drop; none is expected here.
    assert!(!m.contains("vigil_jobs_dropped_total{stream=\"clip\"}"), "no job should be dropped:\n{m}");
    assert!(http_get(metrics_port, "/healthz").starts_with("HTTP/1.1 200"));

    stop_cleanly(&mut vigil, &log);
    sub.stop();
    // A fresh subscriber sees the retained availability.
    let mut late = Sub::connect(broker.port, "e2e-late", &["vigil/available"], false).await;
    let avail = late.next_on("vigil/available", Duration::from_secs(5)).await.expect("retained availability");
    assert_eq!(avail.text(), "stopped");
    assert!(avail.retain);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_a_stream_and_set_off_silences_one() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), "");
    let metrics_port = free_port();
    let a = clip_stream("a", "loop = true\nrealtime = true");
    let cfg = write_config(dir.path(), broker.port, metrics_port, "", &a);
    let mut sub = Sub::connect(broker.port, "e2e-sub2", &["vigil/#"], false).await;
    let log = dir.path().join("vigil.log");
    let mut vigil = spawn_vigil(&cfg, &log);

    let first = answers(&mut sub, 1, Duration::from_secs(60)).await;
    assert_eq!(first.len(), 1, "log:\n{}", log_text(&log));

    // Add stream b and reload.
    let b = clip_stream("b", "loop = true\nrealtime = true");
    write_config(dir.path(), broker.port, metrics_port, "", &format!("{a}\n{b}"));
    signal(&vigil, "HUP");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut from_b = 0;
    while from_b == 0 && tokio::time::Instant::now() < deadline {
        for ans in answers(&mut sub, 1, Duration::from_secs(5)).await {
            if ans["stream"] == "b" {
                from_b += 1;
            }
        }
    }
    assert!(from_b > 0, "stream b added by SIGHUP never answered; log:\n{}", log_text(&log));
    let loads = log_text(&log).matches("loaded in").count();
    assert_eq!(loads, 1, "the model must not be reloaded; log:\n{}", log_text(&log));
    // The publisher learnt about b at the reload: its `set` commands are accepted and echoed.
    sub.client.publish("vigil/b/motion/set", rumqttc::QoS::AtLeastOnce, false, "OFF").await.unwrap();
    let echo = sub.next_on("vigil/b/motion/enabled", Duration::from_secs(10)).await;
    assert_eq!(echo.map(|m| m.text()).as_deref(), Some("OFF"), "set for a reloaded stream; log:\n{}", log_text(&log));

    // A config that fails validation is rejected and the running one kept.
    std::fs::write(&cfg, "[model]\npath = 3\n").unwrap();
    signal(&vigil, "HUP");

    // set OFF silences stream a.
    sub.client.publish("vigil/a/set", rumqttc::QoS::AtLeastOnce, false, "OFF").await.unwrap();
    let status = sub.next_on("vigil/a/status", Duration::from_secs(10)).await.expect("a's status after set OFF");
    assert_eq!(status.json()["state"], "disabled");
    // Jobs already queued may still finish: let them, then expect silence from a only.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _ = sub.drain(Duration::from_millis(200)).await;
    let later = answers(&mut sub, 4, Duration::from_secs(12)).await;
    assert!(later.iter().all(|x| x["stream"] == "b"), "stream a answered after set OFF: {later:?}");
    assert!(!later.is_empty(), "stream b should keep answering");
    assert!(log_text(&log).contains("reload rejected"), "log:\n{}", log_text(&log));

    stop_cleanly(&mut vigil, &log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_model_drops_old_jobs_with_counters() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), "");
    let metrics_port = free_port();
    // Many windows at once (file as fast as possible, 1 s windows) against long answers and a
    // short queue age: the engine must shed load instead of growing a backlog.
    let engine = "max_queue_age_s = 0.5\nqueue_capacity = 4\nmax_batch = 1";
    let s = clip_stream("flood", "window_seconds = 1.0\nstride_seconds = 1.0");
    let cfg = write_config(dir.path(), broker.port, metrics_port, engine, &s);
    use_endless_model(&cfg, 64);
    let log = dir.path().join("vigil.log");
    let mut vigil = spawn_vigil(&cfg, &log);

    let deadline = Instant::now() + Duration::from_secs(90);
    let mut dropped = 0.0;
    let mut windows = 0.0;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        if let Ok(m) = std::panic::catch_unwind(|| http_get(metrics_port, "/metrics")) {
            if m.contains("vigil_windows_total{stream=\"flood\"}") {
                windows = metric(&m, "vigil_windows_total{stream=\"flood\"}");
                dropped = m
                    .lines()
                    .find_map(|l| l.strip_prefix("vigil_jobs_dropped_total{stream=\"flood\"} "))
                    .map(|v| v.trim().parse().unwrap())
                    .unwrap_or(0.0);
                let queued = metric(&m, "vigil_engine_queue_depth");
                assert!(queued <= 4.0, "queue must stay bounded: {queued}");
                if windows >= 12.0 && dropped > 0.0 {
                    break;
                }
            }
        }
    }
    assert!(windows >= 12.0, "all 12 windows should be read; log:\n{}", log_text(&log));
    assert!(dropped > 0.0, "a slow engine must drop old jobs (counted); log:\n{}", log_text(&log));
    stop_cleanly(&mut vigil, &log);
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(repo("systemd/vigil.service")).unwrap();
    assert!(
        unit.contains("Type=notify") && unit.contains("WatchdogSec=") && unit.contains("ExecReload=/bin/kill -HUP")
    );
    assert!(
        !unit.lines().any(|l| l.starts_with("PrivateDevices=") || l.starts_with("DeviceAllow=")),
        "CUDA needs /dev/nvidia*"
    );
    // verify checks that ExecStart's binary exists: point it at the one under test.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vigil.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/vigil", env!("CARGO_BIN_EXE_vigil"))).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", path.to_str().unwrap()])
        .output()
        .expect("systemd-analyze (Debian package systemd; scripts/setup.sh installs it)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "systemd-analyze verify:\n{err}");
}

#[test]
fn systemd_unit_is_hardened() {
    let unit = std::fs::read_to_string(repo("systemd/vigil.service")).unwrap();
    // The sandbox must leave the cameras and the GPU reachable.
    assert!(unit.lines().any(|l| l.trim() == "SupplementaryGroups=video render"), "video: V4L2, render: GPU nodes");
    assert!(
        !unit
            .lines()
            .map(|l| l.replace(' ', ""))
            .any(|l| l == "MemoryDenyWriteExecute=yes" || l == "MemoryDenyWriteExecute=true"),
        "CUDA's PTX JIT needs writable+executable memory"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vigil.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/vigil", env!("CARGO_BIN_EXE_vigil"))).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", path.to_str().unwrap()])
        .output()
        .expect("systemd-analyze (Debian package systemd; scripts/setup.sh installs it)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // "→ Overall exposure level for vigil.service: 1.9 OK 🙂"
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for vigil.service:").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure level in systemd-analyze security:\n{text}"));
    assert!(score <= 2.5, "exposure {score} > 2.5; systemd-analyze security:\n{text}");
}

/// A config with two streams: `cam` (the RTSP `url`, 2 fps, 1 s windows, quick reconnects) and
/// `file` (the clip looped in real time).
fn camera_and_file(dir: &std::path::Path, broker_port: u16, url: &str) -> std::path::PathBuf {
    let cam = format!(
        "[[stream]]\nname = \"cam\"\nuri = \"{url}\"\nprompts = [\"caption\"]\nfps = 2.0\nwindow_seconds = 1.0\n\
         stride_seconds = 1.0\nreconnect_min_s = 0.2\nreconnect_max_s = 1.0\n"
    );
    let file = clip_stream("file", "loop = true\nrealtime = true\nwindow_seconds = 2.0\nstride_seconds = 2.0");
    write_config(dir, broker_port, free_port(), "", &format!("{cam}\n{file}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtsp_stream_keeps_answering_after_its_server_restarts_while_a_file_stream_continues() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), "");
    let rtsp_port = source_util::free_port();
    let mut server = source_util::RtspServer::start(rtsp_port);
    let cfg = camera_and_file(dir.path(), broker.port, &server.url());
    let mut sub = Sub::connect(broker.port, "e2e-rtsp", &["vigil/#"], false).await;
    let log = dir.path().join("vigil.log");
    let mut vigil = spawn_vigil(&cfg, &log);

    // Both streams answer.
    let mut seen = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < 2 && tokio::time::Instant::now() < deadline {
        for a in answers(&mut sub, 1, Duration::from_secs(5)).await {
            seen.insert(a["stream"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(seen.len(), 2, "both streams should answer; log:\n{}", log_text(&log));

    // The camera's server goes away: cam reports reconnecting, the file keeps answering.
    server.stop();
    let mut reconnecting = false;
    let mut file_answers_during_outage = 0;
    let outage_end = tokio::time::Instant::now() + Duration::from_secs(8);
    while tokio::time::Instant::now() < outage_end {
        let left = outage_end.saturating_duration_since(tokio::time::Instant::now());
        let Some(m) = sub.next(left).await else { break };
        if m.topic == "vigil/cam/status" && m.json()["state"] == "reconnecting" {
            reconnecting = true;
        }
        if is_answer_topic(&m.topic) && m.json()["stream"] == "file" {
            file_answers_during_outage += 1;
        }
    }
    assert!(reconnecting, "cam should report reconnecting; log:\n{}", log_text(&log));
    assert!(file_answers_during_outage > 0, "the file stream must keep answering; log:\n{}", log_text(&log));

    // Back on the same port: cam answers again.
    let _server2 = source_util::RtspServer::start(rtsp_port);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut cam_again = false;
    while !cam_again && tokio::time::Instant::now() < deadline {
        for a in answers(&mut sub, 1, Duration::from_secs(5)).await {
            cam_again |= a["stream"] == "cam";
        }
    }
    assert!(cam_again, "cam should answer after its server is back; log:\n{}", log_text(&log));
    stop_cleanly(&mut vigil, &log);
}

/// A camera that hangs without closing anything (its session stays up, no frame comes): the
/// stall watchdog (10 s at 2 fps) restarts the stream, which reports `reconnecting` with the
/// reason, while the other stream keeps answering; once the camera sends again, it answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtsp_camera_that_hangs_is_restarted_by_the_stall_watchdog() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), "");
    let server = source_util::RtspServer::start(source_util::free_port());
    let cfg = camera_and_file(dir.path(), broker.port, &server.url());
    let mut sub = Sub::connect(broker.port, "e2e-hang", &["vigil/#"], false).await;
    let log = dir.path().join("vigil.log");
    let mut vigil = spawn_vigil(&cfg, &log);
    let mut cam_answers = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while cam_answers == 0 && tokio::time::Instant::now() < deadline {
        for a in answers(&mut sub, 1, Duration::from_secs(5)).await {
            cam_answers += (a["stream"] == "cam") as usize;
        }
    }
    assert!(cam_answers > 0, "cam should answer; log:\n{}", log_text(&log));

    server.freeze(true);
    let hung = tokio::time::Instant::now();
    let mut reason = None;
    let mut file_answers = 0;
    let deadline = hung + Duration::from_secs(30);
    while reason.is_none() && tokio::time::Instant::now() < deadline {
        let Some(m) = sub.next(deadline.saturating_duration_since(tokio::time::Instant::now())).await else { break };
        if m.topic == "vigil/cam/status" && m.json()["state"] == "reconnecting" {
            reason = m.json()["error"].as_str().map(String::from);
        }
        file_answers += (is_answer_topic(&m.topic) && m.json()["stream"] == "file") as usize;
    }
    let reason = reason.unwrap_or_else(|| panic!("cam never reported reconnecting; log:\n{}", log_text(&log)));
    assert!(reason.contains("stalled"), "{reason}");
    assert!(hung.elapsed() >= Duration::from_secs(9), "restarted after {:?}, before the stall limit", hung.elapsed());
    assert!(file_answers > 0, "the file stream must keep answering; log:\n{}", log_text(&log));

    // Frames again: the stream reports `streaming`, then answers windows it captured since.
    server.freeze(false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    let (mut streaming, mut cam_again) = (false, false);
    while !cam_again && tokio::time::Instant::now() < deadline {
        let Some(m) = sub.next(deadline.saturating_duration_since(tokio::time::Instant::now())).await else { break };
        if m.topic == "vigil/cam/status" {
            streaming = m.json()["state"] == "streaming";
        }
        cam_again = streaming && is_answer_topic(&m.topic) && m.json()["stream"] == "cam";
    }
    assert!(cam_again, "cam should stream and answer once it sends again; log:\n{}", log_text(&log));
    stop_cleanly(&mut vigil, &log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_run_loses_no_answer_of_a_completed_job() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), "");
    let cfg = write_config(
        dir.path(),
        broker.port,
        free_port(),
        "",
        &clip_stream("live", "loop = true\nrealtime = true\nwindow_seconds = 1.0\nstride_seconds = 1.0"),
    );
    let mut sub = Sub::connect(broker.port, "e2e-term", &["vigil/#"], false).await;
    let log = dir.path().join("vigil.log");
    let mut vigil = spawn_vigil(&cfg, &log);

    let mut received = answers(&mut sub, 3, Duration::from_secs(60)).await.len();
    assert_eq!(received, 3, "log:\n{}", log_text(&log));
    // Mid-run: windows keep coming and jobs are in flight.
    stop_cleanly(&mut vigil, &log);
    let mut stopped = false;
    for m in sub.drain(Duration::from_secs(1)).await {
        received += is_answer_topic(&m.topic) as usize;
        stopped |= m.topic == "vigil/available" && m.text() == "stopped";
    }
    assert!(stopped, "`stopped` must be published on the way out");
    let text = log_text(&log);
    let c = stop_counts(&text);
    assert_eq!((c.delivered, c.dropped, c.undelivered), (c.produced, 0, 0), "log:\n{text}");
    assert_eq!(received as u64, c.produced, "every answer the daemon produced must reach the broker; log:\n{text}");
    assert!(text.contains("0 MQTT messages dropped in all, 0 left in the outbox"), "log:\n{text}");
}

/// A stream whose frames are too elongated for the model (aspect > 200) fails once, with the
/// reason on `errors` and in its status, instead of failing every window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_the_model_cannot_take_fails_once_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let clip = source_util::clip(
        dir.path(),
        "thin.mkv",
        "videotestsrc num-buffers=40 ! video/x-raw,width=8,height=4000,framerate=5/1 ! jpegenc ! matroskamux",
    );
    let broker = Mosquitto::start(dir.path(), "");
    let stream =
        format!("[[stream]]\nname = \"thin\"\nuri = \"{}\"\nprompts = [\"caption\"]\nloop = true\n", clip.display());
    let cfg = write_config(dir.path(), broker.port, free_port(), "", &stream);
    let mut sub = Sub::connect(broker.port, "e2e-thin", &["vigil/errors", "vigil/thin/status"], false).await;
    let log = dir.path().join("vigil.log");
    let mut vigil = spawn_vigil(&cfg, &log);
    let mut errors = Vec::new();
    let mut failed = None;
    let mut deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while let Some(m) = sub.next(deadline.saturating_duration_since(tokio::time::Instant::now())).await {
        match m.topic.as_str() {
            "vigil/errors" => errors.push(m.json()),
            _ if m.json()["state"] == "failed" && failed.is_none() => {
                failed = Some(m.json());
                // Keep listening a while after the failure: no more errors may follow.
                deadline = deadline.min(tokio::time::Instant::now() + Duration::from_secs(4));
            }
            _ => {}
        }
    }
    let failed = failed.unwrap_or_else(|| panic!("no failed status; log:\n{}", log_text(&log)));
    let reason = failed["error"].as_str().unwrap();
    assert!(reason.contains("aspect ratio of") && reason.contains("at most 200"), "{failed}");
    assert!((1..=2).contains(&errors.len()), "one error for the stream (a window may fail first): {errors:?}");
    assert!(errors.iter().any(|e| e["message"].as_str().unwrap().contains("aspect ratio")), "{errors:?}");
    stop_cleanly(&mut vigil, &log);
}

/// SIGTERM mid-generation: the daemon stops within `shutdown_timeout_s` (the running batch
/// stops at a token boundary), not when the answer would be done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_generation_stops_within_the_shutdown_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), "");
    let stream = clip_stream("live", "loop = true\nwindow_seconds = 1.0\nstride_seconds = 1.0");
    let cfg = write_config(dir.path(), broker.port, free_port(), "shutdown_timeout_s = 1.0", &stream);
    // Answers of thousands of tokens: a window takes seconds to answer.
    use_endless_model(&cfg, 3000);
    let mut sub = Sub::connect(broker.port, "e2e-long", &["vigil/#"], false).await;
    let log = dir.path().join("vigil.log");
    let mut vigil = spawn_vigil(&cfg, &log);
    let first = answers(&mut sub, 1, Duration::from_secs(120)).await;
    assert_eq!(first.len(), 1, "log:\n{}", log_text(&log));
    let generated = first[0]["tokens"]["generated"].as_u64().unwrap();
    // The next windows are being answered now.
    let asked = Instant::now();
    stop_cleanly(&mut vigil, &log);
    let took = asked.elapsed();
    let text = log_text(&log);
    assert!(took < Duration::from_secs(4), "SIGTERM took {took:?} with a 1 s shutdown timeout; log:\n{text}");
    assert!(text.contains("in-flight jobs did not finish within 1 s"), "generation was cut short; log:\n{text}");
    eprintln!("first answer: {generated} tokens; stopped {took:?} after SIGTERM");
}

/// Fidelity end to end: on a lossless clip larger than `max_frame_pixels`, the daemon's answer
/// for a window is `vigil infer --frames` on the full-resolution frames of that window (frames
/// are resized once, at ingest, exactly as the processor resizes them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_answer_equals_infer_on_its_full_resolution_frames() {
    let dir = tempfile::tempdir().unwrap();
    let clip = source_util::raw_rgb_mkv(dir.path(), "raw.mkv", 8, 4, 320, 240);
    let broker = Mosquitto::start(dir.path(), "");
    let stream = format!(
        "[[stream]]\nname = \"raw\"\nuri = \"{}\"\nprompts = [\"caption\"]\nwindow_seconds = 2.0\nstride_seconds = 2.0\nmax_frame_pixels = 20000\n",
        clip.display()
    );
    let cfg = write_config(dir.path(), broker.port, free_port(), "", &stream);
    let mut sub = Sub::connect(broker.port, "e2e-raw", &["vigil/#"], false).await;
    let log = dir.path().join("vigil.log");
    let mut vigil = spawn_vigil(&cfg, &log);
    let got = answers(&mut sub, 1, Duration::from_secs(60)).await;
    assert_eq!(got.len(), 1, "log:\n{}", log_text(&log));
    let a = &got[0];
    assert_eq!(a["window"]["seq"], 0);
    stop_cleanly(&mut vigil, &log);

    // Window 0 at 1 fps holds frames 0 and 4 of the 4 fps clip, at full resolution.
    let native = vigil::processor::video_file::decode_video_file(&clip).unwrap();
    let mut paths = Vec::new();
    for i in [0, 4] {
        let f = &native.frames[i];
        let p = dir.path().join(format!("f{i}.png"));
        image::RgbImage::from_raw(f.width as u32, f.height as u32, f.data.clone()).unwrap().save(&p).unwrap();
        paths.push(p.to_string_lossy().into_owned());
    }
    let model = repo("models/tiny-videollama3");
    let question = a["question"].as_str().unwrap().to_string();
    let mut args = vec!["-q", "infer", "--model", model.to_str().unwrap(), "--fps", "1", "--prompt", &question];
    args.extend(["--max-new-tokens", "4", "--json", "--frames"]);
    args.extend(paths.iter().map(String::as_str));
    let out = Command::new(env!("CARGO_BIN_EXE_vigil")).args(&args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let want: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(a["visual_tokens"]["total"], want["video_tokens_total"], "daemon {a}\ninfer {want}");
    assert_eq!(a["visual_tokens"]["kept"], want["video_tokens_kept"], "daemon {a}\ninfer {want}");
    assert_eq!(a["tokens"]["prompt"], want["prompt_tokens"], "daemon {a}\ninfer {want}");
    assert_eq!(a["answer"], want["text"], "daemon {a}\ninfer {want}");
}

/// A prompt out of its schedule does not run; a window no prompt runs on is counted as skipped
/// (`reason="schedule"`); `set ON` overrides the schedule until its next boundary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_follow_their_schedule_and_set_overrides_it() {
    use chrono::Datelike;
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), "");
    let metrics_port = free_port();
    // Ranges that start three days from now only: out of schedule today, whatever the hour.
    let day = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
        [(chrono::Local::now().weekday().num_days_from_monday() as usize + 3) % 7];
    let streams = format!(
        "{}\n[[stream]]\nname = \"night\"\nuri = \"{}\"\nprompts = [\"motion\"]\nloop = true\nrealtime = true\nwindow_seconds = 1.0\nstride_seconds = 1.0\n",
        clip_stream("day", "loop = true\nrealtime = true\nwindow_seconds = 1.0\nstride_seconds = 1.0"),
        repo("assets/demo.mp4").display()
    );
    let cfg = write_config(dir.path(), broker.port, metrics_port, "", &streams);
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("kind = \"alert\"", &format!("kind = \"alert\"\ndays = [\"{day}\"]"));
    std::fs::write(&cfg, text).unwrap();
    let mut sub = Sub::connect(broker.port, "e2e-sched", &["vigil/+/+"], false).await;
    let log = dir.path().join("vigil.log");
    let mut vigil = spawn_vigil(&cfg, &log);
    let got = answers(&mut sub, 4, Duration::from_secs(60)).await;
    assert_eq!(got.len(), 4, "log:\n{}", log_text(&log));
    assert!(
        got.iter().all(|a| a["prompt"] == "caption" && a["stream"] == "day"),
        "only the unscheduled prompt runs: {got:?}"
    );
    let skipped = metric(
        &http_get(metrics_port, "/metrics"),
        "vigil_windows_skipped_total{stream=\"night\",reason=\"schedule\"}",
    );
    assert!(skipped >= 1.0, "the night stream's windows are skipped: {skipped}");

    // `set ON` runs it anyway, until the schedule's next boundary.
    sub.client.publish("vigil/night/motion/set", rumqttc::QoS::AtLeastOnce, false, "ON").await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut overridden = false;
    while let Some(m) = sub.next(deadline.saturating_duration_since(tokio::time::Instant::now())).await {
        if m.topic == "vigil/night/motion" {
            overridden = true;
            break;
        }
    }
    assert!(overridden, "set ON should override the schedule; log:\n{}", log_text(&log));
    stop_cleanly(&mut vigil, &log);
}

/// Motion-gated inference: with `skip_static`, a frozen scene runs the model for its first
/// window only; later windows are skipped (counted) and captions re-publish the last answer
/// marked `"skipped": "static"`. A moving scene is never skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_windows_skip_the_model_and_moving_ones_never_do() {
    let dir = tempfile::tempdir().unwrap();
    // Lossless, so that a frozen frame decodes to the very same pixels.
    let frozen = source_util::clip(
        dir.path(),
        "frozen.mkv",
        "videotestsrc pattern=ball num-buffers=1 ! imagefreeze num-buffers=40 ! video/x-raw,format=RGB,width=160,height=120,framerate=5/1 ! matroskamux",
    );
    // Noise: every token of every frame changes. (A real clip may hold still for a window, and
    // then it is rightly skipped.)
    let moving = source_util::clip(
        dir.path(),
        "moving.mkv",
        "videotestsrc pattern=snow num-buffers=60 ! video/x-raw,format=RGB,width=160,height=120,framerate=5/1 ! matroskamux",
    );
    let broker = Mosquitto::start(dir.path(), "");
    let metrics_port = free_port();
    // In real time: the first window's answer is in before the next window closes, so every
    // later window of both streams goes through the gate.
    let gate = "prompts = [\"caption\", \"motion\"]\nrealtime = true\nskip_static = true\nwindow_seconds = 2.0\nstride_seconds = 2.0";
    let streams = format!(
        "[[stream]]\nname = \"frozen\"\nuri = \"{}\"\n{gate}\n\n[[stream]]\nname = \"moving\"\nuri = \"{}\"\n{gate}\n",
        frozen.display(),
        moving.display()
    );
    let cfg = write_config(dir.path(), broker.port, metrics_port, "", &streams);
    let mut sub = Sub::connect(broker.port, "e2e-gate", &["vigil/+/+"], false).await;
    let log = dir.path().join("vigil.log");
    let mut vigil = spawn_vigil(&cfg, &log);
    // frozen: 4 windows x caption + window 0's motion; moving: 6 windows x 2 prompts.
    let got = answers(&mut sub, 5 + 12, Duration::from_secs(60)).await;
    let summary: Vec<String> = got
        .iter()
        .map(|a| {
            format!(
                "{}/{}#{}{}",
                a["stream"],
                a["prompt"],
                a["window"]["seq"],
                if a.get("skipped").is_some() { " skipped" } else { "" }
            )
        })
        .collect();
    assert_eq!(got.len(), 17, "{summary:?}");
    let of = |stream: &str, prompt: &str| -> Vec<&serde_json::Value> {
        got.iter().filter(|a| a["stream"] == stream && a["prompt"] == prompt).collect()
    };
    let captions = of("frozen", "caption");
    assert_eq!(captions.len(), 4, "{summary:?}");
    let answer_schema = schema::load("answer.v1.schema.json");
    for a in &captions {
        schema::assert_valid(&answer_schema, a);
        let seq = a["window"]["seq"].as_u64().unwrap();
        assert_eq!(a.get("skipped").is_some(), seq > 0, "only the first window runs the model: {a}");
        assert_eq!(a["answer"], captions[0]["answer"], "a skipped window re-publishes the last answer");
    }
    assert_eq!(of("frozen", "motion").len(), 1, "alert prompts keep their state: nothing re-published");
    assert!(
        got.iter().filter(|a| a["stream"] == "moving").all(|a| a.get("skipped").is_none()),
        "a moving scene always runs"
    );
    let m = http_get(metrics_port, "/metrics");
    assert_eq!(metric(&m, "vigil_windows_skipped_total{stream=\"frozen\",reason=\"static\"}"), 3.0);
    assert!(!m.contains("vigil_windows_skipped_total{stream=\"moving\""), "{m}");
    stop_cleanly(&mut vigil, &log);
}

/// Snapshots: with each answer of a `snapshot = true` prompt, a retained JPEG of the window's
/// key frame, described in the answer; `snapshot_dir` keeps the newest `snapshot_keep`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_go_with_their_answers_and_the_directory_is_capped() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), "");
    let cfg = write_config(
        dir.path(),
        broker.port,
        free_port(),
        "",
        &clip_stream("clip", "snapshot_dir = \"snaps\"\nsnapshot_keep = 2"),
    );
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "text = \"Describe what is happening in the video.\"",
        "text = \"Describe what is happening in the video.\"\nsnapshot = true",
    );
    std::fs::write(&cfg, text).unwrap();
    let mut sub =
        Sub::connect(broker.port, "e2e-snap", &["vigil/clip/caption", "vigil/clip/caption/snapshot"], false).await;
    let log = dir.path().join("vigil.log");
    let mut vigil = spawn_vigil(&cfg, &log);
    let mut answers_seen = Vec::new();
    let mut jpegs = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while answers_seen.len() < 3 || jpegs.len() < 3 {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(m) = sub.next(left).await else {
            panic!("{} answers, {} snapshots; log:\n{}", answers_seen.len(), jpegs.len(), log_text(&log))
        };
        if m.topic.ends_with("/snapshot") {
            jpegs.push(m.payload.clone());
        } else {
            answers_seen.push(m.json());
        }
    }
    let schema = schema::load("answer.v1.schema.json");
    for a in &answers_seen {
        schema::assert_valid(&schema, a);
        let s = &a["snapshot"];
        assert_eq!(s["topic"], "vigil/clip/caption/snapshot", "{a}");
        let img = image::load_from_memory(
            jpegs.iter().find(|j| j.len() as u64 == s["bytes"].as_u64().unwrap()).expect("its JPEG"),
        )
        .unwrap();
        assert_eq!(
            (img.width() as u64, img.height() as u64),
            (s["width"].as_u64().unwrap(), s["height"].as_u64().unwrap())
        );
        assert!(img.width() >= 28 && img.height() >= 28, "the window's frame size: {}x{}", img.width(), img.height());
    }
    stop_cleanly(&mut vigil, &log);
    let saved = std::fs::read_dir(dir.path().join("snaps")).unwrap().count();
    assert_eq!(saved, 2, "snapshot_keep = 2 of 3 windows");
}
