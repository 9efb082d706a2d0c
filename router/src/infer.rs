//! The inference entry point of the HTTP layer: admission (concurrency limit),
//! the queue, the batching loop and the shards behind them.

use std::sync::Arc;

use anyhow::Context;
use futures::StreamExt;
use proto::v3::{
    Batch, NextTokenChooserParameters, Request, StoppingCriteriaParameters, WarmupRequest,
};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::batching::{batching_task, BatchingConfig, Entry, GenerationHealth, Queue};
use crate::client::{Deadlines, ShardedClient, StuckCall};
use crate::infer_types::{InferError, InferResponse, InferStreamResponse, ValidGenerateRequest};
use crate::kv::BlockAllocator;

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub max_concurrent_requests: usize,
    pub max_batch_prefill_tokens: u32,
    /// None: take what the shards' Warmup reports.
    pub max_batch_total_tokens: Option<u32>,
    pub max_batch_size: Option<usize>,
    pub waiting_served_ratio: f32,
    pub max_waiting_tokens: usize,
    pub max_input_tokens: u32,
    pub max_total_tokens: u32,
    /// Prompts reuse the KV blocks of earlier prompts' common prefixes.
    pub prefix_caching: bool,
}

#[derive(Debug, Clone)]
pub struct ShardSummary {
    pub info: proto::v3::InfoResponse,
    /// Tokens of KV cache the scheduler hands out.
    pub max_batch_total_tokens: u32,
}

pub type StreamResponse = Result<InferStreamResponse, InferError>;

#[derive(Clone)]
pub struct Infer {
    queue: Queue,
    /// Wakes the batching loop when a request is queued.
    batching_notifier: Arc<Notify>,
    limit_concurrent_requests: Arc<Semaphore>,
    client: ShardedClient,
    health: Arc<GenerationHealth>,
    /// Requests larger than this can never be scheduled.
    max_batch_total_tokens: u32,
    max_batch_prefill_tokens: u32,
    /// Prompts beyond `max_batch_prefill_tokens` are prefilled in chunks.
    chunking: bool,
}

impl Infer {
    /// Connects to the master shard socket, discovers the others, Info, ClearCache, Warmup, spawns queue + batching tasks.
    pub async fn connect(
        master_shard_uds_path: &str,
        config: SchedulerConfig,
        deadlines: Deadlines,
    ) -> anyhow::Result<(Infer, ShardSummary)> {
        validate_config(&config)?;
        let client = ShardedClient::connect(master_shard_uds_path, deadlines)
            .await
            .with_context(|| format!("connecting to the shards at {master_shard_uds_path}"))?;
        let info = client.info().await.context("asking the shards for Info")?;
        anyhow::ensure!(
            info.support_chunking || config.max_batch_prefill_tokens >= config.max_input_tokens,
            "--max-batch-prefill-tokens ({}) must be >= --max-input-tokens ({}): the shards \
             do not prefill in chunks, so longer prompts could never be scheduled",
            config.max_batch_prefill_tokens,
            config.max_input_tokens
        );
        tracing::info!(
            shards = client.shard_count(),
            ?info,
            "Connected to the shards"
        );
        client
            .clear_cache(None)
            .await
            .context("clearing the shards' cache")?;
        let warmup_capacity = client
            .warmup(warmup_request(&config, info.block_size)?)
            .await
            .context("warming up the shards")?;
        let capacity = match config.max_batch_total_tokens {
            Some(requested) if warmup_capacity < requested => {
                tracing::warn!(
                    "the shards hold {warmup_capacity} tokens of KV cache, less than --max-batch-total-tokens {requested}"
                );
                warmup_capacity
            }
            Some(requested) => requested,
            None => warmup_capacity,
        };
        let allocator = BlockAllocator::new(capacity, info.block_size, config.prefix_caching)
            .context("sizing the KV block allocator from the shards' Warmup")?;
        let max_batch_total_tokens = allocator.capacity_tokens();
        anyhow::ensure!(
            config.max_total_tokens <= max_batch_total_tokens,
            "--max-total-tokens {} exceeds the {max_batch_total_tokens} tokens the KV cache holds",
            config.max_total_tokens
        );
        tracing::info!(
            max_batch_total_tokens,
            block_size = info.block_size,
            "KV cache sized"
        );

        let batching_config = BatchingConfig {
            max_batch_prefill_tokens: config.max_batch_prefill_tokens,
            max_batch_total_tokens,
            max_batch_size: config.max_batch_size,
            waiting_served_ratio: config.waiting_served_ratio,
            max_waiting_tokens: config.max_waiting_tokens,
            shards_on_gpu: info.device_type == "cuda",
            chunking: info.support_chunking,
        };
        let infer = Infer::spawn(client, allocator, batching_config, &config);
        let summary = ShardSummary {
            info,
            max_batch_total_tokens,
        };
        Ok((infer, summary))
    }

