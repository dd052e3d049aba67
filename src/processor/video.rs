//! Videos: frame sampling, `VideoProcessor` (per-frame pixel budget, patchify, merge 2) and the
//! token compression (pruning) mask.
//!
//! Source of truth: transformers 5 `VideoLlama3VideoProcessor`
//! (`video_processing_video_llama_3.py`: `sample_frames`, `resize`, `patchify`,
//! `_get_compression_mask`), `video_utils.VideoMetadata.timestamps` and
//! `video_processing_utils.BaseVideoProcessor._decode_and_sample_videos`.

use std::path::Path;
use std::sync::Arc;

use super::checkpoint::VideoProcessorConfig;
use super::image::{normalize_planes, patchify_frames, rgb_planes, RgbImage};
use super::resize::{resize_torchvision_bicubic_u8, smart_resize};
use super::ProcessorError;
use crate::config::PruningConfig;

/// A clip of equally sized RGB frames plus the metadata transformers keeps for it.
#[derive(Debug, Clone)]
pub struct Video {
    pub frames: Vec<RgbImage>,
    /// Seconds of each frame, used for the `Time {t:.1f}s:` prompt prefixes.
    pub timestamps: Vec<f64>,
    /// Index of each frame in the source clip.
    pub frame_indices: Vec<usize>,
}

impl Video {
    /// Frames that are already sampled (e.g. a window from a camera) taken at `fps`.
    /// Timestamps are `i / fps` in f64, as transformers computes them for a list of indices;
    /// without `fps` transformers falls back to 1 fps (with a warning), and so do we.
    pub fn from_frames(frames: Vec<RgbImage>, fps: Option<f64>) -> Result<Self, ProcessorError> {
        if fps.is_none() {
            tracing::warn!("no fps given for pre-sampled video frames; timestamps assume 1 fps (as transformers does)");
        }
        let fps = fps.unwrap_or(1.0);
        if !(fps.is_finite() && fps > 0.0) {
            return Err(ProcessorError::Input(format!("video fps must be a positive number, got {fps}")));
        }
        let frame_indices: Vec<usize> = (0..frames.len()).collect();
        let timestamps = frame_indices.iter().map(|&i| i as f64 / fps).collect();
        Ok(Self { frames, timestamps, frame_indices })
    }

    /// Sample `frames` (all frames of a clip decoded at `video_fps`) at `indices`. Timestamps are
    /// computed as transformers does for sampled (int32 tensor) indices: in f32.
    pub fn from_sampled(all_frames: Vec<RgbImage>, indices: &[usize], video_fps: f64) -> Result<Self, ProcessorError> {
        let mut frames = Vec::with_capacity(indices.len());
        let mut by_index: Vec<Option<RgbImage>> = all_frames.into_iter().map(Some).collect();
        for &i in indices {
            let f = by_index.get_mut(i).and_then(|f| f.as_ref().cloned()).ok_or_else(|| {
                ProcessorError::Input(format!(
                    "frame index {i} is past the end of the clip ({} frames)",
                    by_index.len()
                ))
            })?;
            frames.push(f);
        }
        let timestamps = indices.iter().map(|&i| ((i as i32) as f32 / video_fps as f32) as f64).collect();
        Ok(Self { frames, timestamps, frame_indices: indices.to_vec() })
    }

