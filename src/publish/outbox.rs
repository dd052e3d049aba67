//! The outbox: every message the publisher sends, held until the broker acknowledges it.
//! Bounded, ordered, drop-oldest with a counter and one warning per burst.
//!
//! Why our own queue in front of rumqttc: with a clean session rumqttc forgets unacknowledged
//! publishes on reconnect, and its request channel cannot drop the oldest entry. So messages
//! stay here until their PUBACK/PUBCOMP, and on a disconnect the unacknowledged ones go back to
//! the front of the queue in their original order.
//!
//! Two kinds of message:
//! - *events*: queued in order. Answers and alerts share `capacity`; diagnostics (stats,
//!   errors) have a budget of their own ([`DIAGNOSTIC_CAPACITY`]), so a flood of them can never
//!   push an answer out. When a budget is full, the oldest of its class is dropped and counted;
//! - *retained states* (availability, statuses, `.../state`, `.../enabled`, discovery configs):
//!   only the latest value per topic matters, so they are kept in a map and re-sent after every
//!   connect (the broker may have restarted without persistence). They never compete with
//!   events for capacity.
//!
//! Answers are also counted on their own ([`AnswerCounts`]): every answer queued ends up
//! delivered (acknowledged), dropped (outbox full or refused), or still pending here, so
//! `produced = delivered + dropped + pending` holds at every moment.

use std::collections::{HashMap, VecDeque};

use rumqttc::QoS;

/// One MQTT message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: QoS,
    pub retain: bool,
    pub class: Class,
}

/// Which budget an event draws on, and whether it is counted as an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// An answer: shares `capacity` with alerts, and is counted in [`AnswerCounts`].
    Answer,
    /// Alerts, and retained states (which never count against a budget).
    Event,
    /// Stats and error reports: at most [`DIAGNOSTIC_CAPACITY`] queued.
    Diagnostic,
}

/// Diagnostics (stats, error reports) queued at most, apart from the answers' capacity.
pub const DIAGNOSTIC_CAPACITY: usize = 64;

/// The fate of the answers handed to the outbox since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AnswerCounts {
    /// Answers queued for the broker.
    pub produced: u64,
    /// Answers the broker took: acknowledged (QoS 1/2) or written (QoS 0).
    pub delivered: u64,
    /// Answers dropped: the oldest when the outbox was full, or refused as unpublishable.
    pub dropped: u64,
}

impl AnswerCounts {
    /// Answers neither delivered nor dropped yet (waiting or unacknowledged).
    pub fn pending(&self) -> u64 {
        self.produced.saturating_sub(self.delivered + self.dropped)
    }
}

/// What happened when a message was queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// The oldest event was dropped; `first_in_burst` is true only for the first drop since the
    /// outbox last emptied (so the caller warns once per burst).
    DroppedOldest {
        first_in_burst: bool,
    },
}

#[derive(Debug)]
pub struct Outbox {
    capacity: usize,
    /// Most messages handed to the client and not yet acknowledged.
    max_inflight: usize,
    events: VecDeque<Msg>,
    /// Latest retained message per topic, and the order topics were first seen.
    retained: HashMap<String, Msg>,
    retained_order: Vec<String>,
    /// Retained topics still to (re)send, oldest first, without duplicates.
    dirty: VecDeque<String>,
    /// Handed to the client, its `Outgoing::Publish` not seen yet.
    handed: VecDeque<Msg>,
    /// Sent with a packet id, awaiting the broker's acknowledgement.
    inflight: VecDeque<(u16, Msg)>,
    dropped: u64,
    burst_dropped: u64,
    /// Messages the broker took: QoS 0 once written, QoS 1/2 once acknowledged.
    delivered: u64,
    answers: AnswerCounts,
}

impl Outbox {
    pub fn new(capacity: usize, max_inflight: usize) -> Self {
        Outbox {
            capacity: capacity.max(1),
            max_inflight: max_inflight.max(1),
            events: VecDeque::new(),
            retained: HashMap::new(),
            retained_order: Vec::new(),
            dirty: VecDeque::new(),
            handed: VecDeque::new(),
            inflight: VecDeque::new(),
            dropped: 0,
            burst_dropped: 0,
            delivered: 0,
            answers: AnswerCounts::default(),
        }
    }

    /// What became of the answers queued since start.
    pub fn answers(&self) -> AnswerCounts {
        self.answers
    }

