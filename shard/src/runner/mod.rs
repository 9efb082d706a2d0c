//! The execution side of the shard: one `Runner` owns the model, the KV cache and the
//! cached batches, and runs on its own OS thread (`worker`); the gRPC handlers send it
//! jobs. Each Prefill/Decode is one forward pass plus one token choice per request.

pub mod batch;
#[cfg(feature = "cuda")]
pub mod decode_graphs;
mod injected_failures;
mod output;
pub mod sampler;
pub mod stopping;
pub mod warmup;
pub mod worker;

use crate::cache::KvCache;
use crate::models::{ForwardBatch, Model, SequenceInput};
use anyhow::{bail, ensure, Context, Result};
use batch::{BatchState, RequestState};
use injected_failures::InjectedFailures;
use candle_core::{DType, Device, Tensor};
use grammar::GrammarCompiler;
use model_store::ModelFiles;
use output::TokenOutput;
use proto::v3::{Batch, CachedBatch, DecodeResponse, Generation, InfoResponse, PrefillResponse};
use std::collections::HashMap;
use std::time::Instant;
use warmup::KvMemory;

pub struct Runner {
    model: Box<dyn Model>,
    device: Device,
    output: TokenOutput,
    /// Fed to the health check's one-token forward pass.
    health_token_id: u32,
    block_size: usize,
    kv_memory: KvMemory,
    rank: u32,
    /// Above 1, every rank runs the same forward passes in step (tensor parallelism).
    world_size: u32,
    /// Created by Warmup.
    cache: Option<KvCache>,
    /// Batch sizes to capture decode graphs for (CUDA, one rank, bf16/f16).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    cuda_graph_batch_sizes: Vec<usize>,
    /// Captured by Warmup, after the cache.
    #[cfg(feature = "cuda")]
    decode_graphs: Option<decode_graphs::DecodeGraphs>,
    /// `SHARD_PROFILE_BATCH`: prefill and decode steps of this many requests run inside
    /// `cuProfilerStart`/`Stop`, so that `ncu --profile-from-start off` sees only them.
    #[cfg(feature = "cuda")]
    profiled_batch: Option<usize>,
    batches: HashMap<u64, BatchState>,
    /// Compiles the grammars of constrained requests; None when the tokenizer's tokens
    /// cannot be read as bytes (such requests are refused).
    grammars: Option<GrammarCompiler>,
    /// The next decode step's forward pass, started before the last step answered.
    ahead: Option<RunAhead>,
    injected_failures: InjectedFailures,
}

/// Logits of a decode step computed ahead (`DecodeRequest.run_ahead`): started as soon
/// as a step chose its tokens, for the requests of that step that did not stop on their
/// token (one that stops on a stop sequence leaves its row unused). They serve the next step that runs some of these requests
/// first, in their order: a decode of the batch (alone, filtered, or followed by other
/// batches) or a mixed prefill carrying it. Request ids are never reused.
struct RunAhead {
    request_ids: Vec<u64>,
    /// `[requests, vocab]`, possibly still being computed on the device.
    logits: Tensor,
}

impl RunAhead {
    /// Logits rows for the leading `requests` that were run ahead; None when the first
    /// one was not.
    fn serving(self, requests: &[RequestState]) -> Result<Option<Tensor>> {
        let row_of: HashMap<u64, u32> = self.request_ids.iter().copied().zip(0..).collect();
        let rows: Vec<u32> = requests
            .iter()
            .map_while(|r| row_of.get(&r.id).copied())
            .collect();
        Ok(if rows.is_empty() {
            None
        } else if rows.iter().copied().eq(0..rows.len() as u32) {
            Some(self.logits.narrow(0, 0, rows.len())?)
        } else {
            let rows = Tensor::new(rows.as_slice(), self.logits.device())?;
            Some(self.logits.index_select(&rows, 0)?)
        })
    }
}

/// Generations of one step and how long its parts took.
struct StepOutput {
    generations: Vec<Generation>,
    forward_ns: u64,
    decode_ns: u64,
}

