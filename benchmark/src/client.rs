//! A gRPC client of one shard over its unix socket.

use anyhow::{bail, Context};
use hyper_util::rt::TokioIo;
use proto::v3::text_generation_service_client::TextGenerationServiceClient;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

pub type ShardClient = TextGenerationServiceClient<Channel>;

/// Connects to the shard socket, retrying until `timeout` while the shard loads its model.
pub async fn connect(uds_path: &Path, timeout: Duration) -> anyhow::Result<ShardClient> {
    let deadline = Instant::now() + timeout;
    loop {
        match try_connect(uds_path).await {
            Ok(channel) => {
                return Ok(
                    TextGenerationServiceClient::new(channel).max_decoding_message_size(usize::MAX)
                )
            }
            Err(err) if Instant::now() >= deadline => {
                bail!(
                    "could not connect to the shard at {} within {timeout:?}: {err:#}",
                    uds_path.display()
                )
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

async fn try_connect(uds_path: &Path) -> anyhow::Result<Channel> {
    let path = PathBuf::from(uds_path);
    // The URI is required by tonic but unused: every connection goes to the socket.
    let channel = Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .with_context(|| format!("connecting to {}", uds_path.display()))?;
    Ok(channel)
}
