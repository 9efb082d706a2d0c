//! `text-generation-launcher`: resolves the model (downloading it from the Hub if
//! needed), starts one `text-generation-shard` per rank, waits until each listens on
//! its unix socket, starts `text-generation-router` in front of them, and supervises
//! them all: a signal stops the router then the shards; any child exiting on its own
//! stops the rest and fails the launcher.

mod args;
mod model;
mod process;

use anyhow::{anyhow, bail, Context, Result};
use args::{flag_value, Args, TokenLimits};
use clap::Parser;
use model_store::ModelFiles;
use process::{stop_all, ExitReport, ManagedProcess, ProcessSpec};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use tokio::net::{TcpStream, UnixStream};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;
use tokio::time::{sleep, Instant};

/// How often startup waits log that they are still waiting.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);
/// How often startup waits probe the sockets.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

// One thread: the children's parent-death signal (set in `process`) follows the thread
// that spawned them, so that thread must live as long as the launcher.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.json_output);
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_target(false);
    if json {
        logs.json().init();
    } else {
        logs.init();
    }
}

async fn run(args: Args) -> Result<()> {
    args.validate()?;
    let num_shard = args.num_shard(cuda_visible_devices())?;
    check_port_free(&args.hostname, args.port)?;
    let shard_program = find_binary("text-generation-shard")?;
    let router_program = find_binary("text-generation-router")?;

    let (model_id, revision) = (args.model_id.clone(), args.revision.clone());
    let model_path = tokio::task::spawn_blocking(move || model::resolve(&model_id, revision.as_deref()))
        .await
        .context("model resolution panicked")??;
    let files = ModelFiles::open(&model_path)
        .with_context(|| format!("`--model-id` {}: not a servable model", args.model_id))?;
    let limits = args.token_limits(files.max_position_embeddings()?)?;
    // The shards check it too; here the error comes before anything starts.
    let quantization = files.quantization(args.quantize)?;
    tracing::info!(
        quantization = %quantization.map_or_else(|| "none".to_string(), |q| q.to_string()),
        num_shard,
        limits.max_input_tokens,
        limits.max_total_tokens,
        limits.max_batch_prefill_tokens,
        "Serving {} from {}",
        args.model_id,
        model_path.display()
    );
    let plan = Plan { num_shard, model_path, limits, shard_program, router_program };

    let mut supervisor = Supervisor::new(Duration::from_secs(args.graceful_termination_timeout))?;
    let outcome = supervisor.serve(&args, &plan).await;
    supervisor.shutdown().await;
    remove_sockets(&args.shard_uds_path, plan.num_shard);
    match outcome {
        Stop::Signal(name) => {
            tracing::info!("Stopped on {name}");
            Ok(())
        }
        Stop::Failed(e) => Err(e),
    }
}

/// Everything settled before any process starts.
struct Plan {
    num_shard: usize,
    model_path: PathBuf,
    limits: TokenLimits,
    shard_program: PathBuf,
    router_program: PathBuf,
}

