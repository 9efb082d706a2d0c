//! Prefix caching (TGI v3's radix allocator): a radix tree whose edges are block-sized
//! runs of prompt tokens and whose nodes are the KV blocks holding them. A node's block
//! holds the keys/values of its run after the runs of its ancestors, so a prompt whose
//! first blocks' tokens follow a path from the root can reuse that path's blocks.
//!
//! Nodes count the live allocations using them (`refs`). The whole blocks of a prompt
//! join the tree as soon as the shards computed them (the allocation holding them keeps
//! a reference: it never writes them again), and stay cached, unreferenced, once their
//! requests ended, until the free list runs short: then unreferenced leaves are evicted,
//! least recently used first (a node is only evicted after its children, whose
//! keys/values depend on it).

use std::collections::{BTreeSet, HashMap};

use super::{Allocator, Blocks, Held};

type NodeId = usize;

/// The root: the empty prefix, holding no block.
const ROOT: NodeId = 0;

#[derive(Debug)]
struct Node {
    block: u32,
    parent: NodeId,
    /// By the tokens of the child's run.
    children: HashMap<Vec<u32>, NodeId>,
    /// Live allocations whose prefix runs through this node.
    refs: usize,
    /// When an allocation last used it, on the allocator's clock.
    last_used: u64,
}

#[derive(Debug)]
pub struct RadixAllocator {
    block_size: usize,
    free_blocks: Vec<u32>,
    nodes: HashMap<NodeId, Node>,
    next_node: NodeId,
    clock: u64,
    /// Unreferenced leaves by `(last_used, id)`: the eviction order.
    evictable: BTreeSet<(u64, NodeId)>,
}

impl RadixAllocator {
    /// Blocks 1..=`total_blocks` (block 0 is reserved).
    pub fn new(block_size: u32, total_blocks: u32) -> Self {
        let root = Node {
            block: 0,
            parent: ROOT,
            children: HashMap::new(),
            refs: 0,
            last_used: 0,
        };
        Self {
            block_size: block_size as usize,
            free_blocks: (1..=total_blocks).rev().collect(),
            nodes: HashMap::from([(ROOT, root)]),
            next_node: ROOT + 1,
            clock: 0,
            evictable: BTreeSet::new(),
        }
    }

    /// The path of cached blocks holding the longest prefix of `prompt` made of whole
    /// blocks that leaves at least its last token to compute.
    fn match_prefix(&self, prompt: &[u32]) -> Vec<NodeId> {
        let reusable_blocks = prompt.len().saturating_sub(1) / self.block_size;
        let mut path = Vec::new();
        let mut node = ROOT;
        for run in prompt.chunks_exact(self.block_size).take(reusable_blocks) {
            match self.nodes[&node].children.get(run) {
                Some(&child) => {
                    path.push(child);
                    node = child;
                }
                None => break,
            }
        }
        path
    }

    fn node(&mut self, id: NodeId) -> &mut Node {
        self.nodes
            .get_mut(&id)
            .expect("nodes on a live path or in the eviction order are in the tree")
    }

    /// Marks the node as just used.
    fn touch(&mut self, id: NodeId) {
        self.clock += 1;
        let clock = self.clock;
        self.update(id, |node| node.last_used = clock);
    }

    /// Changes a node and keeps the eviction order in step with it.
    fn update(&mut self, id: NodeId, change: impl FnOnce(&mut Node)) {
        let node = self.node(id);
        let before = (node.last_used, id);
        change(node);
        let evictable = id != ROOT && node.refs == 0 && node.children.is_empty();
        let after = (node.last_used, id);
        self.evictable.remove(&before);
        if evictable {
            self.evictable.insert(after);
        }
    }

    /// Frees the least recently used unreferenced leaf's block; false when none is left.
    fn evict_one(&mut self) -> bool {
        let Some((_, id)) = self.evictable.pop_first() else {
            return false;
        };
        let node = self
            .nodes
            .remove(&id)
            .expect("the eviction order holds nodes of the tree");
        self.update(node.parent, |parent| parent.children.retain(|_, child| *child != id));
        self.free_blocks.push(node.block);
        metrics::counter!("tgi_prefix_cache_evictions_total").increment(1);
        true
    }

