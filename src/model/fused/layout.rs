//! Index and layout math shared by the CUDA kernels (`kernels/attention.cu`) and their CPU twin
//! ([`super::cpu`]): which query rows a thread block owns, which keys each row may see, how the
//! keys are split for decoding, and how split results merge. Every constant and formula here has
//! a counterpart in the `.cu` file with the same name; change both together.

use std::ops::Range;

/// Keys per tile: one warp lane per key when scoring, so a tile is one warp wide.
pub const KEY_TILE: usize = 32;
/// Query rows per thread block: 4 warps × 4 rows.
pub const ROWS_PER_BLOCK: usize = 16;
/// Largest head dimension the kernels hold in registers (4 floats per lane per row).
pub const MAX_HEAD_DIM: usize = 128;
/// Blocks wanted in flight before decoding splits the keys: two waves of an H100/H200's 132 SMs.
pub const TARGET_BLOCKS: usize = 264;
/// Upper bound on key splits (the merge reads one partial per split).
pub const MAX_SPLITS: usize = 64;
/// A split gets at least this many key tiles, so its partial is worth writing.
pub const MIN_TILES_PER_SPLIT: usize = 2;

/// Element strides of a `[batch, heads, rows, head_dim]` operand whose last dimension is
/// contiguous (the KV cache's narrowed views and the vision tower's un-transposed projections
/// are read in place through these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Strides {
    pub batch: usize,
    pub head: usize,
    pub row: usize,
}

impl Strides {
    /// Strides of a contiguous `[b, heads, rows, d]` tensor.
    pub fn contiguous(heads: usize, rows: usize, d: usize) -> Self {
        Self { batch: heads * rows * d, head: rows * d, row: d }
    }

    pub fn offset(&self, b: usize, head: usize, row: usize) -> usize {
        b * self.batch + head * self.head + row * self.row
    }
}

/// One attention call as the kernels see it.
///
/// - Query head `j` reads kv head `j / groups` (GQA, transformers' `repeat_kv` order).
/// - Query row `i` sits at absolute position `past + i`, `past = k_len - q_len` (the KV cache
///   holds the earlier positions); with `causal` it sees keys at positions `≤ past + i`.
/// - `cu_seqlens` (`q_len == k_len`): rows `cu[s]..cu[s+1]` form sequence `s` and see only keys
///   of the same sequence — packed frames (vision) or packed prompts without padding.
/// - A key mask (`[batch, k_len]`, nonzero = valid, held by the caller) hides padded keys.
/// - A row that sees no key at all outputs zeros (such rows are padding; nothing reads them).
///
/// The output is `[batch, q_len, heads, head_dim]` contiguous: the layout the output
/// projection wants, so the caller's transpose back is free.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub q_len: usize,
    pub k_len: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub causal: bool,
    /// Key splits (1 unless decoding; see [`choose_splits`]).
    pub splits: usize,
    pub cu_seqlens: Option<Vec<u32>>,
    pub q: Strides,
    pub k: Strides,
    pub v: Strides,
}

impl Problem {
    /// `batch` sequences of contiguous `[heads, q_len, d]` queries over `[kv_heads, k_len, d]`
    /// keys and values: one key split, no `cu_seqlens`.
    #[allow(clippy::too_many_arguments)]
    pub fn contiguous(
        batch: usize,
        heads: usize,
        kv_heads: usize,
        q_len: usize,
        k_len: usize,
        head_dim: usize,
        scale: f32,
        causal: bool,
    ) -> Problem {
        Problem {
            batch,
            heads,
            kv_heads,
            q_len,
            k_len,
            head_dim,
            scale,
            causal,
            splits: 1,
            cu_seqlens: None,
            q: Strides::contiguous(heads, q_len, head_dim),
            k: Strides::contiguous(kv_heads, k_len, head_dim),
            v: Strides::contiguous(kv_heads, k_len, head_dim),
        }
    }

