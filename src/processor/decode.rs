//! Decoding a video file to RGB frames with GStreamer (`filesrc ! decodebin ! videoconvert !
//! appsink caps=video/x-raw,format=RGB`). transformers decodes with torchcodec / PyAV; for
//! lossless clips (the parity fixture uses FFV1) both give identical frames.

use std::path::Path;

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;

use super::image::RgbImage;
use super::ProcessorError;

/// All frames of a clip and its nominal frame rate.
#[derive(Debug)]
pub struct DecodedVideo {
    pub frames: Vec<RgbImage>,
    pub fps: f64,
}

/// Decode every frame of `path` to RGB.
pub fn decode_video_file(path: &Path) -> Result<DecodedVideo, ProcessorError> {
    let err = |msg: String| ProcessorError::Media { path: path.into(), msg };
    if !path.is_file() {
        return Err(err("no such file".into()));
    }
    gst::init().map_err(|e| err(format!("GStreamer init failed: {e}")))?;
    let pipeline = gst::Pipeline::new();
    let src = gst::ElementFactory::make("filesrc").property("location", path.to_string_lossy().as_ref()).build().map_err(|e| err(e.to_string()))?;
    let decode = gst::ElementFactory::make("decodebin").build().map_err(|e| err(e.to_string()))?;
    let convert = gst::ElementFactory::make("videoconvert").build().map_err(|e| err(e.to_string()))?;
    let caps = gst_video::VideoCapsBuilder::new().format(gst_video::VideoFormat::Rgb).build();
    let sink = gst_app::AppSink::builder().caps(&caps).sync(false).build();
    pipeline.add_many([&src, &decode, &convert, sink.upcast_ref()]).map_err(|e| err(e.to_string()))?;
    src.link(&decode).map_err(|e| err(e.to_string()))?;
    convert.link(&sink).map_err(|e| err(e.to_string()))?;
    let convert_weak = convert.downgrade();
    decode.connect_pad_added(move |_, pad| {
        let Some(convert) = convert_weak.upgrade() else { return };
        let is_video = pad.current_caps().and_then(|c| c.structure(0).map(|s| s.name().starts_with("video/"))).unwrap_or(false);
        let sinkpad = convert.static_pad("sink").expect("videoconvert has a sink pad");
        if is_video && !sinkpad.is_linked() {
            let _ = pad.link(&sinkpad);
        }
    });
    pipeline.set_state(gst::State::Playing).map_err(|e| err(format!("cannot start decoding: {e}")))?;

    let mut frames = Vec::new();
    let mut fps = None;
    let bus = pipeline.bus().expect("pipeline has a bus");
    // Poll in short slices so that a decoding error (posted on the bus) is reported at once;
    // give up if no frame arrives for 10 s.
    let mut last_progress = std::time::Instant::now();
    let result = loop {
        if let Some(msg) = bus.pop_filtered(&[gst::MessageType::Error]) {
            if let gst::MessageView::Error(e) = msg.view() {
                break Err(err(format!("decoding failed: {}", e.error())));
            }
        }
        let Some(sample) = sink.try_pull_sample(gst::ClockTime::from_mseconds(50)) else {
            if sink.is_eos() {
                break Ok(());
            }
            if last_progress.elapsed() > std::time::Duration::from_secs(10) {
                break Err(err("timed out waiting for a frame".into()));
            }
            continue;
        };
        last_progress = std::time::Instant::now();
        let info = match sample.caps().ok_or_else(|| err("sample without caps".into())).and_then(|c| gst_video::VideoInfo::from_caps(c).map_err(|e| err(e.to_string()))) {
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
    let fps = fps.ok_or_else(|| err("the stream declares no frame rate".into()))?;
    Ok(DecodedVideo { frames, fps })
}
