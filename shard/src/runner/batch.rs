//! The shard-side state of cached batches. The KV cache is paged and the router owns
//! block allocation, so a batch is just a list of request states: concatenating and
//! filtering batches moves request states around and never touches the cache.

use super::sampler::{grammar, GrammarRow, NextTokenChooser, SamplingParams};
use super::stopping::{IncrementalDecoder, StoppingCriteria};
use ::grammar::GrammarCompiler;
use anyhow::{bail, ensure, Context, Result};
use proto::v3::{CachedBatch, Request};

pub struct RequestState {
    pub id: u64,
    /// Prompt then generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Tokens whose keys/values are in the KV cache.
    pub cached_len: usize,
    /// The prompt's tokens up to here are in the cache after this prefill: the whole
    /// prompt, or less for a chunk of it (`Request.chunk_len`).
    prefill_end: usize,
    /// KV slot of every position (the router allocates input + max_new_tokens).
    pub slots: Vec<u32>,
    pub blocks: Vec<u32>,
    pub prefill_logprobs: bool,
    pub chooser: NextTokenChooser,
    pub stopping: StoppingCriteria,
    pub decoder: IncrementalDecoder,
}

impl RequestState {
    /// `grammars`: the compiler of the model's grammars, None when its tokenizer has none.
    pub fn from_proto(request: &Request, grammars: Option<&GrammarCompiler>) -> Result<Self> {
        let id = request.id;
        let prompt_len = request.input_ids.len();
        ensure!(prompt_len > 0, "request {id}: empty input_ids");
        // A fully cached prompt still feeds its last token: its logits pick the first token.
        let cached_len = (request.cache_len.unwrap_or(0) as usize).min(prompt_len - 1);
        let prefill_end = match request.chunk_len {
            Some(0) => bail!("request {id}: chunk_len 0 prefills nothing"),
            Some(chunk_len) => (cached_len + chunk_len as usize).min(prompt_len),
            None => prompt_len,
        };
        // Prompt logprobs are those of every prompt token, computed in one pass.
        ensure!(
            !request.prefill_logprobs || (cached_len == 0 && prefill_end == prompt_len),
            "request {id}: prompt logprobs need the whole prompt prefilled at once \
             (no cache_len, no chunk_len)"
        );
        ensure!(
            request.slots.len() >= prompt_len,
            "request {id}: {} slots for a {prompt_len}-token prompt",
            request.slots.len()
        );
        let params = SamplingParams::from_proto(request.parameters.as_ref())
            .with_context(|| format!("request {id}"))?;
        let grammar = match grammar::spec_from_proto(request.parameters.as_ref())
            .with_context(|| format!("request {id}"))?
        {
            None => None,
            Some(spec) => {
                let compiler = grammars
                    .with_context(|| format!("request {id}: a grammar, but this model's tokenizer cannot be constrained"))?;
                Some(GrammarRow::start(compiler, spec))
            }
        };
        Ok(Self {
            id,
            tokens: request.input_ids.clone(),
            prompt_len,
            cached_len,
            prefill_end,
            slots: request.slots.clone(),
            blocks: request.blocks.clone(),
            prefill_logprobs: request.prefill_logprobs,
            chooser: NextTokenChooser::constrained(
                params,
                request.top_n_tokens as usize,
                &request.input_ids,
                grammar,
            )?,
            stopping: StoppingCriteria::new(request.stopping_parameters.as_ref()),
            decoder: IncrementalDecoder::new(prompt_len),
        })
    }

    /// The tokens the next forward pass feeds: the uncached prompt (or its chunk) at
    /// prefill, the last token at decode.
    pub fn pending_tokens(&self) -> &[u32] {
        let end = if self.in_prefill() {
            self.prefill_end
        } else {
            self.tokens.len()
        };
        &self.tokens[self.cached_len..end]
    }

    /// This prefill computes a chunk of the prompt and not its end: no token is chosen,
    /// and the request leaves the batch after the pass (the router sends the rest later,
    /// as a cached prefix).
    pub fn is_partial_chunk(&self) -> bool {
        self.prefill_end < self.prompt_len
    }

    /// The prompt is not yet (wholly) in the KV cache: the next step prefills it.
    pub fn in_prefill(&self) -> bool {
        self.cached_len < self.prompt_len
    }

    /// Input plus the most tokens it may still generate.
    fn max_tokens(&self) -> u32 {
        self.prompt_len as u32 + self.stopping.max_new_tokens()
    }

    /// Appends the token chosen for the next position; its keys/values enter the cache
    /// with the next forward pass.
    pub fn accept(&mut self, token: u32) -> Result<()> {
        self.tokens.push(token);
        self.cached_len = self.tokens.len() - 1;
        self.chooser
            .record(token)
            .with_context(|| format!("request {}", self.id))
    }