/// Where a request's rows sit in the logits of a step.
struct LogitsRows {
    /// Row of the last fed token: it picks the next token.
    last: u32,
    /// First row of the prompt tokens when the prompt's logprobs are wanted.
    prompt_start: Option<u32>,
}

/// Batch sizes whose decode steps are captured as CUDA graphs unless told otherwise:
/// every size up to 32, then steps of a quarter to a half, up to 256.
pub const DEFAULT_CUDA_GRAPH_BATCH_SIZES: [usize; 13] =
    [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256];

/// How the runner is set up, besides its model.
#[derive(Debug, Clone, PartialEq)]
pub struct RunnerConfig {
    /// Tokens per KV cache block.
    pub block_size: usize,
    pub kv_memory: KvMemory,
    pub rank: u32,
    pub world_size: u32,
    /// Batch sizes to capture decode graphs for on CUDA; empty for none.
    pub cuda_graph_batch_sizes: Vec<usize>,
    /// Steps to fail on purpose (`--debug-fail-steps`); empty in service.
    pub debug_fail_steps: Vec<u64>,
}

impl Runner {
    pub fn new(
        model: Box<dyn Model>,
        device: Device,
        files: &ModelFiles,
        config: RunnerConfig,
    ) -> Result<Self> {
        ensure!(config.block_size > 0, "block size must be positive");
        let tokenizer = files.tokenizer()?;
        let special = files.special_tokens()?;
        let special_token_ids = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, token)| token.special)
            .map(|(id, _)| id)
            .collect();
        let grammars = GrammarCompiler::new(&tokenizer, &special.eos_token_ids)
            .inspect_err(|e| tracing::warn!("requests with a grammar will be refused: {e:#}"))
            .ok();
        Ok(Self {
            model,
            device,
            output: TokenOutput {
                tokenizer,
                eos_token_ids: special.eos_token_ids,
                special_token_ids,
            },
            health_token_id: special.bos_token_id.unwrap_or(0),
            block_size: config.block_size,
            kv_memory: config.kv_memory,
            rank: config.rank,
            world_size: config.world_size,
            cache: None,
            cuda_graph_batch_sizes: config.cuda_graph_batch_sizes,
            #[cfg(feature = "cuda")]
            decode_graphs: None,
            #[cfg(feature = "cuda")]
            profiled_batch: std::env::var("SHARD_PROFILE_BATCH")
                .ok()
                .and_then(|v| v.parse().ok()),
            batches: HashMap::new(),
            grammars,
            ahead: None,
            injected_failures: InjectedFailures::new(&config.debug_fail_steps),
        })
    }

    pub fn info(&self) -> InfoResponse {
        let spec = self.model.spec();
        InfoResponse {
            requires_padding: false,
            dtype: dtype_name(spec.dtype).to_string(),
            device_type: if self.device.is_cuda() { "cuda" } else { "cpu" }.to_string(),
            window_size: spec.sliding_window.map(|w| w as u32),
            speculate: 0,
            // Prefills honour `cache_len` and `chunk_len`: the router decides.
            support_chunking: true,
            use_prefix_caching: true,
            attention_impl: "paged".to_string(),
            block_size: self.block_size as u32,
            model_type: spec.model_type.clone(),
            max_position_embeddings: spec.max_position_embeddings as u32,
            rank: self.rank,
            world_size: self.world_size,
            quantization: spec.quantization.clone(),
        }
    }

    /// The model runs on a GPU (host threads waiting on it may spin).
    pub fn uses_gpu(&self) -> bool {
        self.device.is_cuda()
    }

    pub fn has_cache(&self) -> bool {
        self.cache.is_some()
    }

    /// Prefills `batch`; with `cached`, also runs one decode step of that cached batch
    /// in the same forward pass, and the union continues as `batch.id`.
    pub fn prefill(
        &mut self,
        batch: Batch,
        cached: Option<CachedBatch>,
    ) -> Result<PrefillResponse> {
        let start = Instant::now();
        ensure!(
            !self.batches.contains_key(&batch.id),
            "batch {} already exists",
            batch.id
        );
        ensure!(
            !batch.requests.is_empty(),
            "batch {} has no requests",
            batch.id
        );
        if let Some(cached) = &cached {
            ensure!(
                self.batches.contains_key(&cached.id),
                "batch {} not found",
                cached.id
            );
        }
        let new_requests = batch
            .requests
            .iter()
            .map(|r| RequestState::from_proto(r, self.grammars.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        let mut requests = cached
            .and_then(|c| self.batches.remove(&c.id))
            .map(|state| state.requests)
            .unwrap_or_default();
        // A step run ahead for the cached batch is its decode step in this pass; a batch
        // prefilled alone leaves it to the running one.
        let ahead = if requests.is_empty() {
            None
        } else {
            self.take_ahead(&requests)?
        };
        // Chunks that leave the batch after the pass go last (see `step`).
        let (partial_chunks, prompts): (Vec<_>, Vec<_>) = new_requests
            .into_iter()
            .partition(RequestState::is_partial_chunk);
        requests.extend(prompts);
        requests.extend(partial_chunks);
        let mut state = BatchState {
            id: batch.id,
            requests,
        };
        #[cfg(feature = "cuda")]
        let _profiled = self.profiler(state.requests.len())?;
        let step = self
            .injected_failures
            .next_step()
            .and_then(|()| self.step(&mut state.requests, ahead, false));
        // As after a decode, what was cached stays cached when the step failed: the
        // router decides to clear it.
        let cached_state = self.keep(state);
        let step = step?;
        Ok(PrefillResponse {
            generations: step.generations,
            batch: cached_state,
            forward_ns: step.forward_ns,
            decode_ns: step.decode_ns,
            total_ns: start.elapsed().as_nanos() as u64,
        })
    }

    /// One decode step; with `run_ahead`, the next one's forward pass is started before
    /// this one answers (see [`RunAhead`]).
    pub fn decode(&mut self, batches: Vec<CachedBatch>, run_ahead: bool) -> Result<DecodeResponse> {
        let start = Instant::now();
        ensure!(!batches.is_empty(), "decode needs at least one batch");
        if let Some(missing) = batches.iter().find(|b| !self.batches.contains_key(&b.id)) {
            bail!("batch {} not found", missing.id);
        }
        let mut states = batches.iter().filter_map(|b| self.batches.remove(&b.id));
        let mut state = states.next().context("decode needs at least one batch")?;
        state.concatenate(states.collect());
        let concat_ns = start.elapsed().as_nanos() as u64;
        #[cfg(feature = "cuda")]
        let _profiled = self.profiler(state.requests.len())?;
        let ahead = self.take_ahead(&state.requests)?;
        let step = self
            .injected_failures
            .next_step()
            .and_then(|()| self.step(&mut state.requests, ahead, run_ahead));
        // The batch stays cached even when the step failed: the router decides to clear it.
        let cached = self.keep(state);
        let step = step?;
        Ok(DecodeResponse {
            generations: step.generations,
            batch: cached,
            forward_ns: step.forward_ns,
            decode_ns: step.decode_ns,
            total_ns: start.elapsed().as_nanos() as u64,
            concat_ns: Some(concat_ns),
        })
    }

    pub fn filter(&mut self, batch_id: u64, request_ids: &[u64]) -> Result<CachedBatch> {
        let state = self
            .batches
            .get_mut(&batch_id)
            .with_context(|| format!("batch {batch_id} not found"))?;
        state.filter(request_ids)?;
        let cached = state.to_cached();
        if cached.size == 0 {
            self.batches.remove(&batch_id);
        }
        Ok(cached)
    }

    /// Drops one cached batch (unknown ids are ignored), or all of them.
    pub fn clear(&mut self, batch_id: Option<u64>) {
        self.ahead = None;
        match batch_id {
            Some(id) => {
                self.batches.remove(&id);
            }
            None => self.batches.clear(),
        }
    }

    /// A one-token forward pass writing only to the reserved block 0. Skipped in a
    /// tensor-parallel group: a forward pass is a collective, and the ranks' health
    /// checks are not in step with each other.
    pub fn health(&mut self) -> Result<()> {
        if self.world_size > 1 {
            return Ok(());
        }
        let cache = self.cache.as_mut().context("no KV cache yet")?;
        let seq = SequenceInput {
            new_token_ids: &[self.health_token_id],
            start_position: 0,
            slots: &[0],
            block_table: &[0],
        };
        let batch = ForwardBatch::new(&[seq], &[0], &self.device)?;
        self.model.forward(&batch, cache)?;
        Ok(())
    }

    /// Caches the batch unless every request finished; returns what the router needs of it.
    fn keep(&mut self, state: BatchState) -> Option<CachedBatch> {
        if state.requests.is_empty() {
            return None;
        }
        let cached = state.to_cached();
        self.batches.insert(state.id, state);
        Some(cached)
    }

    /// The forward pass of the requests' pending tokens (a decode graph's replay when one
    /// fits), returning the logits of `logits_rows`; asynchronous on a GPU.
    fn forward(&mut self, requests: &[&RequestState], logits_rows: &[u32]) -> Result<Tensor> {
        if !requests.iter().any(|r| r.in_prefill()) {
            if let Some(logits) = self.replay_decode_graph(requests)? {
                return Ok(logits);
            }
        }
        let cache = self
            .cache
            .as_mut()
            .context("the KV cache does not exist yet: call Warmup first")?;
        let inputs: Vec<SequenceInput> = requests
            .iter()
            .map(|r| SequenceInput {
                new_token_ids: r.pending_tokens(),
                start_position: r.cached_len,
                slots: &r.slots,
                block_table: &r.blocks,
            })
            .collect();
        let forward_batch = ForwardBatch::new(&inputs, logits_rows, &self.device)?;
        Ok(self.model.forward(&forward_batch, cache)?)
    }

    /// The logits run ahead for the leading `requests`, if any; a step run ahead serves
    /// at most the next step.
    fn take_ahead(&mut self, requests: &[RequestState]) -> Result<Option<Tensor>> {
        self.ahead
            .take()
            .map_or(Ok(None), |ahead| ahead.serving(requests))
    }

    /// Starts the next decode step's forward pass of `requests` (see [`RunAhead`]);
    /// requests that cannot step right now (one without its next KV slot) are left to
    /// the next call.
    fn start_ahead(&mut self, requests: &[&RequestState]) {
        if !requests.iter().all(|r| r.check_slots().is_ok()) {
            return;
        }
        let rows: Vec<u32> = (0..requests.len() as u32).collect();
        match self.forward(requests, &rows) {
            Ok(logits) => {
                self.ahead = Some(RunAhead {
                    request_ids: requests.iter().map(|r| r.id).collect(),
                    logits,
                })
            }
            // The step itself will run it again, and report what fails.
            Err(e) => tracing::warn!("running the next decode step ahead failed: {e:#}"),
        }
    }

    /// One forward pass and one new token for each request; finished requests are
    /// removed. `ahead`: logits of the first requests' decode step, already computed by
    /// [`Self::start_ahead`]; the pass runs the prompts that follow them, while decoding
    /// requests that follow them (a batch appended to a running one) wait for the next
    /// pass instead of taking one of their own. With `run_ahead`, the next step's pass
    /// starts as soon as the tokens are chosen, before they are detokenized. Requests
    /// prefilling a chunk that does not end their prompt come last: the pass stores
    /// their keys/values, and they leave the batch without a token.
    fn step(
        &mut self,
        requests: &mut Vec<RequestState>,
        ahead: Option<Tensor>,
        run_ahead: bool,
    ) -> Result<StepOutput> {
        let start = Instant::now();
        for request in requests.iter() {
            request.check_slots()?;
        }
        let ahead_rows = match &ahead {
            Some(logits) => logits.dim(0)?,
            None => 0,
        };
        let others_wait = ahead.is_some() && !requests[ahead_rows..].iter().any(|r| r.in_prefill());
        let stepping = if others_wait {
            ahead_rows
        } else {
            requests.len()
        };
        let partial_chunks = requests[ahead_rows..stepping]
            .iter()
            .rev()
            .take_while(|r| r.is_partial_chunk())
            .count();
        let mut logits_rows = Vec::new();
        let mut rows: Vec<LogitsRows> = (0..ahead_rows as u32)
            .map(|last| LogitsRows {
                last,
                prompt_start: None,
            })
            .collect();
        // The requests this step's forward pass feeds.
        let fed: Vec<&RequestState> = requests[ahead_rows..stepping].iter().collect();
        let mut token_offset = 0u32;
        for request in &fed[..fed.len() - partial_chunks] {
            let tokens = request.pending_tokens().len() as u32;
            let wants_prompt = request.in_prefill() && request.prefill_logprobs;
            let prompt_start = wants_prompt.then_some(logits_rows.len() as u32);
            if wants_prompt {
                logits_rows.extend(token_offset..token_offset + tokens);
            } else {
                logits_rows.push(token_offset + tokens - 1);
            }
            rows.push(LogitsRows {
                last: (ahead_rows + logits_rows.len()) as u32 - 1,
                prompt_start: prompt_start.map(|row| ahead_rows as u32 + row),
            });
            token_offset += tokens;
        }
        let logits = match ahead {
            Some(ahead) if fed.is_empty() => ahead,
            // Prompts follow: an eager pass, which leaves the logits of a decode graph
            // (those run ahead may be one's) alone.
            Some(ahead) => Tensor::cat(&[ahead, self.forward(&fed, &logits_rows)?], 0)?,
            None => self.forward(&fed, &logits_rows)?,
        };
        self.device.synchronize()?;
        let forward_ns = start.elapsed().as_nanos() as u64;

        let decode_start = Instant::now();
        let (stepped, waiting) = requests.split_at_mut(stepping - partial_chunks);
        let waiting = &waiting[partial_chunks..];
        let last_rows: Vec<u32> = rows.iter().map(|r| r.last).collect();
        // Decode steps want every row, in order: no gather then.
        let last_logits = if last_rows.iter().copied().eq(0..logits.dim(0)? as u32) {
            logits.clone()
        } else {
            logits.index_select(&Tensor::new(last_rows, &self.device)?, 0)?
        };
        let mut choosers: Vec<_> = stepped.iter_mut().map(|r| &mut r.chooser).collect();
        let choices = sampler::choose_tokens(&last_logits, &mut choosers)?;
        let prompt_logprobs = self.prompt_logprobs(&logits, stepped, &rows)?;
        for (request, choice) in stepped.iter_mut().zip(&choices) {
            request.accept(choice.id)?;
        }
        if run_ahead {
            // Requests that stop on their token need no next step; stop sequences are
            // only known after detokenizing, and their rows go unused.
            let eos_token_ids = &self.output.eos_token_ids;
            let continuing: Vec<&RequestState> = stepped
                .iter()
                .zip(&choices)
                .filter(|(r, c)| {
                    r.stopping.stops_on_token(c.id, eos_token_ids).is_none()
                        && !r.chooser.grammar_finished()
                })
                .map(|(r, _)| r)
                .chain(waiting.iter())
                .collect();
            if !continuing.is_empty() {
                self.start_ahead(&continuing);
            }
        }

        let (generations, finished) = self.output.deliver(stepped, choices, prompt_logprobs)?;
        // The router sends the rest of their prompts anew.
        requests.drain(stepping - partial_chunks..stepping);
        requests.retain(|r| !finished.contains(&r.id));
        Ok(StepOutput {
            generations,
            forward_ns,
            decode_ns: decode_start.elapsed().as_nanos() as u64,
        })
    }

    /// Captures the decode graphs for the cache just allocated, when they apply: CUDA
    /// kernels (bf16/f16), one rank (a collective inside a graph is not attempted).
    /// A capture that fails leaves decode steps eager, with a warning.
    #[cfg(feature = "cuda")]
    fn capture_decode_graphs(&mut self, max_total_tokens: usize) {
        use crate::layers::uses_cuda_kernels;
        self.decode_graphs = None;
        let (Some(cache), spec) = (self.cache.as_mut(), self.model.spec()) else {
            return;
        };
        if self.cuda_graph_batch_sizes.is_empty()
            || self.world_size > 1
            || !uses_cuda_kernels(&self.device, spec.dtype)
        {
            return;
        }
        let max_blocks = max_total_tokens.div_ceil(self.block_size).max(1);
        let start = Instant::now();
        match decode_graphs::DecodeGraphs::capture(
            &*self.model,
            cache,
            &self.cuda_graph_batch_sizes,
            max_blocks,
            &self.device,
        ) {
            Ok(graphs) => {
                tracing::info!(
                    batch_sizes = ?graphs.batch_sizes(),
                    max_blocks,
                    ms = start.elapsed().as_millis() as u64,
                    "decode steps captured as CUDA graphs"
                );
                self.decode_graphs = Some(graphs);
            }
            Err(e) => tracing::warn!("decode steps stay eager: {e:#}"),
        }
    }

    #[cfg(not(feature = "cuda"))]
    fn capture_decode_graphs(&mut self, _max_total_tokens: usize) {}

    /// Profiles (`cuProfilerStart` until dropped) a step of `batch_size` requests when
    /// `SHARD_PROFILE_BATCH` names that size.
    #[cfg(feature = "cuda")]
    fn profiler(
        &self,
        batch_size: usize,
    ) -> Result<Option<candle_core::cuda_backend::cudarc::driver::Profiler>> {
        (self.profiled_batch == Some(batch_size))
            .then(candle_core::cuda_backend::cudarc::driver::Profiler::new)
            .transpose()
            .map_err(Into::into)
    }

    /// Logits of a decode step replayed by a captured graph, or None to run it eagerly.
    #[cfg(feature = "cuda")]
    fn replay_decode_graph(&self, requests: &[&RequestState]) -> Result<Option<Tensor>> {
        let Some(graphs) = &self.decode_graphs else {
            return Ok(None);
        };
        // Positions past the model's are left to the eager pass to reject.
        let max_positions = self.model.spec().max_position_embeddings;
        if requests.iter().any(|r| r.tokens.len() > max_positions) {
            return Ok(None);
        }
        let seqs: Vec<_> = requests
            .iter()
            .map(|r| decode_graphs::DecodeInput {
                token_id: r.tokens[r.cached_len],
                position: r.cached_len,
                slot: r.slots[r.cached_len],
                block_table: &r.blocks,
            })
            .collect();
        Ok(graphs.replay(&seqs)?)
    }

    #[cfg(not(feature = "cuda"))]
    fn replay_decode_graph(&self, _requests: &[&RequestState]) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// For each request, the logprobs of its prompt tokens (NaN where no logits precede
    /// the token: the first token, and cached ones), when it asked for them.
    fn prompt_logprobs(
        &self,
        logits: &Tensor,
        requests: &[RequestState],
        rows: &[LogitsRows],
    ) -> Result<Vec<Option<Vec<f32>>>> {
        // Row i of a prompt predicts fed token i + 1.
        let mut gather_rows = Vec::new();
        let mut targets = Vec::new();
        for (request, row) in requests.iter().zip(rows) {
            if let Some(first) = row.prompt_start {
                let predicted = &request.tokens[request.cached_len + 1..request.prompt_len];
                gather_rows.extend(first..first + predicted.len() as u32);
                targets.extend_from_slice(predicted);
            }
        }
        let mut gathered = sampler::target_logprobs(logits, &gather_rows, &targets)?.into_iter();
        Ok(requests
            .iter()
            .zip(rows)
            .map(|(request, row)| {
                row.prompt_start.map(|_| {
                    let mut logprobs = vec![f32::NAN; request.cached_len + 1];
                    logprobs.extend(
                        gathered
                            .by_ref()
                            .take(request.prompt_len - request.cached_len - 1),
                    );
                    logprobs
                })
            })
            .collect())
    }
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        other => other.as_str(),
    }
}
