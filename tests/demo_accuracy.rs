//! The demo model on content, end to end: clips generated here with GStreamer (ball colours,
//! frame sizes, frame rates and motions the model was not trained on exactly, half of them
//! frozen) → the real `vigil run` with `config/demo.toml`'s model and prompts → a real
//! mosquitto → answers. Each question must be answered right for at least 95 % of the clips;
//! a clip whose red and blue channels are swapped must flip the colour answer (so a BGR-as-RGB
//! bug would fail this test); `vigil infer --video` must give the daemon's answers on the same
//! clips; and the bundled demo clip gets the answers the README shows.
//!
//! `cargo test --locked --test demo_accuracy -- --nocapture` prints every clip's answers and the
//! accuracy per question.

mod common;
mod daemon_util;
mod source_util;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Mosquitto, Sub};
use daemon_util::{log_text, repo, spawn_vigil, stop_cleanly};

const COLORS: [&str; 5] = ["red", "green", "blue", "yellow", "white"];

/// One generated clip: exactly one window long, so the daemon's first window is the whole clip.
struct Clip {
    name: String,
    path: PathBuf,
    /// How it was made (gst-launch description) and sampled.
    how: String,
    color: &'static str,
    moving: bool,
    /// Sampling rate and window length the stream is configured with.
    fps: u32,
    frames: u32,
}

/// How a clip is made.
#[derive(Clone, Copy)]
struct Make {
    color: &'static str,
    /// Ball colour (ARGB) and background.
    fg: u32,
    bg: u32,
    /// `wavy`, `sweep` or `hsweep`; a frozen clip holds the first frame of that animation.
    motion: &'static str,
    frozen: bool,
    size: (u32, u32),
    rate: u32,
    /// Sampling rate of the stream and frames per window (the clip's whole length).
    fps: u32,
    frames: u32,
    /// H.264 in MP4 (else raw RGB in Matroska, lossless).
    h264: bool,
}

#[allow(clippy::too_many_arguments)]
const fn mk(
    color: &'static str,
    fg: u32,
    bg: u32,
    motion: &'static str,
    frozen: bool,
    w: u32,
    h: u32,
    rate: u32,
    fps: u32,
    frames: u32,
    h264: bool,
) -> Make {
    Make { color, fg, bg, motion, frozen, size: (w, h), rate, fps, frames, h264 }
}

/// The evaluation clips: every colour moving and frozen, off-primary shades, three animations,
/// sizes from 160×120 to 640×480, 6–30 fps sampled at 1 or 2 fps into windows of 2–8 frames.
const CLIPS: [Make; 24] = [
    mk("red", 0xffe8281c, 0xff000000, "wavy", false, 176, 144, 15, 1, 3, true),
    mk("green", 0xff30e040, 0xff101830, "sweep", false, 320, 240, 12, 2, 4, false),
    mk("blue", 0xff2038f0, 0xff302010, "hsweep", false, 480, 360, 24, 2, 6, true),
    mk("yellow", 0xfff0e030, 0xff000000, "wavy", false, 640, 480, 25, 1, 4, true),
    mk("white", 0xffeeeeee, 0xff203040, "sweep", false, 200, 150, 6, 1, 4, false),
    mk("red", 0xffff4030, 0xff282828, "hsweep", false, 352, 288, 30, 2, 4, true),
    mk("green", 0xff10f810, 0xff000000, "wavy", false, 424, 240, 20, 2, 8, true),
    mk("blue", 0xff0000ff, 0xff101010, "sweep", false, 256, 256, 8, 1, 3, true),
    mk("yellow", 0xffffff00, 0xff302050, "hsweep", false, 160, 120, 10, 1, 2, false),
    mk("white", 0xffffffff, 0xff000040, "wavy", false, 560, 420, 28, 2, 6, false),
    mk("red", 0xffd01010, 0xff402020, "sweep", false, 600, 336, 18, 1, 4, true),
    mk("blue", 0xff3030e0, 0xff000000, "wavy", false, 288, 216, 16, 2, 4, false),
    mk("red", 0xfff02828, 0xff000000, "wavy", true, 320, 240, 10, 1, 3, true),
    mk("green", 0xff20d030, 0xff202020, "sweep", true, 176, 144, 14, 2, 4, false),
    mk("blue", 0xff1840e8, 0xff001830, "hsweep", true, 640, 480, 30, 1, 4, true),
    mk("yellow", 0xffe8e820, 0xff101010, "wavy", true, 400, 300, 12, 2, 6, false),
    mk("white", 0xfff4f4f0, 0xff000000, "sweep", true, 240, 180, 20, 1, 2, true),
    mk("red", 0xffff2000, 0xff303030, "hsweep", true, 512, 384, 24, 2, 8, true),
    mk("green", 0xff00ff00, 0xff000000, "wavy", true, 208, 160, 6, 1, 4, true),
    mk("blue", 0xff0000ff, 0xff282010, "sweep", true, 360, 240, 15, 1, 3, false),
    mk("yellow", 0xfff8d818, 0xff000030, "hsweep", true, 448, 336, 18, 2, 4, true),
    mk("white", 0xffe0e0e0, 0xff302030, "wavy", true, 160, 160, 8, 2, 8, false),
    mk("red", 0xffe03020, 0xff000000, "sweep", true, 464, 264, 26, 2, 6, false),
    mk("yellow", 0xfff0f040, 0xff000000, "sweep", false, 304, 228, 22, 2, 8, true),
];