    /// `block` holds `run` after the tokens of `parent`'s path: a new child, or, when
    /// another prompt cached the same run first, that child (`block` is then freed).
    fn insert(&mut self, parent: NodeId, run: &[u32], block: u32) -> NodeId {
        if let Some(&existing) = self.nodes[&parent].children.get(run) {
            self.free_blocks.push(block);
            self.touch(existing);
            return existing;
        }
        let id = self.next_node;
        self.next_node += 1;
        self.clock += 1;
        self.nodes.insert(
            id,
            Node {
                block,
                parent,
                children: HashMap::new(),
                refs: 0,
                last_used: self.clock,
            },
        );
        self.update(id, |_| {});
        self.update(parent, |node| {
            node.children.insert(run.to_vec(), id);
        });
        id
    }

    /// The node of the first `runs` block runs of `prompt`, a path the caller holds.
    fn held_node(&self, prompt: &[u32], runs: usize) -> NodeId {
        prompt
            .chunks_exact(self.block_size)
            .take(runs)
            .fold(ROOT, |node, run| self.nodes[&node].children[run])
    }

    fn record_cached_blocks(&self) {
        metrics::gauge!("tgi_prefix_cache_blocks").set((self.nodes.len() - 1) as f64);
    }
}

impl Allocator for RadixAllocator {
    fn allocate(&mut self, tokens: u32, prompt: Option<&[u32]>) -> Option<Blocks> {
        let needed = (tokens as usize).div_ceil(self.block_size);
        let mut path = prompt.map(|p| self.match_prefix(p)).unwrap_or_default();
        path.truncate(needed);
        // Held first, so that making room does not evict them.
        for &id in &path {
            self.update(id, |node| node.refs += 1);
            self.touch(id);
        }
        let new_blocks = needed - path.len();
        if self.free_blocks.len() < new_blocks {
            // Unreferenced nodes can all be evicted (a node's children hold no more
            // references than it does); the root is one of them and holds no block.
            let evictable = self.nodes.values().filter(|node| node.refs == 0).count() - 1;
            if self.free_blocks.len() + evictable < new_blocks {
                for &id in &path {
                    self.update(id, |node| node.refs -= 1);
                }
                return None;
            }
            while self.free_blocks.len() < new_blocks && self.evict_one() {}
        }
        let mut blocks: Vec<u32> = path.iter().map(|id| self.nodes[id].block).collect();
        let remaining = self.free_blocks.len() - new_blocks;
        blocks.extend(self.free_blocks.drain(remaining..).rev());
        self.record_cached_blocks();
        Some(Blocks {
            blocks,
            prefix_len: (path.len() * self.block_size) as u32,
        })
    }

    fn share(&mut self, held: Held) -> u32 {
        let shared = held.shared_len as usize / self.block_size;
        let computed = (held.computed_len as usize / self.block_size).min(held.blocks.len());
        let mut node = self.held_node(held.prompt, shared);
        let mut now_shared = shared;
        let runs = held.prompt.chunks_exact(self.block_size).zip(held.blocks);
        for (run, &block) in runs.take(computed).skip(shared) {
            if self.nodes[&node].children.contains_key(run) {
                // Another prompt cached these tokens first: the rest stays private (its
                // blocks cannot change under the shards).
                break;
            }
            node = self.insert(node, run, block);
            self.update(node, |n| n.refs += 1);
            now_shared += 1;
        }
        self.record_cached_blocks();
        (now_shared * self.block_size) as u32
    }

    fn free(&mut self, held: Held) {
        let shared = held.shared_len as usize / self.block_size;
        let computed = (held.computed_len as usize / self.block_size).clamp(shared, held.blocks.len());
        let mut runs = held.prompt.chunks_exact(self.block_size);
        let mut node = ROOT;
        for run in runs.by_ref().take(shared) {
            node = self.nodes[&node].children[run];
            self.update(node, |n| n.refs -= 1);
        }
        // The computed whole blocks not shared yet join the tree now.
        for (run, &block) in runs.zip(&held.blocks[shared..computed]) {
            node = self.insert(node, run, block);
        }
        self.free_blocks.extend(held.blocks[computed..].iter().rev());
        self.record_cached_blocks();
    }

