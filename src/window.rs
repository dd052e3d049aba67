//! Frames → windows: a window of `window_seconds` every `stride_seconds`, on the frame grid of a
//! stream sampled at `fps`.
//!
//! ## The grid
//! Every frame sits on a *slot*: `slot = round(stream_time_s × fps)` (the source rebases its
//! timestamps so they are multiples of `1/fps`, see `source`). Window `k` starts at
//! `k × stride_seconds` and covers the slots `[ceil(k·S·fps), ceil((k·S + W)·fps))`, so its
//! expected frame count is fixed by the settings alone and a shortfall is a *gap*.
//!
//! ## When a window is emitted
//! As soon as a frame at or past its end arrives. Frames are `Arc`s shared between overlapping
//! windows, never copied. At the end of a finite stream ([`Windower::finish`]) the pending windows
//! are emitted in order up to the first one that reaches the last frame, so the tail of the
//! stream is covered once: that last window may be *partial* (`partial = true`).
//!
//! ## Gaps
//! A window (other than the final one) with fewer frames than expected — frames were lost to a
//! reconnect — is emitted with the frames it has and their real timestamps (`missing > 0`) under
//! [`GapPolicy::Emit`] (the default), or dropped and counted under [`GapPolicy::Drop`]. Windows
//! that fall entirely inside a gap have no frames and are skipped (counted as gap windows).
//!
//! ## Toward the consumer
//! [`WindowQueue`] is bounded: when the consumer is behind, pushing drops the **oldest** pending
//! window and counts it, so a stalled consumer costs bounded memory and, when it catches up, sees
//! the newest windows. A blocking push (used for batch files played as fast as possible) waits
//! for room instead.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::config::GapPolicy;

/// Tolerance for floating-point grid arithmetic (`0.1 × 3 = 0.30000000000000004`).
const EPS: f64 = 1e-6;

/// One decoded frame: RGB8, tightly packed (`width × 3` bytes per row, no padding).
#[derive(Debug, Clone)]
pub struct Frame {
    pub width: u32,
    pub height: u32,
    /// `height × width × 3` bytes, row-major RGB.
    pub data: Vec<u8>,
    /// Position on the stream's frame grid (see the module docs).
    pub slot: u64,
    /// Stream-relative time in seconds: `slot / fps` (from the buffer PTS, rebased per run).
    pub time_s: f64,
    /// Wall-clock (UTC) capture time.
    pub captured_at: SystemTime,
}

/// A window of frames.
#[derive(Debug, Clone)]
pub struct Window {
    /// Name of the stream it came from.
    pub stream: String,
    /// 0, 1, 2, ... in emission order, per stream (dropped windows do not use a number).
    pub seq: u64,
    /// Index `k` of the window on the stride grid (`start_s = k × stride_seconds`).
    pub index: u64,
    /// Nominal start and end of the window in stream time (`end_s = start_s + window_seconds`).
    pub start_s: f64,
    pub end_s: f64,
    pub frames: Vec<Arc<Frame>>,
    /// Frames the window should hold at `fps`.
    pub expected_frames: usize,
    /// `expected_frames - frames.len()` for a window with a gap (0 when complete or final).
    pub missing: usize,
    /// The last window of a finite stream, cut short by its end.
    pub partial: bool,
}

impl Window {
    pub fn first_time_s(&self) -> f64 {
        self.frames.first().map(|f| f.time_s).unwrap_or(self.start_s)
    }
    pub fn last_time_s(&self) -> f64 {
        self.frames.last().map(|f| f.time_s).unwrap_or(self.start_s)
    }
}

/// Window geometry, validated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowSpec {
    pub fps: f64,
    pub window_seconds: f64,
    pub stride_seconds: f64,
    pub gap_policy: GapPolicy,
}

/// Invalid window settings.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum WindowError {
    #[error("fps must be > 0 and finite (got {0})")]
    Fps(f64),
    #[error("stride_seconds must be > 0 and finite (got {0})")]
    Stride(f64),
    #[error("a window of {window_seconds} s holds no frame at {fps} fps (needs >= {} s)", 1.0 / .fps)]
    Window { window_seconds: f64, fps: f64 },
}

