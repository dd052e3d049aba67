//! Broker faults at the daemon level: the real `vigil run` binary answering a looping clip
//! while its mosquitto crashes, restarts, hangs, starts late or stays away longer than the outbox
//! holds; a wedged publisher; the embedded broker's connection taken over. Every scenario
//! counts what the daemon produced (its debug log names each answer), what a persistent QoS 1
//! subscriber received, and what the stop line says, and prints one `broker-faults:` line with
//! the figures (RELIABILITY.md quotes them).

mod common;
mod daemon_util;

use std::collections::{HashMap, HashSet};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{free_port, KillOnDrop, Mosquitto, Sub};
use daemon_util::*;

/// mosquitto saves its database after every change, so a persistent subscriber's session and
/// the messages queued for it survive even `kill -9`.
const DURABLE: &str = "autosave_interval 1\nautosave_on_changes true";

/// A live camera: the clip looped in real time, one window a second, two prompts each.
fn live_stream() -> String {
    clip_stream("live", "loop = true\nrealtime = true\nwindow_seconds = 1.0\nstride_seconds = 1.0")
}

/// Debug logs name every answer produced.
const LOG: (&str, &str) = ("RUST_LOG", "vigil=debug,rumqttd=off,warn");

struct Daemon {
    child: KillOnDrop,
    log: std::path::PathBuf,
    metrics_port: u16,
}

impl Daemon {
    fn start(dir: &Path, mqtt: &str, extra_env: &[(&str, &str)]) -> Daemon {
        let metrics_port = free_port();
        let cfg = write_config_mqtt(dir, mqtt, metrics_port, "", &live_stream());
        let log = dir.join("vigil.log");
        let mut env = vec![LOG];
        env.extend_from_slice(extra_env);
        Daemon { child: spawn_vigil_env(&cfg, &log, &env), log, metrics_port }
    }

    fn log(&self) -> String {
        log_text(&self.log)
    }

    fn produced(&self) -> usize {
        produced_ids(&self.log()).len()
    }

    /// Successful broker connects so far.
    fn connects(&self) -> usize {
        self.log().matches("MQTT: connected to").count()
    }

    /// Wait until the daemon connected again after `before` connects, then until the
    /// subscriber has every answer produced before that.
    async fn redelivered(&self, before: usize, sub: &mut Sub, got: &mut Received) {
        self.wait_until("vigil reconnects", Duration::from_secs(60), |d| d.connects() > before).await;
        let want = produced_ids(&self.log());
        if !got.until_all(sub, &want, Duration::from_secs(30)).await {
            let missing: Vec<&String> = want.iter().filter(|id| !got.count.contains_key(*id)).collect();
            panic!("answers missing after the reconnect: {missing:?}; log:\n{}", self.log());
        }
    }

    /// Wait until `pred` holds on the daemon's figures (polled every 100 ms), at most `t`.
    async fn wait_until(&self, what: &str, t: Duration, pred: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + t;
        while !pred(self) {
            assert!(Instant::now() < deadline, "timed out waiting until {what}; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn get(&self, path: &str) -> String {
        http_get(self.metrics_port, path)
    }

    /// SIGTERM, a clean exit, and the log.
    fn stop(mut self) -> String {
        signal(&self.child, "TERM");
        let code = wait_exit(&mut self.child, Duration::from_secs(40));
        let log = self.log();
        assert_eq!(code, Some(0), "vigil did not stop cleanly; log:\n{log}");
        log
    }
}

fn mqtt_to(port: u16) -> String {
    format!("broker = \"mqtt://127.0.0.1:{port}\"\nclient_id = \"vigil-faults\"\nkeepalive_s = 5")
}

/// Everything the subscriber receives on answer topics, by id (with how often).
#[derive(Default)]
struct Received {
    count: HashMap<String, u32>,
    /// Messages on `<prefix>/errors`.
    errors: usize,
}

impl Received {
    fn record(&mut self, m: &common::Got) {
        if is_answer_topic(&m.topic) {
            *self.count.entry(m.json()["id"].as_str().unwrap().to_string()).or_default() += 1;
        }
        self.errors += (m.topic == "vigil/errors") as usize;
    }

    async fn take(&mut self, sub: &mut Sub, quiet: Duration) {
        for m in sub.drain(quiet).await {
            self.record(&m);
        }
    }

    /// Receive until `n` distinct answers are in (at most `t`).
    async fn until(&mut self, sub: &mut Sub, n: usize, t: Duration) {
        let deadline = tokio::time::Instant::now() + t;
        while self.count.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(m) = sub.next(left).await else { panic!("only {} of {n} answers arrived", self.count.len()) };
            self.record(&m);
        }
    }

    /// Receive until every id in `ids` is in (false after `t`).
    async fn until_all(&mut self, sub: &mut Sub, ids: &[String], t: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + t;
        while !ids.iter().all(|id| self.count.contains_key(id)) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(m) = sub.next(left).await else { return false };
            self.record(&m);
        }
        true
    }

