//! An in-process shard for tests: serves the real gRPC protocol on a temporary
//! unix socket and "generates" deterministic tokens (the k-th generated token
//! of every request is `FIRST_TOKEN + k`, text " w{k}"), so that the router's
//! scheduling can be tested end to end. It checks what a real shard relies on:
//! every request comes with enough slots, no KV block is written by two requests
//! (the blocks of a cached prefix, `cache_len`, are only read, and may be shared, as
//! may the whole prompt blocks of requests already prefilled),
//! and no forward pass carries more tokens than the warmup's `max_prefill_tokens`.
//!
//! A Prefill with a `cached_batch` is a "mixed" step, as a real shard runs it:
//! the cached batch's requests advance by one token in the same forward pass as
//! the new prompts, and the union stays cached under the new batch's id (the
//! cached batch's id is gone). With `support_chunking`, a request whose `chunk_len`
//! does not reach the end of its prompt gets no token and leaves the batch, as on a
//! real shard.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use proto::v3::text_generation_service_server::{
    TextGenerationService, TextGenerationServiceServer,
};
use proto::v3::*;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Response, Status};

pub const FIRST_TOKEN: u32 = 1000;
/// A prompt containing this token makes the prefill fail.
pub const POISON_PREFILL: u32 = 7_000_001;
/// A prompt containing this token makes every decode of its batch fail.
pub const POISON_DECODE: u32 = 7_000_002;

#[derive(Debug, Clone)]
pub struct FakeShardConfig {
    pub block_size: u32,
    /// What Warmup reports.
    pub kv_capacity_tokens: u32,
    /// How long every Decode takes, so that requests can join running batches.
    pub decode_delay: Duration,
    /// How long every Prefill takes (its "forward pass").
    pub prefill_delay: Duration,
    /// What Info reports; without it, a `chunk_len` is refused.
    pub support_chunking: bool,
}

#[derive(Debug, Clone)]
struct FakeRequest {
    id: u64,
    input_ids: Vec<u32>,
    generated: u32,
    max_new_tokens: u32,
    blocks: Vec<u32>,
    top_n_tokens: u32,
    /// What the answer reports as the seed: a sampled request's, as a real shard does.
    seed: Option<u64>,
}

/// A Prefill or Decode as the shard received it (failed ones included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardCall {
    Prefill {
        batch_id: u64,
        request_ids: Vec<u64>,
        /// Prompt tokens of the new requests to compute (not cached).
        prompt_tokens: u32,
        /// The batch decoded in the same forward pass (a mixed step), and its size.
        cached: Option<(u64, usize)>,
    },
    Decode {
        batch_ids: Vec<u64>,
    },
}

#[derive(Debug, Default)]
struct FakeState {
    batches: HashMap<u64, Vec<FakeRequest>>,
    warmups: Vec<WarmupRequest>,
    filter_calls: usize,
    /// What each ClearCache named (None: everything).
    clears: Vec<Option<u64>>,
    /// Every Prefill and Decode, in order.
    calls: Vec<ShardCall>,
    /// The other shards of the model, as ServiceDiscovery lists them.
    peer_urls: Vec<String>,
    /// When each Prefill arrived and when its answer was ready.
    prefill_times: Vec<(Instant, Instant)>,
}

/// Handle on a running fake shard; the socket is removed when it is dropped.
#[derive(Debug, Clone)]
pub struct FakeShard {
    config: FakeShardConfig,
    state: Arc<Mutex<FakeState>>,
    socket: Arc<SocketPath>,
}

#[derive(Debug)]
struct SocketPath(PathBuf);

impl Drop for SocketPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl FakeShard {
    /// Serves on a fresh socket in the temp dir, on the current tokio runtime.
    pub async fn start(config: FakeShardConfig) -> FakeShard {
        static NEXT_SOCKET: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "fake-shard-{}-{}.sock",
            std::process::id(),
            NEXT_SOCKET.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("binding the fake shard socket");
        let shard = FakeShard {
            config,
            state: Arc::default(),
            socket: Arc::new(SocketPath(path)),
        };
        let server = tonic::transport::Server::builder()
            .add_service(TextGenerationServiceServer::new(shard.clone()))
            .serve_with_incoming(UnixListenerStream::new(listener));
        tokio::spawn(server);
        shard
    }

