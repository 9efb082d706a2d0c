// Greedy decoding's reduction of each logits row in one pass: the argmax (the lowest
// index among equal maxima) and its log-probability, -log(sum(exp(x - max))), kept as
// a running maximum and a sum rescaled whenever the maximum grows (online softmax).
// One CTA per row: a row of a 128k vocabulary is 512 KB, a few microseconds for one SM,
// where candle's chain of reductions took a dozen kernels.
#include "common.cuh"
#include <cooperative_groups.h>

namespace cg = cooperative_groups;

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

// ---------------------------------------------------------------------------------
// Sampling: every processor of a row's token choice in one launch for the whole batch,
// so that one copy brings back only the chosen ids, their logprobs and the requested
// alternatives. The semantics (order of the processors, thresholds, ties, the random
// draw) are those of the shard's host sampler (shard/src/runner/sampler/host.rs),
// which mirrors this kernel step by step:
//   penalties (repetition, then frequency + presence) -> temperature -> top-k ->
//   top-p -> min-p -> typical-p -> draw (or argmax), logprob and top-n of what is kept.
// Thresholds are found without sorting: a radix select over order-preserving 32-bit
// keys, 8 bits per pass, on histograms of counts (top-k) or of probability mass in
// fixed point (top-p, typical-p), so that the cost is 4 passes over the row whatever
// the filter keeps, and the sums are exact integers.
//
// A row is cut into SAMPLE_SLICES fixed slices and served by a cluster of 1 to 8 CTAs
// (the host picks the size so that the batch fills the GPU: a lone row gets 8 SMs,
// a batch of 256 one SM per row). Each float sum adds up per-slice partials in slice
// order whatever the cluster size, integer sums and maxima do not depend on the order,
// so a row's result is the same bit for bit in any batch.

constexpr int SAMPLE_THREADS = 1024;
constexpr int SAMPLE_WARPS = SAMPLE_THREADS / 32;
constexpr int SAMPLE_SLICES = 8;
constexpr int RADIX_BINS = 256;
// Probability mass relative to the most likely token, in fixed point: a warp's 32
// masses of at most 2^26 sum to less than 2^31 (one 32-bit warp reduction), and a
// token below 2^-26 of the top one adds nothing to the top-p and typical-p sums.
constexpr float MASS_SCALE = 67108864.f;
// The most alternatives (`top_n`) a row may ask for.
constexpr int SAMPLE_MAX_TOP_N = 32;

// Mirrors `SampleRow` in cuda.rs: 16 words per row.
struct SampleRow {
    float temperature;
    unsigned top_k;  // 0: off
    float top_p;     // 1: off
    float typical_p; // 1: off
    float min_p;     // 0: off
    unsigned do_sample;
    unsigned seed_lo, seed_hi;
    unsigned step;  // the index of the token being chosen (the draw's counter)
    float repetition_penalty, frequency_penalty, presence_penalty;
    unsigned penalties_begin, penalties_end;  // this row's (token, count) pairs
    unsigned top_n;
    unsigned unused;
};