    pub fn groups(&self) -> usize {
        self.heads / self.kv_heads.max(1)
    }

    pub fn past(&self) -> usize {
        self.k_len - self.q_len
    }

    /// Rows of one (batch, kv head): its `groups` query heads' rows, position-major, so a block
    /// covers consecutive positions of all heads that share the kv head and reads each K/V tile
    /// once for all of them (decode: one block holds every head of the group).
    pub fn stacked_rows(&self) -> usize {
        self.groups() * self.q_len
    }

    /// Stacked row `r` → (query row, query head) under kv head `kvh`.
    pub fn unstack(&self, kvh: usize, r: usize) -> (usize, usize) {
        let g = self.groups();
        (r / g, kvh * g + r % g)
    }

    pub fn row_tiles(&self) -> usize {
        self.stacked_rows().div_ceil(ROWS_PER_BLOCK)
    }

    /// Thread blocks of one launch: row tiles × kv heads × batch × splits.
    pub fn blocks(&self) -> usize {
        self.row_tiles() * self.kv_heads * self.batch * self.splits
    }

    /// Keys query row `i` may see before the key mask: its sequence, cut at its position when
    /// causal.
    pub fn visible(&self, i: usize) -> Range<usize> {
        let (lo, mut hi) = match &self.cu_seqlens {
            Some(cu) => {
                let s = seq_of(cu, i);
                (cu[s] as usize, cu[s + 1] as usize)
            }
            None => (0, self.k_len),
        };
        if self.causal {
            hi = hi.min(self.past() + i + 1);
        }
        lo..hi.max(lo)
    }

    /// Keys a block whose rows span query rows `first..=last` must load: the union of their
    /// visible ranges (they are monotone in the row), within the block's split.
    pub fn block_keys(&self, first: usize, last: usize, split: usize) -> Range<usize> {
        let s = self.split_range(split);
        let lo = self.visible(first).start.max(s.start);
        let hi = self.visible(last).end.min(s.end);
        lo..hi.max(lo)
    }

    /// Keys of split `split`: equal runs of whole key tiles over `0..k_len`.
    pub fn split_range(&self, split: usize) -> Range<usize> {
        let tiles = self.k_len.div_ceil(KEY_TILE);
        let per = tiles.div_ceil(self.splits.max(1)) * KEY_TILE;
        let lo = (split * per).min(self.k_len);
        lo..((split + 1) * per).min(self.k_len)
    }

    /// Why the kernels cannot run this problem, if they cannot.
    pub fn check(&self) -> Result<(), String> {
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return Err(format!("{} query heads are not a multiple of {} kv heads", self.heads, self.kv_heads));
        }
        if self.head_dim == 0 || self.head_dim > MAX_HEAD_DIM {
            return Err(format!("head dim {} is outside 1..={MAX_HEAD_DIM}", self.head_dim));
        }
        if self.q_len > self.k_len {
            return Err(format!("{} query rows but only {} keys", self.q_len, self.k_len));
        }
        if self.splits == 0 || self.splits > MAX_SPLITS {
            return Err(format!("{} key splits (1..={MAX_SPLITS})", self.splits));
        }
        if let Some(cu) = &self.cu_seqlens {
            let ok = cu.len() >= 2
                && cu[0] == 0
                && cu.windows(2).all(|w| w[0] <= w[1])
                && *cu.last().unwrap_or(&0) as usize == self.q_len
                && self.q_len == self.k_len;
            if !ok {
                return Err(format!("cu_seqlens {cu:?} do not partition {} rows (and keys)", self.q_len));
            }
        }
        Ok(())
    }
}

/// Index of the sequence holding row `i`: the last `s` with `cu[s] ≤ i` that is not an empty
/// sequence's start (binary search; `cu` ascending, `cu[0] = 0`).
pub fn seq_of(cu: &[u32], i: usize) -> usize {
    // First index whose start is past `i`, minus one.
    let upper = cu.partition_point(|&c| c as usize <= i);
    upper.saturating_sub(1).min(cu.len().saturating_sub(2))
}

