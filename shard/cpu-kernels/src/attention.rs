//! Decode attention over a paged KV cache on CPU: each sequence's one query row
//! attends to the keys at its own cache slots, read where they lie (no gathered copy
//! of the cache), one `(sequence, head)` at a time in a fixed order, so a sequence's
//! output is the same bits whatever sequences share its batch.

use rayon::prelude::*;

/// The cache's and the queries' shapes.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// `q` `[seqs, num_heads, head_dim]`, caches `[slots, num_kv_heads, head_dim]`,
/// `seq_slots[s]` the cache slots of sequence `s`'s keys (at least one each); returns
/// `[seqs, num_heads * head_dim]`: `softmax(scale · q·Kᵀ) · V` per head, query head
/// `h` reading KV head `h / (num_heads / num_kv_heads)`.
///
/// # Panics
/// On shapes that do not match, or a slot outside the cache.
pub fn decode_attention(
    q: &[f32],
    key_cache: &[f32],
    value_cache: &[f32],
    seq_slots: &[&[u32]],
    shape: AttentionShape,
    scale: f32,
) -> Vec<f32> {
    let AttentionShape {
        num_heads,
        num_kv_heads,
        head_dim,
    } = shape;
    assert!(
        num_kv_heads > 0 && num_heads % num_kv_heads == 0,
        "heads {num_heads} / {num_kv_heads}"
    );
    assert_eq!(
        q.len(),
        seq_slots.len() * num_heads * head_dim,
        "q is not [seqs, heads, head_dim]"
    );
    assert_eq!(
        key_cache.len(),
        value_cache.len(),
        "key and value caches differ"
    );
    let group = num_heads / num_kv_heads;
    let mut out = vec![0f32; q.len()];
    let attend: fn(&Task, &mut Vec<f32>, &mut [f32]) = {
        #[cfg(target_arch = "x86_64")]
        {
            if crate::simd::avx2::available() {
                // SAFETY: AVX2 and FMA were just detected.
                |task, scores, out| unsafe { attend_avx2(task, scores, out) }
            } else {
                attend_portable
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            attend_portable
        }
    };
    // One task per (sequence, KV head): its `group` query heads read each key once
    // between them. Each head's scores, softmax and sums are computed in the same
    // order as for a lone head, so the bits do not depend on the grouping either.
    out.par_chunks_mut(group * head_dim)
        .enumerate()
        .for_each_init(Vec::new, |scores, (index, out)| {
            let (seq, kv_head) = (index / num_kv_heads, index % num_kv_heads);
            let first_row = seq * num_heads + kv_head * group;
            let task = Task {
                q: &q[first_row * head_dim..(first_row + group) * head_dim],
                key_cache,
                value_cache,
                slots: seq_slots[seq],
                slot_stride: num_kv_heads * head_dim,
                kv_offset: kv_head * head_dim,
                head_dim,
                scale,
            };
            attend(&task, scores, out)
        });
    out
}

/// The query heads of one KV head of one sequence.
struct Task<'a> {
    /// `[group, head_dim]`.
    q: &'a [f32],
    key_cache: &'a [f32],
    value_cache: &'a [f32],
    slots: &'a [u32],
    slot_stride: usize,
    kv_offset: usize,
    head_dim: usize,
    scale: f32,
}

impl Task<'_> {
    /// The task's KV head at `slot` of `cache`.
    #[inline(always)]
    fn head<'c>(&self, cache: &'c [f32], slot: u32) -> &'c [f32] {
        let start = slot as usize * self.slot_stride + self.kv_offset;
        &cache[start..start + self.head_dim]
    }
}

/// `attend` compiled for AVX2 (8-lane vectors; the same operations, so the same bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(task: &Task, scores: &mut Vec<f32>, out: &mut [f32]) {
    attend(task, scores, out)
}

fn attend_portable(task: &Task, scores: &mut Vec<f32>, out: &mut [f32]) {
    attend(task, scores, out)
}

/// `out` `[group, head_dim]`: the task's heads' attention; `scores` scratch space.
#[inline(always)]
fn attend(task: &Task, scores: &mut Vec<f32>, out: &mut [f32]) {
    let Task { q, slots, head_dim, .. } = *task;
    // `scores[h * keys + j]`: head `h`'s score of key `j`.
    scores.clear();
    scores.resize(q.len() / head_dim * slots.len(), 0.);
    for (j, &slot) in slots.iter().enumerate() {
        let key = task.head(task.key_cache, slot);
        for (h, q) in q.chunks_exact(head_dim).enumerate() {
            scores[h * slots.len() + j] = task.scale * dot(q, key);
        }
    }
    for (h, out) in out.chunks_exact_mut(head_dim).enumerate() {
        let weights = &mut scores[h * slots.len()..(h + 1) * slots.len()];
        let max = weights.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0f32;
        for weight in weights.iter_mut() {
            *weight = (*weight - max).exp();
            total += *weight;
        }
        weighted_values(out, weights, slots, |slot| task.head(task.value_cache, slot));
        out.iter_mut().for_each(|o| *o /= total);
    }
}