    /// A message that was never queued because the broker could not take it: an answer among
    /// them counts as dropped.
    pub fn refused(&mut self, msg: &Msg) {
        if msg.class == Class::Answer {
            self.answers.produced += 1;
            self.answers.dropped += 1;
        }
    }

    /// Messages the broker took since start (see the field).
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Events dropped since start.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Events not yet acknowledged by the broker (queued or in flight).
    pub fn depth(&self) -> usize {
        self.events.len()
            + self.handed.iter().filter(|m| !m.retain).count()
            + self.inflight.iter().filter(|(_, m)| !m.retain).count()
    }

    /// Nothing waiting and nothing unacknowledged.
    pub fn is_idle(&self) -> bool {
        self.events.is_empty() && self.dirty.is_empty() && self.handed.is_empty() && self.inflight.is_empty()
    }

    /// Queue a message. Retained ones replace the previous value of their topic.
    pub fn push(&mut self, msg: Msg) -> Pushed {
        if msg.retain {
            let topic = msg.topic.clone();
            if self.retained.insert(topic.clone(), msg).is_none() {
                self.retained_order.push(topic.clone());
            }
            self.mark_dirty(&topic);
            return Pushed::Queued;
        }
        self.answers.produced += (msg.class == Class::Answer) as u64;
        let diagnostic = msg.class == Class::Diagnostic;
        let mut result = Pushed::Queued;
        while self.queued(diagnostic) >= self.budget(diagnostic) {
            result = Pushed::DroppedOldest { first_in_burst: self.drop_oldest(diagnostic) };
        }
        self.events.push_back(msg);
        result
    }

    /// Events of one budget (diagnostics or not) waiting in the queue.
    fn queued(&self, diagnostic: bool) -> usize {
        self.events.iter().filter(|m| (m.class == Class::Diagnostic) == diagnostic).count()
    }

    fn budget(&self, diagnostic: bool) -> usize {
        if diagnostic {
            DIAGNOSTIC_CAPACITY
        } else {
            self.capacity
        }
    }

    /// Drop the oldest queued event of one budget; true if it is the first of a burst.
    fn drop_oldest(&mut self, diagnostic: bool) -> bool {
        let i = self.events.iter().position(|m| (m.class == Class::Diagnostic) == diagnostic);
        let old = i.and_then(|i| self.events.remove(i));
        self.answers.dropped += old.is_some_and(|m| m.class == Class::Answer) as u64;
        self.dropped += 1;
        self.burst_dropped += 1;
        self.burst_dropped == 1
    }

    /// The latest retained value of a topic.
    pub fn retained(&self, topic: &str) -> Option<&Msg> {
        self.retained.get(topic)
    }

    fn mark_dirty(&mut self, topic: &str) {
        if !self.dirty.iter().any(|t| t == topic) {
            self.dirty.push_back(topic.to_string());
        }
    }

    /// Mark every retained topic for re-sending, in first-seen order, with `last` (the
    /// availability topic) at the end so `online` follows the initial states.
    pub fn resend_retained(&mut self, last: &str) {
        let order = self.retained_order.clone();
        for t in order.iter().filter(|t| *t != last) {
            self.mark_dirty(t);
        }
        if self.retained.contains_key(last) {
            self.dirty.retain(|t| t != last);
            self.dirty.push_back(last.to_string());
        }
    }

    /// The next message to hand to the client, if the in-flight window allows one. Retained
    /// states go first (they are few and describe the present).
    pub fn take_next(&mut self) -> Option<Msg> {
        if self.handed.len() + self.inflight.len() >= self.max_inflight {
            return None;
        }
        while let Some(topic) = self.dirty.pop_front() {
            if let Some(m) = self.retained.get(&topic) {
                return Some(m.clone());
            }
        }
        self.events.pop_front()
    }

    /// The client took `msg` (after [`Outbox::take_next`]).
    pub fn handed(&mut self, msg: Msg) {
        self.handed.push_back(msg);
    }

    /// The client refused `msg` (its channel was full): put it back where it came from.
    pub fn unnext(&mut self, msg: Msg) {
        if msg.retain {
            let t = msg.topic.clone();
            self.dirty.retain(|x| *x != t);
            self.dirty.push_front(t);
        } else {
            self.events.push_front(msg);
        }
    }

