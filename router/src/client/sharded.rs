//! Every shard of a model takes part in every step (tensor parallelism), so each
//! call goes to all of them at once and the master's answer is used.
//!
//! Every call has a deadline ([`Deadlines`]). A shard that misses one makes the group
//! stuck: the call fails naming the shards and the call, and every later call fails
//! at once without reaching the shards (a stuck group never answers again in a way
//! the router could trust: a collective may be half done).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use proto::v3::{Batch, CachedBatch, InfoResponse, WarmupRequest};
use tokio::sync::watch;

use super::deadlines::Deadlines;
use super::shard::StepResult;
use super::{ClientError, Result, ShardClient};

/// The call a stuck shard group did not answer in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StuckCall {
    /// Sockets of the shards past the deadline (with tensor parallelism the healthy
    /// ranks wait in a collective for the stuck one, so all of them may be).
    pub shards: Vec<String>,
    pub call: &'static str,
    pub deadline: Duration,
}

impl std::fmt::Display for StuckCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "shard {} did not answer {} within {:.1} s: the shard group is stuck",
            self.shards.join(", "),
            self.call,
            self.deadline.as_secs_f64()
        )
    }
}

#[derive(Debug, Clone)]
pub struct ShardedClient {
    /// The master first: its answers are the ones returned.
    clients: Vec<ShardClient>,
    deadlines: Deadlines,
    stuck: Arc<watch::Sender<Option<StuckCall>>>,
    steps_in_flight: Arc<AtomicUsize>,
}