/// Why serving ended.
enum Stop {
    Signal(&'static str),
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for Stop {
    fn from(e: anyhow::Error) -> Self {
        Stop::Failed(e)
    }
}

enum Event {
    Signal(&'static str),
    Exited(ExitReport),
}

impl From<Event> for Stop {
    fn from(event: Event) -> Self {
        match event {
            Event::Signal(name) => Stop::Signal(name),
            Event::Exited(report) => {
                let mut message = format!("{} exited unexpectedly ({})", report.name, report.describe());
                if !report.stderr_tail.is_empty() {
                    message.push_str("; its last stderr lines:\n");
                    message.push_str(&report.stderr_tail.join("\n"));
                }
                Stop::Failed(anyhow!(message))
            }
        }
    }
}

struct Supervisor {
    shards: Vec<ManagedProcess>,
    router: Vec<ManagedProcess>,
    exits_tx: mpsc::UnboundedSender<ExitReport>,
    exits_rx: mpsc::UnboundedReceiver<ExitReport>,
    sigint: Signal,
    sigterm: Signal,
    grace: Duration,
}

impl Supervisor {
    fn new(grace: Duration) -> Result<Self> {
        let (exits_tx, exits_rx) = mpsc::unbounded_channel();
        Ok(Self {
            shards: Vec::new(),
            router: Vec::new(),
            exits_tx,
            exits_rx,
            sigint: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            sigterm: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            grace,
        })
    }

    async fn next_event(&mut self) -> Event {
        tokio::select! {
            _ = self.sigint.recv() => Event::Signal("SIGINT"),
            _ = self.sigterm.recv() => Event::Signal("SIGTERM"),
            // Never `None`: `self` holds a sender.
            Some(report) = self.exits_rx.recv() => Event::Exited(report),
        }
    }

    /// Starts everything, then waits for a signal or a child's exit. Only returns to stop.
    async fn serve(&mut self, args: &Args, plan: &Plan) -> Stop {
        match self.start(args, plan).await {
            Ok(()) => self.next_event().await.into(),
            Err(stop) => stop,
        }
    }

    async fn start(&mut self, args: &Args, plan: &Plan) -> Result<(), Stop> {
        for rank in 0..plan.num_shard {
            clear_stale_socket(&shard_socket(&args.shard_uds_path, rank)).await?;
        }
        for rank in 0..plan.num_shard {
            let spec = shard_spec(args, rank, plan.num_shard, &plan.model_path, &plan.shard_program);
            self.shards.push(ManagedProcess::spawn(spec, self.exits_tx.clone())?);
        }
        let deadline = Instant::now() + Duration::from_secs(args.shard_startup_timeout);
        for rank in 0..plan.num_shard {
            let socket = shard_socket(&args.shard_uds_path, rank);
            let what = format!("shard-{rank} to listen on {}", socket.display());
            let socket = &socket;
            self.wait_until_ready(&what, Some(deadline), || async move { UnixStream::connect(socket).await.is_ok() })
                .await?;
        }

        let spec = router_spec(args, &plan.model_path, &plan.limits, &plan.router_program);
        self.router.push(ManagedProcess::spawn(spec, self.exits_tx.clone())?);
        let address = (probe_host(&args.hostname), args.port);
        let what = format!("the router to listen on port {}", args.port);
        // No deadline: the router warms the shards up first, as long as that takes.
        self.wait_until_ready(&what, None, || async move { TcpStream::connect(address).await.is_ok() }).await?;
        tracing::info!("Ready: serving {} on http://{}:{}", args.model_id, args.hostname, args.port);
        Ok(())
    }

    /// Polls `ready` until it holds, logging progress; a signal or a child's exit, or
    /// passing `deadline`, ends the wait.
    async fn wait_until_ready<F, Fut>(&mut self, what: &str, deadline: Option<Instant>, ready: F) -> Result<(), Stop>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let started = Instant::now();
        let mut next_progress = started + PROGRESS_INTERVAL;
        while !ready().await {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(anyhow!(
                    "timed out after {}s waiting for {what} (see `--shard-startup-timeout`)",
                    started.elapsed().as_secs()
                )
                .into());
            }
            if Instant::now() >= next_progress {
                tracing::info!("Waiting for {what} ({}s)", started.elapsed().as_secs());
                next_progress += PROGRESS_INTERVAL;
            }
            tokio::select! {
                event = self.next_event() => return Err(event.into()),
                _ = sleep(POLL_INTERVAL) => {}
            }
        }
        tracing::info!("Ready after {:.1}s: {what}", started.elapsed().as_secs_f32());
        Ok(())
    }

    /// The router first (it drains requests), then the shards.
    async fn shutdown(&mut self) {
        stop_all(&mut self.router, self.grace).await;
        stop_all(&mut self.shards, self.grace).await;
    }
}

fn shard_socket(prefix: &str, rank: usize) -> PathBuf {
    PathBuf::from(format!("{prefix}-{rank}"))
}

/// A socket file nobody listens on is left from a crash: remove it so the shard can
/// bind. One that answers belongs to a running server.
async fn clear_stale_socket(socket: &Path) -> Result<()> {
    if !socket.exists() {
        return Ok(());
    }
    if UnixStream::connect(socket).await.is_ok() {
        bail!(
            "`--shard-uds-path`: a server already listens on {}; stop it or choose another path",
            socket.display()
        );
    }
    std::fs::remove_file(socket).with_context(|| format!("removing stale socket {}", socket.display()))
}

fn remove_sockets(prefix: &str, num_shard: usize) {
    for rank in 0..num_shard {
        let _ = std::fs::remove_file(shard_socket(prefix, rank));
    }
}

fn shard_spec(args: &Args, rank: usize, num_shard: usize, model_path: &Path, program: &Path) -> ProcessSpec {
    let mut flags = vec![
        "--model-path".to_string(),
        model_path.display().to_string(),
        "--uds-path".into(),
        args.shard_uds_path.clone(),
        "--cuda-memory-fraction".into(),
        args.cuda_memory_fraction.to_string(),
    ];
    if let Some(dtype) = &args.dtype {
        flags.extend(["--dtype".into(), flag_value(dtype)]);
    }
    if let Some(device) = &args.device {
        flags.extend(["--device".into(), flag_value(device)]);
    }
    if let Some(quantize) = &args.quantize {
        flags.extend(["--quantize".into(), flag_value(quantize)]);
    }
    if let Some(sizes) = &args.cuda_graphs {
        let sizes: Vec<String> = sizes.iter().map(usize::to_string).collect();
        flags.extend(["--cuda-graphs".into(), sizes.join(",")]);
    }
    if let Some(threads) = args.num_threads {
        flags.extend(["--num-threads".into(), threads.to_string()]);
    }
    if args.json_output {
        flags.push("--json-output".into());
    }
    let envs = [
        ("RANK", rank.to_string()),
        ("WORLD_SIZE", num_shard.to_string()),
        ("MASTER_ADDR", args.master_addr.clone()),
        ("MASTER_PORT", args.master_port.to_string()),
    ];
    ProcessSpec {
        name: format!("shard-{rank}"),
        program: program.to_path_buf(),
        args: flags,
        envs: envs.map(|(k, v)| (k.to_string(), v)).to_vec(),
        json_output: args.json_output,
    }
}

fn router_spec(args: &Args, model_path: &Path, limits: &TokenLimits, program: &Path) -> ProcessSpec {
    let mut flags: Vec<String> = [
        ("--model-path", model_path.display().to_string()),
        ("--model-id", args.model_id.clone()),
        ("--master-shard-uds-path", shard_socket(&args.shard_uds_path, 0).display().to_string()),
        ("--hostname", args.hostname.clone()),
        ("--port", args.port.to_string()),
        ("--max-concurrent-requests", args.max_concurrent_requests.to_string()),
        ("--max-stop-sequences", args.max_stop_sequences.to_string()),
        ("--max-top-n-tokens", args.max_top_n_tokens.to_string()),
        ("--max-input-tokens", limits.max_input_tokens.to_string()),
        ("--max-total-tokens", limits.max_total_tokens.to_string()),
        ("--max-batch-prefill-tokens", limits.max_batch_prefill_tokens.to_string()),
        ("--waiting-served-ratio", args.waiting_served_ratio.to_string()),
        ("--max-waiting-tokens", args.max_waiting_tokens.to_string()),
        ("--payload-limit", args.payload_limit.to_string()),
        ("--shard-timeout", args.shard_timeout.to_string()),
        ("--warmup-timeout", args.warmup_timeout.to_string()),
        ("--max-connections", args.max_connections.to_string()),
        ("--header-timeout", args.header_timeout.to_string()),
        ("--prefix-caching", args.prefix_caching.to_string()),
    ]
    .into_iter()
    .flat_map(|(flag, value)| [flag.to_string(), value])
    .collect();
    let optional = [
        ("--max-batch-total-tokens", limits.max_batch_total_tokens.map(|n| n.to_string())),
        ("--max-batch-size", args.max_batch_size.map(|n| n.to_string())),
    ];
    for (flag, value) in optional {
        if let Some(value) = value {
            flags.extend([flag.to_string(), value]);
        }
    }
    for origin in &args.cors_allow_origin {
        flags.extend(["--cors-allow-origin".to_string(), origin.clone()]);
    }
    if args.json_output {
        flags.push("--json-output".into());
    }
    if args.disable_grammar_support {
        flags.push("--disable-grammar-support".into());
    }
    ProcessSpec {
        name: "router".into(),
        program: program.to_path_buf(),
        args: flags,
        // In the environment, not on the command line, where `ps` would show it.
        envs: args.api_key.iter().map(|key| ("API_KEY".to_string(), key.clone())).collect(),
        json_output: args.json_output,
    }
}

/// The sibling binary next to our own executable (as `cargo build` lays them out),
/// else the first on PATH.
fn find_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the launcher executable")?;
    let exe_dir = exe.parent().context("the launcher executable has no directory")?;
    let beside = exe_dir.join(name);
    if beside.is_file() {
        return Ok(beside);
    }
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|dir| dir.join(name)).find(|p| p.is_file()))
        .with_context(|| format!("cannot find {name} next to the launcher ({}) or on PATH", exe_dir.display()))
}

