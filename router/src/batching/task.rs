//! The batching loop (TGI's `batching_task`): form a batch, prefill it, then
//! decode it step by step; between steps let waiting requests join, stream
//! every token to its client, and drop finished or abandoned requests from the
//! shards' batch so that their KV blocks serve others.
//!
//! Joining requests are prefilled in a "mixed" step, as in TGI v3: one Prefill
//! carries the new batch and the running one, so the shards run the new prompts
//! and one decode step of the running requests in the same forward pass (the
//! weights are read once for both). Its answer holds the first token of each new
//! request and the next token of each running one, and the union goes on under
//! the new batch's id; that iteration needs no Decode of its own. A join too large
//! to share the pass (new prompts plus one token per running request beyond
//! `max_batch_prefill_tokens`) is prefilled alone, then decoded with the rest. With
//! chunked prefill, every join shares the pass: a prompt beyond the budget left is
//! prefilled in part, and goes back to the front of the queue for its next chunk.
//!
//! On GPU shards every Decode asks the shards to run the next step ahead: they start
//! its forward pass before answering, so that the round trip and the delivery of the
//! tokens overlap it. The shards use that pass for the running requests of whatever
//! step comes next (a mixed step included); a batch appended after a lone prefill
//! joins the pass after.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use proto::v3::{Batch, CachedBatch, Generation, Request, Tokens};
use tokio::sync::Notify;

use super::health::GenerationHealth;
use super::planner::BatchingConfig;
use super::queue::{Entry, NextBatch, Queue};
use crate::client::{self, ShardedClient, StepTimings};
use crate::infer_types::{FinishReason, GeneratedText, InferError, InferStreamResponse, Token};

/// Runs forever; `notifier` wakes it when a request is queued.
pub async fn batching_task(
    client: ShardedClient,
    queue: Queue,
    config: BatchingConfig,
    notifier: Arc<Notify>,
    health: Arc<GenerationHealth>,
) {
    loop {
        while let Some(NextBatch { mut entries, batch }) =
            queue.next_batch(config.first_batch_limits()).await
        {
            let poll = config.shards_on_gpu;
            let mut running = step(
                &client,
                &queue,
                Step::Prefill(batch, None),
                &mut entries,
                &health,
                poll,
            )
            .await;
            let mut waiting_steps = 1;
            while let Some(batch) = running {
                metrics::gauge!("tgi_batch_current_size").set(batch.size as f64);
                metrics::gauge!("tgi_batch_current_max_tokens").set(batch.max_tokens as f64);
                let (limits, reason) =
                    config.join_limits(batch.size as usize, batch.max_tokens, waiting_steps);
                let next_step = match queue.next_batch(limits).await {
                    Some(NextBatch {
                        entries: mut new_entries,
                        batch: new_batch,
                    }) => {
                        metrics::counter!("tgi_batch_concat", "reason" => reason.as_label())
                            .increment(1);
                        waiting_steps = 1;
                        let prompt_tokens = new_batch
                            .requests
                            .iter()
                            .map(|r| (prefilled_len(r) - r.cache_len.unwrap_or(0)) as usize)
                            .sum();
                        if config.fits_mixed_step(prompt_tokens, batch.size as usize) {
                            // The shards answer for the requests of both batches.
                            entries.extend(new_entries);
                            Step::Prefill(new_batch, Some(batch))
                        } else {
                            let prefilled = step(
                                &client,
                                &queue,
                                Step::Prefill(new_batch, None),
                                &mut new_entries,
                                &health,
                                poll,
                            )
                            .await;
                            entries.extend(new_entries);
                            Step::Decode {
                                batches: [batch].into_iter().chain(prefilled).collect(),
                                run_ahead: config.shards_on_gpu,
                            }
                        }
                    }
                    // On GPUs the next step starts before this one answers: the round
                    // trip and the delivery of this step's tokens overlap its forward
                    // pass. A join uses it as the running requests' step.
                    None => Step::Decode {
                        run_ahead: config.shards_on_gpu,
                        batches: vec![batch],
                    },
                };
                running = step(&client, &queue, next_step, &mut entries, &health, poll).await;
                // A mixed step is also a decode step of the running requests.
                waiting_steps += 1;
            }
            metrics::gauge!("tgi_batch_current_size").set(0.0);
            metrics::gauge!("tgi_batch_current_max_tokens").set(0.0);
        }
        notifier.notified().await;
    }
}

