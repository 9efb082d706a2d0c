//! The shard process: command line, model loading, and the `TextGenerationService`
//! gRPC server on a unix socket, whose handlers forward to the runner thread.

use crate::dist::{self, Rendezvous};
use crate::models::load_model_shard;
use crate::runner::warmup::KvMemory;
use crate::runner::worker::RunnerHandle;
use crate::runner::{Runner, RunnerConfig, DEFAULT_CUDA_GRAPH_BATCH_SIZES};
use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device};
use clap::{Parser, ValueEnum};
use model_store::quantization::QuantizeArg;
use model_store::ModelFiles;
use proto::v3::text_generation_service_server::{
    TextGenerationService, TextGenerationServiceServer,
};
use proto::v3::*;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request as GrpcRequest, Response, Status};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    Float32,
    Bfloat16,
    Float16,
}

impl From<DTypeArg> for DType {
    fn from(dtype: DTypeArg) -> Self {
        match dtype {
            DTypeArg::Float32 => DType::F32,
            DTypeArg::Bfloat16 => DType::BF16,
            DTypeArg::Float16 => DType::F16,
        }
    }
}

/// Serves one shard of a model to the router over a unix socket.
#[derive(Debug, Clone, Parser)]
#[command(name = "text-generation-shard", version)]
pub struct ShardArgs {
    /// HF-layout model directory or `.gguf` file.
    #[arg(long, env = "MODEL_PATH")]
    pub model_path: PathBuf,
    /// The socket is `{uds_path}-{rank}`.
    #[arg(long, env = "UDS_PATH")]
    pub uds_path: String,
    #[arg(long, env = "RANK", default_value_t = 0)]
    pub rank: u32,
    #[arg(long, env = "WORLD_SIZE", default_value_t = 1)]
    pub world_size: u32,
    #[arg(long, env = "MASTER_ADDR")]
    pub master_addr: Option<String>,
    #[arg(long, env = "MASTER_PORT")]
    pub master_port: Option<u16>,
    /// Activation and KV cache dtype; bfloat16 on CUDA and float32 on CPU by default.
    #[arg(long, env = "DTYPE", value_enum)]
    pub dtype: Option<DTypeArg>,
    /// Weight quantization (TGI's values): the checkpoint's own format (awq, gptq,
    /// marlin, fp8: checked against config.json's quantization_config), or dense weights
    /// quantized at load (fp8, bitsandbytes-nf4, bitsandbytes-fp4, bitsandbytes).
    #[arg(long, env = "QUANTIZE", value_enum)]
    pub quantize: Option<QuantizeArg>,
    /// cuda when built with CUDA and a GPU is present, else cpu.
    #[arg(long, env = "DEVICE", value_enum)]
    pub device: Option<DeviceArg>,
    /// Share of the free GPU memory (after warmup) that the KV cache takes.
    #[arg(long, env = "CUDA_MEMORY_FRACTION", default_value_t = 0.95)]
    pub cuda_memory_fraction: f64,
    /// KV cache size on CPU, unless the router fixes max_batch_total_tokens.
    #[arg(long, env = "CPU_KV_CACHE_MB", default_value_t = 1024)]
    pub cpu_kv_cache_mb: usize,
    /// Tokens per KV cache block.
    #[arg(long, env = "BLOCK_SIZE", default_value_t = 16)]
    pub block_size: usize,
    /// Batch sizes whose decode steps are captured as CUDA graphs (comma-separated);
    /// 0 for none. Larger batches, and other devices and dtypes, run eagerly.
    #[arg(long, env = "CUDA_GRAPHS", value_delimiter = ',',
          default_values_t = DEFAULT_CUDA_GRAPH_BATCH_SIZES)]
    pub cuda_graphs: Vec<usize>,
    /// CPU threads for the model (rayon's global pool, which candle's CPU ops and our
    /// quantized kernels share); default: the machine's cores, less one for the router
    /// above 4 cores.
    #[arg(long, env = "NUM_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    pub num_threads: Option<u16>,
    /// Log as JSON lines.
    #[arg(long, env = "JSON_OUTPUT")]
    pub json_output: bool,
    /// Testing: every rank of a tensor-parallel group on GPU 0, joined by the TCP
    /// communicator (CUDA tensors through host memory) instead of NCCL, and without
    /// decode CUDA graphs (those collectives cannot be captured). It checks sharded
    /// loading and layer math on CUDA on a machine with one GPU; far too slow to serve.
    #[arg(long, env = "TENSOR_PARALLEL_ON_ONE_GPU", hide = true)]
    pub tensor_parallel_on_one_gpu: bool,
    /// Debugging: the Prefill/Decode calls (1-based, comma-separated) that fail as a
    /// CUDA out-of-memory error would, to test recovery.
    #[arg(long, env = "DEBUG_FAIL_STEPS", value_delimiter = ',', hide = true)]
    pub debug_fail_steps: Vec<u64>,
}

