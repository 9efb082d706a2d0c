//! The router's view of the shards' paged KV cache (as TGI v3 / vLLM do: the router
//! decides where every token lives, the shards just write there).
//!
//! `BlockAllocator` is a handle over one of two implementations of [`Allocator`]:
//! `simple` (a free list) and `radix` (prefix caching: the blocks of computed prompts
//! are cached in a radix tree, and stay there after their request ended; later prompts
//! starting with the same tokens reuse them). Block 0 is reserved (the shards use it as a scratch/padding block) and never
//! handed out. An allocation gives its blocks back when it is dropped, so a request's
//! blocks are freed as soon as its queue/batch entry goes away.

mod radix;
mod simple;

use std::fmt::Debug;
use std::sync::{Arc, Mutex, MutexGuard};

/// Blocks handed out for one sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Blocks {
    blocks: Vec<u32>,
    /// Leading prompt tokens whose keys/values the first blocks already hold.
    prefix_len: u32,
}

/// An allocation's blocks and what they hold.
struct Held<'a> {
    blocks: &'a [u32],
    prompt: &'a [u32],
    /// Leading prompt tokens whose blocks are shared (cached) blocks this allocation holds.
    shared_len: u32,
    /// Leading prompt tokens whose keys/values are in the blocks (at least `shared_len`).
    computed_len: u32,
}

/// A block allocation strategy; `BlockAllocator` serializes the calls.
trait Allocator: Send + Debug {
    /// Blocks for `tokens` positions; with `prompt`, the leading ones may be blocks
    /// already holding a prefix of it. At least the last prompt token is left to compute
    /// (its logits choose the first new token). None when not enough blocks are free.
    fn allocate(&mut self, tokens: u32, prompt: Option<&[u32]>) -> Option<Blocks>;
    /// The shards computed the prompt up to `held.computed_len`: its blocks may be shared
    /// from now on. Returns the new `shared_len`.
    fn share(&mut self, held: Held) -> u32;
    /// Takes back an allocation's blocks.
    fn free(&mut self, held: Held);
    /// Blocks neither handed out nor cached.
    #[cfg(test)]
    fn free_block_count(&self) -> usize;
}

#[derive(Debug, Clone)]
pub struct BlockAllocator {
    allocator: Arc<Mutex<Box<dyn Allocator>>>,
    block_size: u32,
    total_blocks: u32,
}

impl BlockAllocator {
    /// An allocator over `capacity_tokens` tokens of KV cache (block 0 not counted), in
    /// blocks of `block_size` tokens; with `prefix_caching`, prompts reuse the cached
    /// blocks of earlier prompts.
    pub fn new(capacity_tokens: u32, block_size: u32, prefix_caching: bool) -> anyhow::Result<Self> {
        anyhow::ensure!(block_size > 0, "the shards reported a KV block size of 0");
        let total_blocks = capacity_tokens / block_size;
        anyhow::ensure!(
            total_blocks > 0,
            "a KV cache of {capacity_tokens} tokens holds no block of {block_size} tokens"
        );
        let allocator: Box<dyn Allocator> = if prefix_caching {
            Box::new(radix::RadixAllocator::new(block_size, total_blocks))
        } else {
            Box::new(simple::SimpleAllocator::new(block_size, total_blocks))
        };
        Ok(Self {
            allocator: Arc::new(Mutex::new(allocator)),
            block_size,
            total_blocks,
        })
    }

    /// Tokens of KV cache the allocator manages in all.
    pub fn capacity_tokens(&self) -> u32 {
        self.total_blocks * self.block_size
    }

    #[cfg(test)]
    pub fn free_block_count(&self) -> usize {
        lock(&self.allocator).free_block_count()
    }

    /// Reserves room for `tokens` token positions of a sequence starting with `prompt`;
    /// with `reuse_prefix`, blocks already holding a prefix of the prompt come first
    /// (`BlockAllocation::prefix_len`). None when not enough blocks are free.
    pub fn allocate(
        &self,
        tokens: u32,
        prompt: &Arc<Vec<u32>>,
        reuse_prefix: bool,
    ) -> Option<BlockAllocation> {
        let Blocks { blocks, prefix_len } = lock(&self.allocator)
            .allocate(tokens, reuse_prefix.then_some(prompt.as_slice()))?;
        let slots = (0..tokens)
            .map(|position| {
                blocks[(position / self.block_size) as usize] * self.block_size
                    + position % self.block_size
            })
            .collect();
        Some(BlockAllocation {
            blocks,
            slots,
            prefix_len,
            prompt: Arc::clone(prompt),
            shared_len: prefix_len,
            computed_len: prefix_len,
            allocator: Arc::clone(&self.allocator),
        })
    }
}

