// Causal flash attention for ragged prefill batches over the paged KV cache.
//
// Sequence s has new_len = cu_seqlens_q[s+1] - cu_seqlens_q[s] new tokens, which are
// the LAST new_len of its context_lens[s] positions (a cached prefix comes first).
// K/V are read from the cache (rope_and_cache has already written the new rows).
//
// One CTA = 4 warps = a tile of BM query rows of one head; each warp owns 16 rows.
// K/V tiles of BN keys stream through a two-stage shared-memory ring (cp.async: the
// next tile loads while the current one is used); QK^T and P.V use mma.sync
// m16n8k16 with f32 accumulators; softmax is online (FlashAttention-2), so no T x T
// matrix. Shared memory is dynamic: prefill_smem_bytes(D) (mirrored in src/cuda.rs).
#include "common.cuh"

constexpr int PREFILL_THREADS = 128;
constexpr int BM = 64;  // query rows per CTA (16 per warp); must match src/cuda.rs
constexpr int BN = 64;  // keys per tile
constexpr float LOG2E_F = 1.4426950408889634f;
constexpr int STAGES = 2;  // K/V tiles in flight; must match src/cuda.rs
// CTAs per SM the register allocation must leave room for (a tuning knob:
// `KERNELS_NVCC_FLAGS=-DPREFILL_MIN_BLOCKS=2` trades occupancy for no spills).
#ifndef PREFILL_MIN_BLOCKS
#define PREFILL_MIN_BLOCKS 3
#endif

__device__ __forceinline__ void cp_async_wait_one_pending() { asm volatile("cp.async.wait_group 1;\n" ::); }

// Maps blockIdx.x to (sequence, query tile). Tiles are numbered sequence by
// sequence; warp 0 scans the per-sequence tile counts 32 sequences at a time.
// Returns false for the surplus blocks of the launch (the grid is an upper bound).
__device__ __forceinline__ bool find_tile(const uint32_t* cu_seqlens_q, int num_seqs, int* seq_out,
                                          int* tile_out) {
    __shared__ int s_seq, s_tile;
    const int lane = threadIdx.x % 32;
    if (threadIdx.x < 32) {
        const int target = blockIdx.x;
        int before = 0;  // tiles of the sequences already scanned
        if (lane == 0) s_seq = -1;
        __syncwarp();  // before any lane may write the winner below
        for (int s0 = 0; s0 < num_seqs; s0 += 32) {
            const int s = s0 + lane;
            const int tiles = s < num_seqs ? (static_cast<int>(cu_seqlens_q[s + 1] - cu_seqlens_q[s]) + BM - 1) / BM : 0;
            int incl = tiles;
#pragma unroll
            for (int off = 1; off < 32; off *= 2) {
                const int v = __shfl_up_sync(0xffffffffu, incl, off);
                if (lane >= off) incl += v;
            }
            const unsigned hit = __ballot_sync(0xffffffffu, before + incl > target);
            if (hit) {
                if (lane == __ffs(hit) - 1) {
                    s_seq = s;
                    s_tile = target - (before + incl - tiles);
                }
                break;
            }
            before += __shfl_sync(0xffffffffu, incl, 31);
        }
    }
    __syncthreads();
    *seq_out = s_seq;
    *tile_out = s_tile;
    return s_seq >= 0;
}