    fn duplicates(&self) -> u32 {
        self.count.values().map(|c| c - 1).sum()
    }
}

/// Compare what the daemon produced with what arrived; print the figures; return the ids
/// that were lost, in production order.
fn reckon(scenario: &str, log: &str, got: &Received) -> (StopCounts, Vec<String>) {
    let produced = produced_ids(log);
    let c = stop_counts(log);
    assert_eq!(produced.len() as u64, c.produced, "one debug line per answer produced");
    let unique: HashSet<&String> = produced.iter().collect();
    assert_eq!(unique.len(), produced.len(), "answer ids are unique");
    let lost: Vec<String> = produced.iter().filter(|id| !got.count.contains_key(*id)).cloned().collect();
    let phantom: Vec<&String> = got.count.keys().filter(|id| !unique.contains(id)).collect();
    assert!(phantom.is_empty(), "{scenario}: received answers the daemon never produced: {phantom:?}");
    println!(
        "broker-faults: {scenario}: produced {}, delivered {}, received {}, lost {}, duplicated {}, dropped {}, undelivered {}",
        c.produced,
        c.delivered,
        got.count.len(),
        lost.len(),
        got.duplicates(),
        c.dropped,
        c.undelivered
    );
    (c, lost)
}

/// Stop the daemon, take what is still arriving, and check that nothing was lost or dropped.
async fn stop_lossless(scenario: &str, vigil: Daemon, sub: &mut Sub, mut got: Received) -> String {
    let log = vigil.stop();
    got.take(sub, Duration::from_secs(2)).await;
    let (c, lost) = reckon(scenario, &log, &got);
    assert!(lost.is_empty(), "{scenario}: lost {lost:?}; log:\n{log}");
    assert_eq!((c.delivered, c.dropped, c.undelivered), (c.produced, 0, 0), "{scenario}; log:\n{log}");
    log
}

