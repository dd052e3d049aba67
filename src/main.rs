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
    /// Show what a prompt costs: tokens, visual tokens before/after pruning, grids.
    Preprocess(PreprocessArgs),
}

#[derive(clap::Args)]
struct PreprocessArgs {
    /// Checkpoint directory (processor_config.json or preprocessor_config.json layout).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// The question, placed after the media in the user turn.
    #[arg(long)]
    prompt: String,
    /// An image file (repeatable; in the order given, before any video).
    #[arg(long = "image", value_name = "PATH")]
    images: Vec<PathBuf>,
    /// A video file, decoded with GStreamer.
    #[arg(long, value_name = "PATH")]
    video: Option<PathBuf>,
    /// With --video: sample this many frames per second. With --frames: their frame rate.
    #[arg(long, value_name = "F")]
    fps: Option<f64>,
    /// With --video: use at most N frames.
    #[arg(long, value_name = "N", requires = "video")]
    max_frames: Option<usize>,
    /// Already sampled frames of one clip (image files, in order).
    #[arg(long, value_name = "PATH", num_args = 1..)]
    frames: Vec<PathBuf>,
    /// Keep every video token (transformers' use_token_compression=False).
    #[arg(long)]
    no_pruning: bool,
    /// Print one JSON object instead of the summary.
    #[arg(long)]
    json: bool,
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
        Command::Run { config } => {
            // Validate first so `run` already reports config mistakes like `check` does.
            if let Err(code) = load(&config) {
                return code;
            }
            eprintln!("vigil run: the daemon is not implemented yet (it arrives with the daemon issue); nothing was started");
            ExitCode::FAILURE
        }
        Command::Preprocess(args) => preprocess(args),
    }
}

fn preprocess(a: PreprocessArgs) -> ExitCode {
    let req = vigil::processor::report::PreprocessRequest {
        model: a.model,
        prompt: a.prompt,
        images: a.images,
        video: a.video,
        fps: a.fps,
        max_frames: a.max_frames,
        frames: a.frames,
        pruning: vigil::config::PruningConfig { enabled: !a.no_pruning, ..Default::default() },
    };
    match vigil::processor::report::preprocess(&req) {
        Ok(r) if a.json => match serde_json::to_string(&r) {
            Ok(s) => {
                println!("{s}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Ok(r) => {
            print!("{}", r.human());
            ExitCode::SUCCESS
        }
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
