//! `tracing` set-up shared by every command: logs go to stderr, `-v`/`-q` move the level.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Install the global subscriber. `verbosity` is `#-v − #-q`: 0 = info, 1 = debug, 2+ = trace,
/// -1 = warn, -2 and below = error. `RUST_LOG`, when set, wins.
pub fn init(verbosity: i8) {
    let level = match verbosity {
        i8::MIN..=-2 => "error",
        -1 => "warn",
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    // rumqttd (the embedded broker) logs every client that disconnects abruptly as an ERROR;
    // that is noise for vigil's users, so it is off unless RUST_LOG asks for it.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(format!("vigil={level},rumqttd=off,warn")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // No colour codes in journald or log files.
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}
