//! Fault injection for the tests of the real binary: `VIGIL_FAULT` names faults to arm, so a
//! test can wedge a part of a running daemon and check that liveness notices. Unset (as it is
//! outside tests), every check is a read of a value parsed once.
//!
//! Faults (comma-separated):
//! - `publisher-stall@S`: S seconds after the MQTT publisher starts, its event loop blocks its
//!   thread at the next event, as a deadlocked lock would.

use std::sync::OnceLock;
use std::time::Duration;

/// The environment variable read once at the first check.
pub const VAR: &str = "VIGIL_FAULT";

#[derive(Debug, Default, Clone, PartialEq)]
struct Faults {
    publisher_stall: Option<Duration>,
}

fn parse(spec: &str) -> Faults {
    let mut f = Faults::default();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item.split_once('@') {
            Some(("publisher-stall", s)) => {
                match s.parse::<f64>().ok().and_then(|s| Duration::try_from_secs_f64(s).ok()) {
                    Some(d) => f.publisher_stall = Some(d),
                    None => tracing::warn!("{VAR}: {item:?}: expected publisher-stall@<seconds>"),
                }
            }
            _ => tracing::warn!("{VAR}: unknown fault {item:?}"),
        }
    }
    f
}

fn armed() -> &'static Faults {
    static FAULTS: OnceLock<Faults> = OnceLock::new();
    FAULTS.get_or_init(|| {
        let f = std::env::var(VAR).map(|s| parse(&s)).unwrap_or_default();
        if f != Faults::default() {
            tracing::warn!("{VAR}: fault injection armed: {f:?}");
        }
        f
    })
}

/// When the publisher's event loop should wedge, counted from its start.
pub fn publisher_stall() -> Option<Duration> {
    armed().publisher_stall
}

/// Block the calling thread for good (an injected fault).
pub fn block_forever(what: &str) -> ! {
    tracing::warn!("{VAR}: {what} wedged on purpose");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_faults_and_ignores_the_rest() {
        assert_eq!(parse("publisher-stall@2.5").publisher_stall, Some(Duration::from_millis(2500)));
        assert_eq!(parse(" , nonsense, publisher-stall@x").publisher_stall, None);
        assert_eq!(parse(""), Faults::default());
    }
}
