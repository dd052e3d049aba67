//! Every topic and payload field through a real mosquitto; availability (online, last will,
//! stopped); `set` commands.

mod common;

use std::time::Duration;

use common::schema::{assert_valid, load};
use common::*;
use vigil::publish::*;

const T: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roundtrip_every_topic_and_payload_field() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), "");
    let cfg = config(dir.path(), &broker.url(), "");
    let mut sub = Sub::connect(broker.port, "sub-all", &["vt/#"], false).await;
    let (p, mut commands) = Publisher::start(&cfg, fast()).await.unwrap();

    // Initial retained states, `online` last.
    let mut initial = Vec::new();
    loop {
        let g = sub.next(T).await.expect("initial states");
        initial.push((g.topic.clone(), g.text()));
        if g.topic == "vt/available" {
            assert_eq!(g.text(), "online");
            break;
        }
    }
    for (topic, want) in [
        ("vt/cam1/enabled", "ON"),
        ("vt/cam1/scene/enabled", "ON"),
        ("vt/cam1/person/enabled", "ON"),
        ("vt/cam1/count/enabled", "ON"),
        ("vt/yard.2/enabled", "OFF"),
        ("vt/yard.2/person/enabled", "ON"),
    ] {
        assert!(initial.contains(&(topic.to_string(), want.to_string())), "{topic}={want} missing from {initial:?}");
    }

    let answer_schema = load("answer.v1.schema.json");
    let alert_schema = load("alert.v1.schema.json");

    // A caption answer: JSON on the answer topic (every field round-trips), short state retained.
    let a = answer("cam1", "scene", "caption", 0);
    p.answer(&a);
    let g = sub.next_on("vt/cam1/scene", T).await.expect("answer");
    assert!(!g.retain);
    assert_valid(&answer_schema, &g.json());
    let back: Answer = serde_json::from_slice(&g.payload).unwrap();
    assert_eq!(back, a);
    assert_eq!(g.json()["@timestamp"], serde_json::json!(a.timestamp));
    assert_eq!(g.json()["id"], "cam1:0:scene");
    assert!(g.json().get("parse_error").is_none());
    let g = sub.next_on("vt/cam1/scene/state", T).await.expect("state");
    assert_eq!(g.text(), a.answer);

    // Alert prompt: false → no alert, OFF; true → alert + ON; true again → no second alert.
    p.answer(&answer("cam1", "person", "alert", 0));
    assert_eq!(sub.next_on("vt/cam1/person/state", T).await.unwrap().text(), "OFF");
    let yes = answer("cam1", "person", "alert", 1);
    p.answer(&yes);
    p.answer(&answer("cam1", "person", "alert", 3));
    let got = sub.drain(Duration::from_millis(500)).await;
    let alerts: Vec<_> = got.iter().filter(|g| g.topic == "vt/cam1/person/alert").collect();
    assert_eq!(alerts.len(), 1, "one alert for one rising edge: {got:?}");
    assert_valid(&alert_schema, &alerts[0].json());
    assert_eq!(alerts[0].json()["id"], "cam1:1:person");
    assert_eq!(alerts[0].json()["window"], serde_json::to_value(&yes.window).unwrap());
    let answers: Vec<_> = got.iter().filter(|g| g.topic == "vt/cam1/person").collect();
    assert_eq!(answers.len(), 2);
    for g in &answers {
        assert_valid(&answer_schema, &g.json());
        assert_eq!(g.json()["value"], true);
    }
    assert!(got.iter().any(|g| g.topic == "vt/cam1/person/state" && g.text() == "ON"));

    // JSON prompt: parsed object, then an unparsable one with parse_error and null value.
    p.answer(&answer("cam1", "count", "json", 0));
    let g = sub.next_on("vt/cam1/count", T).await.unwrap();
    assert_valid(&answer_schema, &g.json());
    assert_eq!(g.json()["value"], serde_json::json!({"cars": 2}));
    p.answer(&answer("cam1", "count", "json", 1));
    let g = sub.next_on("vt/cam1/count", T).await.unwrap();
    assert_valid(&answer_schema, &g.json());
    assert!(g.json()["value"].is_null());
    assert_eq!(g.json()["parse_error"], "no JSON object in the answer");

    // Long answers: state cut to 255 characters.
    let mut long = answer("cam1", "scene", "caption", 9);
    long.answer = "é".repeat(300);
    p.answer(&long);
    let g = sub.next_on("vt/cam1/scene/state", T).await.unwrap();
    assert_eq!(g.text().chars().count(), 255);

    // Status (retained), stats, errors.
    let st = StatusPayload {
        state: StreamState::Reconnecting,
        since: now_rfc3339(),
        error: Some("rtsp://u:***@cam: timeout".into()),
    };
    p.status("cam1", &st);
    let g = sub.next_on("vt/cam1/status", T).await.unwrap();
    assert_valid(&load("status.schema.json"), &g.json());
    assert_eq!(serde_json::from_slice::<StatusPayload>(&g.payload).unwrap(), st);

    let mut streams = std::collections::BTreeMap::new();
    streams.insert("cam1".to_string(), StreamStats { frames: 100, windows: 12, drops: 1, skipped: 3 });
    let stats = StatsPayload {
        v: 1,
        uptime_s: 61.5,
        streams,
        inference: InferenceStats {
            latency_p50_ms: 80.0,
            latency_p95_ms: 120.0,
            tokens_per_s: 55.5,
            pruning_ratio: 0.4,
        },
        outbox: OutboxStats::default(),
        answers: None,
        events: None,
        timestamp: now_rfc3339(),
    };
    p.stats(stats.clone());
    let g = sub.next_on("vt/stats", T).await.unwrap();
    assert_valid(&load("stats.v1.schema.json"), &g.json());
    let back: StatsPayload = serde_json::from_slice(&g.payload).unwrap();
    assert_eq!(back.streams, stats.streams);
    assert_eq!(back.outbox.capacity, 1000, "the publisher fills in the outbox figures");
    let answers = back.answers.expect("the publisher fills in the answer counts");
    assert_eq!((answers.produced, answers.dropped), (7, 0), "seven answers so far");

    p.error("source", Some("cam1"), "cannot open rtsp://admin:hunter2@10.0.0.9/stream");
    let g = sub.next_on("vt/errors", T).await.unwrap();
    assert_valid(&load("error.schema.json"), &g.json());
    assert!(!g.text().contains("hunter2"), "secrets are scrubbed: {}", g.text());
    assert_eq!(g.json()["stream"], "cam1");

    // set commands: delivered on the channel and echoed retained on .../enabled.
    sub.client.publish("vt/cam1/set", rumqttc::QoS::AtLeastOnce, false, "OFF").await.unwrap();
    let c = tokio::time::timeout(T, commands.recv()).await.unwrap().unwrap();
    assert_eq!(c, Command::SetStream { stream: "cam1".into(), enabled: false });
    assert_eq!(sub.next_on("vt/cam1/enabled", T).await.unwrap().text(), "OFF");
    sub.client.publish("vt/cam1/person/set", rumqttc::QoS::AtLeastOnce, false, "on").await.unwrap();
    let c = tokio::time::timeout(T, commands.recv()).await.unwrap().unwrap();
    assert_eq!(c, Command::SetPrompt { stream: "cam1".into(), prompt: "person".into(), enabled: true });
    assert_eq!(sub.next_on("vt/cam1/person/enabled", T).await.unwrap().text(), "ON");
    // Unknown targets and bad payloads: no command, an error message instead.
    sub.client.publish("vt/nope/set", rumqttc::QoS::AtLeastOnce, false, "ON").await.unwrap();
    let g = sub.next_on("vt/errors", T).await.unwrap();
    assert!(g.text().contains("vt/nope/set"), "{}", g.text());
    sub.client.publish("vt/cam1/set", rumqttc::QoS::AtLeastOnce, false, "maybe").await.unwrap();
    let g = sub.next_on("vt/errors", T).await.unwrap();
    assert!(g.text().contains("expected ON or OFF"), "{}", g.text());
    assert!(commands.try_recv().is_err());

    // Clean shutdown: `stopped`, and no `offline` will afterwards.
    p.shutdown(T).await;
    assert_eq!(sub.next_on("vt/available", T).await.unwrap().text(), "stopped");
    assert!(sub.next_on("vt/available", Duration::from_millis(700)).await.is_none(), "no last will after a clean stop");
    sub.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_will_offline_when_killed() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), "");
    let cfg = config(dir.path(), &broker.url(), "");
    let mut sub = Sub::connect(broker.port, "sub-will", &["vt/available"], false).await;
    let (p, _commands) = Publisher::start(&cfg, fast()).await.unwrap();
    assert_eq!(sub.next_on("vt/available", T).await.unwrap().text(), "online");
    // Drop the connection without DISCONNECT, as a crash would.
    p.kill();
    let g = sub.next_on("vt/available", T).await.expect("last will");
    assert_eq!(g.text(), "offline");
    // Retained: a newcomer sees it too.
    let mut late = Sub::connect(broker.port, "sub-late", &["vt/available"], false).await;
    let g = late.next_on("vt/available", T).await.unwrap();
    assert!(g.retain);
    assert_eq!(g.text(), "offline");
    sub.stop();
    late.stop();
}

