// Fused attention for vigil: one pass over the keys per block of query rows, online softmax in
// f32, bf16/f16/f32 in and out. The index math mirrors src/model/fused/layout.rs (same constant
// and function names) and the algorithm its CPU twin src/model/fused/cpu.rs, which the tests
// check against the reference path; keep the three in step.
//
// Layout (element strides, last dimension contiguous):
//   q   [batch, heads,    q_len, head_dim]   strides q_sb, q_sh, q_sr
//   k,v [batch, kv_heads, k_len, head_dim]   strides k_*, v_* (the KV cache's narrowed views)
//   out [batch, q_len, heads, head_dim]      contiguous
// Query head j reads kv head j / groups. Query row i sits at position past + i
// (past = k_len - q_len); causal rows see keys <= past + i. With cu_seqlens (q_len == k_len),
// row i sees only keys of its own sequence. key_mask [batch, k_len] (f32, nonzero = valid) or
// null. A row that sees no key writes zeros.
//
// Grid: x = row tile (ROWS_PER_BLOCK stacked rows), y = kv head, z = batch * splits.
// Stacked rows of a (batch, kv head) are position-major over its query heads (row r is query
// row r / groups of head kvh * groups + r % groups): a block reads each K/V tile once for every
// query head sharing it. Block: NWARPS warps, each owning ROWS_PER_WARP rows. Per key tile,
// lane j scores key j for each of its warp's rows (one shared-memory read of k per 4 rows), the
// warp reduces max and sum, and each lane accumulates head_dim / 32 output columns (one read of
// v per 4 rows).
//
// Simple by design (no tensor cores): it is correct first; the self-check runs it against the
// reference on every model load before it is used.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define WARP 32
#define NWARPS 4
#define ROWS_PER_WARP 4
#define ROWS_PER_BLOCK (NWARPS * ROWS_PER_WARP)
#define KEY_TILE 32
#define MAX_HEAD_DIM 128
#define COLS_PER_LANE (MAX_HEAD_DIM / WARP)