/// `cu_seqlens` of `seqs` sequences of `len` rows each (the frames of one video).
pub fn uniform_cu_seqlens(seqs: usize, len: usize) -> Vec<u32> {
    (0..=seqs).map(|s| (s * len) as u32).collect()
}

/// Key splits for a launch of `blocks` blocks (before splitting) over `k_len` keys: enough that
/// about [`TARGET_BLOCKS`] blocks run (batch-1 decode would otherwise occupy a handful of SMs),
/// never less than [`MIN_TILES_PER_SPLIT`] tiles per split.
pub fn choose_splits(blocks: usize, k_len: usize) -> usize {
    let blocks = blocks.max(1);
    if blocks >= TARGET_BLOCKS {
        return 1;
    }
    let by_work = (k_len.div_ceil(KEY_TILE) / MIN_TILES_PER_SPLIT).max(1);
    TARGET_BLOCKS.div_ceil(blocks).min(by_work).clamp(1, MAX_SPLITS)
}

/// One split's online-softmax state for one row: running max `m` of the scaled scores, sum `l`
/// of `exp(score - m)`, and `acc = Σ exp(score - m) · v`. A split that saw no key has
/// `m = -inf`, `l = 0`, `acc = 0`.
#[derive(Debug, Clone, PartialEq)]
pub struct Partial {
    pub m: f32,
    pub l: f32,
    pub acc: Vec<f32>,
}

impl Partial {
    pub fn empty(d: usize) -> Self {
        Self { m: f32::NEG_INFINITY, l: 0.0, acc: vec![0.0; d] }
    }
}

