//! `vigil tail`: subscribe to a vigil's answers and print them as they arrive.
//!
//! Human-readable by default (`time  stream/prompt  [start–end s]  answer`), raw JSON lines with
//! `--json`. Only answer and alert payloads are printed; statuses, states and commands that
//! share the wildcard levels are skipped.

use std::io::Write;
use std::time::Duration;

use rumqttc::{AsyncClient, ConnectionError, Event, Packet, QoS};

use super::connect;
use super::payload::{AlertPayload, Answer, WindowInfo};
use super::PublishError;
use crate::config::MqttConfig;

#[derive(Debug, Clone)]
pub struct TailOptions {
    /// Broker and credentials; relative paths must already be resolved.
    pub mqtt: MqttConfig,
    /// Raw JSON lines instead of the human format.
    pub json: bool,
    /// Exit after this many answers (and alerts).
    pub count: Option<usize>,
}

/// Subscribe and print until `count` messages were printed (or forever). Connection failures
/// that will not fix themselves (refused credentials, TLS) end it with an error; others are
/// retried with a message on stderr.
pub async fn tail(opts: TailOptions, out: &mut (dyn Write + Send)) -> Result<(), PublishError> {
    let m = &opts.mqtt;
    let client_id = format!("{}-tail-{}", m.client_id, std::process::id());
    let (mqtt_opts, addr) = connect::mqtt_options(m, &client_id, &|p| p.to_path_buf(), None)?;
    let (client, mut el) = AsyncClient::new(mqtt_opts, 16);
    let prefix = m.topic_prefix.clone();
    let filters = [format!("{prefix}/+/+"), format!("{prefix}/+/+/alert")];
    let mut printed = 0usize;
    let mut announced = false;
    let mut backoff = Duration::from_millis(500);
    loop {
        match el.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(500);
                let subs = filters.iter().map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
                client.subscribe_many(subs).await.map_err(|e| PublishError::Connect(e.to_string()))?;
            }
            Ok(Event::Incoming(Packet::SubAck(_))) if !announced => {
                announced = true;
                eprintln!("vigil tail: subscribed to {} on {addr}", filters.join(", "));
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let line = if opts.json { json_line(&p.topic, &p.payload) } else { human_line(&p.topic, &p.payload) };
                if let Some(line) = line {
                    // A closed stdout (e.g. `| head`) ends the tail quietly.
                    if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
                        return Ok(());
                    }
                    printed += 1;
                    if opts.count.is_some_and(|n| printed >= n) {
                        let _ = client.try_disconnect();
                        return Ok(());
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                let msg = connect::describe(&e, &addr);
                if matches!(e, ConnectionError::ConnectionRefused(_) | ConnectionError::Tls(_)) {
                    return Err(PublishError::Connect(msg));
                }
                eprintln!("vigil tail: {msg}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

fn is_alert_topic(topic: &str) -> bool {
    topic.ends_with("/alert")
}

/// The payload as one JSON line, if it is an answer or an alert.
fn json_line(topic: &str, payload: &[u8]) -> Option<String> {
    let ok = if is_alert_topic(topic) {
        serde_json::from_slice::<AlertPayload>(payload).is_ok()
    } else {
        serde_json::from_slice::<Answer>(payload).is_ok()
    };
    ok.then(|| String::from_utf8_lossy(payload).trim().to_string())
}

/// `2026-11-24 20:31:05Z  cam1/person  [0.0–8.0 s]  a person walks in`
fn human_line(topic: &str, payload: &[u8]) -> Option<String> {
    if is_alert_topic(topic) {
        let a: AlertPayload = serde_json::from_slice(payload).ok()?;
        return Some(line_of(&a.window, &a.stream, &a.prompt, &format!("ALERT: {}", one_line(&a.answer))));
    }
    let a: Answer = serde_json::from_slice(payload).ok()?;
    let mut line = line_of(&a.window, &a.stream, &a.prompt, &one_line(&a.answer));
    if let Some(e) = &a.parse_error {
        line.push_str(&format!("  (unparsed: {e})"));
    }
    Some(line)
}

/// When, which stream and prompt, which part of the stream, and what was said.
fn line_of(w: &WindowInfo, stream: &str, prompt: &str, said: &str) -> String {
    let when = w.start.replacen('T', " ", 1);
    let when = when.split('.').next().unwrap_or(&when).trim_end_matches('Z');
    format!("{when}Z  {stream}/{prompt}  [{:.1}–{:.1} s]  {said}", w.start_s, w.end_s)
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