/// Two broker outages while answers flow: `crash` kills mosquitto with SIGKILL, else SIGTERM.
/// Every answer reaches the persistent subscriber; none is dropped.
async fn two_outages(crash: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(dir.path(), DURABLE);
    let mut sub = Sub::connect(broker.port, "faults-sub", &["vigil/+/+"], true).await;
    let vigil = Daemon::start(dir.path(), &mqtt_to(broker.port), &[]);
    let mut got = Received::default();
    got.until(&mut sub, 4, Duration::from_secs(90)).await;
    for outage in 0..2 {
        let (before, connects) = (vigil.produced(), vigil.connects());
        if crash {
            broker.crash();
        } else {
            broker.stop();
        }
        // Down long enough for answers to pile up in the outbox and reconnects to fail.
        vigil
            .wait_until("answers are produced during the outage", Duration::from_secs(60), |d| {
                d.produced() >= before + 3
            })
            .await;
        broker.spawn();
        vigil.redelivered(connects, &mut sub, &mut got).await;
        eprintln!("outage {outage}: {} answers received so far", got.count.len());
    }
    let scenario = if crash { "kill -9 twice" } else { "SIGTERM restart twice" };
    let log = stop_lossless(scenario, vigil, &mut sub, got).await;
    assert!(log.matches("MQTT: connected to").count() >= 3, "reconnected after each outage; log:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_twice_loses_no_answer() {
    two_outages(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restarted_twice_loses_no_answer() {
    two_outages(false).await;
}

/// A broker that hangs (SIGSTOP: its connections stay open, nothing is read or acknowledged)
/// well past the keepalive, then resumes: the daemon finds the link dead on its own, keeps
/// answering into the outbox, reconnects once the broker answers again, and every answer
/// arrives; none is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_hung_then_resumed_loses_no_answer() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), DURABLE);
    let mut sub = Sub::connect(broker.port, "faults-sub", &["vigil/+/+"], true).await;
    let vigil = Daemon::start(dir.path(), &mqtt_to(broker.port), &[]);
    let mut got = Received::default();
    got.until(&mut sub, 4, Duration::from_secs(90)).await;
    let (before, connects) = (vigil.produced(), vigil.connects());
    broker.freeze(true);
    let hung = Instant::now();
    // Nothing closes the link: the daemon must find it dead by itself (keepalive 5 s).
    vigil
        .wait_until("the hung link is noticed", Duration::from_secs(40), |d| {
            metric(&d.get("/metrics"), "vigil_mqtt_connected") == 0.0
        })
        .await;
    eprintln!("the hung link was noticed after {:?}", hung.elapsed());
    // Then hung a while longer: reconnect attempts meet a broker that accepts the TCP connection
    // (the kernel does) and never answers the CONNECT.
    vigil
        .wait_until("answers are produced while the broker hangs", Duration::from_secs(60), |d| {
            d.produced() >= before + 3 && hung.elapsed() >= Duration::from_secs(20)
        })
        .await;
    assert_eq!(vigil.connects(), connects, "no connect can succeed while the broker hangs");
    broker.freeze(false);
    vigil.redelivered(connects, &mut sub, &mut got).await;
    stop_lossless("broker hung 20 s, then resumed", vigil, &mut sub, got).await;
}

/// The broker is down when the daemon starts: answers wait in the outbox, `/readyz` says why it
/// is not ready, and everything is delivered once the broker comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_at_start_then_up_delivers_everything() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(dir.path(), DURABLE);
    // The subscriber's session exists before the daemon starts; mosquitto keeps it across.
    Sub::connect(broker.port, "faults-sub", &["vigil/+/+"], true).await.stop();
    broker.stop();
    let vigil = Daemon::start(dir.path(), &mqtt_to(broker.port), &[]);
    vigil.wait_until("answers are produced with no broker", Duration::from_secs(90), |d| d.produced() >= 4).await;
    let r = vigil.get("/readyz");
    assert!(r.starts_with("HTTP/1.1 503") && r.contains("MQTT broker not connected"), "{r}");
    assert!(vigil.get("/healthz").starts_with("HTTP/1.1 200"), "down broker is no reason to restart vigil");
    let m = vigil.get("/metrics");
    assert_eq!(metric(&m, "vigil_mqtt_connected"), 0.0);
    assert_eq!(metric(&m, "vigil_mqtt_delivered_total"), 0.0);

    broker.spawn();
    let mut sub = Sub::connect(broker.port, "faults-sub", &["vigil/+/+"], true).await;
    vigil.wait_until("/readyz is 200", Duration::from_secs(40), |d| d.get("/readyz").starts_with("HTTP/1.1 200")).await;
    let mut got = Received::default();
    vigil.redelivered(0, &mut sub, &mut got).await;
    let m = vigil.get("/metrics");
    assert_eq!(metric(&m, "vigil_mqtt_connected"), 1.0);
    stop_lossless("broker down at start", vigil, &mut sub, got).await;
}

/// An outage longer than `outbox_capacity`: exactly the oldest answers are dropped, as many as
/// counted, and delivery resumes with the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_beyond_the_outbox_drops_exactly_the_oldest() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(dir.path(), DURABLE);
    let mut sub = Sub::connect(broker.port, "faults-sub", &["vigil/+/+"], true).await;
    let capacity = 4;
    let mqtt = format!("{}\noutbox_capacity = {capacity}", mqtt_to(broker.port));
    let vigil = Daemon::start(dir.path(), &mqtt, &[]);
    let mut got = Received::default();
    got.until(&mut sub, 2, Duration::from_secs(90)).await;
    broker.stop();
    let dropped = |d: &Daemon| {
        d.get("/metrics").lines().find_map(|l| l.strip_prefix("vigil_answers_dropped_total ")?.parse::<f64>().ok())
    };
    vigil.wait_until("answers are dropped", Duration::from_secs(90), |d| dropped(d).unwrap_or(0.0) >= 3.0).await;
    let connects = vigil.connects();
    broker.spawn();
    vigil.wait_until("vigil reconnects", Duration::from_secs(60), |d| d.connects() > connects).await;
    let resume_after = vigil.produced();
    vigil.wait_until("answers after the outage", Duration::from_secs(60), |d| d.produced() >= resume_after + 2).await;
    let newest = produced_ids(&vigil.log()).split_off(resume_after);
    assert!(got.until_all(&mut sub, &newest, Duration::from_secs(30)).await, "delivery resumes; log:\n{}", vigil.log());
    let log = vigil.stop();
    got.take(&mut sub, Duration::from_secs(3)).await;
    let (c, lost) = reckon("outage beyond a 4-answer outbox", &log, &got);
    assert!(c.dropped >= 3, "{c:?}");
    assert_eq!(c.undelivered, 0, "log:\n{log}");
    assert_eq!(c.delivered + c.dropped, c.produced);
    // The dropped answers are consecutive in production order: the oldest of the outage. An
    // answer in flight when the broker went away may have reached it before its PUBACK was
    // lost; the daemon cannot know, re-queues it, and it is among the oldest dropped. So the
    // dropped run is those (received, at most the in-flight window) followed by the lost ones.
    let produced = produced_ids(&log);
    assert!(!lost.is_empty() && lost.len() as u64 <= c.dropped, "lost {lost:?}, {c:?}");
    let first_lost = produced.iter().position(|id| *id == lost[0]).unwrap();
    assert_eq!(&produced[first_lost..first_lost + lost.len()], &lost[..], "the lost answers are one run");
    let in_flight = (c.dropped - lost.len() as u64) as usize;
    assert!(in_flight <= 2 && in_flight <= first_lost, "{in_flight} dropped answers arrived anyway: {c:?}");
    let run_end = first_lost + lost.len();
    assert!(produced[run_end..].iter().all(|id| got.count.contains_key(id)), "delivery resumed after the dropped run");
}