    #[cfg(test)]
    fn free_block_count(&self) -> usize {
        self.free_blocks.len()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    const BLOCK_SIZE: usize = 4;
    const TOTAL_BLOCKS: u32 = 48;

    /// A live allocation as its request would hold it.
    struct Live {
        blocks: Blocks,
        prompt: Vec<u32>,
        shared_len: u32,
        computed_len: u32,
    }

    impl Live {
        fn held(&self) -> Held<'_> {
            Held {
                blocks: &self.blocks.blocks,
                prompt: &self.prompt,
                shared_len: self.shared_len,
                computed_len: self.computed_len,
            }
        }

        /// The shards computed the prompt up to a random point past what they had: what
        /// each block holds then (`content`), checked against what shared blocks held.
        fn compute(&mut self, rng: &mut StdRng, content: &mut HashMap<u32, Vec<u32>>) {
            let prompt_len = self.prompt.len() as u32;
            self.computed_len = match rng.random_range(0..3) {
                0 => self.computed_len,
                1 => rng.random_range(self.computed_len..=prompt_len),
                _ => prompt_len,
            };
            let shared = self.shared_len as usize / BLOCK_SIZE;
            for (i, &block) in self.blocks.blocks.iter().enumerate() {
                let prefix = &self.prompt[..((i + 1) * BLOCK_SIZE).min(self.prompt.len())];
                if i < shared {
                    assert_eq!(content[&block], prefix, "a shared block changed");
                } else if (i + 1) * BLOCK_SIZE <= self.computed_len as usize {
                    content.insert(block, prefix.to_vec());
                }
            }
        }
    }

