//! One attempt's GStreamer pipeline for a stream:
//!
//! `uridecodebin3 → videorate → videoconvert → videoscale → capsfilter → appsink`
//!
//! * `uridecodebin3` picks the source element from the URI scheme (rtspsrc, souphttpsrc); files
//!   and v4l2 devices use `filesrc`/`v4l2src ! decodebin3` (see `build`). decodebin3 picks the
//!   highest-ranked decoder, hardware ones included.
//! * `videorate` sits first so that conversion and scaling run only on the frames kept at `fps`.
//! * The capsfilter's size is fixed when the decoded pad appears (aspect kept, at most
//!   `max_frame_pixels`, square pixels), so the appsink receives exactly what the model gets.
//!
//! Non-video streams (camera audio) go to a fakesink so they never block the decoder.

use std::sync::{Arc, Mutex};

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;

use super::{codec_name, fit_size, NativeCaps, SourceSpec};
use crate::config::{RtspTransport, SourceKind};

/// The elements of one attempt.
pub struct Built {
    pub pipeline: gst::Pipeline,
    pub appsink: gst_app::AppSink,
    /// Filled in when the decoded video pad appears.
    pub native_caps: Arc<Mutex<Option<NativeCaps>>>,
}

/// The URI GStreamer should open (plain paths become `file://` URIs).
pub fn gst_uri(spec: &SourceSpec) -> Result<String, String> {
    match spec.kind {
        SourceKind::File if !spec.uri.contains("://") => {
            let path = std::path::Path::new(&spec.uri);
            let abs = if path.is_absolute() {
                path.to_path_buf()
            } else {
                std::env::current_dir().map_err(|e| e.to_string())?.join(path)
            };
            url::Url::from_file_path(&abs)
                .map(|u| u.to_string())
                .map_err(|_| format!("{} is not a valid file path", abs.display()))
        }
        _ => Ok(spec.uri.clone()),
    }
}

fn make(factory: &str, name: &str) -> Result<gst::Element, String> {
    gst::ElementFactory::make(factory).name(name).build().map_err(|_| {
        format!("GStreamer element {factory:?} is missing (install the GStreamer plugin that provides it)")
    })
}

