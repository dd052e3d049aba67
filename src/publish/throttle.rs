//! One report per burst: a key (what went wrong, and where) may report once per period; the
//! reports in between are counted, and the count goes out with the next report. Keeps a flood
//! of bad input from flooding the log and the `errors` topic.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Keys remembered at most; beyond it the quietest are forgotten (they report again at once).
const MAX_KEYS: usize = 256;

#[derive(Debug)]
pub struct Throttle {
    period: Duration,
    /// Per key: when it last reported, and how many it suppressed since.
    keys: HashMap<String, (Instant, u64)>,
}

impl Throttle {
    pub fn new(period: Duration) -> Throttle {
        Throttle { period, keys: HashMap::new() }
    }

    /// `Some(n)` if `key` may report now (`n` reports were suppressed since its last one),
    /// `None` if this one is suppressed and counted.
    pub fn admit(&mut self, key: &str, now: Instant) -> Option<u64> {
        if let Some((last, suppressed)) = self.keys.get_mut(key) {
            if now.duration_since(*last) < self.period {
                *suppressed += 1;
                return None;
            }
            let n = *suppressed;
            *last = now;
            *suppressed = 0;
            return Some(n);
        }
        if self.keys.len() >= MAX_KEYS {
            let period = self.period;
            self.keys.retain(|_, (last, _)| now.duration_since(*last) < period);
            if self.keys.len() >= MAX_KEYS {
                self.keys.clear();
            }
        }
        self.keys.insert(key.to_string(), (now, 0));
        Some(0)
    }
}

/// `message`, with the count of similar reports suppressed before it, if any.
pub fn with_suppressed(message: &str, suppressed: u64) -> String {
    match suppressed {
        0 => message.to_string(),
        n => format!("{message} ({n} similar not reported since the last report)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_report_per_period_with_the_count() {
        let mut t = Throttle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(t.admit("a", t0), Some(0));
        for i in 1..=500 {
            assert_eq!(t.admit("a", t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(t.admit("b", t0), Some(0), "keys are apart");
        assert_eq!(t.admit("a", t0 + Duration::from_secs(10)), Some(500));
        assert_eq!(t.admit("a", t0 + Duration::from_secs(11)), None);
        assert_eq!(with_suppressed("bad", 0), "bad");
        assert!(with_suppressed("bad", 3).contains("3 similar"));
    }

    #[test]
    fn keys_are_bounded() {
        let mut t = Throttle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        for i in 0..10_000 {
            t.admit(&format!("k{i}"), t0);
        }
        assert!(t.keys.len() <= MAX_KEYS);
    }
}
