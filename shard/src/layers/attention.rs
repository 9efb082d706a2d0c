//! Self-attention over the paged KV cache.
//!
//! Two seams are meant for device kernels: `rotate_and_cache` (rotate the new tokens'
//! queries and keys, store keys and values at their slots) and `paged_attention` (every
//! new token attends over its sequence's cached context through the block table). On a
//! CUDA device (a build with the `cuda` feature) they run the kernels of
//! `text-generation-kernels`; elsewhere the device-agnostic candle ops here.

use super::linear::{Linear, RowParallelLinear};
use super::norm::RmsNorm;
use super::rotary::RotaryAt;
use super::{uses_cuda_kernels, with_cpu_f32};
use crate::dist::{even_split, Comm, Communicator};
use crate::models::ForwardBatch;
use crate::weights::Weights;
use candle_core::{bail, DType, Device, Result, Tensor};
use text_generation_cpu_kernels::{decode_attention, AttentionShape};
use std::ops::Range;

/// Shape and options of one attention layer.
#[derive(Debug, Clone)]
pub struct AttentionConfig {
    pub hidden_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Biases on q/k/v (Qwen2).
    pub qkv_bias: bool,
    /// RMSNorm of every query/key head before the rotation (Qwen3), with this epsilon.
    pub qk_norm_eps: Option<f64>,
    /// Keys further back than this many positions are not attended (Mistral).
    pub sliding_window: Option<usize>,
}

/// One sequence's share of the batch, as the candle path reads the cache.
struct SequenceKeys {
    /// `[kv_len]` u32: cache slots of the attended keys, oldest first.
    slots: Tensor,
    chunks: Vec<QueryChunk>,
}

/// Query rows attended together: bounds the `[heads, rows, keys]` scores of long
/// prompts, and lets early rows skip the keys after them.
const QUERY_CHUNK: usize = if cfg!(test) { 2 } else { 256 };

/// Consecutive new tokens of one sequence and the keys they see.
struct QueryChunk {
    /// First row in the flattened batch.
    first_token: usize,
    rows: usize,
    /// The keys seen, as a range of the sequence's gathered keys.
    key_start: usize,
    key_len: usize,
    /// `[rows, key_len]` additive mask (0 / -inf) in f32, when anything is masked.
    mask: Option<Tensor>,
}

/// A decode step (one new token per sequence): all sequences attend in one batched
/// matmul over their keys padded to the longest.
struct DecodeKeys {
    /// Each sequence's key slots, oldest first (for the CPU kernel, which reads the
    /// cache where it lies).
    seq_slots: Vec<Vec<u32>>,
    /// `[num_seqs * max_keys]` u32: each sequence's key slots, oldest first, padded.
    slots: Tensor,
    max_keys: usize,
    /// `[num_seqs, 1, 1, max_keys]` additive mask of the padding, when there is any.
    mask: Option<Tensor>,
}

/// The batch's cache addressing, prepared once per forward pass and sliding window.
/// Kernels read the device tensors of `batch` (`block_tables`, `context_lens`,
/// `cu_seqlens_q`) with `block_size`; the candle path reads `seqs`.
pub struct PagedAttentionInput<'a> {
    pub batch: &'a ForwardBatch,
    pub block_size: usize,
    pub sliding_window: Option<usize>,
    /// The CUDA kernels run (see `uses_cuda_kernels`), not the candle ops.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    kernels: bool,
    /// `[tokens]` i64 slots of the new tokens (the runner's `batch.slots`, checked).
    slots: Tensor,
    /// Empty when the kernels run (they read the batch's device tensors) or for a
    /// decode step.
    seqs: Vec<SequenceKeys>,
    decode: Option<DecodeKeys>,
}

