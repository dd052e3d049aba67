//! `vigil preprocess`: what a prompt costs — tokens, visual tokens before/after pruning, grids.
//!
//! Media go before the text in one user turn: images in the order given, then the `--video`
//! clip, then the `--frames` clip (transformers' processor sees the same conversation).

use std::path::PathBuf;

use serde::Serialize;

use super::{CallOptions, ContentPart, FrameSampling, Message, Processor, ProcessorError, RgbImage, Video};
use crate::config::PruningConfig;

/// A prompt about media for a checkpoint: what `vigil preprocess` measures and `vigil infer`
/// answers (one line of an `infer --batch` file).
#[derive(Debug, Clone, Default)]
pub struct PromptRequest {
    pub model: PathBuf,
    pub prompt: String,
    pub images: Vec<PathBuf>,
    pub video: Option<PathBuf>,
    /// With `video`: sample at this rate. With `frames`: the rate the frames were taken at.
    pub fps: Option<f64>,
    /// With `video`: at most this many frames (uniformly sampled when `fps` is not given).
    pub max_frames: Option<usize>,
    pub frames: Vec<PathBuf>,
    pub pruning: PruningConfig,
}

/// Per-media summary.
#[derive(Debug, Clone, Serialize)]
pub struct MediaReport {
    pub kind: &'static str,
    pub source: String,
    /// Original height, width.
    pub size_hw: [usize; 2],
    pub grid_thw: [usize; 3],
    pub tokens_total: usize,
    pub tokens_kept: usize,
    /// Frame timestamps (videos only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub timestamps: Vec<f64>,
}

/// Result of [`preprocess`]; serialised as the `--json` output.
#[derive(Debug, Clone, Serialize)]
pub struct PreprocessReport {
    pub input_ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub text_tokens: usize,
    pub image_tokens: usize,
    pub image_grid_thw: Vec<[usize; 3]>,
    pub video_grid_thw: Vec<[usize; 3]>,
    pub video_tokens_total: usize,
    pub video_tokens_kept: usize,
    pub pixel_values_sum: f64,
    pub pixel_rows: usize,
    pub pruning: bool,
    pub pruning_threshold: f64,
    pub prompt: String,
    pub media: Vec<MediaReport>,
}

/// A request's media, loaded, and its user turn (shared by `vigil preprocess` and `vigil infer`).
#[derive(Debug, Clone)]
pub struct LoadedRequest {
    /// The user turn's content: images, the `video` clip, the `frames` clip, then the prompt.
    pub parts: Vec<ContentPart>,
    pub images: Vec<RgbImage>,
    pub videos: Vec<Video>,
    /// ("image" | "video", description) per media item, images first.
    pub sources: Vec<(&'static str, String)>,
}

impl LoadedRequest {
    /// A request from media already in memory (e.g. a window of frames): images first, then the
    /// videos, then the prompt, like `vigil infer`'s flags.
    pub fn new(prompt: &str, images: Vec<RgbImage>, videos: Vec<Video>) -> Self {
        let mut parts: Vec<ContentPart> =
            images.iter().map(|_| ContentPart::Image).chain(videos.iter().map(|_| ContentPart::Video)).collect();
        parts.push(ContentPart::Text { text: prompt.to_string() });
        let sources = images
            .iter()
            .map(|i| ("image", format!("{}x{} image", i.width, i.height)))
            .chain(videos.iter().map(|v| ("video", format!("{} frames", v.frames.len()))))
            .collect();
        Self { parts, images, videos, sources }
    }

    /// The one-turn conversation the processor renders.
    pub fn conversation(&self) -> Vec<Message> {
        vec![Message::user(self.parts.clone())]
    }