/// More evaluation clips, drawn with a fixed seed from the same world: a shade of each colour
/// in turn (strong channels 185–255, weak ones 0–70; white 200–255), black or a dark background, any
/// animation, moving or frozen in turn, 160×120 to 640×480, 5–30 fps sampled at 1 or 2 fps into
/// windows of 2–8 frames, H.264 or raw.
fn random_clips(n: usize, seed: u64) -> Vec<Make> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n)
        .map(|i| {
            let color = COLORS[i % COLORS.len()];
            let (hi, lo) = (rng.u32(185..=255), rng.u32(0..=70));
            let (r, g, b) = match color {
                "red" => (hi, lo, rng.u32(0..=70)),
                "green" => (lo, hi, rng.u32(0..=70)),
                "blue" => (lo, rng.u32(0..=70), hi),
                "yellow" => (hi, rng.u32(185..=255), lo),
                _ => (rng.u32(200..=255), rng.u32(200..=255), rng.u32(200..=255)),
            };
            let bg = if rng.bool() { 0 } else { rng.u32(0..=90) << 16 | rng.u32(0..=90) << 8 | rng.u32(0..=90) };
            let (w, h) = loop {
                let (w, h) = (4 * rng.u32(40..=160), 4 * rng.u32(30..=120));
                if (0.5..=2.0).contains(&(w as f64 / h as f64)) {
                    break (w, h);
                }
            };
            let fps = rng.u32(1..=2);
            Make {
                color,
                fg: 0xff000000 | r << 16 | g << 8 | b,
                bg: 0xff000000 | bg,
                motion: ["wavy", "sweep", "hsweep"][rng.usize(0..3)],
                frozen: i % 2 == 1,
                size: (w, h),
                rate: fps * rng.u32(5_u32.div_ceil(fps)..=30 / fps),
                fps,
                frames: rng.u32(2..=8),
                h264: rng.bool(),
            }
        })
        .collect()
}

/// The gst-launch description (without its sink) of a clip; `bgr` reinterprets the RGB frames
/// as BGR, swapping the red and blue channels the way a wrong channel order would (the width
/// must be a multiple of 4: rows of RGB are then unpadded).
fn describe(m: &Make, bgr: bool) -> String {
    let (w, h) = m.size;
    // The source frame rate is a multiple of the sampling rate, so that `vigil infer --fps`
    // samples the very frames the daemon's videorate keeps.
    assert_eq!(m.rate % m.fps, 0);
    let frames = m.rate * m.frames / m.fps;
    let src = format!(
        "videotestsrc pattern=ball motion={} foreground-color={:#x} background-color={:#x}",
        m.motion, m.fg, m.bg
    );
    let src = if m.frozen {
        format!("{src} num-buffers=1 ! imagefreeze num-buffers={frames}")
    } else {
        format!("{src} num-buffers={frames}")
    };
    let swap = if bgr {
        format!(" ! rawvideoparse format=bgr width={w} height={h} framerate={}/1", m.rate)
    } else {
        String::new()
    };
    let raw = format!("{src} ! video/x-raw,format=RGB,width={w},height={h},framerate={}/1{swap}", m.rate);
    if m.h264 {
        format!("{raw} ! videoconvert ! video/x-raw,format=I420 ! x264enc speed-preset=veryfast key-int-max={} ! h264parse ! mp4mux", m.rate)
    } else {
        format!("{raw} ! videoconvert ! video/x-raw,format=RGB ! matroskamux")
    }
}