// Must match `Params` in src/model/fused/cuda.rs (#[repr(C)]): 64-bit fields first, no padding.
struct Params {
    long long q_sb, q_sh, q_sr;
    long long k_sb, k_sh, k_sr;
    long long v_sb, v_sh, v_sr;
    int batch, heads, kv_heads, q_len, k_len, head_dim;
    int causal, splits, num_seqs;
    float scale;
};

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_max(float x) {
    for (int o = WARP / 2; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}
__device__ __forceinline__ float warp_sum(float x) {
    for (int o = WARP / 2; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// layout.rs `seq_of`: the last s with cu[s] <= i, capped to the last sequence.
__device__ int seq_of(const unsigned* cu, int num_seqs, int i) {
    int lo = 0, hi = num_seqs + 1;  // partition point over cu[0..=num_seqs]
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if ((int)cu[mid] <= i) lo = mid + 1; else hi = mid;
    }
    int s = lo - 1;
    if (s < 0) s = 0;
    if (s > num_seqs - 1) s = num_seqs - 1;
    return s;
}

// layout.rs `Problem::visible`: keys [*lo, *hi) row i may see before the key mask.
__device__ void visible(const Params& p, const unsigned* cu, int i, int* lo, int* hi) {
    int a = 0, b = p.k_len;
    if (cu) {
        int s = seq_of(cu, p.num_seqs, i);
        a = (int)cu[s];
        b = (int)cu[s + 1];
    }
    if (p.causal) b = min(b, p.k_len - p.q_len + i + 1);
    *lo = a;
    *hi = max(a, b);
}

// layout.rs `Problem::split_range`.
__device__ void split_range(const Params& p, int split, int* lo, int* hi) {
    int tiles = (p.k_len + KEY_TILE - 1) / KEY_TILE;
    int per = ((tiles + p.splits - 1) / p.splits) * KEY_TILE;
    *lo = min(split * per, p.k_len);
    *hi = min((split + 1) * per, p.k_len);
}

// One block: ROWS_PER_BLOCK stacked rows of (batch b, kv head kvh), keys of one split.
// SPLIT = false writes normalised rows to `out`; true writes the split's partial state
// (m, l, acc) for attn_merge.
template <typename T, bool SPLIT>
__device__ void attn_block(const Params p, const T* __restrict__ q, const T* __restrict__ k,
                           const T* __restrict__ v, const float* __restrict__ key_mask,
                           const unsigned* __restrict__ cu, T* __restrict__ out,
                           float* __restrict__ part_acc, float* __restrict__ part_ml) {
    __shared__ float qs[ROWS_PER_BLOCK][MAX_HEAD_DIM];
    // +1 column: lane j reads row j, and rows MAX_HEAD_DIM + 1 apart fall in distinct banks.
    __shared__ float ks[KEY_TILE][MAX_HEAD_DIM + 1];
    __shared__ float vs[KEY_TILE][MAX_HEAD_DIM + 1];

    const int d = p.head_dim;
    const int groups = p.heads / p.kv_heads;
    const int stacked = groups * p.q_len;
    const int r0 = blockIdx.x * ROWS_PER_BLOCK;
    const int kvh = blockIdx.y;
    const int b = blockIdx.z / p.splits;
    const int split = blockIdx.z % p.splits;
    const int warp = threadIdx.x / WARP;
    const int lane = threadIdx.x % WARP;
    if (r0 >= stacked) return;  // whole block idle: uniform, before any barrier
    const int r_last = min(r0 + ROWS_PER_BLOCK, stacked) - 1;

    // The block's query rows, f32, zero beyond the last row.
    for (int idx = threadIdx.x; idx < ROWS_PER_BLOCK * d; idx += blockDim.x) {
        int rr = idx / d, e = idx % d, r = r0 + rr;
        float x = 0.f;
        if (r < stacked) {
            int i = r / groups, h = kvh * groups + r % groups;
            x = to_f(q[b * p.q_sb + h * p.q_sh + (long long)i * p.q_sr + e]);
        }
        qs[rr][e] = x;
    }

    // layout.rs `Problem::block_keys`: the union of the rows' visible keys within the split.
    int lo, hi, a, z, s_lo, s_hi;
    visible(p, cu, r0 / groups, &lo, &z);
    visible(p, cu, r_last / groups, &a, &hi);
    split_range(p, split, &s_lo, &s_hi);
    lo = max(lo, s_lo);
    hi = max(lo, min(hi, s_hi));

    // This warp's rows: their positions and visible ranges.
    float m[ROWS_PER_WARP], l[ROWS_PER_WARP], acc[ROWS_PER_WARP][COLS_PER_LANE];
    int row_lo[ROWS_PER_WARP], row_hi[ROWS_PER_WARP];
    bool row_ok[ROWS_PER_WARP];
#pragma unroll
    for (int w = 0; w < ROWS_PER_WARP; w++) {
        int r = r0 + warp * ROWS_PER_WARP + w;
        row_ok[w] = r < stacked;
        row_lo[w] = 0;
        row_hi[w] = 0;
        if (row_ok[w]) visible(p, cu, r / groups, &row_lo[w], &row_hi[w]);
        m[w] = -INFINITY;
        l[w] = 0.f;
#pragma unroll
        for (int c = 0; c < COLS_PER_LANE; c++) acc[w][c] = 0.f;
    }

    for (int t0 = lo; t0 < hi; t0 += KEY_TILE) {
        const int t1 = min(t0 + KEY_TILE, hi);
        __syncthreads();  // the previous tile is consumed (and the queries stored, first time)
        for (int idx = threadIdx.x; idx < KEY_TILE * d; idx += blockDim.x) {
            int j = idx / d, e = idx % d, key = t0 + j;
            float kx = 0.f, vx = 0.f;
            if (key < t1) {
                kx = to_f(k[b * p.k_sb + kvh * p.k_sh + (long long)key * p.k_sr + e]);
                vx = to_f(v[b * p.v_sb + kvh * p.v_sh + (long long)key * p.v_sr + e]);
            }
            ks[j][e] = kx;
            vs[j][e] = vx;
        }
        __syncthreads();
        const int key = t0 + lane;
        const bool key_ok = key < t1 && (key_mask == nullptr || key_mask[(long long)b * p.k_len + key] != 0.f);
        // Scores: lane j dots key j with each of the warp's rows, reading k once for all rows.
        float s[ROWS_PER_WARP];
#pragma unroll
        for (int w = 0; w < ROWS_PER_WARP; w++) s[w] = 0.f;
        for (int e = 0; e < d; e++) {
            const float kx = ks[lane][e];
#pragma unroll
            for (int w = 0; w < ROWS_PER_WARP; w++) s[w] += qs[warp * ROWS_PER_WARP + w][e] * kx;
        }
        // cpu.rs `online_update`: rescale to the new max, weigh this tile's keys. m_new is
        // warp-uniform; a row that still sees no key keeps its state (its weights are 0).
        float pj[ROWS_PER_WARP];
#pragma unroll
        for (int w = 0; w < ROWS_PER_WARP; w++) {
            const bool ok = row_ok[w] && key_ok && key >= row_lo[w] && key < row_hi[w];
            s[w] = ok ? s[w] * p.scale : -INFINITY;
            const float m_new = fmaxf(m[w], warp_max(s[w]));
            pj[w] = 0.f;
            if (m_new == -INFINITY) continue;
            const float corr = expf(m[w] - m_new);
            pj[w] = expf(s[w] - m_new);
            l[w] = l[w] * corr + warp_sum(pj[w]);
#pragma unroll
            for (int c = 0; c < COLS_PER_LANE; c++) acc[w][c] *= corr;
            m[w] = m_new;
        }
        // Values: each lane owns columns lane + 32c; v is read once per key for all rows.
        for (int j = 0; j < KEY_TILE; j++) {
            float vx[COLS_PER_LANE];
#pragma unroll
            for (int c = 0; c < COLS_PER_LANE; c++) {
                const int e = lane + c * WARP;
                vx[c] = e < d ? vs[j][e] : 0.f;
            }
#pragma unroll
            for (int w = 0; w < ROWS_PER_WARP; w++) {
                const float pw = __shfl_sync(0xffffffffu, pj[w], j);
#pragma unroll
                for (int c = 0; c < COLS_PER_LANE; c++) acc[w][c] += pw * vx[c];
            }
        }
    }

#pragma unroll
    for (int w = 0; w < ROWS_PER_WARP; w++) {
        if (!row_ok[w]) continue;
        const int r = r0 + warp * ROWS_PER_WARP + w;
        const int i = r / groups, h = kvh * groups + r % groups;
        if (SPLIT) {
            // Partials [batch, splits, heads, q_len] (× head_dim for acc; × 2 for m, l).
            const long long row = (((long long)b * p.splits + split) * p.heads + h) * p.q_len + i;
#pragma unroll
            for (int c = 0; c < COLS_PER_LANE; c++) {
                const int e = lane + c * WARP;
                if (e < d) part_acc[row * d + e] = acc[w][c];
            }
            if (lane == 0) {
                part_ml[row * 2] = m[w];
                part_ml[row * 2 + 1] = l[w];
            }
        } else {
            const float inv = l[w] > 0.f ? 1.f / l[w] : 0.f;
            const long long o = (((long long)b * p.q_len + i) * p.heads + h) * d;
#pragma unroll
            for (int c = 0; c < COLS_PER_LANE; c++) {
                const int e = lane + c * WARP;
                if (e < d) out[o + e] = from_f<T>(acc[w][c] * inv);
            }
        }
    }
}

// layout.rs `merge`: one block of 32 threads per output row (batch, query row, head).
template <typename T>
__device__ void attn_merge_row(const Params p, const float* __restrict__ part_acc,
                               const float* __restrict__ part_ml, T* __restrict__ out) {
    const int idx = blockIdx.x;  // (b * q_len + i) * heads + h
    const int h = idx % p.heads;
    const int i = (idx / p.heads) % p.q_len;
    const int b = idx / (p.heads * p.q_len);
    const int d = p.head_dim;
    float mx = -INFINITY;
    for (int s = 0; s < p.splits; s++) {
        const long long row = (((long long)b * p.splits + s) * p.heads + h) * p.q_len + i;
        mx = fmaxf(mx, part_ml[row * 2]);
    }
    float l = 0.f;
    if (mx != -INFINITY) {
        for (int s = 0; s < p.splits; s++) {
            const long long row = (((long long)b * p.splits + s) * p.heads + h) * p.q_len + i;
            l += part_ml[row * 2 + 1] * expf(part_ml[row * 2] - mx);
        }
    }
    for (int e = threadIdx.x; e < d; e += blockDim.x) {
        float o = 0.f;
        if (mx != -INFINITY) {
            for (int s = 0; s < p.splits; s++) {
                const long long row = (((long long)b * p.splits + s) * p.heads + h) * p.q_len + i;
                o += part_acc[row * d + e] * expf(part_ml[row * 2] - mx);
            }
            if (l > 0.f) o /= l;
        }
        out[(long long)idx * d + e] = from_f<T>(o);
    }
}

// Entry points, by kernel and dtype. vision and prefill differ only in the parameters they are
// launched with (cu_seqlens / causal / key mask); they are separate symbols so each is loaded and
// self-checked on its own.
#define ENTRY(NAME, T)                                                                              \
    extern "C" __global__ void __launch_bounds__(NWARPS * WARP)                                     \
        attn_vision_##NAME(const Params p, const T* q, const T* k, const T* v, const float* mask,   \
                           const unsigned* cu, T* out) {                                            \
        attn_block<T, false>(p, q, k, v, mask, cu, out, nullptr, nullptr);                         \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(NWARPS * WARP)                                     \
        attn_prefill_##NAME(const Params p, const T* q, const T* k, const T* v, const float* mask,  \
                            const unsigned* cu, T* out) {                                           \
        attn_block<T, false>(p, q, k, v, mask, cu, out, nullptr, nullptr);                         \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(NWARPS * WARP)                                     \
        attn_decode_##NAME(const Params p, const T* q, const T* k, const T* v, const float* mask,   \
                           const unsigned* cu, float* part_acc, float* part_ml) {                   \
        attn_block<T, true>(p, q, k, v, mask, cu, nullptr, part_acc, part_ml);                      \
    }                                                                                               \
    extern "C" __global__ void attn_merge_##NAME(const Params p, const float* part_acc,             \
                                                 const float* part_ml, T* out) {                    \
        attn_merge_row<T>(p, part_acc, part_ml, out);                                              \
    }

ENTRY(f32, float)
ENTRY(f16, __half)
ENTRY(bf16, __nv_bfloat16)
