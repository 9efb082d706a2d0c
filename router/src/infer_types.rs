//! The contract between the HTTP layer (validation, routes) and inference
//! (queue, batching, shards): what a validated request is, and what comes back.

use std::sync::Arc;
use std::time::Instant;

/// Sampling parameters after validation (defaults applied, ranges checked).
#[derive(Debug, Clone, PartialEq)]
pub struct ValidParameters {
    /// 1.0 when unset.
    pub temperature: f32,
    /// 0 = disabled.
    pub top_k: u32,
    /// 1.0 = disabled.
    pub top_p: f32,
    /// 1.0 = disabled.
    pub typical_p: f32,
    /// 0.0 = disabled.
    pub min_p: f32,
    pub do_sample: bool,
    pub seed: u64,
    /// 1.0 = disabled.
    pub repetition_penalty: f32,
    /// 0.0 = disabled.
    pub frequency_penalty: f32,
    /// 0.0 = disabled.
    pub presence_penalty: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ValidStoppingParameters {
    pub max_new_tokens: u32,
    pub stop_sequences: Vec<String>,
    pub ignore_eos_token: bool,
}

/// A request ready for the queue: tokenized, truncated, within every limit.
#[derive(Debug, Clone)]
pub struct ValidGenerateRequest {
    /// The prompt text (for logs and `return_full_text`).
    pub inputs: String,
    pub input_ids: Arc<Vec<u32>>,
    pub parameters: ValidParameters,
    pub stopping_parameters: ValidStoppingParameters,
    /// Return the prompt tokens with their log-probabilities.
    pub decoder_input_details: bool,
    pub top_n_tokens: u32,
    /// The grammar the output must follow (checked to compile).
    pub grammar: Option<grammar::GrammarSpec>,
}

impl ValidGenerateRequest {
    pub fn input_length(&self) -> u32 {
        self.input_ids.len() as u32
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    pub id: u32,
    pub text: String,
    pub logprob: f32,
    pub special: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Length,
    EosToken,
    StopSequence,
}

impl FinishReason {
    /// TGI's spelling.
    pub fn as_tgi(&self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::EosToken => "eos_token",
            FinishReason::StopSequence => "stop_sequence",
        }
    }

    /// OpenAI's spelling.
    pub fn as_openai(&self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::EosToken | FinishReason::StopSequence => "stop",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedText {
    pub text: String,
    pub generated_tokens: u32,
    pub finish_reason: FinishReason,
    pub seed: Option<u64>,
}

/// One message on a request's response stream.
#[derive(Debug, Clone)]
pub enum InferStreamResponse {
    /// The prompt tokens with log-probabilities (only when `decoder_input_details`), sent first.
    Prefill(Vec<Token>),
    /// A generated token that did not finish the request.
    Intermediate { token: Token, top_tokens: Vec<Token> },
    /// The last generated token.
    End {
        token: Token,
        top_tokens: Vec<Token>,
        generated_text: GeneratedText,
        /// When the request entered the queue.
        queued: Instant,
        /// When its first prefill started.
        start: Instant,
    },
}

/// A whole non-streamed generation.
#[derive(Debug, Clone)]
pub struct InferResponse {
    pub prefill: Vec<Token>,
    pub input_length: u32,
    pub tokens: Vec<Token>,
    pub top_tokens: Vec<Vec<Token>>,
    pub generated_text: GeneratedText,
    pub queued: Instant,
    pub start: Instant,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum InferError {
    /// A shard failed during the step (maps to HTTP 424).
    #[error("Request failed during generation: {0}")]
    GenerationError(String),
    /// More than --max-concurrent-requests in flight (HTTP 429).
    #[error("Model is overloaded")]
    Overloaded,
    /// The request can never fit (HTTP 422).
    #[error("Input validation error: {0}")]
    ValidationError(String),
    /// The stream ended without an End message (HTTP 500).
    #[error("Incomplete generation")]
    IncompleteGeneration,
    /// A shard missed a call's deadline: nothing is served until the group restarts
    /// (HTTP 503).
    #[error("Model is unavailable: {0}")]
    ShardStuck(String),
}

impl From<crate::client::ClientError> for InferError {
    fn from(error: crate::client::ClientError) -> Self {
        match error {
            crate::client::ClientError::Stuck(stuck) => InferError::ShardStuck(stuck.to_string()),
            other => InferError::GenerationError(other.to_string()),
        }
    }
}

impl InferError {
    /// The `error_type` field of error bodies and the `err` label of tgi_request_failure.
    pub fn error_type(&self) -> &'static str {
        match self {
            InferError::GenerationError(_) => "generation",
            InferError::Overloaded => "overloaded",
            InferError::ValidationError(_) => "validation",
            InferError::IncompleteGeneration => "incomplete_generation",
            InferError::ShardStuck(_) => "shard_stuck",
        }
    }
}