    /// The client wrote the oldest handed message with packet id `pkid` (0 for QoS 0, which
    /// is done at that point).
    pub fn on_outgoing_publish(&mut self, pkid: u16) {
        if let Some(m) = self.handed.pop_front() {
            if m.qos != QoS::AtMostOnce {
                self.inflight.push_back((pkid, m));
            } else {
                self.count_delivered(&m);
            }
        }
    }

    /// The broker acknowledged `pkid` (PUBACK for QoS 1, PUBCOMP for QoS 2). Returns the number
    /// dropped in the burst that ends now that the outbox is empty, if one does.
    pub fn on_ack(&mut self, pkid: u16) -> Option<u64> {
        if let Some(i) = self.inflight.iter().position(|(p, _)| *p == pkid) {
            if let Some((_, m)) = self.inflight.remove(i) {
                self.count_delivered(&m);
            }
        }
        self.end_burst_if_empty()
    }

    fn count_delivered(&mut self, m: &Msg) {
        self.delivered += 1;
        self.answers.delivered += (m.class == Class::Answer) as u64;
    }

    /// After QoS 0 traffic or any ack: a burst ends when every event is out.
    pub fn end_burst_if_empty(&mut self) -> Option<u64> {
        if self.burst_dropped > 0 && self.depth() == 0 {
            let n = self.burst_dropped;
            self.burst_dropped = 0;
            return Some(n);
        }
        None
    }