template <typename T, int D>
__device__ void paged_attention_prefill(T* __restrict__ out, const T* __restrict__ q, const T* __restrict__ k_cache,
                                        const T* __restrict__ v_cache, const uint32_t* __restrict__ cu_seqlens_q,
                                        const uint32_t* __restrict__ context_lens,
                                        const uint32_t* __restrict__ block_tables, int num_seqs, int num_heads,
                                        int num_kv_heads, int max_blocks, int block_shift, uint32_t num_blocks,
                                        float scale, int window) {
    constexpr int STRIDE = D + 8;  // padded smem row: ldmatrix rows hit distinct banks
    constexpr int CHUNKS = D / VEC;
    constexpr int KSTEPS = D / 16;  // mma k-steps over the head dim (QK^T)
    constexpr int SN = BN / 8;      // n-tiles of S per warp
    constexpr int ON = D / 8;       // n-tiles of O per warp
    // [STAGES] K tiles, then [STAGES] V tiles; the first also stages the Q tile.
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* const sK = reinterpret_cast<T*>(smem_raw);
    T* const sV = sK + STAGES * BN * STRIDE;

    await_previous_kernel();
    int seq, tile;
    if (!find_tile(cu_seqlens_q, num_seqs, &seq, &tile)) return;
    const int q_begin = cu_seqlens_q[seq];
    const int new_len = cu_seqlens_q[seq + 1] - q_begin;
    const int ctx = min(static_cast<int>(context_lens[seq]), max_blocks << block_shift);
    const int pos0 = ctx - new_len;  // position of the first new token
    // Last tiles first: they see the most keys, and finish last otherwise.
    const int m0 = ((new_len + BM - 1) / BM - 1 - tile) * BM;
    const int rows = min(BM, new_len - m0);
    const int head = blockIdx.y;
    const int kvh = head / (num_heads / num_kv_heads);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, t4 = lane % 4;  // mma fragment coordinates
    const int lr = lane % 8, lm = lane / 8;  // ldmatrix: row within / index of the 8x8 matrix

    // Keys any row of this tile can see.
    const int q_first = pos0 + m0, q_last = pos0 + m0 + rows - 1;
    const int kv_end = min(ctx, q_last + 1);
    const int kv_begin = window > 0 ? max(0, q_first - window + 1) : 0;
    const int j_start = (kv_begin / BN) * BN;

    // Cache element offset of each key of a tile (-1: past kv_end), resolved once
    // per tile through the block table and shared by its K and V loads; one more
    // buffer than stages, so a tile's is filled a barrier before its loads.
    __shared__ int64_t s_rows[STAGES + 1][BN];
    const uint32_t* table = block_tables + static_cast<int64_t>(seq) * max_blocks;
    const int64_t slot_stride = static_cast<int64_t>(num_kv_heads) * D;
    auto fill_rows = [&](int buf, int j0) {
        const int j = j0 + tid;
        if (tid < BN) s_rows[buf][tid] = j < kv_end ? cache_slot(table, j, block_shift, num_blocks) * slot_stride : -1;
    };

    // Each thread copies one fixed 16-byte column chunk of every ROW_STEP-th row.
    constexpr int ROW_STEP = PREFILL_THREADS / CHUNKS;
    const int ch = tid % CHUNKS, r0 = tid / CHUNKS;
    const T* k_head = k_cache + kvh * D + ch * VEC;
    const T* v_head = v_cache + kvh * D + ch * VEC;
    // K and V of tile number t (keys j_start + t * BN ...) into stage t % STAGES,
    // as one cp.async group (committed even when empty, to keep the group count).
    auto load_tile = [&](int t) {
        if (j_start + t * BN < kv_end) {
            const int64_t* rows_of_tile = s_rows[t % (STAGES + 1)];
            T* k_dst = sK + (t % STAGES) * BN * STRIDE + ch * VEC;
            T* v_dst = sV + (t % STAGES) * BN * STRIDE + ch * VEC;
#pragma unroll
            for (int i = 0; i < BN / ROW_STEP; ++i) {
                const int r = r0 + i * ROW_STEP;
                const int64_t offset = rows_of_tile[r];
                cp_async16(k_dst + r * STRIDE, k_head + max(offset, int64_t{0}), offset >= 0);
                cp_async16(v_dst + r * STRIDE, v_head + max(offset, int64_t{0}), offset >= 0);
            }
        }
        cp_async_commit();
    };

    // Q tile -> smem (zeros past the sequence) -> A fragments in registers.
#pragma unroll
    for (int i = 0; i < BM / ROW_STEP; ++i) {
        const int r = r0 + i * ROW_STEP;
        const bool valid = r < rows;
        const T* src = q + (static_cast<int64_t>(q_begin + m0 + (valid ? r : 0)) * num_heads + head) * D + ch * VEC;
        cp_async16(sK + r * STRIDE + ch * VEC, src, valid);
    }
    cp_async_commit();
#pragma unroll
    for (int t = 0; t < STAGES; ++t) fill_rows(t, j_start + t * BN);
    cp_async_wait_all();
    __syncthreads();
    uint32_t qa[KSTEPS][4];
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk)
        ldmatrix_x4(qa[kk], sK + (warp * 16 + lr + (lm & 1) * 8) * STRIDE + kk * 16 + (lm >> 1) * 8);
    __syncthreads();

    // This thread's two rows (g and g + 8 of the warp's 16).
    const int qpos[2] = {pos0 + m0 + warp * 16 + g, pos0 + m0 + warp * 16 + g + 8};
    float o[ON][4];
#pragma unroll
    for (int n = 0; n < ON; ++n)
#pragma unroll
        for (int c = 0; c < 4; ++c) o[n][c] = 0.f;
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
    const float qk_scale = scale * LOG2E_F;

#pragma unroll
    for (int t = 0; t < STAGES - 1; ++t) load_tile(t);
    for (int t = 0, j0 = j_start; j0 < kv_end; ++t, j0 += BN) {
        // Tile t + STAGES - 1 goes into the stage tile t - 1 used: the barrier
        // orders it after every warp's last read of that stage (and publishes the
        // rows filled last iteration).
        __syncthreads();
        load_tile(t + STAGES - 1);
        fill_rows((t + STAGES) % (STAGES + 1), j0 + STAGES * BN);
        cp_async_wait_one_pending();
        __syncthreads();  // tile t landed for every thread's copies
        const T* tK = sK + (t % STAGES) * BN * STRIDE;
        const T* tV = sV + (t % STAGES) * BN * STRIDE;

        float s[SN][4];
#pragma unroll
        for (int n = 0; n < SN; ++n)
#pragma unroll
            for (int c = 0; c < 4; ++c) s[n][c] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk)
