//! Every shard of a model takes part in every step (tensor parallelism), so each
//! call goes to all of them at once and the master's answer is used.

use std::future::Future;

use futures::future::join_all;
use proto::v3::{Batch, CachedBatch, InfoResponse, WarmupRequest};

use super::shard::StepResult;
use super::{ClientError, Result, ShardClient};

#[derive(Debug, Clone)]
pub struct ShardedClient {
    /// The master first: its answers are the ones returned.
    clients: Vec<ShardClient>,
}

impl ShardedClient {
    /// Connects to the master shard and, through its ServiceDiscovery, to all the others.
    pub async fn connect(master_url: &str) -> Result<Self> {
        let mut master = ShardClient::connect(master_url).await?;
        let urls = master.service_discovery().await?;
        let master_path = master_url.strip_prefix("unix://").unwrap_or(master_url);
        let mut clients = vec![master];
        for url in urls {
            // Discovery lists every shard, the master included.
            if url.strip_prefix("unix://").unwrap_or(&url) != master_path {
                clients.push(ShardClient::connect(&url).await?);
            }
        }
        Ok(Self { clients })
    }

    pub fn shard_count(&self) -> usize {
        self.clients.len()
    }

    /// Runs `call` on every shard concurrently; any shard's error fails the call.
    async fn on_all_shards<T, F, Fut>(&self, call: F) -> Result<T>
    where
        F: Fn(ShardClient) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let results = join_all(self.clients.iter().cloned().map(call)).await;
        let mut first = None;
        for result in results {
            let value = result?;
            first.get_or_insert(value);
        }
        first.ok_or(ClientError::NoShard)
    }

    pub async fn info(&self) -> Result<InfoResponse> {
        self.on_all_shards(|mut client| async move { client.info().await })
            .await
    }

    pub async fn health(&self) -> Result<()> {
        self.on_all_shards(|mut client| async move { client.health().await })
            .await
    }

    pub async fn clear_cache(&self, id: Option<u64>) -> Result<()> {
        self.on_all_shards(|mut client| async move { client.clear_cache(id).await })
            .await
    }

    pub async fn filter_batch(
        &self,
        batch_id: u64,
        request_ids: Vec<u64>,
    ) -> Result<Option<CachedBatch>> {
        self.on_all_shards(|mut client| {
            let request_ids = request_ids.clone();
            async move { client.filter_batch(batch_id, request_ids).await }
        })
        .await
    }

    /// The smallest KV capacity over the shards: every shard must hold every token.
    pub async fn warmup(&self, request: WarmupRequest) -> Result<u32> {
        let results = join_all(self.clients.iter().cloned().map(|mut client| {
            let request = request.clone();
            async move { client.warmup(request).await }
        }))
        .await;
        let mut capacity: Option<u32> = None;
        for result in results {
            let tokens = result?;
            capacity = Some(capacity.map_or(tokens, |c| c.min(tokens)));
        }
        capacity.ok_or(ClientError::NoShard)
    }

    pub async fn prefill(&self, batch: Batch) -> Result<StepResult> {
        self.on_all_shards(|mut client| {
            let batch = batch.clone();
            async move { client.prefill(batch).await }
        })
        .await
    }

    pub async fn decode(&self, batches: Vec<CachedBatch>) -> Result<StepResult> {
        self.on_all_shards(|mut client| {
            let batches = batches.clone();
            async move { client.decode(batches).await }
        })
        .await
    }
}