/// GPUs listed in CUDA_VISIBLE_DEVICES, when it is set.
fn cuda_visible_devices() -> Option<usize> {
    let devices = std::env::var("CUDA_VISIBLE_DEVICES").ok()?;
    Some(devices.split(',').filter(|d| !d.trim().is_empty()).count())
}

/// Fails early, naming the flag, when the router could not listen.
fn check_port_free(hostname: &str, port: u16) -> Result<()> {
    std::net::TcpListener::bind((hostname, port))
        .map(drop)
        .with_context(|| format!("`--port` {port}: cannot listen on {hostname}:{port} (in use?)"))
}

/// Where to probe a server listening on `hostname`: wildcard addresses via loopback.
fn probe_host(hostname: &str) -> &str {
    match hostname {
        "0.0.0.0" => "127.0.0.1",
        "::" | "[::]" => "::1",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(flags: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("launcher").chain(flags.iter().copied())).unwrap()
    }

    fn flag<'a>(spec: &'a ProcessSpec, name: &str) -> Option<&'a str> {
        let at = spec.args.iter().position(|a| a == name)?;
        spec.args.get(at + 1).map(String::as_str)
    }

    #[test]
    fn shard_gets_its_rank_and_passthrough_flags() {
        let args = args(&["--dtype", "bfloat16", "--shard-uds-path", "/tmp/x", "--master-port", "1234", "--num-threads", "3", "--quantize", "bitsandbytes-fp4"]);
        let spec = shard_spec(&args, 1, 2, Path::new("/m.gguf"), Path::new("/bin/shard"));
        assert_eq!(flag(&spec, "--num-threads"), Some("3"));
        let default_threads = shard_spec(&self::args(&[]), 0, 1, Path::new("/m.gguf"), Path::new("/bin/shard"));
        assert_eq!(flag(&default_threads, "--num-threads"), None);
        assert_eq!(spec.name, "shard-1");
        assert_eq!(flag(&spec, "--model-path"), Some("/m.gguf"));
        assert_eq!(flag(&spec, "--uds-path"), Some("/tmp/x"));
        assert_eq!(flag(&spec, "--dtype"), Some("bfloat16"));
        assert_eq!(flag(&spec, "--device"), None);
        assert_eq!(flag(&spec, "--quantize"), Some("bitsandbytes-fp4"));
        assert!(spec.envs.contains(&("RANK".into(), "1".into())));
        assert!(spec.envs.contains(&("WORLD_SIZE".into(), "2".into())));
        assert!(spec.envs.contains(&("MASTER_PORT".into(), "1234".into())));
    }

    #[test]
    fn router_gets_the_limits_and_rank_zero_socket() {
        let args = args(&["--model-id", "org/m", "--cors-allow-origin", "http://a,http://b", "--port", "8080"]);
        let limits = args.token_limits(Some(2048)).unwrap();
        let spec = router_spec(&args, Path::new("/cache/m"), &limits, Path::new("/bin/router"));
        assert_eq!(flag(&spec, "--master-shard-uds-path"), Some("/tmp/text-generation-server-0"));
        assert_eq!(flag(&spec, "--model-id"), Some("org/m"));
        assert_eq!(flag(&spec, "--max-total-tokens"), Some("2048"));
        assert_eq!(flag(&spec, "--max-input-tokens"), Some("2047"));
        assert_eq!(flag(&spec, "--max-batch-prefill-tokens"), Some("2097"));
        assert_eq!(flag(&spec, "--max-batch-total-tokens"), None);
        assert_eq!(flag(&spec, "--port"), Some("8080"));
        assert_eq!(flag(&spec, "--shard-timeout"), Some("30"));
        assert_eq!(flag(&spec, "--warmup-timeout"), Some("1800"));
        assert_eq!(flag(&spec, "--max-connections"), Some("4096"));
        assert_eq!(flag(&spec, "--header-timeout"), Some("10"));
        assert_eq!(flag(&spec, "--prefix-caching"), Some("true"));
        assert_eq!(spec.args.iter().filter(|a| *a == "--cors-allow-origin").count(), 2);
        assert!(!spec.args.contains(&"--json-output".to_string()));
        assert!(!spec.args.contains(&"--disable-grammar-support".to_string()));
        let no_grammars = router_spec(&self::args(&["--disable-grammar-support"]), Path::new("/m"), &limits, Path::new("/r"));
        assert!(no_grammars.args.contains(&"--disable-grammar-support".to_string()));
        assert!(spec.envs.is_empty());
        let with_key = router_spec(&self::args(&["--api-key", "secret"]), Path::new("/m"), &limits, Path::new("/r"));
        assert_eq!(with_key.envs, vec![("API_KEY".to_string(), "secret".to_string())]);
        assert!(!with_key.args.iter().any(|a| a.contains("secret")));
    }


    #[test]
    fn port_in_use_names_the_flag() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let err = check_port_free("127.0.0.1", port).unwrap_err().to_string();
        assert!(err.contains(&format!("`--port` {port}")), "{err}");
        drop(taken);
        check_port_free("127.0.0.1", port).unwrap();
    }

    #[tokio::test]
    async fn stale_sockets_are_removed_live_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("s-0");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        assert!(clear_stale_socket(&socket).await.unwrap_err().to_string().contains("already listens"));
        drop(listener);
        clear_stale_socket(&socket).await.unwrap();
        assert!(!socket.exists());
    }
}
