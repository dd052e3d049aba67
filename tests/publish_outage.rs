//! Broker outages: QoS 1 answers published while mosquitto is down arrive in order after it
//! comes back (up to `outbox_capacity`); beyond it the oldest are dropped and counted.

mod common;

use std::time::Duration;

use common::*;
use vigil::publish::*;

const T: Duration = Duration::from_secs(5);

fn seq_of(g: &Got) -> u64 {
    g.json()["window"]["seq"].as_u64().unwrap()
}

/// Collect `n` answers on the topic (or fail after `t`).
async fn collect(sub: &mut Sub, topic: &str, n: usize, t: Duration) -> Vec<u64> {
    let mut v = Vec::new();
    let deadline = tokio::time::Instant::now() + t;
    while v.len() < n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match sub.next_on(topic, left).await {
            Some(g) => v.push(seq_of(&g)),
            None => panic!("only {} of {n} answers arrived: {v:?}", v.len()),
        }
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_keeps_order_up_to_capacity_and_counts_drops() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(dir.path(), "");
    let cfg = config(dir.path(), &broker.url(), "outbox_capacity = 20");
    // A persistent QoS 1 session: mosquitto keeps it (and queues for it) across its restart.
    let mut sub = Sub::connect(broker.port, "sub-outage", &["vt/cam1/scene"], true).await;
    let (p, _c) = Publisher::start(&cfg, fast()).await.unwrap();
    wait_link(&p, T, |l| l.connected).await;

    for seq in 0..5 {
        p.answer(&answer("cam1", "scene", "caption", seq));
    }
    assert_eq!(collect(&mut sub, "vt/cam1/scene", 5, T).await, (0..5).collect::<Vec<_>>());

    // Outage 1: 15 answers, under capacity: all arrive, in order, none dropped.
    broker.stop();
    wait_link(&p, T, |l| !l.connected).await;
    for seq in 5..20 {
        p.answer(&answer("cam1", "scene", "caption", seq));
    }
    let s = p.outbox_stats();
    assert_eq!((s.depth, s.dropped), (15, 0));
    tokio::time::sleep(Duration::from_millis(800)).await; // a while down, with reconnect attempts
    assert!(p.link().borrow().failures >= 1);
    broker.restart();
    wait_link(&p, T, |l| l.connected).await;
    assert_eq!(collect(&mut sub, "vt/cam1/scene", 15, T).await, (5..20).collect::<Vec<_>>());
    // Let the subscriber's PUBACKs reach mosquitto before it stops, or it would (rightly)
    // redeliver the last ones to this session after the next restart.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Outage 2: 30 answers into a 20-slot outbox: the 10 oldest are dropped and counted, the
    // newest 20 arrive in order.
    broker.stop();
    wait_link(&p, T, |l| !l.connected).await;
    for seq in 20..50 {
        p.answer(&answer("cam1", "scene", "caption", seq));
    }
    let s = p.outbox_stats();
    assert_eq!((s.depth, s.capacity, s.dropped), (20, 20, 10));
    broker.restart();
    wait_link(&p, T, |l| l.connected).await;
    assert_eq!(collect(&mut sub, "vt/cam1/scene", 20, T).await, (30..50).collect::<Vec<_>>());
    assert!(sub.next_on("vt/cam1/scene", Duration::from_millis(500)).await.is_none(), "nothing extra or duplicated");
    let s = p.outbox_stats();
    assert_eq!((s.depth, s.dropped), (0, 10));

    // The drop counter also reaches subscribers through the stats payload.
    let mut stats_sub = Sub::connect(broker.port, "sub-stats", &["vt/stats"], false).await;
    p.stats(empty_stats(1.0));
    let g = stats_sub.next_on("vt/stats", T).await.unwrap();
    assert_eq!(g.json()["outbox"]["dropped"], 10);
    p.shutdown(T).await;
    sub.stop();
    stats_sub.stop();
}

/// Answers published before the broker was ever reachable wait and arrive once it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_before_first_connect_are_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(dir.path(), "");
    // Register a persistent session, then take the broker away before vigil starts.
    let mut sub = Sub::connect(broker.port, "sub-early", &["vt/cam1/scene"], true).await;
    broker.stop();
    let cfg = config(dir.path(), &broker.url(), "");
    let (p, _c) = Publisher::start(&cfg, fast()).await.unwrap();
    for seq in 0..3 {
        p.answer(&answer("cam1", "scene", "caption", seq));
    }
    let l = wait_link(&p, T, |l| l.failures >= 2).await;
    assert!(l.last_error.unwrap().contains("connection refused"));
    assert_eq!(p.outbox_stats().depth, 3);
    broker.restart();
    wait_link(&p, T, |l| l.connected).await;
    assert_eq!(collect(&mut sub, "vt/cam1/scene", 3, T).await, vec![0, 1, 2]);
    p.shutdown(T).await;
    sub.stop();
}
