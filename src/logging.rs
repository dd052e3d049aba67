//! `tracing` set-up shared by every command: logs go to stderr, `-v`/`-q` move the level.

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
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(format!("vigil={level},warn")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