// Larger floats get larger keys.
__device__ __forceinline__ unsigned order_key(float v) {
    const unsigned b = __float_as_uint(v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float clean_logit(float v) { return isnan(v) ? -INFINITY : v; }

__device__ __forceinline__ unsigned mass_of(float e) { return static_cast<unsigned>(e * MASS_SCALE); }

// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3"): four
// 32-bit words from a counter and a key, so a draw depends only on (seed, step, token).
__device__ __forceinline__ uint4 philox(uint4 c, uint2 k) {
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        const unsigned hi0 = __umulhi(0xD2511F53u, c.x), lo0 = 0xD2511F53u * c.x;
        const unsigned hi1 = __umulhi(0xCD9E8D57u, c.z), lo1 = 0xCD9E8D57u * c.z;
        c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
        k.x += 0x9E3779B9u;
        k.y += 0xBB67AE85u;
    }
    return c;
}

// A uniform draw in (0, 1) from 23 random bits (with 24, the largest would round to 1).
__device__ __forceinline__ float uniform_of(unsigned bits) {
    return (static_cast<float>(bits >> 9) + 0.5f) * 1.1920928955078125e-7f;
}

__device__ __forceinline__ unsigned word(const uint4& r, int j) {
    return j == 0 ? r.x : j == 1 ? r.y : j == 2 ? r.z : r.w;
}

struct KeyIndex {
    float key;
    int index;  // vocab: none
};

// The larger key, the lower index on a tie: the same winner in any order.
__device__ __forceinline__ KeyIndex better(KeyIndex a, KeyIndex b) {
    return (b.key > a.key || (b.key == a.key && b.index < a.index)) ? b : a;
}

struct Sum {
    __device__ float operator()(float a, float b) const { return a + b; }
    __device__ unsigned long long operator()(unsigned long long a, unsigned long long b) const { return a + b; }
};
struct Max {
    __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct Better {
    __device__ KeyIndex operator()(KeyIndex a, KeyIndex b) const { return better(a, b); }
};

__device__ __forceinline__ float shfl_xor(float v, int off) { return __shfl_xor_sync(0xffffffffu, v, off); }
__device__ __forceinline__ unsigned long long shfl_xor(unsigned long long v, int off) {
    return __shfl_xor_sync(0xffffffffu, v, off);
}
__device__ __forceinline__ KeyIndex shfl_xor(KeyIndex v, int off) {
    return KeyIndex{__shfl_xor_sync(0xffffffffu, v.key, off), __shfl_xor_sync(0xffffffffu, v.index, off)};
}

// What the CTAs of a row's cluster share: per-slice partials, a radix histogram.
struct RowShared {
    float slice_float[SAMPLE_SLICES];
    unsigned long long slice_mass[SAMPLE_SLICES];
    KeyIndex slice_best[SAMPLE_SLICES];
    unsigned long long hist[RADIX_BINS];
    float warp_float[SAMPLE_WARPS];
    unsigned long long warp_mass[SAMPLE_WARPS];
    KeyIndex warp_best[SAMPLE_WARPS];
    unsigned radix_prefix;
    unsigned long long radix_above;
    int chosen_top[SAMPLE_MAX_TOP_N];
};

template <typename T> __device__ __forceinline__ T* slot_of(RowShared& s);
template <> __device__ __forceinline__ float* slot_of<float>(RowShared& s) { return s.slice_float; }
template <> __device__ __forceinline__ unsigned long long* slot_of<unsigned long long>(RowShared& s) {
    return s.slice_mass;
}
template <> __device__ __forceinline__ KeyIndex* slot_of<KeyIndex>(RowShared& s) { return s.slice_best; }
template <typename T> __device__ __forceinline__ T* warp_slot_of(RowShared& s);
template <> __device__ __forceinline__ float* warp_slot_of<float>(RowShared& s) { return s.warp_float; }
template <> __device__ __forceinline__ unsigned long long* warp_slot_of<unsigned long long>(RowShared& s) {
    return s.warp_mass;
}
template <> __device__ __forceinline__ KeyIndex* warp_slot_of<KeyIndex>(RowShared& s) { return s.warp_best; }

// A CTA's reduction in a fixed order (the same result on every run).
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, RowShared& s) {
#pragma unroll
    for (int off = 16; off > 0; off /= 2) v = op(v, shfl_xor(v, off));
    T* scratch = warp_slot_of<T>(s);
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
    __syncthreads();
    T total = scratch[0];
    for (int w = 1; w < SAMPLE_WARPS; ++w) total = op(total, scratch[w]);
    __syncthreads();
    return total;
}

// The part of a row one CTA of its cluster serves: slices [first, first + count).
struct RowPart {
    cg::cluster_group cluster;
    int vocab, slice_len, first, count, slices_per_cta;
    __device__ int begin(int slice) const { return min(vocab, slice * slice_len); }
    __device__ int end(int slice) const { return min(vocab, (slice + 1) * slice_len); }
    // f(i) for every entry of this CTA's slices, the threads strided over each slice.
    template <typename F> __device__ void each(F f) const {
        for (int slice = first; slice < first + count; ++slice)
            for (int i = begin(slice) + threadIdx.x; i < end(slice); i += SAMPLE_THREADS) f(i);
    }
    // The row's reduction of `local(slice)` (one thread's partial over its entries of a
    // slice): block reductions per slice, then the slices' partials in slice order.
    template <typename T, typename Op, typename Local>
    __device__ T reduce(Op op, T identity, Local local, RowShared& s) const {
        for (int slice = first; slice < first + count; ++slice) {
            const T v = block_reduce(local(slice), op, s);
            if (threadIdx.x == 0) slot_of<T>(s)[slice] = v;
        }
        cluster.sync();
        T total = identity;
        for (int slice = 0; slice < SAMPLE_SLICES; ++slice) {
            const T* owner = cluster.map_shared_rank(slot_of<T>(s), slice / slices_per_cta);
            total = op(total, owner[slice]);
        }
        // Nobody overwrites a partial before every CTA has read it.
        cluster.sync();
        return total;
    }
};

// The largest key t such that the weights of the row's entries with key >= t add up
// to at least `target` (0 when even all of them fall short). `item(i, key, weight)`
// gives entry i's key and weight (weight 0: the entry does not count).
template <typename Item>
__device__ unsigned radix_select(const RowPart& row, unsigned long long target, Item item, RowShared& s) {
    const int lane = threadIdx.x % 32;
    unsigned prefix = 0;
    unsigned long long above = 0;  // weight of the entries above the prefix's range
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < RADIX_BINS; b += SAMPLE_THREADS) s.hist[b] = 0;
        __syncthreads();
        const unsigned fixed = shift == 24 ? 0u : 0xFFFFFFFFu << (shift + 8);
        row.each([&](int i) {
            unsigned key, weight;
            item(i, key, weight);
            if (weight > 0 && (key & fixed) == (prefix & fixed)) {
                // Lanes of one bin add up their weights first: one shared atomic per bin
                // and warp instead of one per entry.
                const unsigned bin = (key >> shift) & (RADIX_BINS - 1);
                const unsigned peers = __match_any_sync(__activemask(), bin);
                const unsigned sum = __reduce_add_sync(peers, weight);
                if (lane == __ffs(peers) - 1) atomicAdd(&s.hist[bin], static_cast<unsigned long long>(sum));
            }
        });
        row.cluster.sync();
        if (threadIdx.x < 32) {
            // Lane l adds up bins 8l..8l+7 of every CTA; the suffix sums find the
            // highest bin whose cumulated weight from the top reaches the target.
            unsigned long long local[8], lane_sum = 0;
#pragma unroll
            for (int j = 0; j < 8; ++j) local[j] = 0;
            for (unsigned rank = 0; rank < row.cluster.num_blocks(); ++rank) {
                const unsigned long long* hist = row.cluster.map_shared_rank(s.hist, rank);
#pragma unroll
                for (int j = 0; j < 8; ++j) local[j] += hist[lane * 8 + j];
            }
#pragma unroll
            for (int j = 0; j < 8; ++j) lane_sum += local[j];
            unsigned long long suffix = lane_sum;
#pragma unroll
            for (int off = 1; off < 32; off *= 2) {
                const unsigned long long o = __shfl_down_sync(0xffffffffu, suffix, off);
                if (lane + off < 32) suffix += o;
            }
            unsigned long long running = above + suffix - lane_sum;
            int found = -1;
            unsigned long long found_above = 0;
#pragma unroll
            for (int j = 7; j >= 0; --j) {
                if (found < 0 && running + local[j] >= target) {
                    found = lane * 8 + j;
                    found_above = running;
                }
                running += local[j];
            }
            const int best = static_cast<int>(__reduce_max_sync(0xffffffffu, static_cast<unsigned>(found + 1))) - 1;
            if (lane == (best < 0 ? 0 : best / 8)) {
                s.radix_prefix = prefix | (static_cast<unsigned>(best < 0 ? 0 : best) << shift);
                s.radix_above = best < 0 ? above : found_above;
            }
        }
        // Every CTA has read every histogram before any clears its own.
        row.cluster.sync();
        prefix = s.radix_prefix;
        above = s.radix_above;
    }
    return prefix;
}