fn make(dir: &Path, name: &str, m: &Make, bgr: bool) -> Clip {
    let ext = if m.h264 { "mp4" } else { "mkv" };
    let desc = describe(m, bgr);
    let path = source_util::clip(dir, &format!("{name}.{ext}"), &desc);
    let how = format!("{desc}, sampled at {} fps into {} frames", m.fps, m.frames);
    Clip { name: name.to_string(), path, how, color: m.color, moving: !m.frozen, fps: m.fps, frames: m.frames }
}

/// `config/demo.toml` — its model, prompts and demo stream — pointed at the test broker, with
/// the files played once as fast as the model takes them, plus one stream per clip.
fn config(dir: &Path, broker_port: u16, clips: &[Clip]) -> PathBuf {
    let demo = repo("config");
    let mut cfg: toml::Table = std::fs::read_to_string(demo.join("demo.toml")).unwrap().parse().unwrap();
    let abs = |v: &toml::Value| toml::Value::String(demo.join(v.as_str().unwrap()).to_string_lossy().into_owned());
    let model = cfg["model"].as_table_mut().unwrap();
    model["path"] = abs(&model["path"]);
    let mut mqtt = toml::Table::new();
    mqtt.insert("broker".into(), format!("mqtt://127.0.0.1:{broker_port}").into());
    mqtt.insert("client_id".into(), "vigil-accuracy".into());
    mqtt.insert("keepalive_s".into(), 5.into());
    cfg.insert("mqtt".into(), mqtt.into());
    let mut metrics = toml::Table::new();
    metrics.insert("listen".into(), "".into());
    cfg.insert("metrics".into(), metrics.into());
    let streams = cfg["stream"].as_array_mut().unwrap();
    assert_eq!(streams.len(), 1, "the demo has one stream");
    let s = streams[0].as_table_mut().unwrap();
    s["uri"] = abs(&s["uri"]);
    s.insert("loop".into(), false.into());
    s.insert("realtime".into(), false.into());
    let prompts: Vec<toml::Value> = cfg["prompt"].as_array().unwrap().iter().map(|p| p["name"].clone()).collect();
    for c in clips {
        let mut t = toml::Table::new();
        t.insert("name".into(), c.name.clone().into());
        t.insert("uri".into(), c.path.to_string_lossy().into_owned().into());
        t.insert("prompts".into(), prompts.clone().into());
        t.insert("fps".into(), (c.fps as f64).into());
        let seconds = c.frames as f64 / c.fps as f64;
        t.insert("window_seconds".into(), seconds.into());
        t.insert("stride_seconds".into(), seconds.into());
        t.insert("realtime".into(), false.into());
        cfg["stream"].as_array_mut().unwrap().push(t.into());
    }
    let path = dir.join("vigil.toml");
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    path
}

/// The demo's two prompts, by the question they ask: (name of the colour prompt, of the moving one).
fn demo_prompts() -> (String, String) {
    let cfg = vigil::Config::load(&repo("config/demo.toml")).unwrap();
    let by_text =
        |t: &str| cfg.prompts.iter().find(|p| p.text == t).unwrap_or_else(|| panic!("config/demo.toml asks no {t:?}"));
    let color = by_text("What color is the ball?");
    let moving = by_text("Is the ball moving?");
    assert_eq!(moving.kind, vigil::config::PromptKind::Alert, "the moving prompt is an alert");
    assert_eq!(moving.event_policy().clear_windows, 1, "a frozen window ends the event at once");
    (color.name.clone(), moving.name.clone())
}

