//! Decoding a video file to RGB frames with GStreamer (`filesrc ! decodebin ! videoconvert !
//! appsink caps=video/x-raw,format=RGB`; a URL goes through `uridecodebin`). transformers
//! decodes with torchcodec / PyAV; for lossless clips (the parity fixture uses FFV1) both give
//! identical frames. A stream that declares no frame rate (variable rate, MJPEG at 0/1) gets its
//! average rate from the frames' timestamps, as PyAV's `average_rate` would.

use std::path::Path;

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;

use super::image::RgbImage;
use super::ProcessorError;

const NO_VIDEO: &str = "no decodable video stream in it (audio only, or no decoder for its codec?)";

/// All frames of a clip and its nominal frame rate.
#[derive(Debug)]
pub struct DecodedVideo {
    pub frames: Vec<RgbImage>,
    pub fps: f64,
}

/// Decode every frame of `path` (a file, or an `http(s)://`, `rtsp://`, ... URL) to RGB.
pub fn decode_video_file(path: &Path) -> Result<DecodedVideo, ProcessorError> {
    let err =
        |msg: String| ProcessorError::Media { path: crate::config::redact_uri(&path.to_string_lossy()).into(), msg };
    let text = path.to_string_lossy();
    let url = text.contains("://").then(|| url::Url::parse(&text).ok()).flatten().filter(|u| u.scheme() != "file");
    if url.is_none() && !path.is_file() {
        return Err(err(if path.exists() { "not a regular file".into() } else { "no such file".into() }));
    }
    gst::init().map_err(|e| err(format!("GStreamer init failed: {e}")))?;
    let pipeline = gst::Pipeline::new();
    let make = |factory: &str| gst::ElementFactory::make(factory).build().map_err(|e| err(format!("{factory}: {e}")));
    let decode = match &url {
        Some(u) => {
            let d = make("uridecodebin")?;
            d.set_property("uri", u.as_str());
            pipeline.add(&d).map_err(|e| err(e.to_string()))?;
            d
        }
        None => {
            let src = make("filesrc")?;
            src.set_property("location", text.as_ref());
            let d = make("decodebin")?;
            pipeline.add_many([&src, &d]).map_err(|e| err(e.to_string()))?;
            src.link(&d).map_err(|e| err(e.to_string()))?;
            d
        }
    };
    let convert = make("videoconvert")?;
    let caps = gst_video::VideoCapsBuilder::new().format(gst_video::VideoFormat::Rgb).build();
    let sink = gst_app::AppSink::builder().caps(&caps).sync(false).build();
    pipeline.add_many([&convert, sink.upcast_ref()]).map_err(|e| err(e.to_string()))?;
    convert.link(&sink).map_err(|e| err(e.to_string()))?;
    let convert_weak = convert.downgrade();
    decode.connect_pad_added(move |_, pad| {
        let Some(convert) = convert_weak.upgrade() else { return };
        let is_video =
            pad.current_caps().and_then(|c| c.structure(0).map(|s| s.name().starts_with("video/"))).unwrap_or(false);
        let sinkpad = convert.static_pad("sink").expect("videoconvert has a sink pad");
        if is_video && !sinkpad.is_linked() {
            let _ = pad.link(&sinkpad);
        }
    });
    // Set once decodebin has exposed every pad it will: if none was video, no frame will come.
    // GStreamer then usually posts a not-linked error too, but not always (the stream can end
    // inside decodebin's queues first), and without this the wait would end only at the timeout.
    let all_pads = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = all_pads.clone();
    decode.connect_no_more_pads(move |_| flag.store(true, std::sync::atomic::Ordering::SeqCst));
    pipeline.set_state(gst::State::Playing).map_err(|e| err(format!("cannot start decoding: {e}")))?;

    let mut frames = Vec::new();
    let mut fps = None;
    // Timestamps of the first and last frame, for a stream without a declared rate.
    let mut pts: (Option<gst::ClockTime>, Option<gst::ClockTime>) = (None, None);
    let bus = pipeline.bus().expect("pipeline has a bus");
    // Poll in short slices so that a decoding error (posted on the bus) is reported at once;
    // give up if no frame arrives for 10 s.
    let mut last_progress = std::time::Instant::now();
    let result = loop {
        if let Some(msg) = bus.pop_filtered(&[gst::MessageType::Error]) {
            if let gst::MessageView::Error(e) = msg.view() {
                let linked = convert.static_pad("sink").is_some_and(|p| p.is_linked());
                let from = e.src().map(|s| s.name().to_string()).unwrap_or_default();
                // GStreamer's own text is often just "Internal data stream error": say more.
                let what = match (linked, url.is_some()) {
                    (false, true) if from == "source" => "cannot read the URL (server unreachable, or it refused)",
                    (false, _) => NO_VIDEO,
                    (true, _) => "decoding failed",
                };
                let debug = e.debug().map(|d| d.lines().last().unwrap_or("").to_string()).unwrap_or_default();
                break Err(err(crate::config::redact_uri(&format!("{what}: {} [{from}: {debug}]", e.error()))));
            }
        }
        let Some(sample) = sink.try_pull_sample(gst::ClockTime::from_mseconds(50)) else {
            if sink.is_eos() {
                break Ok(());
            }
            if all_pads.load(std::sync::atomic::Ordering::SeqCst)
                && !convert.static_pad("sink").is_some_and(|p| p.is_linked())
            {
                break Err(err(NO_VIDEO.into()));
            }
            if last_progress.elapsed() > std::time::Duration::from_secs(10) {
                break Err(err("timed out waiting for a frame".into()));
            }
            continue;
        };
        last_progress = std::time::Instant::now();
        let info = match sample
            .caps()
            .ok_or_else(|| err("sample without caps".into()))
            .and_then(|c| gst_video::VideoInfo::from_caps(c).map_err(|e| err(e.to_string())))
        {
            Ok(i) => i,
            Err(e) => break Err(e),
        };
        if fps.is_none() {
            let f = info.fps();
            if f.numer() > 0 && f.denom() > 0 {
                fps = Some(f.numer() as f64 / f.denom() as f64);
            }
        }
        let Some(buffer) = sample.buffer() else { continue };
        if let Some(t) = buffer.pts() {
            pts.0.get_or_insert(t);
            pts.1 = Some(t);
        }
        let frame = match gst_video::VideoFrameRef::from_buffer_ref_readable(buffer, &info) {
            Ok(f) => f,
            Err(e) => break Err(err(format!("cannot map frame: {e}"))),
        };
        let (w, h) = (info.width() as usize, info.height() as usize);
        let stride = info.stride()[0] as usize;
        let plane = match frame.plane_data(0) {
            Ok(p) => p,
            Err(e) => break Err(err(format!("cannot read frame: {e}"))),
        };
        // GStreamer pads RGB rows to 4 bytes; copy row by row.
        let mut data = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            data.extend_from_slice(&plane[y * stride..y * stride + w * 3]);
        }
        frames.push(RgbImage { width: w, height: h, data });
    };
    let _ = pipeline.set_state(gst::State::Null);
    result?;
    let fps = match (fps, pts) {
        (Some(f), _) => f,
        (None, (Some(first), Some(last))) if frames.len() > 1 && last > first => {
            (frames.len() - 1) as f64 / (last - first).seconds_f64()
        }
        // One frame (or no timestamps): its rate does not matter for sampling.
        (None, _) if !frames.is_empty() => 1.0,
        (None, _) => return Err(err("no video frame in it".into())),
    };
    Ok(DecodedVideo { frames, fps })
}
