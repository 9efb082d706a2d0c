// Greedy decoding's reduction of each logits row in one pass: the argmax (the lowest
// index among equal maxima) and its log-probability, -log(sum(exp(x - max))), kept as
// a running maximum and a sum rescaled whenever the maximum grows (online softmax).
// One CTA per row: a row of a 128k vocabulary is 512 KB, a few microseconds for one SM,
// where candle's chain of reductions took a dozen kernels.
#include "common.cuh"

constexpr int GREEDY_THREADS = 1024;

struct Best {
    float max;  // -inf until a finite or +inf logit is seen
    float sum;  // sum of exp(x - max) over the entries seen
    int index;
};

// Folds `other` into `best`: the larger maximum wins (the lower index on a tie), and
// the other's sum is rescaled to it.
__device__ __forceinline__ void merge(Best& best, Best other) {
    if (other.max > best.max || (other.max == best.max && other.index < best.index)) {
        const Best t = best;
        best = other;
        other = t;
    }
    if (other.max > -INFINITY) best.sum += other.sum * expf(other.max - best.max);
}

// out: [rows, 2] f32, (argmax, its log-probability); ids below 2^24 are exact in f32.
extern "C" __global__ void __launch_bounds__(GREEDY_THREADS) greedy_f32(float* __restrict__ out,
                                                                         const float* __restrict__ logits,
                                                                         int vocab) {
    __shared__ Best warp_best[GREEDY_THREADS / 32];
    await_previous_kernel();
    const float* row = logits + static_cast<int64_t>(blockIdx.x) * vocab;
    Best best{-INFINITY, 0.f, vocab};
    for (int i = threadIdx.x; i < vocab; i += GREEDY_THREADS) {
        const float x = row[i];
        if (x > best.max) {
            best.sum = best.sum * expf(best.max - x) + 1.f;
            best.max = x;
            best.index = i;
        } else if (x > -INFINITY) {
            best.sum += expf(x - best.max);
        }
    }
    for (int off = 16; off > 0; off /= 2) {
        const Best other{__shfl_xor_sync(0xffffffffu, best.max, off), __shfl_xor_sync(0xffffffffu, best.sum, off),
                         __shfl_xor_sync(0xffffffffu, best.index, off)};
        merge(best, other);
    }
    if (threadIdx.x % 32 == 0) warp_best[threadIdx.x / 32] = best;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < GREEDY_THREADS / 32; ++w) merge(best, warp_best[w]);
        // A row of -inf (or NaN) has no maximum: token 0, and a NaN logprob says so.
        out[2 * blockIdx.x] = best.index < vocab ? static_cast<float>(best.index) : 0.f;
        out[2 * blockIdx.x + 1] = best.index < vocab ? -logf(best.sum) : NAN;
    }
}
