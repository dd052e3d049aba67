//! `vigil probe`: open one stream, report its native caps and the first N windows, so a user can
//! check a camera before configuring it.
//!
//! The probe runs the same pipeline and windower as the daemon, with no reconnects (the first
//! error is the answer) and files read as fast as possible.

use std::time::{Duration, Instant};

use super::{EventKind, NativeCaps, SourceManager, SourceOptions, SourceSpec, StreamState};
use crate::config::StreamDefaults;
use crate::window::Window;

#[derive(Debug, Clone)]
pub struct ProbeOptions {
    pub fps: f64,
    pub window_seconds: f64,
    pub stride_seconds: f64,
    /// Windows to read before stopping.
    pub windows: usize,
    /// Time allowed to open the stream (first frame) and, after that, for each window beyond its
    /// own length.
    pub timeout: Duration,
    pub max_frame_pixels: u64,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        let d = StreamDefaults::default();
        ProbeOptions {
            fps: d.fps,
            window_seconds: d.window_seconds,
            stride_seconds: d.stride_seconds,
            windows: 3,
            timeout: Duration::from_secs(10),
            max_frame_pixels: d.max_frame_pixels,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{0}")]
    Setup(#[from] super::SourceError),
    #[error("cannot open {uri}: {error}")]
    Open { uri: String, error: String },
    #[error("cannot open {uri}: no video within {secs:.0} s")]
    Timeout { uri: String, secs: f64 },
    #[error("{uri}: stream failed after it opened: {error}")]
    Failed { uri: String, error: String },
    #[error("{uri}: no window within {secs:.0} s")]
    WindowTimeout { uri: String, secs: f64 },
}

/// What the probe saw.
pub enum ProbeEvent<'a> {
    Caps(&'a NativeCaps),
    Window(&'a Window),
}

/// How the probe ended.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeSummary {
    pub caps: Option<NativeCaps>,
    pub windows: usize,
    /// The stream ended (a file) before the requested number of windows.
    pub ended_early: bool,
}

/// Probe `uri`, calling `on` for the caps (once, first) and each window.
pub fn probe(uri: &str, opts: &ProbeOptions, mut on: impl FnMut(ProbeEvent<'_>)) -> Result<ProbeSummary, ProbeError> {
    let settings = StreamDefaults {
        fps: opts.fps,
        window_seconds: opts.window_seconds,
        stride_seconds: opts.stride_seconds,
        max_frame_pixels: opts.max_frame_pixels,
        realtime: false,
        loop_: false,
        ..StreamDefaults::default()
    };
    let spec = SourceSpec::from_uri("probe", uri, settings)?;
    let shown = spec.redacted_uri();
    let (mut mgr, mut events) = SourceManager::new(SourceOptions {
        queue_capacity: opts.windows.clamp(1, 64),
        start_timeout: opts.timeout,
        max_retries: Some(0),
        ..SourceOptions::default()
    })?;
    let rx = mgr.add(spec)?;
    let started = Instant::now();
    let mut caps: Option<NativeCaps> = None;
    let mut opened: Option<Instant> = None;
    let mut ended = false;
    let mut count = 0usize;
    let mut late_error: Option<String> = None;
    let per_window = Duration::from_secs_f64(opts.window_seconds.max(opts.stride_seconds)) + opts.timeout;
    let result = loop {
        while let Ok(ev) = events.try_recv() {
            match ev.kind {
                EventKind::Caps(c) => {
                    if caps.is_none() {
                        on(ProbeEvent::Caps(&c));
                        caps = Some(c);
                    }
                }
                EventKind::State(StreamState::Streaming) => {
                    opened.get_or_insert_with(Instant::now);
                }
                EventKind::State(StreamState::Failed { error })
                | EventKind::State(StreamState::Reconnecting { error, .. }) => {
                    ended = true;
                    // Failed after opening: the windows already made are still reported first.
                    late_error = Some(error);
                }
                EventKind::State(StreamState::Stopped) => ended = true,
                EventKind::State(_) => {}
            }
            if ended && opened.is_none() {
                break;
            }
        }
        let Some(t_open) = opened else {
            if ended {
                // Failed before the first frame: the error is the answer.
                let error = late_error.take().unwrap_or_else(|| "the stream ended before any video".into());
                break Err(ProbeError::Open { uri: shown.clone(), error });
            }
            if started.elapsed() > opts.timeout + Duration::from_secs(2) {
                break Err(ProbeError::Timeout { uri: shown.clone(), secs: opts.timeout.as_secs_f64() });
            }
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        if caps.is_none() {
            // Caps are emitted just before `streaming`; wait for them so they print first.
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        match rx.recv_timeout(Duration::from_millis(50)) {
            Some(w) => {
                on(ProbeEvent::Window(&w));
                count += 1;
                if count >= opts.windows {
                    break Ok(ProbeSummary { caps: caps.clone(), windows: count, ended_early: false });
                }
            }
            None => {
                if rx.is_closed() && rx.is_empty() {
                    break match late_error.take() {
                        Some(error) => Err(ProbeError::Failed { uri: shown.clone(), error }),
                        None => Ok(ProbeSummary { caps: caps.clone(), windows: count, ended_early: true }),
                    };
                }
                let since = t_open.elapsed().saturating_sub(per_window * count as u32);
                if since > per_window {
                    break Err(ProbeError::WindowTimeout { uri: shown.clone(), secs: per_window.as_secs_f64() });
                }
            }
        }
    };
    mgr.shutdown(Duration::from_secs(5));
    result
}

/// The caps line `vigil probe` prints.
pub fn caps_line(c: &NativeCaps, fps: f64, json: bool) -> String {
    if json {
        serde_json::json!({
            "type": "caps",
            "codec": c.codec,
            "codec_caps": c.codec_caps,
            "width": c.width,
            "height": c.height,
            "framerate": format!("{}/{}", c.framerate_num, c.framerate_den),
            "out_width": c.out_width,
            "out_height": c.out_height,
            "fps": fps,
        })
        .to_string()
    } else {
        let rate = if c.framerate_num > 0 {
            format!(
                "{:.3} fps ({}/{})",
                c.framerate_num as f64 / c.framerate_den.max(1) as f64,
                c.framerate_num,
                c.framerate_den
            )
        } else {
            "variable frame rate".into()
        };
        format!(
            "stream: {} ({}), {}x{}, {}; sampled as {}x{} RGB at {} fps",
            c.codec, c.codec_caps, c.width, c.height, rate, c.out_width, c.out_height, fps
        )
    }
}

/// The line `vigil probe` prints for a window.
pub fn window_line(w: &Window, json: bool) -> String {
    let (width, height) = w.frames.first().map(|f| (f.width, f.height)).unwrap_or((0, 0));
    if json {
        serde_json::json!({
            "type": "window",
            "seq": w.seq,
            "frames": w.frames.len(),
            "start_s": w.start_s,
            "end_s": w.end_s,
            "first_frame_s": w.first_time_s(),
            "last_frame_s": w.last_time_s(),
            "expected_frames": w.expected_frames,
            "missing": w.missing,
            "partial": w.partial,
            "width": width,
            "height": height,
        })
        .to_string()
    } else {
        let mut s = format!(
            "window {}: {} frame{}, frames {:.3}–{:.3} s (window {:.3}–{:.3} s), {}x{}",
            w.seq,
            w.frames.len(),
            if w.frames.len() == 1 { "" } else { "s" },
            w.first_time_s(),
            w.last_time_s(),
            w.start_s,
            w.end_s,
            width,
            height
        );
        if w.partial {
            s.push_str(", partial (end of stream)");
        }
        if w.missing > 0 {
            s.push_str(&format!(", {} missing", w.missing));
        }
        s
    }
}
