//! The kernels' CPU twin: the same blocks, key tiles, online softmax, key splits and merge as
//! `kernels/attention.cu`, in plain Rust over f32. It is what `attention = "fused"` runs on the
//! CPU (so the self-check and its fallback run end to end without a GPU), and the tests check
//! it against the reference path, which proves the index and layout math the CUDA code shares.

use super::layout::{merge, Partial, Problem, KEY_TILE, ROWS_PER_BLOCK};

/// `q`, `k`, `v` are whole buffers read through `p`'s strides from element 0 (callers slice at
/// each tensor's start offset); `key_mask` is `[batch, k_len]`, nonzero = valid. Returns
/// `[batch, q_len, heads, head_dim]`.
pub fn attend(p: &Problem, q: &[f32], k: &[f32], v: &[f32], key_mask: Option<&[f32]>) -> Vec<f32> {
    let d = p.head_dim;
    let mut out = vec![0f32; p.batch * p.q_len * p.heads * d];
    let rows = p.stacked_rows();
    let mut scores = [f32::NEG_INFINITY; KEY_TILE];
    for b in 0..p.batch {
        for kvh in 0..p.kv_heads {
            // One iteration = the thread blocks of one row tile, all splits.
            for tile in 0..p.row_tiles() {
                let r0 = tile * ROWS_PER_BLOCK;
                let r1 = (r0 + ROWS_PER_BLOCK).min(rows);
                let first = p.unstack(kvh, r0).0;
                let last = p.unstack(kvh, r1 - 1).0;
                let mut parts: Vec<Vec<Partial>> = vec![Vec::with_capacity(p.splits); r1 - r0];
                for split in 0..p.splits {
                    let keys = p.block_keys(first, last, split);
                    let mut state: Vec<Partial> = (r0..r1).map(|_| Partial::empty(d)).collect();
                    let mut t0 = keys.start;
                    while t0 < keys.end {
                        let t1 = (t0 + KEY_TILE).min(keys.end);
                        for (st, r) in state.iter_mut().zip(r0..r1) {
                            let (i, h) = p.unstack(kvh, r);
                            let visible = p.visible(i);
                            let qrow = &q[p.q.offset(b, h, i)..][..d];
                            for (j, key) in (t0..t0 + KEY_TILE).enumerate() {
                                let valid = key < t1
                                    && visible.contains(&key)
                                    && key_mask.is_none_or(|m| m[b * p.k_len + key] != 0.0);
                                scores[j] = if valid {
                                    let krow = &k[p.k.offset(b, kvh, key)..][..d];
                                    qrow.iter().zip(krow).map(|(a, b)| a * b).sum::<f32>() * p.scale
                                } else {
                                    f32::NEG_INFINITY
                                };
                            }
                            online_update(st, &scores, |j| &v[p.v.offset(b, kvh, t0 + j)..][..d]);
                        }
                        t0 = t1;
                    }
                    for (part, st) in parts.iter_mut().zip(state) {
                        part.push(st);
                    }
                }
                for (part, r) in parts.iter().zip(r0..r1) {
                    let (i, h) = p.unstack(kvh, r);
                    let o = ((b * p.q_len + i) * p.heads + h) * d;
                    merge(part, &mut out[o..o + d]);
                }
            }
        }
    }
    out
}

/// One key tile's online-softmax step for one row (the kernel's per-warp update): rescale the
/// running sums to the new max, add this tile's `exp(score - max)` and weighted values. Masked
/// keys carry `-inf` scores and weigh nothing; a tile that leaves the row without any visible
/// key changes nothing (`-inf - -inf` would be NaN).
pub(crate) fn online_update<'a>(st: &mut Partial, scores: &[f32; KEY_TILE], value: impl Fn(usize) -> &'a [f32]) {
    let tile_max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let m_new = st.m.max(tile_max);
    if m_new == f32::NEG_INFINITY {
        return;
    }
    let corr = (st.m - m_new).exp();
    st.l *= corr;
    st.acc.iter_mut().for_each(|a| *a *= corr);
    for (j, &s) in scores.iter().enumerate() {
        let w = (s - m_new).exp();
        if w == 0.0 {
            continue;
        }
        st.l += w;
        for (a, x) in st.acc.iter_mut().zip(value(j)) {
            *a += w * x;
        }
    }
    st.m = m_new;
}
