//! An in-process shard for the benchmark loop's tests: serves the gRPC protocol on a
//! temporary unix socket, generates token 0 for every request until its max_new_tokens,
//! and checks what a real shard relies on: every KV block exists, no block is used by
//! two live requests, and every request has a slot for each of its tokens.

use proto::v3::text_generation_service_server::{
    TextGenerationService, TextGenerationServiceServer,
};
use proto::v3::*;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request as GrpcRequest, Response, Status};

pub const BLOCK_SIZE: u32 = 16;

/// Remaining tokens to generate and blocks of one live request.
struct Live {
    id: u64,
    remaining: u32,
    blocks: Vec<u32>,
}

#[derive(Default)]
pub struct Calls {
    pub warmups: usize,
    /// Requests of each Prefill call.
    pub prefill_sizes: Vec<usize>,
    /// Cached batches of each Decode call.
    pub decode_batch_counts: Vec<usize>,
}

#[derive(Clone)]
pub struct FakeShard {
    /// KV blocks the cache holds after Warmup, block 0 included.
    num_blocks: u32,
    batches: Arc<Mutex<HashMap<u64, Vec<Live>>>>,
    pub calls: Arc<Mutex<Calls>>,
}

impl FakeShard {
    /// Serves on `socket` on the current tokio runtime.
    pub fn start(socket: &Path, num_blocks: u32) -> FakeShard {
        let shard = FakeShard {
            num_blocks,
            batches: Default::default(),
            calls: Default::default(),
        };
        let listener = UnixListener::bind(socket).expect("binding the fake shard's socket");
        let server = tonic::transport::Server::builder()
            .add_service(TextGenerationServiceServer::new(shard.clone()))
            .serve_with_incoming(UnixListenerStream::new(listener));
        tokio::spawn(server);
        shard
    }

    fn check_blocks(&self, batch: &Batch) -> Result<(), Status> {
        let batches = self.batches.lock().unwrap();
        let mut used: HashSet<u32> = batches
            .values()
            .flatten()
            .flat_map(|r| r.blocks.iter().copied())
            .collect();
        for request in &batch.requests {
            let max_new = request
                .stopping_parameters
                .as_ref()
                .map_or(0, |s| s.max_new_tokens);
            if request.slots.len() != request.input_ids.len() + max_new as usize {
                return Err(Status::invalid_argument(format!(
                    "request {}: wrong slot count",
                    request.id
                )));
            }
            for &block in &request.blocks {
                if block == 0 || block >= self.num_blocks || !used.insert(block) {
                    return Err(Status::invalid_argument(format!(
                        "request {}: bad block {block}",
                        request.id
                    )));
                }
            }
        }
        Ok(())
    }

    /// One generated token per request; finished requests leave the batch.
    fn step(requests: &mut Vec<Live>) -> Vec<Generation> {
        let generations = requests
            .iter_mut()
            .map(|request| {
                request.remaining -= 1;
                Generation {
                    request_id: request.id,
                    tokens: Some(Tokens {
                        ids: vec![0],
                        logprobs: vec![0.0],
                        texts: vec!["a".into()],
                        is_special: vec![false],
                    }),
                    generated_text: (request.remaining == 0).then(GeneratedText::default),
                    ..Default::default()
                }
            })
            .collect();
        requests.retain(|request| request.remaining > 0);
        generations
    }

    fn cached(
        id: u64,
        requests: Vec<Live>,
        batches: &mut HashMap<u64, Vec<Live>>,
    ) -> Option<CachedBatch> {
        if requests.is_empty() {
            return None;
        }
        let cached = CachedBatch {
            id,
            request_ids: requests.iter().map(|r| r.id).collect(),
            size: requests.len() as u32,
            ..Default::default()
        };
        batches.insert(id, requests);
        Some(cached)
    }
}

#[tonic::async_trait]
impl TextGenerationService for FakeShard {
    async fn info(&self, _: GrpcRequest<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(InfoResponse {
            dtype: "float32".into(),
            device_type: "cpu".into(),
            block_size: BLOCK_SIZE,
            model_type: "fake".into(),
            ..Default::default()
        }))
    }

    async fn health(
        &self,
        _: GrpcRequest<HealthRequest>,
    ) -> Result<Response<HealthResponse>, Status> {
        Ok(Response::new(HealthResponse {}))
    }

    async fn service_discovery(
        &self,
        _: GrpcRequest<ServiceDiscoveryRequest>,
    ) -> Result<Response<ServiceDiscoveryResponse>, Status> {
        Ok(Response::new(ServiceDiscoveryResponse { urls: Vec::new() }))
    }

    async fn clear_cache(
        &self,
        request: GrpcRequest<ClearCacheRequest>,
    ) -> Result<Response<ClearCacheResponse>, Status> {
        let mut batches = self.batches.lock().unwrap();
        match request.into_inner().id {
            Some(id) => {
                batches.remove(&id);
            }
            None => batches.clear(),
        }
        Ok(Response::new(ClearCacheResponse {}))
    }

    async fn filter_batch(
        &self,
        _: GrpcRequest<FilterBatchRequest>,
    ) -> Result<Response<FilterBatchResponse>, Status> {
        Err(Status::unimplemented("the benchmark never filters"))
    }

    async fn warmup(
        &self,
        request: GrpcRequest<WarmupRequest>,
    ) -> Result<Response<WarmupResponse>, Status> {
        let batch = request.into_inner().batch.unwrap_or_default();
        self.check_blocks(&batch)?;
        self.calls.lock().unwrap().warmups += 1;
        Ok(Response::new(WarmupResponse {
            max_supported_total_tokens: (self.num_blocks - 1) * BLOCK_SIZE,
        }))
    }

    async fn prefill(
        &self,
        request: GrpcRequest<PrefillRequest>,
    ) -> Result<Response<PrefillResponse>, Status> {
        let batch = request.into_inner().batch.unwrap_or_default();
        self.check_blocks(&batch)?;
        self.calls
            .lock()
            .unwrap()
            .prefill_sizes
            .push(batch.requests.len());
        let mut requests: Vec<Live> = batch
            .requests
            .iter()
            .map(|r| Live {
                id: r.id,
                remaining: r
                    .stopping_parameters
                    .as_ref()
                    .map_or(1, |s| s.max_new_tokens),
                blocks: r.blocks.clone(),
            })
            .collect();
        let generations = Self::step(&mut requests);
        let batch = Self::cached(batch.id, requests, &mut self.batches.lock().unwrap());
        Ok(Response::new(PrefillResponse {
            generations,
            batch,
            ..Default::default()
        }))
    }

    async fn decode(
        &self,
        request: GrpcRequest<DecodeRequest>,
    ) -> Result<Response<DecodeResponse>, Status> {
        let cached = request.into_inner().batches;
        let id = cached
            .first()
            .ok_or_else(|| Status::invalid_argument("decode without batches"))?
            .id;
        self.calls
            .lock()
            .unwrap()
            .decode_batch_counts
            .push(cached.len());
        let mut batches = self.batches.lock().unwrap();
        let mut requests = Vec::new();
        for batch in &cached {
            requests.extend(
                batches
                    .remove(&batch.id)
                    .ok_or_else(|| Status::not_found("unknown batch"))?,
            );
        }
        let generations = Self::step(&mut requests);
        let batch = Self::cached(id, requests, &mut batches);
        Ok(Response::new(DecodeResponse {
            generations,
            batch,
            ..Default::default()
        }))
    }
}
