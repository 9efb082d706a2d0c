//! The Llama family in one implementation: Llama 2/3/3.1/3.2, Mistral (sliding window),
//! Qwen2/2.5 (q/k/v biases), Qwen3 (q/k head norms), SmolLM2; tied or untied
//! embeddings; grouped-query attention. Configured from an HF config.json or from GGUF
//! metadata, so both formats run the same code.

use super::{ForwardBatch, Model, ModelSpec};
use crate::cache::KvCache;
use crate::layers::attention::{
    check_cache_layer, Attention, AttentionConfig, PagedAttentionInput,
};
use crate::dist::Comm;
use crate::layers::embedding::{VocabParallelEmbedding, VocabParallelLmHead};
use crate::layers::mlp::Mlp;
use crate::layers::norm::RmsNorm;
use crate::layers::rotary::{RopeScaling, RotaryEmbedding, RotaryLayout};
use crate::weights::Weights;
use anyhow::{bail, Context};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Result, Tensor};
use serde::Deserialize;

/// The config.json fields the family uses.
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub rope_scaling: Option<RopeScalingConfig>,
    pub attention_bias: Option<bool>,
    pub sliding_window: Option<usize>,
    /// Qwen2's switch for `sliding_window` (off by default there).
    pub use_sliding_window: Option<bool>,
    /// Qwen2: layers from this index on use the sliding window.
    pub max_window_layers: Option<usize>,
    pub hidden_act: Option<String>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10000.0
}
fn default_max_position_embeddings() -> usize {
    4096
}

#[derive(Debug, Clone, Deserialize)]
pub struct RopeScalingConfig {
    pub rope_type: Option<String>,
    #[serde(rename = "type")]
    pub legacy_type: Option<String>,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
}

/// Everything the model build needs besides the weights.
struct Architecture {
    config: LlamaConfig,
    rotary_layout: RotaryLayout,
    rope_scaling: Option<RopeScaling>,
    qk_norm: bool,
    /// Per layer.
    sliding_windows: Vec<Option<usize>>,
}

impl LlamaConfig {
    pub fn from_json(json: &serde_json::Value) -> anyhow::Result<Self> {
        let config: Self = serde_json::from_value(json.clone())
            .context("config.json does not describe a Llama-family model")?;
        Ok(config)
    }

    /// The config of a GGUF file of architecture `arch` ("llama", "qwen2", "qwen3").
    pub fn from_gguf(content: &gguf_file::Content, arch: &str) -> anyhow::Result<Self> {
        let md = |key: &str| {
            content
                .metadata
                .get(&format!("{arch}.{key}"))
                .with_context(|| format!("GGUF metadata lacks {arch}.{key}"))
        };
        let usize_of = |key: &str| -> anyhow::Result<usize> { Ok(md(key)?.to_u32()? as usize) };
        let f64_of = |key: &str| -> anyhow::Result<f64> { Ok(md(key)?.to_f32()? as f64) };
        let hidden_size = usize_of("embedding_length")?;
        let num_attention_heads = usize_of("attention.head_count")?;
        let vocab_size = match usize_of("vocab_size") {
            Ok(v) => v,
            Err(_) => content
                .metadata
                .get("tokenizer.ggml.tokens")
                .context("GGUF has neither a vocab_size nor tokenizer tokens")?
                .to_vec()?
                .len(),
        };
        let head_dim =
            usize_of("attention.key_length").unwrap_or(hidden_size / num_attention_heads);
        if let Ok(rope_dims) = usize_of("rope.dimension_count") {
            if rope_dims != head_dim {
                bail!(
                    "partial rotary embeddings ({rope_dims} of {head_dim} dims) are not supported"
                )
            }
        }
        Ok(Self {
            model_type: arch.to_string(),
            hidden_size,
            intermediate_size: usize_of("feed_forward_length")?,
            num_hidden_layers: usize_of("block_count")?,
            num_attention_heads,
            num_key_value_heads: Some(
                usize_of("attention.head_count_kv").unwrap_or(num_attention_heads),
            ),
            head_dim: Some(head_dim),
            vocab_size,
            rms_norm_eps: f64_of("attention.layer_norm_rms_epsilon")?,
            rope_theta: f64_of("rope.freq_base").unwrap_or_else(|_| default_rope_theta()),
            max_position_embeddings: usize_of("context_length")
                .unwrap_or_else(|_| default_max_position_embeddings()),
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
            rope_scaling: None,
            attention_bias: Some(arch == "qwen2"),
            sliding_window: None,
            use_sliding_window: None,
            max_window_layers: None,
            hidden_act: None,
        })
    }

    fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    fn architecture(
        self,
        rotary_layout: RotaryLayout,
        rope_scaling: Option<RopeScaling>,
    ) -> anyhow::Result<Architecture> {
        if let Some(act) = self.hidden_act.as_deref() {
            if act != "silu" {
                bail!("hidden_act {act:?} is not supported (Llama-family models use silu)")
            }
        }
        if self.num_attention_heads == 0
            || self.num_kv_heads() == 0
            || !self.num_attention_heads.is_multiple_of(self.num_kv_heads())
        {
            bail!(
                "{} attention heads cannot share {} KV heads",
                self.num_attention_heads,
                self.num_kv_heads()
            )
        }
        let layers = self.num_hidden_layers;
        let sliding_windows = match self.model_type.as_str() {
            // Qwen2 configs carry a sliding_window that only applies when switched on,
            // and then from layer max_window_layers on.
            "qwen2" | "qwen3" => match (self.use_sliding_window, self.sliding_window) {
                (Some(true), Some(w)) => {
                    let from = self.max_window_layers.unwrap_or(0);
                    (0..layers).map(|i| (i >= from).then_some(w)).collect()
                }
                _ => vec![None; layers],
            },
            _ => vec![self.sliding_window; layers],
        };
        let qk_norm = self.model_type == "qwen3";
        Ok(Architecture {
            config: self,
            rotary_layout,
            rope_scaling,
            qk_norm,
            sliding_windows,
        })
    }
}

impl RopeScalingConfig {
    fn to_scaling(&self) -> anyhow::Result<Option<RopeScaling>> {
        let kind = self
            .rope_type
            .as_deref()
            .or(self.legacy_type.as_deref())
            .unwrap_or("default");
        match kind {
            "default" => Ok(None),
            "llama3" => {
                let field = |v: Option<f64>, name: &str| {
                    v.with_context(|| format!("llama3 rope_scaling lacks {name}"))
                };
                Ok(Some(RopeScaling::Llama3 {
                    factor: field(self.factor, "factor")?,
                    low_freq_factor: field(self.low_freq_factor, "low_freq_factor")?,
                    high_freq_factor: field(self.high_freq_factor, "high_freq_factor")?,
                    original_max_position_embeddings: self
                        .original_max_position_embeddings
                        .context("llama3 rope_scaling lacks original_max_position_embeddings")?,
                }))
            }
            other => bail!("rope_scaling type {other:?} is not supported"),
        }
    }
}

struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
    /// Index into the forward pass's attention inputs (one per distinct window).
    window_index: usize,
}

pub struct Llama {
    embed_tokens: VocabParallelEmbedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: VocabParallelLmHead,
    device: Device,
    rotary: RotaryEmbedding,
    /// The distinct sliding windows of the layers.
    windows: Vec<Option<usize>>,
    spec: ModelSpec,
}

impl Llama {
    /// From an HF-layout checkpoint.
    /// From an HF-layout checkpoint; this rank's share of it under `comm`.
    pub fn from_hf(config: LlamaConfig, weights: &Weights, comm: &Comm) -> anyhow::Result<Self> {
        let scaling = config
            .rope_scaling
            .as_ref()
            .map(RopeScalingConfig::to_scaling)
            .transpose()?
            .flatten();
        Self::load(
            config.architecture(RotaryLayout::HalfSplit, scaling)?,
            weights,
            comm,
        )
    }

    /// From a GGUF checkpoint of architecture `arch`.
    pub fn from_gguf(arch: &str, weights: &Weights, comm: &Comm) -> anyhow::Result<Self> {
        let content = weights.gguf_content().context("not a GGUF checkpoint")?;
        let config = LlamaConfig::from_gguf(content, arch)?;
        // llama.cpp permutes Llama's Q/K rows for its adjacent-pair rotation; Qwen
        // files keep the half-split layout.
        let layout = if arch == "llama" {
            RotaryLayout::Interleaved
        } else {
            RotaryLayout::HalfSplit
        };
        // Llama 3.1+ GGUFs carry their rope scaling as precomputed frequency divisors.
        let scaling = weights
            .gguf_only_tensor("rope_freqs.weight")?
            .map(|factors| factors.to_dtype(DType::F32)?.to_vec1::<f32>())
            .transpose()?
            .map(RopeScaling::FrequencyFactors);
        Self::load(config.architecture(layout, scaling)?, weights, comm)
    }

