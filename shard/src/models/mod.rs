//! Model architectures behind one small trait, and the registry that picks one from
//! config.json's `model_type` (or the GGUF's `general.architecture`).
//!
//! Models do not own the KV cache: `forward` takes the paged cache and a
//! `ForwardBatch` describing where every token goes.

pub mod llama;

use crate::cache::KvCache;
use crate::dist::{Comm, SingleRank};
use crate::weights::Weights;
use anyhow::{bail, Context};
use candle_core::{DType, Device, Result, Tensor};
use model_store::quantization::QuantizeArg;
use model_store::{Layout, ModelFiles};
use std::sync::Arc;

/// config.json `model_type`s served by `llama::Llama`.
const HF_LLAMA_FAMILY: &[&str] = &["llama", "mistral", "qwen2", "qwen3"];
/// GGUF `general.architecture`s served by `llama::Llama`.
const GGUF_LLAMA_FAMILY: &[&str] = &["llama", "qwen2", "qwen3"];

/// Loads the model at `files` onto `device`, computing in `dtype`, its weights as stored.
pub fn load_model(
    files: &ModelFiles,
    device: &Device,
    dtype: DType,
) -> anyhow::Result<Box<dyn Model>> {
    load_model_shard(files, device, dtype, None, &(Arc::new(SingleRank) as Comm))
}

/// Loads this rank's share of the model (tensor parallelism over `comm`'s group);
/// `quantize` is `--quantize` (checked against the checkpoint's own format).
pub fn load_model_shard(
    files: &ModelFiles,
    device: &Device,
    dtype: DType,
    quantize: Option<QuantizeArg>,
    comm: &Comm,
) -> anyhow::Result<Box<dyn Model>> {
    match files.layout() {
        Layout::HuggingFace => {
            let config = files.config_json()?;
            let model_type = config["model_type"]
                .as_str()
                .context("config.json has no model_type")?;
            if !HF_LLAMA_FAMILY.contains(&model_type) {
                bail!(
                    "unsupported model_type {model_type:?} (supported: {})",
                    HF_LLAMA_FAMILY.join(", ")
                )
            }
            let quantization = files.quantization(quantize)?;
            let config = llama::LlamaConfig::from_json(&config)?;
            let weights = Weights::from_safetensors_dir(files.path(), dtype, device)?
                .with_quantization(quantization);
            Ok(Box::new(llama::Llama::from_hf(config, &weights, comm)?))
        }
        Layout::Gguf => {
            files.quantization(quantize)?;
            let content = files.gguf_content()?;
            let arch = content
                .metadata
                .get("general.architecture")
                .and_then(|v| v.to_string().ok())
                .context("GGUF has no general.architecture")?
                .clone();
            if !GGUF_LLAMA_FAMILY.contains(&arch.as_str()) {
                bail!(
                    "unsupported GGUF architecture {arch:?} (supported: {})",
                    GGUF_LLAMA_FAMILY.join(", ")
                )
            }
            let weights = Weights::from_gguf(files.path(), content, dtype, device)?;
            // Quantized matrices cut into shares do not yet reproduce one rank's logits
            // (checked in tests/tensor_parallel.rs): refuse rather than serve drifting output.
            let quantized = weights
                .gguf_dtype("model.layers.0.self_attn.q_proj.weight")
                .is_some_and(|q| !matches!(q.as_str(), "F32" | "F16" | "BF16"));
            if quantized && comm.world_size() > 1 {
                bail!(
                    "tensor parallelism over quantized GGUF weights is not supported: \
                     serve the HF safetensors checkpoint with --num-shard > 1"
                )
            }
            Ok(Box::new(llama::Llama::from_gguf(&arch, &weights, comm)?))
        }
    }
}

/// What the runner and the cache need to know about a loaded model.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub model_type: String,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub sliding_window: Option<usize>,
    /// Activations and KV cache dtype.
    pub dtype: DType,
    /// "none", or e.g. "gguf:Q4_1", "awq:4bit-g128" (`Quantization`'s display).
    pub quantization: String,
}

pub trait Model: Send + Sync {
    /// Runs the batch, writes its new keys/values into `cache` at `batch.slots`, and
    /// returns f32 logits `[batch.logits_indices.len(), vocab_size]`.
    fn forward(&self, batch: &ForwardBatch, cache: &mut KvCache) -> Result<Tensor>;
    fn spec(&self) -> &ModelSpec;
}

