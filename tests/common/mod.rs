//! Test harness for the MQTT tests: a real mosquitto (Debian package) on a free loopback port
//! with a generated config, a recording subscriber, and sample payloads.
#![allow(dead_code)]

pub mod schema;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use vigil::publish::*;

pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// A free TCP port on 127.0.0.1 (bound then released; the kernel does not hand it out again
/// right away).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A mosquitto process; killed on drop.
pub struct Mosquitto {
    pub port: u16,
    pub dir: PathBuf,
    conf: PathBuf,
    child: Option<Child>,
}

impl Mosquitto {
    /// Start mosquitto on a free loopback port. `extra` is appended to the listener section
    /// (TLS, auth). Persistence is on so QoS 1 sessions survive `restart`.
    pub fn start(dir: &Path, extra: &str) -> Mosquitto {
        Self::start_on(dir, free_port(), extra)
    }

    pub fn start_on(dir: &Path, port: u16, extra: &str) -> Mosquitto {
        let mut m = Self::configure(dir, port, extra);
        m.spawn();
        m
    }

    /// Write the config for a mosquitto on `port` without starting it (a broker that is down
    /// when its client starts); [`Mosquitto::spawn`] starts it.
    pub fn configure(dir: &Path, port: u16, extra: &str) -> Mosquitto {
        let conf = dir.join("mosquitto.conf");
        let text = format!(
            // `user root`: when the tests run as root, mosquitto would otherwise switch to the
            // `mosquitto` user and could not write its persistence file into our temp dir.
            "user root\n\
             per_listener_settings false\n\
             persistence true\n\
             persistence_location {}/\n\
             max_queued_messages 10000\n\
             log_dest stderr\n\
             log_type error\n\
             listener {port} 127.0.0.1\n\
             {extra}\n",
            dir.display()
        );
        let text = if extra.contains("allow_anonymous") { text } else { text + "allow_anonymous true\n" };
        std::fs::write(&conf, text).unwrap();
        Mosquitto { port, dir: dir.to_path_buf(), conf, child: None }
    }

