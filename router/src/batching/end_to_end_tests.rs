//! The whole scheduler (Infer, queue, batching loop, sharded client) against an
//! in-process fake shard over a real unix socket.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::queue::tests::request;
use crate::client::fake_shard::{
    FakeShard, FakeShardConfig, ShardCall, FIRST_TOKEN, POISON_DECODE, POISON_PREFILL,
};
use crate::client::Deadlines;
use crate::infer::{Infer, SchedulerConfig, ShardSummary};
use crate::infer_types::{FinishReason, InferError, InferStreamResponse, ValidGenerateRequest};

const BLOCK_SIZE: u32 = 16;

fn config() -> SchedulerConfig {
    SchedulerConfig {
        max_concurrent_requests: 16,
        max_batch_prefill_tokens: 128,
        max_batch_total_tokens: None,
        max_batch_size: None,
        waiting_served_ratio: 0.3,
        max_waiting_tokens: 20,
        max_input_tokens: 64,
        max_total_tokens: 128,
        // Tests of prefix caching turn it on: the prompts of `request` share their tokens.
        prefix_caching: false,
    }
}

fn shard_config(kv_blocks: u32) -> FakeShardConfig {
    FakeShardConfig {
        block_size: BLOCK_SIZE,
        kv_capacity_tokens: kv_blocks * BLOCK_SIZE,
        decode_delay: Duration::from_millis(5),
        prefill_delay: Duration::ZERO,
        support_chunking: false,
    }
}

async fn start(kv_blocks: u32, config: SchedulerConfig) -> (Infer, ShardSummary, FakeShard) {
    start_with(shard_config(kv_blocks), config).await
}

async fn start_with(shard: FakeShardConfig, config: SchedulerConfig) -> (Infer, ShardSummary, FakeShard) {
    let shard = FakeShard::start(shard).await;
    let (infer, summary) = Infer::connect(&shard.path(), config, Deadlines::default()).await.unwrap();
    (infer, summary, shard)
}

async fn within_seconds<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .expect("timed out")
}

fn with_input(input_ids: Vec<u32>, max_new_tokens: u32) -> ValidGenerateRequest {
    ValidGenerateRequest {
        input_ids: Arc::new(input_ids),
        ..request(1, max_new_tokens)
    }
}

fn prefill(
    batch_id: u64,
    request_ids: Vec<u64>,
    prompt_tokens: u32,
    cached: Option<(u64, usize)>,
) -> ShardCall {
    ShardCall::Prefill {
        batch_id,
        request_ids,
        prompt_tokens,
        cached,
    }
}

fn decode(batch_ids: Vec<u64>) -> ShardCall {
    ShardCall::Decode { batch_ids }
}

fn is_mixed(call: &ShardCall) -> bool {
    matches!(
        call,
        ShardCall::Prefill {
            cached: Some(_),
            ..
        }
    )
}

/// Checks a whole stream: `max_new_tokens` tokens, the k-th being the fake
/// shard's k-th, then the end.
fn assert_complete(responses: &[Result<InferStreamResponse, InferError>], max_new_tokens: u32) {
    assert_eq!(responses.len(), max_new_tokens as usize, "{responses:?}");
    let mut ids = Vec::new();
    for (index, response) in responses.iter().enumerate() {
        match response {
            Ok(InferStreamResponse::Intermediate { token, .. }) if index + 1 < responses.len() => {
                ids.push(token.id)
            }
            Ok(InferStreamResponse::End {
                token,
                generated_text,
                ..
            }) if index + 1 == responses.len() => {
                ids.push(token.id);
                assert_eq!(generated_text.generated_tokens, max_new_tokens);
                let text: String = (0..max_new_tokens).map(|k| format!(" w{k}")).collect();
                assert_eq!(generated_text.text, text);
            }
            other => panic!("unexpected response {index}: {other:?}"),
        }
    }
    let expected: Vec<u32> = (0..max_new_tokens).map(|k| FIRST_TOKEN + k).collect();
    assert_eq!(ids, expected, "every token once, in order");
}