/// Build (not start) the pipeline for one attempt.
pub fn build(spec: &SourceSpec) -> Result<Built, String> {
    let s = &spec.settings;
    let uri = gst_uri(spec)?;
    let pipeline = gst::Pipeline::with_name(&format!("vigil-{}", spec.name));
    // Local sources get an explicit source element in front of decodebin3: under load,
    // GStreamer 1.22's uridecodebin3 sometimes never starts its file source ("pad not activated
    // yet") and the pipeline waits forever. Network sources keep uridecodebin3 (they retry).
    let local_src = match spec.kind {
        SourceKind::File => {
            let path = url::Url::parse(&uri)
                .ok()
                .and_then(|u| u.to_file_path().ok())
                .ok_or_else(|| format!("{} is not a local file URI", spec.redacted_uri()))?;
            let src = make("filesrc", "src")?;
            src.set_property("location", path.to_string_lossy().as_ref());
            Some(src)
        }
        SourceKind::V4l2 => {
            let device = url::Url::parse(&uri).map(|u| u.path().to_string()).map_err(|e| e.to_string())?;
            let src = make("v4l2src", "src")?;
            src.set_property("device", device.as_str());
            Some(src)
        }
        _ => None,
    };
    let dec = match &local_src {
        Some(_) => make("decodebin3", "dec")?,
        None => {
            let d = make("uridecodebin3", "dec")?;
            d.set_property("uri", &uri);
            d
        }
    };
    let rate = make("videorate", "rate")?;
    // Without this, videorate would invent frames from the segment start up to a live source's
    // first buffer.
    rate.set_property("skip-to-first", true);
    // Nor may it fill a timestamp jump (a camera's clock reset, a cut in a recording) with
    // copies of the last frame: beyond this, the jump is a gap the windower reports.
    if rate.find_property("max-duplication-time").is_some() {
        rate.set_property("max-duplication-time", max_duplication(s.fps).as_nanos() as u64);
    }
    let convert = make("videoconvert", "convert")?;
    let scale = make("videoscale", "scale")?;
    let filter = make("capsfilter", "filter")?;
    let fps = gst::Fraction::approximate_f64(s.fps).ok_or_else(|| format!("fps {} cannot be represented", s.fps))?;
    let rgb_caps = gst::Caps::builder("video/x-raw").field("format", "RGB").field("framerate", fps).build();
    filter.set_property("caps", &rgb_caps);

    let live = spec.is_live();
    let appsink = gst_app::AppSink::builder()
        .name("sink")
        .caps(&gst::Caps::builder("video/x-raw").field("format", "RGB").build())
        .max_buffers(2)
        // Live sources must never back up into the network source; a batch file may wait.
        .drop(live)
        // Files in real time are paced by the clock; live sources already are.
        .sync(!live && s.realtime)
        .build();
    appsink.set_property("enable-last-sample", false);

    pipeline.add_many([&dec, &rate, &convert, &scale, &filter, appsink.upcast_ref()]).map_err(|e| e.to_string())?;
    gst::Element::link_many([&rate, &convert, &scale, &filter, appsink.upcast_ref()]).map_err(|e| e.to_string())?;
    if let Some(src) = &local_src {
        pipeline.add(src).map_err(|e| e.to_string())?;
        src.link(&dec).map_err(|e| e.to_string())?;
    }

    if matches!(spec.kind, SourceKind::Rtsp | SourceKind::Http) {
        let (kind, transport, latency) = (spec.kind, s.transport, s.latency_ms);
        let (user, pass) = (spec.username.clone(), spec.password.clone());
        dec.connect("source-setup", false, move |args| {
            if let Some(src) = args.get(1).and_then(|v| v.get::<gst::Element>().ok()) {
                if kind == SourceKind::Rtsp {
                    configure_rtspsrc(&src, transport, latency);
                }
                // rtspsrc and souphttpsrc both take `user-id`/`user-pw` (never the URI: it is logged).
                for (prop, value) in [("user-id", &user), ("user-pw", &pass)] {
                    if let (Some(v), true) = (value, src.find_property(prop).is_some()) {
                        src.set_property(prop, v.as_str());
                    }
                }
            }
            None
        });
    }

    let native_caps: Arc<Mutex<Option<NativeCaps>>> = Arc::new(Mutex::new(None));

    // decodebin3 exposes its pads before caps are known: link on pad-added, size the capsfilter
    // when the decoded caps event reaches videorate (before it flows on to the capsfilter).
    let rate_sink = rate.static_pad("sink").ok_or("videorate has no sink pad")?;
    let filter_weak = filter.downgrade();
    let dec_weak = dec.downgrade();
    let caps_slot = native_caps.clone();
    let max_pixels = s.max_frame_pixels;
    let model_size = spec.model_size.clone();
    rate_sink.add_probe(gst::PadProbeType::EVENT_DOWNSTREAM, move |_pad, info| {
        let Some(gst::PadProbeData::Event(ev)) = &info.data else { return gst::PadProbeReturn::Ok };
        let gst::EventView::Caps(c) = ev.view() else { return gst::PadProbeReturn::Ok };
        let caps = c.caps();
        let (Some(filter), Some(dec)) = (filter_weak.upgrade(), dec_weak.upgrade()) else {
            return gst::PadProbeReturn::Ok;
        };
        let Ok(vinfo) = gstreamer_video::VideoInfo::from_caps(caps) else {
            gst::element_error!(dec, gst::StreamError::Format, ("decoded video caps are not understood: {}", caps));
            return gst::PadProbeReturn::Drop;
        };
        let par = vinfo.par();
        // For a model: the native frame (stored size, as transformers decodes it), resized to
        // the model's size later, in one step. Else: scaled here to `max_frame_pixels`.
        let model = model_size.as_ref().map(|f| {
            let (nw, nh) = (vinfo.width(), vinfo.height());
            let (h, w) = f(nh as usize, nw as usize).unwrap_or_else(|| {
                let (w, h) = fit_size(nw, nh, (1, 1), max_pixels);
                (h as usize, w as usize)
            });
            (w as u32, h as u32)
        });
        let (w, h) =
            model.unwrap_or_else(|| fit_size(vinfo.width(), vinfo.height(), (par.numer(), par.denom()), max_pixels));
        let (cw, ch, cpar) = match model {
            Some(_) => (vinfo.width(), vinfo.height(), par),
            None => (w, h, gst::Fraction::new(1, 1)),
        };
        let mut out = filter.property::<gst::Caps>("caps");
        {
            let out = out.make_mut();
            if let Some(st) = out.structure_mut(0) {
                st.set("width", cw as i32);
                st.set("height", ch as i32);
                st.set("pixel-aspect-ratio", cpar);
            }
        }
        filter.set_property("caps", &out);
        // No decoder inside: the source itself produced raw video (e.g. a raw v4l2 camera).
        let codec_caps = decoder_input_caps(&dec).unwrap_or_else(|| "video/x-raw".into());
        let fr = vinfo.fps();
        *crate::lock::lock(&caps_slot) = Some(NativeCaps {
            codec: codec_name(&codec_caps),
            codec_caps,
            width: vinfo.width(),
            height: vinfo.height(),
            framerate_num: fr.numer(),
            framerate_den: fr.denom(),
            out_width: w,
            out_height: h,
        });
        gst::PadProbeReturn::Ok
    });

    if !live {
        trim_extrapolated_tail(&rate)?;
    }

    let rate_weak = rate.downgrade();
    let pipeline_weak = pipeline.downgrade();
    dec.connect_pad_added(move |dec, pad| {
        // decodebin3 exposes pads before their caps are fixed; its pads are named after the
        // stream type (`video_0`), and carry a `gst::Stream` once known.
        let is_video = pad.name().starts_with("video")
            || pad.stream().is_some_and(|st| st.stream_type().contains(gst::StreamType::VIDEO))
            || pad
                .current_caps()
                .and_then(|c| c.structure(0).map(|st| st.name().starts_with("video/")))
                .unwrap_or(false);
        let (Some(rate), Some(pipeline)) = (rate_weak.upgrade(), pipeline_weak.upgrade()) else {
            return;
        };
        let sink = match rate.static_pad("sink") {
            Some(p) if is_video && !p.is_linked() => p,
            // Audio, or a second video stream: not ours.
            _ => {
                discard_pad(&pipeline, pad);
                return;
            }
        };
        if let Err(e) = pad.link(&sink) {
            gst::element_error!(dec, gst::CoreError::Negotiation, ("cannot link the decoded video: {:?}", e));
        }
    });

    Ok(Built { pipeline, appsink, native_caps })
}

