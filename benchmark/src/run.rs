//! The benchmark loop: Warmup once, then for every batch size prefill the batch (in chunks
//! of at most `max_batch_prefill_tokens`, as the router would) and run the decode steps.

use crate::batch::{
    batch_of, blocks_per_request, build_requests, prefill_batches, warmup_prompt_lens,
};
use crate::client::ShardClient;
use crate::stats::Summary;
use crate::Args;
use anyhow::{bail, ensure, Context};
use proto::v3::{
    CachedBatch, ClearCacheRequest, DecodeRequest, InfoRequest, PrefillRequest, WarmupRequest,
};
use rand::{rngs::StdRng, SeedableRng};
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Serialize)]
pub struct Results {
    pub model_type: String,
    pub dtype: String,
    pub device_type: String,
    pub attention_impl: String,
    pub quantization: String,
    pub block_size: u32,
    /// KV cache capacity the shard reported after Warmup.
    pub max_supported_total_tokens: u32,
    pub prompt_tokens: u32,
    pub decode_steps: u32,
    pub runs: u32,
    pub batches: Vec<BatchResult>,
}

#[derive(Debug, Serialize)]
pub struct BatchResult {
    pub batch_size: u32,
    #[serde(flatten)]
    pub outcome: Outcome,
}

#[derive(Debug, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    Measured(Box<Measurement>),
    Skipped { reason: String },
}

#[derive(Debug, Serialize)]
pub struct Measurement {
    /// Prefill calls per run (the batch split at max_batch_prefill_tokens).
    pub prefill_calls: usize,
    /// Wall time of the whole prefill of the batch, per run.
    pub prefill_ms: Summary,
    /// Prompt tokens over mean prefill time.
    pub prefill_tokens_per_s: f64,
    /// Wall time of one decode step over the whole batch; `None` without decode steps.
    pub decode_step_ms: Option<Summary>,
    /// The shard's own account of a decode step (`DecodeResponse.forward_ns`,
    /// `decode_ns` and `total_ns`): the forward pass up to its logits, choosing the
    /// tokens, and the whole call; the rest of the wall time is gRPC.
    pub decode_forward_ms: Option<Summary>,
    pub decode_sampling_ms: Option<Summary>,
    pub decode_shard_ms: Option<Summary>,
    /// Generated tokens per second over the batch, from the mean step time.
    pub decode_tokens_per_s: Option<f64>,
}

pub async fn run(client: &mut ShardClient, args: &Args) -> anyhow::Result<Results> {
    let info = client
        .info(InfoRequest {})
        .await
        .context("Info")?
        .into_inner();
    ensure!(
        info.block_size > 0,
        "the shard reports a KV block size of 0"
    );
    let block_size = info.block_size;
    let mut rng = StdRng::seed_from_u64(args.seed);
    client
        .clear_cache(ClearCacheRequest { id: None })
        .await
        .context("ClearCache")?;

    let warmup_new_tokens = 10.min(args.max_total_tokens - args.max_input_tokens);
    let warmup_lens = warmup_prompt_lens(args.max_batch_prefill_tokens, args.max_input_tokens);
    let warmup_batch = batch_of(
        0,
        build_requests(
            &warmup_lens,
            warmup_new_tokens,
            block_size,
            args.vocab_size,
            &mut rng,
        ),
    );
    let started = Instant::now();
    let warmup = client
        .warmup(WarmupRequest {
            batch: Some(warmup_batch),
            max_input_tokens: args.max_input_tokens,
            max_prefill_tokens: args.max_batch_prefill_tokens,
            max_total_tokens: args.max_total_tokens,
            max_batch_total_tokens: args.max_batch_total_tokens,
        })
        .await
        .context("Warmup")?
        .into_inner();
    eprintln!(
        "warmup: {:.1}s, KV cache holds {} tokens ({} on {}, {})",
        started.elapsed().as_secs_f64(),
        warmup.max_supported_total_tokens,
        info.model_type,
        info.device_type,
        info.dtype
    );

    let available_blocks = warmup.max_supported_total_tokens / block_size;
    let max_new_tokens = args.decode_steps + 1;
    let mut batches = Vec::new();
    for &batch_size in &args.batch_sizes {
        let needed = batch_size as u64
            * blocks_per_request(args.prompt_tokens, max_new_tokens, block_size) as u64;
        let outcome = if needed > available_blocks as u64 {
            Outcome::Skipped {
                reason: format!("needs {needed} KV blocks, the cache holds {available_blocks}"),
            }
        } else {
            Outcome::Measured(Box::new(
                measure(client, args, block_size, batch_size, &mut rng).await?,
            ))
        };
        match &outcome {
            Outcome::Measured(m) => eprintln!(
                "batch size {batch_size}: prefill {:.1} ms{}",
                m.prefill_ms.mean,
                m.decode_step_ms
                    .as_ref()
                    .map_or(String::new(), |s| format!(", decode step {:.2} ms", s.mean))
            ),
            Outcome::Skipped { reason } => eprintln!("batch size {batch_size}: skipped ({reason})"),
        }
        batches.push(BatchResult {
            batch_size,
            outcome,
        });
    }
    Ok(Results {
        model_type: info.model_type,
        dtype: info.dtype,
        device_type: info.device_type,
        attention_impl: info.attention_impl,
        quantization: info.quantization,
        block_size,
        max_supported_total_tokens: warmup.max_supported_total_tokens,
        prompt_tokens: args.prompt_tokens,
        decode_steps: args.decode_steps,
        runs: args.runs,
        batches,
    })
}