enum Step {
    /// Prefills the new batch; with a cached batch, a mixed step that also runs
    /// one decode step of it, the union then cached under the new batch's id.
    Prefill(Batch, Option<CachedBatch>),
    /// One step over the union of these cached batches.
    /// With `run_ahead`, the shards start the following step before answering.
    Decode {
        batches: Vec<CachedBatch>,
        run_ahead: bool,
    },
}

impl Step {
    /// A mixed step counts as a prefill, as in TGI.
    fn method(&self) -> &'static str {
        match self {
            Step::Prefill(..) => "prefill",
            Step::Decode { .. } => "decode",
        }
    }

    /// What the shards must forget when the step fails: a failed prefill alone
    /// only concerns its new batch; a mixed step or a decode involves every
    /// cached batch.
    fn cache_to_clear(&self) -> Option<u64> {
        match self {
            Step::Prefill(batch, None) => Some(batch.id),
            Step::Prefill(_, Some(_)) | Step::Decode { .. } => None,
        }
    }
}

/// Runs one step and delivers its tokens; returns the batch still running.
/// `entries` are those of every request of the step (for a mixed step, of both
/// batches). On a shard error every entry of the step gets the error and is dropped.
async fn step(
    client: &ShardedClient,
    queue: &Queue,
    step: Step,
    entries: &mut HashMap<u64, Entry>,
    health: &GenerationHealth,
    poll: bool,
) -> Option<CachedBatch> {
    let method = step.method();
    let cache_to_clear = step.cache_to_clear();
    let start = Instant::now();
    metrics::counter!("tgi_batch_inference_count", "method" => method).increment(1);
    match run_step(client, queue, step, entries, start, poll).await {
        Ok((running, timings)) => {
            health.record(true);
            metrics::histogram!("tgi_batch_forward_duration", "method" => method)
                .record(timings.forward.as_secs_f64());
            metrics::histogram!("tgi_batch_decode_duration", "method" => method)
                .record(timings.decode.as_secs_f64());
            if let Some(concat) = timings.concat {
                metrics::histogram!("tgi_batch_concat_duration", "method" => method)
                    .record(concat.as_secs_f64());
            }
            metrics::histogram!("tgi_batch_inference_duration", "method" => method)
                .record(start.elapsed().as_secs_f64());
            metrics::counter!("tgi_batch_inference_success", "method" => method).increment(1);
            running
        }
        Err(err) => {
            health.record(false);
            metrics::counter!("tgi_batch_inference_failure", "method" => method).increment(1);
            tracing::error!("{method} failed: {err}");
            // A stuck group answers nothing more; there is no cache to clear.
            if !matches!(err, client::ClientError::Stuck(_)) {
                if let Err(clear_err) = client.clear_cache(cache_to_clear).await {
                    tracing::error!("clearing the shards' cache after a failed {method}: {clear_err}");
                }
            }
            let error = InferError::from(err);
            for (_, entry) in entries.drain() {
                // The client may be gone already; nothing more to do then.
                let _ = entry.response_tx.send(Err(error.clone()));
            }
            None
        }
    }
}

async fn run_step(
    client: &ShardedClient,
    queue: &Queue,
    step: Step,
    entries: &mut HashMap<u64, Entry>,
    start: Instant,
    poll: bool,
) -> client::Result<(Option<CachedBatch>, StepTimings)> {
    let (generations, running, timings) = match step {
        Step::Prefill(batch, cached_batch) => {
            // Only the new requests get their batch time: running ones keep theirs.
            for entry in entries.values_mut() {
                entry.batch_time.get_or_insert(start);
            }
            let prefilled: Vec<(u64, u32)> = batch
                .requests
                .iter()
                .map(|r| (r.id, prefilled_len(r)))
                .collect();
            let answered = answer(client.prefill(batch, cached_batch), poll).await?;
            let mut partly_prefilled = Vec::new();
            for (id, len) in prefilled {
                let Some(entry) = entries.get_mut(&id) else {
                    continue;
                };
                // Their blocks hold these prompt tokens now: they may serve other prompts.
                if let Some(allocation) = entry.block_allocation.as_mut() {
                    allocation.set_computed(len);
                }
                if len < entry.request.input_length() {
                    partly_prefilled.extend(entries.remove_entry(&id));
                }
            }
            // The shards dropped them after their chunk: the queue sends the rest first.
            if !partly_prefilled.is_empty() {
                queue.requeue(partly_prefilled);
            }
            answered
        }
        Step::Decode { batches, run_ahead } => {
            answer(client.decode(batches, run_ahead), poll).await?
        }
    };
    deliver(generations, entries);
    let running = filter_batch(client, running, entries).await?;
    Ok((running, timings))
}

