//! From chosen tokens to the Generations a step answers: each request's new token,
//! already appended, is detokenized incrementally and checked against its stop
//! conditions.

use super::batch::RequestState;
use super::sampler::Choice;
use super::stopping::{decode_generated, IncrementalDecoder};
use anyhow::{anyhow, Result};
use proto::v3::{FinishReason, GeneratedText, Generation, Tokens};
use rayon::prelude::*;
use std::collections::HashSet;
use tokenizers::Tokenizer;

/// Batches from this size on are delivered on several threads: detokenizing and
/// checking a request takes a few microseconds, which at 256 requests was over 1 ms of
/// every decode step.
const PARALLEL_FROM: usize = 16;

pub struct TokenOutput {
    pub tokenizer: Tokenizer,
    pub eos_token_ids: Vec<u32>,
    pub special_token_ids: HashSet<u32>,
}

impl TokenOutput {
    /// Describes every request's choice, which it has accepted (and gives the prompt's
    /// tokens to those with prompt logprobs); returns the Generations, in request order,
    /// and the ids of the requests that finished.
    pub fn deliver(
        &self,
        requests: &mut [RequestState],
        choices: Vec<Choice>,
        prompt_logprobs: Vec<Option<Vec<f32>>>,
    ) -> Result<(Vec<Generation>, Vec<u64>)> {
        let one = |(request, (choice, prompt_logprobs)): (
            &mut RequestState,
            (Choice, Option<Vec<f32>>),
        )| {
            let prefill_tokens = prompt_logprobs
                .map(|lp| self.prompt_tokens(request, lp))
                .transpose()?;
            let (generation, done) = self.describe(request, choice)?;
            Ok((
                Generation {
                    prefill_tokens,
                    ..generation
                },
                done.then_some(request.id),
            ))
        };
        let delivered: Result<Vec<(Generation, Option<u64>)>> = if requests.len() >= PARALLEL_FROM {
            requests
                .par_iter_mut()
                .zip(choices.into_par_iter().zip(prompt_logprobs))
                .map(one)
                .collect()
        } else {
            requests
                .iter_mut()
                .zip(choices.into_iter().zip(prompt_logprobs))
                .map(one)
                .collect()
        };
        let (generations, finished): (Vec<_>, Vec<_>) = delivered?.into_iter().unzip();
        Ok((generations, finished.into_iter().flatten().collect()))
    }

    fn prompt_tokens(&self, request: &RequestState, logprobs: Vec<f32>) -> Result<Tokens> {
        let prompt = &request.tokens[..request.prompt_len];
        let mut decoder = IncrementalDecoder::new(0);
        let texts = (1..=prompt.len())
            .map(|n| decoder.next(&self.tokenizer, &prompt[..n]))
            .collect::<Result<_>>()?;
        Ok(Tokens {
            ids: prompt.to_vec(),
            logprobs,
            texts,
            is_special: prompt
                .iter()
                .map(|id| self.special_token_ids.contains(id))
                .collect(),
        })
    }

    /// The Generation of the token the request just accepted, and whether it finished.
    fn describe(&self, request: &mut RequestState, choice: Choice) -> Result<(Generation, bool)> {
        let text = request.decoder.next(&self.tokenizer, &request.tokens)?;
        let finish_reason = request
            .stopping
            .check(choice.id, &text, &self.eos_token_ids)
            // A complete grammar ends generation as an end-of-sequence token would.
            .or(request.chooser.grammar_finished().then_some(FinishReason::EosToken));
        let generated_text = finish_reason
            .map(|reason| -> Result<GeneratedText> {
                let params = request.chooser.params();
                Ok(GeneratedText {
                    text: decode_generated(&self.tokenizer, &request.tokens, request.prompt_len)?,
                    generated_tokens: request.stopping.generated_tokens(),
                    finish_reason: reason as i32,
                    seed: params.do_sample.then_some(params.seed),
                })
            })
            .transpose()?;
        let top_tokens = if choice.top.is_empty() {
            vec![]
        } else {
            let (ids, logprobs): (Vec<u32>, Vec<f32>) = choice.top.into_iter().unzip();
            let texts = ids
                .iter()
                .map(|&id| {
                    self.tokenizer
                        .decode(&[id], false)
                        .map_err(|e| anyhow!("detokenizing: {e}"))
                })
                .collect::<Result<_>>()?;
            vec![self.tokens(ids, logprobs, texts)]
        };
        let generation = Generation {
            request_id: request.id,
            prefill_tokens: None,
            tokens: Some(self.tokens(vec![choice.id], vec![choice.logprob], vec![text])),
            top_tokens,
            generated_text,
        };
        Ok((generation, finish_reason.is_some()))
    }

    fn tokens(&self, ids: Vec<u32>, logprobs: Vec<f32>, texts: Vec<String>) -> Tokens {
        let is_special = ids
            .iter()
            .map(|id| self.special_token_ids.contains(id))
            .collect();
        Tokens {
            ids,
            logprobs,
            texts,
            is_special,
        }
    }
}
