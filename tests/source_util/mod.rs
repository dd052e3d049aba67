//! Shared helpers for the source tests: clips generated with GStreamer, an in-process RTSP
//! server on loopback, and collectors over the real `SourceManager`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_rtsp_server as rtsp;
use gstreamer_rtsp_server::prelude::*;
use tokio::sync::mpsc::UnboundedReceiver;
use vigil::config::StreamDefaults;
use vigil::source::{EventKind, NativeCaps, SourceEvent, SourceManager, SourceOptions, SourceSpec, StreamState};
use vigil::window::Window;

pub fn init() {
    vigil::source::init().expect("GStreamer init");
}

/// Run a gst-launch style description to EOS (bounded).
pub fn run_to_eos(desc: &str) {
    init();
    let p = gst::parse::launch(desc).expect("parse pipeline").downcast::<gst::Pipeline>().unwrap();
    p.set_state(gst::State::Playing).expect("play");
    let bus = p.bus().unwrap();
    let msg = bus
        .timed_pop_filtered(gst::ClockTime::from_seconds(60), &[gst::MessageType::Eos, gst::MessageType::Error])
        .expect("clip generation timed out");
    if let gst::MessageView::Error(e) = msg.view() {
        panic!("clip generation failed: {} {:?}", e.error(), e.debug());
    }
    p.set_state(gst::State::Null).unwrap();
}

/// A clip that the gst-launch description `desc` (without its sink) writes to `dir/name`.
pub fn clip(dir: &Path, name: &str, desc: &str) -> PathBuf {
    let path = dir.join(name);
    run_to_eos(&format!("{desc} ! filesink location={}", path.display()));
    path
}

/// A moving-ball test clip: `frames` frames at `rate` fps, `w`×`h`.
pub fn h264_mp4(dir: &Path, name: &str, frames: u32, rate: u32, w: u32, h: u32) -> PathBuf {
    clip(dir, name, &format!(
        "videotestsrc pattern=ball num-buffers={frames} ! video/x-raw,format=I420,width={w},height={h},framerate={rate}/1 \
         ! x264enc speed-preset=ultrafast key-int-max={rate} ! h264parse ! mp4mux"
    ))
}

pub fn vp8_webm(dir: &Path, name: &str, frames: u32, rate: u32, w: u32, h: u32) -> PathBuf {
    clip(dir, name, &format!(
        "videotestsrc pattern=ball num-buffers={frames} ! video/x-raw,format=I420,width={w},height={h},framerate={rate}/1 \
         ! vp8enc deadline=1 keyframe-max-dist={rate} ! webmmux"
    ))
}

/// A lossless moving-ball clip: raw RGB frames in Matroska.
pub fn raw_rgb_mkv(dir: &Path, name: &str, frames: u32, rate: u32, w: u32, h: u32) -> PathBuf {
    clip(dir, name, &format!(
        "videotestsrc pattern=ball num-buffers={frames} ! video/x-raw,format=RGB,width={w},height={h},framerate={rate}/1 ! matroskamux"
    ))
}

/// A Motion-JPEG Matroska clip with no declared frame rate (caps `framerate=0/1`): one 64×48
/// frame, each a different grey, at each of `pts` (seconds).
pub fn mjpeg_at(dir: &Path, name: &str, pts: &[f64]) -> PathBuf {
    init();
    let path = dir.join(name);
    let p = gst::parse::launch(&format!(
        "appsrc name=src format=time caps=video/x-raw,format=GRAY8,width=64,height=48,framerate=0/1 \
         ! videoconvert ! jpegenc ! matroskamux ! filesink location={}",
        path.display()
    ))
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    let src = p.by_name("src").unwrap().downcast::<gstreamer_app::AppSrc>().unwrap();
    p.set_state(gst::State::Playing).unwrap();
    for (i, t) in pts.iter().enumerate() {
        let mut buf = gst::Buffer::from_slice(vec![(i * 25 % 256) as u8; 64 * 48]);
        let b = buf.get_mut().unwrap();
        b.set_pts(gst::ClockTime::from_nseconds((t * 1e9) as u64));
        src.push_buffer(buf).unwrap();
    }
    src.end_of_stream().unwrap();
    let msg = p
        .bus()
        .unwrap()
        .timed_pop_filtered(gst::ClockTime::from_seconds(30), &[gst::MessageType::Eos, gst::MessageType::Error]);
    assert!(matches!(msg.as_ref().map(|m| m.view()), Some(gst::MessageView::Eos(_))), "clip not written: {msg:?}");
    p.set_state(gst::State::Null).unwrap();
    path
}

