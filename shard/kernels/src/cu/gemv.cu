// Products of a few activation rows with a weight matrix, for decode steps:
// y[m, n] = sum_k x[m, k] * w[n, k] with M <= 8 rows of x. Such a step reads every
// weight once for a handful of tokens, so it is bound by memory bandwidth, where
// cuBLAS's GEMM kernels (split-K and its reduction at these shapes) leave some on the
// table. A CTA streams one weight row with 16-byte loads, several in flight per
// thread, applies each to all M rows of x (which stay in L1/L2), and accumulates in f32.
//
// The gated variant serves a fused gate/up projection (`w` = [gate; up], 2N rows): a
// CTA streams gate row n and up row n and writes silu(gate) * up, so the SwiGLU
// activation costs neither a kernel nor a round trip of the [M, 2N] product.
#include "common.cuh"

constexpr int GEMV_WARPS = 8;  // warps per CTA
// 16-byte weight loads in flight per thread and weight row (-DGEMV_UNROLL=... for
// tuning runs).
#ifndef GEMV_UNROLL
#define GEMV_UNROLL 4
#endif

// One CTA per output feature: its warps stream interleaved 512-byte stretches of the
// weight row(s), so that each thread's chain of loads is short and even matrices of
// few rows keep every SM busy; the warps' partial sums meet in shared memory. (A warp
// per row, or two or four warps, measured 1-8 % slower on the H100's 8B projections.)
// The first stretch of weights is requested before waiting for the previous kernel:
// weights do not depend on it, so under programmatic dependent launch their loads
// overlap its tail.
template <typename T, int M, bool GATED>
__device__ void gemv(T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w, int n_out,
                     int k_vecs) {
    constexpr int ROWS = GATED ? 2 : 1;  // weight rows per CTA: gate and up, or one
    constexpr int STRIDE = 32 * GEMV_WARPS;
    __shared__ float partial[GEMV_WARPS][ROWS][M];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int n = blockIdx.x;
    const uint4* w_rows[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
        w_rows[r] = reinterpret_cast<const uint4*>(w) + static_cast<int64_t>(n + r * n_out) * k_vecs;
    const uint4* x_vecs = reinterpret_cast<const uint4*>(x);
    float acc[ROWS][M];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] = 0.f;

    uint4 wv[ROWS][GEMV_UNROLL];
    auto load_weights = [&](int base) {
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
#pragma unroll
            for (int u = 0; u < GEMV_UNROLL; ++u) {
                const int v = base + u * STRIDE;
                // Streamed: each weight is read once per step, keep L2 for x.
                wv[r][u] = v < k_vecs ? __ldcs(w_rows[r] + v) : make_uint4(0, 0, 0, 0);
            }
    };
    const int first = warp * 32 + lane;
    load_weights(first);
    await_previous_kernel();
    for (int base = first; base < k_vecs; base += STRIDE * GEMV_UNROLL) {
        if (base != first) load_weights(base);
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) {
            const int v = base + u * STRIDE;
            if (v < k_vecs) {
                float wf[ROWS][VEC];
#pragma unroll
                for (int r = 0; r < ROWS; ++r) unpack8<T>(wv[r][u], wf[r]);
#pragma unroll
                for (int m = 0; m < M; ++m) {
                    float xf[VEC];
                    unpack8<T>(__ldg(x_vecs + static_cast<int64_t>(m) * k_vecs + v), xf);
#pragma unroll
                    for (int r = 0; r < ROWS; ++r)
#pragma unroll
                        for (int i = 0; i < VEC; ++i) acc[r][m] = fmaf(wf[r][i], xf[i], acc[r][m]);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) {
#pragma unroll
            for (int off = 16; off > 0; off /= 2) acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], off);
            if (lane == 0) partial[warp][r][m] = acc[r][m];
        }
    __syncthreads();
    if (threadIdx.x < M) {
        float sums[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            sums[r] = 0.f;
#pragma unroll
            for (int p = 0; p < GEMV_WARPS; ++p) sums[r] += partial[p][r][threadIdx.x];
        }
        // The gated product rounds gate and up to T first, as the separate projection
        // and activation kernels would.
        const float out = GATED ? silu_times(to_float(from_float<T>(sums[0])), to_float(from_float<T>(sums[ROWS - 1])))
                                : sums[0];
        y[static_cast<int64_t>(threadIdx.x) * n_out + n] = from_float<T>(out);
    }
}

#define GEMV(T, TN, M)                                                                                \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                                     \
        gemv_##TN##_m##M(T* y, const T* x, const T* w, int n_out, int k_vecs) {                       \
        gemv<T, M, false>(y, x, w, n_out, k_vecs);                                                    \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                                     \
        gemv_silu_mul_##TN##_m##M(T* y, const T* x, const T* w, int n_out, int k_vecs) {              \
        gemv<T, M, true>(y, x, w, n_out, k_vecs);                                                     \
    }
#define GEMV_ALL_M(T, TN) \
    GEMV(T, TN, 1) GEMV(T, TN, 2) GEMV(T, TN, 3) GEMV(T, TN, 4) GEMV(T, TN, 5) GEMV(T, TN, 6) GEMV(T, TN, 7) GEMV(T, TN, 8)

GEMV_ALL_M(__nv_bfloat16, bf16)
GEMV_ALL_M(__half, f16)