/// The same with a real process killed by SIGKILL: this test binary re-runs itself as the
/// publisher child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_will_offline_when_process_is_killed() {
    if let Ok(url) = std::env::var("VIGIL_TEST_CHILD_BROKER") {
        // Child: publish until killed.
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), &url, "");
        let (p, _c) = Publisher::start(&cfg, fast()).await.unwrap();
        wait_link(&p, T, |l| l.connected).await;
        println!("CHILD-CONNECTED");
        tokio::time::sleep(Duration::from_secs(20)).await;
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), "");
    let mut sub = Sub::connect(broker.port, "sub-proc", &["vt/available"], false).await;
    let mut child = KillOnDrop(
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "last_will_offline_when_process_is_killed", "--nocapture"])
            .env("VIGIL_TEST_CHILD_BROKER", broker.url())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let online = sub.next_on("vt/available", T).await;
    assert_eq!(online.map(|g| g.text()).as_deref(), Some("online"));
    child.0.kill().unwrap(); // SIGKILL
    child.0.wait().unwrap();
    let g = sub.next_on("vt/available", T).await.expect("last will after SIGKILL");
    assert_eq!(g.text(), "offline");
    sub.stop();
}

/// QoS 0, 1 and 2 go through the same outbox (QoS 0 is done once written, QoS 2 at PUBCOMP);
/// stats are sent periodically with the outbox figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_0_1_2_deliver_in_order_and_stats_tick() {
    for qos in [0u8, 1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let broker = Mosquitto::start(dir.path(), "");
        let cfg = config(dir.path(), &broker.url(), &format!("qos = {qos}"));
        let mut sub = Sub::connect(broker.port, "sub-qos", &["vt/cam1/scene", "vt/stats"], false).await;
        let (p, _c) = Publisher::start(&cfg, fast()).await.unwrap();
        wait_link(&p, T, |l| l.connected).await;
        for seq in 0..200 {
            p.answer(&answer("cam1", "scene", "caption", seq));
        }
        let mut seqs = Vec::new();
        while seqs.len() < 200 {
            let g = sub.next_on("vt/cam1/scene", T).await.unwrap_or_else(|| {
                panic!("qos {qos}: {} of 200; {:?} {:?}", seqs.len(), p.outbox_stats(), *p.link().borrow())
            });
            seqs.push(g.json()["window"]["seq"].as_u64().unwrap());
        }
        assert_eq!(seqs, (0..200).collect::<Vec<_>>(), "qos {qos}");
        let deadline = std::time::Instant::now() + T;
        while p.outbox_stats().depth > 0 {
            assert!(std::time::Instant::now() < deadline, "qos {qos}: outbox never emptied: {:?}", p.outbox_stats());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let ticker = p.stats_every(Duration::from_millis(150), || empty_stats(2.0));
        for _ in 0..2 {
            let g = sub.next_on("vt/stats", T).await.expect("periodic stats");
            common::schema::assert_valid(&load("stats.v1.schema.json"), &g.json());
            assert_eq!(g.json()["outbox"]["capacity"], 1000);
        }
        ticker.abort();
        p.shutdown(T).await;
        sub.stop();
    }
}