pub fn settings(fps: f64, window: f64, stride: f64) -> StreamDefaults {
    StreamDefaults { fps, window_seconds: window, stride_seconds: stride, realtime: false, ..StreamDefaults::default() }
}

/// Everything one finite stream produced.
pub struct Collected {
    pub windows: Vec<Window>,
    pub caps: Option<NativeCaps>,
    pub states: Vec<StreamState>,
}

impl Collected {
    pub fn final_state(&self) -> &StreamState {
        self.states.last().expect("no state reported")
    }
}

pub fn drain_events(rx: &mut UnboundedReceiver<SourceEvent>, out: &mut Vec<SourceEvent>) {
    while let Ok(e) = rx.try_recv() {
        out.push(e);
    }
}

/// Run a finite stream to its end through a real `SourceManager` (bounded by `limit`).
pub fn collect(uri: &str, s: StreamDefaults, limit: Duration) -> Collected {
    collect_spec(SourceSpec::from_uri("clip", uri, s).unwrap(), limit)
}

/// [`collect`] for a spec built by the caller (named "clip").
pub fn collect_spec(spec: SourceSpec, limit: Duration) -> Collected {
    init();
    let (mut mgr, mut events) = SourceManager::new(SourceOptions::default()).unwrap();
    let rx = mgr.add(spec).unwrap();
    // Room for the supervisor's own start timeout and retries (8 s each) under a loaded CI.
    let end = Instant::now() + limit.max(Duration::from_secs(40));
    let mut windows = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Some(w) => windows.push(w),
            None if rx.is_closed() => break,
            None => assert!(Instant::now() < end, "stream did not end within {limit:?}: {:?}", mgr.stats("clip")),
        }
    }
    assert!(mgr.shutdown(Duration::from_secs(5)), "stream thread did not end");
    let mut evs = Vec::new();
    drain_events(&mut events, &mut evs);
    let mut caps = None;
    let mut states = Vec::new();
    for e in evs {
        match e.kind {
            EventKind::Caps(c) => caps = caps.or(Some(c)),
            EventKind::State(s) => states.push(s),
        }
    }
    Collected { windows, caps, states }
}

/// Frame times (s) of each window, rounded to the millisecond.
pub fn times(ws: &[Window]) -> Vec<Vec<f64>> {
    ws.iter().map(|w| w.frames.iter().map(|f| (f.time_s * 1000.0).round() / 1000.0).collect()).collect()
}

