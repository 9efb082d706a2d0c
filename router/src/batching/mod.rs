//! Continuous batching (TGI's v3 backend): the queue of waiting requests, the
//! planning of when to grow the running batch, and the loop driving the shards.

mod health;
mod planner;
pub mod queue;
mod task;

#[cfg(test)]
mod end_to_end_tests;

pub use health::GenerationHealth;
pub use planner::BatchingConfig;
pub use queue::{Entry, Queue};
pub use task::batching_task;
