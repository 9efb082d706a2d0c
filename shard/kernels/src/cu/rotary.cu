// Rotary embedding of a step's queries and keys, and the keys and values written into
// the paged cache at their slots: one kernel per layer instead of two rotations and a
// cache copy. q, k and v are rows of the projections' outputs, each with its own row
// stride (views of one fused q/k/v product, or separate tensors).
#include "common.cuh"

constexpr int ROTARY_THREADS = 128;

// Each thread takes units of 16-byte vectors: 8 rotated pairs of one (token, query or
// key head), or 8 elements of one (token, value head) copied. cos/sin:
// [tokens, head_dim / 2], each token's angles. Pairs are (i, i + head_dim / 2), or
// (2i, 2i + 1) when INTERLEAVED; either way a unit's pairs sit in two vectors.
template <typename T, bool INTERLEAVED>
__device__ void rope_and_cache(T* __restrict__ q_out, T* __restrict__ k_cache, T* __restrict__ v_cache,
                               const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                               int64_t q_stride, int64_t k_stride, int64_t v_stride, const T* __restrict__ cos,
                               const T* __restrict__ sin, const int64_t* __restrict__ slots, int64_t tokens,
                               int num_heads, int num_kv_heads, int head_dim, int64_t num_slots) {
    await_previous_kernel();
    const int half = head_dim / 2, chunks = head_dim / 16;
    const int rope_units = (num_heads + num_kv_heads) * chunks;
    const int per_token = rope_units + num_kv_heads * (head_dim / VEC);
    const int64_t total = tokens * per_token;
    for (int64_t u = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; u < total;
         u += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t token = u / per_token;
        const int r = static_cast<int>(u - token * per_token);
        const int64_t slot = slots[token];
        // Padding tokens (slot < 0) and slots past the cache (memory safety) write no K/V.
        const bool cached = slot >= 0 && slot < num_slots;
        const int64_t cache_row = slot * num_kv_heads * head_dim;
        if (r >= rope_units) {
            if (cached) {
                const int vec = r - rope_units;
                reinterpret_cast<uint4*>(v_cache + cache_row)[vec] =
                    reinterpret_cast<const uint4*>(v + token * v_stride)[vec];
            }
            continue;
        }
        const int head = r / chunks, c = r % chunks;
        const T* src;
        T* dst;
        if (head < num_heads) {
            src = q + token * q_stride + head * head_dim;
            dst = q_out + (token * num_heads + head) * head_dim;
        } else {
            if (!cached) continue;
            src = k + token * k_stride + (head - num_heads) * head_dim;
            dst = k_cache + cache_row + (head - num_heads) * head_dim;
        }
        // Element offsets of the two vectors that hold pairs 8c .. 8c + 7.
        const int lo = INTERLEAVED ? 16 * c : VEC * c;
        const int hi = INTERLEAVED ? 16 * c + VEC : half + VEC * c;
        float x_lo[VEC], x_hi[VEC], cs[VEC], sn[VEC];
        unpack8<T>(*reinterpret_cast<const uint4*>(src + lo), x_lo);
        unpack8<T>(*reinterpret_cast<const uint4*>(src + hi), x_hi);
        unpack8<T>(*reinterpret_cast<const uint4*>(cos + token * half + VEC * c), cs);
        unpack8<T>(*reinterpret_cast<const uint4*>(sin + token * half + VEC * c), sn);
        // Pair j is (x_lo[j], x_hi[j]) half-split, or elements 2j and 2j + 1 of the 16.
        float* a[VEC];
        float* b[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            if (INTERLEAVED) {
                float* pair = j < VEC / 2 ? x_lo + 2 * j : x_hi + 2 * (j - VEC / 2);
                a[j] = pair;
                b[j] = pair + 1;
            } else {
                a[j] = x_lo + j;
                b[j] = x_hi + j;
            }
        }
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            const float x1 = *a[j], x2 = *b[j];
            *a[j] = x1 * cs[j] - x2 * sn[j];
            *b[j] = x2 * cs[j] + x1 * sn[j];
        }
        *reinterpret_cast<uint4*>(dst + lo) = pack8<T>(x_lo);
        *reinterpret_cast<uint4*>(dst + hi) = pack8<T>(x_hi);
    }
}

#define ROPE_AND_CACHE(T, TN, LAYOUT, INTERLEAVED)                                                                \
    extern "C" __global__ void __launch_bounds__(ROTARY_THREADS) rope_and_cache_##LAYOUT##_##TN(                 \
        T* q_out, T* k_cache, T* v_cache, const T* q, const T* k, const T* v, int64_t q_stride, int64_t k_stride, \
        int64_t v_stride, const T* cos, const T* sin, const int64_t* slots, int64_t tokens, int num_heads,       \
        int num_kv_heads, int head_dim, int64_t num_slots) {                                                      \
        rope_and_cache<T, INTERLEAVED>(q_out, k_cache, v_cache, q, k, v, q_stride, k_stride, v_stride, cos, sin, \
                                       slots, tokens, num_heads, num_kv_heads, head_dim, num_slots);              \
    }

ROPE_AND_CACHE(__nv_bfloat16, bf16, half_split, false)
ROPE_AND_CACHE(__nv_bfloat16, bf16, interleaved, true)
ROPE_AND_CACHE(__half, f16, half_split, false)
ROPE_AND_CACHE(__half, f16, interleaved, true)
