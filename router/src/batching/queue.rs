//! The waiting room (TGI's `Queue`): a task owning the requests not yet in a
//! batch. The batching loop asks it for the next batch within its budgets; the
//! queue takes entries in arrival order and reserves their KV blocks (a cached
//! prefix of the prompt costs no prefill). With chunking, a prompt larger than
//! what is left of the prefill budget is prefilled in part; the batching loop
//! then puts it back at the front of the queue, its blocks held, for the next chunk.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use grammar::GrammarSpec;
use proto::v3::{Batch, GrammarType, NextTokenChooserParameters, Request, StoppingCriteriaParameters};
use tokio::sync::{mpsc, oneshot};

use crate::infer_types::{InferError, InferStreamResponse, ValidGenerateRequest};
use crate::kv::{BlockAllocation, BlockAllocator};

pub type ResponseSender = mpsc::UnboundedSender<Result<InferStreamResponse, InferError>>;

/// One request on its way through queue and batches.
#[derive(Debug)]
pub struct Entry {
    pub request: ValidGenerateRequest,
    /// The client's stream; closed when the client went away.
    pub response_tx: ResponseSender,
    pub queue_time: Instant,
    /// When it was first prefilled.
    pub batch_time: Option<Instant>,
    /// Its KV blocks, freed when the entry is dropped.
    pub block_allocation: Option<BlockAllocation>,
}

impl Entry {
    pub fn new(request: ValidGenerateRequest, response_tx: ResponseSender) -> Self {
        Self {
            request,
            response_tx,
            queue_time: Instant::now(),
            batch_time: None,
            block_allocation: None,
        }
    }

    /// KV positions the request may fill: the prompt and every token it may generate.
    pub fn max_tokens(&self) -> u32 {
        self.request.input_length() + self.request.stopping_parameters.max_new_tokens
    }
}

/// What the next batch may contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Below this many requests, no batch is formed (the running batch keeps decoding).
    pub min_size: Option<usize>,
    pub max_size: Option<usize>,
    /// Prompt tokens the prefill may process.
    pub prefill_token_budget: u32,
    /// A prompt beyond the prefill budget may be prefilled in part (`chunk_len`).
    pub chunking: bool,
    /// Prompt plus new tokens the batch may come to hold.
    pub token_budget: u32,
}

/// A batch for the shards and the entries of its requests, by request id.
#[derive(Debug)]
pub struct NextBatch {
    pub entries: HashMap<u64, Entry>,
    pub batch: Batch,
}

enum QueueCommand {
    Append(Box<Entry>),
    /// Entries prefilled in part, back at the front (in this order) for their next chunk.
    Requeue(Vec<(u64, Entry)>),
    NextBatch {
        limits: BatchLimits,
        response: oneshot::Sender<Option<NextBatch>>,
    },
}

/// Handle to the queue task; cheap to clone.
#[derive(Debug, Clone)]
pub struct Queue {
    commands: mpsc::UnboundedSender<QueueCommand>,
}

impl Queue {
    /// Spawns the queue task; it ends when every handle is dropped.
    pub fn new(allocator: BlockAllocator) -> Self {
        let (commands, receiver) = mpsc::unbounded_channel();
        tokio::spawn(queue_task(State::new(allocator), receiver));
        Self { commands }
    }

    pub fn append(&self, entry: Entry) {
        // The task outlives every handle, so the send cannot fail while we hold one.
        let _ = self.commands.send(QueueCommand::Append(Box::new(entry)));
    }

    pub fn requeue(&self, entries: Vec<(u64, Entry)>) {
        let _ = self.commands.send(QueueCommand::Requeue(entries));
    }

    pub async fn next_batch(&self, limits: BatchLimits) -> Option<NextBatch> {
        let (response, receiver) = oneshot::channel();
        self.commands
            .send(QueueCommand::NextBatch { limits, response })
            .ok()?;
        receiver.await.ok().flatten()
    }
}

