//! CUDA kernels of the shard, over candle tensors on a CUDA device:
//!
//! - [`rope_and_cache`]: rotary embedding of a step's queries and keys, and its keys
//!   and values written into the paged KV cache by slot;
//! - [`paged_attention_decode`]: one query token per sequence against its cached
//!   context (split over the context for long sequences, then merged);
//! - [`paged_attention_prefill`]: causal flash attention for ragged prefill batches
//!   whose new tokens follow a (possibly cached) prefix, on tensor cores;
//! - [`silu_mul`]: SwiGLU of a fused gate/up projection in one pass;
//! - [`gemv`]: a few activation rows times a weight matrix, at memory bandwidth
//!   (decode steps), and [`gemv_silu_mul`], the same with SwiGLU applied to a fused
//!   gate/up projection;
//! - [`add_rms_norm`]: a block's residual add and the RMSNorm after it in one pass;
//! - [`greedy`]: each logits row's argmax and its log-probability in one pass;
//! - [`sample`]: each row's whole token choice (penalties, temperature, top-k, top-p,
//!   typical-p, min-p, a seeded counter-based draw, logprobs and alternatives).
//!
//! Layouts follow the shard's paged cache: a cache tensor is
//! `[num_blocks * block_size, num_kv_heads, head_dim]`, row `slot` holding the token
//! at `block_tables[seq][pos / block_size] * block_size + pos % block_size`.
//! Element types are bf16 and f16; head_dim 64 or 128; num_heads a multiple of
//! num_kv_heads (GQA); block_size a power of two.
//!
//! Every kernel is launched with programmatic dependent launch where the GPU has it
//! (Hopper on): it may start while its predecessor drains, and waits for it before
//! touching data.
//!
//! Everything lives behind the `cuda` feature: without it the crate is empty and
//! builds without a CUDA toolkit.

#[cfg(feature = "cuda")]
mod cuda;

#[cfg(feature = "cuda")]
pub use cuda::{
    add_rms_norm, gemv, gemv_silu_mul, greedy, mask_logits, paged_attention_decode, paged_attention_prefill,
    rope_and_cache, sample, silu_mul, SampleRow, GEMV_MAX_ROWS, SAMPLE_MAX_TOP_N, SAMPLE_ROW_WORDS,
};