    /// Original (height, width) of each media item, images first.
    pub fn sizes(&self) -> Vec<[usize; 2]> {
        self.images
            .iter()
            .map(|i| [i.height, i.width])
            .chain(self.videos.iter().map(|v| [v.frames[0].height, v.frames[0].width]))
            .collect()
    }
}

impl PromptRequest {
    /// Decode the request's images and videos (videos sampled with the checkpoint's video
    /// settings) and build its user turn. `model` and `pruning` are not used here.
    pub fn load_media(&self, processor: &Processor) -> Result<LoadedRequest, ProcessorError> {
        let req = self;
        let mut parts = Vec::new();
        let mut images = Vec::new();
        let mut sources = Vec::new();
        for p in &req.images {
            images.push(RgbImage::open(p)?);
            parts.push(ContentPart::Image);
            sources.push(("image", p.display().to_string()));
        }
        let mut videos = Vec::new();
        if let Some(v) = &req.video {
            if req.max_frames == Some(0) {
                return Err(ProcessorError::Input("--max-frames must be at least 1".into()));
            }
            let sampling = FrameSampling { fps: req.fps, max_frames: req.max_frames, ..Default::default() };
            videos.push(Video::from_file(v, &sampling, &processor.video_processor.config)?);
            parts.push(ContentPart::Video);
            sources.push(("video", v.display().to_string()));
        }
        if !req.frames.is_empty() {
            let frames = req.frames.iter().map(|p| RgbImage::open(p)).collect::<Result<Vec<_>, _>>()?;
            videos.push(Video::from_frames(frames, req.fps)?);
            parts.push(ContentPart::Video);
            sources.push(("video", format!("{} frames ({} ...)", req.frames.len(), req.frames[0].display())));
        }
        parts.push(ContentPart::Text { text: req.prompt.clone() });
        Ok(LoadedRequest { parts, images, videos, sources })
    }
}

/// Run the processor of `req.model` on the request.
pub fn preprocess(req: &PromptRequest) -> Result<PreprocessReport, ProcessorError> {
    let processor = Processor::from_pretrained(&req.model)?;
    let LoadedRequest { parts, images, videos, sources } = req.load_media(&processor)?;
    let prompts = processor.apply_chat_template(&[vec![Message::user(parts)]], true)?;
    let sizes: Vec<[usize; 2]> = images
        .iter()
        .map(|i| [i.height, i.width])
        .chain(videos.iter().map(|v| [v.frames[0].height, v.frames[0].width]))
        .collect();
    let opts = CallOptions { pruning: req.pruning.clone(), ..Default::default() };
    let out = processor.call(&prompts, &images, &videos, &opts)?;

    let ids = out.input_ids[0].clone();
    let image_tokens = ids.iter().filter(|&&t| t == out.image_token_id).count();
    let video_tokens_kept = ids.iter().filter(|&&t| t == out.video_token_id).count();
    let mut media = Vec::new();
    let m = processor.image_processor.config.merge_size;
    for (i, g) in out.images.image_grid_thw.iter().enumerate() {
        let n = g[0] * g[1] * g[2] / (m * m);
        media.push(MediaReport {
            kind: "image",
            source: sources[i].1.clone(),
            size_hw: sizes[i],
            grid_thw: *g,
            tokens_total: n,
            tokens_kept: n,
            timestamps: vec![],
        });
    }
    for (i, g) in out.videos.video_grid_thw.iter().enumerate() {
        let j = images.len() + i;
        let mask = out.videos.mask_of(i);
        media.push(MediaReport {
            kind: "video",
            source: sources[j].1.clone(),
            size_hw: sizes[j],
            grid_thw: *g,
            tokens_total: mask.len(),
            tokens_kept: mask.iter().filter(|k| **k).count(),
            timestamps: out.videos.timestamps[i].clone(),
        });
    }
    Ok(PreprocessReport {
        prompt_tokens: ids.len(),
        text_tokens: ids.len() - image_tokens - video_tokens_kept,
        image_tokens,
        image_grid_thw: out.images.image_grid_thw.clone(),
        video_grid_thw: out.videos.video_grid_thw.clone(),
        video_tokens_total: out.videos.video_compression_mask.len(),
        video_tokens_kept,
        pixel_values_sum: out.pixel_values_sum(),
        pixel_rows: out.images.rows() + out.videos.rows(),
        pruning: req.pruning.enabled,
        pruning_threshold: req.pruning.threshold,
        prompt: prompts[0].clone(),
        input_ids: ids,
        media,
    })
}

impl PreprocessReport {
    /// Human-readable summary (what `vigil preprocess` prints without `--json`).
    pub fn human(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "prompt tokens: {} (text {}, image {}, video {})",
            self.prompt_tokens, self.text_tokens, self.image_tokens, self.video_tokens_kept
        );
        for (i, m) in self.media.iter().enumerate() {
            let [t, h, w] = m.grid_thw;
            if m.kind == "image" {
                let _ = writeln!(
                    s,
                    "  {} {}: {} ({}x{} px) grid {t}x{h}x{w} -> {} tokens",
                    m.kind,
                    i + 1,
                    m.source,
                    m.size_hw[1],
                    m.size_hw[0],
                    m.tokens_total
                );
            } else {
                let span = match (m.timestamps.first(), m.timestamps.last()) {
                    (Some(a), Some(b)) => format!(", {:.1}s..{:.1}s", a, b),
                    _ => String::new(),
                };
                let _ = writeln!(
                    s,
                    "  {} {}: {} ({}x{} px, {} frames{span}) grid {t}x{h}x{w} -> {} tokens, {} kept after pruning",
                    m.kind,
                    i + 1,
                    m.source,
                    m.size_hw[1],
                    m.size_hw[0],
                    m.timestamps.len(),
                    m.tokens_total,
                    m.tokens_kept
                );
            }
        }
        if self.video_tokens_total > 0 {
            let pct =
                100.0 * (self.video_tokens_total - self.video_tokens_kept) as f64 / self.video_tokens_total as f64;
            let _ = writeln!(
                s,
                "visual tokens: video {} before pruning, {} after ({pct:.0}% pruned; pruning {}, threshold {})",
                self.video_tokens_total,
                self.video_tokens_kept,
                if self.pruning { "on" } else { "off" },
                self.pruning_threshold
            );
        }
        let _ = writeln!(s, "pixel values: {} patch rows, sum {:.6}", self.pixel_rows, self.pixel_values_sum);
        s
    }
}