/// Wait for an event matching `pred` (collecting everything seen into `seen`).
pub fn wait_event(
    rx: &mut UnboundedReceiver<SourceEvent>,
    seen: &mut Vec<SourceEvent>,
    limit: Duration,
    mut pred: impl FnMut(&SourceEvent) -> bool,
) -> Option<SourceEvent> {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        match rx.try_recv() {
            Ok(e) => {
                seen.push(e.clone());
                if pred(&e) {
                    return Some(e);
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    None
}

pub fn is_state(e: &SourceEvent, stream: &str, name: &str) -> bool {
    e.stream == stream && matches!(&e.kind, EventKind::State(s) if s.as_str() == name)
}

/// A free loopback TCP port (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// An in-process RTSP server on 127.0.0.1 serving a live moving-ball H.264 stream at `/test`.
pub struct RtspServer {
    pub port: u16,
    server: rtsp::RTSPServer,
    ctx: gst::glib::MainContext,
    main_loop: gst::glib::MainLoop,
    source: Option<gst::glib::SourceId>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// While set, the payloader drops every buffer: sessions stay up, no frame goes out.
    frozen: Arc<AtomicBool>,
}

impl RtspServer {
    pub fn start(port: u16) -> RtspServer {
        Self::start_with_auth(port, None)
    }

    /// Like [`RtspServer::start`], requiring HTTP basic credentials when `auth` is given.
    pub fn start_with_auth(port: u16, auth: Option<(&str, &str)>) -> RtspServer {
        init();
        let ctx = gst::glib::MainContext::new();
        let main_loop = gst::glib::MainLoop::new(Some(&ctx), false);
        let server = rtsp::RTSPServer::new();
        server.set_address("127.0.0.1");
        server.set_service(&port.to_string());
        let factory = rtsp::RTSPMediaFactory::new();
        factory.set_launch(
            "( videotestsrc is-live=true pattern=ball ! video/x-raw,format=I420,width=320,height=240,framerate=15/1 \
             ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=15 ! rtph264pay name=pay0 pt=96 config-interval=1 )",
        );
        factory.set_shared(true);
        let frozen = Arc::new(AtomicBool::new(false));
        let drop_while_frozen = frozen.clone();
        factory.connect_media_configure(move |_, media| {
            let pay = media.element().downcast::<gst::Bin>().ok().and_then(|b| b.by_name("pay0"));
            let Some(pad) = pay.and_then(|p| p.static_pad("src")) else { return };
            let frozen = drop_while_frozen.clone();
            pad.add_probe(gst::PadProbeType::BUFFER | gst::PadProbeType::BUFFER_LIST, move |_, _| {
                if frozen.load(Ordering::Relaxed) {
                    gst::PadProbeReturn::Drop
                } else {
                    gst::PadProbeReturn::Ok
                }
            });
        });
        if let Some((user, pass)) = auth {
            let a = rtsp::RTSPAuth::new();
            let token = rtsp::RTSPToken::builder().field(rtsp::RTSP_TOKEN_MEDIA_FACTORY_ROLE, "viewer").build();
            a.add_basic(rtsp::RTSPAuth::make_basic(user, pass).as_str(), &token);
            server.set_auth(Some(&a));
            factory.add_role_from_structure(
                &gst::Structure::builder("viewer")
                    .field(rtsp::RTSP_PERM_MEDIA_FACTORY_ACCESS, true)
                    .field(rtsp::RTSP_PERM_MEDIA_FACTORY_CONSTRUCT, true)
                    .build(),
            );
        }
        server.mount_points().unwrap().add_factory("/test", factory);
        // The port may still be in TIME_WAIT from the previous instance: retry briefly.
        let mut source = None;
        for _ in 0..50 {
            match server.attach(Some(&ctx)) {
                Ok(id) => {
                    source = Some(id);
                    break;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        let source = source.expect("RTSP server could not bind");
        let ml = main_loop.clone();
        let thread = std::thread::spawn(move || ml.run());
        RtspServer { port, server, ctx, main_loop, source: Some(source), thread: Some(thread), frozen }
    }

    /// Hang like a camera whose encoder froze (or resume): connections and RTSP sessions stay
    /// up and new ones are accepted, but no frame is sent.
    pub fn freeze(&self, frozen: bool) {
        self.frozen.store(frozen, Ordering::Relaxed);
    }

    pub fn url(&self) -> String {
        format!("rtsp://127.0.0.1:{}/test", self.port)
    }

    /// Stop listening and drop every client connection.
    pub fn stop(&mut self) {
        self.main_loop.quit();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // The listening source lives in our own context, not the default one.
        if let Some(id) = self.source.take() {
            if let Some(src) = self.ctx.find_source_by_id(&id) {
                src.destroy();
            }
        }
        self.server.client_filter(Some(&mut |_s, _c| rtsp::RTSPFilterResult::Remove));
    }
}

impl Drop for RtspServer {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn shared_frame_ptr_eq(a: &Window, ai: usize, b: &Window, bi: usize) -> bool {
    Arc::ptr_eq(&a.frames[ai], &b.frames[bi])
}
