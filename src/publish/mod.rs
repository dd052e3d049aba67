//! MQTT publishing: topics, payloads, availability, `set` commands, Home Assistant discovery and
//! the embedded broker. The topic table is in [`topics`], payloads in
//! [`payload`] (schema for subscribers: `tests/schema/`).
//!
//! Design: every message goes through the [`outbox::Outbox`] (under a mutex, never held across
//! an await); publishing is a synchronous, non-blocking call from any thread. rumqttc's event
//! loop is polled in its own tokio task and is never blocked: it only moves acknowledgements
//! into the outbox and hands it the next messages. On a disconnect the unacknowledged messages
//! go back to the outbox, so QoS 1/2 answers survive a broker restart in order (up to
//! `outbox_capacity`; beyond it the oldest are dropped and counted).
//!
//! Liveness: the event loop marks when it starts handling an event and when it is back waiting
//! on the network ([`Publisher::loop_health`]); handling never awaits, so a loop busy for
//! seconds is wedged (a blocked lock, say) and the daemon stops reporting itself healthy.
//!
//! Use (daemon): `let (publisher, commands) = Publisher::start(&cfg, PublishOptions::default())`
//! inside the tokio runtime; `publisher.answer(&Answer{..})` per answer (state and alert edges
//! follow from it), `publisher.status(stream, &StatusPayload{..})` on source state changes,
//! `publisher.stats_every(60 s, || StatsPayload{..})`, `publisher.error(..)`; apply the
//! [`Command`]s from `commands`; `publisher.shutdown(timeout).await` on SIGTERM.

pub mod connect;
pub mod discovery;
#[cfg(feature = "embedded-broker")]
pub mod embedded;
pub mod events;
pub mod outbox;
pub mod payload;
pub mod tail;
pub mod throttle;
pub mod topics;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, EventLoop, Outgoing, Packet, QoS};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::{Config, PromptKind};
use crate::lock::lock;
use connect::BrokerAddr;
pub use outbox::AnswerCounts;
use outbox::{Class, Msg, Outbox, Pushed};
pub use payload::*;
pub use topics::{SetTarget, Topics};

/// Largest message vigil sends (and rumqttc accepts): answers are a few KiB.
const MAX_MESSAGE_BYTES: usize = (1 << 20) - 1024;

pub use crate::config::RESERVED_PROMPT_NAMES;

/// Why publishing could not start (connection problems after start are retried, not returned).
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("mqtt.broker {0}")]
    Broker(String),
    #[error("mqtt.password_file {}: {reason}", path.display())]
    PasswordFile { path: PathBuf, reason: String },
    #[error("MQTT TLS: {0}")]
    Tls(String),
    #[error("embedded MQTT broker: {0}")]
    Embedded(String),
    /// A config that cannot be mapped onto topics.
    #[error("{0}")]
    Config(String),
    /// A connection failure that will not fix itself (refused credentials, TLS), for one-shot
    /// tools such as `vigil tail`.
    #[error("{0}")]
    Connect(String),
}

/// A run-time command received on a `set` topic, for the daemon to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    SetStream { stream: String, enabled: bool },
    SetPrompt { stream: String, prompt: String, enabled: bool },
}

/// The connection as the event loop last saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkState {
    pub connected: bool,
    /// Successful connects since start.
    pub connects: u64,
    /// Failed connection attempts since the last successful connect.
    pub failures: u64,
    /// The last failure, in words (no secrets).
    pub last_error: Option<String>,
}

/// Knobs that are not in the config file (tests shorten the backoff).
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// First delay before reconnecting; doubles up to `reconnect_max`.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Messages handed to rumqttc and not yet acknowledged, at most. Brokers cap this per
    /// client (mosquitto's `max_inflight_messages` defaults to 20 and, over MQTT 3.1.1, silently
    /// discards QoS 2 messages beyond it), so stay under that.
    pub max_inflight: usize,
}

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions {
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            max_inflight: 16,
        }
    }
}

struct Inner {
    outbox: Outbox,
    connected: bool,
    stopping: bool,
    /// Last value of each alert prompt, for false → true edges.
    alerts: HashMap<(String, String), bool>,
}