/// Prompt tokens in a request's KV blocks after its prefill: the cached prefix and the
/// tokens computed.
fn prefilled_len(request: &Request) -> u32 {
    let cached = request.cache_len.unwrap_or(0);
    let prompt = request.input_ids.len() as u32;
    request
        .chunk_len
        .map_or(prompt, |chunk| (cached + chunk).min(prompt))
}

/// How long a step's answer is polled for before it is awaited: longer than a decode
/// step, shorter than a long prefill.
const POLL_FOR_ANSWER: Duration = Duration::from_millis(50);

/// The answer of a shard call; with `poll`, the task yields in a loop at first instead
/// of parking its runtime thread, so that the answer is read as soon as it arrives (a
/// parked thread takes tens of microseconds to wake, on every step).
async fn answer<F: Future>(call: F, poll: bool) -> F::Output {
    let mut call = std::pin::pin!(call);
    let asked = Instant::now();
    while poll && asked.elapsed() < POLL_FOR_ANSWER {
        if let Poll::Ready(output) = futures::poll!(call.as_mut()) {
            return output;
        }
        tokio::task::yield_now().await;
    }
    call.await
}

/// Sends each generation to its client; drops the entries that finished or
/// whose client is gone (their KV blocks go back to the allocator).
fn deliver(generations: Vec<Generation>, entries: &mut HashMap<u64, Entry>) {
    for generation in generations {
        let id = generation.request_id;
        let Some(entry) = entries.get(&id) else {
            tracing::error!(
                request_id = id,
                "the shards returned a generation for an unknown request"
            );
            continue;
        };
        if !send_generation(generation, entry) {
            entries.remove(&id);
        }
    }
}

/// False when the entry is done: it finished or its client went away.
fn send_generation(generation: Generation, entry: &Entry) -> bool {
    if entry.response_tx.is_closed() {
        tracing::debug!(
            request_id = generation.request_id,
            "client gone: dropping the request"
        );
        return false;
    }
    let mut responses = Vec::new();
    if let Some(prefill_tokens) = generation.prefill_tokens {
        responses.push(InferStreamResponse::Prefill(tokens_of(prefill_tokens)));
    }
    let tokens = tokens_of(generation.tokens.unwrap_or_default());
    let mut top_tokens = generation.top_tokens.into_iter().map(tokens_of);
    let mut generated_text = generation.generated_text;
    let finished = generated_text.is_some();
    let last = tokens.len().saturating_sub(1);
    for (index, token) in tokens.into_iter().enumerate() {
        let top_tokens = top_tokens.next().unwrap_or_default();
        let response = match generated_text.take_if(|_| index == last) {
            Some(generated_text) => InferStreamResponse::End {
                token,
                top_tokens,
                generated_text: generated_text_of(generated_text),
                queued: entry.queue_time,
                start: entry.batch_time.unwrap_or(entry.queue_time),
            },
            None => InferStreamResponse::Intermediate { token, top_tokens },
        };
        responses.push(response);
    }
    let delivered = responses
        .into_iter()
        .all(|response| entry.response_tx.send(Ok(response)).is_ok());
    delivered && !finished
}

/// Keeps on the shards only the requests still in `entries`; entries the shards
/// no longer hold are dropped.
async fn filter_batch(
    client: &ShardedClient,
    running: Option<CachedBatch>,
    entries: &mut HashMap<u64, Entry>,
) -> client::Result<Option<CachedBatch>> {
    let Some(batch) = running else {
        entries.clear();
        return Ok(None);
    };
    let on_shards: HashSet<u64> = batch.request_ids.iter().copied().collect();
    entries.retain(|id, _| on_shards.contains(id));
    if entries.len() == on_shards.len() {
        return Ok(Some(batch));
    }
    if entries.is_empty() {
        client.clear_cache(Some(batch.id)).await?;
        return Ok(None);
    }
    client
        .filter_batch(batch.id, entries.keys().copied().collect())
        .await
}