    /// Checks every invariant of the tree against the live allocations.
    fn check(allocator: &RadixAllocator, live: &[Live]) {
        let mut owner: HashMap<u32, &str> = HashMap::new();
        let mut claim = |block: u32, by: &'static str| {
            assert_ne!(block, 0, "block 0 is reserved");
            if let Some(other) = owner.insert(block, by) {
                panic!("block {block} is both {other} and {by}");
            }
        };
        for &block in &allocator.free_blocks {
            claim(block, "free");
        }
        for (&id, node) in &allocator.nodes {
            if id != ROOT {
                claim(node.block, "cached");
            }
        }
        let node_blocks: HashSet<u32> = allocator
            .nodes
            .iter()
            .filter(|(id, _)| **id != ROOT)
            .map(|(_, n)| n.block)
            .collect();
        let mut expected_refs: HashMap<NodeId, usize> = HashMap::new();
        for allocation in live {
            let held = allocation.shared_len as usize / BLOCK_SIZE;
            let mut node = ROOT;
            for (i, &block) in allocation.blocks.blocks.iter().enumerate() {
                if i < held {
                    let run = &allocation.prompt[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE];
                    node = allocator.nodes[&node].children[run];
                    assert_eq!(allocator.nodes[&node].block, block, "a held prefix follows the tree");
                    *expected_refs.entry(node).or_default() += 1;
                } else {
                    assert!(!node_blocks.contains(&block), "block {block} is both cached and private");
                    claim(block, "private");
                }
            }
        }
        assert_eq!(owner.len(), TOTAL_BLOCKS as usize, "a block was lost");
        for (&id, node) in &allocator.nodes {
            assert_eq!(node.refs, expected_refs.get(&id).copied().unwrap_or(0), "refs of node {id}");
            for &child in node.children.values() {
                assert_eq!(allocator.nodes[&child].parent, id);
            }
            let evictable = id != ROOT && node.refs == 0 && node.children.is_empty();
            assert_eq!(allocator.evictable.contains(&(node.last_used, id)), evictable, "node {id}");
        }
        assert!(allocator.evictable.len() < allocator.nodes.len());
    }

    /// Prompts drawn from a few shared prefixes (system prompts, conversations), so that
    /// they match each other's blocks often, in part or whole.
    fn random_prompt(rng: &mut StdRng) -> Vec<u32> {
        let family = rng.random_range(0..4u32);
        let shared = rng.random_range(0..20usize);
        let own = rng.random_range(0..10usize);
        (0..shared)
            .map(|i| family * 1000 + i as u32)
            .chain((0..own).map(|_| rng.random_range(0..3)))
            .chain([7])
            .collect()
    }

    /// 100,000 random allocations, prefills (sharing the computed blocks), frees and
    /// evictions; the invariants hold after each, every reused block holds the tokens of
    /// the prefix it is reused for, and no shared block is written again.
    #[test]
    fn random_operations_keep_the_tree_consistent() {
        let mut allocator = RadixAllocator::new(BLOCK_SIZE as u32, TOTAL_BLOCKS);
        let mut rng = StdRng::seed_from_u64(17);
        let mut live: Vec<Live> = Vec::new();
        // What the shards would have written in each block: (prefix tokens up to it).
        let mut content: HashMap<u32, Vec<u32>> = HashMap::new();
        let (mut hits, mut evictions) = (0, 0);
        for _ in 0..100_000 {
            match rng.random_range(0..10) {
                0..5 => {
                    let prompt = random_prompt(&mut rng);
                    let tokens = prompt.len() as u32 + rng.random_range(0..12);
                    let reuse = rng.random_bool(0.9);
                    let matched = allocator.match_prefix(&prompt).len();
                    if let Some(blocks) = allocator.allocate(tokens, reuse.then_some(&prompt)) {
                        let held = blocks.prefix_len as usize / BLOCK_SIZE;
                        assert_eq!(held, if reuse { matched } else { 0 });
                        assert!((blocks.prefix_len as usize) < prompt.len(), "the last token is computed");
                        assert_eq!(blocks.blocks.len(), (tokens as usize).div_ceil(BLOCK_SIZE));
                        for (i, block) in blocks.blocks[..held].iter().enumerate() {
                            assert_eq!(content[block], prompt[..(i + 1) * BLOCK_SIZE], "stale block reused");
                        }
                        hits += held;
                        let prefix_len = blocks.prefix_len;
                        live.push(Live { blocks, prompt, shared_len: prefix_len, computed_len: prefix_len });
                    }
                }
                5..7 if !live.is_empty() => {
                    let index = rng.random_range(0..live.len());
                    let allocation = &mut live[index];
                    allocation.compute(&mut rng, &mut content);
                    let shared_len = allocator.share(allocation.held());
                    assert!(shared_len >= allocation.shared_len && shared_len <= allocation.computed_len);
                    allocation.shared_len = shared_len;
                }
                7..9 if !live.is_empty() => {
                    let mut allocation = live.swap_remove(rng.random_range(0..live.len()));
                    allocation.compute(&mut rng, &mut content);
                    allocator.free(allocation.held());
                }
                _ => evictions += usize::from(allocator.evict_one()),
            }
            check(&allocator, &live);
        }
        assert!(hits > 10_000 && evictions > 1_000, "{hits} hit blocks, {evictions} evictions");
        for allocation in live.drain(..) {
            allocator.free(allocation.held());
        }
        while allocator.evict_one() {}
        assert_eq!(allocator.free_block_count(), TOTAL_BLOCKS as usize);
        assert_eq!(allocator.nodes.len(), 1, "only the root is left");
    }

    #[test]
    fn evicts_least_recently_used_leaves_first_and_only_when_it_helps() {
        let mut allocator = RadixAllocator::new(4, 4);
        let old: Vec<u32> = (0..8).collect();
        let new: Vec<u32> = (100..108).collect();
        for prompt in [&old, &new] {
            let blocks = allocator.allocate(8, Some(prompt)).unwrap();
            allocator.free(Held { blocks: &blocks.blocks, prompt, shared_len: 0, computed_len: 8 });
        }
        assert_eq!(allocator.free_block_count(), 0, "two prompts of two blocks cached");
        let longer = |prompt: &[u32]| [prompt, &[50]].concat();
        // Using the old prompt again evicts the last block of the new one.
        let old_again = longer(&old);
        let again = allocator.allocate(12, Some(&old_again)).unwrap();
        assert_eq!(again.prefix_len, 8);
        assert_eq!(again.blocks.len(), 3);
        assert_eq!(allocator.match_prefix(&longer(&new)).len(), 1, "the new prompt lost a block");
        allocator.free(Held { blocks: &again.blocks, prompt: &old_again, shared_len: 8, computed_len: 9 });
        assert!(allocator.allocate(5 * 4, None).is_none(), "more than the cache");
        assert_eq!(allocator.match_prefix(&old_again).len(), 2, "a hopeless allocation evicts nothing");
        assert_eq!(allocator.free_block_count(), 1);
    }
}
