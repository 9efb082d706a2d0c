// Paged attention for decode: one new query token per sequence attending to its
// whole cached context. vLLM-v2 style: a CTA handles HPC query heads that share one
// KV head (GQA: each K/V row is read once for the group) over one PARTITION of the
// context; long contexts are split over several CTAs ("flash-decoding") whose
// partial results (max, sum, unnormalised output) are merged by a reduction kernel.
#include "common.cuh"

constexpr int DECODE_THREADS = 128;
constexpr int DECODE_WARPS = DECODE_THREADS / 32;
// CTAs per SM the registers must allow: the rows loaded ahead would otherwise take the
// kernel from 80 to 93 registers and from 6 to 5 CTAs per SM, which large batches feel
// (256 x 512 tokens: 209 against 199 µs on an H100).
constexpr int DECODE_MIN_BLOCKS = 6;
// The most context tokens per CTA (the shared-memory logits); the host picks the
// partition size at or below it (src/cuda.rs, DECODE_MAX_PARTITION).
constexpr int PARTITION = 512;
constexpr float LOG2E = 1.4426950408889634f;

struct MaxOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

// Reduces each of the N per-thread values over the whole block; every thread gets
// the results. Ends with a barrier so `scratch` can be reused right away.
template <int N, typename Op>
__device__ __forceinline__ void block_reduce(float v[N], float (*scratch)[N], Op op) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
    for (int h = 0; h < N; ++h) {
#pragma unroll
        for (int off = 16; off > 0; off /= 2) v[h] = op(v[h], __shfl_xor_sync(0xffffffffu, v[h], off));
        if (lane == 0) scratch[warp][h] = v[h];
    }
    __syncthreads();
#pragma unroll
    for (int h = 0; h < N; ++h) {
        v[h] = scratch[0][h];
#pragma unroll
        for (int w = 1; w < DECODE_WARPS; ++w) v[h] = op(v[h], scratch[w][h]);
    }
    __syncthreads();
}

// Visible keys of a decode query at position ctx - 1: [first, ctx).
__device__ __forceinline__ int first_visible(int ctx, int window) {
    return window > 0 ? max(0, ctx - window) : 0;
}

// out: [seqs, heads, D] (written when num_parts == 1); part_max/part_sum:
// [seqs, heads, num_parts]; part_out: [seqs, heads, num_parts, D] (split mode).
template <typename T, int D, int HPC>
__device__ void paged_attention_decode(T* __restrict__ out, float* __restrict__ part_max,
                                       float* __restrict__ part_sum, float* __restrict__ part_out,
                                       const T* __restrict__ q, const T* __restrict__ k_cache,
                                       const T* __restrict__ v_cache, const uint32_t* __restrict__ block_tables,
                                       const uint32_t* __restrict__ context_lens, int num_heads, int num_kv_heads,
                                       int max_blocks, int block_shift, uint32_t num_blocks, float scale,
                                       int window, int num_parts, int partition) {
    constexpr int TPT = D / VEC;               // threads sharing one token row (16 B each)
    constexpr int TPI = DECODE_THREADS / TPT;  // tokens the block covers per step
    constexpr int UNROLL = 4;                  // independent row loads in flight per thread
    constexpr int RED = TPI * HPC * D;         // partial P.V sums of all token groups
    constexpr int SMEM = HPC * PARTITION > RED ? HPC * PARTITION : RED;
    __shared__ __align__(16) float smem[SMEM];
    __shared__ float scratch[DECODE_WARPS][HPC];

    await_previous_kernel();
    const int head0 = blockIdx.x * HPC;
    const int seq = blockIdx.y, part = blockIdx.z;
    const int kvh = head0 / (num_heads / num_kv_heads);
    const int ctx = min(static_cast<int>(context_lens[seq]), max_blocks << block_shift);
    const int begin = max(part * partition, first_visible(ctx, window));
    const int end = min((part + 1) * partition, ctx);
    const int tid = threadIdx.x, lt = tid % TPT, tg = tid / TPT;
    const int64_t row0 = static_cast<int64_t>(seq) * num_heads + head0;  // (seq, head0) in [seqs, heads]

    if (begin >= end) {
        // No visible key in this partition. With a single partition that means an
        // empty context: the output is defined as zeros (the reduction does the same).
        if (num_parts == 1)
            for (int i = tid; i < HPC * D; i += DECODE_THREADS) out[row0 * D + i] = from_float<T>(0.f);
        return;
    }

    // Query slice of this thread, pre-scaled so that softmax runs in base 2.
    float qf[HPC][VEC];
#pragma unroll
    for (int h = 0; h < HPC; ++h) {
        unpack8<T>(*reinterpret_cast<const uint4*>(q + (row0 + h) * D + lt * VEC), qf[h]);
#pragma unroll
        for (int i = 0; i < VEC; ++i) qf[h][i] *= scale * LOG2E;
    }

    const uint32_t* table = block_tables + static_cast<int64_t>(seq) * max_blocks;
    const int64_t slot_stride = static_cast<int64_t>(num_kv_heads) * D;
    const int64_t head_off = static_cast<int64_t>(kvh) * D + lt * VEC;
    auto load_row = [&](const T* cache, int t) {
        return t < end ? *reinterpret_cast<const uint4*>(cache + cache_slot(table, t, block_shift, num_blocks) *
                                                                     slot_stride +
                                                         head_off)
                       : make_uint4(0, 0, 0, 0);
    };

    // Both passes load the rows of the next iteration before computing with those of
    // this one, so that loads stay in flight while the SM computes.
    constexpr int STEP = TPI * UNROLL;
    uint4 raw[UNROLL], next[UNROLL];

    // Pass 1: logits. The loop bound is warp-uniform so that the shuffles below
    // always run with the full warp.
    float* logits = smem;  // [HPC][PARTITION]
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) raw[u] = load_row(k_cache, begin + u * TPI + tg);
    for (int it = begin; it < end; it += STEP) {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) next[u] = load_row(k_cache, it + STEP + u * TPI + tg);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int t = it + u * TPI + tg;
            float kf[VEC];
            unpack8<T>(raw[u], kf);