impl ShardArgs {
    pub fn socket_path(&self, rank: u32) -> PathBuf {
        PathBuf::from(format!("{}-{rank}", self.uds_path))
    }

    /// `--num-threads`, or its default for `cores` cores.
    pub fn cpu_threads(&self, cores: usize) -> usize {
        match self.num_threads {
            Some(threads) => threads.into(),
            // On a few cores the router, idle but for tokenization, takes none of its own.
            None if cores <= 4 => cores,
            None => cores - 1,
        }
    }
}

/// Sizes rayon's global pool, before anything runs on it. candle sizes its matmul
/// parallelism from `RAYON_NUM_THREADS`, so that is set too, and `CANDLE_NUM_THREADS`
/// to 1: candle's other pool (its "barrier pool", for some quantized helpers) keeps
/// threads that spin for a while after each use, which took a core from the model at
/// every step (SmolLM2 decode 14.5 -> 10.0 ms per token on 2 cores); with 1 its work
/// runs inline on the calling thread. Call this before any other thread starts: it
/// changes the environment. The pool's idle threads sleep after a brief spin.
pub fn use_cpu_threads(threads: usize) -> Result<()> {
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    std::env::set_var("CANDLE_NUM_THREADS", "1");
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("model-cpu-{i}"))
        .build_global()
        .context("configuring the CPU thread pool")
}

/// How long the ranks of a tensor-parallel group wait for each other at start-up.
const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(120);

/// Loads the model and serves until SIGTERM or SIGINT.
pub async fn run(args: ShardArgs) -> Result<()> {
    ensure!(
        args.rank < args.world_size,
        "rank {} is not below world size {}",
        args.rank,
        args.world_size
    );
    ensure!(
        args.cuda_memory_fraction > 0.0 && args.cuda_memory_fraction <= 1.0,
        "--cuda-memory-fraction must be in (0, 1], got {}",
        args.cuda_memory_fraction
    );
    let load_args = args.clone();
    let runner = RunnerHandle::spawn(move || load_runner(&load_args)).await?;
    let info = runner.run(|runner| Ok(runner.info())).await?;
    let service = ShardService {
        runner: Arc::new(runner),
        info,
        urls: (0..args.world_size)
            .map(|r| format!("unix://{}", args.socket_path(r).display()))
            .collect(),
    };
    serve(service, &args.socket_path(args.rank), shutdown_signal()).await
}

/// Opens the model files, loads the weights and sets up the runner (on the runner thread).
fn load_runner(args: &ShardArgs) -> Result<Runner> {
    let one_gpu = args.tensor_parallel_on_one_gpu;
    let device = select_device(args.device, if one_gpu { 0 } else { args.rank as usize })?;
    let dtype = args.dtype.map(DType::from).unwrap_or(if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    });
    let files = ModelFiles::open(&args.model_path)?;
    let rendezvous = args.master_port.map(|master_port| Rendezvous {
        master_addr: args
            .master_addr
            .clone()
            .unwrap_or_else(|| "localhost".to_string()),
        master_port,
        timeout: RENDEZVOUS_TIMEOUT,
    });
    let communicator = if one_gpu {
        dist::Transport::Tcp
    } else {
        dist::Transport::for_device(&device)
    };
    let comm = dist::connect(
        args.rank as usize,
        args.world_size as usize,
        rendezvous.as_ref(),
        communicator,
        &device,
    )?;
    tracing::info!(path = %files.path().display(), ?device, ?dtype, "loading model");
    let model = load_model_shard(&files, &device, dtype, args.quantize, &comm)
        .with_context(|| format!("loading model {}", files.path().display()))?;
    let config = RunnerConfig {
        block_size: args.block_size,
        kv_memory: KvMemory {
            cuda_memory_fraction: args.cuda_memory_fraction,
            cpu_bytes: args.cpu_kv_cache_mb << 20,
        },
        rank: args.rank,
        world_size: args.world_size,
        cuda_graph_batch_sizes: if one_gpu && args.world_size > 1 {
            vec![]
        } else {
            cuda_graph_batch_sizes(&args.cuda_graphs)?
        },
        debug_fail_steps: args.debug_fail_steps.clone(),
    };
    Runner::new(model, device, &files, config)
}

