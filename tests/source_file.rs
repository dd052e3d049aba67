//! File ingest through real GStreamer pipelines: clips are generated in the test (videotestsrc
//! with a moving ball → x264enc → mp4mux, and → vp8enc → webmmux), then read through the
//! `SourceManager` with exact frame counts and timestamps.

mod source_util;

use std::time::{Duration, Instant};

use source_util::*;
use vigil::config::StreamDefaults;
use vigil::source::{SourceManager, SourceOptions, SourceSpec, StreamState};

fn uri(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

/// A 3 s, 30 fps, 320×240 H.264 clip and the same as VP8/WebM, made once per test.
fn clips(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    (h264_mp4(dir, "clip.mp4", 90, 30, 320, 240), vp8_webm(dir, "clip.webm", 90, 30, 320, 240))
}

#[test]
fn exact_windows_for_several_rates_windows_and_strides() {
    let dir = tempfile::tempdir().unwrap();
    let (mp4, webm) = clips(dir.path());
    let limit = Duration::from_secs(30);
    for clip in [&mp4, &webm] {
        // Tumbling 1 s windows at 2 fps: 0, .5 | 1, 1.5 | 2, 2.5.
        let c = collect(&uri(clip), settings(2.0, 1.0, 1.0), limit);
        assert_eq!(c.final_state(), &StreamState::Stopped, "{clip:?}");
        assert_eq!(times(&c.windows), vec![vec![0.0, 0.5], vec![1.0, 1.5], vec![2.0, 2.5]], "{clip:?}");
        assert!(c.windows.iter().all(|w| !w.partial && w.missing == 0));
        let seqs: Vec<u64> = c.windows.iter().map(|w| w.seq).collect();
        assert_eq!(seqs, vec![0, 1, 2]);

        // Overlap: 2 s windows every 1 s at 2 fps; the second reaches the end, so no partial.
        let c = collect(&uri(clip), settings(2.0, 2.0, 1.0), limit);
        assert_eq!(times(&c.windows), vec![vec![0.0, 0.5, 1.0, 1.5], vec![1.0, 1.5, 2.0, 2.5]], "{clip:?}");
        assert_eq!((c.windows[1].start_s, c.windows[1].end_s), (1.0, 3.0));
        // Overlapping windows share the frame, not a copy.
        assert!(shared_frame_ptr_eq(&c.windows[0], 2, &c.windows[1], 0));

        // Final partial window: 2 s windows every 2 s at 5 fps → 10 frames, then 5 of 10.
        let c = collect(&uri(clip), settings(5.0, 2.0, 2.0), limit);
        let t = times(&c.windows);
        assert_eq!(t.len(), 2, "{clip:?}");
        assert_eq!(t[0], (0..10).map(|i| i as f64 * 0.2).map(|x| (x * 1000.0f64).round() / 1000.0).collect::<Vec<_>>());
        assert_eq!(t[1], vec![2.0, 2.2, 2.4, 2.6, 2.8]);
        assert!(c.windows[1].partial && c.windows[1].expected_frames == 10 && c.windows[1].missing == 0);

        // Native rate, 1 s windows every 0.5 s: 5 windows of exactly 30 frames.
        let c = collect(&uri(clip), settings(30.0, 1.0, 0.5), limit);
        let counts: Vec<usize> = c.windows.iter().map(|w| w.frames.len()).collect();
        assert_eq!(counts, vec![30, 30, 30, 30, 30], "{clip:?}");
        let starts: Vec<f64> = c.windows.iter().map(|w| w.start_s).collect();
        assert_eq!(starts, vec![0.0, 0.5, 1.0, 1.5, 2.0]);
        assert!((c.windows[4].last_time_s() - 89.0 / 30.0).abs() < 1e-9);
    }
}

#[test]
fn caps_scaling_rgb_layout_and_motion() {
    let dir = tempfile::tempdir().unwrap();
    let (mp4, webm) = clips(dir.path());
    for (clip, codec) in [(&mp4, "H.264"), (&webm, "VP8")] {
        // A quarter of the pixels: 160×120, aspect kept.
        let s = StreamDefaults { max_frame_pixels: 160 * 120, ..settings(3.0, 1.0, 1.0) };
        let c = collect(&uri(clip), s, Duration::from_secs(30));
        let caps = c.caps.clone().expect("caps reported");
        assert_eq!(caps.codec, codec);
        assert_eq!((caps.width, caps.height, caps.framerate_num, caps.framerate_den), (320, 240, 30, 1));
        assert_eq!((caps.out_width, caps.out_height), (160, 120));
        assert_eq!(c.windows.len(), 3);
        let frames: Vec<_> = c.windows.iter().flat_map(|w| w.frames.iter().cloned()).collect();
        assert_eq!(frames.len(), 9);
        for f in &frames {
            assert_eq!((f.width, f.height), (160, 120));
            assert_eq!(f.data.len(), 160 * 120 * 3, "tightly packed RGB8");
        }
        // The ball moves: consecutive frames differ, and the picture is not blank.
        for pair in frames.windows(2) {
            let diff: u64 = pair[0].data.iter().zip(&pair[1].data).map(|(a, b)| a.abs_diff(*b) as u64).sum();
            assert!(diff > 1000, "frames {} and {} are identical", pair[0].slot, pair[1].slot);
        }
        let distinct: std::collections::HashSet<u8> = frames[0].data.iter().copied().collect();
        assert!(distinct.len() > 2);
        // Capture times follow the stream time.
        let dt = frames[3].captured_at.duration_since(frames[0].captured_at).unwrap().as_secs_f64();
        assert!((dt - 1.0).abs() < 1e-6, "{dt}");
    }
}

#[test]
fn odd_width_is_copied_without_row_padding() {
    // 125 px RGB rows are 375 bytes; GStreamer pads them to 376. SMPTE bars are identical down
    // the top two thirds, so a stride mistake would shear (and channel-rotate) later rows.
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("bars.mp4");
    run_to_eos(&format!(
        "videotestsrc pattern=smpte num-buffers=30 ! video/x-raw,format=I420,width=250,height=150,framerate=30/1 \
         ! x264enc speed-preset=ultrafast ! mp4mux ! filesink location={}",
        clip.display()
    ));
    let s = StreamDefaults { max_frame_pixels: 125 * 75, ..settings(1.0, 1.0, 1.0) };
    let c = collect(&uri(&clip), s, Duration::from_secs(20));
    let f = &c.windows[0].frames[0];
    assert_eq!((f.width, f.height), (125, 75));
    assert_eq!(f.data.len(), 125 * 75 * 3);
    let row = |y: usize| &f.data[y * 375..(y + 1) * 375];
    let mad = |a: &[u8], b: &[u8]| a.iter().zip(b).map(|(x, y)| x.abs_diff(*y) as f64).sum::<f64>() / a.len() as f64;
    assert!(mad(row(2), row(40)) < 4.0, "rows of the bars differ: {}", mad(row(2), row(40)));
    // A one-byte shift is a large difference, so the check above is sensitive.
    assert!(mad(&row(2)[..372], &row(40)[1..373]) > 20.0);
}

#[test]
fn looping_file_continues_the_timeline() {
    let dir = tempfile::tempdir().unwrap();
    let clip = h264_mp4(dir.path(), "short.mp4", 15, 15, 160, 120);
    init();
    let (mut mgr, _events) = SourceManager::new(SourceOptions::default()).unwrap();
    let s = StreamDefaults { loop_: true, ..settings(2.0, 1.0, 1.0) };
    let rx = mgr.add(SourceSpec::from_uri("loop", &uri(&clip), s).unwrap()).unwrap();
    let mut got = Vec::new();
    let end = Instant::now() + Duration::from_secs(20);
    while got.len() < 4 && Instant::now() < end {
        if let Some(w) = rx.recv_timeout(Duration::from_millis(100)) {
            got.push(w);
        }
    }
    assert!(mgr.remove("loop"));
    assert!(mgr.shutdown(Duration::from_secs(5)));
    // A 1 s clip at 2 fps gives 2 frames per pass; passes follow each other on the grid.
    assert_eq!(times(&got), vec![vec![0.0, 0.5], vec![1.0, 1.5], vec![2.0, 2.5], vec![3.0, 3.5]]);
    assert!(got.iter().all(|w| w.missing == 0));
}

#[test]
fn realtime_file_is_paced_by_the_clock() {
    let dir = tempfile::tempdir().unwrap();
    let clip = h264_mp4(dir.path(), "rt.mp4", 30, 30, 160, 120);
    let s = StreamDefaults { realtime: true, ..settings(10.0, 0.5, 0.5) };
    let t0 = Instant::now();
    let c = collect(&uri(&clip), s, Duration::from_secs(20));
    let took = t0.elapsed();
    assert_eq!(c.windows.len(), 2);
    assert!(took >= Duration::from_millis(800), "a 1 s clip in real time took only {took:?}");
    let f = &c.windows[1].frames;
    let dt = f[4].captured_at.duration_since(f[0].captured_at).unwrap().as_secs_f64();
    assert!((dt - 0.4).abs() < 1e-6);
}

#[test]
fn broken_files_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let clip = h264_mp4(dir.path(), "full.mp4", 60, 30, 320, 240);
    // mp4mux writes the index (moov) at the end: cut it off.
    let bytes = std::fs::read(&clip).unwrap();
    let cut = dir.path().join("truncated.mp4");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let garbage = dir.path().join("garbage.mp4");
    std::fs::write(&garbage, (0..50_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect::<Vec<_>>())
        .unwrap();
    let missing = dir.path().join("does-not-exist.mp4");
    for path in [&cut, &garbage, &missing] {
        let c = collect(&uri(path), settings(1.0, 1.0, 1.0), Duration::from_secs(20));
        match c.final_state() {
            StreamState::Failed { error } => assert!(!error.is_empty()),
            other => panic!("{path:?}: expected failed, got {other:?}"),
        }
        assert!(c.windows.is_empty(), "{path:?}");
        assert_eq!(c.states.first(), Some(&StreamState::Starting));
    }
}

#[test]
fn slow_consumer_drops_oldest_with_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let clip = h264_mp4(dir.path(), "loop.mp4", 15, 15, 160, 120);
    init();
    let (mut mgr, _events) =
        SourceManager::new(SourceOptions { queue_capacity: 2, ..SourceOptions::default() }).unwrap();
    // Real time and looping like a camera: 10 windows per second.
    let s = StreamDefaults { realtime: true, loop_: true, ..settings(10.0, 0.1, 0.1) };
    let rx = mgr.add(SourceSpec::from_uri("cam", &uri(&clip), s).unwrap()).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let d1 = rx.dropped();
    assert!(d1 >= 5, "dropped only {d1}");
    assert!(rx.len() <= 2);
    std::thread::sleep(Duration::from_millis(700));
    let d2 = rx.dropped();
    assert!(d2 > d1, "counter must advance ({d1} → {d2})");
    assert!(rx.len() <= 2, "queue stays bounded");
    // The consumer sees the newest windows, in order.
    let a = rx.try_recv().unwrap();
    let b = rx.try_recv().unwrap();
    assert!(b.seq > a.seq && a.seq >= d1);
    let st = mgr.stats("cam").unwrap();
    assert_eq!(st.windows_dropped_queue, rx.dropped());
    assert_eq!(st.state, StreamState::Streaming);
    assert!(mgr.shutdown(Duration::from_secs(5)));
}

