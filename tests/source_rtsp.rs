//! RTSP ingest against an in-process gst-rtsp-server on a free 127.0.0.1 port: probe, reconnect
//! with backoff while another stream keeps delivering, and unreachable hosts.

mod source_util;

use std::time::{Duration, Instant};

use source_util::*;
use vigil::config::StreamDefaults;
use vigil::source::{EventKind, SourceManager, SourceOptions, SourceSpec, StreamState};

fn live(fps: f64, window: f64, stride: f64) -> StreamDefaults {
    StreamDefaults {
        fps,
        window_seconds: window,
        stride_seconds: stride,
        reconnect_min_s: 0.5,
        reconnect_max_s: 2.0,
        latency_ms: 100,
        ..StreamDefaults::default()
    }
}

#[test]
fn probe_reads_the_rtsp_server() {
    let server = RtspServer::start(free_port());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["-q", "probe", &server.url(), "--fps", "5", "--window-seconds", "1", "--stride-seconds", "0.6"])
        .args(["--windows", "2", "--timeout-s", "15", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[0]["codec"], "H.264");
    assert_eq!((lines[0]["width"].as_u64(), lines[0]["height"].as_u64()), (Some(320), Some(240)));
    assert_eq!(lines[0]["framerate"], "15/1");
    // 1 s windows at 5 fps hold 5 frames; the stride of 0.6 s starts them 3 frames apart.
    for (i, w) in lines[1..].iter().enumerate() {
        assert_eq!(w["seq"], i as u64);
        assert_eq!(w["frames"], 5, "{w}");
        assert!((w["start_s"].as_f64().unwrap() - 0.6 * i as f64).abs() < 1e-9);
        assert!((w["first_frame_s"].as_f64().unwrap() - 0.6 * i as f64).abs() < 1e-9);
        assert!((w["last_frame_s"].as_f64().unwrap() - (0.6 * i as f64 + 0.8)).abs() < 1e-9);
    }
}