async fn queue_task(mut state: State, mut commands: mpsc::UnboundedReceiver<QueueCommand>) {
    while let Some(command) = commands.recv().await {
        match command {
            QueueCommand::Append(entry) => state.append(*entry),
            QueueCommand::Requeue(entries) => state.requeue(entries),
            QueueCommand::NextBatch { limits, response } => {
                let _ = response.send(state.next_batch(limits));
            }
        }
        metrics::gauge!("tgi_queue_size").set(state.entries.len() as f64);
    }
}

/// The queue's content, apart from the task so that it can be tested directly.
struct State {
    entries: VecDeque<(u64, Entry)>,
    next_request_id: u64,
    next_batch_id: u64,
    allocator: BlockAllocator,
}

impl State {
    fn new(allocator: BlockAllocator) -> Self {
        Self {
            entries: VecDeque::new(),
            next_request_id: 0,
            next_batch_id: 0,
            allocator,
        }
    }

    fn append(&mut self, entry: Entry) {
        self.entries.push_back((self.next_request_id, entry));
        self.next_request_id += 1;
    }

    fn requeue(&mut self, entries: Vec<(u64, Entry)>) {
        for entry in entries.into_iter().rev() {
            self.entries.push_front(entry);
        }
    }

    fn next_batch(&mut self, limits: BatchLimits) -> Option<NextBatch> {
        if self.entries.is_empty() || limits.max_size == Some(0) {
            return None;
        }
        // A prompt prefilled in part goes on whatever waits behind it.
        let continuing = self
            .entries
            .front()
            .is_some_and(|(_, entry)| entry.block_allocation.is_some());
        let min_size = limits.min_size.filter(|_| !continuing);
        if min_size.is_some_and(|min_size| self.entries.len() < min_size) {
            return None;
        }

        let mut taken: Vec<(u64, Entry, Option<u32>)> = Vec::new();
        let mut prefill_tokens: u32 = 0;
        let mut total_tokens: u32 = 0;
        // (cached prefix, prompt) tokens of the requests allocated now.
        let mut new_prompts: Vec<(u32, u32)> = Vec::new();
        while let Some((id, mut entry)) = self.entries.pop_front() {
            if entry.response_tx.is_closed() {
                tracing::debug!(request_id = id, "dropping a queued request: client gone");
                continue;
            }
            let continuing = entry.block_allocation.is_some();
            // Prompt logprobs need every prompt token computed in one pass: no cached
            // prefix and no chunks then.
            let whole_prompt = entry.request.decoder_input_details;
            let allocation = entry.block_allocation.take().or_else(|| {
                self.allocator
                    .allocate(entry.max_tokens(), &entry.request.input_ids, !whole_prompt)
            });
            // The cached prefix costs neither prefill nor new KV blocks.
            let planned = allocation.and_then(|allocation| {
                let uncached = entry.request.input_length() - allocation.computed_len();
                let room = limits.prefill_token_budget.saturating_sub(prefill_tokens);
                let chunk_len = if uncached <= room {
                    None
                } else if limits.chunking && !whole_prompt && room > 0 {
                    Some(room)
                } else {
                    return continuing.then_some(Err(allocation));
                };
                let new_tokens = entry.max_tokens() - allocation.prefix_len;
                if total_tokens.saturating_add(new_tokens) > limits.token_budget {
                    return continuing.then_some(Err(allocation));
                }
                Some(Ok((allocation, chunk_len, new_tokens)))
            });
            let (allocation, chunk_len, new_tokens) = match planned {
                Some(Ok(planned)) => planned,
                held => {
                    // Keep arrival order: this entry goes first next time, with the
                    // blocks of its chunks prefilled so far.
                    entry.block_allocation = held.and_then(Result::err);
                    self.entries.push_front((id, entry));
                    break;
                }
            };
            let uncached = entry.request.input_length() - allocation.computed_len();
            prefill_tokens += chunk_len.unwrap_or(uncached);
            total_tokens += new_tokens;
            if !continuing {
                new_prompts.push((allocation.prefix_len, entry.request.input_length()));
                if chunk_len.is_some() {
                    metrics::counter!("tgi_prefill_chunked_total").increment(1);
                }
            }
            entry.block_allocation = Some(allocation);
            taken.push((id, entry, chunk_len));
            if limits.max_size == Some(taken.len()) || chunk_len.is_some() {
                break;
            }
        }

        if taken.is_empty() || min_size.is_some_and(|min_size| taken.len() < min_size) {
            // Not worth a batch yet: back to the queue in order, blocks released.
            // (None continuing: `min_size` is then unset.)
            for (id, mut entry, _) in taken.into_iter().rev() {
                entry.block_allocation = None;
                self.entries.push_front((id, entry));
            }
            return None;
        }

        let hit_tokens: u32 = new_prompts.iter().map(|(cached, _)| cached).sum();
        let prompt_tokens: u32 = new_prompts.iter().map(|(_, prompt)| prompt).sum();
        metrics::counter!("tgi_prefix_cache_hit_tokens_total").increment(hit_tokens.into());
        metrics::counter!("tgi_prefix_cache_prompt_tokens_total").increment(prompt_tokens.into());
        let requests: Vec<Request> = taken
            .iter()
            .map(|(id, entry, chunk_len)| request_proto(*id, entry, *chunk_len))
            .collect();
        let batch = Batch {
            id: self.next_batch_id,
            size: requests.len() as u32,
            max_tokens: taken.iter().map(|(_, entry, _)| entry.max_tokens()).sum(),
            max_blocks: requests.iter().map(|r| r.blocks.len() as u32).sum(),
            requests,
        };
        self.next_batch_id += 1;
        metrics::histogram!("tgi_batch_next_size").record(batch.size as f64);
        Some(NextBatch {
            entries: taken.into_iter().map(|(id, entry, _)| (id, entry)).collect(),
            batch,
        })
    }
}

