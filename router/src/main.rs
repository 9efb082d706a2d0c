//! text-generation-router: the HTTP front of the server. It validates and
//! tokenizes requests, schedules them in continuous batches over the shards'
//! gRPC sockets, and answers in TGI's and OpenAI's APIs.

mod api;
mod batching;
mod client;
mod error;
mod http;
mod infer;
mod infer_types;
mod kv;
mod validation;

#[cfg(test)]
mod first_token_tests;

use anyhow::{ensure, Context};
use client::Deadlines;
use api::generate::Info;
use clap::Parser;
use http::metrics::prometheus_builder;
use http::server::{AppState, ServerConfig};
use infer::{Infer, SchedulerConfig};
use model_store::ModelFiles;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tracing_subscriber::EnvFilter;
use validation::chat_template::ChatTemplate;
use validation::grammar::GrammarSupport;
use validation::{Validation, ValidationLimits};

/// Every flag can also be given as the environment variable of its name (`MAX_INPUT_TOKENS`, ...).
#[derive(Parser, Debug)]
#[command(name = "text-generation-router", version, about)]
struct Args {
    /// A local model: a Hugging Face directory or a `.gguf` file (tokenizer, chat template, special tokens).
    #[arg(long, env)]
    model_path: PathBuf,
    /// The name reported by /info, /v1/models and OpenAI's `model` fields (default: the model file's name).
    #[arg(long, env)]
    model_id: Option<String>,
    #[arg(long, env, default_value = "/tmp/text-generation-server-0")]
    master_shard_uds_path: String,
    #[arg(long, env, default_value = "0.0.0.0")]
    hostname: String,
    #[arg(long, env, default_value_t = 3000)]
    port: u16,
    #[arg(long, env, default_value_t = 128)]
    max_concurrent_requests: usize,
    #[arg(long, env, default_value_t = 4)]
    max_stop_sequences: usize,
    #[arg(long, env, default_value_t = 5)]
    max_top_n_tokens: u32,
    #[arg(long, env, default_value_t = 1024)]
    max_input_tokens: u32,
    #[arg(long, env, default_value_t = 2048)]
    max_total_tokens: u32,
    #[arg(long, env, default_value_t = 4096)]
    max_batch_prefill_tokens: u32,
    /// Default: as many as the shards' KV cache holds.
    #[arg(long, env)]
    max_batch_total_tokens: Option<u32>,
    /// Keep the KV blocks of finished prompts and reuse them for later prompts that
    /// start with the same tokens (`PREFIX_CACHING=0` or `false` turns it off).
    #[arg(long, env, default_value_t = true, num_args = 0..=1, default_missing_value = "true",
        action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    prefix_caching: bool,
    #[arg(long, env)]
    max_batch_size: Option<usize>,
    #[arg(long, env, default_value_t = 0.3)]
    waiting_served_ratio: f32,
    #[arg(long, env, default_value_t = 20)]
    max_waiting_tokens: usize,
    /// Require `Authorization: Bearer <key>` on the generation routes.
    #[arg(long, env)]
    api_key: Option<String>,
    /// Repeatable (or comma-separated in the environment); `*` allows any origin.
    #[arg(long, env, value_delimiter = ',')]
    cors_allow_origin: Vec<String>,
    /// Largest accepted request body, in bytes.
    #[arg(long, env, default_value_t = 2_000_000)]
    payload_limit: usize,
    /// Log as JSON lines.
    #[arg(long, env)]
    json_output: bool,
    /// Threads tokenizing prompts (default: the number of CPUs, at most 4).
    #[arg(long, env)]
    tokenizer_workers: Option<usize>,
    /// Seconds a shard may take to answer a decode step before the shard group is
    /// declared stuck (a step gets 10 ms more per token it computes); the router then
    /// fails every request and exits, and the launcher stops the group.
    #[arg(long, env, default_value_t = 30.0, value_parser = positive_seconds)]
    shard_timeout: f64,
    /// Open HTTP connections at most; more are answered 503 and closed (idle keep-alive
    /// connections count too).
    #[arg(long, env, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Seconds a client has to send a whole request head (on a new connection, or the
    /// next request of a kept-alive one) before its connection is closed.
    #[arg(long, env, default_value_t = 10.0, value_parser = positive_seconds)]
    header_timeout: f64,
    /// Seconds the shards' warmup may take (the largest prefill, CUDA graphs, the KV
    /// cache's allocation).
    #[arg(long, env, default_value_t = 1800.0, value_parser = positive_seconds)]
    warmup_timeout: f64,
    /// Refuse (422) requests with a grammar, `response_format` or `tools`.
    #[arg(long, env)]
    disable_grammar_support: bool,
}

/// How long the router keeps answering 503 once the shard group is stuck, before it
/// exits: the failed requests' answers reach their clients first.
const STUCK_GRACE: Duration = Duration::from_secs(2);

