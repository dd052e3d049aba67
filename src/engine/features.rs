//! Per-frame vision features, cached by content so overlapping windows encode each frame once.
//!
//! Why this is exact: VideoLLaMA3's vision tower attends within one frame only (transformers'
//! `cu_seqlens` split per frame, `modeling_video_llama_3.py`), and `pixel_unshuffle` + the
//! projector act per frame, so a frame's projected features depend only on its patch rows and
//! its patch grid. The key is a 128-bit hash of exactly those rows (the resized, normalized
//! pixels the encoder sees) plus the grid: a changed resized size (a window with a different
//! frame count shares the video pixel budget differently) is a different key. Content, not
//! pointers: freed `Arc<Frame>`s can reuse an address for different pixels. When the engine
//! preprocesses a frame itself it keys it by its RGB bytes and target size instead
//! ([`FrameKey::of_rgb`]), which determine those rows: one hash per frame serves both caches.

use std::collections::{BTreeMap, HashMap};

use xxhash_rust::xxh3::Xxh3;

use candle_core::Tensor;

/// Identity of one frame as the vision encoder sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrameKey {
    pub hash: u128,
    /// Patch grid of the frame (`h`, `w` in patches) after resizing.
    pub grid_h: usize,
    pub grid_w: usize,
}

impl FrameKey {
    /// Key of a frame from its patch rows (`f32`, flattened) and patch grid.
    pub fn of(rows: &[f32], grid_h: usize, grid_w: usize) -> Self {
        let mut h = Xxh3::with_seed(0x5649_4749_4c5f_4131);
        for n in [grid_h, grid_w, rows.len()] {
            h.update(&(n as u64).to_le_bytes());
        }
        let mut buf = [0u8; 4096];
        for chunk in rows.chunks(1024) {
            for (i, v) in chunk.iter().enumerate() {
                buf[i * 4..i * 4 + 4].copy_from_slice(&v.to_bits().to_le_bytes());
            }
            h.update(&buf[..chunk.len() * 4]);
        }
        FrameKey { hash: h.digest128(), grid_h, grid_w }
    }

    /// Key of a decoded RGB8 frame (`width`x`height`) to be resized to `out_h`x`out_w`: same
    /// bytes, same size, same target → same patch rows and so the same vision features (the
    /// engine hashes each frame once and keys both caches with it). 128 bits make a collision,
    /// which would silently reuse another frame's features, negligible.
    pub fn of_rgb(data: &[u8], width: usize, height: usize, out_h: usize, out_w: usize) -> Self {
        let mut h = Xxh3::with_seed(0x5649_4749_4c5f_5231);
        for n in [width, height, out_h, out_w, data.len()] {
            h.update(&(n as u64).to_le_bytes());
        }
        h.update(data);
        FrameKey { hash: h.digest128(), grid_h: out_h, grid_w: out_w }
    }
}

/// LRU cache of projected per-frame features (`[tokens, text_hidden]` on the model's device).
pub type FeatureCache = LruCache<Tensor>;

/// A bounded least-recently-used map from [`FrameKey`]s.
#[derive(Debug)]
pub struct LruCache<V> {
    capacity: usize,
    entries: HashMap<FrameKey, (V, u64)>,
    /// Last-use tick → key, oldest first.
    order: BTreeMap<u64, FrameKey>,
    tick: u64,
}

impl<V: Clone> LruCache<V> {
    pub fn new(capacity: usize) -> Self {
        Self { capacity, entries: HashMap::new(), order: BTreeMap::new(), tick: 0 }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The features of `key`, marking them most recently used.
    pub fn get(&mut self, key: &FrameKey) -> Option<V> {
        self.tick += 1;
        let tick = self.tick;
        let (t, last) = self.entries.get_mut(key)?;
        self.order.remove(last);
        *last = tick;
        self.order.insert(tick, *key);
        Some(t.clone())
    }

    /// Store features; the least recently used entries make room.
    pub fn insert(&mut self, key: FrameKey, features: V) {
        if self.capacity == 0 {
            return;
        }
        self.tick += 1;
        if let Some((_, last)) = self.entries.insert(key, (features, self.tick)) {
            self.order.remove(&last);
        }
        self.order.insert(self.tick, key);
        while self.entries.len() > self.capacity {
            let Some((_, oldest)) = self.order.pop_first() else { break };
            self.entries.remove(&oldest);
        }
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.order.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: f32) -> Tensor {
        Tensor::new(&[v], &Device::Cpu).unwrap()
    }

    #[test]
    fn keys_follow_content_and_grid() {
        let a = vec![0.5f32; 3000];
        let mut b = a.clone();
        assert_eq!(FrameKey::of(&a, 4, 6), FrameKey::of(&b, 4, 6));
        b[2999] = 0.25;
        assert_ne!(FrameKey::of(&a, 4, 6), FrameKey::of(&b, 4, 6));
        // Same bytes, different resized grid: a different frame for the encoder.
        assert_ne!(FrameKey::of(&a, 4, 6), FrameKey::of(&a, 6, 4));
    }

    #[test]
    fn lru_evicts_the_least_recently_used() {
        let k = |i: u8| FrameKey::of(&[i as f32], 1, 1);
        let mut c = FeatureCache::new(2);
        c.insert(k(1), t(1.0));
        c.insert(k(2), t(2.0));
        assert!(c.get(&k(1)).is_some()); // 1 is now newer than 2
        c.insert(k(3), t(3.0));
        assert_eq!(c.len(), 2);
        assert!(c.get(&k(2)).is_none(), "2 was least recently used");
        assert!(c.get(&k(1)).is_some() && c.get(&k(3)).is_some());
        let mut off = FeatureCache::new(0);
        off.insert(k(1), t(1.0));
        assert!(off.get(&k(1)).is_none());
    }
}
