//! Warmup: proves the largest prefill the router will send runs, and sizes the paged
//! KV cache (block 0 is reserved for the health check and never handed out).

use super::batch::RequestState;
use super::Runner;
use crate::cache::KvCache;
use anyhow::{ensure, Context, Result};
use candle_core::Device;
use proto::v3::{Batch, Request, WarmupRequest, WarmupResponse};

/// Where the KV cache's memory budget comes from when the router does not fix its size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvMemory {
    /// Share of the free GPU memory (after warmup) given to the cache.
    pub cuda_memory_fraction: f64,
    /// Size of the cache on CPU.
    pub cpu_bytes: usize,
}

/// On CUDA a cache sized from free memory may leave too little room for the
/// activations next to it: it is shrunk and the warmup batch re-run this many times at most.
const CUDA_SHRINK_ATTEMPTS: usize = 8;

/// Prompt tokens of the warmup prefill on CPU. There the pass proves that the model
/// runs, not that the largest prefill fits (the cache has a fixed size, and nothing is
/// compiled or captured): a few hundred tokens take well under a second on two cores,
/// where the router's largest prefill (4,145 tokens by default) took over a minute.
const CPU_WARMUP_TOKENS: usize = 256;

impl Runner {
    pub fn warmup(&mut self, request: WarmupRequest) -> Result<WarmupResponse> {
        self.batches.clear();
        self.ahead = None;
        #[cfg(feature = "cuda")]
        {
            // The graphs hold the old cache's addresses.
            self.decode_graphs = None;
        }
        self.cache = None;
        let block_size = self.block_size;
        let full_batch = request.batch.unwrap_or_default();
        // Block 0 is reserved, so the smallest useful cache has two blocks.
        let min_blocks = blocks_used(&full_batch, block_size).max(2);
        let batch = if self.device.is_cpu() {
            prompt_prefix(&full_batch, CPU_WARMUP_TOKENS)
        } else {
            full_batch
        };
        let num_blocks = match request.max_batch_total_tokens {
            Some(tokens) => {
                let num_blocks = (tokens as usize).div_ceil(block_size) + 1;
                self.allocate_and_run(num_blocks, min_blocks, &batch, 1)?;
                num_blocks
            }
            None => {
                // Run the batch on a cache just large enough for it first, so a batch that
                // cannot run at all fails here with its own error, not as an allocation failure.
                self.allocate(min_blocks, min_blocks)?;
                self.run_batch(&batch).context("warmup prefill")?;
                self.cache = None;
                let num_blocks =
                    self.memory_budget()? / KvCache::bytes_per_block(self.model.spec(), block_size);
                // Retrying is for one rank alone: ranks of a group that retried
                // differently would fall out of step in their collectives.
                if self.device.is_cuda() && self.world_size == 1 {
                    // The batch must also fit next to the full cache in GPU memory.
                    self.allocate_and_run(num_blocks, min_blocks, &batch, CUDA_SHRINK_ATTEMPTS)?
                } else {
                    self.allocate(num_blocks, min_blocks)?;
                    num_blocks
                }
            }
        };
        tracing::info!(num_blocks, block_size, "KV cache allocated");
        self.capture_decode_graphs(request.max_total_tokens as usize);
        Ok(WarmupResponse {
            max_supported_total_tokens: ((num_blocks - 1) * block_size) as u32,
        })
    }

    fn allocate(&mut self, num_blocks: usize, min_blocks: usize) -> Result<()> {
        ensure!(
            num_blocks >= min_blocks,
            "a KV cache of {num_blocks} blocks of {} tokens cannot hold the warmup batch \
             ({min_blocks} blocks): lower max_batch_prefill_tokens or give the cache more memory",
            self.block_size
        );
        self.cache = Some(KvCache::new(
            self.model.spec(),
            num_blocks,
            self.block_size,
            &self.device,
        )?);
        Ok(())
    }

    /// Allocates the cache and runs the batch on it, shrinking the cache by a twentieth
    /// after each failure; returns the number of blocks that worked.
    fn allocate_and_run(
        &mut self,
        mut num_blocks: usize,
        min_blocks: usize,
        batch: &Batch,
        attempts: usize,
    ) -> Result<usize> {
        let mut attempts_left = attempts;
        loop {
            attempts_left -= 1;
            let Err(e) = self
                .allocate(num_blocks, min_blocks)
                .and_then(|()| self.run_batch(batch))
            else {
                return Ok(num_blocks);
            };
            self.cache = None;
            if attempts_left == 0 {
                return Err(e.context(format!("warmup with a KV cache of {num_blocks} blocks")));
            }
            tracing::warn!(
                "warmup with {num_blocks} KV blocks failed ({e:#}); retrying with fewer"
            );
            num_blocks = num_blocks * 19 / 20;
        }
    }