/// Combine split partials into the normalised output row: rescale each to the global max,
/// `out = Σ acc_s·e^(m_s−M) / Σ l_s·e^(m_s−M)`. Zeros when no split saw a key.
pub fn merge(parts: &[Partial], out: &mut [f32]) {
    let m = parts.iter().map(|p| p.m).fold(f32::NEG_INFINITY, f32::max);
    out.fill(0.0);
    if m == f32::NEG_INFINITY {
        return;
    }
    let mut l = 0.0f32;
    for p in parts {
        let w = (p.m - m).exp();
        l += p.l * w;
        for (o, a) in out.iter_mut().zip(&p.acc) {
            *o += a * w;
        }
    }
    if l > 0.0 {
        out.iter_mut().for_each(|o| *o /= l);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(q_len: usize, k_len: usize) -> Problem {
        Problem::contiguous(1, 6, 2, q_len, k_len, 8, 1.0, true)
    }

    #[test]
    fn seq_of_finds_each_rows_sequence_with_empty_sequences() {
        let cu = [0, 3, 3, 7, 8];
        let got: Vec<usize> = (0..8).map(|i| seq_of(&cu, i)).collect();
        assert_eq!(got, [0, 0, 0, 2, 2, 2, 2, 3]);
        assert_eq!(uniform_cu_seqlens(3, 4), [0, 4, 8, 12]);
    }

    #[test]
    fn gqa_rows_are_position_major_and_map_heads_like_repeat_kv() {
        let p = problem(5, 5);
        assert_eq!(p.groups(), 3);
        assert_eq!(p.stacked_rows(), 15);
        // kv head 1 owns query heads 3, 4, 5; stacked rows cycle through them per position.
        let rows: Vec<(usize, usize)> = (0..6).map(|r| p.unstack(1, r)).collect();
        assert_eq!(rows, [(0, 3), (0, 4), (0, 5), (1, 3), (1, 4), (1, 5)]);
        // Every (row, head) pair is owned exactly once across kv heads and stacked rows.
        let mut seen = [0; 5 * 6];
        for kvh in 0..2 {
            for r in 0..p.stacked_rows() {
                let (i, h) = p.unstack(kvh, r);
                assert_eq!(h / p.groups(), kvh);
                seen[i * 6 + h] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n == 1));
    }

    #[test]
    fn visible_keys_follow_causality_past_and_sequences() {
        let mut p = problem(3, 10); // past 7
        assert_eq!(p.visible(0), 0..8);
        assert_eq!(p.visible(2), 0..10);
        p.causal = false;
        assert_eq!(p.visible(0), 0..10);
        let mut p = problem(9, 9);
        p.cu_seqlens = Some(vec![0, 4, 9]);
        assert_eq!(p.visible(2), 0..3);
        assert_eq!(p.visible(5), 4..6);
        p.causal = false;
        assert_eq!(p.visible(5), 4..9);
        assert_eq!(p.block_keys(2, 5, 0), 0..9);
    }

    #[test]
    fn splits_cover_the_keys_once_in_whole_tiles() {
        for k_len in [1, 31, 32, 33, 100, 2400] {
            for splits in 1..=9 {
                let mut p = problem(1, k_len);
                p.splits = splits;
                let mut next = 0;
                for s in 0..splits {
                    let r = p.split_range(s);
                    assert_eq!(r.start, next.min(k_len), "k_len {k_len} splits {splits}");
                    assert!(r.start.is_multiple_of(KEY_TILE) || r.start == k_len);
                    next = r.end.max(next);
                }
                assert_eq!(next, k_len);
            }
        }
    }

    #[test]
    fn split_counts_fill_the_gpu_only_when_it_is_idle() {
        // Batch 1 decode, 2 kv heads, 2400 keys: 2 blocks → split up to the work available.
        assert_eq!(choose_splits(2, 2400), (2400usize.div_ceil(32) / 2).min(132));
        assert_eq!(choose_splits(2, 2400), 37);
        // 16 rows × 2 kv heads: 32 blocks → 9 splits bring it to ~264.
        assert_eq!(choose_splits(32, 2400), 9);
        assert_eq!(choose_splits(TARGET_BLOCKS, 100_000), 1);
        assert_eq!(choose_splits(1, 10), 1);
        assert!(choose_splits(1, 1 << 20) <= MAX_SPLITS);
    }

    #[test]
    fn merged_splits_equal_one_softmax() {
        // Scores and values of 7 keys split 3 + 4; the merge must equal the direct softmax.
        let s = [0.3f32, -1.0, 2.5, 0.0, 1.0, -0.5, 4.0];
        let v: Vec<[f32; 2]> = (0..7).map(|j| [j as f32, 1.0 - j as f32]).collect();
        let part = |r: Range<usize>| {
            let m = s[r.clone()].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut p = Partial { m, l: 0.0, acc: vec![0.0; 2] };
            for j in r {
                let w = (s[j] - m).exp();
                p.l += w;
                p.acc[0] += w * v[j][0];
                p.acc[1] += w * v[j][1];
            }
            p
        };
        let mut out = [0.0; 2];
        merge(&[part(0..3), Partial::empty(2), part(3..7)], &mut out);
        let z: f32 = s.iter().map(|x| x.exp()).sum();
        let want = [0, 1].map(|e| (0..7).map(|j| s[j].exp() * v[j][e]).sum::<f32>() / z);
        assert!((out[0] - want[0]).abs() < 1e-5 && (out[1] - want[1]).abs() < 1e-5, "{out:?} vs {want:?}");
        merge(&[Partial::empty(2)], &mut out);
        assert_eq!(out, [0.0, 0.0]);
    }

    #[test]
    fn bad_problems_are_refused() {
        let mut p = problem(4, 4);
        p.heads = 5;
        assert!(p.check().is_err());
        let mut p = problem(4, 4);
        p.head_dim = 129;
        assert!(p.check().is_err());
        let mut p = problem(4, 4);
        p.cu_seqlens = Some(vec![0, 3]);
        assert!(p.check().is_err());
        p.cu_seqlens = Some(vec![0, 3, 4]);
        assert!(p.check().is_ok());
    }
}