    fn load(arch: Architecture, weights: &Weights, comm: &Comm) -> anyhow::Result<Self> {
        let cfg = &arch.config;
        let (hidden, head_dim, kv_heads) = (cfg.hidden_size, cfg.head_dim(), cfg.num_kv_heads());
        let dtype = weights.dtype();
        let device = weights.device().clone();
        let mut windows: Vec<Option<usize>> = arch.sliding_windows.clone();
        windows.sort();
        windows.dedup();
        let model = weights.pp("model");
        let embed_tokens = VocabParallelEmbedding::load(
            &model,
            "embed_tokens.weight",
            cfg.vocab_size,
            hidden,
            comm,
        )?;
        let attention_config = AttentionConfig {
            hidden_size: hidden,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: kv_heads,
            head_dim,
            qkv_bias: cfg.attention_bias.unwrap_or(cfg.model_type == "qwen2"),
            qk_norm_eps: arch.qk_norm.then_some(cfg.rms_norm_eps),
            sliding_window: None,
        };
        // The KV heads this rank computes and caches.
        let rank_kv_heads = attention_config.head_shares(&**comm)?.kv_heads.len();
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let w = model.pp("layers").pp(i);
                let attention = AttentionConfig {
                    sliding_window: arch.sliding_windows[i],
                    ..attention_config.clone()
                };
                Ok(DecoderLayer {
                    input_layernorm: RmsNorm::load(
                        &w.pp("input_layernorm"),
                        hidden,
                        cfg.rms_norm_eps,
                    )?,
                    self_attn: Attention::load(&w.pp("self_attn"), &attention, comm)?,
                    post_attention_layernorm: RmsNorm::load(
                        &w.pp("post_attention_layernorm"),
                        hidden,
                        cfg.rms_norm_eps,
                    )?,
                    mlp: Mlp::load(&w.pp("mlp"), hidden, cfg.intermediate_size, comm)?,
                    window_index: windows
                        .iter()
                        .position(|w| *w == attention.sliding_window)
                        .unwrap_or(0),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(&model.pp("norm"), hidden, cfg.rms_norm_eps)?;
        let tied = cfg.tie_word_embeddings || !weights.contains("lm_head.weight");
        let lm_head = if tied && !weights.is_gguf() {
            VocabParallelLmHead::tied(&embed_tokens)?
        } else {
            // GGUF: the (quantized) embedding matrix itself serves as the tied lm_head.
            let name = if tied {
                "model.embed_tokens.weight"
            } else {
                "lm_head.weight"
            };
            VocabParallelLmHead::load(weights, name, cfg.vocab_size, hidden, comm)?
        };
        let rotary = RotaryEmbedding::new(
            head_dim,
            cfg.max_position_embeddings,
            cfg.rope_theta,
            arch.rope_scaling.as_ref(),
            arch.rotary_layout,
            dtype,
            &device,
        )?;
        let spec = ModelSpec {
            model_type: cfg.model_type.clone(),
            num_layers: cfg.num_hidden_layers,
            num_kv_heads: rank_kv_heads,
            head_dim,
            vocab_size: cfg.vocab_size,
            max_position_embeddings: cfg.max_position_embeddings,
            // Only a window every layer uses lets the runner forget old blocks.
            sliding_window: if windows.len() == 1 { windows[0] } else { None },
            dtype,
            quantization: match weights.gguf_dtype("model.layers.0.self_attn.q_proj.weight") {
                Some(q) => format!("gguf:{q}"),
                None => weights
                    .quantization()
                    .map_or_else(|| "none".to_string(), ToString::to_string),
            },
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            device,
            rotary,
            windows,
            spec,
        })
    }

    fn check_batch(&self, batch: &ForwardBatch, cache: &KvCache) -> Result<()> {
        if cache.num_layers() != self.layers.len() {
            candle_core::bail!(
                "KV cache has {} layers, the model {}",
                cache.num_layers(),
                self.layers.len()
            )
        }
        check_cache_layer(
            cache.layer(0),
            self.spec.num_kv_heads,
            self.spec.head_dim,
            self.spec.dtype,
            &self.device,
        )?;
        if batch.max_context_len > self.rotary.max_positions() {
            candle_core::bail!(
                "context of {} tokens exceeds the model's {} positions",
                batch.max_context_len,
                self.rotary.max_positions()
            )
        }
        let vocab = self.spec.vocab_size as u32;
        if batch.max_input_id >= vocab {
            candle_core::bail!(
                "token id {} outside the vocabulary of {vocab}",
                batch.max_input_id
            )
        }
        Ok(())
    }
}

impl Model for Llama {
    fn forward(&self, batch: &ForwardBatch, cache: &mut KvCache) -> Result<Tensor> {
        let num_logits = batch.logits_indices.dim(0)?;
        let no_logits = || Tensor::zeros((num_logits, self.spec.vocab_size), DType::F32, &self.device);
        if batch.seqs.is_empty() {
            return no_logits();
        }
        self.check_batch(batch, cache)?;
        let inputs = self
            .windows
            .iter()
            .map(|&window| {
                PagedAttentionInput::new(
                    batch,
                    cache.block_size(),
                    cache.num_blocks(),
                    window,
                    self.spec.dtype,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let rotary = self.rotary.at(&batch.positions)?;
        let mut x = self.embed_tokens.forward(&batch.input_ids)?;
        // A sub-block's output is added to the residual stream `x` by the norm that
        // follows it (one fused kernel on CUDA): `delta` is the output not yet added.
        let mut delta: Option<Tensor> = None;
        let add_and_norm = |norm: &RmsNorm, x: &Tensor, delta: Option<Tensor>| match delta {
            Some(delta) => norm.forward_add(x, &delta),
            None => Ok((x.clone(), norm.forward(x)?)),
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let input = &inputs[layer.window_index];
            let (residual, h) = add_and_norm(&layer.input_layernorm, &x, delta.take())?;
            let h = layer
                .self_attn
                .forward(&h, &rotary, cache.layer(i), input)?;
            let (residual, h) = layer.post_attention_layernorm.forward_add(&residual, &h)?;
            delta = Some(layer.mlp.forward(&h)?);
            x = residual;
        }
        if num_logits == 0 {
            // Chunks of prompts still to be continued: only their keys/values count.
            return no_logits();
        }
        let (_, normed) = add_and_norm(&self.norm, &x, delta)?;
        // lm_head only for the rows whose logits are wanted.
        self.lm_head
            .forward(&normed.index_select(&batch.logits_indices, 0)?)?
            .to_dtype(DType::F32)
    }

    fn spec(&self) -> &ModelSpec {
        &self.spec
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(extra: serde_json::Value) -> LlamaConfig {
        let mut base = json!({
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
            "num_attention_heads": 4, "vocab_size": 10
        });
        base.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        LlamaConfig::from_json(&base).unwrap()
    }

    #[test]
    fn qwen2_window_only_when_switched_on_and_from_max_window_layers() {
        let off = config(json!({"model_type": "qwen2", "sliding_window": 8}));
        assert_eq!(
            off.architecture(RotaryLayout::HalfSplit, None)
                .unwrap()
                .sliding_windows,
            vec![None; 4]
        );
        let on = config(
            json!({"model_type": "qwen2", "sliding_window": 8, "use_sliding_window": true, "max_window_layers": 2}),
        );
        let windows = on
            .architecture(RotaryLayout::HalfSplit, None)
            .unwrap()
            .sliding_windows;
        assert_eq!(windows, vec![None, None, Some(8), Some(8)]);
        let mistral = config(json!({"model_type": "mistral", "sliding_window": 8}));
        assert_eq!(
            mistral
                .architecture(RotaryLayout::HalfSplit, None)
                .unwrap()
                .sliding_windows,
            vec![Some(8); 4]
        );
    }

    #[test]
    fn defaults_and_head_dim() {
        let c = config(json!({"num_key_value_heads": 2}));
        assert_eq!(
            (c.head_dim(), c.num_kv_heads(), c.rope_theta),
            (16, 2, 10000.0)
        );
        assert_eq!(config(json!({"head_dim": 32})).head_dim(), 32);
    }

    #[test]
    fn rejects_what_the_family_does_not_cover() {
        let err = |c: LlamaConfig| {
            c.architecture(RotaryLayout::HalfSplit, None)
                .err()
                .unwrap()
                .to_string()
        };
        assert!(err(config(json!({"hidden_act": "gelu"}))).contains("gelu"));
        assert!(err(config(json!({"num_key_value_heads": 3}))).contains("KV heads"));
        let yarn = config(json!({"rope_scaling": {"type": "yarn", "factor": 4.0}}));
        let e = yarn
            .rope_scaling
            .unwrap()
            .to_scaling()
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("yarn"), "{e}");
        let llama3 = config(json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}));
        assert!(llama3.rope_scaling.unwrap().to_scaling().is_err());
        assert!(LlamaConfig::from_json(&json!({"model_type": "llama"})).is_err());
    }
}