impl WindowSpec {
    pub fn new(fps: f64, window_seconds: f64, stride_seconds: f64, gap_policy: GapPolicy) -> Result<Self, WindowError> {
        if !(fps > 0.0 && fps.is_finite()) {
            return Err(WindowError::Fps(fps));
        }
        if !(stride_seconds > 0.0 && stride_seconds.is_finite()) {
            return Err(WindowError::Stride(stride_seconds));
        }
        let spec = WindowSpec { fps, window_seconds, stride_seconds, gap_policy };
        // Same rule as the config validation: a window spans at least one frame period.
        if !(window_seconds.is_finite() && window_seconds * fps >= 1.0 - 1e-9) {
            return Err(WindowError::Window { window_seconds, fps });
        }
        Ok(spec)
    }

    /// First slot of window `k`.
    pub fn start_slot(&self, k: u64) -> u64 {
        (k as f64 * self.stride_seconds * self.fps - EPS).ceil().max(0.0) as u64
    }

    /// One past the last slot of window `k`.
    pub fn end_slot(&self, k: u64) -> u64 {
        ((k as f64 * self.stride_seconds + self.window_seconds) * self.fps - EPS).ceil().max(0.0) as u64
    }

    pub fn expected_frames(&self, k: u64) -> usize {
        (self.end_slot(k) - self.start_slot(k)) as usize
    }

    /// The first window `k` whose end lies past `slot` (the earliest window that can still
    /// receive a frame at `slot`).
    fn first_open_window(&self, slot: u64) -> u64 {
        let guess =
            (((slot as f64 + 1.0) / self.fps - self.window_seconds) / self.stride_seconds).floor().max(0.0) as u64;
        let mut k = guess;
        while k > 0 && self.end_slot(k - 1) > slot {
            k -= 1;
        }
        while self.end_slot(k) <= slot {
            k += 1;
        }
        k
    }
}

/// Counters of one windower.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WindowerStats {
    pub frames_in: u64,
    /// Frames whose slot was not after the previous frame's (duplicates after a rebase).
    pub frames_out_of_order: u64,
    pub windows_emitted: u64,
    /// Windows dropped for a gap under [`GapPolicy::Drop`].
    pub windows_dropped_gap: u64,
    /// Windows that fell entirely inside a gap (no frames).
    pub windows_empty: u64,
}

/// Turns frames into windows (pure; the source drives it from its appsink callback).
#[derive(Debug)]
pub struct Windower {
    stream: String,
    spec: WindowSpec,
    /// Frames that a pending window may still need, oldest first.
    buf: VecDeque<Arc<Frame>>,
    /// The next window to complete.
    next_k: u64,
    next_seq: u64,
    last_slot: Option<u64>,
    stats: WindowerStats,
}

impl Windower {
    pub fn new(stream: impl Into<String>, spec: WindowSpec) -> Self {
        Windower {
            stream: stream.into(),
            spec,
            buf: VecDeque::new(),
            next_k: 0,
            next_seq: 0,
            last_slot: None,
            stats: WindowerStats::default(),
        }
    }

    pub fn spec(&self) -> &WindowSpec {
        &self.spec
    }

    pub fn stats(&self) -> WindowerStats {
        self.stats
    }

    /// The slot of the last accepted frame.
    pub fn last_slot(&self) -> Option<u64> {
        self.last_slot
    }

    /// Add a frame; returns the windows it completes, in order.
    pub fn push(&mut self, frame: Arc<Frame>) -> Vec<Window> {
        self.stats.frames_in += 1;
        let slot = frame.slot;
        if self.last_slot.is_some_and(|last| slot <= last) {
            self.stats.frames_out_of_order += 1;
            return Vec::new();
        }
        self.last_slot = Some(slot);
        let mut out = Vec::new();
        while self.spec.end_slot(self.next_k) <= slot {
            if self.buf.is_empty() {
                // Nothing pending: jump over windows that lie wholly in a gap in one step.
                let k = self.spec.first_open_window(slot);
                self.stats.windows_empty += k - self.next_k;
                self.next_k = k;
                break;
            }
            let k = self.next_k;
            self.next_k += 1;
            if let Some(w) = self.close(k, false) {
                out.push(w);
            }
            self.trim();
        }
        if slot >= self.spec.start_slot(self.next_k) {
            self.buf.push_back(frame);
        }
        out
    }