    /// Decode a video file with GStreamer and sample it like transformers (`sample_frames`).
    pub fn from_file(
        path: &Path,
        sampling: &FrameSampling,
        cfg: &VideoProcessorConfig,
    ) -> Result<Self, ProcessorError> {
        let decoded = super::video_file::decode_video_file(path)?;
        let total = decoded.frames.len();
        if total == 0 {
            return Err(ProcessorError::Media { path: path.into(), msg: "the video has no frames".into() });
        }
        // vigil extension: `max_frames` alone caps a clip by uniform sampling (transformers only
        // applies `max_frames` together with `fps`).
        let mut sampling = sampling.clone();
        if sampling.fps.is_none() && sampling.num_frames.is_none() {
            if let Some(n) = sampling.max_frames.filter(|&n| total > n) {
                sampling.num_frames = Some(n);
            }
        }
        let do_sample = sampling.fps.is_some() || sampling.num_frames.is_some() || cfg.do_sample_frames;
        if !do_sample {
            let indices: Vec<usize> = (0..total).collect();
            let timestamps = indices.iter().map(|&i| i as f64 / decoded.fps).collect();
            return Ok(Self { frames: decoded.frames, timestamps, frame_indices: indices });
        }
        let fps = sampling.fps.or(if sampling.num_frames.is_none() { cfg.fps } else { None });
        let num_frames = sampling.num_frames.or(if sampling.fps.is_none() { cfg.num_frames } else { None });
        let indices = sample_frame_indices(
            total,
            Some(decoded.fps),
            num_frames,
            fps,
            cfg.base.temporal_patch_size,
            sampling.min_frames.unwrap_or(cfg.min_frames),
            sampling.max_frames.unwrap_or(cfg.max_frames),
        )?;
        Self::from_sampled(decoded.frames, &indices, decoded.fps)
    }
}

/// Which frames of a video file to keep (`fps` and `num_frames` are mutually exclusive;
/// `max_frames` without either keeps at most that many frames, uniformly sampled).
#[derive(Debug, Clone, Default)]
pub struct FrameSampling {
    pub fps: Option<f64>,
    pub num_frames: Option<usize>,
    pub min_frames: Option<usize>,
    pub max_frames: Option<usize>,
}

/// `VideoLlama3VideoProcessor.sample_frames`: indices of the frames to keep.
pub fn sample_frame_indices(
    total_num_frames: usize,
    video_fps: Option<f64>,
    num_frames: Option<usize>,
    fps: Option<f64>,
    temporal_patch_size: usize,
    min_frames: usize,
    max_frames: usize,
) -> Result<Vec<usize>, ProcessorError> {
    if fps.is_some() && num_frames.is_some() {
        return Err(ProcessorError::Input("`num_frames` and `fps` are mutually exclusive, use only one".into()));
    }
    let tps = temporal_patch_size.max(1) as f64;
    let n: Option<usize> = if let Some(n) = num_frames {
        Some(((n as f64 / tps).round_ties_even() * tps) as usize)
    } else if let Some(fps) = fps {
        let vfps =
            video_fps.ok_or_else(|| ProcessorError::Input("sampling at an fps needs the video's own fps".into()))?;
        let max_frames = ((max_frames.min(total_num_frames) as f64 / tps).floor() * tps) as usize;
        let n = total_num_frames as f64 / vfps * fps;
        let n = n.max(min_frames as f64).min(max_frames as f64).min(total_num_frames as f64);
        Some(((n / tps).floor() * tps) as usize)
    } else {
        None
    };
    match n {
        Some(n) if n > total_num_frames => Err(ProcessorError::Input(format!(
            "video can't be sampled: the inferred num_frames={n} exceeds total_num_frames={total_num_frames}; lower num_frames or fps"
        ))),
        Some(0) => Err(ProcessorError::Input("video sampling selected 0 frames".into())),
        // torch.arange(0, total, total / n) in float32 (values computed in f64, stored as f32),
        // then `.int()` truncation.
        Some(n) => {
            let step = total_num_frames as f64 / n as f64;
            let size = (total_num_frames as f64 / step).ceil() as usize;
            Ok((0..size).map(|i| ((i as f64 * step) as f32) as i32 as usize).collect())
        }
        None => Ok((0..total_num_frames).collect()),
    }
}

/// Output of [`VideoProcessor::preprocess`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VideoInputs {
    /// `rows x patch_dim`, flattened row-major.
    pub pixel_values_videos: Vec<f32>,
    pub patch_dim: usize,
    /// `[t, h, w]` patch grid per video.
    pub video_grid_thw: Vec<[usize; 3]>,
    pub video_merge_sizes: Vec<usize>,
    /// One flag per merged video token of all videos (true = kept).
    pub video_compression_mask: Vec<bool>,
    /// Frame timestamps per video (seconds).
    pub timestamps: Vec<Vec<f64>>,
}