#[tokio::test]
async fn connects_warms_up_and_generates() {
    let (infer, summary, shard) = start(64, config()).await;
    assert_eq!(summary.max_batch_total_tokens, 64 * BLOCK_SIZE);
    assert_eq!(summary.info.block_size, BLOCK_SIZE);

    let warmup = &shard.warmups()[0];
    let batch = warmup.batch.as_ref().unwrap();
    assert_eq!(
        batch.requests.len(),
        2,
        "128 prefill tokens in prompts of at most 64"
    );
    for request in &batch.requests {
        assert_eq!(request.input_ids.len(), 64);
        assert_eq!(request.slots.len(), 64);
        assert_eq!(
            request.stopping_parameters.as_ref().unwrap().max_new_tokens,
            64
        );
    }
    let blocks: Vec<u32> = batch
        .requests
        .iter()
        .flat_map(|r| r.blocks.clone())
        .collect();
    assert_eq!(
        blocks,
        (1..=8).collect::<Vec<_>>(),
        "prompts laid out from block 1"
    );
    assert_eq!(warmup.max_batch_total_tokens, None);

    let response = within_seconds(infer.generate(request(5, 4))).await.unwrap();
    let ids: Vec<u32> = response.tokens.iter().map(|t| t.id).collect();
    assert_eq!(ids, (0..4).map(|k| FIRST_TOKEN + k).collect::<Vec<_>>());
    assert_eq!(response.generated_text.text, " w0 w1 w2 w3");
    assert_eq!(response.generated_text.generated_tokens, 4);
    assert_eq!(response.generated_text.finish_reason, FinishReason::Length);
    assert_eq!(response.input_length, 5);
    assert_eq!(shard.cached_request_count(), 0);
    assert!(infer.health().await);
}

#[tokio::test]
async fn streams_prompt_details_then_tokens_then_the_end() {
    let (infer, _, _shard) = start(64, config()).await;
    let mut request = request(3, 3);
    request.decoder_input_details = true;
    request.top_n_tokens = 2;
    let (_permit, stream) = infer.generate_stream(request).unwrap();
    let responses: Vec<_> = within_seconds(stream.collect::<Vec<_>>()).await;
    assert_eq!(responses.len(), 4);
    match &responses[0] {
        Ok(InferStreamResponse::Prefill(tokens)) => assert_eq!(tokens.len(), 3),
        other => panic!("expected the prompt tokens first, got {other:?}"),
    }
    for response in &responses[1..3] {
        match response {
            Ok(InferStreamResponse::Intermediate { top_tokens, .. }) => {
                assert_eq!(top_tokens.len(), 2)
            }
            other => panic!("expected an intermediate token, got {other:?}"),
        }
    }
    match &responses[3] {
        Ok(InferStreamResponse::End {
            token,
            generated_text,
            ..
        }) => {
            assert_eq!(token.id, FIRST_TOKEN + 2);
            assert_eq!(generated_text.generated_tokens, 3);
        }
        other => panic!("expected the end, got {other:?}"),
    }
}

#[tokio::test]
async fn a_joining_request_is_prefilled_in_one_mixed_step_with_the_running_decode() {
    let (infer, _, shard) = start(64, config()).await;
    let (_permit, mut long) = infer.generate_stream(request(10, 60)).unwrap();
    // The long request is decoding once its second token arrives.
    let mut long_responses = Vec::new();
    for _ in 0..2 {
        long_responses.push(within_seconds(long.next()).await.unwrap());
    }
    let short = within_seconds(infer.generate(request(10, 5)))
        .await
        .unwrap();
    let short_ids: Vec<u32> = short.tokens.iter().map(|t| t.id).collect();
    assert_eq!(
        short_ids,
        (0..5).map(|k| FIRST_TOKEN + k).collect::<Vec<_>>()
    );
    long_responses.extend(within_seconds(long.collect::<Vec<_>>()).await);
    assert_complete(&long_responses, 60);

    let calls = shard.calls();
    assert_eq!(calls[0], prefill(0, vec![0], 10, None));
    let mixed: Vec<usize> = (0..calls.len()).filter(|&i| is_mixed(&calls[i])).collect();
    assert_eq!(mixed.len(), 1, "one join, one mixed step: {calls:?}");
    let joined_at = mixed[0];
    assert!(joined_at >= 2, "joined at call {joined_at}");
    assert_eq!(
        calls[joined_at],
        prefill(1, vec![1], 10, Some((0, 1))),
        "the short request's prefill carries the running batch"
    );
    assert!(
        calls[1..joined_at].iter().all(|c| *c == decode(vec![0])),
        "{calls:?}"
    );
    assert!(
        calls[joined_at + 1..].iter().all(|c| *c == decode(vec![1])),
        "the union goes on alone, under the new batch's id: {calls:?}"
    );
    assert_eq!(
        calls.len(),
        60,
        "every forward pass advanced the long request: no separate prefill or decode"
    );
    assert!(
        shard.filter_calls() > 0,
        "the finished short request was filtered out"
    );
    assert_eq!(shard.cached_request_count(), 0);
}

