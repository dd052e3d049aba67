//! The engine's job queue: bounded, fair across streams, and unwilling to answer late.
//!
//! Jobs wait in one FIFO per stream. Batches are filled round-robin over streams (one job per
//! stream per turn, resuming after the stream served last), so a flooding camera cannot starve
//! the others — the same idea as vLLM's fair scheduling across requests, applied per stream.
//! Jobs older than `max_age` are dropped instead of answered late; when the queue is full the
//! oldest job of the longest queue makes room.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// What the queue needs to know about a job.
pub trait QueuedJob {
    fn stream(&self) -> &str;
    fn enqueued_at(&self) -> Instant;
    /// Prompt tokens this job adds to a prefill batch (for `max_batch_tokens`).
    fn tokens(&self) -> usize;
    /// Sequences this job decodes (one per prompt), counted against a batch's `max_jobs`.
    fn sequences(&self) -> usize {
        1
    }
}

/// Why a job left the queue without being run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Waited longer than `max_queue_age_s`.
    TooOld,
    /// Pushed out by a newer job while the queue was full.
    QueueFull,
    /// Its stream was removed or disabled.
    StreamRemoved,
    /// Still waiting when the engine's shutdown deadline passed.
    Shutdown,
}

impl DropReason {
    /// The name in counters, metrics and `Dropped` outputs.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::TooOld => "too_old",
            DropReason::QueueFull => "queue_full",
            DropReason::StreamRemoved => "stream_removed",
            DropReason::Shutdown => "shutdown",
        }
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

// Ordered, and looked up in maps, by name, so a map keyed by reason reads (and serialises) as
// one keyed by its name.
impl Ord for DropReason {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl PartialOrd for DropReason {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl std::borrow::Borrow<str> for DropReason {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl serde::Serialize for DropReason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

pub struct JobQueue<J> {
    per_stream: BTreeMap<String, VecDeque<J>>,
    /// The stream served last; the next turn starts after it.
    cursor: Option<String>,
    capacity: usize,
    max_age: Duration,
    len: usize,
}

impl<J: QueuedJob> JobQueue<J> {
    pub fn new(capacity: usize, max_age: Duration) -> Self {
        Self { per_stream: BTreeMap::new(), cursor: None, capacity: capacity.max(1), max_age, len: 0 }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queue a job; returns the job pushed out to make room, if any.
    pub fn push(&mut self, job: J) -> Option<(J, DropReason)> {
        let evicted = if self.len >= self.capacity { self.evict_one() } else { None };
        self.per_stream.entry(job.stream().to_string()).or_default().push_back(job);
        self.len += 1;
        evicted.map(|j| (j, DropReason::QueueFull))
    }

    /// The oldest job of the longest per-stream queue: the flooding stream pays for the overflow.
    fn evict_one(&mut self) -> Option<J> {
        let stream = self
            .per_stream
            .iter()
            .max_by(|(_, a), (_, b)| {
                a.len().cmp(&b.len()).then_with(|| {
                    // Equal lengths: evict from the one whose head is oldest.
                    let (ta, tb) = (a.front().map(|j| j.enqueued_at()), b.front().map(|j| j.enqueued_at()));
                    tb.cmp(&ta)
                })
            })
            .map(|(s, _)| s.clone())?;
        self.pop_front(&stream)
    }

    fn pop_front(&mut self, stream: &str) -> Option<J> {
        let q = self.per_stream.get_mut(stream)?;
        let j = q.pop_front();
        if q.is_empty() {
            self.per_stream.remove(stream);
        }
        if j.is_some() {
            self.len -= 1;
        }
        j
    }

    /// Remove every job that has waited longer than `max_age` at `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<J> {
        let mut old = Vec::new();
        for q in self.per_stream.values_mut() {
            // FIFO per stream: the old ones are at the front.
            while q.front().is_some_and(|j| now.saturating_duration_since(j.enqueued_at()) > self.max_age) {
                old.push(q.pop_front().unwrap());
            }
        }
        self.per_stream.retain(|_, q| !q.is_empty());
        self.len -= old.len();
        old
    }

    /// Drop every queued job of a stream (removed or disabled at run time).
    pub fn remove_stream(&mut self, stream: &str) -> Vec<J> {
        let jobs: Vec<J> = self.per_stream.remove(stream).map(Vec::from).unwrap_or_default();
        self.len -= jobs.len();
        jobs
    }

    /// Take jobs worth up to `max_jobs` sequences ([`QueuedJob::sequences`]) totalling at most
    /// `max_tokens` prompt tokens, round-robin over streams. A single job larger than either
    /// limit is still taken alone, so it cannot block the queue forever.
    pub fn take_batch(&mut self, max_jobs: usize, max_tokens: usize) -> Vec<J> {
        let mut batch = Vec::new();
        let mut tokens = 0usize;
        let mut seqs = 0usize;
        loop {
            let streams = self.round_robin_order();
            if streams.is_empty() || seqs >= max_jobs {
                break;
            }
            let mut took_any = false;
            for s in streams {
                if seqs >= max_jobs {
                    break;
                }
                let head = self.per_stream.get(&s).and_then(|q| q.front());
                let cost = head.map(|j| j.tokens()).unwrap_or(0);
                let n = head.map(|j| j.sequences()).unwrap_or(1);
                if !batch.is_empty() && (tokens.saturating_add(cost) > max_tokens || seqs + n > max_jobs) {
                    continue;
                }
                if let Some(j) = self.pop_front(&s) {
                    tokens += cost;
                    seqs += n;
                    batch.push(j);
                    self.cursor = Some(s);
                    took_any = true;
                }
            }
            if !took_any {
                break;
            }
        }
        batch
    }

