// The residual add and the RMSNorm that follows it in every Llama block, in one pass:
// sum = x + h (rounded to T: the residual stream's own type), then
// normed = sum / sqrt(mean(sum^2) + eps) * weight in f32. One CTA per row; the output
// holds both, `[2, rows, H]` (sums first), so that each is an ordinary tensor view.
#include "common.cuh"

constexpr int NORM_THREADS = 256;

template <typename T>
__device__ void add_rms_norm(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ h,
                             const T* __restrict__ weight, int64_t rows, int vecs_per_row, float eps) {
    __shared__ float warp_sums[NORM_THREADS / 32];
    await_previous_kernel();
    const int64_t row = blockIdx.x;
    const int64_t base = row * vecs_per_row;
    const uint4* x_v = reinterpret_cast<const uint4*>(x) + base;
    const uint4* h_v = reinterpret_cast<const uint4*>(h) + base;
    uint4* sum_v = reinterpret_cast<uint4*>(out) + base;
    uint4* normed_v = reinterpret_cast<uint4*>(out) + rows * vecs_per_row + base;
    const uint4* w_v = reinterpret_cast<const uint4*>(weight);

    float square_sum = 0.f;
    for (int v = threadIdx.x; v < vecs_per_row; v += NORM_THREADS) {
        float a[VEC], b[VEC], s[VEC];
        unpack8<T>(x_v[v], a);
        unpack8<T>(h_v[v], b);
#pragma unroll
        for (int i = 0; i < VEC; ++i) s[i] = a[i] + b[i];
        const uint4 packed = pack8<T>(s);
        sum_v[v] = packed;
        unpack8<T>(packed, s);  // the rounded sum is what the norm sees
#pragma unroll
        for (int i = 0; i < VEC; ++i) square_sum += s[i] * s[i];
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) square_sum += __shfl_xor_sync(0xffffffffu, square_sum, off);
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = square_sum;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < NORM_THREADS / 32; ++w) total += warp_sums[w];
    const float inv_rms = rsqrtf(total / (vecs_per_row * VEC) + eps);

    // Each thread reads back only the vectors it wrote.
    for (int v = threadIdx.x; v < vecs_per_row; v += NORM_THREADS) {
        float s[VEC], w[VEC], n[VEC];
        unpack8<T>(sum_v[v], s);
        unpack8<T>(w_v[v], w);
#pragma unroll
        for (int i = 0; i < VEC; ++i) n[i] = s[i] * inv_rms * w[i];
        normed_v[v] = pack8<T>(n);
    }
}

#define ADD_RMS_NORM(T, TN)                                                                          \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS) add_rms_norm_##TN(                    \
        T* out, const T* x, const T* h, const T* weight, int64_t rows, int vecs_per_row, float eps) { \
        add_rms_norm<T>(out, x, h, weight, rows, vecs_per_row, eps);                                 \
    }

ADD_RMS_NORM(__nv_bfloat16, bf16)
ADD_RMS_NORM(__half, f16)