    pub fn url(&self) -> String {
        format!("unix://{}", self.socket.0.display())
    }

    pub fn path(&self) -> String {
        self.socket.0.display().to_string()
    }

    /// Makes ServiceDiscovery list `peer` as another shard of the model.
    pub fn add_peer(&self, peer: &FakeShard) {
        self.lock().peer_urls.push(peer.url());
    }

    /// Requests the shard holds in its cached batches.
    pub fn cached_request_count(&self) -> usize {
        self.lock().batches.values().map(Vec::len).sum()
    }

    pub fn warmups(&self) -> Vec<WarmupRequest> {
        self.lock().warmups.clone()
    }

    /// When each Prefill arrived and when its answer was ready, in order.
    pub fn prefill_times(&self) -> Vec<(Instant, Instant)> {
        self.lock().prefill_times.clone()
    }

    pub fn filter_calls(&self) -> usize {
        self.lock().filter_calls
    }

    pub fn clear_calls(&self) -> usize {
        self.lock().clears.len()
    }

    /// What each ClearCache named, in order (None: every batch).
    pub fn clears(&self) -> Vec<Option<u64>> {
        self.lock().clears.clone()
    }

    /// Every Prefill and Decode received, in order.
    pub fn calls(&self) -> Vec<ShardCall> {
        self.lock().calls.clone()
    }

    fn lock(&self) -> MutexGuard<'_, FakeState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Generates the next token of every request; returns the generations and
    /// the requests of the batch left cached.
    fn step(requests: Vec<FakeRequest>) -> (Vec<Generation>, Vec<FakeRequest>) {
        let mut generations = Vec::new();
        let mut requests_after = Vec::new();
        let mut any_running = false;
        for mut request in requests {
            let token = FIRST_TOKEN + request.generated;
            request.generated += 1;
            let finished = request.generated >= request.max_new_tokens;
            let top_tokens = (request.top_n_tokens > 0)
                .then(|| Tokens {
                    ids: (0..request.top_n_tokens).map(|k| token + k).collect(),
                    logprobs: (0..request.top_n_tokens).map(|k| -(k as f32)).collect(),
                    texts: (0..request.top_n_tokens)
                        .map(|k| format!(" w{}", token + k - FIRST_TOKEN))
                        .collect(),
                    is_special: vec![false; request.top_n_tokens as usize],
                })
                .into_iter()
                .collect();
            generations.push(Generation {
                request_id: request.id,
                prefill_tokens: None,
                tokens: Some(Tokens {
                    ids: vec![token],
                    logprobs: vec![-0.5],
                    texts: vec![format!(" w{}", token - FIRST_TOKEN)],
                    is_special: vec![false],
                }),
                top_tokens,
                generated_text: finished.then(|| GeneratedText {
                    text: (0..request.generated).map(|k| format!(" w{k}")).collect(),
                    generated_tokens: request.generated,
                    finish_reason: FinishReason::Length as i32,
                    seed: request.seed,
                }),
            });
            any_running |= !finished;
            requests_after.push(request);
        }
        // Like TGI's shards, finished requests stay in the batch until the
        // router filters them out; a batch where all finished is dropped.
        let running = if any_running {
            requests_after
        } else {
            Vec::new()
        };
        (generations, running)
    }

    /// Caches the still running requests as batch `id`.
    fn cache(state: &mut FakeState, id: u64, running: Vec<FakeRequest>) -> Option<CachedBatch> {
        if running.is_empty() {
            return None;
        }
        let batch = cached_batch(id, &running);
        state.batches.insert(id, running);
        Some(batch)
    }
}