impl VideoInputs {
    pub fn rows(&self) -> usize {
        self.pixel_values_videos.len().checked_div(self.patch_dim).unwrap_or(0)
    }
    /// Merged tokens of video `i` (before pruning).
    pub fn tokens_of(&self, i: usize) -> usize {
        let [t, h, w] = self.video_grid_thw[i];
        t * h * w / (self.video_merge_sizes[i] * self.video_merge_sizes[i])
    }
    /// Kept-token mask of video `i`.
    pub fn mask_of(&self, i: usize) -> &[bool] {
        let start: usize = (0..i).map(|j| self.tokens_of(j)).sum();
        &self.video_compression_mask[start..start + self.tokens_of(i)]
    }
}

/// Rust counterpart of `VideoLlama3VideoProcessor`.
///
/// ```no_run
/// use vigil::processor::{VideoProcessor, Video, RgbImage};
/// let proc = VideoProcessor::from_pretrained("models/VideoLLaMA3-2B".as_ref())?;
/// let frames: Vec<RgbImage> = (0..4).map(|_| RgbImage::new(64, 48, vec![0; 64 * 48 * 3]).unwrap()).collect();
/// let video = Video::from_frames(frames, Some(1.0))?;
/// let out = proc.preprocess(&[video], &vigil::config::PruningConfig::default())?;
/// let kept = out.video_compression_mask.iter().filter(|k| **k).count();
/// println!("grid {:?}: {kept} of {} tokens kept", out.video_grid_thw, out.video_compression_mask.len());
/// # Ok::<(), vigil::processor::ProcessorError>(())
/// ```
#[derive(Debug, Clone)]
pub struct VideoProcessor {
    pub config: VideoProcessorConfig,
}

impl VideoProcessor {
    pub fn new(config: VideoProcessorConfig) -> Self {
        Self { config }
    }

    pub fn from_pretrained(dir: &Path) -> Result<Self, ProcessorError> {
        Ok(Self::new(super::checkpoint::CheckpointFiles::discover(dir)?.video))
    }

    /// Process videos. `pruning.enabled = false` is transformers' `use_token_compression=False`;
    /// `threshold` / `min_tokens_per_frame` are the arguments of `_get_compression_mask`
    /// (transformers always uses 0.1 / 1, the defaults of `[pruning]`).
    pub fn preprocess(&self, videos: &[Video], pruning: &PruningConfig) -> Result<VideoInputs, ProcessorError> {
        let c = &self.config.base;
        let mut out = VideoInputs { patch_dim: self.patch_dim(), ..Default::default() };
        for (vi, video) in videos.iter().enumerate() {
            let frames: Vec<FrameRef> = video.frames.iter().map(FrameRef::of).collect();
            let size = self.clip_size(vi, &frames)?;
            let planes = |f: FrameRef, s| self.normalized_planes(f, s);
            let rows =
                self.clip_rows(&frames, size, &planes, &mut |f, s| Ok(Arc::new(self.frame_rows(planes(f, s), s)?)))?;
            let (grid, mask) = self.grid_and_mask(&rows, frames.len(), size, pruning, |_, v| v);
            out.pixel_values_videos.extend_from_slice(&rows);
            out.video_compression_mask.extend(mask);
            out.video_grid_thw.push(grid);
            out.video_merge_sizes.push(c.merge_size);
            out.timestamps.push(video.timestamps.clone());
        }
        Ok(out)
    }

    /// Values per patch row: `3 · temporal_patch_size · patch_size²`, channel-major.
    pub fn patch_dim(&self) -> usize {
        let c = &self.config.base;
        3 * c.temporal_patch_size * c.patch_size * c.patch_size
    }