#[test]
fn probe_cli_prints_exact_windows() {
    let dir = tempfile::tempdir().unwrap();
    let (mp4, _) = clips(dir.path());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args([
            "-q",
            "probe",
            &uri(&mp4),
            "--fps",
            "2",
            "--window-seconds",
            "2",
            "--stride-seconds",
            "1",
            "--windows",
            "5",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3, "caps + 2 windows: {lines:?}");
    assert_eq!(lines[0]["type"], "caps");
    assert_eq!(lines[0]["codec"], "H.264");
    assert_eq!((lines[0]["width"].as_u64(), lines[0]["height"].as_u64()), (Some(320), Some(240)));
    assert_eq!(lines[0]["framerate"], "30/1");
    for (i, w) in lines[1..].iter().enumerate() {
        assert_eq!(w["seq"], i as u64);
        assert_eq!(w["frames"], 4);
        assert_eq!(w["start_s"], i as f64);
        assert_eq!(w["end_s"], i as f64 + 2.0);
        assert_eq!((w["width"].as_u64(), w["height"].as_u64()), (Some(320), Some(240)));
    }
    // Text mode, and a readable error for a stream that cannot be opened.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["-q", "probe", &uri(&dir.path().join("nope.mp4")), "--timeout-s", "5"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot open") && err.contains("nope.mp4"), "{err}");
}

/// A recording whose timestamps jump forward by an hour: the jump is a gap, not an hour of
/// copies of the last frame (which videorate would otherwise produce).
#[test]
fn a_forward_timestamp_jump_is_a_gap_not_copies() {
    let dir = tempfile::tempdir().unwrap();
    let pts: Vec<f64> = (0..5).chain(3600..3605).map(f64::from).collect();
    let path = mjpeg_at(dir.path(), "jump.mkv", &pts);
    let c = collect(&uri(&path), settings(1.0, 2.0, 2.0), Duration::from_secs(60));
    let frames: usize = c.windows.iter().map(|w| w.frames.len()).sum();
    assert!(frames <= 12, "{frames} frames from a 10-frame recording: the jump was filled with copies");
    assert!(c.windows.len() <= 8, "{} windows", c.windows.len());
    let last = c.windows.last().and_then(|w| w.frames.last()).map(|f| f.time_s).unwrap_or(0.0);
    assert!(last >= 3600.0, "the frames after the jump keep their time: last at {last} s");
}

/// A file with no video at all fails (bounded retries) and says why.
#[test]
fn an_audio_only_file_fails_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = clip(dir.path(), "audio.ogg", "audiotestsrc num-buffers=50 ! vorbisenc ! oggmux");
    let c = collect(&uri(&path), settings(1.0, 1.0, 1.0), Duration::from_secs(40));
    match c.final_state() {
        StreamState::Failed { error } => assert!(error.contains("no video"), "{error}"),
        other => panic!("expected failed, got {other:?}"),
    }
    assert!(c.windows.is_empty());
}