struct Shared {
    topics: Topics,
    qos: QoS,
    client: AsyncClient,
    inner: Mutex<Inner>,
    link: watch::Sender<LinkState>,
    commands: mpsc::Sender<Command>,
    /// stream → its prompts, to validate `set` commands (replaced at reload).
    streams: Mutex<HashMap<String, HashSet<String>>>,
    /// Home Assistant discovery topics published, to retract those a reload removes.
    discovery_topics: Mutex<HashSet<String>>,
    ha_status_topic: Option<String>,
    beat: Heartbeat,
    /// Woken after every event the loop handles (acks, disconnects: what empties the outbox),
    /// for `shutdown` to wait on instead of polling.
    progressed: tokio::sync::Notify,
    /// Set when `shutdown` begins: the stats ticker ends on it.
    stop: watch::Sender<bool>,
    /// One log line and one `errors` message per burst of the same problem.
    reports: Mutex<throttle::Throttle>,
    /// `set` messages refused (bad payload, unknown stream or prompt) since start.
    commands_rejected: AtomicU64,
    /// Alert event state per (stream, prompt), kept across reloads, and each prompt's policy.
    events: Mutex<HashMap<(String, String), events::EventTracker>>,
    policies: Mutex<HashMap<String, events::EventPolicy>>,
}

/// How often the same problem is reported (log and `errors` topic) at most.
const REPORT_PERIOD: Duration = Duration::from_secs(10);

/// When the event loop started handling its current event (ms after `base`, plus one; 0 while
/// it waits on the network or sleeps before reconnecting).
struct Heartbeat {
    base: Instant,
    busy_since: AtomicU64,
}

impl Heartbeat {
    fn busy(&self) {
        let ms = self.base.elapsed().as_millis() as u64 + 1;
        self.busy_since.store(ms, Ordering::Relaxed);
    }
    fn idle(&self) {
        self.busy_since.store(0, Ordering::Relaxed);
    }
    fn busy_for(&self) -> Duration {
        match self.busy_since.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            since => self.base.elapsed().saturating_sub(Duration::from_millis(since - 1)),
        }
    }
}