/// The allocators stay consistent even if a holder panicked: no operation panics
/// half-way.
fn lock(allocator: &Mutex<Box<dyn Allocator>>) -> MutexGuard<'_, Box<dyn Allocator>> {
    allocator
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// KV blocks owned by one request, given back to the allocator on drop.
#[derive(Debug)]
pub struct BlockAllocation {
    pub blocks: Vec<u32>,
    /// KV slot of every token position: `blocks[p / block_size] * block_size + p % block_size`.
    pub slots: Vec<u32>,
    /// Leading prompt tokens already in the blocks (a cached prefix): the shards compute
    /// only the rest.
    pub prefix_len: u32,
    prompt: Arc<Vec<u32>>,
    shared_len: u32,
    computed_len: u32,
    allocator: Arc<Mutex<Box<dyn Allocator>>>,
}

impl BlockAllocation {
    /// Leading prompt tokens whose keys/values are in the blocks: the cached prefix,
    /// then what the shards computed.
    pub fn computed_len(&self) -> u32 {
        self.computed_len
    }

    /// Records that the shards computed the keys/values of the first `prompt_tokens`
    /// prompt tokens: from now on, their blocks may serve other prompts.
    pub fn set_computed(&mut self, prompt_tokens: u32) {
        self.computed_len = prompt_tokens.min(self.prompt.len() as u32).max(self.computed_len);
        self.shared_len = lock(&self.allocator).share(self.held());
    }

    fn held(&self) -> Held<'_> {
        Held {
            blocks: &self.blocks,
            prompt: &self.prompt,
            shared_len: self.shared_len,
            computed_len: self.computed_len,
        }
    }
}

impl Drop for BlockAllocation {
    fn drop(&mut self) {
        lock(&self.allocator).free(self.held());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(len: u32) -> Arc<Vec<u32>> {
        Arc::new((100..100 + len).collect())
    }

    #[test]
    fn allocation_covers_every_token_and_computes_slots() {
        for prefix_caching in [false, true] {
            let allocator = BlockAllocator::new(64, 16, prefix_caching).unwrap();
            let allocation = allocator.allocate(20, &prompt(10), true).unwrap();
            assert_eq!(allocation.blocks.len(), 2);
            assert_eq!(allocation.slots.len(), 20);
            for (position, slot) in allocation.slots.iter().enumerate() {
                let block = allocation.blocks[position / 16];
                assert_eq!(*slot, block * 16 + (position % 16) as u32);
            }
            assert_eq!(allocator.free_block_count(), 2);
        }
    }

    #[test]
    fn rejects_unusable_configurations() {
        assert!(BlockAllocator::new(100, 0, true).is_err());
        assert!(BlockAllocator::new(15, 16, false).is_err());
        assert_eq!(BlockAllocator::new(40, 16, true).unwrap().capacity_tokens(), 32);
    }

    #[test]
    fn a_computed_prompt_serves_the_next_one_with_the_same_prefix() {
        let allocator = BlockAllocator::new(16 * 4, 4, true).unwrap();
        let first_prompt = prompt(10);
        let mut first = allocator.allocate(12, &first_prompt, true).unwrap();
        assert_eq!(first.prefix_len, 0);
        first.set_computed(10);
        let cached_blocks = first.blocks[..2].to_vec();
        drop(first);

        // Two full blocks (8 tokens) of the 10 are cached.
        let second = allocator.allocate(12, &prompt(11), true).unwrap();
        assert_eq!(second.prefix_len, 8);
        assert_eq!(second.blocks[..2], cached_blocks);
        // Prompt logprobs need the whole prompt computed: no reuse.
        let third = allocator.allocate(12, &prompt(11), false).unwrap();
        assert_eq!(third.prefix_len, 0);
        // A prompt of exactly the cached tokens still computes its last one.
        let fourth = allocator.allocate(8, &prompt(8), true).unwrap();
        assert_eq!(fourth.prefix_len, 4);
    }

    #[test]
    fn a_computed_prompt_is_shared_while_its_request_runs() {
        let allocator = BlockAllocator::new(16 * 4, 4, true).unwrap();
        let mut first = allocator.allocate(12, &prompt(10), true).unwrap();
        first.set_computed(10);
        let second = allocator.allocate(12, &prompt(10), true).unwrap();
        assert_eq!(second.prefix_len, 8);
        assert_eq!(second.blocks[..2], first.blocks[..2]);
        assert_ne!(second.blocks[2], first.blocks[2], "the block of the last token is its own");
        drop(first);
        drop(second);
        assert_eq!(allocator.free_block_count(), 16 - 2, "both blocks stay cached");
    }

    #[test]
    fn a_prompt_never_computed_is_not_cached() {
        let allocator = BlockAllocator::new(16 * 4, 4, true).unwrap();
        drop(allocator.allocate(12, &prompt(10), true).unwrap());
        assert_eq!(allocator.allocate(12, &prompt(10), true).unwrap().prefix_len, 0);
    }
}
