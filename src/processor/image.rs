//! Images: decoding + RGB conversion, and `ImageProcessor` (resize, rescale, normalize, patchify).
//!
//! Source of truth: transformers 5 `VideoLlama3ImageProcessor` (torchvision backend,
//! `image_processing_video_llama_3.py` + `image_processing_backends.TorchvisionBackend`) and
//! `VideoLlama3ImageProcessorPil` (`image_processing_pil_video_llama_3.py` + `PilBackend`), with
//! `image_transforms.convert_to_rgb` for the RGB conversion of PIL inputs.

use std::path::Path;

use super::checkpoint::{ImageProcessorConfig, ResizeBackend};
use super::resize::{resize_pil_bicubic, resize_torchvision_bicubic_u8, smart_resize};
use super::ProcessorError;

/// An 8-bit RGB image, row-major interleaved (`height x width x 3`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    /// Wrap an interleaved RGB buffer; errors if its length is not `width * height * 3`.
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self, ProcessorError> {
        if data.len() != width * height * 3 {
            return Err(ProcessorError::Input(format!(
                "RGB buffer has {} bytes, expected {}x{}x3 = {}",
                data.len(),
                width,
                height,
                width * height * 3
            )));
        }
        Ok(Self { width, height, data })
    }

    /// Decode an image file (PNG, JPEG, BMP) and convert it to RGB the way transformers'
    /// `convert_to_rgb` does for PIL images: grayscale is replicated, transparency is composited
    /// onto an opaque white background with Pillow's `alpha_composite` arithmetic.
    pub fn open(path: &Path) -> Result<Self, ProcessorError> {
        let img = image::ImageReader::open(path)
            .map_err(|e| ProcessorError::Media { path: path.to_path_buf(), msg: e.to_string() })?
            .with_guessed_format()
            .map_err(|e| ProcessorError::Media { path: path.to_path_buf(), msg: e.to_string() })?
            .decode()
            .map_err(|e| ProcessorError::Media { path: path.to_path_buf(), msg: e.to_string() })?;
        Ok(Self::from_dynamic(img))
    }

    /// Convert an already decoded image (see [`RgbImage::open`] for the conversion rules).
    pub fn from_dynamic(img: image::DynamicImage) -> Self {
        let (w, h) = (img.width() as usize, img.height() as usize);
        if img.color().has_alpha() {
            let rgba = img.to_rgba8();
            let mut data = Vec::with_capacity(w * h * 3);
            for px in rgba.pixels() {
                let a = px[3] as u32;
                for c in 0..3 {
                    data.push(composite_on_white(px[c] as u32, a));
                }
            }
            Self { width: w, height: h, data }
        } else {
            Self { width: w, height: h, data: img.to_rgb8().into_raw() }
        }
    }
}

/// Pillow `alpha_composite(white opaque, src)` for one channel (libImaging/AlphaComposite.c,
/// 7-bit precision; with an opaque destination `coef1` reduces to `a * 128`).
fn composite_on_white(src: u32, a: u32) -> u8 {
    if a == 0 {
        return 255;
    }
    const PRECISION_BITS: u32 = 7;
    let coef1 = a * 255 * 255 * (1 << PRECISION_BITS) / (255 * 255);
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    let tmp = src * coef1 + 255 * coef2 + (0x80 << PRECISION_BITS);
    let div255 = ((tmp >> 8) + tmp) >> 8;
    (div255 >> PRECISION_BITS) as u8
}

/// Output of [`ImageProcessor::preprocess`] for a list of images.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageInputs {
    /// `rows x patch_dim`, flattened row-major (`patch_dim = 3 * temporal_patch_size * patch^2`).
    pub pixel_values: Vec<f32>,
    pub patch_dim: usize,
    /// `[t, h, w]` patch grid per image.
    pub image_grid_thw: Vec<[usize; 3]>,
    pub image_merge_sizes: Vec<usize>,
}