impl<'a> PagedAttentionInput<'a> {
    /// Checks the batch against a cache of `num_blocks` blocks of `block_size` slots.
    pub fn new(
        batch: &'a ForwardBatch,
        block_size: usize,
        num_blocks: usize,
        sliding_window: Option<usize>,
        dtype: DType,
    ) -> Result<Self> {
        let device = batch.input_ids.device();
        let total_tokens = batch.input_ids.dim(0)?;
        let new_token_sum: usize = batch.seqs.iter().map(|s| s.new_tokens).sum();
        if new_token_sum != total_tokens {
            bail!("batch layout covers {new_token_sum} tokens, input_ids has {total_tokens}")
        }
        let num_slots = block_size * num_blocks;
        let slots = batch.slots.to_dtype(DType::I64)?;
        let kernels = uses_cuda_kernels(device, dtype);
        // Reading the slots back would stall the GPU every pass; the kernel skips a slot
        // outside the cache instead, and the block tables are checked below.
        let bad_slot = if kernels {
            None
        } else {
            slots
                .to_vec1::<i64>()?
                .into_iter()
                .find(|&s| s < 0 || s as usize >= num_slots)
        };
        if let Some(bad) = bad_slot {
            bail!("KV slot {bad} outside the cache's {num_slots} slots")
        }
        let mut seqs = Vec::with_capacity(batch.seqs.len());
        let is_decode = batch.seqs.iter().all(|s| s.new_tokens == 1);
        let mut decode_slots = Vec::new();
        let mut first_token = 0;
        for (i, seq) in batch.seqs.iter().enumerate() {
            let n = seq.new_tokens;
            if n == 0 || n > seq.context_len {
                bail!(
                    "sequence {i}: {n} new tokens for a context of {}",
                    seq.context_len
                )
            }
            if seq.block_table.len() * block_size < seq.context_len {
                bail!(
                    "sequence {i}: {} blocks cannot hold {} tokens",
                    seq.block_table.len(),
                    seq.context_len
                )
            }
            if let Some(&bad) = seq.block_table.iter().find(|&&b| b as usize >= num_blocks) {
                bail!("sequence {i}: block {bad} outside the cache's {num_blocks} blocks")
            }
            if kernels {
                continue;
            }
            let start = seq.context_len - n;
            // The first new token sees back to `start - window + 1`; later ones less far.
            let kv_start = sliding_window.map_or(0, |w| (start + 1).saturating_sub(w));
            let slot_ids: Vec<u32> = (kv_start..seq.context_len)
                .map(|p| {
                    seq.block_table[p / block_size] * block_size as u32 + (p % block_size) as u32
                })
                .collect();
            if is_decode {
                decode_slots.push(slot_ids);
                continue;
            }
            let mut chunks = Vec::with_capacity(n.div_ceil(QUERY_CHUNK));
            for c0 in (0..n).step_by(QUERY_CHUNK) {
                let rows = QUERY_CHUNK.min(n - c0);
                let (first_pos, last_pos) = (start + c0, start + c0 + rows - 1);
                let key_start =
                    sliding_window.map_or(0, |w| (first_pos + 1).saturating_sub(w)) - kv_start;
                let key_len = last_pos + 1 - kv_start - key_start;
                let masked = |q: usize, k: usize| {
                    let (q_pos, k_pos) = (first_pos + q, kv_start + key_start + k);
                    k_pos > q_pos || sliding_window.is_some_and(|w| q_pos - k_pos >= w)
                };
                // Windows only slide forward: the corner keys tell whether a row masks any.
                let needs_mask = (0..rows).any(|q| masked(q, 0) || masked(q, key_len - 1));
                let mask = if needs_mask {
                    let values: Vec<f32> = (0..rows * key_len)
                        .map(|j| {
                            if masked(j / key_len, j % key_len) {
                                f32::NEG_INFINITY
                            } else {
                                0.0
                            }
                        })
                        .collect();
                    Some(Tensor::from_vec(values, (rows, key_len), device)?)
                } else {
                    None
                };
                chunks.push(QueryChunk {
                    first_token: first_token + c0,
                    rows,
                    key_start,
                    key_len,
                    mask,
                });
            }
            seqs.push(SequenceKeys {
                slots: Tensor::new(slot_ids, device)?,
                chunks,
            });
            first_token += n;
        }
        let decode = if decode_slots.is_empty() {
            None
        } else {
            Some(DecodeKeys::new(&decode_slots, device)?)
        };
        Ok(Self {
            batch,
            block_size,
            sliding_window,
            kernels,
            slots,
            seqs,
            decode,
        })
    }
}