#[tokio::test]
async fn requests_joining_at_many_steps_get_exactly_their_tokens_in_order() {
    let (infer, _, shard) = start(64, config()).await;
    let mut streams = Vec::new();
    for i in 0..12u32 {
        let max_new_tokens = 3 + (i * 7) % 20;
        let (permit, stream) = infer
            .generate_stream(request(4 + i as usize, max_new_tokens))
            .unwrap();
        streams.push((max_new_tokens, permit, stream));
        // About two decode steps: the next one joins a running batch.
        tokio::time::sleep(Duration::from_millis(12)).await;
    }
    for (max_new_tokens, _permit, stream) in streams {
        let responses: Vec<_> = within_seconds(stream.collect::<Vec<_>>()).await;
        assert_complete(&responses, max_new_tokens);
    }
    let calls = shard.calls();
    let mixed = calls.iter().filter(|c| is_mixed(c)).count();
    assert!(mixed >= 2, "requests joined running batches: {calls:?}");
    for call in &calls {
        match call {
            ShardCall::Prefill {
                prompt_tokens,
                cached: Some((_, running)),
                ..
            } => assert!(
                prompt_tokens + *running as u32 <= 128,
                "a mixed forward pass within max_batch_prefill_tokens: {call:?}"
            ),
            ShardCall::Decode { batch_ids } => assert_eq!(batch_ids.len(), 1, "{calls:?}"),
            ShardCall::Prefill { cached: None, .. } => {}
        }
    }
    assert_eq!(shard.cached_request_count(), 0);
}

#[tokio::test]
async fn a_join_too_large_to_share_the_pass_is_prefilled_alone_then_decoded_together() {
    // The fake shard refuses a forward pass larger than the warmup's
    // max_batch_prefill_tokens (prompt tokens plus one per running request).
    let config = SchedulerConfig {
        max_batch_prefill_tokens: 64,
        ..config()
    };
    let (infer, _, shard) = start(64, config).await;
    let (_first, running_a) = infer.generate_stream(request(10, 20)).unwrap();
    let (_second, mut running_b) = infer.generate_stream(request(10, 20)).unwrap();
    let mut responses_b = vec![within_seconds(running_b.next()).await.unwrap()];
    // 62 prompt tokens + 2 running ones fill the forward pass exactly: a mixed step.
    let fitting = infer.generate_stream(request(62, 3)).unwrap();
    tokio::time::sleep(Duration::from_millis(12)).await;
    let full = infer.generate_stream(request(64, 3)).unwrap();
    let fitting: Vec<_> = within_seconds(fitting.1.collect::<Vec<_>>()).await;
    assert_complete(&fitting, 3);
    let full: Vec<_> = within_seconds(full.1.collect::<Vec<_>>()).await;
    assert_complete(&full, 3);
    assert_complete(&within_seconds(running_a.collect::<Vec<_>>()).await, 20);
    responses_b.extend(within_seconds(running_b.collect::<Vec<_>>()).await);
    assert_complete(&responses_b, 20);

    let calls = shard.calls();
    assert_eq!(calls[0], prefill(0, vec![0, 1], 20, None));
    assert!(
        calls.contains(&prefill(1, vec![2], 62, Some((0, 2)))),
        "{calls:?}"
    );
    let full_at = calls
        .iter()
        .position(
            |c| matches!(c, ShardCall::Prefill { request_ids, .. } if *request_ids == vec![3]),
        )
        .unwrap();
    assert!(
        matches!(&calls[full_at], ShardCall::Prefill { cached: None, .. }),
        "prefilled alone: {:?}",
        calls[full_at]
    );
    assert!(
        matches!(&calls[full_at + 1], ShardCall::Decode { batch_ids } if batch_ids.len() == 2),
        "then decoded with the running batch: {:?}",
        calls[full_at + 1]
    );
}