/// `out = Σ_j weights[j] · value(slots[j])`, each element summed over `j` in order.
/// Dimensions go `VALUE_BLOCK` at a time, their sums held in registers across the keys.
#[inline(always)]
fn weighted_values<'a>(
    out: &mut [f32],
    weights: &[f32],
    slots: &[u32],
    value: impl Fn(u32) -> &'a [f32],
) {
    const VALUE_BLOCK: usize = 64;
    let blocks = out.len() / VALUE_BLOCK;
    for block in 0..blocks {
        let mut sums = [0f32; VALUE_BLOCK];
        for (&slot, &weight) in slots.iter().zip(weights) {
            let v = &value(slot)[block * VALUE_BLOCK..(block + 1) * VALUE_BLOCK];
            for (sum, &v) in sums.iter_mut().zip(v) {
                *sum += weight * v;
            }
        }
        out[block * VALUE_BLOCK..(block + 1) * VALUE_BLOCK].copy_from_slice(&sums);
    }
    let tail = &mut out[blocks * VALUE_BLOCK..];
    tail.fill(0.);
    for (&slot, &weight) in slots.iter().zip(weights) {
        for (o, &v) in tail.iter_mut().zip(&value(slot)[blocks * VALUE_BLOCK..]) {
            *o += weight * v;
        }
    }
}

/// In 8 independent lanes, summed in a fixed order (the compiler vectorises it).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (a, b) in a_chunks.zip(b_chunks) {
        for i in 0..8 {
            lanes[i] += a[i] * b[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocks::tests::Rng;

    /// Against the textbook formula in f64, and a sequence's rows are the same bits
    /// alone or among others.
    #[test]
    fn matches_softmax_attention_alone_or_batched() {
        // 20: a tail of 4 after 8-lane dot products and no whole 64-value block; 72: one
        // block and a tail.
        for head_dim in [20, 72] {
            let shape = AttentionShape {
                num_heads: 6,
                num_kv_heads: 2,
                head_dim,
            };
            let mut rng = Rng(5);
            let slots_in_cache = 40;
            let cache_len = slots_in_cache * shape.num_kv_heads * shape.head_dim;
            let keys: Vec<f32> = (0..cache_len).map(|_| rng.unit()).collect();
            let values: Vec<f32> = (0..cache_len).map(|_| rng.unit()).collect();
            let seqs: Vec<Vec<u32>> = vec![vec![3, 7, 1], vec![0], (10..40).rev().collect()];
            let row = shape.num_heads * shape.head_dim;
            let q: Vec<f32> = (0..seqs.len() * row).map(|_| rng.unit()).collect();
            let slots: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
            let batched = decode_attention(&q, &keys, &values, &slots, shape, 0.3);
            for (s, seq) in seqs.iter().enumerate() {
                let alone = decode_attention(
                    &q[s * row..(s + 1) * row],
                    &keys,
                    &values,
                    &[seq],
                    shape,
                    0.3,
                );
                assert_eq!(alone, batched[s * row..(s + 1) * row], "sequence {s}");
                for h in 0..shape.num_heads {
                    let kv = h / (shape.num_heads / shape.num_kv_heads);
                    let vec_at = |cache: &[f32], slot: u32, d: usize| {
                        cache[(slot as usize * shape.num_kv_heads + kv) * shape.head_dim + d] as f64
                    };
                    let qh = &q[s * row + h * shape.head_dim..][..shape.head_dim];
                    let scores: Vec<f64> = seq
                        .iter()
                        .map(|&k| {
                            0.3 * (0..shape.head_dim)
                                .map(|d| qh[d] as f64 * vec_at(&keys, k, d))
                                .sum::<f64>()
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let weights: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                    let total: f64 = weights.iter().sum();
                    for d in 0..shape.head_dim {
                        let want: f64 = seq
                            .iter()
                            .zip(&weights)
                            .map(|(&k, w)| w * vec_at(&values, k, d))
                            .sum::<f64>()
                            / total;
                        let got = batched[s * row + h * shape.head_dim + d] as f64;
                        assert!(
                            (got - want).abs() < 1e-5,
                            "seq {s} head {h} dim {d}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
