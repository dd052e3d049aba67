//! `model.repo` downloads through hf-hub (feature `hub`), against a minimal Hugging Face
//! "resolve" endpoint served on 127.0.0.1 from the committed tiny checkpoints.
//!
//! The server implements what hf-hub's sync client uses (huggingface_hub's `file_download.py`
//! protocol): `GET /{repo}/resolve/{revision}/{file}` with `Range`, answering `206` with
//! `ETag`, `X-Repo-Commit` and `Content-Range`, or `404` for files the repo lacks.
#![cfg(feature = "hub")]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{DType, Device};
use vigil::model::load::{cached_snapshot, download_snapshot_from};
use vigil::model::{GenerationParams, MultimodalInputs, VideoLlama3ForConditionalGeneration};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model")
}

/// Serve `repos` (repo id → directory) until `max_requests` were answered.
fn serve(repos: Vec<(String, PathBuf)>, max_requests: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(max_requests) {
            let Ok(mut stream) = stream else { continue };
            stream.set_read_timeout(Some(Duration::from_secs(5))).ok();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut range_start = 0usize;
            let mut range_end: Option<usize> = None;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    let (a, b) = v.trim().split_once('-').unwrap_or((v.trim(), ""));
                    range_start = a.parse().unwrap_or(0);
                    range_end = b.parse().ok();
                }
            }
            let path = request_line.split_whitespace().nth(1).unwrap_or("/").to_string();
            let file = repos.iter().find_map(|(repo, dir)| {
                let rest = path.strip_prefix(&format!("/{repo}/resolve/main/"))?;
                let p = dir.join(rest);
                p.is_file().then_some((rest.to_string(), p))
            });
            let response = match file {
                Some((name, p)) => {
                    let data = std::fs::read(p).unwrap();
                    let end = range_end.unwrap_or(data.len().saturating_sub(1)).min(data.len() - 1);
                    let body = &data[range_start.min(data.len())..=end];
                    let mut head = format!(
                        "HTTP/1.1 206 Partial Content\r\nETag: \"etag-{}-{}\"\r\nX-Repo-Commit: {COMMIT}\r\n\
                         Content-Range: bytes {range_start}-{end}/{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        name.replace('/', "_"),
                        data.len(),
                        data.len(),
                        body.len()
                    )
                    .into_bytes();
                    head.extend_from_slice(body);
                    head
                }
                None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
            };
            let _ = stream.write_all(&response);
        }
    });
    format!("http://{addr}")
}

#[test]
fn repo_download_then_offline_lookup_and_inference() {
    let endpoint = serve(
        vec![("test/tiny-a".into(), fixtures().join("tiny_a")), ("test/tiny-b".into(), fixtures().join("tiny_b"))],
        200,
    );
    let cache = tempfile::tempdir().unwrap();
    // Single-file checkpoint.
    let dir_a = download_snapshot_from(Some(&endpoint), Some(cache.path()), "test/tiny-a", None).unwrap();
    assert!(dir_a.join("model.safetensors").is_file());
    assert!(dir_a.join("generation_config.json").is_file());
    // Sharded checkpoint: every shard named by the index comes down.
    let dir_b = download_snapshot_from(Some(&endpoint), Some(cache.path()), "test/tiny-b", None).unwrap();
    assert_eq!(
        std::fs::read_dir(&dir_b)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("model-0000"))
            .count(),
        6
    );
    // The cache now resolves offline, to the same snapshot.
    assert_eq!(cached_snapshot(cache.path(), "test/tiny-b", None).unwrap(), dir_b);

    // And the downloaded weights are the committed ones: same greedy tokens as transformers.
    let model = VideoLlama3ForConditionalGeneration::from_pretrained(&dir_b, DType::F32, &Device::Cpu).unwrap();
    let cases = candle_core::safetensors::load(fixtures().join("tiny_b.cases.safetensors"), &Device::Cpu).unwrap();
    let ids = cases["text.input_ids"].to_dtype(DType::U32).unwrap();
    let expected: Vec<Vec<i64>> = cases["text.greedy_tokens"].to_vec2().unwrap();
    let out = model.generate(&MultimodalInputs::text(ids), &GenerationParams::greedy(16), &mut |_| {}).unwrap();
    let expected: Vec<u32> = expected[0].iter().map(|&t| t as u32).collect();
    assert_eq!(out.tokens[0], expected);

    // A repo the endpoint does not have is a clear error naming it.
    let err = download_snapshot_from(Some(&endpoint), Some(cache.path()), "test/missing", None).unwrap_err();
    assert!(err.to_string().contains("test/missing"), "{err}");
}