#[tokio::test]
async fn few_waiting_requests_join_only_after_max_waiting_tokens_steps() {
    let config = SchedulerConfig {
        // Ten waiting requests per running one would be needed to join early.
        waiting_served_ratio: 10.0,
        max_waiting_tokens: 5,
        ..config()
    };
    let (infer, _, shard) = start(64, config).await;
    let (_permit, mut long) = infer.generate_stream(request(10, 60)).unwrap();
    within_seconds(long.next()).await.unwrap().unwrap();
    let short = within_seconds(infer.generate(request(10, 3)))
        .await
        .unwrap();
    assert_eq!(short.generated_text.generated_tokens, 3);
    let joined_at = shard
        .calls()
        .iter()
        .position(is_mixed)
        .expect("the short request joined the long one");
    // Steps counted from the long request's prefill: it joins at the 5th,
    // after four decodes alone.
    assert!(joined_at >= 5, "joined at call {joined_at}");
}

#[tokio::test]
async fn a_disconnected_client_frees_its_blocks() {
    // The KV cache holds exactly one maximal request.
    let (infer, summary, shard) = start(8, config()).await;
    assert_eq!(summary.max_batch_total_tokens, 128);
    let (_permit, mut abandoned) = infer.generate_stream(request(10, 118)).unwrap();
    within_seconds(abandoned.next()).await.unwrap().unwrap();
    drop(abandoned);
    let clears_before = shard.clear_calls();
    // Schedulable only once the abandoned request's blocks are back.
    let response = within_seconds(infer.generate(request(10, 118)))
        .await
        .unwrap();
    assert_eq!(response.generated_text.generated_tokens, 118);
    assert!(
        shard.clear_calls() > clears_before,
        "the abandoned request's batch was dropped from the shards"
    );
    assert_eq!(shard.cached_request_count(), 0);
}

#[tokio::test]
async fn a_failed_decode_fails_its_batch_and_serving_goes_on() {
    let (infer, _, shard) = start(64, config()).await;
    let (_permit, mut running) = infer.generate_stream(request(10, 100)).unwrap();
    within_seconds(running.next()).await.unwrap().unwrap();
    let poisoned = within_seconds(infer.generate(with_input(vec![POISON_DECODE], 10))).await;
    assert!(
        matches!(poisoned, Err(InferError::GenerationError(_))),
        "{poisoned:?}"
    );
    let rest: Vec<_> = within_seconds(running.collect::<Vec<_>>()).await;
    assert!(
        matches!(rest.last(), Some(Err(InferError::GenerationError(_)))),
        "the request decoded with the poisoned one fails too"
    );
    assert_eq!(
        shard.cached_request_count(),
        0,
        "the shards' cache was cleared"
    );

    assert!(infer.health().await, "the shards still answer Health");
    let response = within_seconds(infer.generate(request(4, 3))).await.unwrap();
    assert_eq!(response.generated_text.generated_tokens, 3);
}

#[tokio::test]
async fn a_failed_prefill_fails_only_its_requests() {
    // One request per batch: the healthy request waits for the next batch.
    let config = SchedulerConfig {
        max_batch_size: Some(1),
        ..config()
    };
    let (infer, _, shard) = start(64, config).await;
    let (_poisoned_permit, poisoned) = infer
        .generate_stream(with_input(vec![POISON_PREFILL], 10))
        .unwrap();
    let (_permit, healthy) = infer.generate_stream(request(10, 5)).unwrap();
    let poisoned: Vec<_> = within_seconds(poisoned.collect::<Vec<_>>()).await;
    assert!(
        matches!(poisoned[..], [Err(InferError::GenerationError(_))]),
        "{poisoned:?}"
    );
    let healthy: Vec<_> = within_seconds(healthy.collect::<Vec<_>>()).await;
    assert_complete(&healthy, 5);
    assert_eq!(
        shard.calls()[..2],
        [prefill(0, vec![0], 1, None), prefill(1, vec![1], 10, None)]
    );
    // The first clear is the one of connecting.
    assert_eq!(
        shard.clears()[1..],
        [Some(0)],
        "only the failed batch was dropped"
    );
    assert_eq!(shard.cached_request_count(), 0);
}