    /// The size every frame of a clip is resized to (the clip shares one pixel budget), after
    /// checking that its frames are equally sized RGB buffers.
    pub fn clip_size(&self, vi: usize, frames: &[FrameRef]) -> Result<(usize, usize), ProcessorError> {
        let c = &self.config.base;
        let first = frames.first().ok_or_else(|| ProcessorError::Input(format!("video {vi} has no frames")))?;
        if let Some((fi, f)) =
            frames.iter().enumerate().find(|(_, f)| (f.width, f.height) != (first.width, first.height))
        {
            return Err(ProcessorError::Input(format!(
                "video {vi}: frame {fi} is {}x{} but frame 0 is {}x{}; all frames of a video must have the same size",
                f.width, f.height, first.width, first.height
            )));
        }
        if let Some(f) = frames.iter().find(|f| f.data.len() != f.width * f.height * 3) {
            return Err(ProcessorError::Input(format!(
                "RGB buffer has {} bytes, expected {}x{}x3 = {}",
                f.data.len(),
                f.width,
                f.height,
                f.width * f.height * 3
            )));
        }
        if !c.do_resize {
            return Ok((first.height, first.width));
        }
        // The clip's pixel budget is shared by its frames ("diff from Qwen" upstream).
        smart_resize(first.height, first.width, c.patch_size * c.merge_size, c.min_pixels, c.max_pixels / frames.len())
    }

    /// A clip's patch rows at `size`: each frame's rows from `rows_of(frame, size)` —
    /// [`Self::frame_rows`] of its planes, or a cache of them (the engine's) — when frames are
    /// patchified one by one (`temporal_patch_size` 1, VideoLLaMA3's); otherwise patches span
    /// frames and every frame's `planes_of` are patchified together.
    pub fn clip_rows<T: Copy>(
        &self,
        frames: &[FrameRef],
        size: (usize, usize),
        planes_of: &FramePlanes<T>,
        rows_of: &mut FrameRows<T>,
    ) -> Result<Vec<T>, ProcessorError> {
        let c = &self.config.base;
        let mut rows = Vec::new();
        if c.temporal_patch_size == 1 {
            for f in frames {
                rows.extend_from_slice(&rows_of(*f, size)?);
            }
        } else {
            let planes: Vec<Vec<Vec<T>>> = frames.iter().map(|f| planes_of(*f, size)).collect();
            patchify_frames(&planes, size.0, size.1, c.patch_size, c.merge_size, c.temporal_patch_size, &mut rows)?;
        }
        Ok(rows)
    }

    /// The grid `[t, h, w]` of a clip of `frames` frames at `size`, and its pruning mask over the
    /// rows, whose values `value(column, v)` gives as normalized f32 (the identity for f32 rows).
    pub fn grid_and_mask<T: Copy>(
        &self,
        rows: &[T],
        frames: usize,
        size: (usize, usize),
        pruning: &PruningConfig,
        value: impl Fn(usize, T) -> f32,
    ) -> ([usize; 3], Vec<bool>) {
        let c = &self.config.base;
        let (gt, gh, gw) = (frames.div_ceil(c.temporal_patch_size), size.0 / c.patch_size, size.1 / c.patch_size);
        let tokens = gt * gh * gw / (c.merge_size * c.merge_size);
        let mask = if pruning.enabled {
            compression_mask_by(
                rows,
                [gt, gh, gw],
                c.merge_size,
                self.patch_dim(),
                pruning.threshold,
                pruning.min_tokens_per_frame,
                value,
            )
        } else {
            vec![true; tokens]
        };
        ([gt, gh, gw], mask)
    }

    /// One frame resized to the clip's `(h, w)` (transformers has no PIL video backend: videos
    /// always resize like torchvision).
    fn resized(&self, f: FrameRef, (h, w): (usize, usize)) -> RgbImage {
        let data = if (h, w) == (f.height, f.width) {
            f.data.to_vec()
        } else {
            resize_torchvision_bicubic_u8(f.data, f.height, f.width, 3, h, w)
        };
        RgbImage { width: w, height: h, data }
    }