    /// Checks that the slots cover the next forward pass, for a clear error instead of a kernel fault.
    pub fn check_slots(&self) -> Result<()> {
        if self.slots.len() < self.tokens.len() {
            bail!(
                "request {}: no KV slot for position {} ({} slots)",
                self.id,
                self.tokens.len() - 1,
                self.slots.len()
            );
        }
        Ok(())
    }
}

pub struct BatchState {
    pub id: u64,
    pub requests: Vec<RequestState>,
}

impl BatchState {
    pub fn to_cached(&self) -> CachedBatch {
        CachedBatch {
            id: self.id,
            request_ids: self.requests.iter().map(|r| r.id).collect(),
            size: self.requests.len() as u32,
            max_tokens: self.requests.iter().map(RequestState::max_tokens).sum(),
            current_tokens: self.requests.iter().map(|r| r.cached_len as u64).sum(),
        }
    }

    /// Keeps the named requests, in their current order.
    pub fn filter(&mut self, request_ids: &[u64]) -> Result<()> {
        for id in request_ids {
            ensure!(
                self.requests.iter().any(|r| r.id == *id),
                "request {id} is not in batch {}",
                self.id
            );
        }
        self.requests.retain(|r| request_ids.contains(&r.id));
        Ok(())
    }

    /// Appends the requests of `others` (the first batch's id is kept).
    pub fn concatenate(&mut self, others: Vec<BatchState>) {
        for other in others {
            self.requests.extend(other.requests);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::v3::StoppingCriteriaParameters;

    fn request(id: u64, prompt: &[u32]) -> Request {
        Request {
            id,
            input_ids: prompt.to_vec(),
            slots: (0..prompt.len() as u32 + 4).collect(),
            blocks: vec![0],
            stopping_parameters: Some(StoppingCriteriaParameters {
                max_new_tokens: 4,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn batch(id: u64, requests: &[Request]) -> BatchState {
        BatchState {
            id,
            requests: requests
                .iter()
                .map(|r| RequestState::from_proto(r, None).unwrap())
                .collect(),
        }
    }

    #[test]
    fn cached_batch_counts_tokens() {
        let b = batch(7, &[request(1, &[1, 2, 3]), request(2, &[4])]);
        let cached = b.to_cached();
        assert_eq!(cached.id, 7);
        assert_eq!(cached.request_ids, vec![1, 2]);
        assert_eq!(cached.max_tokens, 3 + 4 + 1 + 4);
        assert_eq!(cached.current_tokens, 0);
    }

    #[test]
    fn concatenate_then_filter() {
        let mut a = batch(1, &[request(1, &[1]), request(2, &[2])]);
        a.concatenate(vec![batch(2, &[request(3, &[3])])]);
        a.filter(&[3, 1]).unwrap();
        assert_eq!(a.to_cached().request_ids, vec![1, 3]);
        assert!(a.filter(&[2]).is_err());
    }

    #[test]
    fn rejects_empty_prompts_and_missing_slots_and_clamps_full_cache_hits() {
        assert!(RequestState::from_proto(&request(1, &[]), None).is_err());
        let no_slots = Request {
            slots: vec![0],
            ..request(1, &[1, 2])
        };
        assert!(RequestState::from_proto(&no_slots, None).is_err());
        let cached = Request {
            cache_len: Some(2),
            ..request(1, &[1, 2])
        };
        assert_eq!(
            RequestState::from_proto(&cached, None).unwrap().pending_tokens(),
            &[2]
        );
    }

    #[test]
    fn a_chunk_feeds_its_tokens_and_prompt_logprobs_refuse_chunks_and_cache() {
        let chunk = Request {
            cache_len: Some(1),
            chunk_len: Some(2),
            ..request(1, &[1, 2, 3, 4, 5])
        };
        let state = RequestState::from_proto(&chunk, None).unwrap();
        assert_eq!(state.pending_tokens(), &[2, 3]);
        assert!(state.is_partial_chunk());
        let last_chunk = Request {
            chunk_len: Some(9),
            ..chunk.clone()
        };
        let state = RequestState::from_proto(&last_chunk, None).unwrap();
        assert_eq!(state.pending_tokens(), &[2, 3, 4, 5]);
        assert!(!state.is_partial_chunk());
        let empty = Request {
            chunk_len: Some(0),
            ..chunk.clone()
        };
        assert!(RequestState::from_proto(&empty, None).is_err());
        for logprobs in [
            Request { prefill_logprobs: true, ..chunk.clone() },
            Request { prefill_logprobs: true, cache_len: Some(1), ..request(1, &[1, 2, 3]) },
        ] {
            let err = RequestState::from_proto(&logprobs, None).err().unwrap().to_string();
            assert!(err.contains("prompt logprobs"), "{err}");
        }
    }
}