impl DecodeKeys {
    fn new(per_seq: &[Vec<u32>], device: &Device) -> Result<Self> {
        let max_keys = per_seq.iter().map(Vec::len).max().unwrap_or(0);
        let mut slots = Vec::with_capacity(per_seq.len() * max_keys);
        let mut mask = Vec::with_capacity(per_seq.len() * max_keys);
        for seq in per_seq {
            slots.extend_from_slice(seq);
            // Padding reads slot 0 and is masked out.
            slots.resize(slots.len() + max_keys - seq.len(), 0);
            mask.extend((0..max_keys).map(|k| {
                if k < seq.len() {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            }));
        }
        let padded = per_seq.iter().any(|s| s.len() < max_keys);
        let mask = if padded {
            Some(Tensor::from_vec(
                mask,
                (per_seq.len(), 1, 1, max_keys),
                device,
            )?)
        } else {
            None
        };
        Ok(Self {
            seq_slots: per_seq.to_vec(),
            slots: Tensor::new(slots, device)?,
            max_keys,
            mask,
        })
    }

    /// `q`: `[num_seqs, heads, head_dim]` -> `[num_seqs, heads * head_dim]`.
    fn attend(
        &self,
        q: &Tensor,
        key_cache: &Tensor,
        value_cache: &Tensor,
        scale: f64,
    ) -> Result<Tensor> {
        let (num_seqs, num_heads, head_dim) = q.dims3()?;
        let num_kv_heads = key_cache.dim(1)?;
        if q.device().is_cpu() && [q, key_cache, value_cache].iter().all(|t| t.dtype() == DType::F32) {
            // In place: the gathered copies below moved the batch's whole KV history
            // through memory twice per layer and step.
            let q = q.contiguous()?;
            let slots: Vec<&[u32]> = self.seq_slots.iter().map(Vec::as_slice).collect();
            let shape = AttentionShape { num_heads, num_kv_heads, head_dim };
            let out = with_cpu_f32(&[&q, key_cache, value_cache], |data| {
                decode_attention(data[0], data[1], data[2], &slots, shape, scale as f32)
            })?;
            return Tensor::from_vec(out, (num_seqs, num_heads * head_dim), q.device());
        }
        let group = num_heads / num_kv_heads;
        // [seqs * keys, Hkv, D] -> [seqs, Hkv, keys, D]
        let gather = |cache: &Tensor| {
            cache
                .index_select(&self.slots, 0)?
                .reshape((num_seqs, self.max_keys, num_kv_heads, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (k, v) = (gather(key_cache)?, gather(value_cache)?);
        // Query heads of one KV head side by side: [seqs, Hkv, group, D].
        let q = q
            .contiguous()?
            .reshape((num_seqs, num_kv_heads, group, head_dim))?;
        let scores = q
            .matmul(&k.t()?)?
            .to_dtype(DType::F32)?
            .affine(scale, 0.0)?;
        let scores = match &self.mask {
            Some(mask) => scores.broadcast_add(mask)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        probs.matmul(&v)?.reshape((num_seqs, num_heads * head_dim))
    }
}

/// Rotates the new tokens' queries (`[tokens, heads * head_dim]`) and keys
/// (`[tokens, kv_heads * head_dim]`) by their positions and stores the keys and values
/// in the layer's cache (`[slots, kv_heads, head_dim]`) at `input`'s slots, in place;
/// returns the rotated queries, `[tokens, heads, head_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn rotate_and_cache(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rotary: &RotaryAt,
    key_cache: &Tensor,
    value_cache: &Tensor,
    input: &PagedAttentionInput,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if input.kernels {
        let (cos, sin, layout) = rotary.tables()?;
        return text_generation_kernels::rope_and_cache(
            q,
            k,
            v,
            &cos,
            &sin,
            layout == super::rotary::RotaryLayout::Interleaved,
            key_cache,
            value_cache,
            &input.slots,
        );
    }
    let (_, kv_heads, head_dim) = key_cache.dims3()?;
    let tokens = q.dim(0)?;
    let q = rotary.apply(&q.reshape((tokens, (), head_dim))?)?;
    let kv_shape = (tokens, kv_heads, head_dim);
    let k = rotary.apply(&k.reshape(kv_shape)?)?;
    write_kv_cache(key_cache, value_cache, &k, &v.reshape(kv_shape)?, input)?;
    Ok(q)
}

/// Stores the new tokens' keys and values (`[tokens, kv_heads, head_dim]`) into the
/// layer's cache at `input`'s slots, in place (the candle path).
fn write_kv_cache(
    key_cache: &Tensor,
    value_cache: &Tensor,
    k: &Tensor,
    v: &Tensor,
    input: &PagedAttentionInput,
) -> Result<()> {
    let (tokens, kv_heads, head_dim) = k.dims3()?;
    let row = kv_heads * head_dim;
    // scatter_set writes whole rows of the flattened cache: every element of a token's
    // row carries that token's slot.
    let index = input
        .slots
        .unsqueeze(1)?
        .broadcast_as((tokens, row))?
        .contiguous()?;
    for (cache, new) in [(key_cache, k), (value_cache, v)] {
        let flat_cache = cache.reshape((cache.dim(0)?, row))?;
        let new = new
            .to_dtype(cache.dtype())?
            .contiguous()?
            .reshape((tokens, row))?;
        flat_cache.scatter_set(&index, &new, 0)?;
    }
    Ok(())
}

/// Causal attention of every new token (`q`: `[tokens, heads, head_dim]`) over its
/// sequence's context read from the cache; returns `[tokens, heads * head_dim]`.
/// Grouped-query heads share their KV head; softmax runs in f32.
pub fn paged_attention(
    q: &Tensor,
    key_cache: &Tensor,
    value_cache: &Tensor,
    input: &PagedAttentionInput,
    scale: f64,
) -> Result<Tensor> {
    let (_, num_heads, head_dim) = q.dims3()?;
    let num_kv_heads = key_cache.dim(1)?;
    if num_heads % num_kv_heads != 0 {
        bail!("{num_heads} query heads cannot share {num_kv_heads} KV heads")
    }
    #[cfg(feature = "cuda")]
    if input.kernels {
        let batch = input.batch;
        let q = q.contiguous()?;
        let out = if batch.max_new_tokens == 1 {
            text_generation_kernels::paged_attention_decode(
                &q,
                key_cache,
                value_cache,
                &batch.block_tables,
                &batch.context_lens,
                input.block_size,
                scale as f32,
                input.sliding_window,
            )?
        } else {
            text_generation_kernels::paged_attention_prefill(
                &q,
                key_cache,
                value_cache,
                &batch.cu_seqlens_q,
                &batch.context_lens,
                &batch.block_tables,
                input.block_size,
                scale as f32,
                input.sliding_window,
            )?
        };
        return out.reshape((q.dim(0)?, num_heads * head_dim));
    }
    if let Some(decode) = &input.decode {
        return decode.attend(q, key_cache, value_cache, scale);
    }
    let group = num_heads / num_kv_heads;
    let mut outputs = Vec::new();
    for seq in &input.seqs {
        // [kv_len, Hkv, D] -> [Hkv, kv_len, D]
        let keys = key_cache
            .index_select(&seq.slots, 0)?
            .transpose(0, 1)?
            .contiguous()?;
        let values = value_cache
            .index_select(&seq.slots, 0)?
            .transpose(0, 1)?
            .contiguous()?;
        for chunk in &seq.chunks {
            let (n, kv_len) = (chunk.rows, chunk.key_len);
            // [n, H, D] -> [Hkv, group * n, D]: query heads of one KV head side by side.
            let q = q
                .narrow(0, chunk.first_token, n)?
                .transpose(0, 1)?
                .contiguous()?;
            let q = q.reshape((num_kv_heads, group * n, head_dim))?;
            let k = keys.narrow(1, chunk.key_start, kv_len)?.contiguous()?;
            let v = values.narrow(1, chunk.key_start, kv_len)?.contiguous()?;
            let scores = q
                .matmul(&k.t()?)?
                .to_dtype(DType::F32)?
                .affine(scale, 0.0)?;
            let scores = scores.reshape((num_heads, n, kv_len))?;
            let scores = match &chunk.mask {
                Some(mask) => scores.broadcast_add(mask)?,
                None => scores,
            };
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
            let out = probs
                .reshape((num_kv_heads, group * n, kv_len))?
                .matmul(&v)?;
            outputs.push(
                out.reshape((num_heads, n, head_dim))?
                    .transpose(0, 1)?
                    .reshape((n, num_heads * head_dim))?,
            );
        }
    }
    Tensor::cat(&outputs, 0)
}

/// The q/k/v projections of this rank's heads.
enum QkvProj {
    Split {
        q: Linear,
        k: Linear,
        v: Linear,
    },
    /// Rows `[q | k | v]` of one projection (dense weights on CUDA, GGUF weights on CPU):
    /// one product, whose output's column ranges are q, k and v (views: the CUDA kernels
    /// read strided rows, candle's reshapes copy them).
    Fused {
        qkv: Linear,
        dims: [usize; 3],
    },
}

impl QkvProj {
    fn new(q: Linear, k: Linear, v: Linear, fuse: bool) -> Result<Self> {
        let parts = [q, k, v];
        if fuse {
            if let Some(qkv) = Linear::concat_outputs(&parts)? {
                let dims = parts.each_ref().map(Linear::out_dim);
                return Ok(Self::Fused { qkv, dims });
            }
        }
        let [q, k, v] = parts;
        Ok(Self::Split { q, k, v })
    }

    /// `x`: `[tokens, hidden]` -> q `[tokens, q_dim]`, k and v `[tokens, kv_dim]`.
    fn forward(&self, x: &Tensor) -> Result<[Tensor; 3]> {
        match self {
            Self::Split { q, k, v } => Ok([q.forward(x)?, k.forward(x)?, v.forward(x)?]),
            Self::Fused {
                qkv,
                dims: [q_dim, k_dim, v_dim],
            } => {
                let y = qkv.forward(x)?;
                Ok([
                    y.narrow(1, 0, *q_dim)?,
                    y.narrow(1, *q_dim, *k_dim)?,
                    y.narrow(1, q_dim + k_dim, *v_dim)?,
                ])
            }
        }
    }
}

pub struct Attention {
    qkv_proj: QkvProj,
    o_proj: RowParallelLinear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    head_dim: usize,
}

/// The heads one rank of a tensor-parallel group computes (indices into the layer's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadShares {
    pub heads: Range<usize>,
    pub kv_heads: Range<usize>,
}

impl AttentionConfig {
    /// Query heads split evenly over the ranks; KV heads too, or, when there are fewer
    /// KV heads than ranks, each rank keeps the one KV head its query heads read.
    pub fn head_shares(&self, comm: &dyn Communicator) -> Result<HeadShares> {
        let world = comm.world_size();
        let heads =
            even_split(comm, self.num_heads, "the attention heads")?.unwrap_or(0..self.num_heads);
        let kv_heads = if self.num_kv_heads >= world {
            even_split(comm, self.num_kv_heads, "the KV heads")?.unwrap_or(0..self.num_kv_heads)
        } else if world.is_multiple_of(self.num_kv_heads) {
            let kv_head = comm.rank() / (world / self.num_kv_heads);
            kv_head..kv_head + 1
        } else {
            bail!(
                "{} KV heads cannot be spread over {world} shards",
                self.num_kv_heads
            )
        };
        Ok(HeadShares { heads, kv_heads })
    }
}

impl Attention {
    /// `w` points at the layer's `self_attn`; loads this rank's heads.
    pub fn load(w: &Weights, cfg: &AttentionConfig, comm: &Comm) -> Result<Self> {
        let (q_dim, kv_dim) = (
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
        );
        let shares = cfg.head_shares(&**comm)?;
        // One rank loads whole tensors (no copy out of the mapped file).
        let rows = |heads: &Range<usize>| {
            (comm.world_size() > 1).then(|| heads.start * cfg.head_dim..heads.end * cfg.head_dim)
        };
        let column = |name: &str, out_dim: usize, heads: &Range<usize>| {
            Linear::load_column_parallel(
                &w.pp(name),
                cfg.hidden_size,
                out_dim,
                cfg.qkv_bias,
                rows(heads),
            )
        };
        let qk_norm = |name: &str| {
            cfg.qk_norm_eps
                .map(|eps| RmsNorm::load(&w.pp(name), cfg.head_dim, eps))
                .transpose()
        };
        // Each rank fuses its own share of the heads: on CUDA for the kernels that read
        // strided rows, for quantized weights on CPU to run one parallel product, not three.
        Ok(Self {
            qkv_proj: QkvProj::new(
                column("q_proj", q_dim, &shares.heads)?,
                column("k_proj", kv_dim, &shares.kv_heads)?,
                column("v_proj", kv_dim, &shares.kv_heads)?,
                w.device().is_cuda() || w.is_gguf() || w.quantization().is_some(),
            )?,
            o_proj: RowParallelLinear::load(&w.pp("o_proj"), q_dim, cfg.hidden_size, comm)?,
            q_norm: qk_norm("q_norm")?,
            k_norm: qk_norm("k_norm")?,
            head_dim: cfg.head_dim,
        })
    }

    /// `x`: `[tokens, hidden]`; `kv_cache`: this layer's (keys, values).
    pub fn forward(
        &self,
        x: &Tensor,
        rotary: &RotaryAt,
        kv_cache: &(Tensor, Tensor),
        input: &PagedAttentionInput,
    ) -> Result<Tensor> {
        let tokens = x.dim(0)?;
        let [q, k, v] = self.qkv_proj.forward(x)?;
        // Qwen3 normalises every head before the rotation.
        let head_norm = |proj: Tensor, norm: &Option<RmsNorm>| -> Result<Tensor> {
            match norm {
                Some(norm) => norm
                    .forward(&proj.reshape((tokens, (), self.head_dim))?)?
                    .reshape((tokens, ())),
                None => Ok(proj),
            }
        };
        let (q, k) = (head_norm(q, &self.q_norm)?, head_norm(k, &self.k_norm)?);
        let (key_cache, value_cache) = kv_cache;
        let q = rotate_and_cache(&q, &k, &v, rotary, key_cache, value_cache, input)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let out = paged_attention(&q, key_cache, value_cache, input, scale)?;
        self.o_proj.forward(&out)
    }
}

/// Checks a cache layer against the attention's KV shape (clear error instead of a
/// failing matmul deep inside).
pub fn check_cache_layer(
    cache: &(Tensor, Tensor),
    num_kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: &Device,
) -> Result<()> {
    let (_, heads, dim) = cache.0.dims3()?;
    if heads != num_kv_heads || dim != head_dim {
        bail!("KV cache holds {heads} heads of {dim}, the model needs {num_kv_heads} of {head_dim}")
    }
    if cache.0.dtype() != dtype {
        bail!(
            "KV cache is {:?}, the model computes in {dtype:?}",
            cache.0.dtype()
        )
    }
    if !cache.0.device().same_device(device) {
        bail!("KV cache and model are on different devices")
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::SequenceInput;

    /// Naive attention of one sequence: q `[n, H, D]`, k/v `[ctx, Hkv, D]`, the last n
    /// keys being the new tokens'; `dims` = (n, ctx, H, Hkv, D).
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dims: (usize, usize, usize, usize, usize),
        window: Option<usize>,
    ) -> Vec<f32> {
        let (n, ctx, h, hkv, d) = dims;
        let mut out = vec![0f32; n * h * d];
        for t in 0..n {
            let pos = ctx - n + t;
            for head in 0..h {
                let kvh = head / (h / hkv);
                let allowed: Vec<usize> = (0..=pos)
                    .filter(|&j| window.is_none_or(|w| pos - j < w))
                    .collect();
                let scores: Vec<f32> = allowed
                    .iter()
                    .map(|&j| {
                        (0..d)
                            .map(|e| q[(t * h + head) * d + e] * k[(j * hkv + kvh) * d + e])
                            .sum::<f32>()
                            / (d as f32).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let exps: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f32 = exps.iter().sum();
                for (p, &j) in exps.iter().zip(&allowed) {
                    for e in 0..d {
                        out[(t * h + head) * d + e] += p / sum * v[(j * hkv + kvh) * d + e];
                    }
                }
            }
        }
        out
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761).wrapping_add(seed * 97)) % 1000) as f32
                    / 500.0
                    - 1.0
            })
            .collect()
    }