fn tokens_of(tokens: Tokens) -> Vec<Token> {
    tokens
        .ids
        .iter()
        .enumerate()
        .map(|(index, &id)| Token {
            id,
            text: tokens.texts.get(index).cloned().unwrap_or_default(),
            // The first prompt token has no log-probability (as in TGI).
            logprob: tokens.logprobs.get(index).copied().unwrap_or(f32::NAN),
            special: tokens.is_special.get(index).copied().unwrap_or(false),
        })
        .collect()
}

fn generated_text_of(generated_text: proto::v3::GeneratedText) -> GeneratedText {
    let finish_reason = match proto::v3::FinishReason::try_from(generated_text.finish_reason) {
        Ok(proto::v3::FinishReason::Length) | Err(_) => FinishReason::Length,
        Ok(proto::v3::FinishReason::EosToken) => FinishReason::EosToken,
        Ok(proto::v3::FinishReason::StopSequence) => FinishReason::StopSequence,
    };
    GeneratedText {
        text: generated_text.text,
        generated_tokens: generated_text.generated_tokens,
        finish_reason,
        seed: generated_text.seed,
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::mpsc;

    use super::*;
    use crate::batching::queue::tests::request;

    /// Polling or awaiting, an answer arrives whenever it comes: before the polling
    /// window ends, and after it (a long prefill).
    #[tokio::test]
    async fn answers_arrive_polled_or_awaited() {
        for poll in [true, false] {
            for delay in [
                Duration::from_millis(2),
                POLL_FOR_ANSWER + Duration::from_millis(20),
            ] {
                let call = async move {
                    tokio::time::sleep(delay).await;
                    7
                };
                let asked = Instant::now();
                assert_eq!(answer(call, poll).await, 7);
                assert!(asked.elapsed() >= delay);
            }
        }
    }

    fn generation(request_id: u64, token: u32, finished: bool) -> Generation {
        Generation {
            request_id,
            prefill_tokens: None,
            tokens: Some(Tokens {
                ids: vec![token],
                logprobs: vec![-0.25],
                texts: vec![format!("t{token}")],
                is_special: vec![false],
            }),
            top_tokens: vec![],
            generated_text: finished.then(|| proto::v3::GeneratedText {
                text: "done".to_string(),
                generated_tokens: 2,
                finish_reason: proto::v3::FinishReason::EosToken as i32,
                seed: Some(3),
            }),
        }
    }

    #[test]
    fn delivers_tokens_then_the_end_and_drops_finished_or_abandoned_entries() {
        let (kept_tx, mut kept_rx) = mpsc::unbounded_channel();
        let (gone_tx, gone_rx) = mpsc::unbounded_channel();
        drop(gone_rx);
        let mut entries = HashMap::from([
            (0, Entry::new(request(2, 5), kept_tx)),
            (1, Entry::new(request(2, 5), gone_tx)),
        ]);

        deliver(
            vec![generation(0, 7, false), generation(1, 7, false)],
            &mut entries,
        );
        assert_eq!(
            entries.keys().collect::<Vec<_>>(),
            vec![&0],
            "client 1 is gone"
        );
        match kept_rx.try_recv().unwrap().unwrap() {
            InferStreamResponse::Intermediate { token, .. } => {
                assert_eq!(
                    (token.id, token.text.as_str(), token.logprob),
                    (7, "t7", -0.25)
                );
            }
            other => panic!("expected an intermediate token, got {other:?}"),
        }

        deliver(vec![generation(0, 8, true)], &mut entries);
        assert!(entries.is_empty(), "finished requests leave the batch");
        match kept_rx.try_recv().unwrap().unwrap() {
            InferStreamResponse::End {
                token,
                generated_text,
                ..
            } => {
                assert_eq!(token.id, 8);
                assert_eq!(generated_text.text, "done");
                assert_eq!(generated_text.finish_reason, FinishReason::EosToken);
                assert_eq!(generated_text.seed, Some(3));
            }
            other => panic!("expected the end, got {other:?}"),
        }
    }

    #[test]
    fn missing_logprobs_are_nan() {
        let tokens = tokens_of(Tokens {
            ids: vec![1, 2],
            logprobs: vec![-1.0],
            texts: vec!["a".to_string(), "b".to_string()],
            is_special: vec![true, false],
        });
        assert_eq!(tokens[0].logprob, -1.0);
        assert!(tokens[0].special);
        assert!(tokens[1].logprob.is_nan());
        assert_eq!(tokens[1].text, "b");
    }
}