    /// Starts the queue and batching tasks over connected, warmed-up shards.
    fn spawn(
        client: ShardedClient,
        allocator: BlockAllocator,
        batching_config: BatchingConfig,
        config: &SchedulerConfig,
    ) -> Infer {
        let queue = Queue::new(allocator);
        let batching_notifier = Arc::new(Notify::new());
        let health = Arc::new(GenerationHealth::default());
        tokio::spawn(batching_task(
            client.clone(),
            queue.clone(),
            batching_config,
            Arc::clone(&batching_notifier),
            Arc::clone(&health),
        ));
        Infer {
            queue,
            batching_notifier,
            limit_concurrent_requests: Arc::new(Semaphore::new(config.max_concurrent_requests)),
            client,
            health,
            max_batch_total_tokens: batching_config.max_batch_total_tokens,
            max_batch_prefill_tokens: batching_config.max_batch_prefill_tokens,
            chunking: batching_config.chunking,
        }
    }

    /// Err(Overloaded) beyond max_concurrent_requests. The stream yields Prefill? then Intermediate* then End, or an Err and ends.
    /// Dropping the stream (client gone) makes the batching loop drop the request and free its KV blocks at the next step.
    pub fn generate_stream(
        &self,
        request: ValidGenerateRequest,
    ) -> Result<
        (
            OwnedSemaphorePermit,
            UnboundedReceiverStream<StreamResponse>,
        ),
        InferError,
    > {
        if let Some(stuck) = self.client.stuck() {
            return Err(InferError::ShardStuck(stuck.to_string()));
        }
        let permit = Arc::clone(&self.limit_concurrent_requests)
            .try_acquire_owned()
            .map_err(|_| InferError::Overloaded)?;
        let total_tokens =
            request.input_length() as u64 + request.stopping_parameters.max_new_tokens as u64;
        if total_tokens > self.max_batch_total_tokens as u64 {
            return Err(InferError::ValidationError(format!(
                "the prompt and max_new_tokens come to {total_tokens} tokens, more than the {} the KV cache holds",
                self.max_batch_total_tokens
            )));
        }
        // Prompt logprobs need the whole prompt in one pass.
        let one_pass = !self.chunking || request.decoder_input_details;
        if one_pass && request.input_length() > self.max_batch_prefill_tokens {
            let why = if self.chunking { " (prompt logprobs need one prefill)" } else { "" };
            return Err(InferError::ValidationError(format!(
                "the prompt has {} tokens, more than --max-batch-prefill-tokens {}{why}",
                request.input_length(),
                self.max_batch_prefill_tokens
            )));
        }
        let (response_tx, response_rx) = mpsc::unbounded_channel();
        self.queue.append(Entry::new(request, response_tx));
        self.batching_notifier.notify_one();
        Ok((permit, UnboundedReceiverStream::new(response_rx)))
    }

    /// Whole generation collected from the stream.
    pub async fn generate(
        &self,
        request: ValidGenerateRequest,
    ) -> Result<InferResponse, InferError> {
        let input_length = request.input_length();
        let (_permit, mut stream) = self.generate_stream(request)?;
        let mut prefill = Vec::new();
        let mut tokens = Vec::new();
        let mut top_tokens = Vec::new();
        while let Some(response) = stream.next().await {
            match response? {
                InferStreamResponse::Prefill(prompt_tokens) => prefill = prompt_tokens,
                InferStreamResponse::Intermediate {
                    token,
                    top_tokens: alternatives,
                } => {
                    tokens.push(token);
                    top_tokens.push(alternatives);
                }
                InferStreamResponse::End {
                    token,
                    top_tokens: alternatives,
                    generated_text,
                    queued,
                    start,
                } => {
                    tokens.push(token);
                    top_tokens.push(alternatives);
                    return Ok(InferResponse {
                        prefill,
                        input_length,
                        tokens,
                        top_tokens,
                        generated_text,
                        queued,
                        start,
                    });
                }
            }
        }
        Err(InferError::IncompleteGeneration)
    }

    /// Shard health without waiting on a busy shard (TGI semantics: a generation that
    /// succeeded recently, or a step still inside its deadline, vouches for the shards;
    /// otherwise a bounded Health probe). A stuck group is unhealthy at once.
    pub async fn health(&self) -> bool {
        if self.client.stuck().is_some() {
            return false;
        }
        if self.health.recently_healthy() || self.client.step_in_flight() {
            return true;
        }
        match self.client.health().await {
            Ok(()) => true,
            // The probe may have waited behind a step that started meanwhile.
            Err(_) if self.client.step_in_flight() => true,
            Err(err) => {
                tracing::warn!("shard health check failed: {err}");
                false
            }
        }
    }