#pragma unroll
            for (int h = 0; h < HPC; ++h) {
                float s = 0.f;
#pragma unroll
                for (int i = 0; i < VEC; ++i) s += qf[h][i] * kf[i];
#pragma unroll
                for (int off = TPT / 2; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
                if (lt == 0 && t < end) logits[h * PARTITION + t - begin] = s;
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) raw[u] = next[u];
    }
    // The V rows of the first iteration load while the softmax runs.
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) raw[u] = load_row(v_cache, begin + u * TPI + tg);
    __syncthreads();

    // Softmax over the partition (normalised later, possibly across partitions).
    const int n = end - begin;
    float mx[HPC], sum[HPC];
#pragma unroll
    for (int h = 0; h < HPC; ++h) mx[h] = -INFINITY;
    for (int i = tid; i < n; i += DECODE_THREADS)
#pragma unroll
        for (int h = 0; h < HPC; ++h) mx[h] = fmaxf(mx[h], logits[h * PARTITION + i]);
    block_reduce<HPC>(mx, scratch, MaxOp());
#pragma unroll
    for (int h = 0; h < HPC; ++h) sum[h] = 0.f;
    for (int i = tid; i < n; i += DECODE_THREADS)
#pragma unroll
        for (int h = 0; h < HPC; ++h) {
            const float p = fast_exp2(logits[h * PARTITION + i] - mx[h]);
            logits[h * PARTITION + i] = p;
            sum[h] += p;
        }
    block_reduce<HPC>(sum, scratch, SumOp());  // its barriers also publish the probabilities

    // Pass 2: P.V, each token group accumulating its own tokens.
    float acc[HPC][VEC];
#pragma unroll
    for (int h = 0; h < HPC; ++h)
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[h][i] = 0.f;
    for (int it = begin; it < end; it += STEP) {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) next[u] = load_row(v_cache, it + STEP + u * TPI + tg);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int t = it + u * TPI + tg;
            if (t >= end) continue;
            float vf[VEC];
            unpack8<T>(raw[u], vf);
#pragma unroll
            for (int h = 0; h < HPC; ++h) {
                const float p = logits[h * PARTITION + t - begin];
#pragma unroll
                for (int i = 0; i < VEC; ++i) acc[h][i] += p * vf[i];
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) raw[u] = next[u];
    }
    __syncthreads();  // all probabilities read: the buffer now collects the partial sums

    float* red = smem;  // [TPI][HPC][D]
#pragma unroll
    for (int h = 0; h < HPC; ++h) {
        float4* dst = reinterpret_cast<float4*>(red + (tg * HPC + h) * D + lt * VEC);
        dst[0] = make_float4(acc[h][0], acc[h][1], acc[h][2], acc[h][3]);
        dst[1] = make_float4(acc[h][4], acc[h][5], acc[h][6], acc[h][7]);
    }
    __syncthreads();