    /// End of a finite stream: emit the pending windows up to the first that reaches the last
    /// frame (possibly partial). The windower is then empty but keeps its grid and sequence.
    pub fn finish(&mut self) -> Vec<Window> {
        let mut out = Vec::new();
        let Some(last) = self.last_slot else { return out };
        while !self.buf.is_empty() {
            let k = self.next_k;
            self.next_k += 1;
            let reaches_end = self.spec.end_slot(k) > last;
            if let Some(w) = self.close(k, true) {
                out.push(w);
            }
            self.trim();
            if reaches_end {
                break;
            }
        }
        self.buf.clear();
        out
    }

    /// Drop frames that no pending window can use.
    fn trim(&mut self) {
        let start = self.spec.start_slot(self.next_k);
        while self.buf.front().is_some_and(|f| f.slot < start) {
            self.buf.pop_front();
        }
    }

    fn close(&mut self, k: u64, at_end: bool) -> Option<Window> {
        let (s, e) = (self.spec.start_slot(k), self.spec.end_slot(k));
        let frames: Vec<Arc<Frame>> = self.buf.iter().filter(|f| f.slot >= s && f.slot < e).cloned().collect();
        let expected = (e - s) as usize;
        if frames.is_empty() {
            self.stats.windows_empty += 1;
            return None;
        }
        let short = expected - frames.len().min(expected);
        let missing = if at_end && short > 0 {
            // Short at the end of the stream: frames before the last one must all be present
            // for it to count as a clean partial window rather than a gap.
            let last = frames.last().map(|f| f.slot).unwrap_or(s);
            (last + 1 - s) as usize - frames.len()
        } else {
            short
        };
        let partial = at_end && short > 0;
        if missing > 0 && self.spec.gap_policy == GapPolicy::Drop {
            self.stats.windows_dropped_gap += 1;
            return None;
        }
        let start_s = k as f64 * self.spec.stride_seconds;
        let w = Window {
            stream: self.stream.clone(),
            seq: self.next_seq,
            index: k,
            start_s,
            end_s: start_s + self.spec.window_seconds,
            frames,
            expected_frames: expected,
            missing,
            partial,
        };
        self.next_seq += 1;
        self.stats.windows_emitted += 1;
        Some(w)
    }
}

// ---------------------------------------------------------------------------------------------
// The bounded queue toward the consumer
// ---------------------------------------------------------------------------------------------

struct QueueInner {
    items: Mutex<QueueState>,
    /// Wakes blocking receivers and blocking pushers.
    cond: Condvar,
    /// Wakes async receivers.
    notify: tokio::sync::Notify,
    dropped: AtomicU64,
    pushed: AtomicU64,
    capacity: usize,
}

struct QueueState {
    items: VecDeque<Window>,
    closed: bool,
    receivers_gone: bool,
}

/// Sending half of a bounded window queue (drop-oldest by default).
#[derive(Clone)]
pub struct WindowSender {
    inner: Arc<QueueInner>,
}

/// Receiving half; dropping it makes pushes no-ops.
pub struct WindowReceiver {
    inner: Arc<QueueInner>,
}

/// A bounded window queue of `capacity` (at least 1).
pub fn window_queue(capacity: usize) -> (WindowSender, WindowReceiver) {
    let inner = Arc::new(QueueInner {
        items: Mutex::new(QueueState { items: VecDeque::new(), closed: false, receivers_gone: false }),
        cond: Condvar::new(),
        notify: tokio::sync::Notify::new(),
        dropped: AtomicU64::new(0),
        pushed: AtomicU64::new(0),
        capacity: capacity.max(1),
    });
    (WindowSender { inner: inner.clone() }, WindowReceiver { inner })
}

fn lock(inner: &QueueInner) -> std::sync::MutexGuard<'_, QueueState> {
    // A panic while holding the lock cannot leave the deque inconsistent; keep going.
    crate::lock::lock(&inner.items)
}

impl WindowSender {
    /// Push, dropping the oldest pending window when full. Returns whether one was dropped.
    pub fn push(&self, w: Window) -> bool {
        let mut st = lock(&self.inner);
        if st.receivers_gone {
            return false;
        }
        let mut dropped = false;
        if st.items.len() >= self.inner.capacity {
            st.items.pop_front();
            self.inner.dropped.fetch_add(1, Ordering::Relaxed);
            dropped = true;
        }
        st.items.push_back(w);
        self.inner.pushed.fetch_add(1, Ordering::Relaxed);
        drop(st);
        self.inner.cond.notify_all();
        self.inner.notify.notify_one();
        dropped
    }