#[tokio::test]
async fn a_failed_mixed_prefill_fails_both_batches_and_clears_the_cache() {
    let (infer, _, shard) = start(64, config()).await;
    let (_permit, mut running) = infer.generate_stream(request(10, 100)).unwrap();
    within_seconds(running.next()).await.unwrap().unwrap();
    let poisoned = within_seconds(infer.generate(with_input(vec![POISON_PREFILL], 10))).await;
    assert!(
        matches!(poisoned, Err(InferError::GenerationError(_))),
        "{poisoned:?}"
    );
    let rest: Vec<_> = within_seconds(running.collect::<Vec<_>>()).await;
    assert!(
        matches!(rest.last(), Some(Err(InferError::GenerationError(_)))),
        "the running request shared the failed forward pass: {rest:?}"
    );
    let calls = shard.calls();
    assert_eq!(calls.last(), Some(&prefill(1, vec![1], 1, Some((0, 1)))));
    assert_eq!(calls.iter().filter(|c| is_mixed(c)).count(), 1);
    // The first clear is the one of connecting.
    assert_eq!(
        shard.clears()[1..],
        [None],
        "every cached batch was dropped"
    );
    assert_eq!(shard.cached_request_count(), 0);

    assert!(infer.health().await, "the shards still answer Health");
    let response = within_seconds(infer.generate(request(4, 3))).await.unwrap();
    assert_eq!(response.generated_text.generated_tokens, 3);
}

#[tokio::test]
async fn admission_limits() {
    let (infer, _, _shard) = start(
        64,
        SchedulerConfig {
            max_concurrent_requests: 1,
            ..config()
        },
    )
    .await;
    let held = infer.generate_stream(request(4, 50)).unwrap();
    assert!(matches!(
        infer.generate_stream(request(4, 5)),
        Err(InferError::Overloaded)
    ));
    drop(held);
    assert!(matches!(
        infer.generate_stream(request(10, 64 * BLOCK_SIZE)),
        Err(InferError::ValidationError(_))
    ));
    assert!(matches!(
        infer.generate_stream(request(200, 5)),
        Err(InferError::ValidationError(_))
    ));
}

#[tokio::test]
async fn a_sampled_request_gets_its_seed_back_and_a_greedy_one_none() {
    let (infer, _summary, _shard) = start(64, config()).await;
    let mut sampled = request(4, 3);
    (sampled.parameters.do_sample, sampled.parameters.seed) = (true, 42);
    let response = within_seconds(infer.generate(sampled)).await.unwrap();
    assert_eq!(response.generated_text.seed, Some(42));
    let response = within_seconds(infer.generate(request(4, 3))).await.unwrap();
    assert_eq!(response.generated_text.seed, None);
}

#[tokio::test]
async fn max_batch_total_tokens_goes_to_warmup_and_sizes_the_allocator() {
    let config = SchedulerConfig {
        max_batch_total_tokens: Some(512),
        ..config()
    };
    let (_infer, summary, shard) = start(64, config).await;
    assert_eq!(shard.warmups()[0].max_batch_total_tokens, Some(512));
    assert_eq!(summary.max_batch_total_tokens, 512);
}

#[tokio::test]
async fn connecting_to_a_missing_socket_fails_clearly() {
    let error = Infer::connect("/nonexistent/shard.sock", config(), Deadlines::default())
        .await
        .err()
        .expect("no shard listens there");
    assert!(
        format!("{error:#}").contains("/nonexistent/shard.sock"),
        "{error:#}"
    );
}

#[tokio::test]
async fn a_prefill_budget_below_the_longest_prompt_needs_chunking_shards() {
    let config = SchedulerConfig {
        max_batch_prefill_tokens: 32,
        ..config()
    };
    let shard = FakeShard::start(shard_config(64)).await;
    let error = Infer::connect(&shard.path(), config.clone(), Deadlines::default())
        .await
        .err()
        .expect("prompts of 64 tokens would never fit a prefill of 32");
    assert!(
        error.to_string().contains("--max-batch-prefill-tokens"),
        "{error}"
    );
    let chunking = FakeShardConfig {
        support_chunking: true,
        ..shard_config(64)
    };
    let (infer, _, _shard) = start_with(chunking, config).await;
    let mut details = request(40, 3);
    details.decoder_input_details = true;
    let error = infer.generate_stream(details).err().unwrap();
    assert!(error.to_string().contains("prompt logprobs need one prefill"), "{error}");
}