#[test]
fn reconnects_after_server_restart_while_another_stream_keeps_delivering() {
    let port_a = free_port();
    let mut server_a = RtspServer::start(port_a);
    let server_b = RtspServer::start(free_port());
    init();
    let opts = SourceOptions {
        stall_timeout: Some(Duration::from_secs(2)),
        start_timeout: Duration::from_secs(8),
        ..SourceOptions::default()
    };
    let (mut mgr, mut events) = SourceManager::new(opts).unwrap();
    let rx_a = mgr.add(SourceSpec::from_uri("a", &server_a.url(), live(5.0, 0.4, 0.4)).unwrap()).unwrap();
    let rx_b = mgr.add(SourceSpec::from_uri("b", &server_b.url(), live(5.0, 0.4, 0.4)).unwrap()).unwrap();
    let mut seen = Vec::new();
    for s in ["a", "b"] {
        if !seen.iter().any(|e| is_state(e, s, "streaming")) {
            wait_event(&mut events, &mut seen, Duration::from_secs(15), |e| is_state(e, s, "streaming"))
                .unwrap_or_else(|| panic!("stream {s} never streamed: {seen:?}"));
        }
    }
    let before = rx_a.recv_timeout(Duration::from_secs(5)).expect("a window from a");

    // Kill server A; B must keep delivering while A is down.
    server_a.stop();
    let down = Instant::now();
    let ev = wait_event(&mut events, &mut seen, Duration::from_secs(10), |e| is_state(e, "a", "reconnecting"))
        .unwrap_or_else(|| panic!("a never reported reconnecting: {seen:?}"));
    let EventKind::State(StreamState::Reconnecting { delay, error, .. }) = &ev.kind else { unreachable!() };
    assert!(!error.is_empty());
    assert!(*delay <= Duration::from_secs(2), "backoff above reconnect_max_s: {delay:?}");
    let b_before = mgr.stats("b").unwrap().frames;
    std::thread::sleep(Duration::from_millis(1500));
    let b_during = mgr.stats("b").unwrap().frames;
    assert!(b_during >= b_before + 4, "b stalled while a was down ({b_before} → {b_during})");
    assert!(mgr.stats("a").unwrap().reconnects >= 1);

    // Bring A back on the same port: it resumes within the backoff bound plus connect time.
    let t_restart = Instant::now();
    let _server_a2 = RtspServer::start(port_a);
    while rx_a.try_recv().is_some() {}
    wait_event(&mut events, &mut seen, Duration::from_secs(12), |e| is_state(e, "a", "streaming"))
        .unwrap_or_else(|| panic!("a did not resume: {seen:?}"));
    let resumed = t_restart.elapsed();
    assert!(resumed < Duration::from_secs(2) + Duration::from_secs(8), "resumed after {resumed:?}");
    // Windows flow again, later on the stream timeline than the outage began.
    // The first window may be the one the outage cut short (emitted with its real frames);
    // after it, frames resume later on the stream timeline by at least the outage (>= 1.5 s).
    let outage_s = down.elapsed().as_secs_f64().min(1.5);
    let end = Instant::now() + Duration::from_secs(5);
    let mut after = None;
    while Instant::now() < end && after.is_none() {
        if let Some(w) = rx_a.recv_timeout(Duration::from_millis(100)) {
            if w.first_time_s() >= before.last_time_s() + outage_s {
                after = Some(w);
            }
        }
    }
    let after = after.expect("no window after the reconnect");
    assert!(!after.frames.is_empty());
    let stats_a = mgr.stats("a").unwrap();
    assert_eq!(stats_a.state, StreamState::Streaming);
    // B never left `streaming`.
    assert!(
        !seen.iter().any(|e| e.stream == "b"
            && !is_state(e, "b", "streaming")
            && !is_state(e, "b", "starting")
            && matches!(e.kind, EventKind::State(_))),
        "{seen:?}"
    );
    assert!(rx_b.recv_timeout(Duration::from_secs(5)).is_some());

    // Run-time removal: stopping A reports `stopped` and closes its queue; B goes on.
    assert!(mgr.remove("a"));
    wait_event(&mut events, &mut seen, Duration::from_secs(5), |e| is_state(e, "a", "stopped")).expect("a stopped");
    let end = Instant::now() + Duration::from_secs(5);
    while !rx_a.is_closed() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(rx_a.is_closed());
    assert!(rx_b.recv_timeout(Duration::from_secs(5)).is_some());
    assert!(mgr.shutdown(Duration::from_secs(10)));
}

#[test]
fn unreachable_hosts_reconnect_without_leaking_credentials() {
    init();
    let opts = SourceOptions { start_timeout: Duration::from_secs(4), ..SourceOptions::default() };
    let (mut mgr, mut events) = SourceManager::new(opts).unwrap();
    let closed = format!("rtsp://admin:s3cr3tpw@127.0.0.1:{}/test", free_port());
    let _rx1 = mgr.add(SourceSpec::from_uri("refused", &closed, live(1.0, 1.0, 1.0)).unwrap()).unwrap();
    let _rx2 = mgr
        .add(
            SourceSpec::from_uri("nohost", "rtsp://admin:s3cr3tpw@nonexistent.invalid/stream", live(1.0, 1.0, 1.0))
                .unwrap(),
        )
        .unwrap();
    let mut seen = Vec::new();
    for s in ["refused", "nohost"] {
        let ev = match seen.iter().find(|e| is_state(e, s, "reconnecting")) {
            Some(e) => e.clone(),
            None => wait_event(&mut events, &mut seen, Duration::from_secs(10), |e| is_state(e, s, "reconnecting"))
                .unwrap_or_else(|| panic!("{s} never reported reconnecting: {seen:?}")),
        };
        let EventKind::State(st) = &ev.kind else { unreachable!() };
        let err = st.error().unwrap();
        assert!(!err.is_empty());
        assert!(!err.contains("s3cr3tpw"), "credentials leaked: {err}");
    }
    // They keep trying (forever for live sources) and can be stopped at any time.
    assert!(mgr.stats("refused").unwrap().reconnects >= 1);
    assert!(mgr.shutdown(Duration::from_secs(10)));
    drain_events(&mut events, &mut seen);
    assert!(seen.iter().all(|e| !format!("{:?}", e.kind).contains("s3cr3tpw")));
    assert!(seen.iter().any(|e| is_state(e, "refused", "stopped")));
}