/// How the publisher's event loop is doing, for liveness checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopHealth {
    /// Waiting on the network, or handling an event for this long (handling never awaits, so
    /// anything beyond milliseconds means the loop is wedged).
    Running { busy_for: Duration },
    /// The loop task ended (after `shutdown`, or a panic).
    Ended,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    fn enqueue(&self, msg: Msg) {
        // A message the client or broker would refuse would block the queue head forever
        // (each refusal drops the connection and the message is re-sent): refuse it here.
        if msg.topic.is_empty() || msg.topic.contains(['+', '#', '\0']) {
            tracing::error!("MQTT: not publishing to invalid topic {:?}", msg.topic);
            self.lock().outbox.refused(&msg);
            return;
        }
        if msg.payload.len() + msg.topic.len() > MAX_MESSAGE_BYTES {
            tracing::error!(
                "MQTT: not publishing {} bytes to {} (limit {MAX_MESSAGE_BYTES})",
                msg.payload.len(),
                msg.topic
            );
            self.lock().outbox.refused(&msg);
            return;
        }
        let mut inner = self.lock();
        if let Pushed::DroppedOldest { first_in_burst: true } = inner.outbox.push(msg) {
            tracing::warn!(
                "MQTT outbox full ({} messages): dropping the oldest until the broker takes them again",
                inner.outbox.capacity()
            );
        }
        self.pump(&mut inner);
    }

    fn event(&self, topic: String, payload: Vec<u8>) {
        self.enqueue(Msg { topic, payload, qos: self.qos, retain: false, class: Class::Event });
    }

    /// Stats and error reports: their own small budget in the outbox, never an answer's slot.
    fn diagnostic(&self, topic: String, payload: Vec<u8>) {
        self.enqueue(Msg { topic, payload, qos: self.qos, retain: false, class: Class::Diagnostic });
    }

    fn retained(&self, topic: String, payload: Vec<u8>) {
        self.enqueue(Msg { topic, payload, qos: self.qos, retain: true, class: Class::Event });
    }

    /// Hand queued messages to rumqttc while connected and the in-flight window allows.
    fn pump(&self, inner: &mut Inner) {
        while inner.connected && !inner.stopping {
            let Some(m) = inner.outbox.take_next() else { break };
            match self.client.try_publish(m.topic.clone(), m.qos, m.retain, m.payload.clone()) {
                Ok(()) => inner.outbox.handed(m),
                Err(_) => {
                    // Channel full: the event loop is busy; the next ack pumps again.
                    inner.outbox.unnext(m);
                    break;
                }
            }
        }
    }

    fn outbox_stats(&self) -> OutboxStats {
        let inner = self.lock();
        OutboxStats {
            depth: inner.outbox.depth() as u64,
            capacity: inner.outbox.capacity() as u64,
            dropped: inner.outbox.dropped(),
        }
    }

    fn stats(&self, mut stats: StatsPayload) {
        stats.outbox = self.outbox_stats();
        stats.answers = Some(self.lock().outbox.answers());
        stats.events = Some(self.event_counts());
        self.diagnostic(self.topics.stats(), to_json(&stats));
    }

    fn event_counts(&self) -> events::EventCounts {
        lock(&self.events).values().fold(events::EventCounts::default(), |mut sum, t| {
            let c = t.counts();
            sum.started += c.started;
            sum.ended += c.ended;
            sum.suppressed += c.suppressed;
            sum
        })
    }

    /// Publish the retained `event/state` an event implies, then the event message. In that
    /// order (the outbox keeps it, and so does the broker for one client): whoever acts on the
    /// event message finds the state already retained.
    fn publish_event(&self, e: &events::EventPayload) {
        let t = &self.topics;
        match e.kind {
            events::EventType::Start => self.retained(t.event_state(&e.stream, &e.prompt), b"ON".to_vec()),
            events::EventType::End => self.retained(t.event_state(&e.stream, &e.prompt), b"OFF".to_vec()),
            events::EventType::Update => {}
        }
        self.event(t.event(&e.stream, &e.prompt), to_json(e));
    }

    fn log_burst_end(&self, ended: Option<u64>) {
        if let Some(n) = ended {
            tracing::info!("MQTT outbox drained; {n} message(s) were dropped while it was full");
        }
    }
}

/// Publishes vigil's answers and states to MQTT. Share it behind an `Arc`; every method but
/// `shutdown` returns at once.
pub struct Publisher {
    shared: Arc<Shared>,
    /// The event-loop task; taken by `shutdown`/`kill`.
    task: Mutex<Option<JoinHandle<()>>>,
    #[cfg(feature = "embedded-broker")]
    embedded: Option<embedded::EmbeddedBroker>,
}