    /// Streams with jobs, starting after the one served last.
    fn round_robin_order(&self) -> Vec<String> {
        let names: Vec<&String> = self.per_stream.keys().collect();
        let start = match &self.cursor {
            Some(c) => names.iter().position(|n| n.as_str() > c.as_str()).unwrap_or(0),
            None => 0,
        };
        names[start..].iter().chain(names[..start].iter()).map(|s| s.to_string()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    struct J {
        stream: &'static str,
        n: u32,
        at: Instant,
        tokens: usize,
    }

    impl QueuedJob for J {
        fn stream(&self) -> &str {
            self.stream
        }
        fn enqueued_at(&self) -> Instant {
            self.at
        }
        fn tokens(&self) -> usize {
            self.tokens
        }
    }

    fn job(stream: &'static str, n: u32, at: Instant) -> J {
        J { stream, n, at, tokens: 100 }
    }

    #[test]
    fn round_robin_keeps_a_flooding_stream_from_starving_others() {
        let t0 = Instant::now();
        let mut q = JobQueue::new(1000, Duration::from_secs(60));
        for n in 0..50 {
            q.push(job("flood", n, t0));
        }
        q.push(job("quiet", 0, t0));
        q.push(job("quiet", 1, t0));
        let b = q.take_batch(4, usize::MAX);
        let names: Vec<_> = b.iter().map(|j| (j.stream, j.n)).collect();
        assert_eq!(names, vec![("flood", 0), ("quiet", 0), ("flood", 1), ("quiet", 1)]);
        // Batches of one alternate too: the cursor resumes after the last stream served.
        q.push(job("quiet", 2, t0));
        let first = q.take_batch(1, usize::MAX);
        let second = q.take_batch(1, usize::MAX);
        assert_eq!((first[0].stream, second[0].stream), ("flood", "quiet"));
    }

    #[test]
    fn token_budget_limits_a_batch_but_never_blocks() {
        let t0 = Instant::now();
        let mut q = JobQueue::new(10, Duration::from_secs(60));
        q.push(J { tokens: 5000, ..job("a", 0, t0) });
        q.push(J { tokens: 300, ..job("b", 0, t0) });
        q.push(J { tokens: 300, ..job("c", 0, t0) });
        let b = q.take_batch(8, 1000);
        assert_eq!(b.len(), 1, "the oversize job goes alone");
        assert_eq!(b[0].stream, "a");
        let b = q.take_batch(8, 1000);
        assert_eq!(b.iter().map(|j| j.stream).collect::<Vec<_>>(), vec!["b", "c"]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_batch_counts_sequences_not_jobs() {
        // A job with 3 prompts decodes 3 sequences: max_jobs = 4 fits it plus one single-prompt job.
        #[derive(Debug)]
        struct M(&'static str, usize, Instant);
        impl QueuedJob for M {
            fn stream(&self) -> &str {
                self.0
            }
            fn enqueued_at(&self) -> Instant {
                self.2
            }
            fn tokens(&self) -> usize {
                10
            }
            fn sequences(&self) -> usize {
                self.1
            }
        }
        let t0 = Instant::now();
        let mut q = JobQueue::new(10, Duration::from_secs(60));
        q.push(M("a", 3, t0));
        q.push(M("b", 2, t0));
        q.push(M("c", 1, t0));
        let b = q.take_batch(4, usize::MAX);
        assert_eq!(b.iter().map(|j| j.0).collect::<Vec<_>>(), vec!["a", "c"]);
        // Larger than the limit alone: still taken, alone.
        q.push(M("d", 9, t0));
        let b = q.take_batch(4, usize::MAX);
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn old_jobs_expire() {
        let t0 = Instant::now();
        let mut q = JobQueue::new(10, Duration::from_secs(5));
        q.push(job("a", 0, t0));
        q.push(job("a", 1, t0 + Duration::from_secs(4)));
        q.push(job("b", 0, t0 + Duration::from_secs(1)));
        let old = q.expire(t0 + Duration::from_millis(6500));
        assert_eq!(old.iter().map(|j| (j.stream, j.n)).collect::<Vec<_>>(), vec![("a", 0), ("b", 0)]);
        assert_eq!(q.len(), 1);
        assert_eq!(q.take_batch(8, usize::MAX)[0].n, 1);
    }

    #[test]
    fn full_queue_evicts_from_the_longest_stream_and_stays_bounded() {
        let t0 = Instant::now();
        let mut q = JobQueue::new(4, Duration::from_secs(60));
        q.push(job("quiet", 0, t0));
        let mut evicted = Vec::new();
        for n in 0..100 {
            if let Some((j, why)) = q.push(job("flood", n, t0 + Duration::from_millis(n as u64))) {
                assert_eq!(why, DropReason::QueueFull);
                evicted.push(j);
            }
            assert!(q.len() <= 4);
        }
        assert_eq!(evicted.len(), 97);
        assert!(evicted.iter().all(|j| j.stream == "flood"), "the quiet stream's job survives");
        // The newest flood jobs are the ones kept.
        let kept: Vec<_> = q.take_batch(8, usize::MAX).into_iter().map(|j| (j.stream, j.n)).collect();
        assert_eq!(kept, vec![("flood", 97), ("quiet", 0), ("flood", 98), ("flood", 99)]);
    }

    #[test]
    fn removing_a_stream_drops_its_jobs() {
        let t0 = Instant::now();
        let mut q = JobQueue::new(10, Duration::from_secs(60));
        q.push(job("a", 0, t0));
        q.push(job("b", 0, t0));
        q.push(job("a", 1, t0));
        assert_eq!(q.remove_stream("a").len(), 2);
        assert_eq!(q.len(), 1);
        assert!(q.remove_stream("zzz").is_empty());
    }
}
