//! Ingest cost (a noise clip at a camera-like 4 Mbit/s, so the decoder has real work): CPU per stream for a 1080p30 H.264 file decoded in real time (like a camera) and
//! sampled at 1 fps, for 1, 2, 4 and 8 concurrent streams; plus as-fast-as-possible throughput.
//!
//! Run: `cargo bench --bench ingest` (or `--profile dev`; the cost is in GStreamer's C code).
//! Env: `VIGIL_BENCH_SECONDS` (measurement per point, default 8), `VIGIL_BENCH_STREAMS`
//! (comma list, default `1,2,4,8`).

use std::time::{Duration, Instant};

use gstreamer as gst;
use gstreamer::prelude::*;
use vigil::config::StreamDefaults;
use vigil::source::{SourceManager, SourceOptions, SourceSpec};

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 (1-based) → 11 and 12 after the state field.
    let hz = clock_ticks();
    (ticks(11) + ticks(12)) / hz
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        .unwrap_or(0.0)
        / 1024.0
}

fn make_clip(path: &std::path::Path) {
    let desc = format!(
        "videotestsrc pattern=snow num-buffers=300 ! video/x-raw,format=I420,width=1920,height=1080,framerate=30/1 \
         ! x264enc speed-preset=ultrafast bitrate=4000 key-int-max=60 ! h264parse ! mp4mux ! filesink location={}",
        path.display()
    );
    let p = gst::parse::launch(&desc).expect("pipeline").downcast::<gst::Pipeline>().unwrap();
    p.set_state(gst::State::Playing).unwrap();
    let bus = p.bus().unwrap();
    let msg = bus
        .timed_pop_filtered(gst::ClockTime::from_seconds(300), &[gst::MessageType::Eos, gst::MessageType::Error])
        .expect("clip generation timed out");
    if let gst::MessageView::Error(e) = msg.view() {
        panic!("clip generation failed: {}", e.error());
    }
    p.set_state(gst::State::Null).unwrap();
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    vigil::source::init().unwrap();
    let secs: f64 = std::env::var("VIGIL_BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(8.0);
    let counts: Vec<usize> = std::env::var("VIGIL_BENCH_STREAMS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2, 4, 8]);
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("1080p30.mp4");
    let t = Instant::now();
    make_clip(&clip);
    eprintln!("generated a 10 s 1080p30 H.264 clip in {:.1} s", t.elapsed().as_secs_f64());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!("machine: {cores} cores; stream: 1920x1080 H.264 30 fps, sampled at 1 fps, scaled to <= 200704 px RGB");

    // Real time, looping: the steady-state cost of N cameras.
    println!("{:>7} {:>12} {:>16} {:>14} {:>10}", "streams", "cpu % total", "cpu %/stream", "frames/s", "rss MiB");
    for &n in &counts {
        let (mut mgr, _events) =
            SourceManager::new(SourceOptions { queue_capacity: 2, ..SourceOptions::default() }).unwrap();
        let s = StreamDefaults {
            fps: 1.0,
            window_seconds: 1.0,
            stride_seconds: 1.0,
            realtime: true,
            loop_: true,
            ..StreamDefaults::default()
        };
        let mut rxs = Vec::new();
        for i in 0..n {
            rxs.push(
                mgr.add(SourceSpec::from_uri(&format!("s{i}"), &clip.to_string_lossy(), s.clone()).unwrap()).unwrap(),
            );
        }
        // Warm up (pipeline start, first decode), then measure.
        std::thread::sleep(Duration::from_secs(2));
        let f0: u64 = (0..n).map(|i| mgr.stats(&format!("s{i}")).unwrap().frames).sum();
        let (c0, t0) = (cpu_seconds(), Instant::now());
        let end = t0 + Duration::from_secs_f64(secs);
        while Instant::now() < end {
            for rx in &rxs {
                while rx.try_recv().is_some() {}
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let (c1, wall) = (cpu_seconds(), t0.elapsed().as_secs_f64());
        let f1: u64 = (0..n).map(|i| mgr.stats(&format!("s{i}")).unwrap().frames).sum();
        let cpu = 100.0 * (c1 - c0) / wall;
        println!("{n:>7} {cpu:>12.1} {:>16.1} {:>14.2} {:>10.0}", cpu / n as f64, (f1 - f0) as f64 / wall, rss_mib());
        mgr.shutdown(Duration::from_secs(10));
    }

    // As fast as possible: how many seconds of 1080p30 video one stream ingests per second.
    let (mut mgr, _events) =
        SourceManager::new(SourceOptions { queue_capacity: 64, ..SourceOptions::default() }).unwrap();
    let s = StreamDefaults {
        fps: 1.0,
        window_seconds: 1.0,
        stride_seconds: 1.0,
        realtime: false,
        ..StreamDefaults::default()
    };
    let (c0, t0) = (cpu_seconds(), Instant::now());
    let rx = mgr.add(SourceSpec::from_uri("batch", &clip.to_string_lossy(), s).unwrap()).unwrap();
    let mut windows = 0;
    while let Some(_w) = rx.recv_timeout(Duration::from_secs(60)) {
        windows += 1;
    }
    let wall = t0.elapsed().as_secs_f64();
    println!(
        "batch (realtime=false): 10 s of video in {wall:.2} s = {:.1}x real time ({:.0} decoded frames/s), {windows} windows, cpu {:.0} %",
        10.0 / wall,
        300.0 / wall,
        100.0 * (cpu_seconds() - c0) / wall
    );
    mgr.shutdown(Duration::from_secs(10));
}