#pragma unroll
            for (int nn = 0; nn < SN / 2; ++nn) {
                uint32_t b[4];
                ldmatrix_x4(b, tK + (nn * 16 + lr + (lm >> 1) * 8) * STRIDE + kk * 16 + (lm & 1) * 8);
                mma_16816<T>(s[2 * nn], qa[kk], b[0], b[1]);
                mma_16816<T>(s[2 * nn + 1], qa[kk], b[2], b[3]);
            }

        // Mask (causal, context end, sliding window) only where the tile needs it.
        // Scores stay unscaled until the exponent (scale > 0 keeps the max).
        const bool needs_mask = j0 + BN - 1 > q_first || (window > 0 && j0 <= q_last - window);
        if (needs_mask) {
#pragma unroll
            for (int n = 0; n < SN; ++n)
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int j = j0 + n * 8 + 2 * t4 + (c & 1);
                    const int p = qpos[c >> 1];
                    if (j > p || j >= kv_end || (window > 0 && p - j >= window)) s[n][c] = -INFINITY;
                }
        }

        // Online softmax; a row's 4 threads (same g) combine through shuffles.
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = m_run[r];
#pragma unroll
            for (int n = 0; n < SN; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            // A row with nothing visible yet keeps m = -inf; shift by 0 to avoid inf - inf.
            const float shift = mx == -INFINITY ? 0.f : mx * qk_scale;
            alpha[r] = fast_exp2(m_run[r] * qk_scale - shift);
            m_run[r] = mx;
            float rs = 0.f;
#pragma unroll
            for (int n = 0; n < SN; ++n) {
                s[n][2 * r] = fast_exp2(fmaf(s[n][2 * r], qk_scale, -shift));
                s[n][2 * r + 1] = fast_exp2(fmaf(s[n][2 * r + 1], qk_scale, -shift));
                rs += s[n][2 * r] + s[n][2 * r + 1];
            }
            l_run[r] = l_run[r] * alpha[r] + rs;  // this thread's share; summed over the quad at the end
        }
#pragma unroll
        for (int n = 0; n < ON; ++n) {
            o[n][0] *= alpha[0];
            o[n][1] *= alpha[0];
            o[n][2] *= alpha[1];
            o[n][3] *= alpha[1];
        }


        // O += P V: the S accumulators of two adjacent n-tiles are exactly the A
        // fragment of one 16-key step.
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            const uint32_t pa[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                                    pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                    pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int dn = 0; dn < ON / 2; ++dn) {
                uint32_t b[4];
                ldmatrix_x4_trans(b, tV + (kk * 16 + lr + (lm & 1) * 8) * STRIDE + dn * 16 + (lm >> 1) * 8);
                mma_16816<T>(o[2 * dn], pa, b[0], b[1]);
                mma_16816<T>(o[2 * dn + 1], pa, b[2], b[3]);
            }
        }
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = l_run[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const int row = warp * 16 + g + r * 8;
        if (row >= rows) continue;
        const float inv = l > 0.f ? 1.f / l : 0.f;
        T* dst = out + (static_cast<int64_t>(q_begin + m0 + row) * num_heads + head) * D + 2 * t4;
#pragma unroll
        for (int n = 0; n < ON; ++n)
            *reinterpret_cast<uint32_t*>(dst + n * 8) = pack2<T>(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
    }
}

#define PREFILL_KERNEL(T, TN, D)                                                                         \
    extern "C" __global__ void __launch_bounds__(PREFILL_THREADS, PREFILL_MIN_BLOCKS) paged_attention_prefill_##TN##_d##D(   \
        T* out, const T* q, const T* k_cache, const T* v_cache, const uint32_t* cu_seqlens_q,             \
        const uint32_t* context_lens, const uint32_t* block_tables, int num_seqs, int num_heads,          \
        int num_kv_heads, int max_blocks, int block_shift, uint32_t num_blocks, float scale, int window) { \
        paged_attention_prefill<T, D>(out, q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, \
                                      num_seqs, num_heads, num_kv_heads, max_blocks, block_shift,           \
                                      num_blocks, scale, window);                                         \
    }

PREFILL_KERNEL(__nv_bfloat16, bf16, 64)
PREFILL_KERNEL(__nv_bfloat16, bf16, 128)
PREFILL_KERNEL(__half, f16, 64)
PREFILL_KERNEL(__half, f16, 128)