// out: [rows, out_stride] f32: (id, logprob) of the chosen token, then top_n pairs of
// (id, logprob), most likely first ((-1, NaN) past the kept tokens); ids below 2^24
// are exact in f32. work: [rows, vocab] f32, used by rows with penalties. rows:
// [rows] SampleRow; penalties: (token, generated count) pairs, one per token a row has
// seen (repetition penalty) or generated (frequency and presence penalties). Launched
// with clusters of `cluster` CTAs (1, 2, 4 or 8), one cluster per row.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) sample_f32(float* __restrict__ out,
                                                                         float* __restrict__ work,
                                                                         const float* __restrict__ logits,
                                                                         const SampleRow* __restrict__ rows,
                                                                         const uint2* __restrict__ penalties,
                                                                         int vocab, int out_stride) {
    __shared__ RowShared s;
    cg::cluster_group cluster = cg::this_cluster();
    const int cluster_size = static_cast<int>(cluster.num_blocks());
    const int rank = static_cast<int>(cluster.block_rank());
    const int row_index = blockIdx.x / cluster_size;
    const int slices_per_cta = SAMPLE_SLICES / cluster_size;
    // Slices of whole Philox groups (4 entries).
    const int slice_len = (vocab + SAMPLE_SLICES * 4 - 1) / (SAMPLE_SLICES * 4) * 4;
    const RowPart row{cluster, vocab, slice_len, rank * slices_per_cta, slices_per_cta, slices_per_cta};
    await_previous_kernel();
    const SampleRow p = rows[row_index];
    const float* x = logits + static_cast<int64_t>(row_index) * vocab;
    float* row_out = out + static_cast<int64_t>(row_index) * out_stride;
    const int top_n = min(static_cast<int>(p.top_n), SAMPLE_MAX_TOP_N);
    const float inverse_temperature = 1.f / p.temperature;

    // Processed logits: x / temperature, with the penalised entries rewritten in `work`.
    const float* src = x;
    float scale = inverse_temperature;
    if (p.penalties_end > p.penalties_begin) {
        float* w = work + static_cast<int64_t>(row_index) * vocab;
        row.each([&](int i) { w[i] = clean_logit(x[i]) * inverse_temperature; });
        cluster.sync();
        for (unsigned e = p.penalties_begin + rank * SAMPLE_THREADS + threadIdx.x; e < p.penalties_end;
             e += cluster_size * SAMPLE_THREADS) {
            const uint2 pen = penalties[e];
            if (pen.x >= static_cast<unsigned>(vocab)) continue;
            float v = clean_logit(x[pen.x]);
            if (p.repetition_penalty != 1.f) v = v < 0.f ? v * p.repetition_penalty : v / p.repetition_penalty;
            if (pen.y > 0) v -= fmaf(p.frequency_penalty, static_cast<float>(pen.y), p.presence_penalty);
            w[pen.x] = v * inverse_temperature;
        }
        cluster.sync();
        src = w;
        scale = 1.f;
    }
    auto value = [&](int i) { return clean_logit(src[i]) * scale; };
    // One thread's partial of `f` over its entries of a slice.
    auto over_slice = [&](auto identity, auto op, auto f) {
        return [=, &row](int slice) {
            auto acc = identity;
            for (int i = row.begin(slice) + threadIdx.x; i < row.end(slice); i += SAMPLE_THREADS) acc = op(acc, f(i));
            return acc;
        };
    };

    const float row_max = row.reduce(Max{}, -INFINITY, over_slice(-INFINITY, Max{}, value), s);
    if (row_max == -INFINITY) {
        // Nothing to choose from: token 0, and a NaN logprob says so.
        if (rank == 0 && threadIdx.x == 0) {
            row_out[0] = 0.f;
            row_out[1] = NAN;
            for (int r = 0; r < top_n; ++r) {
                row_out[2 + 2 * r] = -1.f;
                row_out[3 + 2 * r] = NAN;
            }
        }
        return;
    }
    auto mass = [&](float v) { return mass_of(expf(v - row_max)); };

    unsigned top_k_key = 0;
    if (p.top_k > 0 && p.top_k < static_cast<unsigned>(vocab)) {
        top_k_key = radix_select(
            row, p.top_k,
            [&](int i, unsigned& key, unsigned& weight) {
                key = order_key(value(i));
                weight = 1;
            },
            s);
    }
    unsigned top_p_key = 0;
    if (p.top_p < 1.f) {
        auto top_k_mass = [&](int i) {
            const float v = value(i);
            return order_key(v) >= top_k_key ? static_cast<unsigned long long>(mass(v)) : 0ull;
        };
        const unsigned long long total = row.reduce(Sum{}, 0ull, over_slice(0ull, Sum{}, top_k_mass), s);
        const unsigned long long target =
            max(1ull, static_cast<unsigned long long>(static_cast<double>(p.top_p) * static_cast<double>(total)));
        top_p_key = radix_select(
            row, target,
            [&](int i, unsigned& key, unsigned& weight) {
                const float v = value(i);
                key = order_key(v);
                weight = key >= top_k_key ? mass(v) : 0u;
            },
            s);
    }
    const unsigned value_key = top_k_key > top_p_key ? top_k_key : top_p_key;
    // Top-k, top-p and min-p (relative to the most likely token, which the first two
    // always keep) are thresholds on the value; typical-p then ranks what they keep.
    auto in_value_range = [&](float v, float e) {
        return v > -INFINITY && order_key(v) >= value_key && e >= p.min_p;
    };

    // Typical-p ranks the kept tokens by how far their surprise is from the entropy.
    const bool typical = p.typical_p < 1.f;
    float log_sum = 0.f, entropy = 0.f;
    unsigned typical_key = 0;
    auto gap_key = [&](float v) { return ~order_key(fabsf(log_sum - (v - row_max) - entropy)); };
    if (typical) {
        auto kept_e = [&](int i) {
            const float v = value(i), e = expf(v - row_max);
            return in_value_range(v, e) ? e : 0.f;
        };
        auto kept_weighted = [&](int i) {
            const float v = value(i), e = expf(v - row_max);
            return in_value_range(v, e) ? e * (v - row_max) : 0.f;
        };
        auto kept_mass = [&](int i) {
            const float v = value(i), e = expf(v - row_max);
            return in_value_range(v, e) ? static_cast<unsigned long long>(mass_of(e)) : 0ull;
        };
        const float sum = row.reduce(Sum{}, 0.f, over_slice(0.f, Sum{}, kept_e), s);
        const float weighted = row.reduce(Sum{}, 0.f, over_slice(0.f, Sum{}, kept_weighted), s);
        const unsigned long long total = row.reduce(Sum{}, 0ull, over_slice(0ull, Sum{}, kept_mass), s);
        log_sum = logf(sum);
        entropy = log_sum - weighted / sum;
        const unsigned long long target = max(
            1ull, static_cast<unsigned long long>(static_cast<double>(p.typical_p) * static_cast<double>(total)));
        typical_key = radix_select(
            row, target,
            [&](int i, unsigned& key, unsigned& weight) {
                const float v = value(i), e = expf(v - row_max);
                key = gap_key(v);
                weight = in_value_range(v, e) ? mass_of(e) : 0u;
            },
            s);
    }
    auto kept = [&](float v, float e) { return in_value_range(v, e) && (!typical || gap_key(v) >= typical_key); };

    // The draw: argmax of e / E over the kept tokens, E ~ Exp(1) from the token's own
    // counter (the exponential race: token i wins with probability e_i / sum e); the
    // argmax of the value when not sampling. One pass gives the kept mass too.
    const uint2 seed = make_uint2(p.seed_lo, p.seed_hi);
    KeyIndex local_best{-INFINITY, vocab};
    auto kept_sum_of_slice = [&](int slice) {
        float acc = 0.f;
        for (int group = row.begin(slice) + 4 * threadIdx.x; group < row.end(slice); group += 4 * SAMPLE_THREADS) {
            const uint4 random =
                p.do_sample ? philox(make_uint4(group / 4, p.step, 0, 0), seed) : make_uint4(0, 0, 0, 0);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int i = group + j;
                if (i >= row.end(slice)) break;
                const float v = value(i);
                const float e = expf(v - row_max);
                if (!kept(v, e)) continue;
                acc += e;
                const float key = p.do_sample ? e / -logf(uniform_of(word(random, j))) : v;
                local_best = better(local_best, KeyIndex{key, i});
            }
        }
        return acc;
    };
    const float kept_sum = row.reduce(Sum{}, 0.f, kept_sum_of_slice, s);
    const KeyIndex chosen = row.reduce(Better{}, KeyIndex{-INFINITY, vocab}, [&](int) { return local_best; }, s);
    const float log_kept_sum = logf(kept_sum);
    if (rank == 0 && threadIdx.x == 0) {
        // The most likely token is always kept; a row without one says so by NaN.
        const bool some = chosen.index < vocab;
        row_out[0] = some ? static_cast<float>(chosen.index) : 0.f;
        row_out[1] = some ? value(chosen.index) - row_max - log_kept_sum : NAN;
    }
    // The alternatives: the most likely kept tokens, one row-wide argmax each.
    for (int r = 0; r < top_n; ++r) {
        KeyIndex candidate{-INFINITY, vocab};
        row.each([&](int i) {
            const float v = value(i);
            if (!kept(v, expf(v - row_max))) return;
            bool taken = false;
            for (int q = 0; q < r; ++q) taken |= s.chosen_top[q] == i;
            if (!taken) candidate = better(candidate, KeyIndex{v, i});
        });
        const KeyIndex top = row.reduce(Better{}, KeyIndex{-INFINITY, vocab}, [&](int) { return candidate; }, s);
        const bool some = top.index < vocab;
        if (threadIdx.x == 0) s.chosen_top[r] = some ? top.index : -1;
        if (rank == 0 && threadIdx.x == 0) {
            row_out[2 + 2 * r] = some ? static_cast<float>(top.index) : -1.f;
            row_out[3 + 2 * r] = some ? top.key - row_max - log_kept_sum : NAN;
        }
        __syncthreads();
    }
}

constexpr int MASK_THREADS = 256;

// Grammar masks (constrained decoding): out = logits with every token a row's bitmask
// forbids set to -inf, before `sample_f32`. logits, out: [rows, vocab] f32; allowed:
// [rows, words] u32, bit t % 32 of word t / 32 allows token t (tokens past the words
// are forbidden). Grid: (CTAs along the row, rows).
extern "C" __global__ void __launch_bounds__(MASK_THREADS) mask_logits_f32(float* __restrict__ out,
                                                                           const float* __restrict__ logits,
                                                                           const unsigned* __restrict__ allowed,
                                                                           int vocab, int words) {
    await_previous_kernel();
    const int64_t row = blockIdx.y;
    const unsigned* row_allowed = allowed + row * words;
    for (int i = blockIdx.x * MASK_THREADS + threadIdx.x; i < vocab; i += gridDim.x * MASK_THREADS) {
        const int word = i / 32;
        const bool ok = word < words && ((row_allowed[word] >> (i % 32)) & 1u);
        out[row * vocab + i] = ok ? logits[row * vocab + i] : -INFINITY;
    }
}