async fn measure(
    client: &mut ShardClient,
    args: &Args,
    block_size: u32,
    batch_size: u32,
    rng: &mut StdRng,
) -> anyhow::Result<Measurement> {
    let max_new_tokens = args.decode_steps + 1;
    let mut prefill_ms = Vec::new();
    let (mut step_ms, mut forward_ms, mut sampling_ms, mut shard_ms) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut prefill_calls = 0;
    for run in 0..args.warmup_runs + args.runs {
        let measured = run >= args.warmup_runs;
        let prompt_lens = vec![args.prompt_tokens; batch_size as usize];
        let requests = build_requests(
            &prompt_lens,
            max_new_tokens,
            block_size,
            args.vocab_size,
            rng,
        );
        let batches = prefill_batches(requests, args.max_batch_prefill_tokens, 1);
        prefill_calls = batches.len();

        let started = Instant::now();
        let mut cached = Vec::new();
        let mut generated = 0;
        for batch in batches {
            let response = client
                .prefill(PrefillRequest {
                    batch: Some(batch),
                    cached_batch: None,
                })
                .await
                .context("Prefill")?
                .into_inner();
            generated += response.generations.len();
            cached.extend(response.batch);
        }
        let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        ensure!(
            generated == batch_size as usize,
            "Prefill of {batch_size} requests returned {generated} generations"
        );
        if measured {
            prefill_ms.push(elapsed_ms);
        }

        for step in 0..args.decode_steps {
            if cached.is_empty() {
                bail!(
                    "the shard finished the batch after {step} of {} decode steps",
                    args.decode_steps
                );
            }
            let started = Instant::now();
            let response = client
                .decode(DecodeRequest {
                    batches: std::mem::take(&mut cached),
                    run_ahead: false,
                })
                .await
                .context("Decode")?
                .into_inner();
            let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
            ensure!(
                response.generations.len() == batch_size as usize,
                "Decode step {step} over {batch_size} requests returned {} generations",
                response.generations.len()
            );
            if measured {
                step_ms.push(elapsed_ms);
                forward_ms.push(response.forward_ns as f64 / 1e6);
                sampling_ms.push(response.decode_ns as f64 / 1e6);
                shard_ms.push(response.total_ns as f64 / 1e6);
            }
            cached.extend(response.batch);
        }
        release(client, cached).await?;
    }

    let prefill_ms = Summary::of(&prefill_ms).context("no measured runs")?;
    let decode_step_ms = Summary::of(&step_ms);
    Ok(Measurement {
        prefill_calls,
        prefill_tokens_per_s: (batch_size * args.prompt_tokens) as f64 / prefill_ms.mean * 1e3,
        decode_tokens_per_s: decode_step_ms
            .as_ref()
            .map(|s| batch_size as f64 / s.mean * 1e3),
        prefill_ms,
        decode_step_ms,
        decode_forward_ms: Summary::of(&forward_ms),
        decode_sampling_ms: Summary::of(&sampling_ms),
        decode_shard_ms: Summary::of(&shard_ms),
    })
}

