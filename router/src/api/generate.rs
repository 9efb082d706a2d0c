//! TGI's native API: `/generate`, `/generate_stream`, `/`, `/tokenize`, `/info`.

use super::neutral_only::NeutralOnly;
use crate::infer_types;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// TGI 1.x's default, kept for the native routes so that a bare request stays short.
/// (OpenAI routes leave it unset: the rest of the context.)
pub const DEFAULT_MAX_NEW_TOKENS: u32 = 100;

fn default_max_new_tokens() -> Option<u32> {
    Some(DEFAULT_MAX_NEW_TOKENS)
}

/// Sampling and stopping parameters; also what the OpenAI routes are translated into.
/// Unknown fields are refused (a 422 naming them), never ignored.
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateParameters {
    /// Only 1 is supported.
    #[serde(default)]
    #[schema(nullable, minimum = 1, maximum = 1)]
    pub best_of: Option<u32>,
    /// Must be > 0. Enables sampling when not 1.
    #[serde(default)]
    #[schema(nullable, exclusive_minimum = 0.0, example = 0.5)]
    pub temperature: Option<f32>,
    /// Multiplicative penalty of already seen tokens; must be > 0, 1.0 disables it.
    #[serde(default)]
    #[schema(nullable, exclusive_minimum = 0.0, example = 1.03)]
    pub repetition_penalty: Option<f32>,
    /// Subtracted once per occurrence of a token so far; in [-2, 2].
    #[serde(default)]
    #[schema(nullable, minimum = -2.0, maximum = 2.0, example = 0.1)]
    pub frequency_penalty: Option<f32>,
    /// Subtracted once for any token seen so far; in [-2, 2] (an extension of TGI's parameters).
    #[serde(default)]
    #[schema(nullable, minimum = -2.0, maximum = 2.0, example = 0.1)]
    pub presence_penalty: Option<f32>,
    /// Must be > 0.
    #[serde(default)]
    #[schema(nullable, exclusive_minimum = 0, example = 10)]
    pub top_k: Option<i32>,
    /// In (0, 1].
    #[serde(default)]
    #[schema(nullable, exclusive_minimum = 0.0, maximum = 1.0, example = 0.95)]
    pub top_p: Option<f32>,
    /// In (0, 1).
    #[serde(default)]
    #[schema(nullable, exclusive_minimum = 0.0, exclusive_maximum = 1.0, example = 0.95)]
    pub typical_p: Option<f32>,
    /// In [0, 1]: drops the tokens less likely than `min_p` times the most likely one
    /// (vLLM's and llama.cpp's extension); 0 disables it.
    #[serde(default)]
    #[schema(nullable, minimum = 0.0, maximum = 1.0, example = 0.05)]
    pub min_p: Option<f32>,
    /// Sample instead of taking the most likely token (also implied by any sampling parameter).
    #[serde(default)]
    pub do_sample: bool,
    /// Must be > 0. Defaults to 100; `null` means "up to --max-total-tokens".
    #[serde(default = "default_max_new_tokens")]
    #[schema(nullable, minimum = 1, example = 20, default = 100)]
    pub max_new_tokens: Option<u32>,
    /// Prepend the prompt to `generated_text`.
    #[serde(default)]
    #[schema(nullable)]
    pub return_full_text: Option<bool>,
    /// Stop generating when one of these appears (at most --max-stop-sequences; empty ones are ignored).
    #[serde(default)]
    #[schema(example = json!(["photographer"]))]
    pub stop: Vec<String>,
    /// Keep only the last `truncate` prompt tokens (at most --max-input-tokens).
    #[serde(default)]
    #[schema(nullable, minimum = 1)]
    pub truncate: Option<u32>,
    /// Only `false` is supported.
    #[serde(default)]
    pub watermark: bool,
    /// Return `details` with the response.
    #[serde(default)]
    pub details: bool,
    /// Return the prompt tokens with their log-probabilities (not with streaming).
    #[serde(default)]
    pub decoder_input_details: bool,
    #[serde(default)]
    #[schema(nullable, minimum = 0)]
    pub seed: Option<u64>,
    /// Most likely alternatives returned with each token (at most --max-top-n-tokens).
    #[serde(default)]
    #[schema(nullable, minimum = 0, example = 5)]
    pub top_n_tokens: Option<u32>,
    /// Keep generating past the end-of-sequence token (vLLM's extension; benchmarks use it).
    #[serde(default)]
    pub ignore_eos: bool,
    /// Constrain the output to a JSON schema or a regular expression (or, as an
    /// extension, a Lark grammar); generation ends when it is complete.
    #[serde(default, deserialize_with = "super::optional_object")]
    #[schema(nullable)]
    pub grammar: Option<GrammarParameter>,
    /// Not supported (no LoRA adapters): only `null` or `""`.
    #[serde(default)]
    #[schema(value_type = Option<String>, nullable)]
    pub adapter_id: Option<serde_json::Value>,
}