    /// One frame resized and normalized: channel-first f32 planes.
    pub fn normalized_planes(&self, f: FrameRef, size: (usize, usize)) -> Vec<Vec<f32>> {
        normalize_planes(&self.resized(f, size), &self.config.base.norm())
    }

    /// One frame resized, not normalized: channel-first byte planes (the engine normalizes on
    /// the device, by [`super::image::Norm::table`]).
    pub fn resized_planes(&self, f: FrameRef, size: (usize, usize)) -> Vec<Vec<u8>> {
        rgb_planes(&self.resized(f, size))
    }

    /// One frame's patch rows from its planes at the clip's `size`, for a `temporal_patch_size`
    /// of 1.
    pub fn frame_rows<T: Copy>(&self, planes: Vec<Vec<T>>, size: (usize, usize)) -> Result<Vec<T>, ProcessorError> {
        let c = &self.config.base;
        let mut rows = Vec::new();
        patchify_frames(&[planes], size.0, size.1, c.patch_size, c.merge_size, 1, &mut rows)?;
        Ok(rows)
    }
}

/// How [`VideoProcessor::clip_rows`] turns a frame into channel-first planes at the clip's size.
pub type FramePlanes<'f, T> = dyn Fn(FrameRef, (usize, usize)) -> Vec<Vec<T>> + 'f;

/// Where [`VideoProcessor::clip_rows`] gets a frame's patch rows at the clip's size.
pub type FrameRows<'f, T> = dyn FnMut(FrameRef, (usize, usize)) -> Result<Arc<Vec<T>>, ProcessorError> + 'f;

/// A borrowed RGB frame (`width × height × 3` bytes) for the per-frame steps.
#[derive(Debug, Clone, Copy)]
pub struct FrameRef<'a> {
    pub width: usize,
    pub height: usize,
    pub data: &'a [u8],
}

impl<'a> FrameRef<'a> {
    pub fn of(img: &'a RgbImage) -> Self {
        Self { width: img.width, height: img.height, data: &img.data }
    }
}

/// `_get_compression_mask` for one video: a merged token is kept when the mean absolute
/// difference of its pixels (normalized values x 255) to the same token in the previous frame
/// exceeds `threshold`; the first frame is always kept; a frame with fewer than `min_tokens`
/// kept tokens keeps its first `min_tokens`.
pub fn compression_mask(
    rows: &[f32],
    grid: [usize; 3],
    merge: usize,
    patch_dim: usize,
    threshold: f64,
    min_tokens: usize,
) -> Vec<bool> {
    compression_mask_by(rows, grid, merge, patch_dim, threshold, min_tokens, |_, v| v)
}

/// [`compression_mask`] over rows whose normalized value is `value(column, v)` (column within
/// a patch row): byte rows with the normalization tables give the very same f32 values.
pub fn compression_mask_by<T: Copy>(
    rows: &[T],
    grid: [usize; 3],
    merge: usize,
    patch_dim: usize,
    threshold: f64,
    min_tokens: usize,
    value: impl Fn(usize, T) -> f32,
) -> Vec<bool> {
    let [t, h, w] = grid;
    let per_frame = h * w / (merge * merge);
    if t == 1 {
        return vec![true; per_frame];
    }
    let feat = merge * merge * patch_dim;
    let mut mask = vec![true; t * per_frame];
    for f in 1..t {
        for tok in 0..per_frame {
            let cur = &rows[(f * per_frame + tok) * feat..(f * per_frame + tok + 1) * feat];
            let prev = &rows[((f - 1) * per_frame + tok) * feat..((f - 1) * per_frame + tok + 1) * feat];
            // torch: f32 difference, abs, mean, * 255.
            let sum: f64 = cur
                .iter()
                .zip(prev)
                .enumerate()
                .map(|(j, (&a, &b))| (value(j % patch_dim, a) - value(j % patch_dim, b)).abs() as f64)
                .sum();
            let diff = (sum / feat as f64) as f32 * 255.0f32;
            // torch compares the f32 tensor with the threshold cast to f32.
            mask[f * per_frame + tok] = diff > threshold as f32;
        }
        let row = &mut mask[f * per_frame..(f + 1) * per_frame];
        if row.iter().filter(|k| **k).count() < min_tokens {
            for k in row.iter_mut().take(min_tokens) {
                *k = true;
            }
        }
    }
    mask
}

