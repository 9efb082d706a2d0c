//! Everything a request must pass before it is queued: parameter ranges,
//! tokenization (off the async threads), truncation and the length limits.

pub mod chat_template;
pub mod grammar;
mod params;
#[cfg(test)]
mod proptests;

pub use params::{check_defaults, check_warpers, with_model_defaults};
mod tokenizer;

use crate::api::generate::GenerateParameters;
use crate::infer_types::{ValidGenerateRequest, ValidStoppingParameters};
use grammar::GrammarSupport;
use std::sync::Arc;
use tokenizer::TokenizerPool;
use tokenizers::{Encoding, Tokenizer};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidationLimits {
    pub max_input_tokens: u32,
    pub max_total_tokens: u32,
    pub max_stop_sequences: usize,
    pub max_top_n_tokens: u32,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    #[error("`{name}` must be {expected}")]
    OutOfRange { name: &'static str, expected: &'static str },
    #[error("`stop` supports up to {max} stop sequences. Given: {count}")]
    StopSequences { count: usize, max: usize },
    #[error("`top_n_tokens` must be <= {max}. Given: {value}")]
    TopNTokens { value: u32, max: u32 },
    #[error("`truncate` must be <= {max_input_tokens}. Given: {truncate}")]
    Truncate { truncate: u32, max_input_tokens: u32 },
    #[error("`inputs` cannot be empty")]
    EmptyInput,
    #[error("`inputs` must have less than {max_input_tokens} tokens. Given: {input_length}")]
    InputLength { input_length: u32, max_input_tokens: u32 },
    #[error("`inputs` tokens + `max_new_tokens` must be <= {max_total_tokens}. Given: {input_length} `inputs` tokens and {max_new_tokens} `max_new_tokens`")]
    TotalLength { input_length: u32, max_new_tokens: u32, max_total_tokens: u32 },
    #[error("`decoder_input_details` == true is not supported when streaming tokens")]
    PrefillDetailsStream,
    /// A field we do not implement, sent with a value that asks for something.
    #[error("`{0}` is not supported")]
    Unsupported(&'static str),
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    #[error("template error: {0}")]
    ChatTemplate(String),
    #[error("grammar support is disabled (--disable-grammar-support): `grammar`, `response_format` and `tools` are refused")]
    GrammarDisabled,
    #[error("grammars are not supported with this model's tokenizer: {0}")]
    GrammarUnavailable(String),
    #[error("invalid grammar: {0}")]
    Grammar(String),
    #[error("{0}")]
    Tools(String),
}

pub struct Validation {
    tokenizer: TokenizerPool,
    limits: ValidationLimits,
    grammar: GrammarSupport,
}

impl Validation {
    pub fn new(
        tokenizer: Tokenizer,
        workers: usize,
        limits: ValidationLimits,
        grammar: GrammarSupport,
    ) -> std::io::Result<Self> {
        Ok(Self { tokenizer: TokenizerPool::new(tokenizer, workers)?, limits, grammar })
    }

    pub fn workers(&self) -> usize {
        self.tokenizer.workers()
    }

    /// The parameter checks alone (for routes that take a generate request without generating).
    pub fn check_parameters(&self, parameters: &GenerateParameters) -> Result<(), ValidationError> {
        params::check_parameters(parameters, &self.limits).map(|_| ())
    }

    pub async fn tokenize(&self, inputs: String, add_special_tokens: bool) -> Result<Encoding, ValidationError> {
        if inputs.is_empty() {
            return Err(ValidationError::EmptyInput);
        }
        self.tokenizer.encode(inputs, add_special_tokens).await.map_err(ValidationError::Tokenizer)
    }

    /// `add_special_tokens`: false for prompts a chat template already framed.
    pub async fn validate(
        &self,
        inputs: String,
        parameters: &GenerateParameters,
        add_special_tokens: bool,
    ) -> Result<ValidGenerateRequest, ValidationError> {
        let checked = params::check_parameters(parameters, &self.limits)?;
        let grammar = match &parameters.grammar {
            Some(grammar) => Some(self.grammar.check(grammar).await?),
            None => None,
        };
        let encoding = self.tokenize(inputs.clone(), add_special_tokens).await?;
        let mut input_ids = encoding.get_ids();
        if let Some(truncate) = checked.truncate {
            input_ids = &input_ids[input_ids.len().saturating_sub(truncate as usize)..];
        }
        let input_length = input_ids.len() as u32;
        if input_length == 0 {
            return Err(ValidationError::EmptyInput);
        }
        let ValidationLimits { max_input_tokens, max_total_tokens, .. } = self.limits;
        if input_length > max_input_tokens {
            return Err(ValidationError::InputLength { input_length, max_input_tokens });
        }
        let max_new_tokens = checked.max_new_tokens.unwrap_or(max_total_tokens.saturating_sub(input_length));
        // Saturating: a max_new_tokens near u32::MAX must not wrap around to a small total.
        if max_new_tokens == 0 || input_length.saturating_add(max_new_tokens) > max_total_tokens {
            return Err(ValidationError::TotalLength { input_length, max_new_tokens, max_total_tokens });
        }
        Ok(ValidGenerateRequest {
            inputs,
            input_ids: Arc::new(input_ids.to_vec()),
            parameters: checked.sampling,
            stopping_parameters: ValidStoppingParameters {
                max_new_tokens,
                stop_sequences: checked.stop_sequences,
                ignore_eos_token: parameters.ignore_eos,
            },
            decoder_input_details: parameters.decoder_input_details,
            top_n_tokens: checked.top_n_tokens,
            grammar,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn validation(max_input_tokens: u32, max_total_tokens: u32) -> Validation {
        validation_with_grammar(max_input_tokens, max_total_tokens, GrammarSupport::Disabled)
    }

    /// Prompts tokenized by the word-level test tokenizer, grammars checked by `grammar`.
    pub(crate) fn validation_with_grammar(
        max_input_tokens: u32,
        max_total_tokens: u32,
        grammar: GrammarSupport,
    ) -> Validation {
        let limits =
            ValidationLimits { max_input_tokens, max_total_tokens, max_stop_sequences: 4, max_top_n_tokens: 5 };
        Validation::new(tokenizer::tests::word_tokenizer(), 1, limits, grammar).unwrap()
    }

    fn parameters(max_new_tokens: Option<u32>, truncate: Option<u32>) -> GenerateParameters {
        GenerateParameters { max_new_tokens, truncate, ..Default::default() }
    }

    #[tokio::test]
    async fn tokenizes_and_fills_the_context_when_unbounded() {
        let v = validation(5, 8);
        let request = v.validate("the capital of france is".into(), &parameters(None, None), true).await.unwrap();
        assert_eq!(request.input_ids.as_slice(), &[3, 4, 5, 6, 7]);
        assert_eq!(request.stopping_parameters.max_new_tokens, 3);
        let request = v.validate("the capital".into(), &parameters(Some(2), None), true).await.unwrap();
        assert_eq!(request.stopping_parameters.max_new_tokens, 2);
    }

    #[tokio::test]
    async fn rejects_long_prompts_unless_truncated() {
        let v = validation(3, 8);
        let long = "the capital of france is";
        assert_eq!(
            v.validate(long.into(), &parameters(Some(1), None), true).await.unwrap_err(),
            ValidationError::InputLength { input_length: 5, max_input_tokens: 3 }
        );
        let request = v.validate(long.into(), &parameters(Some(1), Some(2)), true).await.unwrap();
        assert_eq!(request.input_ids.as_slice(), &[6, 7]);
    }

    #[tokio::test]
    async fn rejects_total_overflow_and_empty_prompts() {
        let v = validation(5, 6);
        assert_eq!(
            v.validate("the capital of".into(), &parameters(Some(4), None), true).await.unwrap_err(),
            ValidationError::TotalLength { input_length: 3, max_new_tokens: 4, max_total_tokens: 6 }
        );
        assert_eq!(
            v.validate(String::new(), &parameters(None, None), true).await.unwrap_err(),
            ValidationError::EmptyInput
        );
        // Whitespace tokenizes to nothing with this tokenizer.
        assert_eq!(
            v.validate("   ".into(), &parameters(None, None), true).await.unwrap_err(),
            ValidationError::EmptyInput
        );
    }
}
