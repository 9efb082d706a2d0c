//! Hands out the shards' KV cache blocks to requests (as TGI v3 / vLLM do: the
//! router decides where every token lives, the shards just write there).
//!
//! Block 0 is reserved (the shards use it as a scratch/padding block) and never
//! handed out. An allocation gives its blocks back when it is dropped, so a
//! request's blocks are freed as soon as its queue/batch entry goes away.

use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Debug, Clone)]
pub struct BlockAllocator {
    free_blocks: Arc<Mutex<Vec<u32>>>,
    block_size: u32,
    total_blocks: u32,
}

impl BlockAllocator {
    /// An allocator over `capacity_tokens` tokens of KV cache (block 0 not
    /// counted), in blocks of `block_size` tokens.
    pub fn new(capacity_tokens: u32, block_size: u32) -> anyhow::Result<Self> {
        anyhow::ensure!(block_size > 0, "the shards reported a KV block size of 0");
        let total_blocks = capacity_tokens / block_size;
        anyhow::ensure!(
            total_blocks > 0,
            "a KV cache of {capacity_tokens} tokens holds no block of {block_size} tokens"
        );
        // Reversed so that pop() hands out the lowest block ids first.
        let free_blocks = (1..=total_blocks).rev().collect();
        Ok(Self {
            free_blocks: Arc::new(Mutex::new(free_blocks)),
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
        self.lock_free_blocks().len()
    }

    /// Reserves room for `tokens` token positions; None when not enough blocks are free.
    pub fn allocate(&self, tokens: u32) -> Option<BlockAllocation> {
        let needed = tokens.div_ceil(self.block_size) as usize;
        let blocks = {
            let mut free_blocks = self.lock_free_blocks();
            let remaining = free_blocks.len().checked_sub(needed)?;
            let mut blocks = free_blocks.split_off(remaining);
            blocks.reverse();
            blocks
        };
        let slots = (0..tokens)
            .map(|position| {
                blocks[(position / self.block_size) as usize] * self.block_size
                    + position % self.block_size
            })
            .collect();
        Some(BlockAllocation {
            blocks,
            slots,
            free_blocks: Arc::clone(&self.free_blocks),
        })
    }

    /// The free list stays consistent even if a holder panicked: every
    /// operation on it is a single push/split.
    fn lock_free_blocks(&self) -> MutexGuard<'_, Vec<u32>> {
        self.free_blocks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// KV blocks owned by one request, given back to the allocator on drop.
#[derive(Debug)]
pub struct BlockAllocation {
    pub blocks: Vec<u32>,
    /// KV slot of every token position: `blocks[p / block_size] * block_size + p % block_size`.
    pub slots: Vec<u32>,
    free_blocks: Arc<Mutex<Vec<u32>>>,
}

impl Drop for BlockAllocation {
    fn drop(&mut self) {
        let mut free_blocks = self
            .free_blocks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        free_blocks.append(&mut self.blocks);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    #[test]
    fn allocation_covers_every_token_and_computes_slots() {
        let allocator = BlockAllocator::new(64, 16).unwrap();
        let allocation = allocator.allocate(20).unwrap();
        assert_eq!(allocation.blocks.len(), 2);
        assert_eq!(allocation.slots.len(), 20);
        for (position, slot) in allocation.slots.iter().enumerate() {
            let block = allocation.blocks[position / 16];
            assert_eq!(*slot, block * 16 + (position % 16) as u32);
        }
        assert_eq!(allocator.free_block_count(), 2);
    }

    #[test]
    fn block_zero_is_never_handed_out() {
        let allocator = BlockAllocator::new(4 * 16, 16).unwrap();
        let allocation = allocator.allocate(4 * 16).unwrap();
        let mut blocks = allocation.blocks.clone();
        blocks.sort_unstable();
        assert_eq!(blocks, vec![1, 2, 3, 4]);
    }

    #[test]
    fn refuses_when_full_and_frees_on_drop() {
        let allocator = BlockAllocator::new(3 * 8, 8).unwrap();
        let first = allocator.allocate(17).unwrap(); // 3 blocks
        assert!(allocator.allocate(1).is_none());
        drop(first);
        assert_eq!(allocator.free_block_count(), 3);
        assert!(allocator.allocate(24).is_some());
        assert!(
            allocator.allocate(25).is_none(),
            "more than the whole cache"
        );
    }

    #[test]
    fn rejects_unusable_configurations() {
        assert!(BlockAllocator::new(100, 0).is_err());
        assert!(BlockAllocator::new(15, 16).is_err());
        assert_eq!(BlockAllocator::new(40, 16).unwrap().capacity_tokens(), 32);
    }

    #[test]
    fn random_allocations_never_share_a_block() {
        let allocator = BlockAllocator::new(50 * 16, 16).unwrap();
        let mut rng = StdRng::seed_from_u64(7);
        let mut live: Vec<BlockAllocation> = Vec::new();
        for _ in 0..5_000 {
            if rng.random_bool(0.55) {
                if let Some(allocation) = allocator.allocate(rng.random_range(1..200)) {
                    live.push(allocation);
                }
            } else if !live.is_empty() {
                live.swap_remove(rng.random_range(0..live.len()));
            }
            let mut seen = HashSet::new();
            for block in live.iter().flat_map(|a| a.blocks.iter()) {
                assert_ne!(*block, 0, "block 0 is reserved");
                assert!(seen.insert(*block), "block {block} handed out twice");
            }
            assert_eq!(seen.len() + allocator.free_block_count(), 50);
        }
        live.clear();
        assert_eq!(allocator.free_block_count(), 50);
    }
}
