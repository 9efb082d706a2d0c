//! What the routes need from inference, as a trait so that the app can be built
//! (and tested) without shards; `Infer` is the real implementation.

use crate::infer::Infer;
use crate::infer_types::{InferError, InferResponse, InferStreamResponse, ValidGenerateRequest};
use futures::future::BoxFuture;
use tokio::sync::OwnedSemaphorePermit;
use tokio_stream::wrappers::UnboundedReceiverStream;

pub type InferStream = UnboundedReceiverStream<Result<InferStreamResponse, InferError>>;

pub trait Backend: Send + Sync + 'static {
    /// The permit holds a slot of --max-concurrent-requests until dropped; dropping
    /// the stream cancels the generation.
    fn generate_stream(&self, request: ValidGenerateRequest)
        -> Result<(OwnedSemaphorePermit, InferStream), InferError>;
    fn generate(&self, request: ValidGenerateRequest) -> BoxFuture<'_, Result<InferResponse, InferError>>;
    fn health(&self) -> BoxFuture<'_, bool>;
}

impl Backend for Infer {
    fn generate_stream(
        &self,
        request: ValidGenerateRequest,
    ) -> Result<(OwnedSemaphorePermit, InferStream), InferError> {
        Infer::generate_stream(self, request)
    }

    fn generate(&self, request: ValidGenerateRequest) -> BoxFuture<'_, Result<InferResponse, InferError>> {
        Box::pin(Infer::generate(self, request))
    }

    fn health(&self) -> BoxFuture<'_, bool> {
        Box::pin(Infer::health(self))
    }
}