impl Publisher {
    /// Connect (in the background) and start publishing. Returns the publisher and the channel
    /// on which `set` commands arrive. Must be called inside a tokio runtime.
    pub async fn start(
        cfg: &Config,
        opts: PublishOptions,
    ) -> Result<(Publisher, mpsc::Receiver<Command>), PublishError> {
        let m = &cfg.mqtt;
        // `<prefix>/<stream>/<prompt>` shares its level with these per-stream topics.
        if let Some(p) = cfg.prompts.iter().find(|p| RESERVED_PROMPT_NAMES.contains(&p.name.as_str())) {
            return Err(PublishError::Config(format!(
                "prompt name {:?} collides with the topic {}/<stream>/{}; rename the prompt",
                p.name, m.topic_prefix, p.name
            )));
        }
        #[cfg(feature = "embedded-broker")]
        let embedded = if m.is_embedded() {
            let addr = embedded::EmbeddedBroker::listen_addr(m)?;
            let login = match (&m.username, &m.password_file) {
                (Some(user), Some(pf)) => Some((user.clone(), connect::read_password(&cfg.resolve_path(pf))?)),
                _ => None,
            };
            Some(
                tokio::task::spawn_blocking(move || embedded::EmbeddedBroker::start(addr, login))
                    .await
                    .map_err(|e| PublishError::Embedded(format!("start-up task failed: {e}")))??,
            )
        } else {
            None
        };
        #[cfg(not(feature = "embedded-broker"))]
        if m.is_embedded() {
            return Err(PublishError::Embedded(
                "this vigil was built without the `embedded-broker` feature; set mqtt.broker to mqtt://host".into(),
            ));
        }

        let topics = Topics::new(&m.topic_prefix);
        let resolve = |p: &std::path::Path| cfg.resolve_path(p);
        let (mqtt_opts, addr) =
            connect::mqtt_options(m, &m.client_id, &resolve, Some((topics.available(), "offline")))?;
        let (client, eventloop) = AsyncClient::new(mqtt_opts, 4 * opts.max_inflight + 16);
        let (cmd_tx, cmd_rx) = mpsc::channel(64);
        let (link_tx, _) = watch::channel(LinkState::default());
        let shared = Arc::new(Shared {
            qos: connect::qos(m.qos),
            client,
            inner: Mutex::new(Inner {
                outbox: Outbox::new(m.outbox_capacity, opts.max_inflight),
                connected: false,
                stopping: false,
                alerts: HashMap::new(),
            }),
            link: link_tx,
            commands: cmd_tx,
            streams: Mutex::default(),
            discovery_topics: Mutex::default(),
            ha_status_topic: m.homeassistant_discovery.then(|| discovery::status_topic(cfg)),
            topics,
            beat: Heartbeat { base: Instant::now(), busy_since: AtomicU64::new(0) },
            progressed: tokio::sync::Notify::new(),
            stop: watch::channel(false).0,
            reports: Mutex::new(throttle::Throttle::new(REPORT_PERIOD)),
            commands_rejected: AtomicU64::new(0),
            events: Mutex::default(),
            policies: Mutex::default(),
        });

        // Initial retained states, in the order they are re-sent after each connect:
        // discovery configs, then switches' states, then `online` (forced last).
        announce(&shared, cfg);
        shared.enqueue(Msg {
            topic: shared.topics.available(),
            payload: b"online".to_vec(),
            qos: QoS::AtLeastOnce,
            retain: true,
            class: Class::Event,
        });

        tracing::info!("MQTT: publishing under {:?} to {addr}", m.topic_prefix);
        let task = tokio::spawn(run_loop(shared.clone(), eventloop, opts, addr));
        Ok((
            Publisher {
                shared,
                task: Mutex::new(Some(task)),
                #[cfg(feature = "embedded-broker")]
                embedded,
            },
            cmd_rx,
        ))
    }

    /// After a reload: accept `set` commands for the new streams and prompts, publish their
    /// `enabled` states and Home Assistant discovery configs, and retract the discovery configs
    /// of what the reload removed (an empty retained config deletes the entity in HA). States of
    /// streams and prompts that stay are left as they are (a `set OFF` survives a reload).
    pub fn reconfigure(&self, cfg: &Config) {
        announce(&self.shared, cfg);
    }

    /// Publish an answer: the JSON on `<stream>/<prompt>`, the short state (retained) and, for
    /// alert prompts turning true, an alert.
    pub fn answer(&self, a: &Answer) {
        let t = &self.shared.topics;
        let sh = &self.shared;
        sh.enqueue(Msg {
            topic: t.answer(&a.stream, &a.prompt),
            payload: to_json(a),
            qos: sh.qos,
            retain: false,
            class: Class::Answer,
        });
        if a.kind == PromptKind::Alert {
            let now = a.is_positive();
            let before = self.shared.lock().alerts.insert((a.stream.clone(), a.prompt.clone()), now).unwrap_or(false);
            if now && !before {
                self.shared.event(t.alert(&a.stream, &a.prompt), to_json(&AlertPayload::from_answer(a)));
            }
            let policy = lock(&sh.policies).get(&a.prompt).copied().unwrap_or_default();
            let event = lock(&sh.events).entry((a.stream.clone(), a.prompt.clone())).or_default().on_answer(
                a,
                &policy,
                unix_now(),
            );
            if let Some(e) = event {
                sh.publish_event(&e);
            }
        }
        self.shared.retained(t.state(&a.stream, &a.prompt), a.short_state().into_bytes());
    }

