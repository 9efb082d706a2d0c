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
    let slot_stride = num_kv_heads * head_dim;
    let mut out = vec![0f32; q.len()];
    out.par_chunks_mut(head_dim)
        .enumerate()
        .for_each_init(Vec::new, |scores, (row, out)| {
            let (seq, head) = (row / num_heads, row % num_heads);
            let q = &q[row * head_dim..(row + 1) * head_dim];
            let kv_offset = (head / group) * head_dim;
            let at = |cache, slot: u32| {
                head_at(cache, slot as usize * slot_stride + kv_offset, head_dim)
            };
            let slots = seq_slots[seq];
            scores.clear();
            scores.extend(
                slots
                    .iter()
                    .map(|&slot| scale * dot(q, at(key_cache, slot))),
            );
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut total = 0f32;
            for score in scores.iter_mut() {
                *score = (*score - max).exp();
                total += *score;
            }
            for (&slot, &weight) in slots.iter().zip(scores.iter()) {
                for (o, &v) in out.iter_mut().zip(at(value_cache, slot)) {
                    *o += weight * v;
                }
            }
            out.iter_mut().for_each(|o| *o /= total);
        });
    out
}

fn head_at(cache: &[f32], start: usize, head_dim: usize) -> &[f32] {
    &cache[start..start + head_dim]
}

/// In 8 independent lanes, summed in a fixed order (the compiler vectorises it).
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
        let shape = AttentionShape {
            num_heads: 6,
            num_kv_heads: 2,
            head_dim: 20,
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