/// A publisher event loop that wedges: `/healthz` turns 503 and the watchdog pings stop within
/// the stall limit (10 s) plus a ping period, while `/metrics` keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_publisher_fails_healthz_and_starves_the_watchdog() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), "");
    let mut sub = Sub::connect(broker.port, "faults-sub", &["vigil/+/+"], false).await;
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let vigil = Daemon::start(
        dir.path(),
        &mqtt_to(broker.port),
        &[
            ("NOTIFY_SOCKET", notify_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "2000000"),
            ("VIGIL_FAULT", "publisher-stall@6"),
        ],
    );
    let mut got = Received::default();
    got.until(&mut sub, 1, Duration::from_secs(90)).await;
    assert!(vigil.get("/healthz").starts_with("HTTP/1.1 200"));

    let mut pings: Vec<Instant> = Vec::new();
    let mut wedged_at = None;
    let mut unhealthy_at = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut buf = [0u8; 256];
    while Instant::now() < deadline {
        if let Ok(n) = notify.recv(&mut buf) {
            if &buf[..n] == b"WATCHDOG=1" {
                pings.push(Instant::now());
            }
        }
        if wedged_at.is_none() && vigil.log().contains("wedged on purpose") {
            wedged_at = Some(Instant::now());
        }
        if let Some(w) = wedged_at {
            let h = vigil.get("/healthz");
            if unhealthy_at.is_none() && h.starts_with("HTTP/1.1 503") {
                assert!(h.contains("MQTT publisher's event loop stuck"), "{h}");
                unhealthy_at = Some(Instant::now());
            }
            // Watch a few ping periods past the verdict.
            if unhealthy_at.is_some_and(|u| u.elapsed() > Duration::from_secs(4))
                || w.elapsed() > Duration::from_secs(30)
            {
                break;
            }
        }
    }
    let wedged_at = wedged_at.unwrap_or_else(|| panic!("the fault never fired; log:\n{}", vigil.log()));
    let unhealthy = unhealthy_at.expect("/healthz never turned 503").duration_since(wedged_at);
    assert!(unhealthy <= Duration::from_secs(13), "/healthz noticed after {unhealthy:?}");
    assert!(pings.iter().any(|p| *p < wedged_at), "the watchdog was pinged while healthy");
    let last_ping = pings.iter().max().unwrap().saturating_duration_since(wedged_at);
    assert!(last_ping <= Duration::from_secs(12), "watchdog pinged {last_ping:?} after the wedge");
    assert!(vigil.get("/metrics").contains("vigil_answers_total"), "metrics still served");
    let log = vigil.stop();
    assert!(log.contains("withholding the watchdog ping"), "log:\n{log}");
    println!("broker-faults: wedged publisher: /healthz 503 after {unhealthy:?}, last watchdog ping {last_ping:?} after the wedge");
}

