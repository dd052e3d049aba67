//! The `vigil` command line: a thin layer over the library.

// The library's errors carry their causes by value; built on cold paths only (see lib.rs).
#![allow(clippy::result_large_err)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgAction, Parser, Subcommand};
use vigil::config::{AttentionMode, Config, ConfigError, DType, Device};

#[derive(Parser)]
#[command(
    name = "vigil",
    version,
    about = "Watches camera streams and answers questions about them (VideoLLaMA3 → MQTT)"
)]
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
    /// Validate a config file and the model it names: exit 0 with a summary, or 2 with
    /// file:line:col errors and what is wrong with which model file.
    Check {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Skip the model (device, checkpoint files, context fit): for a config written on
        /// another host.
        #[arg(long)]
        no_model: bool,
    },
    /// Print a complete, commented example config (it passes `vigil check --no-model`).
    PrintConfig,
    /// Run the daemon: streams → windows → model → MQTT.
    Run {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Open a stream (rtsp://, http(s)://, file path, v4l2:///dev/videoN) and print its native
    /// caps and the first windows, to check a camera before configuring it.
    Probe(ProbeArgs),
    /// Print answers as they arrive on MQTT (from a config's broker, or --broker URL).
    Tail(TailArgs),
    /// Show what a prompt costs: tokens, visual tokens before/after pruning, grids.
    Preprocess(PreprocessArgs),
    /// Answer a prompt about images / a video with a VideoLLaMA3 checkpoint (or a JSONL batch).
    Infer(InferArgs),
    /// Benchmarks: `vigil bench --shape 2b --random-weights` (the model at real shapes; its
    /// --json feeds tests/reference/bench_transformers.py) and `vigil bench engine --model DIR`.
    Bench(BenchArgs),
}

#[derive(clap::Args)]
struct ProbeArgs {
    /// Stream URI or file path (credentials in it are never printed).
    uri: String,
    /// Frames per second to sample.
    #[arg(long, default_value_t = 1.0)]
    fps: f64,
    /// Window length in seconds.
    #[arg(long, default_value_t = 8.0)]
    window_seconds: f64,
    /// Seconds between window starts (less than the window: overlap).
    #[arg(long, default_value_t = 8.0)]
    stride_seconds: f64,
    /// Windows to print before stopping.
    #[arg(long, default_value_t = 3)]
    windows: usize,
    /// Seconds allowed to open the stream.
    #[arg(long, default_value_t = 10.0)]
    timeout_s: f64,
    /// Largest frame (pixels) after scaling, aspect kept.
    #[arg(long, default_value_t = 200_704)]
    max_frame_pixels: u64,
    /// One JSON object per line (caps, then each window).
    #[arg(long)]
    json: bool,
}

impl From<&ProbeArgs> for vigil::source::probe::ProbeOptions {
    fn from(a: &ProbeArgs) -> Self {
        Self {
            fps: a.fps,
            window_seconds: a.window_seconds,
            stride_seconds: a.stride_seconds,
            windows: a.windows,
            timeout: std::time::Duration::from_secs_f64(a.timeout_s.max(0.1)),
            max_frame_pixels: a.max_frame_pixels,
        }
    }
}

#[derive(clap::Args)]
struct TailArgs {
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
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct BenchArgs {
    #[command(subcommand)]
    command: Option<BenchCommand>,
    #[command(flatten)]
    shapes: BenchShapeArgs,
}

#[derive(clap::Args)]
struct BenchShapeArgs {
    /// Model shapes: 2b, 7b, or a VideoLLaMA3 config.json (needs --random-weights).
    #[arg(long, value_name = "2b|7b|CONFIG.json", conflicts_with = "model", requires = "random_weights")]
    shape: Option<String>,
    /// Draw random weights at --shape (performance does not depend on the values).
    #[arg(long)]
    random_weights: bool,
    /// Or an existing checkpoint directory (real weights, or one written by --save-weights).
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    #[command(flatten)]
    run_on: RunOnArgs,
    /// Concurrent streams for the serving measurement (a list measures each).
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    streams: Vec<usize>,
    /// Windows each stream submits per serving measurement.
    #[arg(long, default_value_t = 2)]
    windows: usize,
    /// Frames per window.
    #[arg(long, default_value_t = 16)]
    frames: usize,
    /// Frame size.
    #[arg(long, default_value = "448x448", value_parser = parse_size)]
    size: (u32, u32),
    /// Prompts per window.
    #[arg(long, default_value_t = 2)]
    prompts: usize,
    /// Tokens generated per prompt (EOS never stops a bench run).
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    #[arg(long)]
    no_pruning: bool,
    /// Fraction of each frame (left columns) that never changes.
    #[arg(long, default_value_t = 0.5)]
    static_fraction: f64,
    /// Keep the random checkpoint in DIR (re-used by later runs; the transformers peer loads it).
    #[arg(long, value_name = "DIR")]
    save_weights: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print the report as one JSON object (the peer's input) instead of the table.
    #[arg(long)]
    json: bool,
}

impl From<BenchShapeArgs> for vigil::bench::shapes::ShapeOptions {
    fn from(a: BenchShapeArgs) -> Self {
        Self {
            shape: a.shape,
            model: a.model,
            device: a.run_on.device,
            dtype: a.run_on.dtype,
            attention: a.run_on.attention,
            streams: a.streams,
            windows: a.windows,
            frames: a.frames,
            width: a.size.0,
            height: a.size.1,
            prompts: a.prompts,
            new_tokens: a.new_tokens,
            pruning: !a.no_pruning,
            static_fraction: a.static_fraction,
            save_weights: a.save_weights,
            seed: a.seed,
            ..Default::default()
        }
    }
}

fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(|| format!("{s:?}: expected WIDTHxHEIGHT"))?;
    let n = |v: &str| {
        v.trim().parse::<u32>().ok().filter(|&n| n >= 28).ok_or_else(|| format!("{s:?}: sizes are whole numbers >= 28"))
    };
    Ok((n(w)?, n(h)?))
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Windows/s for 1, 4, 8 streams x 2 prompts, engine optimisations on vs off (same run).
    Engine(BenchEngineArgs),
    /// The fused attention kernels: self-check, then time per layer against the reference path
    /// (vision 16 frames x 1024 patches, prefill 8 x 2300 tokens, decode batch 1 and 16 over
    /// 2400 keys).
    Attention(BenchAttentionArgs),
}

/// Where a command runs the model.
#[derive(clap::Args)]
struct RunOnArgs {
    /// cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Weights and activations: f32, f16 or bf16 (default: bf16 on a GPU, f32 on the CPU).
    #[arg(long)]
    dtype: Option<DType>,
    /// Attention kernels: auto, fused or reference (see `[model] attention`; on the CPU `fused`
    /// runs the kernels' plain-Rust twin).
    #[arg(long, default_value = "auto")]
    attention: AttentionMode,
}

impl RunOnArgs {
    fn dtype(&self) -> DType {
        self.dtype.unwrap_or(self.device.default_dtype())
    }
}

#[derive(clap::Args)]
struct BenchAttentionArgs {
    #[command(flatten)]
    run_on: RunOnArgs,
    /// Small shapes (a CPU dry run).
    #[arg(long)]
    tiny: bool,
    /// Timed calls per case and path.
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct BenchEngineArgs {
    /// Complete checkpoint directory (model + processor files).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    #[command(flatten)]
    run_on: RunOnArgs,
    /// Stream counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    streams: Vec<usize>,
    #[arg(long, default_value_t = 4)]
    windows_per_stream: usize,
    #[arg(long, default_value_t = 8)]
    frames_per_window: usize,
    /// Frames between window starts (less than --frames-per-window: overlap).
    #[arg(long, default_value_t = 4)]
    stride_frames: usize,
    #[arg(long, default_value_t = 160)]
    width: u32,
    #[arg(long, default_value_t = 120)]
    height: u32,
    #[arg(long, default_value_t = 16)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Print the rows as JSON lines instead of the table.
    #[arg(long)]
    json: bool,
}

impl From<BenchEngineArgs> for vigil::bench::engine::BenchOptions {
    fn from(a: BenchEngineArgs) -> Self {
        Self {
            device: a.run_on.device,
            dtype: a.run_on.dtype(),
            attention: a.run_on.attention,
            streams: a.streams,
            windows_per_stream: a.windows_per_stream,
            frames_per_window: a.frames_per_window,
            stride_frames: a.stride_frames,
            width: a.width,
            height: a.height,
            max_new_tokens: a.max_new_tokens,
            max_batch: a.max_batch,
            ..Self::new(a.model)
        }
    }
}

#[derive(clap::Args)]
struct PreprocessArgs {
    /// Checkpoint directory (processor_config.json or preprocessor_config.json layout).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// The question, placed after the media in the user turn.
    #[arg(long)]
    prompt: String,
    #[command(flatten)]
    media: MediaArgs,
    /// Print one JSON object instead of the summary.
    #[arg(long)]
    json: bool,
}

/// Media flags shared by `preprocess` and `infer` (same order and meaning).
#[derive(clap::Args)]
struct MediaArgs {
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
}

impl MediaArgs {
    fn request(self, model: PathBuf, prompt: String) -> vigil::processor::report::PromptRequest {
        vigil::processor::report::PromptRequest {
            model,
            prompt,
            images: self.images,
            video: self.video,
            fps: self.fps,
            max_frames: self.max_frames,
            frames: self.frames,
            pruning: vigil::config::PruningConfig { enabled: !self.no_pruning, ..Default::default() },
        }
    }
}

#[derive(clap::Args)]
struct InferArgs {
    /// Checkpoint directory (Hugging Face layout: config.json, safetensors, tokenizer, processor).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// The question, placed after the media in the user turn.
    #[arg(long, required_unless_present = "batch", conflicts_with = "batch")]
    prompt: Option<String>,
    #[command(flatten)]
    media: MediaArgs,
    /// Run every request of a JSONL file as one left-padded batch; one JSON line per request.
    #[arg(long, value_name = "FILE.jsonl")]
    batch: Option<PathBuf>,
    /// Most tokens to generate per request [default: generation_config.json's, else 128].
    #[arg(long, value_name = "N")]
    max_new_tokens: Option<usize>,
    /// Sample at this temperature instead of greedy decoding (0 = greedy).
    #[arg(long, value_name = "T")]
    temperature: Option<f64>,
    /// Seed for sampling.
    #[arg(long, value_name = "S", default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    run_on: RunOnArgs,
    /// Print one JSON object (per request) instead of streaming the answer.
    #[arg(long)]
    json: bool,
}

/// Why a command failed: its exit status and what it says on stderr.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    /// Exit 1: the command could not do its work.
    fn runtime(e: impl std::fmt::Display) -> Self {
        Failure { code: 1, message: format!("error: {e}") }
    }

    /// Exit 1 with `e` and its causes: each cause is added unless the message already says it
    /// (vigil's errors write their cause into their own message).
    fn error(e: &(dyn std::error::Error + 'static)) -> Self {
        let mut message = e.to_string();
        let mut cause = e.source();
        while let Some(c) = cause {
            let text = c.to_string();
            if !message.contains(&text) {
                message = format!("{message}: {text}");
            }
            cause = c.source();
        }
        Self::runtime(vigil::config::redact_uri(&message))
    }

    /// Exit 2: what the user gave (arguments, config, model files) is wrong; `message` is every
    /// line to print.
    fn invalid(message: String) -> Self {
        Failure { code: 2, message }
    }
}

fn main() -> ExitCode {
    // candle's CPU matmul looks its thread count up on every call, parsing /proc/cpuinfo unless
    // RAYON_NUM_THREADS is set (hundreds of times per decode step): resolve it once, here,
    // before any thread starts.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", candle_core::utils::get_num_threads().to_string());
    }
    let cli = Cli::parse();
    vigil::logging::init(cli.verbose as i8 - cli.quiet as i8);
    let result = match cli.command {
        Command::Check { config, no_model } => check(&config, !no_model),
        Command::PrintConfig => {
            print!("{}", vigil::config::EXAMPLE_CONFIG);
            Ok(())
        }
        Command::Tail(args) => tail(args),
        Command::Run { config } => run(&config),
        Command::Probe(args) => probe(&args),
        Command::Preprocess(args) => preprocess(args),
        Command::Infer(args) => run_infer(args).map_err(|e| Failure::error(e.as_ref())),
        Command::Bench(BenchArgs { command: None, shapes }) => bench_shapes(shapes),
        Command::Bench(BenchArgs { command: Some(BenchCommand::Engine(args)), .. }) => {
            let json = args.json;
            bench_engine(&args.into(), json)
        }
        Command::Bench(BenchArgs { command: Some(BenchCommand::Attention(args)), .. }) => bench_attention(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("{}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn bench_shapes(a: BenchShapeArgs) -> Result<(), Failure> {
    if a.shape.is_none() && a.model.is_none() {
        return Err(Failure::invalid(
            "error: vigil bench needs --shape 2b|7b|CONFIG.json --random-weights, or --model DIR (or the `engine` subcommand)".into(),
        ));
    }
    let json = a.json;
    let o = a.into();
    let started = std::time::Instant::now();
    let mut progress = |m: &str| eprintln!("[{:>6.1}s] {m}", started.elapsed().as_secs_f64());
    let r = vigil::bench::shapes::run(&o, &mut progress).map_err(|e| Failure::error(&e))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
    } else {
        print!("{}", vigil::bench::shapes::table(&r));
    }
    Ok(())
}

fn bench_attention(a: BenchAttentionArgs) -> Result<(), Failure> {
    let o = vigil::bench::attention::AttentionBenchOptions {
        device: a.run_on.device,
        dtype: a.run_on.dtype,
        attention: a.run_on.attention,
        tiny: a.tiny,
        iters: a.iters.max(1),
    };
    let r = vigil::bench::attention::run(&o).map_err(|e| Failure::error(&e))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
    } else {
        print!("{}", vigil::bench::attention::table(&r));
    }
    Ok(())
}

fn bench_engine(o: &vigil::bench::engine::BenchOptions, json: bool) -> Result<(), Failure> {
    let gated = o.streams.iter().copied().max().map(|n| vigil::bench::engine::run_gated(o, n.max(2)));
    let rows = vigil::bench::engine::run(o).map_err(|e| Failure::error(&e))?;
    if json {
        for r in &rows {
            println!("{}", serde_json::to_string(r).unwrap_or_default());
        }
    } else {
        print!("{}", vigil::bench::engine::table(o, &rows));
    }
    match gated {
        Some(Ok(g)) if json => println!("{}", serde_json::to_string(&g).unwrap_or_default()),
        Some(Ok(g)) => print!("{}", vigil::bench::engine::gate_line(&g)),
        Some(Err(e)) => eprintln!("warning: motion-gate bench: {e}"),
        None => {}
    }
    if rows.iter().any(|r| r.mismatches > 0) {
        return Err(Failure::runtime("optimised answers differ from the one-request path"));
    }
    Ok(())
}

fn probe(a: &ProbeArgs) -> Result<(), Failure> {
    use vigil::source::probe::{caps_line, probe, window_line, ProbeEvent};
    let opts = vigil::source::probe::ProbeOptions::from(a);
    vigil::window::WindowSpec::new(opts.fps, opts.window_seconds, opts.stride_seconds, vigil::config::GapPolicy::Emit)
        .map_err(|e| Failure::invalid(format!("error: {e}")))?;
    let summary = probe(&a.uri, &opts, |ev| match ev {
        ProbeEvent::Caps(c) => println!("{}", caps_line(c, opts.fps, a.json)),
        ProbeEvent::Window(w) => println!("{}", window_line(w, a.json)),
    })
    .map_err(|e| Failure::error(&e))?;
    if summary.ended_early {
        eprintln!("note: the stream ended after {} window(s)", summary.windows);
    }
    Ok(())
}

fn preprocess(a: PreprocessArgs) -> Result<(), Failure> {
    let req = a.media.request(a.model, a.prompt);
    let r = vigil::processor::report::preprocess(&req).map_err(|e| Failure::error(&e))?;
    if a.json {
        println!("{}", serde_json::to_string(&r).map_err(|e| Failure::error(&e))?);
    } else {
        print!("{}", r.human());
    }
    Ok(())
}

fn run_infer(a: InferArgs) -> anyhow::Result<()> {
    use std::io::Write;
    use vigil::model::{GenerationParams, Sampling};
    let pruning = vigil::config::PruningConfig { enabled: !a.media.no_pruning, ..Default::default() };
    let (requests, batch_mode) = match (&a.batch, a.prompt) {
        (Some(file), _) => {
            let m = &a.media;
            if !m.images.is_empty() || m.video.is_some() || !m.frames.is_empty() || m.fps.is_some() {
                anyhow::bail!("--batch takes the media from the file; drop --image/--video/--frames/--fps");
            }
            (vigil::infer::read_batch(file, &a.model)?, true)
        }
        (None, Some(prompt)) => (vec![a.media.request(a.model.clone(), prompt)], false),
        (None, None) => anyhow::bail!("--prompt or --batch is required"),
    };
    let device = vigil::infer::open_device(a.run_on.device)?;
    let dtype = vigil::model::load::candle_dtype(a.run_on.dtype());
    let t0 = std::time::Instant::now();
    let processor = vigil::processor::Processor::from_pretrained(&a.model)?;
    let model = vigil::model::VideoLlama3ForConditionalGeneration::from_pretrained(&a.model, dtype, &device)?;
    let shapes = vigil::model::fused::CheckShapes::of(model.config());
    vigil::model::fused::configure(a.run_on.attention, &device, dtype, &shapes);
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let max_new_tokens = a.max_new_tokens.or(model.generation_defaults().max_new_tokens).unwrap_or(128);
    let mut generation = GenerationParams::greedy(max_new_tokens);
    if let Some(t) = a.temperature.filter(|&t| t > 0.0) {
        generation.sampling = Sampling::Sample { temperature: t, top_k: None, top_p: None, seed: a.seed };
    }
    let opts = vigil::infer::InferOptions { generation, pruning };
    let stream = !a.json && !batch_mode;
    let mut stdout = std::io::stdout();
    let out = vigil::infer::infer(&model, &processor, &requests, &opts, &mut |_, delta| {
        if stream {
            let _ = write!(stdout, "{delta}");
            let _ = stdout.flush();
        }
    })?;
    if stream {
        println!();
        let r = &out.results[0];
        eprintln!(
            "{} prompt tokens ({} of {} video tokens kept), {} generated; load {:.0} ms, vision {:.0} ms, prefill {:.0} ms, decode {:.0} ms ({:.1} tokens/s)",
            r.prompt_tokens, r.video_tokens_kept, r.video_tokens_total, r.token_ids.len(), load_ms, out.vision_ms, out.prefill_ms, out.decode_ms, out.tokens_per_s
        );
        return Ok(());
    }
    for (i, r) in out.results.iter().enumerate() {
        let mut v = serde_json::to_value(r)?;
        let obj = v.as_object_mut().expect("a struct serialises to an object");
        if batch_mode {
            obj.insert("index".into(), i.into());
        }
        for (k, x) in [
            ("load_ms", load_ms),
            ("preprocess_ms", out.preprocess_ms),
            ("vision_ms", out.vision_ms),
            ("prefill_ms", out.prefill_ms),
            ("decode_ms", out.decode_ms),
            ("tokens_per_s", out.tokens_per_s),
        ] {
            obj.insert(k.into(), x.into());
        }
        println!("{}", serde_json::to_string(&v)?);
    }
    Ok(())
}

fn tail(a: TailArgs) -> Result<(), Failure> {
    let mut mqtt = match &a.config {
        Some(path) => vigil::publish::connect::resolved(&load(path)?),
        None => vigil::config::MqttConfig { broker: a.broker.unwrap_or_default(), ..Default::default() },
    };
    if let Some(p) = a.prefix {
        mqtt.topic_prefix = p;
    }
    let opts = vigil::publish::tail::TailOptions { mqtt, json: a.json, count: a.count };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime(format!("cannot start the async runtime: {e}")))?;
    let mut out = std::io::stdout();
    rt.block_on(vigil::publish::tail::tail(opts, &mut out)).map_err(|e| Failure::error(&e))
}

/// `vigil run`: the daemon until SIGTERM/SIGINT (exit 0); SIGHUP reloads the config.
fn run(path: &std::path::Path) -> Result<(), Failure> {
    // Validate first so config mistakes exit 2 with the same messages as `check`.
    load(path)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("vigil")
        .build()
        .map_err(|e| Failure::runtime(format!("cannot start the async runtime: {e}")))?;
    let result = rt.block_on(async {
        let controls = vigil::daemon::signal_controls()?;
        vigil::daemon::run(path, controls).await.map_err(anyhow::Error::from)
    });
    // Pipelines and the embedded broker own threads of their own: do not wait for them.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    result.map_err(|e| Failure::error(e.as_ref()))
}

/// Load a config; its problems (exit 2) on failure.
fn load(path: &std::path::Path) -> Result<Config, Failure> {
    Config::load(path).map_err(|e| match e {
        e @ ConfigError::Read { .. } => Failure::invalid(format!("error: {e}")),
        e => {
            let n = e.problems().len();
            Failure::invalid(format!(
                "{e}\nerror: {} problem{} in {}",
                n,
                if n == 1 { "" } else { "s" },
                path.display()
            ))
        }
    })
}

fn check(path: &std::path::Path, with_model: bool) -> Result<(), Failure> {
    let cfg = load(path)?;
    for w in cfg.warnings() {
        eprintln!("warning: {w}");
    }
    println!("{}: ok: {}", path.display(), cfg.summary());
    if !with_model {
        return Ok(());
    }
    use vigil::engine::preflight::{preflight, PreflightError};
    match preflight(&cfg) {
        Ok(p) => {
            let context = p.context.map(|c| format!(" of {c}")).unwrap_or_default();
            let largest = match &p.largest {
                Some((s, q, t)) => format!("; largest request {t}{context} tokens (stream {s:?}, prompt {q:?})"),
                None => String::new(),
            };
            println!("{}: model ok: {}{largest}", path.display(), p.dir.display());
            Ok(())
        }
        // A Hub model not downloaded yet: `run` fetches it, so there is nothing to check.
        Err(e) if cfg!(feature = "hub") && cfg.model.repo.is_some() && matches!(e[..], [PreflightError::Dir(_)]) => {
            eprintln!(
                "warning: model.repo {:?} is not in the Hugging Face cache yet; `run` downloads it (not checked)",
                cfg.model.repo.as_deref().unwrap_or("")
            );
            Ok(())
        }
        Err(problems) => {
            let mut lines: Vec<String> = problems
                .iter()
                .map(|p| format!("{}: model: {}", path.display(), vigil::config::redact_uri(&p.to_string())))
                .collect();
            lines.push(format!(
                "error: the model cannot run ({} problem{}); `--no-model` skips this check",
                problems.len(),
                if problems.len() == 1 { "" } else { "s" }
            ));
            Err(Failure::invalid(lines.join("\n")))
        }
    }
}
