//! The bridge from the processor to the model: a [`BatchInputs`] (token ids, masks and pixel
//! rows as plain vectors) becomes the [`MultimodalInputs`] tensors the model takes.

use candle_core::{DType, Device, Tensor};

use super::{ModelError, MultimodalInputs, VisualInputs};
use crate::processor::BatchInputs;

impl MultimodalInputs {
    /// The processor's output as the model's inputs, on `device`.
    pub fn from_batch(batch: &BatchInputs, device: &Device) -> Result<MultimodalInputs, ModelError> {
        let (b, l) = (batch.input_ids.len(), batch.seq_len);
        let ids: Vec<u32> = batch.input_ids.iter().flatten().copied().collect();
        let input_ids = Tensor::from_vec(ids, (b, l), device)?;
        let padded = batch.attention_mask.iter().flatten().any(|&m| m == 0);
        let attention_mask = if padded {
            let m: Vec<u8> = batch.attention_mask.iter().flatten().copied().collect();
            Some(Tensor::from_vec(m, (b, l), device)?.to_dtype(DType::F32)?)
        } else {
            None
        };
        let im = &batch.images;
        let images = if im.image_grid_thw.is_empty() {
            None
        } else {
            Some(VisualInputs {
                pixel_values: Tensor::from_vec(im.pixel_values.clone(), (im.rows(), im.patch_dim), device)?,
                grid_thw: im.image_grid_thw.clone(),
                merge_sizes: im.image_merge_sizes.clone(),
            })
        };
        let vd = &batch.videos;
        let (videos, video_compression_mask) = if vd.video_grid_thw.is_empty() {
            (None, None)
        } else {
            (
                Some(VisualInputs {
                    pixel_values: Tensor::from_vec(vd.pixel_values_videos.clone(), (vd.rows(), vd.patch_dim), device)?,
                    grid_thw: vd.video_grid_thw.clone(),
                    merge_sizes: vd.video_merge_sizes.clone(),
                }),
                Some(vd.video_compression_mask.clone()),
            )
        };
        Ok(MultimodalInputs {
            attention_mask,
            images,
            videos,
            video_compression_mask,
            ..MultimodalInputs::text(input_ids)
        })
    }
}