#[tokio::test]
async fn a_repeated_prompt_is_prefilled_from_cached_blocks_even_while_the_first_runs() {
    let config = SchedulerConfig {
        prefix_caching: true,
        ..config()
    };
    let (infer, _, shard) = start(64, config).await;
    let (_running, running) = infer.generate_stream(request(40, 20)).unwrap();
    let mut running = running.peekable();
    within_seconds(std::pin::Pin::new(&mut running).peek()).await;
    // The running request's prompt blocks are shared as soon as they were computed.
    let response = within_seconds(infer.generate(request(40, 3))).await.unwrap();
    assert_eq!(response.generated_text.generated_tokens, 3);
    assert_complete(&within_seconds(running.collect::<Vec<_>>()).await, 20);
    let mut details = request(40, 3);
    details.decoder_input_details = true;
    within_seconds(infer.generate(details)).await.unwrap();
    let prompt_tokens: Vec<u32> = shard
        .calls()
        .iter()
        .filter_map(|call| match call {
            ShardCall::Prefill { prompt_tokens, .. } => Some(*prompt_tokens),
            ShardCall::Decode { .. } => None,
        })
        .collect();
    // Two blocks of 16 are cached; prompt logprobs compute the whole prompt.
    assert_eq!(prompt_tokens, vec![40, 8, 40]);
}

/// A prompt longer than the prefill budget is prefilled in chunks, each sharing its
/// forward pass with the running request's decode step; both get all their tokens.
#[tokio::test]
async fn a_long_prompt_is_chunked_alongside_the_running_decodes() {
    let config = SchedulerConfig {
        max_batch_prefill_tokens: 24,
        max_batch_total_tokens: Some(64 * BLOCK_SIZE),
        ..config()
    };
    let chunking = FakeShardConfig {
        support_chunking: true,
        ..shard_config(64)
    };
    let (infer, _, shard) = start_with(chunking, config).await;
    let (_running, running) = infer.generate_stream(request(4, 30)).unwrap();
    let mut running = running.peekable();
    within_seconds(std::pin::Pin::new(&mut running).peek()).await;
    let long = within_seconds(infer.generate(request(60, 3))).await.unwrap();
    assert_eq!(long.generated_text.generated_tokens, 3);
    assert_complete(&within_seconds(running.collect::<Vec<_>>()).await, 30);
    let chunks: Vec<(u32, bool)> = shard
        .calls()
        .iter()
        .filter_map(|call| match call {
            ShardCall::Prefill { prompt_tokens, cached, .. } if *prompt_tokens > 4 => {
                Some((*prompt_tokens, cached.is_some()))
            }
            _ => None,
        })
        .collect();
    // 23 tokens beside the running request's decode row, twice, then the last 14.
    assert_eq!(chunks, vec![(23, true), (23, true), (14, true)]);
}

/// A shard slower than its deadline makes the group stuck: the request in flight ends
/// with an error naming the shard and the call, health is false at once (no probe),
/// and new requests are refused without reaching the shard.
#[tokio::test]
async fn a_shard_past_its_deadline_makes_the_group_stuck() {
    let shard = FakeShard::start(FakeShardConfig {
        block_size: BLOCK_SIZE,
        kv_capacity_tokens: 64 * BLOCK_SIZE,
        decode_delay: Duration::from_millis(800),
        prefill_delay: Duration::ZERO,
        support_chunking: false,
    })
    .await;
    let deadlines = Deadlines::new(Duration::from_millis(200), Duration::from_secs(10));
    let (infer, _) = Infer::connect(&shard.path(), config(), deadlines).await.unwrap();
    assert!(infer.health().await, "healthy before any step");

    let started = std::time::Instant::now();
    let (_permit, stream) = infer.generate_stream(with_input(vec![10, 11], 4)).unwrap();
    let responses: Vec<_> = within_seconds(stream.collect()).await;
    assert!(started.elapsed() < Duration::from_millis(800), "{:?}", started.elapsed());
    assert!(matches!(responses[0], Ok(InferStreamResponse::Intermediate { .. })), "{responses:?}");
    match responses.last() {
        Some(Err(InferError::ShardStuck(message))) => {
            assert!(message.contains("Decode"), "{message}");
            assert!(message.contains(&shard.path()), "{message}");
        }
        other => panic!("the stream should end stuck: {other:?}"),
    }
    let stuck = within_seconds(infer.wait_stuck()).await;
    assert_eq!(stuck.call, "Decode");

    let calls = shard.calls().len();
    let probe = std::time::Instant::now();
    assert!(!infer.health().await);
    assert!(probe.elapsed() < Duration::from_millis(50));
    assert!(matches!(
        infer.generate_stream(with_input(vec![10], 2)),
        Err(InferError::ShardStuck(_))
    ));
    assert_eq!(shard.calls().len(), calls, "nothing more reaches a stuck group");
}