/// A message the broker would refuse (too large) is refused up front and does not block the
/// answers behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_does_not_block_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), "");
    let cfg = config(dir.path(), &broker.url(), "");
    let mut sub = Sub::connect(broker.port, "sub-big", &["vt/cam1/scene"], false).await;
    let (p, _c) = Publisher::start(&cfg, fast()).await.unwrap();
    wait_link(&p, T, |l| l.connected).await;
    let mut big = answer("cam1", "scene", "caption", 0);
    big.answer = "x".repeat(2 << 20);
    p.answer(&big);
    p.answer(&answer("cam1", "scene", "caption", 1));
    let g = sub.next_on("vt/cam1/scene", T).await.expect("the next answer gets through");
    assert_eq!(g.json()["window"]["seq"], 1);
    assert_eq!(p.link().borrow().connects, 1, "no reconnect was needed");
    p.shutdown(T).await;
    sub.stop();
}

#[tokio::test]
async fn prompt_names_that_collide_with_stream_topics_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), "mqtt://127.0.0.1:1", "");
    cfg.prompts[0].name = "status".into();
    let e = Publisher::start(&cfg, fast()).await.err().expect("refused").to_string();
    assert!(e.contains("\"status\"") && e.contains("vt/<stream>/status"), "{e}");
}