/// The embedded broker cannot be restarted, but the daemon's connection to it can drop: a
/// client taking over vigil's client id forces a disconnect and a reconnect, which must not
/// wedge the daemon (the in-process path shares the link-state code).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_connection_taken_over_recovers_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mqtt =
        format!("broker = \"embedded\"\nembedded_port = {port}\nclient_id = \"vigil-embedded\"\nkeepalive_s = 5");
    let vigil = Daemon::start(dir.path(), &mqtt, &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "embedded broker never listened; log:\n{}", vigil.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut sub = Sub::connect(port, "faults-sub", &["vigil/+/+"], false).await;
    let mut got = Received::default();
    got.until(&mut sub, 2, Duration::from_secs(90)).await;

    for _ in 0..2 {
        let connects = vigil.connects();
        let intruder = Sub::connect(port, "vigil-embedded", &["nothing/here"], false).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        intruder.stop();
        vigil.redelivered(connects, &mut sub, &mut got).await;
    }
    assert!(vigil.get("/healthz").starts_with("HTTP/1.1 200"));
    stop_lossless("embedded broker, connection taken over twice", vigil, &mut sub, got).await;
}

/// SIGTERM while no broker was ever reachable: a prompt, clean exit (nothing waits on the
/// broker), with the undelivered answers counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_without_a_broker_stops_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let vigil = Daemon::start(dir.path(), &mqtt_to(free_port()), &[]);
    vigil
        .wait_until("answers wait for a broker", Duration::from_secs(60), |d| {
            d.log().contains("cannot reach broker") && d.produced() >= 2
        })
        .await;
    let asked = Instant::now();
    let log = vigil.stop();
    let took = asked.elapsed();
    assert!(took < Duration::from_secs(8), "SIGTERM took {took:?}; log:\n{log}");
    let c = stop_counts(&log);
    assert!(c.produced >= 2 && (c.delivered, c.dropped, c.undelivered) == (0, 0, c.produced), "{c:?}");
    println!("broker-faults: SIGTERM with no broker: exit after {took:?}, {} answers undelivered", c.undelivered);
}

/// A flood of bad `set` messages: every one is counted, the log and the `errors` topic get one
/// report per burst, and no answer is pushed out of the outbox or lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_commands_costs_no_answer() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), "");
    let mut sub = Sub::connect(broker.port, "faults-sub", &["vigil/+/+", "vigil/errors"], false).await;
    // A small outbox, so that any error report taking an answer's slot would show.
    let mqtt = format!("{}\noutbox_capacity = 8", mqtt_to(broker.port));
    let vigil = Daemon::start(dir.path(), &mqtt, &[]);
    let mut got = Received::default();
    got.until(&mut sub, 2, Duration::from_secs(90)).await;

    const FLOOD: usize = 20_000;
    let mut o = rumqttc::MqttOptions::new("flooder", "127.0.0.1", broker.port);
    o.set_inflight(100);
    let (client, mut el) = rumqttc::AsyncClient::new(o, 1000);
    let pump = tokio::spawn(async move { while el.poll().await.is_ok() {} });
    for i in 0..FLOOD {
        let (topic, payload) = if i % 2 == 0 { ("vigil/live/set", "maybe") } else { ("vigil/nope/set", "ON") };
        client.publish(topic, rumqttc::QoS::AtLeastOnce, false, payload).await.unwrap();
    }
    let rejected = |d: &Daemon| metric(&d.get("/metrics"), "vigil_mqtt_commands_rejected_total") as usize;
    vigil.wait_until("every bad command is counted", Duration::from_secs(60), |d| rejected(d) >= FLOOD).await;
    pump.abort();
    assert_eq!(rejected(&vigil), FLOOD, "counted exactly");
    let m = vigil.get("/metrics");
    assert_eq!(metric(&m, "vigil_answers_dropped_total"), 0.0, "the flood pushed no answer out");

    let connects = vigil.connects();
    vigil.redelivered(connects - 1, &mut sub, &mut got).await;
    got.take(&mut sub, Duration::from_secs(1)).await;
    let errors = got.errors;
    let log = stop_lossless("flood of 20 000 bad set commands", vigil, &mut sub, got).await;
    let warned = log.matches("MQTT command ignored").count();
    // Two problems (bad payload, unknown target), one report each per 10 s.
    assert!((2..=8).contains(&warned), "{warned} warnings for {FLOOD} bad commands; log:\n{log}");
    assert!(errors <= 8, "{errors} error messages for {FLOOD} bad commands");
    println!("broker-faults: {FLOOD} bad set commands: all counted, {warned} log lines, {errors} error messages");
}
