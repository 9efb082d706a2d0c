//! Shard-level microbenchmark, like TGI's `text-generation-benchmark`: talks straight to a
//! running shard over its gRPC unix socket (no router, no HTTP, no tokenizer) and measures
//! the raw Prefill and Decode latency of batches of random prompts.

mod batch;
mod client;
#[cfg(test)]
mod fake_shard;
mod report;
mod run;
mod stats;

use anyhow::{bail, Context};
use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "text-generation-benchmark", version, about)]
pub struct Args {
    /// Unix socket of the shard (the launcher's shard of rank 0).
    #[arg(
        long,
        env = "SHARD_UDS_PATH",
        default_value = "/tmp/text-generation-server-0"
    )]
    uds_path: PathBuf,
    /// Seconds to keep retrying the connection while the shard starts.
    #[arg(long, default_value_t = 60)]
    connect_timeout_secs: u64,
    /// Batch sizes to measure, in order.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64,128,256")]
    batch_sizes: Vec<u32>,
    /// Prompt length of every request, in tokens.
    #[arg(long, default_value_t = 512)]
    prompt_tokens: u32,
    /// Decode steps after the prefill (each request generates 1 + this many tokens).
    #[arg(long, default_value_t = 128)]
    decode_steps: u32,
    /// Untimed runs per batch size before the measured ones.
    #[arg(long, default_value_t = 1)]
    warmup_runs: u32,
    /// Measured runs per batch size.
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// Random prompt token ids are drawn below this (must not exceed the model's vocabulary).
    #[arg(long, default_value_t = 32000)]
    vocab_size: u32,
    /// Seed of the random prompts.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Warmup: the longest prompt the shard must accept.
    #[arg(long, default_value_t = 2048)]
    max_input_tokens: u32,
    /// Warmup: the most tokens (prompt + generated) of one request.
    #[arg(long, default_value_t = 4096)]
    max_total_tokens: u32,
    /// Warmup: the most prompt tokens of one prefill batch.
    #[arg(long, default_value_t = 8192)]
    max_batch_prefill_tokens: u32,
    /// Warmup: size the KV cache for this many tokens instead of from free memory.
    #[arg(long)]
    max_batch_total_tokens: Option<u32>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

impl Args {
    fn validate(&self) -> anyhow::Result<()> {
        if self.batch_sizes.is_empty() || self.batch_sizes.contains(&0) {
            bail!("--batch-sizes must list batch sizes of at least 1");
        }
        if self.prompt_tokens == 0 || self.runs == 0 || self.vocab_size == 0 {
            bail!("--prompt-tokens, --runs and --vocab-size must be at least 1");
        }
        if self.prompt_tokens > self.max_input_tokens {
            bail!(
                "--prompt-tokens {} exceeds --max-input-tokens {}",
                self.prompt_tokens,
                self.max_input_tokens
            );
        }
        if self.prompt_tokens + self.decode_steps + 1 > self.max_total_tokens {
            bail!(
                "--prompt-tokens + --decode-steps + 1 exceeds --max-total-tokens {}",
                self.max_total_tokens
            );
        }
        if self.max_input_tokens >= self.max_total_tokens {
            bail!("--max-input-tokens must be below --max-total-tokens");
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() {
    if let Err(err) = run_benchmark(Args::parse()).await {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

async fn run_benchmark(args: Args) -> anyhow::Result<()> {
    args.validate()?;
    let mut client = client::connect(
        &args.uds_path,
        Duration::from_secs(args.connect_timeout_secs),
    )
    .await?;
    let results = run::run(&mut client, &args).await?;
    println!("{}", report::markdown(&results));
    if let Some(out) = &args.out {
        let json = serde_json::to_string_pretty(&results)?;
        std::fs::write(out, json).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("results written to {}", out.display());
    }
    Ok(())
}