/// The KV blocks of live requests: those they write, those of cached prefixes they read.
#[derive(Debug, Default)]
struct UsedBlocks {
    written: HashSet<u32>,
    read: HashSet<u32>,
}

impl UsedBlocks {
    fn of(state: &FakeState, block_size: u32) -> Self {
        let mut used = Self::default();
        for request in state.batches.values().flatten() {
            // Prefilled: its whole prompt blocks are only read from now on.
            let prompt_blocks = (request.input_ids.len() / block_size as usize).min(request.blocks.len());
            let (read, written) = request.blocks.split_at(prompt_blocks);
            used.read.extend(read);
            used.written.extend(written);
        }
        used
    }
}

/// A request needs a slot for each of its tokens, in blocks no other request writes
/// (block 0 is reserved) but those wholly inside its cached prefix, which may be shared;
/// the last prompt token is always computed.
fn check_placement(
    request: &Request,
    tokens: usize,
    block_size: u32,
    used: &mut UsedBlocks,
) -> Result<(), Status> {
    if request.slots.len() < tokens {
        return Err(Status::invalid_argument(format!(
            "request {} has {} slots for {tokens} tokens",
            request.id,
            request.slots.len()
        )));
    }
    let cache_len = request.cache_len.unwrap_or(0);
    if cache_len as usize >= request.input_ids.len() {
        return Err(Status::invalid_argument(format!(
            "request {}: cache_len {cache_len} leaves no prompt token to compute",
            request.id
        )));
    }
    let cached_blocks = (cache_len / block_size) as usize;
    let (read, written) = request.blocks.split_at(cached_blocks.min(request.blocks.len()));
    for block in read {
        if *block == 0 || used.written.contains(block) {
            return Err(Status::invalid_argument(format!(
                "cached block {block} is reserved or written by another request"
            )));
        }
        used.read.insert(*block);
    }
    for block in written {
        if *block == 0 || used.read.contains(block) || !used.written.insert(*block) {
            return Err(Status::invalid_argument(format!(
                "block {block} is reserved or in use"
            )));
        }
    }
    Ok(())
}

fn cached_batch(id: u64, requests: &[FakeRequest]) -> CachedBatch {
    CachedBatch {
        id,
        request_ids: requests.iter().map(|r| r.id).collect(),
        size: requests.len() as u32,
        max_tokens: requests
            .iter()
            .map(|r| r.input_ids.len() as u32 + r.max_new_tokens)
            .sum(),
        current_tokens: requests
            .iter()
            .map(|r| (r.input_ids.len() as u32 + r.generated) as u64)
            .sum(),
    }
}

/// Prompt tokens a prefill computes for the request: its chunk, or the uncached rest.
fn computed_tokens(request: &Request) -> u32 {
    let uncached = request.input_ids.len() as u32 - request.cache_len.unwrap_or(0).min(request.input_ids.len() as u32);
    request.chunk_len.map_or(uncached, |chunk| chunk.min(uncached))
}

