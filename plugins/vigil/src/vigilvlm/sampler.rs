//! Frames at `fps` from a stream at any rate: slot `k` of the grid (stream time `k / fps`) takes
//! the input frame nearest to it, as `videorate` does in the daemon's pipeline, so a 30 fps
//! camera sampled at 1 fps gives the frames at 0 s, 1 s, 2 s… A slot farther than `max_gap_s`
//! from any frame stays empty (a gap in the window, as the daemon's `max-duplication-time`),
//! so a stream that jumps ahead never fills its hole with copies of one frame.
//!
//! Generic over the frame (the element keeps a `gst::Buffer` reference and converts only the
//! frames it picks).

/// Tolerance for grid arithmetic (`0.1 × 3 = 0.30000000000000004`).
const EPS: f64 = 1e-6;

pub struct Sampler<T> {
    fps: f64,
    max_gap_s: f64,
    /// The last frame seen, with its stream time.
    prev: Option<(f64, T)>,
    /// The next slot to fill.
    next: Option<u64>,
}

impl<T: Clone> Sampler<T> {
    pub fn new(fps: f64, max_gap_s: f64) -> Self {
        Sampler { fps, max_gap_s, prev: None, next: None }
    }

    fn time(&self, slot: u64) -> f64 {
        slot as f64 / self.fps
    }

    /// A frame at stream time `t` seconds; returns the slots it (or the frame before it) fills,
    /// in order. Frames that go back in time are ignored (a new segment calls [`Sampler::reset`]).
    pub fn push(&mut self, t: f64, frame: T) -> Vec<(u64, T)> {
        if !t.is_finite() || t < 0.0 {
            return Vec::new();
        }
        if self.prev.as_ref().is_some_and(|(pt, _)| t < *pt) {
            return Vec::new();
        }
        // The first frame fills the slots up to half a slot before it.
        let mut next = self.next.unwrap_or_else(|| (t * self.fps - 0.5 + EPS).ceil().max(0.0) as u64);
        let mut out = Vec::new();
        while self.time(next) <= t + EPS {
            let at = self.time(next);
            let (dist, f) = match &self.prev {
                Some((pt, pf)) if at - pt < t - at - EPS => (at - pt, pf),
                _ => (t - at, &frame),
            };
            if dist <= self.max_gap_s + EPS {
                out.push((next, f.clone()));
                next += 1;
            } else {
                // Out of both frames' reach: skip the gap in one step.
                next = (next + 1).max(((t - self.max_gap_s) * self.fps - EPS).ceil().max(0.0) as u64);
            }
        }
        self.next = Some(next);
        self.prev = Some((t, frame));
        out
    }

    /// Forget the stream so far (a new segment: a seek, a restart).
    pub fn reset(&mut self) {
        self.prev = None;
        self.next = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(fps: f64, times: &[f64]) -> Vec<(u64, usize)> {
        let mut s = Sampler::new(fps, 10.0);
        times.iter().enumerate().flat_map(|(i, &t)| s.push(t, i)).collect()
    }

    #[test]
    fn same_rate_takes_every_frame_once() {
        assert_eq!(run(2.0, &[0.0, 0.5, 1.0, 1.5]), vec![(0, 0), (1, 1), (2, 2), (3, 3)]);
    }

    #[test]
    fn a_faster_stream_gives_the_frame_nearest_each_slot() {
        // 30 fps → 1 fps: slot k takes frame 30k, not the first frame past the half-way point.
        let times: Vec<f64> = (0..95).map(|i| i as f64 / 30.0).collect();
        assert_eq!(run(1.0, &times), vec![(0, 0), (1, 30), (2, 60), (3, 90)]);
    }

    #[test]
    fn a_slower_stream_repeats_frames_like_videorate() {
        // 1 fps → 2 fps: slot 1 (0.5 s) is as near to frame 0 as to frame 1; the later wins.
        assert_eq!(run(2.0, &[0.0, 1.0, 2.0]), vec![(0, 0), (1, 1), (2, 1), (3, 2), (4, 2)]);
    }

    #[test]
    fn a_jump_leaves_a_gap_instead_of_copies() {
        let mut s = Sampler::new(1.0, 2.0);
        let mut got: Vec<u64> = s.push(0.0, ()).into_iter().map(|(k, _)| k).collect();
        got.extend(s.push(1.0, ()).into_iter().map(|(k, _)| k));
        got.extend(s.push(3600.0, ()).into_iter().map(|(k, _)| k));
        got.extend(s.push(3601.0, ()).into_iter().map(|(k, _)| k));
        // 2 and 3 are within reach of the frame at 1 s; 3598..=3600 within reach of 3600 s.
        assert_eq!(got, vec![0, 1, 2, 3, 3598, 3599, 3600, 3601]);
    }

    #[test]
    fn a_late_start_begins_at_the_nearest_slot_and_time_never_goes_back() {
        assert_eq!(run(1.0, &[3.27, 3.6, 4.1, 2.0, 5.0]), vec![(3, 0), (4, 2), (5, 4)]);
    }

    #[test]
    fn reset_starts_over() {
        let mut s = Sampler::new(1.0, 10.0);
        assert_eq!(s.push(5.0, 0).len(), 1);
        s.reset();
        assert_eq!(s.push(1.0, 1), vec![(1, 1)]);
    }
}