    #[test]
    fn paged_attention_matches_naive_with_gqa_window_and_prefix() -> Result<()> {
        let dev = Device::Cpu;
        let (h, hkv, d, block_size, num_blocks) = (4, 2, 8, 4, 8);
        let (ctx, n) = (11, 3); // 8 tokens already cached, 3 new
        let window = Some(5);
        // Blocks deliberately out of order.
        let block_table = [5u32, 1, 6];
        let slots: Vec<u32> = (0..ctx)
            .map(|p| block_table[p / block_size] * block_size as u32 + (p % block_size) as u32)
            .collect();
        let ids = vec![0u32; n];
        let batch = ForwardBatch::new(
            &[SequenceInput {
                new_token_ids: &ids,
                start_position: ctx - n,
                slots: &slots,
                block_table: &block_table,
            }],
            &[2],
            &dev,
        )?;
        let cache_shape = (num_blocks * block_size, hkv, d);
        let (kc, vc) = (
            Tensor::zeros(cache_shape, DType::F32, &dev)?,
            Tensor::zeros(cache_shape, DType::F32, &dev)?,
        );
        let (k_all, v_all, q) = (
            values(ctx * hkv * d, 1),
            values(ctx * hkv * d, 2),
            values(n * h * d, 3),
        );
        // The cached prefix, written as an earlier pass would have.
        let prefix = ForwardBatch::new(
            &[SequenceInput {
                new_token_ids: &vec![0u32; ctx - n],
                start_position: 0,
                slots: &slots,
                block_table: &block_table,
            }],
            &[0],
            &dev,
        )?;
        let prefix_input =
            PagedAttentionInput::new(&prefix, block_size, num_blocks, window, DType::F32)?;
        let kv = |data: &[f32], from: usize, len: usize| {
            Tensor::from_slice(
                &data[from * hkv * d..(from + len) * hkv * d],
                (len, hkv, d),
                &dev,
            )
        };
        write_kv_cache(
            &kc,
            &vc,
            &kv(&k_all, 0, ctx - n)?,
            &kv(&v_all, 0, ctx - n)?,
            &prefix_input,
        )?;
        let input = PagedAttentionInput::new(&batch, block_size, num_blocks, window, DType::F32)?;
        write_kv_cache(
            &kc,
            &vc,
            &kv(&k_all, ctx - n, n)?,
            &kv(&v_all, ctx - n, n)?,
            &input,
        )?;
        let q_t = Tensor::from_slice(&q, (n, h, d), &dev)?;
        let out = paged_attention(&q_t, &kc, &vc, &input, 1.0 / (d as f64).sqrt())?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let expected = naive(&q, &k_all, &v_all, (n, ctx, h, hkv, d), window);
        for (a, b) in out.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        Ok(())
    }

