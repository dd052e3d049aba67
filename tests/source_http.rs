//! HTTP ingest (souphttpsrc through uridecodebin3) from a one-file server on 127.0.0.1.

mod source_util;

use std::io::{Read, Write};
use std::time::Duration;

use source_util::*;
use vigil::source::{EventKind, SourceManager, SourceOptions, SourceSpec};

/// Serve `body` to every GET on a free loopback port, for `max_conns` connections.
fn serve(body: Vec<u8>, max_conns: usize) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(max_conns) {
            let Ok(mut s) = stream else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: video/webm\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(&body);
        }
    });
    port
}

#[test]
fn http_source_delivers_exact_windows() {
    let dir = tempfile::tempdir().unwrap();
    let clip = vp8_webm(dir.path(), "clip.webm", 60, 30, 320, 240);
    let port = serve(std::fs::read(&clip).unwrap(), 8);
    init();
    let (mut mgr, mut events) = SourceManager::new(SourceOptions::default()).unwrap();
    let url = format!("http://127.0.0.1:{port}/clip.webm");
    let rx = mgr.add(SourceSpec::from_uri("web", &url, settings(2.0, 1.0, 1.0)).unwrap()).unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        got.push(rx.recv_timeout(Duration::from_secs(15)).expect("no window over HTTP"));
    }
    assert_eq!(times(&got), vec![vec![0.0, 0.5], vec![1.0, 1.5]]);
    assert_eq!((got[0].frames[0].width, got[0].frames[0].height), (320, 240));
    let mut seen = Vec::new();
    drain_events(&mut events, &mut seen);
    assert!(seen.iter().any(|e| matches!(&e.kind, EventKind::Caps(c) if c.codec == "VP8")), "{seen:?}");
    assert!(mgr.shutdown(Duration::from_secs(10)));
}

/// `vigil infer --video URL` reads over HTTP like a file: the same answer as from the local copy.
#[test]
fn infer_reads_a_video_url_like_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let clip = vp8_webm(dir.path(), "clip.webm", 20, 10, 160, 120);
    let port = serve(std::fs::read(&clip).unwrap(), 2);
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-videollama3");
    let run = |video: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vigil"))
            .args(["-q", "infer", "--model", model.to_str().unwrap(), "--video", video, "--fps", "2"])
            .args(["--prompt", "What moves?", "--max-new-tokens", "4", "--json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{video}: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (v["answer"].clone(), v["prompt_tokens"].clone())
    };
    let url = format!("http://127.0.0.1:{port}/clip.webm");
    assert_eq!(run(&url), run(clip.to_str().unwrap()));
}