#pragma unroll
    for (int h = 0; h < HPC; ++h)
        for (int d = tid; d < D; d += DECODE_THREADS) {
            float o = 0.f;
#pragma unroll
            for (int g = 0; g < TPI; ++g) o += red[(g * HPC + h) * D + d];
            if (num_parts == 1) {
                out[(row0 + h) * D + d] = from_float<T>(o / sum[h]);
            } else {
                const int64_t p = (row0 + h) * num_parts + part;
                part_out[p * D + d] = o;
                if (d == 0) {
                    part_max[p] = mx[h];
                    part_sum[p] = sum[h];
                }
            }
        }
}

// Merges the partitions of one (seq, head): block of D threads, one per output element.
template <typename T, int D>
__device__ void paged_attention_decode_reduce(T* __restrict__ out, const float* __restrict__ part_max,
                                              const float* __restrict__ part_sum,
                                              const float* __restrict__ part_out,
                                              const uint32_t* __restrict__ context_lens, int num_heads,
                                              int max_blocks, int block_shift, int window, int num_parts,
                                              int partition) {
    await_previous_kernel();
    const int head = blockIdx.x, seq = blockIdx.y, d = threadIdx.x;
    const int64_t row = static_cast<int64_t>(seq) * num_heads + head;
    const int ctx = min(static_cast<int>(context_lens[seq]), max_blocks << block_shift);
    // Partitions that hold visible keys (the others were never written).
    const int p_begin = first_visible(ctx, window) / partition;
    const int p_end = ctx == 0 ? p_begin : (ctx - 1) / partition + 1;
    float m = -INFINITY;
    for (int p = p_begin; p < p_end; ++p) m = fmaxf(m, part_max[row * num_parts + p]);
    float l = 0.f, o = 0.f;
    for (int p = p_begin; p < p_end; ++p) {
        const float w = fast_exp2(part_max[row * num_parts + p] - m);
        l += part_sum[row * num_parts + p] * w;
        o += part_out[(row * num_parts + p) * D + d] * w;
    }
    out[row * D + d] = from_float<T>(l > 0.f ? o / l : 0.f);
}

#define DECODE_KERNEL(T, TN, D, HPC)                                                                    \
    extern "C" __global__ void __launch_bounds__(DECODE_THREADS, DECODE_MIN_BLOCKS)                    \
        paged_attention_decode_##TN##_d##D##_h##HPC(                                                    \
            T* out, float* part_max, float* part_sum, float* part_out, const T* q, const T* k_cache,    \
            const T* v_cache, const uint32_t* block_tables, const uint32_t* context_lens, int num_heads, \
            int num_kv_heads, int max_blocks, int block_shift, uint32_t num_blocks, float scale,         \
            int window, int num_parts, int partition) {                                                 \
        paged_attention_decode<T, D, HPC>(out, part_max, part_sum, part_out, q, k_cache, v_cache,       \
                                          block_tables, context_lens, num_heads, num_kv_heads,          \
                                          max_blocks, block_shift, num_blocks, scale, window, num_parts, \
                                          partition);                                                   \
    }

#define DECODE_REDUCE_KERNEL(T, TN, D)                                                                  \
    extern "C" __global__ void paged_attention_decode_reduce_##TN##_d##D(                              \
        T* out, const float* part_max, const float* part_sum, const float* part_out,                    \
        const uint32_t* context_lens, int num_heads, int max_blocks, int block_shift, int window,       \
        int num_parts, int partition) {                                                                 \
        paged_attention_decode_reduce<T, D>(out, part_max, part_sum, part_out, context_lens, num_heads, \
                                            max_blocks, block_shift, window, num_parts, partition);      \
    }

// Heads per CTA: the largest of these dividing the GQA ratio (src/cuda.rs picks).
#define DECODE_KERNELS_FOR(T, TN, D) \
    DECODE_KERNEL(T, TN, D, 1)       \
    DECODE_KERNEL(T, TN, D, 2)       \
    DECODE_KERNEL(T, TN, D, 3)       \
    DECODE_KERNEL(T, TN, D, 4)       \
    DECODE_KERNEL(T, TN, D, 8)       \
    DECODE_REDUCE_KERNEL(T, TN, D)

DECODE_KERNELS_FOR(__nv_bfloat16, bf16, 64)
DECODE_KERNELS_FOR(__nv_bfloat16, bf16, 128)
DECODE_KERNELS_FOR(__half, f16, 64)
DECODE_KERNELS_FOR(__half, f16, 128)