impl GenerateParameters {
    /// The TGI fields that clients send but we do not implement.
    pub fn neutral_only(&self) -> [NeutralOnly<'_>; 1] {
        [NeutralOnly::empty("adapter_id", &self.adapter_id)]
    }
}

/// TGI's `grammar` parameter: `{"type": "json", "value": <JSON schema>}` (the schema as
/// an object, or as a string holding one), `{"type": "regex", "value": "<regex>"}`, or
/// `{"type": "lark", "value": "<grammar>"}` (llguidance's Lark dialect).
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(tag = "type", content = "value", deny_unknown_fields)]
pub enum GrammarParameter {
    /// TGI also takes `json_object` for `json`.
    #[serde(rename = "json", alias = "json_object")]
    #[schema(value_type = Object)]
    Json(serde_json::Value),
    #[serde(rename = "regex")]
    Regex(String),
    #[serde(rename = "lark")]
    Lark(String),
}

impl Default for GenerateParameters {
    fn default() -> Self {
        Self {
            best_of: None,
            temperature: None,
            repetition_penalty: None,
            frequency_penalty: None,
            presence_penalty: None,
            top_k: None,
            top_p: None,
            typical_p: None,
            min_p: None,
            do_sample: false,
            max_new_tokens: default_max_new_tokens(),
            return_full_text: None,
            stop: Vec::new(),
            truncate: None,
            watermark: false,
            details: false,
            decoder_input_details: false,
            seed: None,
            top_n_tokens: None,
            ignore_eos: false,
            grammar: None,
            adapter_id: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    #[schema(example = "My name is Olivier and I", min_length = 1)]
    pub inputs: String,
    #[serde(default, deserialize_with = "super::object")]
    pub parameters: GenerateParameters,
}

/// The body of `POST /`: a generate request that says whether to stream.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompatGenerateRequest {
    #[schema(example = "My name is Olivier and I", min_length = 1)]
    pub inputs: String,
    #[serde(default, deserialize_with = "super::object")]
    pub parameters: GenerateParameters,
    #[serde(default)]
    pub stream: bool,
}

impl From<CompatGenerateRequest> for GenerateRequest {
    fn from(request: CompatGenerateRequest) -> Self {
        Self { inputs: request.inputs, parameters: request.parameters }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Token {
    pub id: u32,
    pub text: String,
    /// `null` where the log-probability is unknown (the first prompt token).
    #[schema(nullable)]
    pub logprob: Option<f32>,
    pub special: bool,
}

impl From<&infer_types::Token> for Token {
    fn from(token: &infer_types::Token) -> Self {
        Self {
            id: token.id,
            text: token.text.clone(),
            logprob: token.logprob.is_finite().then_some(token.logprob),
            special: token.special,
        }
    }
}

pub fn tokens(tokens: &[infer_types::Token]) -> Vec<Token> {
    tokens.iter().map(Token::from).collect()
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Details {
    /// `length`, `eos_token` or `stop_sequence`.
    #[schema(value_type = String, example = "length")]
    pub finish_reason: &'static str,
    pub generated_tokens: u32,
    #[schema(nullable)]
    pub seed: Option<u64>,
    /// Prompt tokens (only with `decoder_input_details`).
    pub prefill: Vec<Token>,
    pub tokens: Vec<Token>,
    /// Alternatives of each generated token (empty without `top_n_tokens`).
    pub top_tokens: Vec<Vec<Token>>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct GenerateResponse {
    pub generated_text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Details>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StreamDetails {
    /// `length`, `eos_token` or `stop_sequence`.
    #[schema(value_type = String, example = "length")]
    pub finish_reason: &'static str,
    pub generated_tokens: u32,
    #[schema(nullable)]
    pub seed: Option<u64>,
    pub input_length: u32,
}

/// One server-sent event of `/generate_stream`: a token, and on the last one the whole text.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StreamResponse {
    /// 1 for the first generated token.
    pub index: u32,
    pub token: Token,
    pub top_tokens: Vec<Token>,
    #[schema(nullable)]
    pub generated_text: Option<String>,
    #[schema(nullable)]
    pub details: Option<StreamDetails>,
}

/// A prompt token of `/tokenize`: `text` is `inputs[start..stop]` (byte offsets).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct SimpleToken {
    pub id: u32,
    pub text: String,
    pub start: usize,
    pub stop: usize,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Info {
    #[schema(example = "HuggingFaceTB/SmolLM2-135M-Instruct")]
    pub model_id: String,
    #[schema(nullable)]
    pub model_sha: Option<String>,
    #[schema(example = "bfloat16")]
    pub model_dtype: String,
    #[schema(example = "cuda")]
    pub model_device_type: String,
    #[schema(nullable, example = "text-generation")]
    pub model_pipeline_tag: Option<String>,
    pub max_concurrent_requests: usize,
    pub max_best_of: usize,
    pub max_stop_sequences: usize,
    pub max_top_n_tokens: u32,
    pub max_input_tokens: u32,
    pub max_total_tokens: u32,
    pub max_batch_prefill_tokens: u32,
    pub max_batch_total_tokens: u32,
    #[schema(nullable)]
    pub max_batch_size: Option<usize>,
    pub max_waiting_tokens: usize,
    pub waiting_served_ratio: f32,
    pub validation_workers: usize,
    /// Shards serving the model.
    pub world_size: u32,
    /// Tokens per KV cache block.
    pub block_size: u32,
    /// Prompts reuse the cached KV blocks of earlier prompts' common prefixes.
    pub prefix_caching: bool,
    #[schema(example = "gguf:Q4_1")]
    pub quantization: String,
    /// What the unset sampling fields of a request take (on the OpenAI routes, of every
    /// request; on the TGI routes, of those that sample): the model's generation_config.json
    /// values of `temperature`, `top_p`, `top_k`, `min_p` and `repetition_penalty` (empty
    /// when it has none, as for GGUF files).
    #[schema(value_type = Object, example = json!({"temperature": 0.6, "top_p": 0.9}))]
    pub generation_defaults: model_store::SamplingDefaults,
    #[schema(example = "text-generation-router")]
    pub router: &'static str,
    pub version: &'static str,
    #[schema(nullable)]
    pub sha: Option<&'static str>,
    #[schema(nullable)]
    pub docker_label: Option<&'static str>,
}

/// The error body of the native routes (and of failures in the middle of any stream).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorResponse {
    pub error: String,
    pub error_type: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parameters_default_like_tgi() {
        let request: GenerateRequest = serde_json::from_value(json!({"inputs": "hi"})).unwrap();
        assert_eq!(request.parameters, GenerateParameters::default());
        assert_eq!(request.parameters.max_new_tokens, Some(DEFAULT_MAX_NEW_TOKENS));
        let request: GenerateRequest =
            serde_json::from_value(json!({"inputs": "hi", "parameters": {"max_new_tokens": null, "stop": ["a"]}}))
                .unwrap();
        assert_eq!(request.parameters.max_new_tokens, None);
        assert_eq!(request.parameters.stop, vec!["a".to_string()]);
    }

    #[test]
    fn stream_event_shape() {
        let event = StreamResponse {
            index: 1,
            token: Token { id: 3, text: " Paris".into(), logprob: Some(-0.5), special: false },
            top_tokens: vec![],
            generated_text: None,
            details: None,
        };
        assert_eq!(
            serde_json::to_value(event).unwrap(),
            json!({"index": 1, "token": {"id": 3, "text": " Paris", "logprob": -0.5, "special": false},
                   "top_tokens": [], "generated_text": null, "details": null})
        );
    }

    #[test]
    fn non_finite_logprob_serializes_as_null() {
        let token = Token::from(&infer_types::Token { id: 1, text: "<s>".into(), logprob: f32::NAN, special: true });
        assert_eq!(serde_json::to_value(token).unwrap()["logprob"], serde_json::Value::Null);
    }
}