    #[test]
    fn rejects_slots_and_blocks_outside_the_cache() -> Result<()> {
        let dev = Device::Cpu;
        let ids = [1u32, 2];
        let bad_slot = ForwardBatch::new(
            &[SequenceInput {
                new_token_ids: &ids,
                start_position: 0,
                slots: &[0, 99],
                block_table: &[0],
            }],
            &[1],
            &dev,
        )?;
        assert!(PagedAttentionInput::new(&bad_slot, 4, 2, None, DType::F32).is_err());
        let bad_block = ForwardBatch::new(
            &[SequenceInput {
                new_token_ids: &ids,
                start_position: 0,
                slots: &[0, 1],
                block_table: &[7],
            }],
            &[1],
            &dev,
        )?;
        let err = PagedAttentionInput::new(&bad_block, 4, 2, None, DType::F32)
            .err()
            .unwrap();
        assert!(err.to_string().contains("block 7"), "{err}");
        Ok(())
    }

    /// The fused projection gives the same q, k and v as three projections, for one
    /// token (one GEMM, narrowed output) and several (GEMMs on the fused weight's rows).
    #[test]
    fn fused_qkv_splits_like_separate_projections() -> Result<()> {
        use candle_core::quantized::QMatMul;
        let dev = Device::Cpu;
        let (hidden, q_dim, kv_dim) = (16, 8, 4);
        let linear = |out: usize| -> Result<Linear> {
            Linear::new(
                QMatMul::Tensor(Tensor::randn(0f32, 1., (out, hidden), &dev)?),
                Some(Tensor::randn(0f32, 1., out, &dev)?),
            )
        };
        let split = QkvProj::new(linear(q_dim)?, linear(kv_dim)?, linear(kv_dim)?, false)?;
        let QkvProj::Split { q, k, v } = split else {
            panic!("not asked to fuse")
        };
        let inputs = [
            Tensor::randn(0f32, 1., (1, hidden), &dev)?,
            Tensor::randn(0f32, 1., (5, hidden), &dev)?,
        ];
        let expected = inputs
            .iter()
            .map(|x| Ok([q.forward(x)?, k.forward(x)?, v.forward(x)?]))
            .collect::<Result<Vec<_>>>()?;
        let fused = QkvProj::new(q, k, v, true)?;
        assert!(
            matches!(fused, QkvProj::Fused { .. }),
            "dense projections fuse"
        );
        for (x, expected) in inputs.iter().zip(expected) {
            for (got, want) in fused.forward(x)?.iter().zip(expected) {
                assert_eq!(got.dims(), want.dims());
                let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(diff < 1e-5, "{} tokens: {diff}", x.dim(0)?);
            }
        }
        Ok(())
    }
}
