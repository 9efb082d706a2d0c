//! Command-line flags (each also readable from the environment variable of the same
//! name, as in TGI's launcher) and their validation.

use anyhow::{bail, Result};
use clap::{Parser, ValueEnum};
use model_store::quantization::QuantizeArg;

/// Longest default context: TGI's default cap on `--max-total-tokens`.
const DEFAULT_MAX_TOTAL_TOKENS: usize = 4096;
/// Slack TGI adds over the longest prompt for the default prefill budget.
const DEFAULT_PREFILL_SLACK: usize = 50;
/// `MAX_TOP_N_TOKENS` of the shard's sampler.
const MAX_TOP_N_TOKENS: u32 = 32;

#[derive(Parser, Debug, Clone)]
#[command(version, about = "Starts the model shards and the HTTP router, and supervises them")]
pub struct Args {
    /// A local model (a Hugging Face-layout directory or a `.gguf` file), a Hub repository
    /// id (`org/name`, downloaded into the Hugging Face cache), or `org/name/file.gguf`
    /// for one GGUF file of a Hub repository.
    #[arg(long, env, default_value = "HuggingFaceTB/SmolLM2-135M-Instruct")]
    pub model_id: String,

    /// Hub revision (branch, tag or commit) to download.
    #[arg(long, env)]
    pub revision: Option<String>,

    /// Whether to split the model over several shards (`--sharded true` without
    /// `--num-shard` uses every GPU in CUDA_VISIBLE_DEVICES).
    #[arg(long, env)]
    pub sharded: Option<bool>,

    /// Number of shards (processes, one per device) to start.
    #[arg(long, env)]
    pub num_shard: Option<usize>,

    /// Weight quantization (TGI's values): the checkpoint's own format (awq, gptq,
    /// marlin, fp8; detected from config.json's quantization_config without the flag),
    /// or a bf16/f16 checkpoint quantized at load (fp8, bitsandbytes-nf4,
    /// bitsandbytes-fp4, bitsandbytes for int8).
    #[arg(long, env, value_enum)]
    pub quantize: Option<QuantizeArg>,

    /// Data type of the weights and activations (the shard's default when absent).
    #[arg(long, env, value_enum)]
    pub dtype: Option<Dtype>,

    /// Device the shards run on (the shard's default when absent).
    #[arg(long, env, value_enum)]
    pub device: Option<Device>,

    /// Longest prompt, in tokens. Default: `--max-total-tokens` - 1.
    #[arg(long, env)]
    pub max_input_tokens: Option<usize>,

    /// Longest prompt + generation, in tokens. Default: the model's context length,
    /// at most 4096.
    #[arg(long, env)]
    pub max_total_tokens: Option<usize>,

    /// Most tokens of one forward pass: the running requests' decode rows and the
    /// prompts (or chunks of longer prompts) joining them. Default: `--max-input-tokens`
    /// + 50, at most `--max-batch-total-tokens`.
    #[arg(long, env)]
    pub max_batch_prefill_tokens: Option<usize>,

    /// Keep the KV blocks of finished prompts and reuse them for later prompts that start
    /// with the same tokens. On by default; `PREFIX_CACHING=0` (or `false`) turns it off.
    #[arg(long, env, default_value_t = true, num_args = 0..=1, default_missing_value = "true",
        action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub prefix_caching: bool,

    /// Most tokens (prompts and generations) of all running requests together.
    /// Default: what the KV cache holds, as the shard reports at warmup.
    #[arg(long, env)]
    pub max_batch_total_tokens: Option<usize>,

    /// Most requests in one batch.
    #[arg(long, env)]
    pub max_batch_size: Option<usize>,

    /// Requests handled at once; more are refused with 429.
    #[arg(long, env, default_value_t = 128)]
    pub max_concurrent_requests: usize,

    #[arg(long, env, default_value_t = 4)]
    pub max_stop_sequences: usize,

    /// The most alternatives per token a request may ask for (at most 32: the shard's
    /// sampler keeps that many per row).
    #[arg(long, env, default_value_t = 5)]
    pub max_top_n_tokens: u32,

