// Writes the new tokens' K or V rows into the paged cache at their slots. The copy
// moves raw 16-byte vectors, so one kernel serves every 16-bit element type.
#include <stdint.h>

// One block per token; `row_vecs` 16-byte vectors per token (kv_heads * head_dim * 2 / 16).
// Slots < 0 are padding; slots past the cache are skipped as well (memory safety).
extern "C" __global__ void reshape_and_cache(const uint4* __restrict__ src, uint4* __restrict__ cache,
                                             const int64_t* __restrict__ slots, int row_vecs,
                                             int64_t num_slots) {
    const int64_t slot = slots[blockIdx.x];
    if (slot < 0 || slot >= num_slots) return;
    const uint4* from = src + static_cast<int64_t>(blockIdx.x) * row_vecs;
    uint4* to = cache + slot * row_vecs;
    for (int i = threadIdx.x; i < row_vecs; i += blockDim.x) to[i] = from[i];
}