/// What changed in a clip, by the pruning measure: per frame, the video tokens kept against the
/// frame before beyond the frame's minimum (0 for the first), and the clip's token count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameChanges {
    pub per_frame: Vec<usize>,
    pub total: usize,
}

impl FrameChanges {
    /// The share of the clip's tokens that changed: 0 for a frozen scene. What the motion gate
    /// (`skip_static`) compares with `min_changed_fraction`.
    pub fn fraction(&self) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        self.per_frame.iter().sum::<usize>() as f64 / self.total as f64
    }
}

impl VideoProcessor {
    /// What changed in `video` by this checkpoint's pruning measure (computed whether or not
    /// pruning is enabled for the model).
    pub fn changes_of(&self, video: Video, pruning: &PruningConfig) -> Result<FrameChanges, ProcessorError> {
        let n = video.frames.len();
        let pruning = PruningConfig { enabled: true, ..pruning.clone() };
        let inputs = self.preprocess(&[video], &pruning)?;
        let mask = &inputs.video_compression_mask;
        Ok(FrameChanges { per_frame: changes_per_frame(mask, n, pruning.min_tokens_per_frame), total: mask.len() })
    }
}

impl Video {
    /// A window's buffered frames as a clip sampled at `fps`.
    pub fn from_window(w: &crate::window::Window, fps: f64) -> Result<Video, ProcessorError> {
        let frames = w
            .frames
            .iter()
            .map(|f| RgbImage::new(f.width as usize, f.height as usize, f.data.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        Video::from_frames(frames, Some(fps))
    }
}

/// Per frame, the tokens a compression `mask` keeps beyond the frame's `min_tokens` (0 for the
/// first frame, which is always kept whole).
pub fn changes_per_frame(mask: &[bool], frames: usize, min_tokens: usize) -> Vec<usize> {
    if mask.is_empty() || frames == 0 {
        return vec![0; frames];
    }
    let per_frame = (mask.len() / frames).max(1);
    mask.chunks(per_frame)
        .enumerate()
        .map(|(i, f)| if i == 0 { 0 } else { f.iter().filter(|k| **k).count().saturating_sub(min_tokens) })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_fraction_counts_what_moved_beyond_each_frames_minimum() {
        // 3 frames of 4 tokens; the first is always kept.
        let changes =
            |mask: &[bool], frames| FrameChanges { per_frame: changes_per_frame(mask, frames, 1), total: mask.len() };
        let frozen = [true, true, true, true, true, false, false, false, true, false, false, false];
        assert_eq!(changes(&frozen, 3).per_frame, [0, 0, 0]);
        assert_eq!(changes(&frozen, 3).fraction(), 0.0);
        let moving = [true, true, true, true, true, true, false, false, true, true, true, false];
        assert_eq!(changes(&moving, 3).per_frame, [0, 1, 2]);
        assert_eq!(changes(&moving, 3).fraction(), 3.0 / 12.0);
        assert_eq!(changes(&[true; 4], 1).fraction(), 0.0, "one frame: nothing to compare");
    }

    #[test]
    fn sampling_matches_transformers() {
        assert_eq!(sample_frame_indices(12, Some(6.0), None, Some(2.0), 1, 2, 8).unwrap(), vec![0, 3, 6, 9]);
        assert_eq!(sample_frame_indices(12, Some(6.0), Some(5), None, 1, 2, 8).unwrap(), vec![0, 2, 4, 7, 9]);
        assert!(sample_frame_indices(12, Some(6.0), Some(5), Some(1.0), 1, 2, 8).is_err());
        assert!(sample_frame_indices(3, Some(6.0), Some(5), None, 1, 2, 8).is_err());
    }
}
