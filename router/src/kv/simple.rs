//! Today's allocator: a free list, no prefix caching.

use super::{Allocator, Blocks, Held};

#[derive(Debug)]
pub struct SimpleAllocator {
    block_size: u32,
    free_blocks: Vec<u32>,
}

impl SimpleAllocator {
    /// Blocks 1..=`total_blocks` (block 0 is reserved).
    pub fn new(block_size: u32, total_blocks: u32) -> Self {
        // Reversed so that pop() hands out the lowest block ids first.
        Self {
            block_size,
            free_blocks: (1..=total_blocks).rev().collect(),
        }
    }
}

impl Allocator for SimpleAllocator {
    fn allocate(&mut self, tokens: u32, _prompt: Option<&[u32]>) -> Option<Blocks> {
        let needed = tokens.div_ceil(self.block_size) as usize;
        let remaining = self.free_blocks.len().checked_sub(needed)?;
        let mut blocks = self.free_blocks.split_off(remaining);
        blocks.reverse();
        Some(Blocks {
            blocks,
            prefix_len: 0,
        })
    }

    fn share(&mut self, held: Held) -> u32 {
        held.shared_len
    }

    fn free(&mut self, held: Held) {
        self.free_blocks.extend_from_slice(held.blocks);
    }

    #[cfg(test)]
    fn free_block_count(&self) -> usize {
        self.free_blocks.len()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn release(allocator: &mut SimpleAllocator, blocks: Blocks) {
        allocator.free(Held {
            blocks: &blocks.blocks,
            prompt: &[],
            shared_len: 0,
            computed_len: 0,
        });
    }

    #[test]
    fn block_zero_is_never_handed_out() {
        let mut allocator = SimpleAllocator::new(16, 4);
        let mut blocks = allocator.allocate(4 * 16, None).unwrap().blocks;
        blocks.sort_unstable();
        assert_eq!(blocks, vec![1, 2, 3, 4]);
    }

    #[test]
    fn refuses_when_full_and_frees() {
        let mut allocator = SimpleAllocator::new(8, 3);
        let first = allocator.allocate(17, None).unwrap(); // 3 blocks
        assert!(allocator.allocate(1, None).is_none());
        release(&mut allocator, first);
        assert_eq!(allocator.free_block_count(), 3);
        assert!(allocator.allocate(24, None).is_some());
        assert!(allocator.allocate(25, None).is_none(), "more than the whole cache");
    }

    #[test]
    fn random_allocations_never_share_a_block() {
        let mut allocator = SimpleAllocator::new(16, 50);
        let mut rng = StdRng::seed_from_u64(7);
        let mut live: Vec<Blocks> = Vec::new();
        for _ in 0..5_000 {
            if rng.random_bool(0.55) {
                if let Some(blocks) = allocator.allocate(rng.random_range(1..200), None) {
                    live.push(blocks);
                }
            } else if !live.is_empty() {
                let blocks = live.swap_remove(rng.random_range(0..live.len()));
                release(&mut allocator, blocks);
            }
            let mut seen = HashSet::new();
            for block in live.iter().flat_map(|a| a.blocks.iter()) {
                assert_ne!(*block, 0, "block 0 is reserved");
                assert!(seen.insert(*block), "block {block} handed out twice");
            }
            assert_eq!(seen.len() + allocator.free_block_count(), 50);
        }
    }
}
