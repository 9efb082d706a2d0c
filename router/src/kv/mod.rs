//! The router's view of the shards' paged KV cache.

mod allocator;

pub use allocator::{BlockAllocation, BlockAllocator};