    /// Waiting requests join the running batch once they number this fraction of it.
    #[arg(long, env, default_value_t = 0.3)]
    pub waiting_served_ratio: f32,

    /// Decode steps after which waiting requests join the batch regardless.
    #[arg(long, env, default_value_t = 20)]
    pub max_waiting_tokens: usize,

    /// Address the HTTP server listens on.
    #[arg(long, env, default_value = "0.0.0.0")]
    pub hostname: String,

    #[arg(long, short, env, default_value_t = 3000)]
    pub port: u16,

    /// Prefix of the shards' unix sockets: shard N listens on `<prefix>-N`.
    #[arg(long, env, default_value = "/tmp/text-generation-server")]
    pub shard_uds_path: String,

    /// Address and port of rank 0, for the shards' collective communication.
    #[arg(long, env, default_value = "localhost")]
    pub master_addr: String,

    #[arg(long, env, default_value_t = 29500)]
    pub master_port: u16,

    /// Share of the GPU memory left free after warmup that the KV cache takes. 0.95
    /// rather than TGI's 1.0 leaves room for the decode CUDA graphs and allocator slack.
    #[arg(long, env, default_value_t = 0.95)]
    pub cuda_memory_fraction: f32,

    /// CPU threads of each shard's model (its rayon pool, candle's included). The shard's
    /// default: the machine's cores, less one for the router above 4 cores.
    #[arg(long, env)]
    pub num_threads: Option<usize>,

    /// Batch sizes whose decode steps the shards capture as CUDA graphs
    /// (comma-separated); 0 for none. The shard's default: 1,2,4,8,16,24,32,48,64,96,128,192,256.
    #[arg(long, env, value_delimiter = ',')]
    pub cuda_graphs: Option<Vec<usize>>,

    /// Log as JSON lines (the launcher's and its children's).
    #[arg(long, env)]
    pub json_output: bool,

    /// Require `Authorization: Bearer <key>` on every request.
    #[arg(long, env)]
    pub api_key: Option<String>,

    /// Origins allowed by CORS (comma-separated or repeated).
    #[arg(long, env, value_delimiter = ',')]
    pub cors_allow_origin: Vec<String>,

    /// Largest request body, in bytes.
    #[arg(long, env, default_value_t = 2_000_000)]
    pub payload_limit: usize,

    /// Seconds a child gets to exit after SIGTERM before it is killed.
    #[arg(long, env, default_value_t = 90)]
    pub graceful_termination_timeout: u64,

    /// Seconds to wait for every shard to load its model and listen.
    #[arg(long, env, default_value_t = 600)]
    pub shard_startup_timeout: u64,

    /// Seconds a shard may take to answer a decode step before the shard group is
    /// declared stuck (a step gets 10 ms more per token it computes): every request
    /// then fails with 503, and the launcher stops the group and exits non-zero.
    #[arg(long, env, default_value_t = 30.0)]
    pub shard_timeout: f64,

    /// Open HTTP connections at most (idle kept-alive ones included); more are answered
    /// 503 and closed.
    #[arg(long, env, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Seconds a client has to send a whole request head before its connection is closed.
    #[arg(long, env, default_value_t = 10.0)]
    pub header_timeout: f64,

    /// Refuse (422) requests with a grammar, `response_format` or `tools` (TGI's flag).
    #[arg(long, env)]
    pub disable_grammar_support: bool,

