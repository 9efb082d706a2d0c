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

// ---------------------------------------------------------------------------------
// Sampling: every processor of a row's token choice in one CTA per row, so that one
// launch serves a whole batch and one copy brings back only the chosen ids, their
// logprobs and the requested alternatives. The semantics (order of the processors,
// thresholds, ties, the random draw) are those of the shard's host sampler
// (shard/src/runner/sampler/host.rs), which mirrors this kernel step by step:
//   penalties (repetition, then frequency + presence) -> temperature -> top-k ->
//   top-p -> min-p -> typical-p -> draw (or argmax), logprob and top-n of what is kept.
// Thresholds are found without sorting: a radix select over order-preserving 32-bit
// keys, 8 bits per pass, on histograms of counts (top-k) or of probability mass in
// fixed point (top-p, typical-p), so that the cost is 4 passes over the row whatever
// the filter keeps, and the sums are exact integers: the same kept set on every run.

constexpr int SAMPLE_THREADS = 1024;
constexpr int SAMPLE_WARPS = SAMPLE_THREADS / 32;
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

// Larger floats get larger keys; -inf the smallest of the finite-or-infinite ones.
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

// Block-wide reduction in a fixed order (the same result on every run).
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T* scratch) {
#pragma unroll
    for (int off = 16; off > 0; off /= 2) v = op(v, __shfl_xor_sync(0xffffffffu, v, off));
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
    __syncthreads();
    T total = scratch[0];
    for (int w = 1; w < SAMPLE_WARPS; ++w) total = op(total, scratch[w]);
    __syncthreads();
    return total;
}

struct KeyIndex {
    float key;
    int index;  // vocab: none
};

// The larger key, the lower index on a tie.
__device__ __forceinline__ KeyIndex better(KeyIndex a, KeyIndex b) {
    return (b.key > a.key || (b.key == a.key && b.index < a.index)) ? b : a;
}

__device__ __forceinline__ KeyIndex block_best(KeyIndex v, KeyIndex* scratch) {
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
        const KeyIndex o{__shfl_xor_sync(0xffffffffu, v.key, off), __shfl_xor_sync(0xffffffffu, v.index, off)};
        v = better(v, o);
    }
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
    __syncthreads();
    KeyIndex best = scratch[0];
    for (int w = 1; w < SAMPLE_WARPS; ++w) best = better(best, scratch[w]);
    __syncthreads();
    return best;
}

struct RadixShared {
    unsigned long long hist[RADIX_BINS];
    unsigned prefix;
    unsigned long long above;
};

// The largest key t such that the weights of the entries with key >= t add up to at
// least `target` (0 when even all of them fall short). `item(i, key, weight)` gives
// entry i's key and weight (weight 0: the entry does not count).
template <typename Item>
__device__ unsigned radix_select(int vocab, unsigned long long target, Item item, RadixShared& s) {
    const int lane = threadIdx.x % 32;
    unsigned prefix = 0;
    unsigned long long above = 0;  // weight of the entries above the prefix's range
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < RADIX_BINS; b += SAMPLE_THREADS) s.hist[b] = 0;
        __syncthreads();
        const unsigned fixed = shift == 24 ? 0u : 0xFFFFFFFFu << (shift + 8);
        for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) {
            unsigned key, weight;
            item(i, key, weight);
            if (weight > 0 && (key & fixed) == (prefix & fixed)) {
                // Lanes of one bin add up their weights first: one shared atomic per bin
                // and warp instead of one per entry (the bins of the first pass are the
                // exponents, which few entries of a row differ in).
                const unsigned bin = (key >> shift) & (RADIX_BINS - 1);
                const unsigned peers = __match_any_sync(__activemask(), bin);
                const unsigned sum = __reduce_add_sync(peers, weight);
                if (lane == __ffs(peers) - 1) atomicAdd(&s.hist[bin], static_cast<unsigned long long>(sum));
            }
        }
        __syncthreads();
        if (threadIdx.x < 32) {
            // Lane l holds bins 8l..8l+7; the suffix sums find the highest bin whose
            // cumulated weight from the top reaches the target.
            unsigned long long local[8], lane_sum = 0;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                local[j] = s.hist[lane * 8 + j];
                lane_sum += local[j];
            }
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
                s.prefix = prefix | (static_cast<unsigned>(best < 0 ? 0 : best) << shift);
                s.above = best < 0 ? above : found_above;
            }
        }
        __syncthreads();
        prefix = s.prefix;
        above = s.above;
        __syncthreads();
    }
    return prefix;
}