    /// Start the configured broker and wait until it listens.
    pub fn spawn(&mut self) {
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start /usr/sbin/mosquitto (apt-get install mosquitto)");
        self.child = Some(child);
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not listen on {addr} within 5 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stop with SIGTERM (mosquitto saves its persistence file) and wait for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while c.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.wait();
        }
    }

    /// Die as a crash would (SIGKILL): no persistence save, no clean disconnects.
    pub fn crash(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Hang (SIGSTOP) or resume (SIGCONT): while hung its sockets stay open and even accept
    /// connections, but nothing is read or answered, as with a wedged broker or a black-holed link.
    pub fn freeze(&self, frozen: bool) {
        if let Some(c) = &self.child {
            let sig = if frozen { "-STOP" } else { "-CONT" };
            let ok = Command::new("kill").arg(sig).arg(c.id().to_string()).status().unwrap().success();
            assert!(ok, "kill {sig} mosquitto");
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One received message.
#[derive(Debug, Clone)]
pub struct Got {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

impl Got {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload)
            .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {}", self.topic, self.text()))
    }
}

/// A recording subscriber (rumqttc client in its own task).
pub struct Sub {
    pub client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Got>,
    task: tokio::task::JoinHandle<()>,
}

impl Sub {
    /// Connect to `port`, subscribe to `filters` (QoS 1) and wait for the SUBACK.
    /// `persistent` keeps the session (and queued QoS 1 messages) across broker restarts.
    pub async fn connect(port: u16, id: &str, filters: &[&str], persistent: bool) -> Sub {
        Self::connect_with(MqttOptions::new(id, "127.0.0.1", port), filters, persistent).await
    }

    pub async fn connect_with(mut o: MqttOptions, filters: &[&str], persistent: bool) -> Sub {
        o.set_clean_session(!persistent);
        o.set_keep_alive(Duration::from_secs(5));
        o.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut el) = AsyncClient::new(o, 100);
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
        let filters: Vec<String> = filters.iter().map(|s| s.to_string()).collect();
        let c2 = client.clone();
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        for f in &filters {
                            let _ = c2.subscribe(f.clone(), QoS::AtLeastOnce).await;
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(Got { topic: p.topic, payload: p.payload.to_vec(), retain: p.retain });
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("test subscriber: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(5), ready_rx.recv()).await.expect("SUBACK within 5 s");
        Sub { client, rx, task }
    }

    /// The next message, waiting at most `t`.
    pub async fn next(&mut self, t: Duration) -> Option<Got> {
        tokio::time::timeout(t, self.rx.recv()).await.ok().flatten()
    }

    /// The next message on `topic` (others are skipped), waiting at most `t` in all.
    pub async fn next_on(&mut self, topic: &str, t: Duration) -> Option<Got> {
        let deadline = tokio::time::Instant::now() + t;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let g = self.next(left).await?;
            if g.topic == topic {
                return Some(g);
            }
        }
    }

    /// Everything that arrives until `t` passes with nothing new.
    pub async fn drain(&mut self, quiet: Duration) -> Vec<Got> {
        let mut v = Vec::new();
        while let Some(g) = self.next(quiet).await {
            v.push(g);
        }
        v
    }

    pub fn stop(self) {
        self.task.abort();
    }
}

/// A config with two streams and three prompts (caption, alert, json), pointed at `broker`.
pub fn config(dir: &Path, broker: &str, extra_mqtt: &str) -> vigil::Config {
    let text = format!(
        r#"
[model]
path = "."
id = "tiny-videollama3"

[mqtt]
broker = "{broker}"
topic_prefix = "vt"
client_id = "vigil-test"
keepalive_s = 5
{extra_mqtt}

[[prompt]]
name = "scene"
text = "Describe the scene."

[[prompt]]
name = "person"
text = "Is there a person? Answer yes or no."
kind = "alert"

[[prompt]]
name = "count"
text = "Count the cars as JSON."
kind = "json"

[[stream]]
name = "cam1"
uri = "file:///dev/null"
prompts = ["scene", "person", "count"]

[[stream]]
name = "yard.2"
uri = "file:///dev/null"
prompts = ["person"]
enabled = false
"#
    );
    let p = dir.join("vigil.toml");
    std::fs::write(&p, &text).unwrap();
    vigil::Config::load(&p).unwrap_or_else(|e| panic!("test config invalid:\n{e}"))
}

/// Kills a child process when dropped (a failing test must not leave it running).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A fully populated sample answer for window `seq`.
pub fn answer(stream: &str, prompt: &str, kind: &str, seq: u64) -> Answer {
    let (answer, value, parse_error) = match kind {
        "alert" => ("Yes, a person is at the door.".to_string(), serde_json::json!(seq % 2 == 1), None),
        "json" if seq.is_multiple_of(2) => ("{\"cars\": 2}".to_string(), serde_json::json!({"cars": 2}), None),
        "json" => ("two cars".to_string(), serde_json::Value::Null, Some("no JSON object in the answer".to_string())),
        _ => (format!("Answer number {seq}: a quiet street."), serde_json::Value::Null, None),
    };
    let t0 = std::time::UNIX_EPOCH + Duration::from_secs(1_795_000_000 + seq * 8);
    Answer {
        v: ANSWER_VERSION,
        id: Answer::make_id(stream, seq, prompt),
        stream: stream.into(),
        prompt: prompt.into(),
        question: "Describe the scene.".into(),
        kind: serde_json::from_value(serde_json::json!(kind)).unwrap(),
        answer,
        value,
        parse_error,
        skipped: None,
        snapshot: None,
        window: WindowInfo {
            seq,
            start: rfc3339(t0),
            end: rfc3339(t0 + Duration::from_secs(7)),
            start_s: seq as f64 * 8.0,
            end_s: seq as f64 * 8.0 + 7.0,
            frames: 8,
            fps: 1.0,
        },
        tokens: TokenCounts { prompt: 321, generated: 12 },
        visual_tokens: VisualTokens { total: 512, kept: 300 },
        latency_ms: Latency { queue: 1.5, vision: 20.25, prefill: 30.0, decode: 40.0, total: 95.0 },
        model: "tiny-videollama3".into(),
        timestamp: now_rfc3339(),
    }
}

/// Fast reconnects for tests.
pub fn fast() -> PublishOptions {
    PublishOptions {
        reconnect_min: Duration::from_millis(100),
        reconnect_max: Duration::from_millis(500),
        ..Default::default()
    }
}

/// Wait until the publisher's link matches `pred` (at most `t`).
pub async fn wait_link(p: &Publisher, t: Duration, pred: impl Fn(&LinkState) -> bool) -> LinkState {
    let mut rx = p.link();
    let r = tokio::time::timeout(t, rx.wait_for(|l| pred(l))).await.map(|r| r.map(|l| l.clone()));
    match r {
        Ok(Ok(l)) => l,
        _ => panic!("link state not reached within {t:?}; now {:?}", *p.link().borrow()),
    }
}

/// A stats payload with no streams and an empty outbox, `uptime_s` seconds in.
pub fn empty_stats(uptime_s: f64) -> StatsPayload {
    StatsPayload {
        v: 1,
        uptime_s,
        streams: Default::default(),
        inference: Default::default(),
        outbox: Default::default(),
        answers: None,
        events: None,
        timestamp: now_rfc3339(),
    }
}
