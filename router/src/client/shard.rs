//! One shard, reached over its unix socket.

use std::time::Duration;

use hyper_util::rt::TokioIo;
use proto::v3::text_generation_service_client::TextGenerationServiceClient;
use proto::v3::{
    Batch, CachedBatch, ClearCacheRequest, DecodeRequest, FilterBatchRequest, Generation,
    HealthRequest, InfoRequest, InfoResponse, PrefillRequest, ServiceDiscoveryRequest,
    WarmupRequest,
};
use tonic::transport::{Channel, Endpoint};

use super::{ClientError, Result};

/// How long the shards took for one Prefill or Decode, as they report it.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepTimings {
    pub forward: Duration,
    pub decode: Duration,
    pub concat: Option<Duration>,
}

/// The answer of a Prefill or Decode: one generation per live request, and the
/// cached batch left on the shard (None when every request finished).
pub type StepResult = (Vec<Generation>, Option<CachedBatch>, StepTimings);

/// Cheap to clone: clones share the connection.
#[derive(Debug, Clone)]
pub struct ShardClient {
    stub: TextGenerationServiceClient<Channel>,
    /// The socket, as errors name the shard.
    url: String,
}

impl ShardClient {
    /// `url` is a socket path, with or without the `unix://` scheme that ServiceDiscovery uses.
    pub async fn connect(url: &str) -> Result<Self> {
        let path = url.strip_prefix("unix://").unwrap_or(url).to_string();
        let connection_error = |message: String| ClientError::Connection {
            url: url.to_string(),
            message,
        };
        // The URI is required by tonic but unused: the connector dials the socket.
        let channel = Endpoint::try_from("http://[::]:50051")
            .map_err(|err| connection_error(err.to_string()))?
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .map_err(|err| connection_error(transport_error_message(&err)))?;
        Ok(Self {
            url: url.to_string(),
            stub: TextGenerationServiceClient::new(channel)
                // Warmup batches and long prompts exceed tonic's 4 MiB default.
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub async fn service_discovery(&mut self) -> Result<Vec<String>> {
        Ok(self
            .stub
            .service_discovery(ServiceDiscoveryRequest {})
            .await?
            .into_inner()
            .urls)
    }

    pub async fn info(&mut self) -> Result<InfoResponse> {
        Ok(self.stub.info(InfoRequest {}).await?.into_inner())
    }

    pub async fn health(&mut self) -> Result<()> {
        self.stub.health(HealthRequest {}).await?;
        Ok(())
    }

    /// Drops the cached batch `id`, or every cached batch when None.
    pub async fn clear_cache(&mut self, id: Option<u64>) -> Result<()> {
        self.stub.clear_cache(ClearCacheRequest { id }).await?;
        Ok(())
    }

    /// Keeps only `request_ids` of the cached batch.
    pub async fn filter_batch(
        &mut self,
        batch_id: u64,
        request_ids: Vec<u64>,
    ) -> Result<Option<CachedBatch>> {
        Ok(self
            .stub
            .filter_batch(FilterBatchRequest {
                batch_id,
                request_ids,
            })
            .await?
            .into_inner()
            .batch)
    }

    /// Returns the number of tokens the shard's KV cache holds.
    pub async fn warmup(&mut self, request: WarmupRequest) -> Result<u32> {
        Ok(self
            .stub
            .warmup(request)
            .await?
            .into_inner()
            .max_supported_total_tokens)
    }

    /// Prefills `batch`; with `cached_batch`, also runs one decode step of that
    /// cached batch in the same forward pass (a "mixed" step): the returned batch
    /// is then the union, under `batch.id`, and `cached_batch.id` is gone.
    pub async fn prefill(
        &mut self,
        batch: Batch,
        cached_batch: Option<CachedBatch>,
    ) -> Result<StepResult> {
        let response = self
            .stub
            .prefill(PrefillRequest {
                batch: Some(batch),
                cached_batch,
            })
            .await?
            .into_inner();
        let timings = StepTimings {
            forward: Duration::from_nanos(response.forward_ns),
            decode: Duration::from_nanos(response.decode_ns),
            concat: None,
        };
        Ok((response.generations, response.batch, timings))
    }

    /// One decoding step over the union of `batches`.
    /// One decode step; with `run_ahead` the shard starts the next one before answering
    /// (`DecodeRequest.run_ahead`).
    pub async fn decode(
        &mut self,
        batches: Vec<CachedBatch>,
        run_ahead: bool,
    ) -> Result<StepResult> {
        let response = self
            .stub
            .decode(DecodeRequest { batches, run_ahead })
            .await?
            .into_inner();
        let timings = StepTimings {
            forward: Duration::from_nanos(response.forward_ns),
            decode: Duration::from_nanos(response.decode_ns),
            concat: response.concat_ns.map(Duration::from_nanos),
        };
        Ok((response.generations, response.batch, timings))
    }
}

/// tonic's transport error says only "transport error"; the cause (socket missing,
/// permission denied) is in its source chain.
fn transport_error_message(err: &tonic::transport::Error) -> String {
    let mut message = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}
