//! The daemon under test: configs for the shipped tiny model, the real `vigil` binary, and
//! readers for its MQTT answers, metrics and log.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{KillOnDrop, Sub};

pub fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// A config for the tiny model on the CPU against `broker_port`; `streams` is TOML appended.
pub fn write_config(dir: &Path, broker_port: u16, metrics_port: u16, engine: &str, streams: &str) -> PathBuf {
    let mqtt = format!("broker = \"mqtt://127.0.0.1:{broker_port}\"\nclient_id = \"vigil-e2e\"\nkeepalive_s = 5");
    write_config_mqtt(dir, &mqtt, metrics_port, engine, streams)
}

/// [`write_config`] with the whole `[mqtt]` section's body given.
pub fn write_config_mqtt(dir: &Path, mqtt: &str, metrics_port: u16, engine: &str, streams: &str) -> PathBuf {
    let text = format!(
        r#"
[model]
path = "{model}"
device = "cpu"
dtype = "f32"
max_new_tokens = 4

[mqtt]
{mqtt}

[metrics]
listen = "127.0.0.1:{metrics_port}"

[engine]
{engine}

[defaults]
fps = 1.0
window_seconds = 4.0
stride_seconds = 4.0
max_frame_pixels = 12544
realtime = false

[[prompt]]
name = "caption"
text = "Describe what is happening in the video."

[[prompt]]
name = "motion"
text = "Is anything moving? Answer yes or no."
kind = "alert"

{streams}
"#,
        model = repo("models/tiny-videollama3").display(),
    );
    let p = dir.join("vigil.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// A copy of the shipped tiny model without an end-of-sequence id, so that every answer runs to
/// `max_new_tokens`: a model as slow as a test needs. (The shipped one ends its answers after a
/// word or two.)
pub fn endless_model(dir: &Path) -> PathBuf {
    let out = dir.join("endless-model");
    std::fs::create_dir_all(&out).unwrap();
    for f in std::fs::read_dir(repo("models/tiny-videollama3")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, out.join(f.file_name().unwrap())).unwrap();
    }
    let edit = |name: &str, f: &dyn Fn(&mut serde_json::Value)| {
        let path = out.join(name);
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&path, v.to_string()).unwrap();
    };
    edit("generation_config.json", &|v| v["eos_token_id"] = serde_json::json!([]));
    edit("config.json", &|v| v["text_config"]["eos_token_id"] = serde_json::Value::Null);
    out
}

/// [`write_config`]'s file, pointed at [`endless_model`] with answers of `max_new_tokens`.
pub fn use_endless_model(config: &Path, max_new_tokens: usize) {
    let model = endless_model(config.parent().unwrap());
    let text = std::fs::read_to_string(config)
        .unwrap()
        .replace(&repo("models/tiny-videollama3").display().to_string(), &model.display().to_string())
        .replace("max_new_tokens = 4", &format!("max_new_tokens = {max_new_tokens}"));
    std::fs::write(config, text).unwrap();
}

pub fn clip_stream(name: &str, extra: &str) -> String {
    format!(
        "[[stream]]\nname = \"{name}\"\nuri = \"{}\"\nprompts = [\"caption\", \"motion\"]\n{extra}\n",
        repo("assets/demo.mp4").display()
    )
}

pub fn spawn_vigil(config: &Path, log: &Path) -> KillOnDrop {
    spawn_vigil_env(config, log, &[])
}

/// [`spawn_vigil`] with extra environment variables.
pub fn spawn_vigil_env(config: &Path, log: &Path, env: &[(&str, &str)]) -> KillOnDrop {
    let child = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["run", "--config", config.to_str().unwrap()])
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start vigil run");
    KillOnDrop(child)
}

pub fn signal(child: &KillOnDrop, sig: &str) {
    let ok = Command::new("kill").args([&format!("-{sig}"), &child.0.id().to_string()]).status().unwrap().success();
    assert!(ok, "kill -{sig}");
}

/// SIGTERM, and a clean exit within 30 s (the log in the failure message).
pub fn stop_cleanly(child: &mut KillOnDrop, log: &Path) {
    signal(child, "TERM");
    assert_eq!(wait_exit(child, Duration::from_secs(30)), Some(0), "log:\n{}", log_text(log));
}

pub fn wait_exit(child: &mut KillOnDrop, t: Duration) -> Option<i32> {
    let deadline = Instant::now() + t;
    while Instant::now() < deadline {
        if let Some(s) = child.0.try_wait().unwrap() {
            return s.code();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

pub fn http_get(port: u16, path: &str) -> String {
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    use std::io::Write;
    write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    s
}

/// The value of a sample line `name{labels} value` in Prometheus text.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

pub fn is_answer_topic(topic: &str) -> bool {
    let parts: Vec<&str> = topic.split('/').collect();
    parts.len() == 3 && parts[0] == "vigil" && ["caption", "motion"].contains(&parts[2])
}

/// Collect answers (skipping other topics) until `n` arrived or `t` passed.
pub async fn answers(sub: &mut Sub, n: usize, t: Duration) -> Vec<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + t;
    let mut got = Vec::new();
    while got.len() < n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(m) = sub.next(left).await else { break };
        if is_answer_topic(&m.topic) {
            got.push(m.json());
        }
    }
    got
}

pub fn log_text(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// The answer figures of the daemon's stop line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopCounts {
    pub produced: u64,
    pub delivered: u64,
    pub dropped: u64,
    pub undelivered: u64,
}

/// Parse `stopped: N answers produced, N delivered, N dropped, N undelivered; ...` from a log.
pub fn stop_counts(log: &str) -> StopCounts {
    let line = log
        .lines()
        .find_map(|l| l.split("stopped: ").nth(1))
        .unwrap_or_else(|| panic!("no stop line in the log:\n{log}"));
    let n: Vec<u64> = line
        .split(';')
        .next()
        .unwrap()
        .split(',')
        .map(|part| {
            part.split_whitespace()
                .next()
                .and_then(|w| w.parse().ok())
                .unwrap_or_else(|| panic!("bad stop line: {line}"))
        })
        .collect();
    assert_eq!(n.len(), 4, "stop line: {line}");
    StopCounts { produced: n[0], delivered: n[1], dropped: n[2], undelivered: n[3] }
}

/// The ids of the answers the daemon produced, in order (its debug log lines).
pub fn produced_ids(log: &str) -> Vec<String> {
    log.lines().filter_map(|l| l.split("answer ").nth(1)?.strip_suffix(" produced").map(str::to_string)).collect()
}