    /// Prefills the batch and forgets it.
    fn run_batch(&mut self, batch: &Batch) -> Result<()> {
        if batch.requests.is_empty() {
            return Ok(());
        }
        let mut requests = batch
            .requests
            .iter()
            .map(|request| RequestState::from_proto(request, None))
            .collect::<Result<Vec<_>>>()?;
        self.step(&mut requests, None, false)?;
        Ok(())
    }

    fn memory_budget(&self) -> Result<usize> {
        Ok(match &self.device {
            Device::Cpu => self.kv_memory.cpu_bytes,
            device => {
                (free_device_memory(device)? as f64 * self.kv_memory.cuda_memory_fraction) as usize
            }
        })
    }
}

/// The batch's first `max_tokens` prompt tokens: its first requests, the last of them
/// cut short (in the same slots).
fn prompt_prefix(batch: &Batch, max_tokens: usize) -> Batch {
    let mut left = max_tokens;
    let requests: Vec<Request> = batch
        .requests
        .iter()
        .map_while(|request| {
            let take = request.input_ids.len().min(left);
            left -= take;
            (take > 0).then(|| Request {
                input_ids: request.input_ids[..take].to_vec(),
                slots: request.slots[..take.min(request.slots.len())].to_vec(),
                ..request.clone()
            })
        })
        .collect();
    Batch {
        size: requests.len() as u32,
        requests,
        ..batch.clone()
    }
}

/// Blocks the batch addresses: enough for its highest block and its highest slot.
fn blocks_used(batch: &Batch, block_size: usize) -> usize {
    batch
        .requests
        .iter()
        .flat_map(|r| {
            let by_block = r.blocks.iter().map(|&b| b as usize + 1);
            let by_slot = r.slots.iter().map(|&s| s as usize / block_size + 1);
            by_block.chain(by_slot)
        })
        .max()
        .unwrap_or(0)
}

#[cfg(feature = "cuda")]
fn free_device_memory(device: &Device) -> Result<usize> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    match device {
        Device::Cuda(cuda) => {
            device.synchronize()?;
            let context = cuda.cuda_stream().context().clone();
            context.bind_to_thread()?;
            // What the warm-up pass freed stays in the stream-ordered allocator's pool
            // (and would not count as free) until the pool is trimmed.
            // SAFETY: plain driver calls on the current context's device.
            unsafe {
                let mut pool = std::mem::MaybeUninit::uninit();
                sys::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), context.cu_device()).result()?;
                sys::cuMemPoolTrimTo(pool.assume_init(), 0).result()?;
            }
            let (free, total) = context.mem_get_info()?;
            tracing::info!(
                free_mib = free >> 20,
                total_mib = total >> 20,
                "device memory after the warm-up pass"
            );
            Ok(free)
        }
        other => anyhow::bail!("no memory information for device {other:?}"),
    }
}

#[cfg(not(feature = "cuda"))]
fn free_device_memory(device: &Device) -> Result<usize> {
    anyhow::bail!("no memory information for device {device:?} in a build without CUDA")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_prefix_keeps_the_first_tokens_in_their_slots() {
        let request = |id: u64, len: u32| Request {
            id,
            input_ids: vec![0; len as usize],
            slots: (100 * id as u32..).take(len as usize).collect(),
            blocks: vec![id as u32],
            ..Default::default()
        };
        let batch = Batch {
            id: 7,
            requests: vec![request(1, 5), request(2, 5), request(3, 5)],
            size: 3,
            max_tokens: 15,
            max_blocks: 3,
        };
        let prefix = prompt_prefix(&batch, 8);
        assert_eq!((prefix.id, prefix.size), (7, 2));
        assert_eq!(prefix.requests[0], batch.requests[0]);
        assert_eq!(prefix.requests[1].input_ids.len(), 3);
        assert_eq!(prefix.requests[1].slots, vec![200, 201, 202]);
        assert_eq!(prefix.requests[1].blocks, vec![2]);
        assert_eq!(prompt_prefix(&batch, 100), batch);
    }

    #[test]
    fn blocks_used_covers_blocks_and_slots() {
        let batch = Batch {
            requests: vec![
                Request {
                    blocks: vec![3],
                    slots: vec![48, 49],
                    ..Default::default()
                },
                Request {
                    blocks: vec![1],
                    slots: vec![16, 17, 95],
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        assert_eq!(blocks_used(&batch, 16), 6);
        assert_eq!(blocks_used(&Batch::default(), 16), 0);
    }
}