/// The longest stretch videorate may fill by repeating a frame: ten seconds (a slow camera's
/// frame interval fits), or three frame periods at a very low sampling rate.
pub fn max_duplication(fps: f64) -> std::time::Duration {
    std::time::Duration::from_secs_f64((3.0 / fps).max(10.0))
}

fn configure_rtspsrc(src: &gst::Element, transport: RtspTransport, latency_ms: u32) {
    let protocols = match transport {
        RtspTransport::Tcp => "tcp",
        RtspTransport::Udp => "udp+udp-mcast",
        RtspTransport::Auto => "tcp+udp+udp-mcast",
    };
    if src.find_property("protocols").is_some() {
        src.set_property_from_str("protocols", protocols);
    }
    if src.find_property("latency").is_some() {
        src.set_property("latency", latency_ms);
    }
    if src.find_property("drop-on-latency").is_some() {
        src.set_property("drop-on-latency", true);
    }
}

/// At the end of a file videorate may repeat the last frame at a time past the end of the
/// content (it depends on the container's segment); such a frame shows nothing new and would
/// make frame counts depend on the muxer. Drop output frames that start at or after the end of
/// every input frame seen so far (reset on flush, i.e. when a loop seeks back).
fn trim_extrapolated_tail(rate: &gst::Element) -> Result<(), String> {
    use std::sync::atomic::{AtomicU64, Ordering};
    // Containers round timestamps (Matroska to 1 ms), so a frame ending at 3.000333 s is a
    // 3.0 s frame.
    const TOLERANCE_NS: u64 = 1_000_000;
    let end = Arc::new(AtomicU64::new(0));
    let sink = rate.static_pad("sink").ok_or("videorate has no sink pad")?;
    let src = rate.static_pad("src").ok_or("videorate has no src pad")?;
    let e = end.clone();
    sink.add_probe(gst::PadProbeType::BUFFER | gst::PadProbeType::EVENT_FLUSH, move |_pad, info| {
        match &info.data {
            Some(gst::PadProbeData::Buffer(b)) => {
                if let Some(pts) = b.pts() {
                    let stop = pts + b.duration().unwrap_or(gst::ClockTime::ZERO);
                    e.fetch_max(stop.nseconds().max(pts.nseconds() + 1), Ordering::Relaxed);
                }
            }
            Some(gst::PadProbeData::Event(ev)) if ev.type_() == gst::EventType::FlushStop => {
                e.store(0, Ordering::Relaxed)
            }
            _ => {}
        }
        gst::PadProbeReturn::Ok
    });
    src.add_probe(gst::PadProbeType::BUFFER, move |_pad, info| match &info.data {
        Some(gst::PadProbeData::Buffer(b))
            if b.pts().is_some_and(|p| p.nseconds() + TOLERANCE_NS >= end.load(Ordering::Relaxed)) =>
        {
            gst::PadProbeReturn::Drop
        }
        _ => gst::PadProbeReturn::Ok,
    });
    Ok(())
}

/// Send a pad we do not use into a fakesink, so it never returns not-linked upstream.
fn discard_pad(pipeline: &gst::Pipeline, pad: &gst::Pad) {
    let Ok(sink) = gst::ElementFactory::make("fakesink").property("sync", false).property("async", false).build()
    else {
        return;
    };
    if pipeline.add(&sink).is_err() {
        return;
    }
    let _ = sink.sync_state_with_parent();
    if let Some(sp) = sink.static_pad("sink") {
        let _ = pad.link(&sp);
    }
}

/// The caps name at the input of the video decoder inside the decodebin (e.g. `video/x-h264`).
fn decoder_input_caps(dec: &gst::Element) -> Option<String> {
    let bin = dec.downcast_ref::<gst::Bin>()?;
    for el in bin.iterate_recurse().into_iter().flatten() {
        let Some(factory) = el.factory() else { continue };
        let klass = factory.klass();
        // jpegdec (Motion-JPEG) is an image decoder.
        if klass.contains("Decoder") && (klass.contains("Video") || klass.contains("Image")) {
            let caps = el.static_pad("sink").and_then(|p| p.current_caps())?;
            return caps.structure(0).map(|s| s.name().to_string());
        }
    }
    None
}
