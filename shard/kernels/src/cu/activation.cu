// Fused SwiGLU activation of a fused gate/up projection: out = silu(gate) * up,
// where each row of the input is [gate (I) | up (I)]. One pass instead of a silu,
// two strided narrows and a multiply.
#include "common.cuh"

// Grid-stride over 16-byte output vectors; `vecs_per_row` = I / 8.
template <typename T>
__device__ void silu_mul(T* __restrict__ out, const T* __restrict__ gate_up, int64_t rows, int vecs_per_row) {
    await_previous_kernel();
    const int64_t total = rows * vecs_per_row;
    for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < total;
         v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t row = v / vecs_per_row;
        const int col = static_cast<int>(v - row * vecs_per_row);
        const uint4* in = reinterpret_cast<const uint4*>(gate_up) + row * 2 * vecs_per_row + col;
        float g[VEC], u[VEC], o[VEC];
        unpack8<T>(in[0], g);
        unpack8<T>(in[vecs_per_row], u);
#pragma unroll
        for (int i = 0; i < VEC; ++i) o[i] = silu_times(g[i], u[i]);
        reinterpret_cast<uint4*>(out)[v] = pack8<T>(o);
    }
}

#define SILU_MUL(T, TN)                                                                                  \
    extern "C" __global__ void silu_mul_##TN(T* out, const T* gate_up, int64_t rows, int vecs_per_row) { \
        silu_mul<T>(out, gate_up, rows, vecs_per_row);                                                   \
    }

SILU_MUL(__nv_bfloat16, bf16)
SILU_MUL(__half, f16)