struct Answer {
    text: String,
    /// The daemon's parsed value (alert prompts: a bool).
    value: serde_json::Value,
    /// Video tokens kept after pruning, and before.
    kept: u64,
    total: u64,
}

/// vigil infer --video on one clip and question.
fn infer(clip: &Clip, question: &str) -> Answer {
    let model = repo("models/tiny-videollama3");
    let fps = clip.fps.to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["-q", "infer", "--model", model.to_str().unwrap(), "--video", clip.path.to_str().unwrap()])
        .args(["--fps", &fps, "--max-new-tokens", "8", "--json", "--prompt", question])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}: {}", clip.name, String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    Answer {
        text: v["text"].as_str().unwrap().to_string(),
        value: serde_json::Value::Null,
        kept: v["video_tokens_kept"].as_u64().unwrap(),
        total: v["video_tokens_total"].as_u64().unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_model_answers_what_it_sees() {
    let started = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let (color_prompt, moving_prompt) = demo_prompts();
    let makes: Vec<Make> = CLIPS.into_iter().chain(random_clips(24, 7)).collect();
    let mut clips: Vec<Clip> =
        makes.iter().enumerate().map(|(i, m)| make(dir.path(), &format!("c{i:02}"), m, false)).collect();
    // The channel-swap pair: a red and a blue ball, as made and with red and blue swapped.
    let red = mk("red", 0xffe82818, 0xff000000, "wavy", false, 320, 240, 10, 1, 3, true);
    let blue = mk("blue", 0xff1828e8, 0xff000000, "sweep", true, 320, 240, 10, 1, 3, false);
    clips.extend([make(dir.path(), "red", &red, false), make(dir.path(), "blue", &blue, false)]);
    let evaluated = clips.len();
    clips.extend([make(dir.path(), "red-as-bgr", &red, true), make(dir.path(), "blue-as-bgr", &blue, true)]);
    eprintln!("{} clips generated in {:?}", clips.len(), started.elapsed());

    let broker = Mosquitto::start(dir.path(), "");
    let cfg = config(dir.path(), broker.port, &clips);
    let mut sub = Sub::connect(broker.port, "accuracy-sub", &["vigil/+/+", "vigil/demo/+/event"], false).await;
    let log = dir.path().join("vigil.log");
    let mut vigil = spawn_vigil(&cfg, &log);

    // First-window answers of every clip (a clip's trailing partial window is ignored), and
    // the demo stream's three windows and its moving prompt's events.
    let mut got: HashMap<(String, String), Answer> = HashMap::new();
    let mut demo: HashMap<(u64, String), Answer> = HashMap::new();
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    while got.len() < 2 * clips.len() || demo.len() < 6 || events.len() < 3 {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(m) = sub.next(left).await else {
            panic!(
                "{} of {} clip answers, {} of 6 demo answers, {} events; log:\n{}",
                got.len(),
                2 * clips.len(),
                demo.len(),
                events.len(),
                log_text(&log)
            );
        };
        let parts: Vec<&str> = m.topic.split('/').collect();
        if parts.len() == 4 && parts[3] == "event" {
            events.push(m.json());
            continue;
        }
        if parts.len() != 3 || (parts[2] != color_prompt && parts[2] != moving_prompt) {
            continue;
        }
        let a = m.json();
        let answer = Answer {
            text: a["answer"].as_str().unwrap().to_string(),
            value: a["value"].clone(),
            kept: a["visual_tokens"]["kept"].as_u64().unwrap(),
            total: a["visual_tokens"]["total"].as_u64().unwrap(),
        };
        let seq = a["window"]["seq"].as_u64().unwrap();
        let key = (parts[1].to_string(), parts[2].to_string());
        if parts[1] == "demo" {
            demo.insert((seq, parts[2].to_string()), answer);
        } else if seq == 0 {
            let clip = clips.iter().find(|c| c.name == parts[1]).unwrap();
            assert_eq!(
                a["window"]["frames"].as_u64(),
                Some(clip.frames as u64),
                "{}: the whole clip is one window: {a}",
                clip.name
            );
            got.insert(key, answer);
        }
    }
    stop_cleanly(&mut vigil, &log);
    eprintln!("daemon answered in {:?}", started.elapsed());

    // Accuracy per question over the evaluation clips.
    let mut right = [0usize; 2];
    for c in &clips[..evaluated] {
        let color = &got[&(c.name.clone(), color_prompt.clone())];
        let moving = &got[&(c.name.clone(), moving_prompt.clone())];
        let want_moving = if c.moving { "yes" } else { "no" };
        right[0] += (color.text == c.color) as usize;
        right[1] += (moving.text == want_moving) as usize;
        eprintln!(
            "{:<12} want {:<6} {:<3}  got {:<8} {:<4} {}",
            c.name,
            c.color,
            want_moving,
            color.text,
            moving.text,
            if color.text == c.color && moving.text == want_moving {
                String::new()
            } else {
                format!("WRONG: {}", c.how)
            }
        );
    }
    // Every answer is one of the model's words (clean text, no U+FFFD from a cut character).
    for c in &clips {
        let color = &got[&(c.name.clone(), color_prompt.clone())];
        let moving = &got[&(c.name.clone(), moving_prompt.clone())];
        assert!(COLORS.contains(&color.text.as_str()), "{}: {:?}", c.name, color.text);
        assert!(["yes", "no"].contains(&moving.text.as_str()), "{}: {:?}", c.name, moving.text);
        assert_eq!(
            moving.value,
            serde_json::json!(moving.text == "yes"),
            "{}: the alert's value follows its answer",
            c.name
        );
    }
    let accuracy = right.map(|r| r as f64 / evaluated as f64);
    eprintln!(
        "accuracy over {evaluated} clips: \"What color is the ball?\" {:.1} %, \"Is the ball moving?\" {:.1} %",
        100.0 * accuracy[0],
        100.0 * accuracy[1]
    );
    assert!(accuracy[0] >= 0.95 && accuracy[1] >= 0.95, "accuracy below 95 %: {accuracy:?}");

    // Red and blue swapped: the colour answer flips.
    let color_of = |name: &str| got[&(name.to_string(), color_prompt.clone())].text.clone();
    assert_eq!((color_of("red"), color_of("blue")), ("red".to_string(), "blue".to_string()));
    assert_eq!(
        (color_of("red-as-bgr"), color_of("blue-as-bgr")),
        ("blue".to_string(), "red".to_string()),
        "BGR frames read as RGB must change the answer"
    );

    // The bundled demo clip: a red ball moving, frozen, then a blue ball moving; the moving
    // alert's event starts, ends (one frozen window clears it) and starts again.
    let demo_answers: Vec<(String, String)> = (0..3)
        .map(|k| (demo[&(k, color_prompt.clone())].text.clone(), demo[&(k, moving_prompt.clone())].text.clone()))
        .collect();
    let s = |a: &str, b: &str| (a.to_string(), b.to_string());
    assert_eq!(demo_answers, vec![s("red", "yes"), s("red", "no"), s("blue", "yes")]);
    let kinds: Vec<&str> = events.iter().take(3).map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["start", "end", "start"], "{events:?}");

    // vigil infer --video on the same clips: the same visual tokens and the same answers.
    let t = std::time::Instant::now();
    for c in &clips {
        for (prompt, question) in [(&color_prompt, "What color is the ball?"), (&moving_prompt, "Is the ball moving?")]
        {
            let daemon = &got[&(c.name.clone(), prompt.clone())];
            let cli = infer(c, question);
            assert_eq!(
                (cli.kept, cli.total),
                (daemon.kept, daemon.total),
                "{}: {question} visual tokens (kept, total)",
                c.name
            );
            assert_eq!(cli.text, daemon.text, "{}: {question}", c.name);
        }
    }
    eprintln!("vigil infer agreed on {} clips in {:?}; {:?} in all", clips.len(), t.elapsed(), started.elapsed());
}