async fn next_event(sub: &mut Sub) -> serde_json::Value {
    sub.next_on("vt/cam1/person/event", T).await.expect("an event message").json()
}

/// Alert events: confirmation, updates, clearing, cooldown (counted), a reload that keeps an
/// open event, and a stream going down that ends it; with the retained event state that Home
/// Assistant's binary_sensor follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_events_confirm_update_clear_cool_down_and_end_when_the_stream_goes() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), "");
    let mut cfg = config(dir.path(), &broker.url(), "");
    let person = cfg.prompts.iter_mut().find(|p| p.name == "person").unwrap();
    person.confirm_windows = Some(2);
    person.clear_windows = Some(1);
    person.cooldown_s = Some(1.0);
    person.event_updates = Some(true);
    let mut sub =
        Sub::connect(broker.port, "sub-events", &["vt/cam1/person/event", "vt/cam1/person/event/state"], false).await;
    let (p, _c) = Publisher::start(&cfg, fast()).await.unwrap();
    wait_link(&p, T, |l| l.connected).await;
    let alert = |seq: u64, yes: bool| {
        let mut a = answer("cam1", "person", "alert", seq);
        a.value = serde_json::json!(yes);
        a.answer = if yes { format!("yes, a person ({seq})") } else { "no".into() };
        a
    };
    let schema = load("event.v1.schema.json");
    let mut events = Vec::new();
    for (seq, yes) in [(10, true), (11, true), (12, true), (13, false), (14, true)] {
        p.answer(&alert(seq, yes));
    }
    for _ in 0..3 {
        let e = next_event(&mut sub).await;
        assert_valid(&schema, &e);
        events.push(e);
    }
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["start", "update", "end"], "{events:?}");
    assert_eq!(events[0]["event_id"], "cam1:person:10", "the event starts at its first window");
    assert_eq!(events[0]["windows"], 2);
    assert_eq!(events[1]["windows"], 3);
    assert_eq!(
        (events[2]["reason"].as_str(), events[2]["answer"].as_str()),
        (Some("cleared"), Some("yes, a person (12)"))
    );
    assert_eq!(events[2]["end"], serde_json::json!(alert(12, true).window.end));
    assert!(
        sub.next_on("vt/cam1/person/event", Duration::from_millis(300)).await.is_none(),
        "window 14 is in the cooldown"
    );
    assert_eq!(p.event_counts().suppressed, 1);

    // After the cooldown: a new event, kept across a reload, ended by the stream going down.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    p.answer(&alert(15, true));
    p.answer(&alert(16, true));
    let e = next_event(&mut sub).await;
    assert_eq!((e["type"].as_str(), e["event_id"].as_str()), (Some("start"), Some("cam1:person:15")));
    p.reconfigure(&cfg);
    assert!(
        sub.next_on("vt/cam1/person/event", Duration::from_millis(300)).await.is_none(),
        "a reload keeps the event open"
    );
    p.close_events("cam1", None, "stream_down");
    let e = next_event(&mut sub).await;
    assert_valid(&schema, &e);
    assert_eq!((e["type"].as_str(), e["reason"].as_str()), (Some("end"), Some("stream_down")));
    assert_eq!(p.event_counts(), vigil::publish::events::EventCounts { started: 2, ended: 2, suppressed: 1 });

    // The retained event state is OFF now (a late subscriber sees it).
    let mut late = Sub::connect(broker.port, "sub-events-late", &["vt/cam1/person/event/state"], false).await;
    let st = late.next_on("vt/cam1/person/event/state", T).await.unwrap();
    assert_eq!((st.text().as_str(), st.retain), ("OFF", true));
    p.shutdown(T).await;
}

/// The stats ticker ends as soon as the publisher shuts down (nothing aborts it), not at its
/// next tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_ticker_ends_with_the_publisher() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), "");
    let cfg = config(dir.path(), &broker.url(), "");
    let (p, _c) = Publisher::start(&cfg, fast()).await.unwrap();
    wait_link(&p, T, |l| l.connected).await;
    let ticker = p.stats_every(Duration::from_secs(30), || empty_stats(1.0));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!ticker.is_finished());
    let t0 = std::time::Instant::now();
    p.shutdown(T).await;
    tokio::time::timeout(Duration::from_secs(2), ticker)
        .await
        .expect("the ticker ended at shutdown")
        .expect("not aborted");
    assert!(t0.elapsed() < Duration::from_secs(5));
}