    /// Push, waiting for room while `stop` is not set (for batch sources that must not lose
    /// windows). Returns false when stopped or the receiver is gone.
    pub fn push_blocking(&self, w: Window, stop: &AtomicBool) -> bool {
        let mut st = lock(&self.inner);
        while st.items.len() >= self.inner.capacity && !st.receivers_gone {
            if stop.load(Ordering::Relaxed) {
                return false;
            }
            st = crate::lock::wait_timeout(&self.inner.cond, st, Duration::from_millis(50));
        }
        if st.receivers_gone {
            return false;
        }
        st.items.push_back(w);
        self.inner.pushed.fetch_add(1, Ordering::Relaxed);
        drop(st);
        self.inner.cond.notify_all();
        self.inner.notify.notify_one();
        true
    }

    /// No more windows will come; receivers drain what is left and then see `None`.
    pub fn close(&self) {
        lock(&self.inner).closed = true;
        self.inner.cond.notify_all();
        self.inner.notify.notify_waiters();
        self.inner.notify.notify_one();
    }

    /// Windows dropped because the consumer was behind.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }
}

impl WindowReceiver {
    /// Take the oldest pending window without waiting.
    pub fn try_recv(&self) -> Option<Window> {
        let w = lock(&self.inner).items.pop_front();
        if w.is_some() {
            self.inner.cond.notify_all();
        }
        w
    }

    /// Wait up to `timeout` for a window; `None` on timeout or when closed and drained.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<Window> {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.inner);
        loop {
            if let Some(w) = st.items.pop_front() {
                drop(st);
                self.inner.cond.notify_all();
                return Some(w);
            }
            let now = Instant::now();
            if st.closed || now >= deadline {
                return None;
            }
            st = crate::lock::wait_timeout(&self.inner.cond, st, deadline - now);
        }
    }

    /// Wait for a window (async); `None` once the sender closed the queue and it is drained.
    pub async fn recv(&self) -> Option<Window> {
        loop {
            let notified = self.inner.notify.notified();
            {
                let mut st = lock(&self.inner);
                if let Some(w) = st.items.pop_front() {
                    drop(st);
                    self.inner.cond.notify_all();
                    return Some(w);
                }
                if st.closed {
                    return None;
                }
            }
            notified.await;
        }
    }

    /// Windows waiting.
    pub fn len(&self) -> usize {
        lock(&self.inner).items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_closed(&self) -> bool {
        lock(&self.inner).closed
    }

    /// Windows dropped (oldest first) because this consumer was behind.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// Windows ever pushed.
    pub fn pushed(&self) -> u64 {
        self.inner.pushed.load(Ordering::Relaxed)
    }

    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }
}