#[test]
fn probe_fails_readably_on_unreachable_stream() {
    let url = format!("rtsp://127.0.0.1:{}/none", free_port());
    let t0 = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["-q", "probe", &url, "--timeout-s", "5"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(t0.elapsed() < Duration::from_secs(15));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("error: cannot open rtsp://127.0.0.1:"), "{err}");
}

#[test]
fn credentials_from_password_file_and_uri_are_used_but_never_shown() {
    let server = RtspServer::start_with_auth(free_port(), Some(("viewer", "pa55word")));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cam.pw"), "pa55word\n").unwrap();
    let toml = format!(
        "[model]\npath = \"m\"\n[[prompt]]\nname = \"p\"\ntext = \"t\"\n\
         [[stream]]\nname = \"good\"\nuri = \"{}\"\nprompts = [\"p\"]\nusername = \"viewer\"\npassword_file = \"cam.pw\"\nfps = 5.0\nwindow_seconds = 1.0\nstride_seconds = 1.0\n",
        server.url()
    );
    let cfg = vigil::config::Config::parse(&toml, "test.toml", dir.path()).expect("config");
    let good = SourceSpec::from_config(&cfg.streams[0], &cfg.base_dir).unwrap();
    assert_eq!(good.password.as_deref(), Some("pa55word"));
    assert!(!format!("{good:?}").contains("pa55word"));
    let bad_uri = server.url().replace("rtsp://", "rtsp://viewer:wr0ngpass@");
    init();
    let opts = SourceOptions { start_timeout: Duration::from_secs(8), ..SourceOptions::default() };
    let (mut mgr, mut events) = SourceManager::new(opts).unwrap();
    let rx = mgr.add(good).unwrap();
    mgr.add(SourceSpec::from_uri("bad", &bad_uri, live(5.0, 1.0, 1.0)).unwrap()).unwrap();
    let mut seen = Vec::new();
    assert!(rx.recv_timeout(Duration::from_secs(15)).is_some(), "no window with valid credentials: {seen:?}");
    let ev = match seen.iter().find(|e| is_state(e, "bad", "reconnecting")) {
        Some(e) => e.clone(),
        None => wait_event(&mut events, &mut seen, Duration::from_secs(12), |e| is_state(e, "bad", "reconnecting"))
            .unwrap_or_else(|| panic!("wrong password never reported: {seen:?}")),
    };
    let EventKind::State(st) = &ev.kind else { unreachable!() };
    let err = st.error().unwrap();
    assert!(!err.contains("wr0ngpass"), "{err}");
    eprintln!("wrong-password error: {err}");
    assert!(mgr.shutdown(Duration::from_secs(10)));
    drain_events(&mut events, &mut seen);
    let all = format!("{seen:?}");
    assert!(!all.contains("wr0ngpass") && !all.contains("pa55word"));
}

/// GStreamer's own debug log (what a user turns on to diagnose a camera) never sees the
/// password: it travels in rtspsrc's properties, not in the URI.
#[test]
fn credentials_in_the_uri_work_and_stay_out_of_gstreamer_logs() {
    let server = RtspServer::start_with_auth(free_port(), Some(("viewer", "pa55word")));
    let url = server.url().replace("rtsp://", "rtsp://viewer:pa55word@");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args([
            "-q",
            "probe",
            &url,
            "--timeout-s",
            "10",
            "--windows",
            "1",
            "--window-seconds",
            "1",
            "--stride-seconds",
            "1",
        ])
        .env("GST_DEBUG", "5")
        .env("GST_DEBUG_NO_COLOR", "1")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "probe with URI credentials failed:\n{}",
        &stderr[stderr.len().saturating_sub(3000)..]
    );
    assert!(stderr.contains("rtspsrc"), "GStreamer's debug log was on");
    assert!(!stderr.contains("pa55word") && !stdout.contains("pa55word"), "the password reached a log");
}