/// Where one sequence's new tokens sit in the batch and in the KV cache.
#[derive(Debug, Clone)]
pub struct SequenceLayout {
    /// Tokens of this sequence in this forward pass (whole uncached prompt at prefill, 1 at decode).
    pub new_tokens: usize,
    /// Tokens in the cache for this sequence after this pass (already cached + new).
    pub context_len: usize,
    /// KV blocks of the sequence, in order.
    pub block_table: Vec<u32>,
}

/// One forward pass over a ragged batch: the sequences' new tokens are concatenated,
/// with no padding. Host-side layout (`seqs`) for the CPU path, device tensors for kernels.
pub struct ForwardBatch {
    /// `[total_new_tokens]` u32.
    pub input_ids: Tensor,
    /// `[total_new_tokens]` u32: absolute position of each new token.
    pub positions: Tensor,
    /// `[total_new_tokens]` i64: KV cache slot (block * block_size + offset) of each new token.
    pub slots: Tensor,
    pub seqs: Vec<SequenceLayout>,
    /// `[num_seqs, max_blocks]` u32, rows padded with 0.
    pub block_tables: Tensor,
    /// `[num_seqs]` u32: `SequenceLayout::context_len` of each sequence.
    pub context_lens: Tensor,
    /// `[num_seqs + 1]` u32: prefix sums of `new_tokens`.
    pub cu_seqlens_q: Tensor,
    /// `[num_logits]` u32: rows of the flattened tokens whose logits are wanted.
    pub logits_indices: Tensor,
    pub max_new_tokens: usize,
    pub max_context_len: usize,
    /// The largest of `input_ids`, kept on the host so checking it costs no device read.
    pub max_input_id: u32,
}

/// The input of one sequence to `ForwardBatch::new`.
pub struct SequenceInput<'a> {
    pub new_token_ids: &'a [u32],
    /// Position of the first new token (= tokens already cached).
    pub start_position: usize,
    /// Slot of every position of the sequence, from 0 (at least start_position + new tokens).
    pub slots: &'a [u32],
    pub block_table: &'a [u32],
}

impl ForwardBatch {
    /// `logits_rows` indexes the flattened new tokens of all sequences.
    pub fn new(seqs: &[SequenceInput], logits_rows: &[u32], device: &Device) -> Result<Self> {
        let total: usize = seqs.iter().map(|s| s.new_token_ids.len()).sum();
        let mut input_ids = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        let mut slots = Vec::with_capacity(total);
        let mut cu_seqlens_q = vec![0u32];
        let mut layouts = Vec::with_capacity(seqs.len());
        let max_blocks = seqs
            .iter()
            .map(|s| s.block_table.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let mut block_tables = vec![0u32; seqs.len() * max_blocks];
        for (i, seq) in seqs.iter().enumerate() {
            let n = seq.new_token_ids.len();
            let end = seq.start_position + n;
            if seq.slots.len() < end {
                candle_core::bail!(
                    "sequence {i}: {} slots for {end} positions",
                    seq.slots.len()
                );
            }
            input_ids.extend_from_slice(seq.new_token_ids);
            positions.extend((seq.start_position..end).map(|p| p as u32));
            slots.extend(seq.slots[seq.start_position..end].iter().map(|&s| s as i64));
            cu_seqlens_q.push(cu_seqlens_q[i] + n as u32);
            block_tables[i * max_blocks..i * max_blocks + seq.block_table.len()]
                .copy_from_slice(seq.block_table);
            layouts.push(SequenceLayout {
                new_tokens: n,
                context_len: end,
                block_table: seq.block_table.to_vec(),
            });
        }
        let context_lens: Vec<u32> = layouts.iter().map(|l| l.context_len as u32).collect();
        let max_input_id = input_ids.iter().copied().max().unwrap_or(0);
        Ok(Self {
            input_ids: Tensor::new(input_ids, device)?,
            positions: Tensor::new(positions, device)?,
            slots: Tensor::new(slots, device)?,
            block_tables: Tensor::from_vec(block_tables, (seqs.len(), max_blocks), device)?,
            context_lens: Tensor::new(context_lens, device)?,
            cu_seqlens_q: Tensor::new(cu_seqlens_q, device)?,
            logits_indices: Tensor::new(logits_rows, device)?,
            max_new_tokens: layouts.iter().map(|l| l.new_tokens).max().unwrap_or(0),
            max_context_len: layouts.iter().map(|l| l.context_len).max().unwrap_or(0),
            max_input_id,
            seqs: layouts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_model_type_is_named() {
        let dir = std::env::temp_dir().join(format!("shard-models-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), r#"{"model_type": "gpt2"}"#).unwrap();
        let files = ModelFiles::open(&dir).unwrap();
        let err = load_model(&files, &Device::Cpu, DType::F32)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("gpt2") && err.contains("llama"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
