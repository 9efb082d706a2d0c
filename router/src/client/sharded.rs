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

    /// See [`ShardClient::prefill`]: with `cached_batch`, a mixed step.
    pub async fn prefill(
        &self,
        batch: Batch,
        cached_batch: Option<CachedBatch>,
    ) -> Result<StepResult> {
        self.on_all_shards(|mut client| {
            let batch = batch.clone();
            let cached_batch = cached_batch.clone();
            async move { client.prefill(batch, cached_batch).await }
        })
        .await
    }

    pub async fn decode(&self, batches: Vec<CachedBatch>, run_ahead: bool) -> Result<StepResult> {
        self.on_all_shards(|mut client| {
            let batches = batches.clone();
            async move { client.decode(batches, run_ahead).await }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proto::v3::{Request, StoppingCriteriaParameters};

    use super::*;
    use crate::client::fake_shard::{FakeShard, FakeShardConfig};

    async fn fake_shard(kv_capacity_tokens: u32) -> FakeShard {
        FakeShard::start(FakeShardConfig {
            block_size: 16,
            kv_capacity_tokens,
            decode_delay: Duration::ZERO,
            prefill_delay: Duration::ZERO,
        })
        .await
    }

    /// A master discovering one other shard.
    async fn two_shards() -> (ShardedClient, FakeShard, FakeShard) {
        let master = fake_shard(1024).await;
        let other = fake_shard(512).await;
        master.add_peer(&other);
        let client = ShardedClient::connect(&master.url()).await.unwrap();
        (client, master, other)
    }

    #[tokio::test]
    async fn discovers_the_other_shards_and_calls_them_all() {
        let (client, master, other) = two_shards().await;
        assert_eq!(client.shard_count(), 2);
        client.clear_cache(None).await.unwrap();
        assert_eq!(master.clear_calls(), 1);
        assert_eq!(other.clear_calls(), 1);
        let capacity = client.warmup(WarmupRequest::default()).await.unwrap();
        assert_eq!(capacity, 512, "the smallest KV cache bounds the model");
        assert_eq!(master.warmups().len(), 1);
        assert_eq!(other.warmups().len(), 1);
    }

    #[tokio::test]
    async fn one_failing_shard_fails_the_call() {
        let (client, master, _other) = two_shards().await;
        // Batch 5 exists on the master only: the other shard cannot filter it.
        let request = Request {
            id: 1,
            input_ids: vec![10, 11],
            slots: (16..32).collect(),
            blocks: vec![1],
            stopping_parameters: Some(StoppingCriteriaParameters {
                max_new_tokens: 4,
                ..Default::default()
            }),
            ..Default::default()
        };
        let batch = Batch {
            id: 5,
            requests: vec![request],
            size: 1,
            ..Default::default()
        };
        let mut master_only = ShardClient::connect(&master.path()).await.unwrap();
        master_only.prefill(batch, None).await.unwrap();
        let error = client.filter_batch(5, vec![1]).await.unwrap_err();
        assert!(error.to_string().contains("no batch 5"), "{error}");
    }

    fn one_request_batch(batch_id: u64, request_id: u64, max_new_tokens: u32) -> Batch {
        let first_block = 1 + request_id as u32;
        let request = Request {
            id: request_id,
            input_ids: vec![10, 11],
            slots: (first_block * 16..(first_block + 1) * 16).collect(),
            blocks: vec![first_block],
            stopping_parameters: Some(StoppingCriteriaParameters {
                max_new_tokens,
                ..Default::default()
            }),
            ..Default::default()
        };
        Batch {
            id: batch_id,
            requests: vec![request],
            size: 1,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_mixed_prefill_advances_the_cached_batch_and_merges_it_under_the_new_id() {
        use crate::client::fake_shard::FIRST_TOKEN;

        let shard = fake_shard(1024).await;
        let client = ShardedClient::connect(&shard.url()).await.unwrap();
        let (_, running, _) = client
            .prefill(one_request_batch(5, 1, 4), None)
            .await
            .unwrap();
        let running = running.unwrap();
        let (generations, merged, _) = client
            .prefill(one_request_batch(6, 2, 4), Some(running.clone()))
            .await
            .unwrap();
        let tokens: Vec<(u64, u32)> = generations
            .iter()
            .map(|g| (g.request_id, g.tokens.as_ref().unwrap().ids[0]))
            .collect();
        assert_eq!(
            tokens,
            vec![(1, FIRST_TOKEN + 1), (2, FIRST_TOKEN)],
            "the running request's second token, the new one's first"
        );
        let merged = merged.unwrap();
        assert_eq!((merged.id, merged.request_ids.clone()), (6, vec![1, 2]));
        assert_eq!(shard.cached_request_count(), 2);

        let error = client
            .prefill(one_request_batch(7, 3, 4), Some(running))
            .await
            .unwrap_err();
        assert!(error.to_string().contains("no batch 5"), "{error}");
        client
            .decode(vec![merged], false)
            .await
            .expect("the union decodes under the new id");
    }

    #[tokio::test]
    async fn an_unreachable_shard_is_named_in_the_error() {
        let error = ShardedClient::connect("unix:///nonexistent/shard-0")
            .await
            .unwrap_err();
        let message = error.to_string();
        assert!(message.contains("/nonexistent/shard-0"), "{message}");
    }
}