/// Counts a Prefill or Decode as in flight while it lives.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(Arc::clone(count))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ShardedClient {
    /// Connects to the master shard and, through its ServiceDiscovery, to all the others.
    pub async fn connect(master_url: &str, deadlines: Deadlines) -> Result<Self> {
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
        Ok(Self {
            clients,
            deadlines,
            stuck: Arc::new(watch::channel(None).0),
            steps_in_flight: Arc::new(AtomicUsize::new(0)),
        })
    }

    pub fn shard_count(&self) -> usize {
        self.clients.len()
    }

    /// The call that made the group stuck, if one did.
    pub fn stuck(&self) -> Option<StuckCall> {
        self.stuck.borrow().clone()
    }

    /// Resolves once the group is stuck.
    pub async fn wait_stuck(&self) -> StuckCall {
        let mut stuck = self.stuck.subscribe();
        let found = stuck.wait_for(Option::is_some).await;
        found
            .ok()
            .and_then(|call| call.clone())
            .expect("the sender lives as long as self")
    }

    /// A Prefill or Decode is running on the shards (and will meet its deadline or
    /// make the group stuck).
    pub fn step_in_flight(&self) -> bool {
        self.steps_in_flight.load(Ordering::SeqCst) > 0
    }

    /// Runs `call` on every shard concurrently, each bounded by `deadline`, and returns
    /// their answers, the master's first; any shard's error fails the call, a missed
    /// deadline makes the group stuck.
    async fn on_all_shards<T, F, Fut>(
        &self,
        name: &'static str,
        deadline: Duration,
        call: F,
    ) -> Result<Vec<T>>
    where
        F: Fn(ShardClient) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        if let Some(stuck) = self.stuck() {
            return Err(ClientError::Stuck(stuck));
        }
        let results = join_all(self.clients.iter().cloned().map(|client| {
            let url = client.url().to_string();
            let answer = tokio::time::timeout(deadline, call(client));
            async move { answer.await.map_err(|_elapsed| url) }
        }))
        .await;
        let late: Vec<String> = results
            .iter()
            .filter_map(|r| r.as_ref().err().cloned())
            .collect();
        if !late.is_empty() {
            return Err(ClientError::Stuck(self.declare_stuck(late, name, deadline)));
        }
        let answers = results.into_iter().flatten().collect::<Result<Vec<T>>>()?;
        if answers.is_empty() {
            return Err(ClientError::NoShard);
        }
        Ok(answers)
    }

    /// The master's answer of [`Self::on_all_shards`].
    async fn master_answer<T, F, Fut>(
        &self,
        name: &'static str,
        deadline: Duration,
        call: F,
    ) -> Result<T>
    where
        F: Fn(ShardClient) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let answers = self.on_all_shards(name, deadline, call).await?;
        answers.into_iter().next().ok_or(ClientError::NoShard)
    }

    /// Records the first call that made the group stuck; later ones fail with it too.
    fn declare_stuck(
        &self,
        shards: Vec<String>,
        call: &'static str,
        deadline: Duration,
    ) -> StuckCall {
        let stuck = StuckCall {
            shards,
            call,
            deadline,
        };
        tracing::error!(shards = ?stuck.shards, call, "{stuck}");
        metrics::counter!("tgi_shard_stuck_total", "call" => call).increment(1);
        self.stuck.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            *current = Some(stuck.clone());
            true
        });
        stuck
    }

    pub async fn info(&self) -> Result<InfoResponse> {
        self.master_answer("Info", self.deadlines.control, |mut client| async move {
            client.info().await
        })
        .await
    }

    /// Bounded, but a late answer does not make the group stuck: a probe can arrive
    /// just as a long prefill starts and wait behind it. Steps have their own deadlines.
    pub async fn health(&self) -> Result<()> {
        if let Some(stuck) = self.stuck() {
            return Err(ClientError::Stuck(stuck));
        }
        let probes = join_all(
            self.clients
                .iter()
                .cloned()
                .map(|mut client| async move { client.health().await }),
        );
        match tokio::time::timeout(self.deadlines.health, probes).await {
            Ok(results) => results.into_iter().collect(),
            Err(_) => Err(ClientError::Call(format!(
                "a shard did not answer Health within {:.1} s",
                self.deadlines.health.as_secs_f64()
            ))),
        }
    }

    pub async fn clear_cache(&self, id: Option<u64>) -> Result<()> {
        self.master_answer(
            "ClearCache",
            self.deadlines.control,
            |mut client| async move { client.clear_cache(id).await },
        )
        .await
    }

    pub async fn filter_batch(
        &self,
        batch_id: u64,
        request_ids: Vec<u64>,
    ) -> Result<Option<CachedBatch>> {
        self.master_answer("FilterBatch", self.deadlines.control, |mut client| {
            let request_ids = request_ids.clone();
            async move { client.filter_batch(batch_id, request_ids).await }
        })
        .await
    }

    /// The smallest KV capacity over the shards: every shard must hold every token.
    pub async fn warmup(&self, request: WarmupRequest) -> Result<u32> {
        let capacities = self
            .on_all_shards("Warmup", self.deadlines.warmup, |mut client| {
                let request = request.clone();
                async move { client.warmup(request).await }
            })
            .await?;
        capacities.into_iter().min().ok_or(ClientError::NoShard)
    }

    /// See [`ShardClient::prefill`]: with `cached_batch`, a mixed step.
    pub async fn prefill(
        &self,
        batch: Batch,
        cached_batch: Option<CachedBatch>,
    ) -> Result<StepResult> {
        // Prompt tokens bound the work from above (cached prefixes only shorten it).
        let tokens = batch
            .requests
            .iter()
            .map(|r| r.input_ids.len())
            .sum::<usize>()
            + cached_batch.as_ref().map_or(0, |c| c.size as usize);
        let _in_flight = InFlight::new(&self.steps_in_flight);
        self.master_answer("Prefill", self.deadlines.step(tokens), |mut client| {
            let batch = batch.clone();
            let cached_batch = cached_batch.clone();
            async move { client.prefill(batch, cached_batch).await }
        })
        .await
    }

    pub async fn decode(&self, batches: Vec<CachedBatch>, run_ahead: bool) -> Result<StepResult> {
        let rows = batches.iter().map(|b| b.size as usize).sum();
        let _in_flight = InFlight::new(&self.steps_in_flight);
        self.master_answer("Decode", self.deadlines.step(rows), |mut client| {
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
            support_chunking: false,
        })
        .await
    }

    /// A master discovering one other shard.
    async fn two_shards() -> (ShardedClient, FakeShard, FakeShard) {
        let master = fake_shard(1024).await;
        let other = fake_shard(512).await;
        master.add_peer(&other);
        let client = ShardedClient::connect(&master.url(), Deadlines::default())
            .await
            .unwrap();
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
        let client = ShardedClient::connect(&shard.url(), Deadlines::default())
            .await
            .unwrap();
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
        let error = ShardedClient::connect("unix:///nonexistent/shard-0", Deadlines::default())
            .await
            .unwrap_err();
        let message = error.to_string();
        assert!(message.contains("/nonexistent/shard-0"), "{message}");
    }
}