/// The shards' view of a queued request (its blocks already allocated); with
/// `chunk_len`, only that many of its uncached prompt tokens are prefilled.
fn request_proto(id: u64, entry: &Entry, chunk_len: Option<u32>) -> Request {
    let request = &entry.request;
    let parameters = &request.parameters;
    let (grammar_type, grammar) = grammar_proto(request.grammar.as_ref());
    let (blocks, slots, cache_len) = entry
        .block_allocation
        .as_ref()
        .map(|allocation| {
            (
                allocation.blocks.clone(),
                allocation.slots.clone(),
                allocation.computed_len(),
            )
        })
        .unwrap_or_default();
    Request {
        id,
        input_ids: request.input_ids.to_vec(),
        inputs: request.inputs.clone(),
        parameters: Some(NextTokenChooserParameters {
            temperature: parameters.temperature,
            top_k: parameters.top_k,
            top_p: parameters.top_p,
            typical_p: parameters.typical_p,
            min_p: parameters.min_p,
            do_sample: parameters.do_sample,
            seed: parameters.seed,
            repetition_penalty: parameters.repetition_penalty,
            frequency_penalty: parameters.frequency_penalty,
            presence_penalty: parameters.presence_penalty,
            grammar,
            grammar_type: grammar_type as i32,
        }),
        stopping_parameters: Some(StoppingCriteriaParameters {
            max_new_tokens: request.stopping_parameters.max_new_tokens,
            stop_sequences: request.stopping_parameters.stop_sequences.clone(),
            ignore_eos_token: request.stopping_parameters.ignore_eos_token,
        }),
        prefill_logprobs: request.decoder_input_details,
        top_n_tokens: request.top_n_tokens,
        blocks,
        slots,
        cache_len: (cache_len > 0).then_some(cache_len),
        chunk_len,
    }
}

