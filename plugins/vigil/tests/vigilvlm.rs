//! The `vigilvlm` element in real GStreamer pipelines, on the shipped tiny checkpoint (CPU, f32).
//!
//! Tests run one at a time (`SERIAL`): they count model loads and threads of this process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use gstreamer as gst;
use gstreamer::prelude::*;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        gst::init().unwrap();
        gstvigil::plugin_register_static().unwrap();
    });
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn model() -> String {
    repo().join("models/tiny-videollama3").to_string_lossy().into_owned()
}

/// `target/<profile>`: this test binary lives in its `deps/`.
fn target_dir() -> PathBuf {
    std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().to_path_buf()
}

/// The common element settings of these tests (CPU, f32, short answers).
fn vlm(name: &str, extra: &str) -> String {
    format!("vigilvlm name={name} model=\"{}\" device=cpu dtype=f32 max-new-tokens=6 {extra}", model())
}

/// What a pipeline posted until EOS (or an error, or the deadline).
struct Run {
    answers: Vec<gst::Structure>,
    dropped: Vec<gst::Structure>,
    error: Option<String>,
    eos: bool,
    took: Duration,
}

fn run_to_eos(pipeline: &gst::Pipeline, limit: Duration) -> Run {
    let t0 = Instant::now();
    let bus = pipeline.bus().unwrap();
    let mut run = Run { answers: Vec::new(), dropped: Vec::new(), error: None, eos: false, took: Duration::ZERO };
    if let Err(e) = pipeline.set_state(gst::State::Playing) {
        run.error = Some(format!("set_state(Playing): {e:?}"));
    }
    while run.error.is_none() && t0.elapsed() < limit {
        let Some(msg) = bus.timed_pop(gst::ClockTime::from_mseconds(100)) else { continue };
        match msg.view() {
            gst::MessageView::Eos(_) => {
                run.eos = true;
                break;
            }
            gst::MessageView::Error(e) => run.error = Some(format!("{} ({:?})", e.error(), e.debug())),
            gst::MessageView::Element(el) => {
                if let Some(s) = el.structure() {
                    match s.name().as_str() {
                        "vigilvlm-answer" => run.answers.push(s.to_owned()),
                        "vigilvlm-dropped" => run.dropped.push(s.to_owned()),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    run.took = t0.elapsed();
    pipeline.set_state(gst::State::Null).unwrap();
    run
}

fn launch(desc: &str) -> gst::Pipeline {
    gst::parse::launch(desc).unwrap_or_else(|e| panic!("{desc}: {e}")).downcast::<gst::Pipeline>().unwrap()
}

/// The `vigil` binary next to this test (built by `cargo test --workspace`; built here if not).
fn vigil_bin() -> PathBuf {
    let bin = target_dir().join("vigil");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let ok = Command::new(cargo)
            .current_dir(repo())
            .args(["build", "--locked", "-p", "vigil", "--bin", "vigil"])
            .status()
            .unwrap();
        assert!(ok.success(), "cannot build the vigil binary");
    }
    bin
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(0)
}

#[test]
fn gst_inspect_lists_the_element_and_its_properties() {
    // `cargo test` links the plugin as an rlib only; the loadable library comes from a build.
    let lib = target_dir().join("libgstvigil.so");
    if !lib.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let ok = Command::new(cargo)
            .current_dir(repo())
            .args(["build", "--locked", "-p", "gst-plugin-vigil", "--lib"])
            .status()
            .unwrap();
        assert!(ok.success(), "cannot build the plugin library");
    }
    assert!(lib.exists(), "{} is missing after building the plugin", lib.display());
    let registry = tempfile::tempdir().unwrap();
    let out = Command::new("gst-inspect-1.0")
        .arg("vigilvlm")
        .env("GST_PLUGIN_PATH", target_dir())
        .env("GST_REGISTRY", registry.path().join("registry.bin"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "gst-inspect-1.0 vigilvlm failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("libgstvigil.so"), "{text}");
    for prop in [
        "model",
        "device",
        "dtype",
        "prompt",
        "prompts",
        "fps",
        "window-seconds",
        "stride-seconds",
        "max-new-tokens",
        "pruning",
        "pruning-threshold",
        "max-frame-pixels",
        "queue-size",
        "text-timestamps",
    ] {
        assert!(
            text.lines().any(|l| l.trim_start().starts_with(&format!("{prop} "))),
            "property {prop} not listed:\n{text}"
        );
    }
    assert!(text.contains("SRC template: 'text'"), "{text}");
}

/// Every (window, prompt) gets exactly one answer, about the window's frames, and each answer
/// is token for token `vigil infer --frames` on those frames (same sampling, same resize, same
/// pruning, same prompt).
#[test]
fn answers_equal_vigil_infer_on_the_same_frames() {
    let _g = serial();
    init();
    let dir = tempfile::tempdir().unwrap();
    // 8 frames at 2 fps, RGB: the element takes every frame; the PNGs are the same frames.
    let src = "videotestsrc pattern=ball num-buffers=8 ! video/x-raw,format=RGB,width=320,height=240,framerate=2/1";
    let png = launch(&format!("{src} ! pngenc ! multifilesink location=\"{}/f%02d.png\"", dir.path().display()));
    assert!(run_to_eos(&png, Duration::from_secs(30)).eos);

    let prompts = r#"[{"name":"what","text":"What happens in the video?"},{"name":"moving","text":"Is the ball moving?","kind":"alert"}]"#;
    let desc = format!(
        "{src} ! {} ! fakesink v.text ! appsink name=texts sync=false",
        vlm("v", "fps=2 window-seconds=2 stride-seconds=2")
    );
    let pipeline = launch(&desc);
    pipeline.by_name("v").unwrap().set_property("prompts", prompts);
    let texts = pipeline.by_name("texts").unwrap().downcast::<gstreamer_app::AppSink>().unwrap();
    let got = std::sync::Arc::new(Mutex::new(Vec::new()));
    let sink_got = got.clone();
    texts.set_callbacks(
        gstreamer_app::AppSinkCallbacks::builder()
            .new_sample(move |s| {
                let sample = s.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                let b = sample.buffer().unwrap();
                let text = String::from_utf8(b.map_readable().unwrap().to_vec()).unwrap();
                sink_got.lock().unwrap().push((b.pts(), b.duration(), text));
                Ok(gst::FlowSuccess::Ok)
            })
            .build(),
    );
    let run = run_to_eos(&pipeline, Duration::from_secs(120));
    assert!(run.eos && run.error.is_none(), "no EOS: {:?}", run.error);
    assert_eq!(run.answers.len(), 4, "2 windows × 2 prompts: {:#?}", run.answers);
    let mut keys: Vec<(u64, String)> =
        run.answers.iter().map(|a| (a.get::<u64>("seq").unwrap(), a.get::<String>("prompt").unwrap())).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 4, "one answer per (window, prompt): {keys:?}");

    let bin = vigil_bin();
    let model = model();
    for a in &run.answers {
        let seq = a.get::<u64>("seq").unwrap();
        let (start, end) = (a.get::<f64>("start-s").unwrap(), a.get::<f64>("end-s").unwrap());
        assert_eq!((start, end, a.get::<u32>("frames").unwrap()), (2.0 * seq as f64, 2.0 * seq as f64 + 1.5, 4), "{a}");
        let json: serde_json::Value = serde_json::from_str(&a.get::<String>("json").unwrap()).unwrap();
        assert_eq!(json["answer"], a.get::<String>("answer").unwrap());
        assert_eq!(json["window"]["start_s"], start);

        let question = a.get::<String>("question").unwrap();
        let frames: Vec<String> = (0..4)
            .map(|i| dir.path().join(format!("f{:02}.png", 4 * seq + i)).to_string_lossy().into_owned())
            .collect();
        let mut args = vec!["-q", "infer", "--model", &model, "--fps", "2", "--prompt", &question];
        args.extend(["--max-new-tokens", "6", "--json", "--frames"]);
        args.extend(frames.iter().map(String::as_str));
        let out = Command::new(&bin).args(&args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let want: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(json["answer"], want["text"], "element {json}\ninfer {want}");
        assert_eq!(json["tokens"]["prompt"], want["prompt_tokens"], "element {json}\ninfer {want}");
        assert_eq!(
            json["tokens"]["generated"],
            want["token_ids"].as_array().unwrap().len(),
            "element {json}\ninfer {want}"
        );
        assert_eq!(json["visual_tokens"]["total"], want["video_tokens_total"], "element {json}\ninfer {want}");
        assert_eq!(json["visual_tokens"]["kept"], want["video_tokens_kept"], "element {json}\ninfer {want}");
    }

    // The text pad: one buffer per answer, spanning its window.
    let texts = got.lock().unwrap().clone();
    assert_eq!(texts.len(), 4, "{texts:?}");
    for (pts, duration, text) in &texts {
        let seq = pts.unwrap().seconds() / 2;
        assert_eq!(pts.unwrap(), gst::ClockTime::from_seconds(2 * seq), "{texts:?}");
        assert_eq!(duration.unwrap(), gst::ClockTime::from_seconds(2), "{texts:?}");
        let (name, answer) = text.split_once(": ").unwrap();
        assert!(
            run.answers.iter().any(|a| a.get::<u64>("seq").unwrap() == seq
                && a.get::<String>("prompt").unwrap() == name
                && a.get::<String>("answer").unwrap() == answer),
            "text {text:?} at {pts:?} matches no answer"
        );
    }
}

/// Captions burned in: the text pad feeds textoverlay (waiting for text, its default) and the
/// pipeline runs to EOS with every answer, with either text timestamps.
#[test]
fn textoverlay_runs_to_eos() {
    let _g = serial();
    init();
    for ts in ["window", "arrival"] {
        let desc = format!(
            "videotestsrc pattern=ball num-buffers=30 ! video/x-raw,format=I420,width=320,height=240,framerate=10/1 ! {} ! \
             textoverlay name=o ! videoconvert ! fakesink sync=false v.text ! o.text_sink",
            vlm("v", &format!("fps=2 window-seconds=1 stride-seconds=1 text-timestamps={ts}"))
        );
        let pipeline = launch(&desc);
        let run = run_to_eos(&pipeline, Duration::from_secs(60));
        assert!(run.eos, "text-timestamps={ts}: no EOS after {:?}: {:?}", run.took, run.error);
        assert_eq!(run.answers.len(), 3, "text-timestamps={ts}: {:#?} dropped {:#?}", run.answers, run.dropped);
    }
}

#[test]
fn a_bad_model_fails_the_state_change_with_the_path() {
    let _g = serial();
    init();
    let desc =
        "videotestsrc num-buffers=5 ! vigilvlm name=v model=/nonexistent/ckpt-dir device=cpu dtype=f32 ! fakesink";
    let pipeline = launch(desc);
    let res = pipeline.set_state(gst::State::Paused);
    assert!(res.is_err(), "{res:?}");
    let bus = pipeline.bus().unwrap();
    let msg =
        bus.timed_pop_filtered(gst::ClockTime::from_seconds(5), &[gst::MessageType::Error]).expect("an error message");
    let gst::MessageView::Error(e) = msg.view() else { unreachable!() };
    let text = format!("{} {:?}", e.error(), e.debug());
    assert!(text.contains("/nonexistent/ckpt-dir"), "{text}");
    pipeline.set_state(gst::State::Null).unwrap();

    // A prompts list that does not parse is refused at start, with the reason.
    let pipeline = launch(&format!("videotestsrc num-buffers=5 ! {} ! fakesink", vlm("v", "")));
    pipeline.by_name("v").unwrap().set_property("prompts", r#"[{"name":"x"}]"#);
    assert!(pipeline.set_state(gst::State::Paused).is_err());
    let msg = pipeline
        .bus()
        .unwrap()
        .timed_pop_filtered(gst::ClockTime::from_seconds(5), &[gst::MessageType::Error])
        .unwrap();
    let gst::MessageView::Error(e) = msg.view() else { unreachable!() };
    assert!(e.error().to_string().contains("prompts"), "{}", e.error());
    pipeline.set_state(gst::State::Null).unwrap();
}

#[test]
fn two_elements_load_the_model_once() {
    let _g = serial();
    init();
    let before = gstvigil::models_loaded();
    let branch = |name: &str| {
        format!(
            "videotestsrc pattern=ball num-buffers=8 ! video/x-raw,format=RGB,width=160,height=120,framerate=4/1 ! {} ! fakesink",
            vlm(name, "fps=2 window-seconds=1 stride-seconds=1")
        )
    };
    let pipeline = launch(&format!("{} {}", branch("a"), branch("b")));
    pipeline.set_state(gst::State::Paused).unwrap();
    assert_eq!(gstvigil::models_loaded(), before + 1, "two elements on one model loaded it twice");
    for name in ["a", "b"] {
        assert_eq!(pipeline.by_name(name).unwrap().property::<u32>("engine-users"), 2, "{name}");
    }
    let run = run_to_eos(&pipeline, Duration::from_secs(60));
    assert!(run.eos, "{:?}", run.error);
    for name in ["a", "b"] {
        let n = run.answers.iter().filter(|a| a.get::<String>("stream").unwrap() == name).count();
        assert_eq!(n, 2, "{name}: {:#?}", run.answers);
    }
    assert_eq!(gstvigil::models_loaded(), before + 1);
}

/// PLAYING → NULL in the middle of a window, again and again: each stop is quick, and the
/// process does not gain threads from one cycle to the next.
#[test]
fn stopping_mid_window_is_quick_and_leaks_no_threads() {
    let _g = serial();
    init();
    let desc = format!(
        "videotestsrc is-live=true pattern=ball ! video/x-raw,format=I420,width=160,height=120,framerate=10/1 ! {} ! fakesink",
        vlm("v", "fps=4 window-seconds=2 stride-seconds=2")
    );
    let mut counts = Vec::new();
    for _ in 0..4 {
        let pipeline = launch(&desc);
        pipeline.set_state(gst::State::Playing).unwrap();
        std::thread::sleep(Duration::from_millis(700));
        let t0 = Instant::now();
        pipeline.set_state(gst::State::Null).unwrap();
        assert!(t0.elapsed() < Duration::from_secs(10), "stopping took {:?}", t0.elapsed());
        drop(pipeline);
        std::thread::sleep(Duration::from_millis(200));
        counts.push(threads());
    }
    assert!(counts[3] <= counts[1], "threads grew across stop cycles: {counts:?}");
}

/// A flushing seek in the middle of a file: it returns quickly, the windows queued before it
/// are dropped (they are about the old position), and the answers after it are about the new
/// position, until EOS.
#[test]
fn a_flushing_seek_finishes_and_answers_the_new_position() {
    let _g = serial();
    init();
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("clip.mkv");
    let enc = launch(&format!(
        "videotestsrc pattern=ball num-buffers=80 ! video/x-raw,format=I420,width=160,height=120,framerate=10/1 ! matroskamux ! filesink location=\"{}\"",
        clip.display()
    ));
    assert!(run_to_eos(&enc, Duration::from_secs(30)).eos);

    let desc = format!(
        "filesrc location=\"{}\" ! matroskademux ! {} ! fakesink sync=true",
        clip.display(),
        vlm("v", "fps=2 window-seconds=1 stride-seconds=1")
    );
    let pipeline = launch(&desc);
    let bus = pipeline.bus().unwrap();
    pipeline.set_state(gst::State::Playing).unwrap();
    // Play about a second and a half, then jump to 5 s.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(1500) {
        let _ = bus.timed_pop(gst::ClockTime::from_mseconds(50));
    }
    let t1 = Instant::now();
    pipeline.seek_simple(gst::SeekFlags::FLUSH | gst::SeekFlags::ACCURATE, gst::ClockTime::from_seconds(5)).unwrap();
    let _ = pipeline.state(gst::ClockTime::from_seconds(10));
    assert!(t1.elapsed() < Duration::from_secs(5), "the seek took {:?}", t1.elapsed());
    // The rest of the run (3 s of video after the seek).
    let run = run_to_eos(&pipeline, Duration::from_secs(30));
    assert!(run.eos, "no EOS after the seek: {:?}", run.error);
    let starts: Vec<f64> = run.answers.iter().map(|a| a.get::<f64>("start-s").unwrap()).collect();
    assert!(starts.iter().any(|&s| s >= 5.0), "no answer after the seek: {starts:?}");
    assert!(starts.iter().all(|s| !(2.0..5.0).contains(s)), "an answer about the skipped part: {starts:?}");
}

/// `prompt` changes while playing: the windows closed after the change are asked the new
/// question.
#[test]
fn the_prompt_changes_while_playing() {
    let _g = serial();
    init();
    let desc = format!(
        "videotestsrc is-live=true pattern=ball ! video/x-raw,format=I420,width=160,height=120,framerate=10/1 ! {} ! fakesink",
        vlm("v", "fps=4 window-seconds=0.5 stride-seconds=0.5 prompt=\"What color is the ball?\"")
    );
    let pipeline = launch(&desc);
    let bus = pipeline.bus().unwrap();
    pipeline.set_state(gst::State::Playing).unwrap();
    let mut questions = Vec::new();
    let t0 = Instant::now();
    let mut changed = false;
    while t0.elapsed() < Duration::from_secs(30) {
        let Some(msg) = bus.timed_pop(gst::ClockTime::from_mseconds(100)) else { continue };
        if let gst::MessageView::Element(el) = msg.view() {
            let s = el.structure().unwrap();
            if s.name() == "vigilvlm-answer" {
                questions.push(s.get::<String>("question").unwrap());
                if !changed {
                    pipeline.by_name("v").unwrap().set_property("prompt", "Is the ball moving?");
                    changed = true;
                }
            }
        }
        if questions.iter().filter(|q| q.as_str() == "Is the ball moving?").count() >= 2 {
            break;
        }
    }
    pipeline.set_state(gst::State::Null).unwrap();
    assert_eq!(questions.first().map(String::as_str), Some("What color is the ball?"), "{questions:?}");
    let first_new =
        questions.iter().position(|q| q == "Is the ball moving?").unwrap_or_else(|| panic!("{questions:?}"));
    assert!(questions[first_new..].iter().all(|q| q == "Is the ball moving?"), "{questions:?}");
}

/// A source faster than the model: the oldest waiting windows are dropped (queue-size), each
/// with a `vigilvlm-dropped` message and counted; every window is either answered or dropped,
/// and the video still reaches EOS.
#[test]
fn a_full_queue_drops_the_oldest_windows_and_counts_them() {
    let _g = serial();
    init();
    let desc = format!(
        "videotestsrc pattern=ball num-buffers=200 ! video/x-raw,format=RGB,width=160,height=120,framerate=20/1 ! {} ! fakesink",
        vlm("v", "fps=10 window-seconds=0.2 stride-seconds=0.2 queue-size=1 max-new-tokens=16")
    );
    let pipeline = launch(&desc);
    let bus = pipeline.bus().unwrap();
    pipeline.set_state(gst::State::Playing).unwrap();
    let (mut answers, mut dropped, mut eos) = (0u64, Vec::new(), false);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(60) {
        let Some(msg) = bus.timed_pop(gst::ClockTime::from_mseconds(100)) else { continue };
        match msg.view() {
            gst::MessageView::Eos(_) => {
                eos = true;
                break;
            }
            gst::MessageView::Error(e) => panic!("{}", e.error()),
            gst::MessageView::Element(el) => match el.structure().map(|s| s.name().to_string()).as_deref() {
                Some("vigilvlm-answer") => answers += 1,
                Some("vigilvlm-dropped") => dropped.push(el.structure().unwrap().get::<String>("reason").unwrap()),
                _ => {}
            },
            _ => {}
        }
    }
    let v = pipeline.by_name("v").unwrap();
    let (windows, counted) = (v.property::<u64>("windows"), v.property::<u64>("windows-dropped"));
    pipeline.set_state(gst::State::Null).unwrap();
    assert!(eos, "no EOS");
    assert_eq!(windows, 50, "10 s of video in 0.2 s windows");
    assert!(!dropped.is_empty(), "nothing dropped with queue-size=1 and a source faster than the model");
    assert!(dropped.iter().all(|r| r == "queue_full"), "{dropped:?}");
    assert_eq!(counted, dropped.len() as u64);
    assert_eq!(
        answers + counted,
        windows,
        "every window is answered or dropped: {answers} answered, {counted} dropped"
    );
}
