//! Warmup: proves the largest prefill the router will send runs, and sizes the paged
//! KV cache (block 0 is reserved for the health check and never handed out).

use super::batch::RequestState;
use super::Runner;
use crate::cache::KvCache;
use anyhow::{ensure, Context, Result};
use candle_core::Device;
use proto::v3::{Batch, WarmupRequest, WarmupResponse};

/// Where the KV cache's memory budget comes from when the router does not fix its size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvMemory {
    /// Share of the free GPU memory (after warmup) given to the cache.
    pub cuda_memory_fraction: f64,
    /// Size of the cache on CPU.
    pub cpu_bytes: usize,
}

/// On CUDA a cache sized from free memory may leave too little room for the
/// activations next to it: it is shrunk by this factor and the warmup batch re-run.
const CUDA_SHRINK_ATTEMPTS: usize = 5;

impl Runner {
    pub fn warmup(&mut self, request: WarmupRequest) -> Result<WarmupResponse> {
        self.batches.clear();
        self.cache = None;
        let spec = self.model.spec().clone();
        let block_size = self.block_size;
        let batch = request.batch.unwrap_or_default();
        // Block 0 is reserved, so the smallest useful cache has two blocks.
        let min_blocks = blocks_used(&batch, block_size).max(2);
        let mut num_blocks = match request.max_batch_total_tokens {
            Some(tokens) => (tokens as usize).div_ceil(block_size) + 1,
            None => {
                // Run the batch on a cache just large enough for it first, so a batch that
                // cannot run at all fails here with its own error, not as an allocation failure.
                self.cache = Some(KvCache::new(&spec, min_blocks, block_size, &self.device)?);
                self.run_batch(&batch).context("warmup prefill")?;
                self.cache = None;
                self.memory_budget()? / KvCache::bytes_per_block(&spec, block_size)
            }
        };
        let mut attempts_left = if request.max_batch_total_tokens.is_none() && self.device.is_cuda() {
            CUDA_SHRINK_ATTEMPTS
        } else {
            1
        };
        loop {
            ensure!(
                num_blocks >= min_blocks,
                "a KV cache of {num_blocks} blocks of {block_size} tokens cannot hold the warmup batch \
                 ({min_blocks} blocks): lower max_batch_prefill_tokens or give the cache more memory"
            );
            attempts_left -= 1;
            let result = KvCache::new(&spec, num_blocks, block_size, &self.device)
                .map_err(anyhow::Error::from)
                .and_then(|cache| {
                    self.cache = Some(cache);
                    self.run_batch(&batch)
                });
            match result {
                Ok(()) => break,
                Err(e) if attempts_left == 0 => {
                    self.cache = None;
                    return Err(e.context(format!("warmup with a KV cache of {num_blocks} blocks")));
                }
                Err(e) => {
                    tracing::warn!("warmup with {num_blocks} KV blocks failed ({e:#}); retrying with fewer");
                    self.cache = None;
                    num_blocks = num_blocks * 4 / 5;
                }
            }
        }
        tracing::info!(num_blocks, block_size, "KV cache allocated");
        Ok(WarmupResponse { max_supported_total_tokens: ((num_blocks - 1) * block_size) as u32 })
    }

    /// Prefills the batch and forgets it.
    fn run_batch(&mut self, batch: &Batch) -> Result<()> {
        if batch.requests.is_empty() {
            return Ok(());
        }
        let mut requests = batch.requests.iter().map(RequestState::from_proto).collect::<Result<Vec<_>>>()?;
        self.step(&mut requests, true)?;
        Ok(())
    }

    fn memory_budget(&self) -> Result<usize> {
        Ok(match &self.device {
            Device::Cpu => self.kv_memory.cpu_bytes,
            device => (free_device_memory(device)? as f64 * self.kv_memory.cuda_memory_fraction) as usize,
        })
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
    match device {
        Device::Cuda(cuda) => {
            let (free, _total) = cuda.cuda_stream().context().mem_get_info()?;
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
    use proto::v3::Request;

    #[test]
    fn blocks_used_covers_blocks_and_slots() {
        let batch = Batch {
            requests: vec![
                Request { blocks: vec![3], slots: vec![48, 49], ..Default::default() },
                Request { blocks: vec![1], slots: vec![16, 17, 95], ..Default::default() },
            ],
            ..Default::default()
        };
        assert_eq!(blocks_used(&batch, 16), 6);
        assert_eq!(blocks_used(&Batch::default(), 16), 0);
    }
}