impl Drop for WindowReceiver {
    fn drop(&mut self) {
        let mut st = lock(&self.inner);
        st.receivers_gone = true;
        st.items.clear();
        drop(st);
        self.inner.cond.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(slot: u64, fps: f64) -> Arc<Frame> {
        Arc::new(Frame {
            width: 2,
            height: 1,
            data: vec![0; 6],
            slot,
            time_s: slot as f64 / fps,
            captured_at: SystemTime::UNIX_EPOCH,
        })
    }

    /// (index, slots, partial, missing) of one window.
    type Summary = (u64, Vec<u64>, bool, usize);

    /// Feed slots, finish, summarise each window.
    fn run(spec: WindowSpec, slots: impl IntoIterator<Item = u64>) -> (Vec<Summary>, WindowerStats) {
        let mut w = Windower::new("t", spec);
        let mut out = Vec::new();
        for s in slots {
            out.extend(w.push(frame(s, spec.fps)));
        }
        out.extend(w.finish());
        for (i, win) in out.iter().enumerate() {
            assert_eq!(win.seq, i as u64, "sequence numbers are dense");
        }
        (
            out.into_iter()
                .map(|w| (w.index, w.frames.iter().map(|f| f.slot).collect(), w.partial, w.missing))
                .collect(),
            w.stats(),
        )
    }

    fn spec(fps: f64, w: f64, s: f64) -> WindowSpec {
        WindowSpec::new(fps, w, s, GapPolicy::Emit).unwrap()
    }

    #[test]
    fn tumbling_windows_exact() {
        // 1 fps, 4 s windows every 4 s, 10 frames: [0..4) [4..8) and a partial [8..10).
        let (w, _) = run(spec(1.0, 4.0, 4.0), 0..10);
        assert_eq!(w, vec![(0, vec![0, 1, 2, 3], false, 0), (1, vec![4, 5, 6, 7], false, 0), (2, vec![8, 9], true, 0)]);
    }

    #[test]
    fn overlapping_windows_share_frames() {
        // 2 fps, 2 s windows every 1 s over 3 s of frames (slots 0..6).
        let spec = spec(2.0, 2.0, 1.0);
        let mut wd = Windower::new("t", spec);
        let mut out = Vec::new();
        for s in 0..6 {
            out.extend(wd.push(frame(s, 2.0)));
        }
        out.extend(wd.finish());
        let got: Vec<Vec<u64>> = out.iter().map(|w| w.frames.iter().map(|f| f.slot).collect()).collect();
        assert_eq!(got, vec![vec![0, 1, 2, 3], vec![2, 3, 4, 5]]);
        assert!(!out[1].partial, "the second window is complete and reaches the end");
        // Slot 2 is the same allocation in both windows.
        assert!(Arc::ptr_eq(&out[0].frames[2], &out[1].frames[0]));
        assert_eq!((out[1].start_s, out[1].end_s), (1.0, 3.0));
    }

    #[test]
    fn final_partial_only_once_for_the_tail() {
        // 1 fps, W=4, S=1, slots 0..10: windows 0..=6 are complete; windows 7, 8, 9 would only
        // repeat the tail, so they are not emitted.
        let (w, _) = run(spec(1.0, 4.0, 1.0), 0..10);
        assert_eq!(w.len(), 7);
        assert_eq!(w.last().unwrap(), &(6, vec![6, 7, 8, 9], false, 0));
        // W=3, S=3, 10 frames: the tail frame 9 gets a partial window of its own.
        let (w, _) = run(spec(1.0, 3.0, 3.0), 0..10);
        assert_eq!(w.last().unwrap(), &(3, vec![9], true, 0));
    }

    #[test]
    fn stride_longer_than_window_skips_frames() {
        // 1 fps, W=2, S=5: [0,2) [5,7) [10,12)...
        let (w, _) = run(spec(1.0, 2.0, 5.0), 0..12);
        assert_eq!(w, vec![(0, vec![0, 1], false, 0), (1, vec![5, 6], false, 0), (2, vec![10, 11], false, 0)]);
    }

    #[test]
    fn fractional_rates_and_strides() {
        // 0.5 fps (a frame every 2 s), W=6 s (3 frames), S=4 s (2 slots).
        let (w, _) = run(spec(0.5, 6.0, 4.0), 0..7);
        let idx: Vec<(u64, Vec<u64>)> = w.iter().map(|x| (x.0, x.1.clone())).collect();
        assert_eq!(idx, vec![(0, vec![0, 1, 2]), (1, vec![2, 3, 4]), (2, vec![4, 5, 6])]);
        // 10 fps, 0.3 s windows every 0.3 s: floating error must not shift slots.
        let sp = spec(10.0, 0.3, 0.3);
        for k in 0..1000 {
            assert_eq!(sp.start_slot(k), 3 * k);
            assert_eq!(sp.expected_frames(k), 3);
        }
    }

    #[test]
    fn gap_emit_keeps_real_timestamps() {
        // 1 fps, W=S=4; slots 5 and 6 lost in a reconnect.
        let (w, st) = run(spec(1.0, 4.0, 4.0), [0, 1, 2, 3, 4, 7, 8, 9, 10, 11, 12]);
        assert_eq!(w[1], (1, vec![4, 7], false, 2));
        assert_eq!(w[2], (2, vec![8, 9, 10, 11], false, 0));
        assert_eq!(st.windows_dropped_gap, 0);
    }

    #[test]
    fn gap_drop_policy_counts() {
        let sp = WindowSpec::new(1.0, 4.0, 4.0, GapPolicy::Drop).unwrap();
        let (w, st) = run(sp, [0, 1, 2, 3, 4, 7, 8, 9, 10, 11, 12]);
        let idx: Vec<u64> = w.iter().map(|x| x.0).collect();
        assert_eq!(idx, vec![0, 2, 3]);
        assert_eq!(st.windows_dropped_gap, 1);
    }

    #[test]
    fn long_gap_skips_empty_windows_without_iterating() {
        let (w, st) = run(spec(1.0, 2.0, 1.0), [0, 1, 2, 1_000_000_000, 1_000_000_001]);
        let idx: Vec<u64> = w.iter().map(|x| x.0).collect();
        // Windows 0 [0,2), 1 [1,3) complete; 2 [2,4) has a gap; then window 999999999 holds
        // [999999999, 1000000001) with a gap (first slot lost), and 1000000000 reaches the end.
        assert_eq!(idx, vec![0, 1, 2, 999_999_999, 1_000_000_000]);
        assert!(st.windows_empty > 999_999_000);
    }

    #[test]
    fn out_of_order_frames_are_ignored() {
        let (w, st) = run(spec(1.0, 2.0, 2.0), [0, 1, 1, 0, 2, 3]);
        assert_eq!(w.len(), 2);
        assert_eq!(st.frames_out_of_order, 2);
    }

    #[test]
    fn invalid_specs_are_errors() {
        assert!(WindowSpec::new(0.0, 1.0, 1.0, GapPolicy::Emit).is_err());
        assert!(WindowSpec::new(1.0, 0.5, 1.0, GapPolicy::Emit).is_err());
        assert!(WindowSpec::new(1.0, 1.0, 0.0, GapPolicy::Emit).is_err());
        assert!(WindowSpec::new(f64::NAN, 1.0, 1.0, GapPolicy::Emit).is_err());
    }

    fn dummy_window(seq: u64) -> Window {
        Window {
            stream: "t".into(),
            seq,
            index: seq,
            start_s: 0.0,
            end_s: 1.0,
            frames: vec![],
            expected_frames: 1,
            missing: 0,
            partial: false,
        }
    }

    #[test]
    fn queue_drops_oldest_and_counts() {
        let (tx, rx) = window_queue(3);
        for i in 0..10 {
            tx.push(dummy_window(i));
        }
        assert_eq!(rx.dropped(), 7);
        assert_eq!(rx.len(), 3);
        let got: Vec<u64> = std::iter::from_fn(|| rx.try_recv()).map(|w| w.seq).collect();
        assert_eq!(got, vec![7, 8, 9]);
        tx.close();
        assert!(rx.recv_timeout(Duration::from_millis(10)).is_none());
    }

    /// Poll a future to completion on this thread (the tests have no async runtime).
    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        struct Unpark(std::thread::Thread);
        impl std::task::Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = std::task::Context::from_waker(&waker);
        let mut f = std::pin::pin!(f);
        loop {
            if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
            std::thread::park_timeout(Duration::from_secs(5));
        }
    }