/// With a model size, the buffered frame *is* the model input: a window's frames, through the
/// video processor, give exactly the pixel values transformers' processor computes from the
/// full-resolution decoded frames (one resize, the processor's own, not a scale then a resize).
#[test]
fn with_a_model_size_the_buffered_frame_is_the_model_input() {
    use vigil::processor::video::{Video, VideoProcessor};
    let dir = tempfile::tempdir().unwrap();
    // Lossless (raw RGB in Matroska), 4 fps, larger than the model's frame budget.
    let clip = raw_rgb_mkv(dir.path(), "raw.mkv", 8, 4, 320, 240);
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-videollama3");
    let vp = VideoProcessor::from_pretrained(&model).unwrap();
    let input = vigil::engine::VideoInput::of(&vp.config.base);
    // 1 fps, 2 s windows: frames 0 and 4 of the clip. `max_frame_pixels` below the native size:
    // without a model size, frames are scaled to it first (and resized again by the processor).
    let s = StreamDefaults { max_frame_pixels: 20_000, ..settings(1.0, 2.0, 2.0) };
    let mut spec = SourceSpec::from_uri("clip", &uri(&clip), s.clone()).unwrap();
    spec.model_size = Some(std::sync::Arc::new(move |h, w| input.target(h, w, 2)));
    let got = collect_spec(spec, Duration::from_secs(30));
    let w0 = &got.windows[0];
    assert_eq!(w0.frames.len(), 2);
    let (th, tw) = input.target(240, 320, 2).unwrap();
    assert_eq!((w0.frames[0].height as usize, w0.frames[0].width as usize), (th, tw), "buffered at the model's size");

    let native = vigil::processor::video_file::decode_video_file(&clip).unwrap();
    assert_eq!((native.frames[0].width, native.frames[0].height), (320, 240));
    let reference = Video::from_frames(vec![native.frames[0].clone(), native.frames[4].clone()], Some(1.0)).unwrap();
    let video_of = |w: &vigil::window::Window| Video::from_window(w, 1.0).unwrap();
    let pruning = vigil::config::PruningConfig::default();
    let want = vp.preprocess(&[reference], &pruning).unwrap();
    let have = vp.preprocess(&[video_of(w0)], &pruning).unwrap();
    assert_eq!(have.video_grid_thw, want.video_grid_thw);
    assert_eq!(have.video_compression_mask, want.video_compression_mask);
    assert!(have.pixel_values_videos == want.pixel_values_videos, "the model input differs from transformers'");

    // The contrast: scaled at ingest, then resized by the processor, the input is not the same.
    let scaled = collect(&uri(&clip), s, Duration::from_secs(30));
    let twice = vp.preprocess(&[video_of(&scaled.windows[0])], &pruning).unwrap();
    assert!(twice.pixel_values_videos != want.pixel_values_videos, "the contrast case should differ");
}

/// What `run` decodes, `probe` opens too: a grayscale Motion-JPEG AVI, two seconds long (a
/// file that ends within one poll of the bus must still report that it streamed).
#[test]
fn probe_opens_a_grayscale_mjpeg_avi() {
    let dir = tempfile::tempdir().unwrap();
    let avi = clip(
        dir.path(),
        "gray.avi",
        "videotestsrc num-buffers=10 ! video/x-raw,format=GRAY8,width=64,height=48,framerate=5/1 ! jpegenc ! avimux",
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["-q", "probe", &uri(&avi), "--window-seconds", "1", "--stride-seconds", "1", "--windows", "1", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines[0]["codec"], "MJPEG", "{lines:?}");
    assert_eq!(lines[1]["frames"], 1, "{lines:?}");
}
