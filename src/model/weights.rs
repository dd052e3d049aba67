//! Reading safetensors weights one tensor at a time, with positioned reads instead of a memory
//! map. A mapped checkpoint keeps every page it touched resident until it is unmapped, so while
//! the model is built the process holds the file's pages *and* the converted tensors: twice the
//! weights at the peak (17 GB for the 2B in f32 on the CPU), which does not fit the 8–16 GB edge
//! boxes vigil runs on. Here each tensor's bytes are read into a buffer, turned into a tensor on
//! the device in the wanted dtype, and freed: the peak is the weights plus one tensor's bytes.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};

/// Where one tensor lives.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: u64,
    end: u64,
}

/// The tensors of one checkpoint (single file or shards), read on demand.
pub struct ReadSafetensors {
    files: Vec<(PathBuf, File)>,
    entries: HashMap<String, Entry>,
}

/// Headers larger than this are not a checkpoint (the format's own limit is 100 MB).
const MAX_HEADER: u64 = 100 << 20;

fn dtype_of(s: &str) -> Option<DType> {
    Some(match s {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "I64" => DType::I64,
        "U32" => DType::U32,
        "U8" => DType::U8,
        _ => return None,
    })
}

fn bad(path: &Path, msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("{}: {msg}", path.display()))
}

impl ReadSafetensors {
    /// Open the files and read their headers (not their data).
    pub fn open(paths: &[PathBuf]) -> candle_core::Result<ReadSafetensors> {
        let mut files = Vec::with_capacity(paths.len());
        let mut entries = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let f = File::open(path).map_err(|e| bad(path, e))?;
            let size = f.metadata().map_err(|e| bad(path, e))?.len();
            let mut n = [0u8; 8];
            f.read_exact_at(&mut n, 0).map_err(|e| bad(path, e))?;
            let n = u64::from_le_bytes(n);
            if n > MAX_HEADER || 8 + n > size {
                return Err(bad(path, format!("not a safetensors file (header of {n} bytes in a file of {size})")));
            }
            let mut header = vec![0u8; n as usize];
            f.read_exact_at(&mut header, 8).map_err(|e| bad(path, e))?;
            let header: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(&header).map_err(|e| bad(path, format!("safetensors header: {e}")))?;
            for (name, v) in header {
                if name == "__metadata__" {
                    continue;
                }
                let dtype = v["dtype"]
                    .as_str()
                    .and_then(dtype_of)
                    .ok_or_else(|| bad(path, format!("{name}: dtype {}", v["dtype"])))?;
                let shape: Vec<usize> = v["shape"]
                    .as_array()
                    .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
                    .ok_or_else(|| bad(path, format!("{name}: shape {}", v["shape"])))?;
                let (a, b) = match v["data_offsets"]
                    .as_array()
                    .map(|o| (o.first().and_then(|x| x.as_u64()), o.get(1).and_then(|x| x.as_u64())))
                {
                    Some((Some(a), Some(b))) if a <= b => (a, b),
                    _ => return Err(bad(path, format!("{name}: data_offsets {}", v["data_offsets"]))),
                };
                let (start, end) = (8 + n + a, 8 + n + b);
                let want = shape.iter().product::<usize>() * dtype.size_in_bytes();
                if end > size || (end - start) as usize != want {
                    return Err(bad(
                        path,
                        format!("{name}: {} bytes at {start}..{end}, expected {want} in a file of {size}", end - start),
                    ));
                }
                entries.insert(name, Entry { file: i, dtype, shape, start, end });
            }
            files.push((path.clone(), f));
        }
        Ok(ReadSafetensors { files, entries })
    }

    /// One tensor on `dev` in `dtype`; the file bytes are freed before this returns.
    pub fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() }.bt())?;
        let (path, f) = &self.files[e.file];
        let mut bytes = vec![0u8; (e.end - e.start) as usize];
        f.read_exact_at(&mut bytes, e.start).map_err(|err| bad(path, format!("{name}: {err}")))?;
        let t = Tensor::from_raw_buffer(&bytes, e.dtype, &e.shape, dev)?;
        drop(bytes);
        t.to_dtype(dtype)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
}

impl candle_nn::var_builder::SimpleBackend for ReadSafetensors {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.load(name, dtype, dev)?;
        if t.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: t.shape().clone(),
            }
            .bt());
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.contains(name)
    }
}