// out: [rows, out_stride] f32: (id, logprob) of the chosen token, then top_n pairs of
// (id, logprob), most likely first ((-1, NaN) past the kept tokens); ids below 2^24
// are exact in f32. work: [rows, vocab] f32, used by rows with penalties. rows:
// [rows] SampleRow; penalties: (token, generated count) pairs, one per token a row has
// seen (repetition penalty) or generated (frequency and presence penalties).
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) sample_f32(float* __restrict__ out,
                                                                         float* __restrict__ work,
                                                                         const float* __restrict__ logits,
                                                                         const SampleRow* __restrict__ rows,
                                                                         const uint2* __restrict__ penalties,
                                                                         int vocab, int out_stride) {
    __shared__ RadixShared radix;
    __shared__ float float_scratch[SAMPLE_WARPS];
    __shared__ unsigned long long mass_scratch[SAMPLE_WARPS];
    __shared__ KeyIndex best_scratch[SAMPLE_WARPS];
    __shared__ int chosen_top[SAMPLE_MAX_TOP_N];
    await_previous_kernel();
    const SampleRow p = rows[blockIdx.x];
    const float* x = logits + static_cast<int64_t>(blockIdx.x) * vocab;
    float* row_out = out + static_cast<int64_t>(blockIdx.x) * out_stride;
    const int top_n = min(static_cast<int>(p.top_n), SAMPLE_MAX_TOP_N);

    // Processed logits: x / temperature, with the penalised entries rewritten in `work`.
    const float* src = x;
    float divisor = p.temperature;
    if (p.penalties_end > p.penalties_begin) {
        float* w = work + static_cast<int64_t>(blockIdx.x) * vocab;
        for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) w[i] = clean_logit(x[i]) / p.temperature;
        __syncthreads();
        for (unsigned e = p.penalties_begin + threadIdx.x; e < p.penalties_end; e += SAMPLE_THREADS) {
            const uint2 pen = penalties[e];
            if (pen.x >= static_cast<unsigned>(vocab)) continue;
            float v = clean_logit(x[pen.x]);
            if (p.repetition_penalty != 1.f) v = v < 0.f ? v * p.repetition_penalty : v / p.repetition_penalty;
            if (pen.y > 0) v -= fmaf(p.frequency_penalty, static_cast<float>(pen.y), p.presence_penalty);
            w[pen.x] = v / p.temperature;
        }
        __syncthreads();
        src = w;
        divisor = 1.f;
    }
    auto value = [&](int i) { return clean_logit(src[i]) / divisor; };

    float local_max = -INFINITY;
    for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) local_max = fmaxf(local_max, value(i));
    const float row_max = block_reduce(local_max, [](float a, float b) { return fmaxf(a, b); }, float_scratch);
    if (row_max == -INFINITY) {
        // Nothing to choose from: token 0, and a NaN logprob says so.
        if (threadIdx.x == 0) {
            row_out[0] = 0.f;
            row_out[1] = NAN;
            for (int r = 0; r < top_n; ++r) {
                row_out[2 + 2 * r] = -1.f;
                row_out[3 + 2 * r] = NAN;
            }
        }
        return;
    }
    const auto sum_u64 = [](unsigned long long a, unsigned long long b) { return a + b; };
    const auto sum_f32 = [](float a, float b) { return a + b; };

    unsigned top_k_key = 0;
    if (p.top_k > 0 && p.top_k < static_cast<unsigned>(vocab)) {
        top_k_key = radix_select(
            vocab, p.top_k,
            [&](int i, unsigned& key, unsigned& weight) {
                key = order_key(value(i));
                weight = 1;
            },
            radix);
    }
    unsigned top_p_key = 0;
    if (p.top_p < 1.f) {
        unsigned long long local = 0;
        for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) {
            const float v = value(i);
            if (order_key(v) >= top_k_key) local += mass_of(expf(v - row_max));
        }
        const unsigned long long total = block_reduce(local, sum_u64, mass_scratch);
        const unsigned long long target =
            max(1ull, static_cast<unsigned long long>(static_cast<double>(p.top_p) * static_cast<double>(total)));
        top_p_key = radix_select(
            vocab, target,
            [&](int i, unsigned& key, unsigned& weight) {
                const float v = value(i);
                key = order_key(v);
                weight = key >= top_k_key ? mass_of(expf(v - row_max)) : 0u;
            },
            radix);
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
        float local_sum = 0.f, local_weighted = 0.f;
        unsigned long long local_mass = 0;
        for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) {
            const float v = value(i);
            const float e = expf(v - row_max);
            if (in_value_range(v, e)) {
                local_sum += e;
                local_weighted += e * (v - row_max);
                local_mass += mass_of(e);
            }
        }
        const float sum = block_reduce(local_sum, sum_f32, float_scratch);
        const float weighted = block_reduce(local_weighted, sum_f32, float_scratch);
        const unsigned long long total = block_reduce(local_mass, sum_u64, mass_scratch);
        log_sum = logf(sum);
        entropy = log_sum - weighted / sum;
        const unsigned long long target = max(
            1ull, static_cast<unsigned long long>(static_cast<double>(p.typical_p) * static_cast<double>(total)));
        typical_key = radix_select(
            vocab, target,
            [&](int i, unsigned& key, unsigned& weight) {
                const float v = value(i);
                const float e = expf(v - row_max);
                key = gap_key(v);
                weight = in_value_range(v, e) ? mass_of(e) : 0u;
            },
            radix);
    }
    auto kept = [&](float v, float e) { return in_value_range(v, e) && (!typical || gap_key(v) >= typical_key); };

    // The draw: argmax of e / E over the kept tokens, E ~ Exp(1) from the token's own
    // counter (the exponential race: token i wins with probability e_i / sum e).
    const uint2 seed = make_uint2(p.seed_lo, p.seed_hi);
    float local_sum = 0.f;
    KeyIndex local_best{-INFINITY, vocab};
    for (int group = threadIdx.x * 4; group < vocab; group += SAMPLE_THREADS * 4) {
        const uint4 random = p.do_sample ? philox(make_uint4(group / 4, p.step, 0, 0), seed) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int i = group + j;
            if (i >= vocab) break;
            const float v = value(i);
            const float e = expf(v - row_max);
            if (!kept(v, e)) continue;
            local_sum += e;
            const float key = p.do_sample ? e / -logf(uniform_of(word(random, j))) : v;
            local_best = better(local_best, KeyIndex{key, i});
        }
    }
    const float kept_sum = block_reduce(local_sum, sum_f32, float_scratch);
    const KeyIndex chosen = block_best(local_best, best_scratch);
    const float log_kept_sum = logf(kept_sum);
    if (threadIdx.x == 0) {
        // The most likely token is always kept; a row without one says so by NaN.
        const bool some = chosen.index < vocab;
        row_out[0] = some ? static_cast<float>(chosen.index) : 0.f;
        row_out[1] = some ? value(chosen.index) - row_max - log_kept_sum : NAN;
    }
    // The alternatives: the most likely kept tokens, one block-wide argmax each.
    for (int r = 0; r < top_n; ++r) {
        KeyIndex candidate{-INFINITY, vocab};
        for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) {
            const float v = value(i);
            if (!kept(v, expf(v - row_max))) continue;
            bool taken = false;
            for (int q = 0; q < r; ++q) taken |= chosen_top[q] == i;
            if (!taken) candidate = better(candidate, KeyIndex{v, i});
        }
        const KeyIndex top = block_best(candidate, best_scratch);
        if (threadIdx.x == 0) {
            const bool some = top.index < vocab;
            chosen_top[r] = some ? top.index : -1;
            row_out[2 + 2 * r] = some ? static_cast<float>(top.index) : -1.f;
            row_out[3 + 2 * r] = some ? top.key - row_max - log_kept_sum : NAN;
        }
        __syncthreads();
    }
}