    #[test]
    fn async_recv_wakes_on_push_and_close() {
        let (tx, rx) = window_queue(2);
        let t = {
            let tx = tx.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                tx.push(dummy_window(7));
                std::thread::sleep(Duration::from_millis(50));
                tx.close();
            })
        };
        assert_eq!(block_on(rx.recv()).map(|w| w.seq), Some(7));
        assert!(block_on(rx.recv()).is_none(), "closed and drained");
        t.join().unwrap();
    }

    #[test]
    fn blocking_push_waits_for_room_and_stops() {
        let (tx, rx) = window_queue(1);
        let stop = Arc::new(AtomicBool::new(false));
        assert!(tx.push_blocking(dummy_window(0), &stop));
        let t = {
            let (tx, stop) = (tx.clone(), stop.clone());
            std::thread::spawn(move || tx.push_blocking(dummy_window(1), &stop))
        };
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(rx.recv_timeout(Duration::from_secs(1)).unwrap().seq, 0);
        assert!(t.join().unwrap());
        assert_eq!(rx.recv_timeout(Duration::from_secs(1)).unwrap().seq, 1);
        assert_eq!(rx.dropped(), 0);
        // A full queue and a stop request: the push gives up.
        tx.push(dummy_window(2));
        stop.store(true, Ordering::Relaxed);
        assert!(!tx.push_blocking(dummy_window(3), &stop));
    }
}