    /// Publish a snapshot (retained raw JPEG on `<stream>/<prompt>/snapshot`); `None` if it is
    /// too large for a message.
    pub fn snapshot(&self, stream: &str, prompt: &str, jpeg: Vec<u8>, width: u32, height: u32) -> Option<SnapshotInfo> {
        let topic = self.shared.topics.snapshot(stream, prompt);
        if jpeg.len() + topic.len() > MAX_MESSAGE_BYTES {
            tracing::warn!(
                "snapshot of {stream}/{prompt} is {} bytes, over the message limit: not published",
                jpeg.len()
            );
            return None;
        }
        let info = SnapshotInfo { topic: topic.clone(), width, height, bytes: jpeg.len() as u64 };
        self.shared.retained(topic, jpeg);
        Some(info)
    }

    /// Publish a stream's source state (retained).
    pub fn status(&self, stream: &str, status: &StatusPayload) {
        self.shared.retained(self.shared.topics.status(stream), to_json(status));
    }

    /// Publish statistics; the outbox figures are filled in here.
    pub fn stats(&self, stats: StatsPayload) {
        self.shared.stats(stats);
    }

    /// Publish `collect()` on `<prefix>/stats` every `every` (the daemon uses 60 s), the first
    /// time after one period. The task ends when [`Publisher::shutdown`] begins.
    pub fn stats_every(
        &self,
        every: Duration,
        mut collect: impl FnMut() -> StatsPayload + Send + 'static,
    ) -> JoinHandle<()> {
        let shared = self.shared.clone();
        let mut stop = self.shared.stop.subscribe();
        tokio::spawn(async move {
            let start = tokio::time::Instant::now() + every;
            let mut tick = tokio::time::interval_at(start, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    // The watch's `Ref` is dropped with the branch, before any await.
                    _ = stop.wait_for(|&s| s) => return,
                }
                shared.stats(collect());
            }
        })
    }

    /// Report a failure worth a human's attention on `<prefix>/errors`: at most one per
    /// component and stream every 10 s, the next one saying how many were not reported.
    pub fn error(&self, component: impl Into<Component>, stream: Option<&str>, message: &str) {
        let component = component.into();
        let key = format!("{component}/{}", stream.unwrap_or(""));
        let Some(suppressed) = lock(&self.shared.reports).admit(&key, Instant::now()) else { return };
        let e = ErrorPayload {
            component: component.to_string(),
            stream: stream.map(str::to_string),
            message: throttle::with_suppressed(&crate::config::redact_uri(message), suppressed),
            timestamp: now_rfc3339(),
        };
        self.shared.diagnostic(self.shared.topics.errors(), to_json(&e));
    }

    /// End the open alert events of a stream (`prompt`: only that prompt's), with the reason
    /// (`stream_down`, `disabled`, `removed`).
    pub fn close_events(&self, stream: &str, prompt: Option<&str>, reason: &str) {
        let ended: Vec<events::EventPayload> = lock(&self.shared.events)
            .iter_mut()
            .filter(|((s, p), _)| s == stream && prompt.is_none_or(|q| q == p))
            .filter_map(|((s, p), t)| t.close(s, p, unix_now(), reason))
            .collect();
        for e in &ended {
            self.shared.publish_event(e);
        }
    }

    /// Alert events since start, over all streams.
    pub fn event_counts(&self) -> events::EventCounts {
        self.shared.event_counts()
    }

    /// `set` messages refused since start (bad payload, unknown stream or prompt).
    pub fn commands_rejected(&self) -> u64 {
        self.shared.commands_rejected.load(Ordering::Relaxed)
    }

    /// Publish the enabled state of a stream or prompt (retained `.../enabled`), e.g. after the
    /// daemon changed it on its own.
    pub fn enabled(&self, target: &SetTarget, enabled: bool) {
        publish_enabled(&self.shared, target, enabled);
    }

    pub fn outbox_stats(&self) -> OutboxStats {
        self.shared.outbox_stats()
    }

    /// Messages the broker took since start (QoS 0 written, QoS 1/2 acknowledged).
    pub fn delivered(&self) -> u64 {
        self.shared.lock().outbox.delivered()
    }

    /// What became of the answers handed to [`Publisher::answer`] since start.
    pub fn answer_counts(&self) -> AnswerCounts {
        self.shared.lock().outbox.answers()
    }

    /// Whether the event loop is alive and how long it has been busy on one event.
    pub fn loop_health(&self) -> LoopHealth {
        let ended = lock(&self.task).as_ref().is_none_or(|t| t.is_finished());
        if ended {
            return LoopHealth::Ended;
        }
        LoopHealth::Running { busy_for: self.shared.beat.busy_for() }
    }

    /// Watch the connection state.
    pub fn link(&self) -> watch::Receiver<LinkState> {
        self.shared.link.subscribe()
    }

    pub fn topics(&self) -> &Topics {
        &self.shared.topics
    }

    /// Where the embedded broker listens, when this publisher started one.
    pub fn embedded_addr(&self) -> Option<std::net::SocketAddr> {
        #[cfg(feature = "embedded-broker")]
        return self.embedded.as_ref().map(|e| e.addr());
        #[cfg(not(feature = "embedded-broker"))]
        None
    }

    /// Clean shutdown: publish `stopped`, give queued messages up to `timeout` to go out, then
    /// disconnect (so the broker does not send the `offline` will). Later calls do nothing.
    pub async fn shutdown(&self, timeout: Duration) {
        self.shared.stop.send_replace(true);
        let Some(mut task) = lock(&self.task).take() else { return };
        self.shared.enqueue(Msg {
            topic: self.shared.topics.available(),
            payload: b"stopped".to_vec(),
            qos: QoS::AtLeastOnce,
            retain: true,
            class: Class::Event,
        });
        let deadline = Instant::now() + timeout;
        loop {
            // Registered before the check, so progress made in between still wakes us.
            let progressed = self.shared.progressed.notified();
            tokio::pin!(progressed);
            progressed.as_mut().enable();
            {
                let inner = self.shared.lock();
                if inner.outbox.is_idle() || !inner.connected || Instant::now() >= deadline {
                    if !inner.outbox.is_idle() {
                        tracing::warn!("MQTT: {} message(s) not delivered at shutdown", inner.outbox.depth());
                    }
                    break;
                }
            }
            let _ = tokio::time::timeout_at(deadline.into(), progressed).await;
        }
        let connected = {
            let mut inner = self.shared.lock();
            inner.stopping = true;
            inner.connected
        };
        if connected
            && self.shared.client.try_disconnect().is_ok()
            && tokio::time::timeout(Duration::from_secs(2), &mut task).await.is_ok()
        {
            return;
        }
        task.abort();
    }

    /// Stop at once without DISCONNECT, as a crash would: the broker then publishes the
    /// `offline` last will.
    pub fn kill(&self) {
        if let Some(t) = lock(&self.task).take() {
            t.abort();
        }
    }
}

