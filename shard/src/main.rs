//! `text-generation-shard`: serves one shard of a model to the router (see `server`).

use clap::Parser;
use text_generation_shard::server::{run, ShardArgs};

#[tokio::main]
async fn main() {
    let args = ShardArgs::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    if args.json_output {
        logs.json().init();
    } else {
        logs.init();
    }
    if let Err(e) = run(args).await {
        tracing::error!("{e:#}");
        std::process::exit(1);
    }
}