    /// The connection dropped: unacknowledged events go back to the front of the queue in their
    /// original order (the oldest beyond capacity are dropped); retained states are re-sent
    /// after the next connect anyway. Returns how many events were dropped to fit.
    pub fn on_disconnect(&mut self) -> u64 {
        let mut back: Vec<Msg> = self.inflight.drain(..).map(|(_, m)| m).collect();
        back.extend(self.handed.drain(..));
        for m in back.into_iter().rev() {
            if !m.retain {
                self.events.push_front(m);
            }
        }
        let mut n = 0;
        for diagnostic in [false, true] {
            while self.queued(diagnostic) > self.budget(diagnostic) {
                self.drop_oldest(diagnostic);
                n += 1;
            }
        }
        self.dirty.clear();
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(i: u32) -> Msg {
        Msg {
            topic: "p/s/q".into(),
            payload: i.to_string().into_bytes(),
            qos: QoS::AtLeastOnce,
            retain: false,
            class: Class::Answer,
        }
    }
    fn ret(topic: &str, v: &str) -> Msg {
        Msg {
            topic: topic.into(),
            payload: v.as_bytes().to_vec(),
            qos: QoS::AtLeastOnce,
            retain: true,
            class: Class::Event,
        }
    }
    fn num(m: &Msg) -> u32 {
        String::from_utf8(m.payload.clone()).unwrap().parse().unwrap()
    }

    #[test]
    fn drops_oldest_beyond_capacity_and_warns_once_per_burst() {
        let mut o = Outbox::new(3, 10);
        assert_eq!(o.push(ev(0)), Pushed::Queued);
        o.push(ev(1));
        o.push(ev(2));
        assert_eq!(o.push(ev(3)), Pushed::DroppedOldest { first_in_burst: true });
        assert_eq!(o.push(ev(4)), Pushed::DroppedOldest { first_in_burst: false });
        assert_eq!(o.dropped(), 2);
        let mut got = Vec::new();
        while let Some(m) = o.take_next() {
            got.push(num(&m));
            o.handed(m);
        }
        assert_eq!(got, vec![2, 3, 4]);
        for pkid in 1..=3 {
            o.on_outgoing_publish(pkid);
        }
        assert_eq!(o.on_ack(1), None);
        assert_eq!(o.on_ack(2), None);
        assert_eq!(o.on_ack(3), Some(2), "burst ends when the outbox empties");
        assert!(o.is_idle());
        o.push(ev(5));
        o.push(ev(6));
        o.push(ev(7));
        assert_eq!(o.push(ev(8)), Pushed::DroppedOldest { first_in_burst: true }, "a new burst warns again");
    }

    #[test]
    fn unacked_events_return_in_order_after_disconnect() {
        let mut o = Outbox::new(10, 2);
        for i in 0..5 {
            o.push(ev(i));
        }
        let a = o.take_next().unwrap();
        o.handed(a);
        let b = o.take_next().unwrap();
        o.handed(b);
        assert!(o.take_next().is_none(), "in-flight window of 2");
        o.on_outgoing_publish(7); // 0 in flight, 1 still handed
        assert_eq!(o.depth(), 5);
        o.on_disconnect();
        let order: Vec<u32> = std::iter::from_fn(|| {
            let m = o.take_next()?;
            o.handed(m.clone());
            o.on_outgoing_publish(1);
            o.on_ack(1);
            Some(num(&m))
        })
        .collect();
        assert_eq!(order, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn retained_latest_value_first_and_availability_last() {
        let mut o = Outbox::new(2, 10);
        o.push(ret("p/available", "online"));
        o.push(ret("p/s/status", "a"));
        o.push(ev(1));
        o.push(ret("p/s/status", "b"));
        o.on_disconnect();
        assert!(o.take_next().map(|m| !m.retain).unwrap(), "dirty marks are cleared on disconnect");
        o.resend_retained("p/available");
        let m = o.take_next().unwrap();
        assert_eq!((m.topic.as_str(), m.payload.as_slice()), ("p/s/status", &b"b"[..]));
        let m = o.take_next().unwrap();
        assert_eq!(m.topic, "p/available");
        assert!(o.take_next().is_none());
    }

    #[test]
    fn answers_are_delivered_dropped_or_pending() {
        let mut o = Outbox::new(3, 2);
        let stat = |i: u32| Msg { class: Class::Event, ..ev(100 + i) };
        for i in 0..4 {
            o.push(ev(i));
        }
        o.push(stat(0)); // the fourth and fifth pushes drop answers 0 and 1
        o.push(ret("p/s/state", "x"));
        let c = o.answers();
        assert_eq!((c.produced, c.delivered, c.dropped, c.pending()), (4, 0, 2, 2));
        // The retained state goes first, then answer 2, which is acknowledged.
        let r = o.take_next().unwrap();
        o.handed(r);
        o.on_outgoing_publish(1);
        o.on_ack(1);
        let a = o.take_next().unwrap();
        assert_eq!(num(&a), 2);
        o.handed(a);
        o.on_outgoing_publish(2);
        assert_eq!(o.answers().delivered, 0, "not delivered before its PUBACK");
        o.on_ack(2);
        // Answer 3 goes out and the link drops before its PUBACK: still pending, not lost.
        let b = o.take_next().unwrap();
        o.handed(b);
        o.on_outgoing_publish(3);
        o.on_disconnect();
        let c = o.answers();
        assert_eq!((c.produced, c.delivered, c.dropped, c.pending()), (4, 1, 2, 1));
        o.refused(&ev(9));
        o.refused(&stat(9));
        let c = o.answers();
        assert_eq!((c.produced, c.dropped, c.pending()), (5, 3, 1), "a refused answer is a dropped one");
        let q = Msg { qos: QoS::AtMostOnce, ..ev(10) };
        o.push(q);
        while let Some(m) = o.take_next() {
            let qos0 = m.qos == QoS::AtMostOnce;
            o.handed(m);
            o.on_outgoing_publish(if qos0 { 0 } else { 7 });
            o.on_ack(7);
        }
        let c = o.answers();
        assert_eq!((c.produced, c.delivered, c.pending()), (6, 3, 0), "QoS 0 counts once written");
    }

    #[test]
    fn diagnostics_have_their_own_budget_and_never_evict_answers() {
        let mut o = Outbox::new(3, 100);
        let diag = |i: u32| Msg { class: Class::Diagnostic, ..ev(1000 + i) };
        o.push(ev(0));
        for i in 0..(DIAGNOSTIC_CAPACITY as u32 + 10) {
            o.push(diag(i));
        }
        o.push(ev(1));
        o.push(ev(2));
        let c = o.answers();
        assert_eq!((c.produced, c.dropped), (3, 0), "a flood of diagnostics drops none of the answers");
        assert_eq!(o.dropped(), 10, "the 10 oldest diagnostics went");
        o.push(ev(3));
        assert_eq!(o.answers().dropped, 1, "answers beyond their own capacity still drop the oldest answer");
        // Order is kept across both classes: answer 1 was queued after the surviving diagnostics.
        let order: Vec<u32> = std::iter::from_fn(|| o.take_next()).map(|m| num(&m)).collect();
        let mut want = vec![];
        want.extend(1010..1000 + DIAGNOSTIC_CAPACITY as u32 + 10);
        want.extend([1, 2, 3]);
        assert_eq!(order, want);
    }
}
