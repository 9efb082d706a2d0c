//! The shard's library: model execution (models, layers, weights) and the paged KV
//! cache, shared by the `text-generation-shard` binary and the integration tests.

pub mod cache;
pub mod dist;
pub mod layers;
pub mod models;
pub mod runner;
pub mod server;
pub mod weights;