impl ImageInputs {
    /// Number of patch rows in `pixel_values`.
    pub fn rows(&self) -> usize {
        self.pixel_values.len().checked_div(self.patch_dim).unwrap_or(0)
    }
}

/// Rust counterpart of `VideoLlama3ImageProcessor` / `VideoLlama3ImageProcessorPil`.
///
/// ```no_run
/// use vigil::processor::{ImageProcessor, RgbImage};
/// let proc = ImageProcessor::from_pretrained("models/VideoLLaMA3-2B".as_ref())?;
/// let img = RgbImage::open("cat.jpg".as_ref())?;
/// let out = proc.preprocess(&[img])?;
/// println!("grid {:?}, {} patch rows", out.image_grid_thw, out.rows());
/// # Ok::<(), vigil::processor::ProcessorError>(())
/// ```
#[derive(Debug, Clone)]
pub struct ImageProcessor {
    pub config: ImageProcessorConfig,
}

impl ImageProcessor {
    pub fn new(config: ImageProcessorConfig) -> Self {
        Self { config }
    }

    /// Load the image processor settings of a checkpoint directory (either layout).
    pub fn from_pretrained(dir: &Path) -> Result<Self, ProcessorError> {
        Ok(Self::new(super::checkpoint::CheckpointFiles::discover(dir)?.image))
    }

    /// Target size of one image (what `smart_resize` returns), without processing it.
    pub fn target_size(&self, height: usize, width: usize) -> Result<(usize, usize), ProcessorError> {
        let c = &self.config;
        smart_resize(height, width, c.patch_size * c.merge_size, c.min_pixels, c.max_pixels)
    }

    /// Resize (if enabled) one image to its `smart_resize` target with the configured backend.
    pub fn resize(&self, img: &RgbImage) -> Result<RgbImage, ProcessorError> {
        if !self.config.do_resize {
            return Ok(img.clone());
        }
        let (h, w) = self.target_size(img.height, img.width)?;
        let data = match self.config.backend {
            ResizeBackend::Torchvision => resize_torchvision_bicubic_u8(&img.data, img.height, img.width, 3, h, w),
            ResizeBackend::Pil => resize_pil_bicubic(&img.data, img.height, img.width, 3, h, w),
        };
        Ok(RgbImage { width: w, height: h, data })
    }

    /// Process images into flat patches, as `image_processor(images)` does.
    pub fn preprocess(&self, images: &[RgbImage]) -> Result<ImageInputs, ProcessorError> {
        let c = &self.config;
        let patch_dim = 3 * c.temporal_patch_size * c.patch_size * c.patch_size;
        let mut out = ImageInputs { patch_dim, ..Default::default() };
        for img in images {
            let resized = self.resize(img)?;
            let planes = normalize_planes(&resized, &c.norm());
            let (gh, gw) = patchify_frames(
                &[planes],
                resized.height,
                resized.width,
                c.patch_size,
                c.merge_size,
                c.temporal_patch_size,
                &mut out.pixel_values,
            )?;
            out.image_grid_thw.push([1, gh, gw]);
            out.image_merge_sizes.push(c.merge_size);
        }
        Ok(out)
    }
}

/// Rescale + normalize parameters, with the float arithmetic of the selected backend.
#[derive(Debug, Clone)]
pub struct Norm {
    pub backend: ResizeBackend,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub mean: [f64; 3],
    pub std: [f64; 3],
}

impl Norm {
    /// Per-channel function u8 -> f32 as a 256-entry lookup table (exact, and fast). The
    /// engine uploads resized u8 pixels and looks them up in these tables on the device.
    pub fn table(&self, ch: usize) -> [f32; 256] {
        let mut t = [0f32; 256];
        for (v, slot) in t.iter_mut().enumerate() {
            *slot = self.apply(v as u8, ch);
        }
        t
    }