/// A grammar as the protocol carries it: its type and its text.
fn grammar_proto(grammar: Option<&GrammarSpec>) -> (GrammarType, String) {
    match grammar {
        None => (GrammarType::None, String::new()),
        Some(GrammarSpec::JsonSchema(schema)) => (GrammarType::Json, schema.to_string()),
        Some(GrammarSpec::Regex(regex)) => (GrammarType::Regex, regex.clone()),
        Some(GrammarSpec::Lark(lark)) => (GrammarType::Lark, lark.clone()),
    }
}

#[cfg(test)]
pub mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::infer_types::{ValidParameters, ValidStoppingParameters};

    pub fn request(input_length: usize, max_new_tokens: u32) -> ValidGenerateRequest {
        ValidGenerateRequest {
            inputs: "test".to_string(),
            input_ids: Arc::new((0..input_length as u32).map(|i| 10 + i).collect()),
            parameters: ValidParameters {
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
                typical_p: 1.0,
                min_p: 0.0,
                do_sample: false,
                seed: 0,
                repetition_penalty: 1.0,
                frequency_penalty: 0.0,
                presence_penalty: 0.0,
            },
            stopping_parameters: ValidStoppingParameters {
                max_new_tokens,
                stop_sequences: vec![],
                ignore_eos_token: false,
            },
            decoder_input_details: false,
            top_n_tokens: 0,
            grammar: None,
        }
    }

    type ResponseReceiver = mpsc::UnboundedReceiver<Result<InferStreamResponse, InferError>>;

    fn entry(input_length: usize, max_new_tokens: u32) -> (Entry, ResponseReceiver) {
        let (sender, receiver) = mpsc::unbounded_channel();
        (
            Entry::new(request(input_length, max_new_tokens), sender),
            receiver,
        )
    }

    fn limits(prefill_token_budget: u32, token_budget: u32) -> BatchLimits {
        BatchLimits {
            min_size: None,
            max_size: None,
            prefill_token_budget,
            chunking: false,
            token_budget,
        }
    }

    fn ids(next: &NextBatch) -> Vec<u64> {
        next.batch.requests.iter().map(|r| r.id).collect()
    }

    /// 64 blocks of 16 tokens.
    fn state() -> State {
        State::new(BlockAllocator::new(64 * 16, 16, true).unwrap())
    }

    #[test]
    fn the_shards_get_every_sampling_parameter() {
        let mut sampled = request(3, 4);
        sampled.parameters = ValidParameters {
            temperature: 0.7,
            top_k: 50,
            top_p: 0.9,
            typical_p: 0.95,
            min_p: 0.05,
            do_sample: true,
            seed: 11,
            repetition_penalty: 1.1,
            frequency_penalty: 0.2,
            presence_penalty: -0.3,
        };
        sampled.grammar = Some(GrammarSpec::Regex("[ab]+".into()));
        let (sender, _receiver) = mpsc::unbounded_channel();
        let proto = request_proto(7, &Entry::new(sampled, sender), None);
        assert_eq!(
            proto.parameters,
            Some(NextTokenChooserParameters {
                temperature: 0.7,
                top_k: 50,
                top_p: 0.9,
                typical_p: 0.95,
                min_p: 0.05,
                do_sample: true,
                seed: 11,
                repetition_penalty: 1.1,
                frequency_penalty: 0.2,
                presence_penalty: -0.3,
                grammar: "[ab]+".into(),
                grammar_type: GrammarType::Regex as i32,
            })
        );
        let schema = serde_json::json!({"type": "object"});
        assert_eq!(grammar_proto(Some(&GrammarSpec::JsonSchema(schema))), (GrammarType::Json, r#"{"type":"object"}"#.into()));
        assert_eq!(grammar_proto(None), (GrammarType::None, String::new()));
    }

    #[test]
    fn takes_entries_in_order_within_the_prefill_budget() {
        let mut state = state();
        let _receivers: Vec<_> = (0..3)
            .map(|_| {
                let (entry, receiver) = entry(10, 5);
                state.append(entry);
                receiver
            })
            .collect();
        let next = state.next_batch(limits(25, 1000)).unwrap();
        assert_eq!(ids(&next), vec![0, 1]);
        assert_eq!(next.batch.id, 0);
        assert_eq!(next.batch.size, 2);
        assert_eq!(next.batch.max_tokens, 30);
        assert_eq!(next.batch.max_blocks, 2);
        let request = &next.batch.requests[0];
        assert_eq!(request.slots.len(), 15);
        assert_eq!(request.input_ids.len(), 10);

        let next = state.next_batch(limits(25, 1000)).unwrap();
        assert_eq!(ids(&next), vec![2]);
        assert_eq!(next.batch.id, 1);
        assert!(state.next_batch(limits(25, 1000)).is_none());
    }

    #[test]
    fn respects_the_token_budget_and_max_size() {
        let mut state = state();
        let _receivers: Vec<_> = (0..4)
            .map(|_| {
                let (entry, receiver) = entry(10, 40);
                state.append(entry);
                receiver
            })
            .collect();
        let next = state.next_batch(limits(1000, 120)).unwrap();
        assert_eq!(ids(&next), vec![0, 1]);
        let next = state
            .next_batch(BatchLimits {
                max_size: Some(1),
                ..limits(1000, 1000)
            })
            .unwrap();
        assert_eq!(ids(&next), vec![2]);
        let max_size_zero = BatchLimits {
            max_size: Some(0),
            ..limits(1000, 1000)
        };
        assert!(state.next_batch(max_size_zero).is_none());
        assert_eq!(state.entries.len(), 1);
    }

    #[test]
    fn no_prefill_budget_left_forms_no_batch() {
        let mut state = state();
        let (entry, _receiver) = entry(1, 10);
        state.append(entry);
        assert!(state.next_batch(limits(0, 1000)).is_none());
        assert_eq!(state.entries.len(), 1, "still waiting");
        assert_eq!(state.allocator.free_block_count(), 64);
    }

    #[test]
    fn below_min_size_nothing_is_taken_and_blocks_are_kept_free() {
        let mut state = state();
        let _receivers: Vec<_> = (0..3)
            .map(|_| {
                let (entry, receiver) = entry(10, 10);
                state.append(entry);
                receiver
            })
            .collect();
        let wants_four = BatchLimits {
            min_size: Some(4),
            ..limits(1000, 1000)
        };
        assert!(state.next_batch(wants_four).is_none());
        // Enough entries, but the prefill budget stops at two.
        let wants_three = BatchLimits {
            min_size: Some(3),
            ..limits(25, 1000)
        };
        assert!(state.next_batch(wants_three).is_none());
        assert_eq!(state.allocator.free_block_count(), 64);
        let order: Vec<u64> = state.entries.iter().map(|(id, _)| *id).collect();
        assert_eq!(order, vec![0, 1, 2]);
        let next = state.next_batch(limits(1000, 1000)).unwrap();
        assert_eq!(ids(&next), vec![0, 1, 2]);
    }

    #[test]
    fn skips_entries_whose_client_is_gone() {
        let mut state = state();
        let (first, first_receiver) = entry(10, 10);
        let (second, _second_receiver) = entry(10, 10);
        state.append(first);
        state.append(second);
        drop(first_receiver);
        let next = state.next_batch(limits(1000, 1000)).unwrap();
        assert_eq!(ids(&next), vec![1]);
        assert!(state.entries.is_empty());
    }

    #[test]
    fn waits_for_free_blocks_and_allocates_them() {
        let mut state = State::new(BlockAllocator::new(4 * 16, 16, true).unwrap());
        let (first, _r1) = entry(20, 20); // 3 blocks
        let (second, _r2) = entry(20, 20);
        state.append(first);
        state.append(second);
        let running = state.next_batch(limits(1000, 1000)).unwrap();
        assert_eq!(ids(&running), vec![0]);
        assert!(state.next_batch(limits(1000, 1000)).is_none());
        assert_eq!(state.entries.len(), 1, "still waiting");
        drop(running);
        let next = state.next_batch(limits(1000, 1000)).unwrap();
        assert_eq!(ids(&next), vec![1]);
        let blocks = &next.batch.requests[0].blocks;
        assert_eq!(blocks.len(), 3);
        assert!(!blocks.contains(&0));
    }

    /// Marks the batch's prompts (or chunks) as prefilled, as a successful step does.
    fn prefilled(next: &mut NextBatch) {
        for request in &next.batch.requests {
            let computed = request.cache_len.unwrap_or(0)
                + request.chunk_len.unwrap_or(request.input_ids.len() as u32);
            let allocation = next.entries.get_mut(&request.id).unwrap().block_allocation.as_mut();
            allocation.unwrap().set_computed(computed);
        }
    }

    #[test]
    fn a_cached_prefix_is_sent_as_cache_len_and_costs_no_prefill_budget() {
        let mut state = state();
        let (first, _r1) = entry(40, 5);
        state.append(first);
        let mut next = state.next_batch(limits(40, 1000)).unwrap();
        assert_eq!(next.batch.requests[0].cache_len, None);
        prefilled(&mut next);
        drop(next);
        let (same, _r2) = entry(40, 5);
        let (details, _r3) = entry(40, 5);
        state.append(same);
        state.append(details);
        state.entries[1].1.request.decoder_input_details = true;
        // 32 of the 40 tokens are cached: 8 + 40 fit a budget of 48.
        let next = state.next_batch(limits(48, 1000)).unwrap();
        assert_eq!(ids(&next), vec![1, 2]);
        let cache_lens: Vec<_> = next.batch.requests.iter().map(|r| r.cache_len).collect();
        assert_eq!(cache_lens, vec![Some(32), None], "prompt logprobs compute the whole prompt");
        assert_eq!(next.batch.max_tokens, 90);
    }

    #[test]
    fn chunking_splits_a_prompt_over_steps_that_go_first() {
        let mut state = state();
        let (long, _r1) = entry(50, 5);
        let (short, _r2) = entry(10, 5);
        state.append(long);
        state.append(short);
        let chunked = BatchLimits {
            chunking: true,
            ..limits(20, 1000)
        };
        assert!(state.next_batch(limits(20, 1000)).is_none(), "no chunking: too long");
        let mut expected_cache_len = None;
        for chunk_len in [20, 20] {
            let mut next = state.next_batch(chunked).unwrap();
            assert_eq!(ids(&next), vec![0], "a chunk ends the batch");
            let request = &next.batch.requests[0];
            assert_eq!((request.cache_len, request.chunk_len), (expected_cache_len, Some(chunk_len)));
            let blocks = request.blocks.clone();
            prefilled(&mut next);
            expected_cache_len = Some(expected_cache_len.unwrap_or(0) + chunk_len);
            // The batching loop puts it back, its blocks held.
            state.requeue(next.entries.into_iter().collect());
            assert_eq!(state.entries[0].1.block_allocation.as_ref().unwrap().blocks, blocks);
        }
        // A partly prefilled prompt goes on even when too few requests wait.
        let wants_many = BatchLimits {
            min_size: Some(5),
            ..chunked
        };
        let next = state.next_batch(wants_many).unwrap();
        assert_eq!(ids(&next), vec![0, 1], "the last 10 tokens, then the short prompt");
        let request = &next.batch.requests[0];
        assert_eq!((request.cache_len, request.chunk_len), (Some(40), None));
        assert_eq!(next.batch.requests[1].chunk_len, None);
    }

    #[tokio::test]
    async fn the_task_serves_appends_and_batches() {
        let queue = Queue::new(BlockAllocator::new(64 * 16, 16, true).unwrap());
        let (first, _receiver) = entry(10, 10);
        queue.append(first);
        let next = queue.next_batch(limits(1000, 1000)).await.unwrap();
        assert_eq!(ids(&next), vec![0]);
        assert!(queue.next_batch(limits(1000, 1000)).await.is_none());
    }
}