#[tonic::async_trait]
impl TextGenerationService for FakeShard {
    async fn info(&self, _: tonic::Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(InfoResponse {
            dtype: "float32".to_string(),
            device_type: "cpu".to_string(),
            attention_impl: "paged".to_string(),
            block_size: self.config.block_size,
            support_chunking: self.config.support_chunking,
            model_type: "fake".to_string(),
            max_position_embeddings: 4096,
            world_size: 1,
            quantization: "none".to_string(),
            ..Default::default()
        }))
    }

    async fn health(
        &self,
        _: tonic::Request<HealthRequest>,
    ) -> Result<Response<HealthResponse>, Status> {
        Ok(Response::new(HealthResponse {}))
    }

    async fn service_discovery(
        &self,
        _: tonic::Request<ServiceDiscoveryRequest>,
    ) -> Result<Response<ServiceDiscoveryResponse>, Status> {
        let mut urls = vec![self.url()];
        urls.extend(self.lock().peer_urls.iter().cloned());
        Ok(Response::new(ServiceDiscoveryResponse { urls }))
    }

    async fn clear_cache(
        &self,
        request: tonic::Request<ClearCacheRequest>,
    ) -> Result<Response<ClearCacheResponse>, Status> {
        let mut state = self.lock();
        let id = request.into_inner().id;
        state.clears.push(id);
        match id {
            Some(id) => {
                state.batches.remove(&id);
            }
            None => state.batches.clear(),
        }
        Ok(Response::new(ClearCacheResponse {}))
    }

    async fn filter_batch(
        &self,
        request: tonic::Request<FilterBatchRequest>,
    ) -> Result<Response<FilterBatchResponse>, Status> {
        let request = request.into_inner();
        let mut state = self.lock();
        state.filter_calls += 1;
        let keep: HashSet<u64> = request.request_ids.into_iter().collect();
        let requests = state
            .batches
            .get_mut(&request.batch_id)
            .ok_or_else(|| Status::not_found(format!("no batch {}", request.batch_id)))?;
        requests.retain(|r| keep.contains(&r.id));
        let batch = cached_batch(request.batch_id, requests);
        Ok(Response::new(FilterBatchResponse { batch: Some(batch) }))
    }

    async fn warmup(
        &self,
        request: tonic::Request<WarmupRequest>,
    ) -> Result<Response<WarmupResponse>, Status> {
        let request = request.into_inner();
        let mut used_blocks = UsedBlocks::default();
        for prompt in request.batch.iter().flat_map(|b| b.requests.iter()) {
            // Warmup only prefills: the prompts need slots, not the tokens to generate.
            check_placement(prompt, prompt.input_ids.len(), self.config.block_size, &mut used_blocks)?;
        }
        self.lock().warmups.push(request);
        Ok(Response::new(WarmupResponse {
            max_supported_total_tokens: self.config.kv_capacity_tokens,
        }))
    }

    async fn prefill(
        &self,
        request: tonic::Request<PrefillRequest>,
    ) -> Result<Response<PrefillResponse>, Status> {
        let arrived = Instant::now();
        // Even a zero sleep waits for the timer's next millisecond tick.
        if !self.config.prefill_delay.is_zero() {
            tokio::time::sleep(self.config.prefill_delay).await;
        }
        let PrefillRequest {
            batch,
            cached_batch,
        } = request.into_inner();
        let batch = batch.ok_or_else(|| Status::invalid_argument("no batch"))?;
        let mut state = self.lock();
        let cached_size = match &cached_batch {
            Some(cached) => Some(
                state
                    .batches
                    .get(&cached.id)
                    .ok_or_else(|| Status::not_found(format!("no batch {}", cached.id)))?
                    .len(),
            ),
            None => None,
        };
        if !self.config.support_chunking && batch.requests.iter().any(|r| r.chunk_len.is_some()) {
            return Err(Status::invalid_argument("chunk_len is not supported"));
        }
        let prompt_tokens: u32 = batch.requests.iter().map(computed_tokens).sum();
        state.calls.push(ShardCall::Prefill {
            batch_id: batch.id,
            request_ids: batch.requests.iter().map(|r| r.id).collect(),
            prompt_tokens,
            cached: cached_batch
                .as_ref()
                .zip(cached_size)
                .map(|(c, n)| (c.id, n)),
        });
        if state.batches.contains_key(&batch.id) {
            return Err(Status::invalid_argument(format!(
                "batch {} already exists",
                batch.id
            )));
        }
        // One token per cached request rides along with the prompts.
        let forward_tokens = prompt_tokens + cached_size.unwrap_or(0) as u32;
        if let Some(warmup) = state.warmups.last() {
            if forward_tokens > warmup.max_prefill_tokens {
                return Err(Status::invalid_argument(format!(
                    "a forward pass of {forward_tokens} tokens, more than the {} of the warmup",
                    warmup.max_prefill_tokens
                )));
            }
        }
        let mut used_blocks = UsedBlocks::of(&state, self.config.block_size);
        let mut new_requests = Vec::new();
        let mut prefill_tokens = HashMap::new();
        for request in batch.requests {
            let max_new_tokens = request
                .stopping_parameters
                .as_ref()
                .map_or(0, |s| s.max_new_tokens);
            check_placement(
                &request,
                request.input_ids.len() + max_new_tokens as usize,
                self.config.block_size,
                &mut used_blocks,
            )?;
            let cached = request.cache_len.unwrap_or(0);
            if cached + computed_tokens(&request) < request.input_ids.len() as u32 {
                // A chunk of the prompt: the router sends the rest later.
                continue;
            }
            if request.prefill_logprobs {
                prefill_tokens.insert(
                    request.id,
                    Tokens {
                        ids: request.input_ids.clone(),
                        logprobs: vec![-1.0; request.input_ids.len()],
                        texts: request
                            .input_ids
                            .iter()
                            .map(|id| format!("<{id}>"))
                            .collect(),
                        is_special: vec![false; request.input_ids.len()],
                    },
                );
            }
            new_requests.push(FakeRequest {
                id: request.id,
                input_ids: request.input_ids,
                generated: 0,
                max_new_tokens,
                blocks: request.blocks,
                top_n_tokens: request.top_n_tokens,
                seed: request
                    .parameters
                    .as_ref()
                    .and_then(|p| p.do_sample.then_some(p.seed)),
            });
        }
        // As a real shard: the cached requests first, then the new ones.
        let mut requests = cached_batch
            .and_then(|cached| state.batches.remove(&cached.id))
            .unwrap_or_default();
        let poisoned = if new_requests
            .iter()
            .any(|r| r.input_ids.contains(&POISON_PREFILL))
        {
            Some("poisoned prefill")
        } else if requests
            .iter()
            .any(|r| r.input_ids.contains(&POISON_DECODE))
        {
            Some("poisoned decode")
        } else {
            None
        };
        requests.extend(new_requests);
        if let Some(poison) = poisoned {
            // As a real shard, what the failed step concerned stays cached (under
            // the new id): the router decides to clear it.
            state.batches.insert(batch.id, requests);
            return Err(Status::internal(poison));
        }
        let (mut generations, running) = Self::step(requests);
        for generation in &mut generations {
            generation.prefill_tokens = prefill_tokens.remove(&generation.request_id);
        }
        let batch = Self::cache(&mut state, batch.id, running);
        let forward_ns = arrived.elapsed().as_nanos() as u64;
        state.prefill_times.push((arrived, Instant::now()));
        Ok(Response::new(PrefillResponse {
            generations,
            batch,
            forward_ns,
            total_ns: forward_ns,
            ..Default::default()
        }))
    }

    async fn decode(
        &self,
        request: tonic::Request<DecodeRequest>,
    ) -> Result<Response<DecodeResponse>, Status> {
        tokio::time::sleep(self.config.decode_delay).await;
        let batches = request.into_inner().batches;
        let first_id = batches
            .first()
            .map(|b| b.id)
            .ok_or_else(|| Status::invalid_argument("no batch to decode"))?;
        let mut state = self.lock();
        state.calls.push(ShardCall::Decode {
            batch_ids: batches.iter().map(|b| b.id).collect(),
        });
        let mut requests = Vec::new();
        for batch in &batches {
            let cached = state
                .batches
                .remove(&batch.id)
                .ok_or_else(|| Status::not_found(format!("no batch {}", batch.id)))?;
            requests.extend(cached);
        }
        if requests
            .iter()
            .any(|r| r.input_ids.contains(&POISON_DECODE))
        {
            // As a real shard, the batch stays cached: the router decides to clear it.
            state.batches.insert(first_id, requests);
            return Err(Status::internal("poisoned decode"));
        }
        let (generations, running) = Self::step(requests);
        let batch = Self::cache(&mut state, first_id, running);
        Ok(Response::new(DecodeResponse {
            generations,
            batch,
            ..Default::default()
        }))
    }
}