    fn apply(&self, v: u8, ch: usize) -> f32 {
        match self.backend {
            // TorchvisionBackend.rescale_and_normalize: when both are on, mean/std are divided by
            // the rescale factor (f32 tensors) and `(x - mean) / std` runs in f32 on 0..255 values.
            ResizeBackend::Torchvision => {
                let x = v as f32;
                if self.do_normalize {
                    let (mut m, mut s) = (self.mean[ch] as f32, self.std[ch] as f32);
                    if self.do_rescale {
                        let inv = (1.0 / self.rescale_factor) as f32;
                        m *= inv;
                        s *= inv;
                    }
                    (x - m) / s
                } else if self.do_rescale {
                    (x as f64 * self.rescale_factor) as f32
                } else {
                    x
                }
            }
            // PilBackend: rescale in f64 then cast to f32; normalize in f32.
            ResizeBackend::Pil => {
                let mut x = v as f32;
                if self.do_rescale {
                    x = (v as f64 * self.rescale_factor) as f32;
                }
                if self.do_normalize {
                    x = (x - self.mean[ch] as f32) / self.std[ch] as f32;
                }
                x
            }
        }
    }
}

/// Channel-first normalized planes of one image: `[3][h*w]`.
pub(crate) fn normalize_planes(img: &RgbImage, norm: &Norm) -> Vec<Vec<f32>> {
    let n = img.width * img.height;
    (0..3)
        .map(|ch| {
            let t = norm.table(ch);
            (0..n).map(|i| t[img.data[i * 3 + ch] as usize]).collect()
        })
        .collect()
}

/// Channel-first planes of one image without normalization: `[3][h*w]` bytes.
pub(crate) fn rgb_planes(img: &RgbImage) -> Vec<Vec<u8>> {
    let n = img.width * img.height;
    (0..3).map(|ch| (0..n).map(|i| img.data[i * 3 + ch]).collect()).collect()
}

/// Patchify a sequence of frames (each `[3][h*w]` planes) into rows appended to `out`.
///
/// Row order: temporal group, merged-block row, merged-block column, row within block, column
/// within block; within a row: channel, temporal index, patch row, patch column. This is the
/// `permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)` of the video processor, which for one frame equals the
/// image processor's `permute(0, 2, 5, 3, 6, 1, 4, 7)` + temporal broadcast. Frames are padded
/// by repeating the last one to a multiple of `temporal_patch_size`.
pub(crate) fn patchify_frames<T: Copy>(
    frames: &[Vec<Vec<T>>],
    height: usize,
    width: usize,
    patch: usize,
    merge: usize,
    temporal: usize,
    out: &mut Vec<T>,
) -> Result<(usize, usize), ProcessorError> {
    if patch == 0
        || merge == 0
        || temporal == 0
        || !height.is_multiple_of(patch * merge)
        || !width.is_multiple_of(patch * merge)
    {
        return Err(ProcessorError::Input(format!(
            "image of {height}x{width} cannot be cut into {patch}px patches merged {merge}x{merge} \
             (enable do_resize or pass sizes that are multiples of {})",
            patch * merge
        )));
    }
    let (gh, gw) = (height / patch, width / patch);
    let t_groups = frames.len().div_ceil(temporal);
    let frame_at = |t: usize| &frames[t.min(frames.len() - 1)];
    out.reserve(t_groups * gh * gw * 3 * temporal * patch * patch);
    for tg in 0..t_groups {
        for bh in 0..gh / merge {
            for bw in 0..gw / merge {
                for mh in 0..merge {
                    for mw in 0..merge {
                        let (py, px) = ((bh * merge + mh) * patch, (bw * merge + mw) * patch);
                        for ch in 0..3 {
                            for tt in 0..temporal {
                                let plane = &frame_at(tg * temporal + tt)[ch];
                                for y in 0..patch {
                                    let row = (py + y) * width + px;
                                    out.extend_from_slice(&plane[row..row + patch]);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    Ok((gh, gw))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composite_extremes() {
        assert_eq!(composite_on_white(10, 255), 10);
        assert_eq!(composite_on_white(10, 0), 255);
        assert_eq!(composite_on_white(0, 128), 127);
    }
}
