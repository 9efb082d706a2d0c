//! `text-generation-shard`: serves one shard of a model to the router (see `server`).

use clap::Parser;
use text_generation_shard::server::{run, use_cpu_threads, ShardArgs};

fn main() {
    let args = ShardArgs::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    if args.json_output {
        logs.json().init();
    } else {
        logs.init();
    }
    // Before the async runtime's threads exist: this sets RAYON_NUM_THREADS.
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let threads = args.cpu_threads(cores);
    let started = use_cpu_threads(threads).and_then(|()| {
        tracing::info!(threads, cores, "CPU threads");
        Ok(tokio::runtime::Runtime::new()?)
    });
    let result = started.and_then(|runtime| runtime.block_on(run(args)));
    if let Err(e) = result {
        tracing::error!("{e:#}");
        std::process::exit(1);
    }
}
