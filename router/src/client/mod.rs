//! gRPC access to the shards: one client per shard socket, and a sharded client
//! that sends every call to all shards of the model.

mod deadlines;
mod shard;
mod sharded;

#[cfg(test)]
pub mod fake_shard;

pub use shard::{ShardClient, StepTimings};
pub use deadlines::Deadlines;
pub use sharded::{ShardedClient, StuckCall};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("could not connect to shard {url}: {message}")]
    Connection { url: String, message: String },
    #[error("shard call failed: {0}")]
    Call(String),
    #[error("no shard to call")]
    NoShard,
    #[error("{0}")]
    Stuck(StuckCall),
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        ClientError::Call(status.message().to_string())
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;
