//! Pixels cross to the device as bytes: the engine's patch rows hold resized, not yet normalized
//! RGB values (a quarter of the f32 upload, and of the pixel cache), and the device normalizes
//! them by looking each byte up in the processor's per-channel tables — the very f32 values the
//! processor computes on the host (`Norm::table`), so the result is bit for bit the same.

use candle_core::{DType, Device, Tensor};

use crate::processor::image::Norm;

/// The normalization tables on the device.
#[derive(Debug)]
pub struct PixelNorm {
    /// `[3 · 256]`: channel `c`'s value of byte `v` at `c · 256 + v`.
    table: Tensor,
    /// `[patch_dim]`: `256 ×` the channel of each column of a patch row (rows are channel-major).
    offsets: Tensor,
}

impl PixelNorm {
    pub fn new(norm: &Norm, patch_dim: usize, device: &Device) -> candle_core::Result<Self> {
        let table: Vec<f32> = (0..3).flat_map(|c| norm.table(c)).collect();
        let per_channel = (patch_dim / 3).max(1);
        let offsets: Vec<u32> = (0..patch_dim).map(|col| (col / per_channel * 256) as u32).collect();
        Ok(Self {
            table: Tensor::from_vec(table, 3 * 256, device)?,
            offsets: Tensor::from_vec(offsets, patch_dim, device)?,
        })
    }

    /// Normalized f32 patch rows `[rows, patch_dim]` from byte rows (host), uploaded as bytes.
    pub fn upload(&self, rows: Vec<u8>, patch_dim: usize) -> candle_core::Result<Tensor> {
        let n = rows.len() / patch_dim.max(1);
        let bytes = Tensor::from_vec(rows, (n, patch_dim), self.table.device())?;
        let idx = bytes.to_dtype(DType::U32)?.broadcast_add(&self.offsets)?.flatten_all()?;
        self.table.index_select(&idx, 0)?.reshape((n, patch_dim))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processor::checkpoint::ResizeBackend;

    #[test]
    fn device_lookup_equals_host_normalization() {
        for backend in [ResizeBackend::Torchvision, ResizeBackend::Pil] {
            let norm = Norm {
                backend,
                do_rescale: true,
                rescale_factor: 1.0 / 255.0,
                do_normalize: true,
                mean: [0.5, 0.4, 0.3],
                std: [0.25, 0.5, 0.2],
            };
            // Two rows of 3 channels × 4 values; every byte value appears in each channel.
            let patch_dim = 12;
            let rows: Vec<u8> = (0..patch_dim * 64).map(|i| (i * 37 % 256) as u8).collect();
            let got = PixelNorm::new(&norm, patch_dim, &Device::Cpu)
                .unwrap()
                .upload(rows.clone(), patch_dim)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let tables = [norm.table(0), norm.table(1), norm.table(2)];
            let want: Vec<f32> = rows.iter().enumerate().map(|(i, &v)| tables[i % patch_dim / 4][v as usize]).collect();
            assert_eq!(got.len(), want.len());
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{backend:?}");
        }
    }
}