/// Drops batches the shard still holds: each request generates `decode_steps + 1` tokens,
/// so a shard that follows `max_new_tokens` has already finished them all.
async fn release(client: &mut ShardClient, cached: Vec<CachedBatch>) -> anyhow::Result<()> {
    if !cached.is_empty() {
        eprintln!(
            "warning: the shard kept {} batch(es) past max_new_tokens; clearing them",
            cached.len()
        );
    }
    for batch in cached {
        client
            .clear_cache(ClearCacheRequest { id: Some(batch.id) })
            .await
            .context("ClearCache")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client;
    use crate::fake_shard::FakeShard;
    use clap::Parser;
    use std::time::Duration;

    /// Runs the benchmark against a fake shard whose cache holds `num_blocks` blocks.
    async fn run_against_fake(
        num_blocks: u32,
        flags: &[&str],
    ) -> (anyhow::Result<Results>, FakeShard) {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("shard-0");
        let shard = FakeShard::start(&socket, num_blocks);
        let mut argv = vec![
            "text-generation-benchmark",
            "--uds-path",
            socket.to_str().unwrap(),
        ];
        argv.extend([
            "--max-input-tokens",
            "64",
            "--max-total-tokens",
            "128",
            "--max-batch-prefill-tokens",
            "64",
        ]);
        argv.extend(flags);
        let args = Args::parse_from(argv);
        let mut client = client::connect(&args.uds_path, Duration::from_secs(5))
            .await
            .unwrap();
        (run(&mut client, &args).await, shard)
    }

    #[tokio::test]
    async fn measures_the_batches_that_fit_and_skips_the_rest() {
        let flags = [
            "--batch-sizes",
            "1,8,64",
            "--prompt-tokens",
            "16",
            "--decode-steps",
            "3",
            "--runs",
            "2",
        ];
        // 99 usable blocks; a request of 16 + 4 tokens takes 2, so 64 requests do not fit.
        let (results, shard) = run_against_fake(100, &flags).await;
        let results = results.unwrap();
        assert_eq!(results.max_supported_total_tokens, 99 * 16);
        let measured: Vec<&Measurement> = results.batches[..2]
            .iter()
            .map(|b| match &b.outcome {
                Outcome::Measured(m) => &**m,
                Outcome::Skipped { reason } => panic!("batch {} skipped: {reason}", b.batch_size),
            })
            .collect();
        // 8 prompts of 16 tokens are prefilled 64 tokens at a time.
        assert_eq!(
            measured.iter().map(|m| m.prefill_calls).collect::<Vec<_>>(),
            vec![1, 2]
        );
        for m in &measured {
            assert_eq!(m.prefill_ms.count, 2);
            assert_eq!(m.decode_step_ms.as_ref().unwrap().count, 6);
            assert!(m.prefill_tokens_per_s > 0.0 && m.decode_tokens_per_s.unwrap() > 0.0);
        }
        match &results.batches[2].outcome {
            Outcome::Skipped { reason } => {
                assert_eq!(reason, "needs 128 KV blocks, the cache holds 99")
            }
            Outcome::Measured(_) => panic!("64 requests cannot fit"),
        }
        let calls = shard.calls.lock().unwrap();
        assert_eq!(calls.warmups, 1);
        // One warmup run and two measured runs per batch size.
        assert_eq!(calls.prefill_sizes, [vec![1; 3], vec![4; 6]].concat());
        // The first step of a batch prefilled in two calls decodes both cached batches.
        let per_run_8 = [2, 1, 1];
        assert_eq!(
            calls.decode_batch_counts,
            [vec![1; 9], per_run_8.repeat(3)].concat()
        );
    }

    #[tokio::test]
    async fn prefill_only_has_no_decode_figures() {
        let (results, _shard) =
            run_against_fake(100, &["--batch-sizes", "2", "--decode-steps", "0"]).await;
        match &results.unwrap().batches[0].outcome {
            Outcome::Measured(m) => {
                assert!(m.decode_step_ms.is_none() && m.decode_tokens_per_s.is_none())
            }
            Outcome::Skipped { reason } => panic!("skipped: {reason}"),
        }
    }

    #[tokio::test]
    async fn a_shard_error_names_the_call() {
        // The warmup batch (64 + 10 tokens, 5 blocks) does not fit in 3 blocks.
        let (results, _shard) = run_against_fake(3, &["--batch-sizes", "1"]).await;
        let message = format!("{:#}", results.unwrap_err());
        assert!(
            message.starts_with("Warmup:") && message.contains("bad block"),
            "{message}"
        );
    }
}