    /// Resolves once a shard misses a deadline (see [`ShardedClient`]).
    pub async fn wait_stuck(&self) -> StuckCall {
        self.client.wait_stuck().await
    }
}

fn validate_config(config: &SchedulerConfig) -> anyhow::Result<()> {
    anyhow::ensure!(
        config.max_input_tokens > 0,
        "--max-input-tokens must be at least 1"
    );
    anyhow::ensure!(
        config.max_input_tokens < config.max_total_tokens,
        "--max-input-tokens ({}) must be < --max-total-tokens ({})",
        config.max_input_tokens,
        config.max_total_tokens
    );
    if let Some(max_batch_total_tokens) = config.max_batch_total_tokens {
        anyhow::ensure!(
            max_batch_total_tokens >= config.max_total_tokens,
            "--max-batch-total-tokens ({max_batch_total_tokens}) must be >= --max-total-tokens ({})",
            config.max_total_tokens
        );
        anyhow::ensure!(
            max_batch_total_tokens >= config.max_batch_prefill_tokens,
            "--max-batch-total-tokens ({max_batch_total_tokens}) must be >= --max-batch-prefill-tokens ({})",
            config.max_batch_prefill_tokens
        );
    }
    anyhow::ensure!(
        config.max_batch_size != Some(0),
        "--max-batch-size must be at least 1"
    );
    anyhow::ensure!(
        config.max_concurrent_requests > 0,
        "--max-concurrent-requests must be at least 1"
    );
    Ok(())
}

/// The largest prefill the router will ever send (as TGI's warmup):
/// `max_batch_prefill_tokens` prompt tokens in requests of at most
/// `max_input_tokens`, each asking for the rest of `max_total_tokens`, with
/// every sampling feature on so that the shards measure their peak memory.
/// The prompts are laid out in consecutive KV blocks from block 1: the shards
/// size the cache to hold at least this batch.
fn warmup_request(config: &SchedulerConfig, block_size: u32) -> anyhow::Result<WarmupRequest> {
    /// Id 0 is in every vocabulary, however small: the content of the prompts does not matter.
    const WARMUP_TOKEN: u32 = 0;
    anyhow::ensure!(block_size > 0, "the shards reported a KV block size of 0");
    // Every prompt starts on a fresh block, so each may waste up to one block.
    let prompts = config
        .max_batch_prefill_tokens
        .div_ceil(config.max_input_tokens);
    let placement = BlockAllocator::new(
        config.max_batch_prefill_tokens + prompts * block_size,
        block_size,
        false,
    )?;
    let mut requests = Vec::new();
    // Held until the batch is built, so that every prompt gets its own blocks.
    let mut allocations = Vec::new();
    let mut prompt_tokens = 0;
    while prompt_tokens < config.max_batch_prefill_tokens
        && config
            .max_batch_size
            .is_none_or(|max_size| requests.len() < max_size)
    {
        let input_length = config
            .max_input_tokens
            .min(config.max_batch_prefill_tokens - prompt_tokens);
        let allocation = placement
            .allocate(input_length, &Arc::default(), false)
            .context("placing the warmup prompts in KV blocks")?;
        requests.push(Request {
            id: requests.len() as u64,
            input_ids: vec![WARMUP_TOKEN; input_length as usize],
            inputs: "_test ".repeat(input_length as usize),
            parameters: Some(NextTokenChooserParameters {
                temperature: 0.9,
                top_k: 10,
                top_p: 0.9,
                typical_p: 0.9,
                min_p: 0.05,
                do_sample: false,
                seed: 0,
                repetition_penalty: 1.2,
                frequency_penalty: 0.1,
                presence_penalty: 0.1,
                ..NextTokenChooserParameters::greedy()
            }),
            stopping_parameters: Some(StoppingCriteriaParameters {
                max_new_tokens: config.max_total_tokens - input_length,
                stop_sequences: vec![],
                ignore_eos_token: true,
            }),
            prefill_logprobs: true,
            top_n_tokens: 20,
            blocks: allocation.blocks.clone(),
            slots: allocation.slots.clone(),
            cache_len: None,
            chunk_len: None,
        });
        allocations.push(allocation);
        prompt_tokens += input_length;
    }
    Ok(WarmupRequest {
        batch: Some(Batch {
            id: 0,
            size: requests.len() as u32,
            max_tokens: prompt_tokens,
            max_blocks: requests.iter().map(|r| r.blocks.len() as u32).sum(),
            requests,
        }),
        max_input_tokens: config.max_input_tokens,
        max_prefill_tokens: config.max_batch_prefill_tokens,
        max_total_tokens: config.max_total_tokens,
        max_batch_total_tokens: config.max_batch_total_tokens,
    })
}