    /// Seconds the shards' warmup may take before the group is declared stuck.
    #[arg(long, env, default_value_t = 1800.0)]
    pub warmup_timeout: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Dtype {
    Float16,
    Bfloat16,
    Float32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Device {
    Cpu,
    Cuda,
}

/// The flag value clap parses, for passing a flag on to a child.
pub fn flag_value<T: ValueEnum>(value: &T) -> String {
    value.to_possible_value().expect("no skipped variants").get_name().to_string()
}

/// Token budgets handed to the router, defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenLimits {
    pub max_input_tokens: usize,
    pub max_total_tokens: usize,
    pub max_batch_prefill_tokens: usize,
    pub max_batch_total_tokens: Option<usize>,
}

impl Args {
    /// Checks that need nothing but the flags.
    pub fn validate(&self) -> Result<()> {
        if self.max_concurrent_requests == 0 {
            bail!("`--max-concurrent-requests` must be at least 1");
        }
        if self.max_batch_size == Some(0) {
            bail!("`--max-batch-size` must be at least 1");
        }
        if self.num_threads == Some(0) {
            bail!("`--num-threads` must be at least 1");
        }
        if self.waiting_served_ratio.is_nan() || self.waiting_served_ratio < 0.0 {
            bail!("`--waiting-served-ratio` must be >= 0, got {}", self.waiting_served_ratio);
        }
        if !(self.cuda_memory_fraction > 0.0 && self.cuda_memory_fraction <= 1.0) {
            bail!("`--cuda-memory-fraction` must be in (0, 1], got {}", self.cuda_memory_fraction);
        }
        if let Some(sizes) = &self.cuda_graphs {
            if sizes.len() > 1 && sizes.contains(&0) {
                bail!("`--cuda-graphs` takes batch sizes above 0, or 0 alone for none, got {sizes:?}");
            }
        }
        if self.payload_limit == 0 {
            bail!("`--payload-limit` must be at least 1 byte");
        }
        for (flag, seconds) in [
            ("--shard-timeout", self.shard_timeout),
            ("--warmup-timeout", self.warmup_timeout),
            ("--header-timeout", self.header_timeout),
        ] {
            if !(seconds.is_finite() && seconds > 0.0) {
                bail!("`{flag}` must be a positive number of seconds, got {seconds}");
            }
        }
        if self.max_top_n_tokens > MAX_TOP_N_TOKENS {
            bail!(
                "`--max-top-n-tokens` must be at most {MAX_TOP_N_TOKENS} (the shard's sampler keeps that many alternatives), got {}",
                self.max_top_n_tokens
            );
        }
        if self.shard_uds_path.is_empty() {
            bail!("`--shard-uds-path` must not be empty");
        }
        Ok(())
    }

    /// How many shards to start. `visible_gpus` counts CUDA_VISIBLE_DEVICES, if set.
    pub fn num_shard(&self, visible_gpus: Option<usize>) -> Result<usize> {
        match (self.sharded, self.num_shard) {
            (_, Some(0)) => bail!("`--num-shard` must be at least 1"),
            (Some(false), Some(n)) if n > 1 => {
                bail!("`--sharded false` contradicts `--num-shard {n}`")
            }
            (Some(true), Some(1)) => bail!("`--sharded true` needs `--num-shard` > 1"),
            (_, Some(n)) => Ok(n),
            (Some(true), None) => match visible_gpus {
                Some(n) if n > 1 => Ok(n),
                Some(n) => bail!(
                    "`--sharded true` found {n} GPU(s) in CUDA_VISIBLE_DEVICES: set `--num-shard` \
                     or make more GPUs visible"
                ),
                None => bail!("`--sharded true` needs `--num-shard` (CUDA_VISIBLE_DEVICES is unset)"),
            },
            (_, None) => Ok(1),
        }
    }

