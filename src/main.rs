//! The `vigil` command line: a thin layer over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgAction, Parser, Subcommand};
use vigil::config::{Config, ConfigError};

#[derive(Parser)]
#[command(name = "vigil", version, about = "Watches camera streams and answers questions about them (VideoLLaMA3 → MQTT)")]
struct Cli {
    /// More log output (-v debug, -vv trace). Logs go to stderr.
    #[arg(short, long, action = ArgAction::Count, global = true)]
    verbose: u8,
    /// Less log output (-q warnings only, -qq errors only).
    #[arg(short, long, action = ArgAction::Count, global = true)]
    quiet: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config file: exit 0 with a one-line summary, or 2 with file:line:col errors.
    Check {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Print a complete, commented example config (it passes `vigil check`).
    PrintConfig,
    /// Run the daemon: streams → windows → model → MQTT.
    Run {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Print answers as they arrive on MQTT (from a config's broker, or --broker URL).
    Tail {
        /// Config file whose [mqtt] section (broker, credentials, TLS, prefix) to use; or --broker.
        #[arg(short, long, value_name = "FILE", required_unless_present = "broker", conflicts_with = "broker")]
        config: Option<PathBuf>,
        /// Broker URL, e.g. mqtt://127.0.0.1:1883.
        #[arg(long, value_name = "URL")]
        broker: Option<String>,
        /// Topic prefix (default: the config's, else "vigil").
        #[arg(long, value_name = "P")]
        prefix: Option<String>,
        /// Print the raw JSON payloads, one per line.
        #[arg(long)]
        json: bool,
        /// Exit after N answers.
        #[arg(short = 'n', long, value_name = "N")]
        count: Option<usize>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    vigil::logging::init(cli.verbose as i8 - cli.quiet as i8);
    match cli.command {
        Command::Check { config } => check(&config),
        Command::PrintConfig => {
            print!("{}", vigil::config::EXAMPLE_CONFIG);
            ExitCode::SUCCESS
        }
        Command::Tail { config, broker, prefix, json, count } => tail(config, broker, prefix, json, count),
        Command::Run { config } => {
            // Validate first so `run` already reports config mistakes like `check` does.
            if let Err(code) = load(&config) {
                return code;
            }
            eprintln!("vigil run: the daemon is not implemented yet (it arrives with the daemon issue); nothing was started");
            ExitCode::FAILURE
        }
    }
}

fn tail(config: Option<PathBuf>, broker: Option<String>, prefix: Option<String>, json: bool, count: Option<usize>) -> ExitCode {
    let mut mqtt = match &config {
        Some(path) => match load(path) {
            Ok(cfg) => vigil::publish::connect::resolved(&cfg),
            Err(code) => return code,
        },
        None => vigil::config::MqttConfig { broker: broker.unwrap_or_default(), ..Default::default() },
    };
    if let Some(p) = prefix {
        mqtt.topic_prefix = p;
    }
    let opts = vigil::publish::tail::TailOptions { mqtt, json, count };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout();
    match rt.block_on(vigil::publish::tail::tail(opts, &mut out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Load a config, printing the errors and returning exit code 2 on failure.
fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    match Config::load(path) {
        Ok(cfg) => Ok(cfg),
        Err(e @ ConfigError::Read { .. }) => {
            eprintln!("error: {e}");
            Err(ExitCode::from(2))
        }
        Err(e) => {
            let n = e.problems().len();
            eprintln!("{e}");
            eprintln!("error: {} problem{} in {}", n, if n == 1 { "" } else { "s" }, path.display());
            Err(ExitCode::from(2))
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match load(path) {
        Ok(cfg) => {
            for w in cfg.warnings() {
                eprintln!("warning: {w}");
            }
            println!("{}: ok: {}", path.display(), cfg.summary());
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}