fn positive_seconds(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds > 0.0 => Ok(seconds),
        _ => Err(format!("`{value}` is not a positive number of seconds")),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.json_output);
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal, not in relayed or collected logs.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    ensure!(
        args.max_input_tokens < args.max_total_tokens,
        "--max-input-tokens ({}) must be < --max-total-tokens ({})",
        args.max_input_tokens,
        args.max_total_tokens
    );
    let files = ModelFiles::open(&args.model_path)?;
    let tokenizer = files.tokenizer()?;
    let special = files.special_tokens()?;
    let chat_template = match files.chat_template()? {
        Some(source) => Some(Arc::new(
            ChatTemplate::new(source, special.bos_token.clone(), special.eos_token.clone())
                .context("the model's chat template does not parse")?,
        )),
        None => {
            tracing::warn!("the model has no chat template: /v1/chat/completions will answer 422");
            None
        }
    };
    let model_id = args.model_id.clone().unwrap_or_else(|| {
        let stem = files.path().file_stem().map(|s| s.to_string_lossy().into_owned());
        stem.unwrap_or_else(|| args.model_path.display().to_string())
    });

    let scheduler = SchedulerConfig {
        max_concurrent_requests: args.max_concurrent_requests,
        max_batch_prefill_tokens: args.max_batch_prefill_tokens,
        max_batch_total_tokens: args.max_batch_total_tokens,
        max_batch_size: args.max_batch_size,
        waiting_served_ratio: args.waiting_served_ratio,
        max_waiting_tokens: args.max_waiting_tokens,
        max_input_tokens: args.max_input_tokens,
        max_total_tokens: args.max_total_tokens,
        prefix_caching: args.prefix_caching,
    };
    let deadlines = Deadlines::new(
        Duration::from_secs_f64(args.shard_timeout),
        Duration::from_secs_f64(args.warmup_timeout),
    );
    let (infer, shards) = Infer::connect(&args.master_shard_uds_path, scheduler, deadlines)
        .await
        .with_context(|| format!("cannot reach the shard at {}", args.master_shard_uds_path))?;
    tracing::info!(
        world_size = shards.info.world_size,
        max_batch_total_tokens = shards.max_batch_total_tokens,
        "Connected"
    );

    let metrics = prometheus_builder(args.max_total_tokens).install_recorder()?;
    let upkeep = metrics.clone();
    // Histograms are drained only on upkeep; without it their samples pile up between scrapes.
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });

    let limits = ValidationLimits {
        max_input_tokens: args.max_input_tokens,
        max_total_tokens: args.max_total_tokens,
        max_stop_sequences: args.max_stop_sequences,
        max_top_n_tokens: args.max_top_n_tokens,
    };
    let workers = args
        .tokenizer_workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(4)));
    let generation_defaults = match validation::check_defaults(files.sampling_defaults()?, &limits) {
        Ok(defaults) => defaults,
        Err(error) => {
            tracing::warn!("generation_config.json's sampling values are ignored: {error}");
            Default::default()
        }
    };
    if generation_defaults != Default::default() {
        // As vLLM says it: requests that leave these unset do not get the API's defaults.
        tracing::info!(?generation_defaults, "the model's generation_config.json sets sampling defaults");
    }
    let grammar = GrammarSupport::new(&tokenizer, &special.eos_token_ids, args.disable_grammar_support);
    if let GrammarSupport::Unavailable(reason) = &grammar {
        tracing::warn!("requests with a grammar will answer 422: {reason}");
    }
    let validation = Validation::new(tokenizer, workers, limits, grammar)?;
    let info = Info {
        model_id,
        model_sha: None,
        model_dtype: shards.info.dtype.clone(),
        model_device_type: shards.info.device_type.clone(),
        model_pipeline_tag: Some("text-generation".into()),
        max_concurrent_requests: args.max_concurrent_requests,
        max_best_of: 1,
        max_stop_sequences: args.max_stop_sequences,
        max_top_n_tokens: args.max_top_n_tokens,
        max_input_tokens: args.max_input_tokens,
        max_total_tokens: args.max_total_tokens,
        max_batch_prefill_tokens: args.max_batch_prefill_tokens,
        max_batch_total_tokens: shards.max_batch_total_tokens,
        max_batch_size: args.max_batch_size,
        max_waiting_tokens: args.max_waiting_tokens,
        waiting_served_ratio: args.waiting_served_ratio,
        validation_workers: validation.workers(),
        world_size: shards.info.world_size,
        block_size: shards.info.block_size,
        prefix_caching: args.prefix_caching,
        quantization: shards.info.quantization.clone(),
        generation_defaults,
        router: env!("CARGO_PKG_NAME"),
        version: env!("CARGO_PKG_VERSION"),
        sha: option_env!("GIT_SHA"),
        docker_label: option_env!("DOCKER_LABEL"),
    };
    let stuck_watch = infer.clone();
    let state = AppState {
        backend: Arc::new(infer),
        validation: Arc::new(validation),
        chat_template,
        info: Arc::new(info),
        metrics,
    };
    let config = ServerConfig {
        api_key: args.api_key,
        cors_allow_origin: args.cors_allow_origin,
        payload_limit: args.payload_limit,
    };
    let app = http::server::app(state, &config);
    let listener = tokio::net::TcpListener::bind((args.hostname.as_str(), args.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.hostname, args.port))?;
    tracing::info!("Listening on {}", listener.local_addr()?);
    let connection_limits = http::listener::ConnectionLimits {
        max_connections: args.max_connections as usize,
        header_timeout: Duration::from_secs_f64(args.header_timeout),
    }
    .fit_open_file_limit();
    // A stuck shard group is never served again: fail fast, then exit so that the
    // launcher stops the group and exits non-zero (the orchestrator restarts the pod).
    let stuck = async {
        let call = stuck_watch.wait_stuck().await;
        tracing::error!("{call}; every request fails with 503 until the router exits in {STUCK_GRACE:?}");
        tokio::time::sleep(STUCK_GRACE).await;
        call
    };
    tokio::select! {
        served = http::listener::serve(listener, app, connection_limits, shutdown_signal()) => served?,
        call = stuck => anyhow::bail!("stopping: {call}"),
    }
    tracing::info!("Shut down");
    Ok(())
}

/// Ctrl-C or SIGTERM (what the launcher and container runtimes send).
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = terminate => {},
    }
}