    /// Fills in TGI's defaults from the model's context length and checks the budgets
    /// against each other.
    pub fn token_limits(&self, max_position_embeddings: Option<usize>) -> Result<TokenLimits> {
        let default_total = max_position_embeddings
            .map_or(DEFAULT_MAX_TOTAL_TOKENS, |n| n.min(DEFAULT_MAX_TOTAL_TOKENS));
        let max_total_tokens = self.max_total_tokens.unwrap_or_else(|| {
            // A longer prompt than the default context asks for room to generate after it.
            default_total.max(self.max_input_tokens.map_or(0, |n| n + 1))
        });
        if max_total_tokens < 2 {
            bail!("`--max-total-tokens` must be at least 2, got {max_total_tokens}");
        }
        let max_input_tokens = self.max_input_tokens.unwrap_or(max_total_tokens - 1);
        // The default never contradicts an explicit `--max-batch-total-tokens`.
        let max_batch_prefill_tokens = self.max_batch_prefill_tokens.unwrap_or_else(|| {
            (max_input_tokens + DEFAULT_PREFILL_SLACK).min(self.max_batch_total_tokens.unwrap_or(usize::MAX))
        });
        if max_input_tokens == 0 {
            bail!("`--max-input-tokens` must be at least 1");
        }
        if max_input_tokens >= max_total_tokens {
            bail!(
                "`--max-input-tokens` ({max_input_tokens}) must be < `--max-total-tokens` \
                 ({max_total_tokens})"
            );
        }
        // A smaller prefill budget than the longest prompt is fine: the shards prefill
        // long prompts in chunks.
        if let Some(batch_total) = self.max_batch_total_tokens {
            if max_batch_prefill_tokens > batch_total {
                bail!(
                    "`--max-batch-prefill-tokens` ({max_batch_prefill_tokens}) must be <= \
                     `--max-batch-total-tokens` ({batch_total})"
                );
            }
            if max_total_tokens > batch_total {
                bail!(
                    "`--max-total-tokens` ({max_total_tokens}) must be <= \
                     `--max-batch-total-tokens` ({batch_total})"
                );
            }
        }
        if let Some(positions) = max_position_embeddings {
            if max_total_tokens > positions {
                tracing::warn!(
                    "`--max-total-tokens` ({max_total_tokens}) exceeds the model's context \
                     length ({positions}): longer sequences may degrade"
                );
            }
        }
        Ok(TokenLimits {
            max_input_tokens,
            max_total_tokens,
            max_batch_prefill_tokens,
            max_batch_total_tokens: self.max_batch_total_tokens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(flags: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("text-generation-launcher").chain(flags.iter().copied()))
            .unwrap()
    }

    #[test]
    fn defaults_follow_tgi() {
        let args = parse(&[]);
        assert_eq!(args.model_id, "HuggingFaceTB/SmolLM2-135M-Instruct");
        assert_eq!(args.port, 3000);
        assert_eq!(args.max_concurrent_requests, 128);
        assert_eq!(args.payload_limit, 2_000_000);
        assert_eq!(args.shard_uds_path, "/tmp/text-generation-server");
        args.validate().unwrap();
        assert_eq!(args.num_shard(None).unwrap(), 1);
    }

    #[test]
    fn token_defaults_derive_from_context_length() {
        let args = parse(&[]);
        let limits = args.token_limits(Some(8192)).unwrap();
        assert_eq!(
            limits,
            TokenLimits {
                max_input_tokens: 4095,
                max_total_tokens: 4096,
                max_batch_prefill_tokens: 4145,
                max_batch_total_tokens: None,
            }
        );
        let short = args.token_limits(Some(2048)).unwrap();
        assert_eq!((short.max_input_tokens, short.max_total_tokens), (2047, 2048));
        assert_eq!(args.token_limits(None).unwrap().max_total_tokens, 4096);
        let long_prompt = parse(&["--max-input-tokens", "5000"]).token_limits(Some(8192)).unwrap();
        assert_eq!(long_prompt.max_total_tokens, 5001);
        assert_eq!(long_prompt.max_batch_prefill_tokens, 5050);
        let small_cache = parse(&["--max-total-tokens", "1024", "--max-input-tokens", "1000", "--max-batch-total-tokens", "1024"]);
        assert_eq!(small_cache.token_limits(Some(8192)).unwrap().max_batch_prefill_tokens, 1024);
    }

    #[test]
    fn inconsistent_token_limits_name_the_flag() {
        let err = |flags: &[&str]| parse(flags).token_limits(Some(8192)).unwrap_err().to_string();
        assert!(err(&["--max-input-tokens", "100", "--max-total-tokens", "100"])
            .contains("`--max-input-tokens` (100) must be < `--max-total-tokens` (100)"));
        assert!(err(&["--max-batch-prefill-tokens", "4145", "--max-batch-total-tokens", "2000"])
            .contains("`--max-batch-prefill-tokens` (4145) must be <= `--max-batch-total-tokens`"));
        assert!(err(&[
            "--max-total-tokens",
            "4096",
            "--max-batch-prefill-tokens",
            "1000",
            "--max-input-tokens",
            "1000",
            "--max-batch-total-tokens",
            "2000"
        ])
        .contains("`--max-total-tokens` (4096) must be <= `--max-batch-total-tokens`"));
    }

    #[test]
    fn prefix_caching_is_on_unless_turned_off_with_a_boolish_value() {
        assert!(parse(&[]).prefix_caching);
        assert!(parse(&["--prefix-caching"]).prefix_caching);
        for off in ["0", "false", "False"] {
            assert!(!parse(&["--prefix-caching", off]).prefix_caching, "{off}");
        }
        assert!(parse(&["--prefix-caching", "1"]).prefix_caching);
        assert!(Args::try_parse_from(["launcher", "--prefix-caching", "maybe"]).is_err());
        let small_prefill = parse(&["--max-input-tokens", "100", "--max-batch-prefill-tokens", "50"]);
        assert_eq!(small_prefill.token_limits(Some(8192)).unwrap().max_batch_prefill_tokens, 50, "chunked");
    }

    #[test]
    fn shard_count_checks() {
        assert!(parse(&["--num-shard", "0"]).num_shard(None).unwrap_err().to_string().contains("--num-shard"));
        assert!(parse(&["--sharded", "false", "--num-shard", "2"]).num_shard(None).is_err());
        assert!(parse(&["--sharded", "true", "--num-shard", "1"]).num_shard(None).is_err());
        assert_eq!(parse(&["--sharded", "true"]).num_shard(Some(4)).unwrap(), 4);
        assert!(parse(&["--sharded", "true"]).num_shard(None).is_err());
        assert_eq!(parse(&["--num-shard", "2"]).num_shard(None).unwrap(), 2);
    }

    #[test]
    fn unsupported_values_are_refused() {
        let err = |flags: &[&str]| parse(flags).validate().unwrap_err().to_string();
        assert!(err(&["--cuda-memory-fraction", "0"]).contains("--cuda-memory-fraction"));
        assert!(err(&["--num-threads", "0"]).contains("`--num-threads` must be at least 1"));
        assert!(err(&["--max-concurrent-requests", "0"]).contains("--max-concurrent-requests"));
        assert!(err(&["--shard-timeout", "0"]).contains("`--shard-timeout` must be a positive"));
        assert!(err(&["--warmup-timeout=-1"]).contains("`--warmup-timeout` must be a positive"));
        assert!(err(&["--cuda-graphs", "0,8"]).contains("--cuda-graphs"));
        assert!(err(&["--max-top-n-tokens", "33"]).contains("`--max-top-n-tokens` must be at most 32"));
        assert!(parse(&["--max-top-n-tokens", "32"]).validate().is_ok());
        assert!(parse(&["--cuda-graphs", "0"]).validate().is_ok());
        assert_eq!(parse(&["--cuda-graphs", "1,4"]).cuda_graphs, Some(vec![1, 4]));
        assert!(Args::try_parse_from(["launcher", "--dtype", "int3"]).is_err());
        let unknown = Args::try_parse_from(["launcher", "--quantize", "eetq"]).unwrap_err().to_string();
        assert!(unknown.contains("--quantize") && unknown.contains("bitsandbytes-nf4"), "{unknown}");
        assert_eq!(parse(&["--quantize", "bitsandbytes-nf4"]).quantize, Some(QuantizeArg::BitsandbytesNf4));
        assert_eq!(flag_value(&Dtype::Bfloat16), "bfloat16");
    }

    #[test]
    fn cors_origins_split_on_commas() {
        let args = parse(&["--cors-allow-origin", "http://a,http://b"]);
        assert_eq!(args.cors_allow_origin, vec!["http://a", "http://b"]);
    }
}