impl Drop for Publisher {
    /// Dropped without `shutdown`: stop the event loop (the broker then sends `offline`).
    fn drop(&mut self) {
        self.kill();
    }
}

fn on_off(b: bool) -> Vec<u8> {
    if b {
        b"ON".to_vec()
    } else {
        b"OFF".to_vec()
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    // Our payload types have string keys and finite numbers are not checked by serde_json,
    // so serialisation cannot fail; NaN/inf become null.
    serde_json::to_vec(v).unwrap_or_else(|e| {
        tracing::error!("cannot serialise MQTT payload: {e}");
        b"null".to_vec()
    })
}

fn publish_enabled(shared: &Shared, target: &SetTarget, enabled: bool) {
    let topic = match target {
        SetTarget::Stream(s) => shared.topics.stream_enabled(s),
        SetTarget::Prompt { stream, prompt } => shared.topics.prompt_enabled(stream, prompt),
    };
    shared.retained(topic, on_off(enabled));
}

/// The event loop task: polls rumqttc forever, reconnecting with exponential backoff.
async fn run_loop(shared: Arc<Shared>, mut el: EventLoop, opts: PublishOptions, addr: BrokerAddr) {
    let mut backoff = opts.reconnect_min;
    let mut last_logged: Option<String> = None;
    let stall = crate::fault::publisher_stall();
    let started = Instant::now();
    loop {
        // The last event may have emptied the outbox or ended the connection.
        shared.progressed.notify_waiters();
        shared.beat.idle();
        let polled = el.poll().await;
        shared.beat.busy();
        if stall.is_some_and(|after| started.elapsed() >= after) {
            crate::fault::block_forever("publisher event loop");
        }
        match polled {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = opts.reconnect_min;
                last_logged = None;
                let mut inner = shared.lock();
                inner.connected = true;
                inner.outbox.resend_retained(&shared.topics.available());
                let mut filters: Vec<String> = shared.topics.set_filters().to_vec();
                filters.extend(shared.ha_status_topic.clone());
                let subs = filters.into_iter().map(|f| rumqttc::SubscribeFilter::new(f, QoS::AtLeastOnce));
                if let Err(e) = shared.client.try_subscribe_many(subs) {
                    tracing::warn!("MQTT: cannot subscribe to commands: {e}");
                }
                shared.pump(&mut inner);
                drop(inner);
                shared.link.send_modify(|l| {
                    l.connected = true;
                    l.connects += 1;
                    l.failures = 0;
                });
                tracing::info!("MQTT: connected to {addr}");
            }
            Ok(Event::Incoming(Packet::PubAck(a))) => ack(&shared, a.pkid),
            Ok(Event::Incoming(Packet::PubComp(c))) => ack(&shared, c.pkid),
            Ok(Event::Incoming(Packet::Publish(p))) => on_message(&shared, &p.topic, &p.payload),
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                let mut inner = shared.lock();
                inner.outbox.on_outgoing_publish(pkid);
                if pkid == 0 {
                    let ended = inner.outbox.end_burst_if_empty();
                    shared.pump(&mut inner);
                    drop(inner);
                    shared.log_burst_end(ended);
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                if shared.lock().stopping {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                let stopping = {
                    let mut inner = shared.lock();
                    inner.connected = false;
                    // Requests that reached rumqttc's channel after it failed: move them to its
                    // pending list, which the next (clean-session) connect discards; the outbox
                    // re-sends them.
                    el.clean();
                    let n = inner.outbox.on_disconnect();
                    if n > 0 {
                        tracing::warn!("MQTT outbox full: dropped {n} unacknowledged message(s) on disconnect");
                    }
                    inner.stopping
                };
                if stopping {
                    return;
                }
                let msg = connect::describe(&e, &addr);
                if last_logged.as_deref() != Some(msg.as_str()) {
                    tracing::warn!("MQTT: {msg}; retrying (backoff from {:?} up to {:?})", backoff, opts.reconnect_max);
                    last_logged = Some(msg.clone());
                } else {
                    tracing::debug!("MQTT: {msg}; retrying in {:?}", backoff);
                }
                shared.link.send_modify(|l| {
                    l.connected = false;
                    l.failures += 1;
                    l.last_error = Some(msg);
                });
                shared.progressed.notify_waiters();
                shared.beat.idle();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(opts.reconnect_max);
            }
        }
    }
}

fn ack(shared: &Shared, pkid: u16) {
    let mut inner = shared.lock();
    let ended = inner.outbox.on_ack(pkid);
    shared.pump(&mut inner);
    drop(inner);
    shared.log_burst_end(ended);
}

/// Publish discovery configs and the `enabled` states of streams and prompts not announced yet,
/// retract discovery configs that are gone, and remember which streams and prompts exist.
fn announce(shared: &Shared, cfg: &Config) {
    *lock(&shared.policies) = cfg.prompts.iter().map(|p| (p.name.clone(), p.event_policy())).collect();
    let known = std::mem::take(&mut *lock(&shared.streams));
    if cfg.mqtt.homeassistant_discovery {
        let configs = discovery::configs(cfg, &shared.topics);
        let now: HashSet<String> = configs.iter().map(|d| d.topic.clone()).collect();
        let mut published = lock(&shared.discovery_topics);
        for gone in published.difference(&now) {
            shared.retained(gone.clone(), Vec::new());
        }
        for d in configs {
            shared.retained(d.topic, d.payload.to_string().into_bytes());
        }
        *published = now;
    }
    let mut streams = HashMap::new();
    for s in &cfg.streams {
        let old = known.get(&s.name);
        if old.is_none() {
            shared.retained(shared.topics.stream_enabled(&s.name), on_off(s.enabled));
        }
        for p in &s.prompts {
            if !old.is_some_and(|o| o.contains(p)) {
                shared.retained(shared.topics.prompt_enabled(&s.name, p), on_off(true));
            }
        }
        streams.insert(s.name.clone(), s.prompts.iter().cloned().collect::<HashSet<_>>());
    }
    *lock(&shared.streams) = streams;
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// A message on a subscribed topic: a `set` command or Home Assistant's birth message.
fn on_message(shared: &Shared, topic: &str, payload: &[u8]) {
    let text = String::from_utf8_lossy(payload);
    let text = text.trim();
    if shared.ha_status_topic.as_deref() == Some(topic) {
        if text == "online" {
            tracing::info!("Home Assistant came online: re-publishing discovery configs and states");
            let mut inner = shared.lock();
            inner.outbox.resend_retained(&shared.topics.available());
            shared.pump(&mut inner);
        }
        return;
    }
    let Some(target) = shared.topics.parse_set(topic) else { return };
    let enabled = match text.to_ascii_uppercase().as_str() {
        "ON" | "TRUE" | "1" => true,
        "OFF" | "FALSE" | "0" => false,
        _ => {
            let m = format!("{topic}: expected ON or OFF, got {:?}", payload::truncate_chars(text, 40));
            reject_command(shared, "payload", &m);
            return;
        }
    };
    let known = {
        let streams = lock(&shared.streams);
        match &target {
            SetTarget::Stream(s) => streams.contains_key(s),
            SetTarget::Prompt { stream, prompt } => streams.get(stream).is_some_and(|p| p.contains(prompt)),
        }
    };
    if !known {
        let m = format!("{topic}: no such stream or prompt");
        reject_command(shared, "target", &m);
        return;
    }
    let cmd = match target.clone() {
        SetTarget::Stream(stream) => Command::SetStream { stream, enabled },
        SetTarget::Prompt { stream, prompt } => Command::SetPrompt { stream, prompt, enabled },
    };
    tracing::info!("MQTT command: {cmd:?}");
    match shared.commands.try_send(cmd) {
        Ok(()) => publish_enabled(shared, &target, enabled),
        Err(mpsc::error::TrySendError::Full(_)) => tracing::warn!("MQTT command dropped: the daemon is not keeping up"),
        Err(mpsc::error::TrySendError::Closed(_)) => tracing::debug!("MQTT command ignored: nobody listens"),
    }
}

/// The part of vigil an `errors` report is about (its `component` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Source,
    Engine,
    Config,
    Mqtt,
    /// Any other name (the payload's `component` is free text).
    Other(&'static str),
}

impl Component {
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Source => "source",
            Component::Engine => "engine",
            Component::Config => "config",
            Component::Mqtt => "mqtt",
            Component::Other(name) => name,
        }
    }
}

impl std::fmt::Display for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// By name: the known names are their variants.
impl From<&'static str> for Component {
    fn from(name: &'static str) -> Self {
        [Component::Source, Component::Engine, Component::Config, Component::Mqtt]
            .into_iter()
            .find(|c| c.as_str() == name)
            .unwrap_or(Component::Other(name))
    }
}

/// A refused `set` message: counted always; logged and reported on `errors` once per burst of
/// the same `problem` (a bad payload, an unknown target).
fn reject_command(shared: &Shared, problem: &str, message: &str) {
    shared.commands_rejected.fetch_add(1, Ordering::Relaxed);
    let key = format!("mqtt/set/{problem}");
    let Some(suppressed) = lock(&shared.reports).admit(&key, Instant::now()) else { return };
    let message = throttle::with_suppressed(message, suppressed);
    tracing::warn!("MQTT command ignored: {message}");
    let e = ErrorPayload { component: Component::Mqtt.to_string(), stream: None, message, timestamp: now_rfc3339() };
    shared.diagnostic(shared.topics.errors(), to_json(&e));
}