/// `--cuda-graphs`: batch sizes, or a lone 0 for none.
fn cuda_graph_batch_sizes(sizes: &[usize]) -> Result<Vec<usize>> {
    if sizes == [0] {
        return Ok(vec![]);
    }
    ensure!(
        !sizes.contains(&0),
        "--cuda-graphs takes batch sizes above 0, or 0 alone for none, got {sizes:?}"
    );
    Ok(sizes.to_vec())
}

fn select_device(device: Option<DeviceArg>, ordinal: usize) -> Result<Device> {
    Ok(match device {
        Some(DeviceArg::Cpu) => Device::Cpu,
        Some(DeviceArg::Cuda) => Device::new_cuda(ordinal)
            .context("--device cuda needs a GPU and a build with the `cuda` feature")?,
        None => Device::cuda_if_available(ordinal)?,
    })
}

async fn shutdown_signal() {
    let mut sigterm = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        Ok(signal) => signal,
        Err(e) => {
            tracing::error!("cannot listen for SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM received, shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
    }
}

/// Serves `service` on the unix socket `path` until `shutdown` completes, then removes the socket.
pub async fn serve(
    service: ShardService,
    path: &Path,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    if path.exists() {
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    tracing::info!("Server started at unix://{}", path.display());
    let served = tonic::transport::Server::builder()
        .add_service(TextGenerationServiceServer::new(service))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;
    let _ = std::fs::remove_file(path);
    served.context("gRPC server")
}

pub struct ShardService {
    runner: Arc<RunnerHandle>,
    info: InfoResponse,
    urls: Vec<String>,
}

fn status(error: anyhow::Error) -> Status {
    Status::internal(format!("{error:#}"))
}

#[tonic::async_trait]
impl TextGenerationService for ShardService {
    async fn info(&self, _: GrpcRequest<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(self.info.clone()))
    }

    async fn health(
        &self,
        _: GrpcRequest<HealthRequest>,
    ) -> Result<Response<HealthResponse>, Status> {
        if self.info.world_size > 1 {
            // A health forward pass runs collectives, and the router does not order
            // Health against Prefill/Decode: on one rank it could pair up with another
            // rank's generation step. The runner thread answering is the check there.
            self.runner.run(|_| Ok(())).await.map_err(status)?;
        } else {
            self.runner.health().await.map_err(status)?;
        }
        Ok(Response::new(HealthResponse {}))
    }

    async fn service_discovery(
        &self,
        _: GrpcRequest<ServiceDiscoveryRequest>,
    ) -> Result<Response<ServiceDiscoveryResponse>, Status> {
        Ok(Response::new(ServiceDiscoveryResponse {
            urls: self.urls.clone(),
        }))
    }

    async fn clear_cache(
        &self,
        request: GrpcRequest<ClearCacheRequest>,
    ) -> Result<Response<ClearCacheResponse>, Status> {
        let id = request.into_inner().id;
        self.runner
            .run(move |runner| {
                runner.clear(id);
                Ok(())
            })
            .await
            .map_err(status)?;
        Ok(Response::new(ClearCacheResponse {}))
    }

    async fn filter_batch(
        &self,
        request: GrpcRequest<FilterBatchRequest>,
    ) -> Result<Response<FilterBatchResponse>, Status> {
        let request = request.into_inner();
        let batch = self
            .runner
            .run(move |runner| runner.filter(request.batch_id, &request.request_ids))
            .await
            .map_err(status)?;
        Ok(Response::new(FilterBatchResponse { batch: Some(batch) }))
    }

    async fn warmup(
        &self,
        request: GrpcRequest<WarmupRequest>,
    ) -> Result<Response<WarmupResponse>, Status> {
        let request = request.into_inner();
        let response = self
            .runner
            .run(move |runner| runner.warmup(request))
            .await
            .map_err(status)?;
        Ok(Response::new(response))
    }

    async fn prefill(
        &self,
        request: GrpcRequest<PrefillRequest>,
    ) -> Result<Response<PrefillResponse>, Status> {
        let PrefillRequest {
            batch,
            cached_batch,
        } = request.into_inner();
        let batch = batch.ok_or_else(|| Status::invalid_argument("prefill without a batch"))?;
        let response = self
            .runner
            .run(move |runner| runner.prefill(batch, cached_batch))
            .await
            .map_err(status)?;
        Ok(Response::new(response))
    }

    async fn decode(
        &self,
        request: GrpcRequest<DecodeRequest>,
    ) -> Result<Response<DecodeResponse>, Status> {
        let DecodeRequest { batches, run_ahead } = request.into_inner();
        let response = self
            .runner
            .run(move |runner| runner.decode(batches, run_ahead))
            .await
            .map_err(status)?;
        Ok(Response::new(response))
    }
}
