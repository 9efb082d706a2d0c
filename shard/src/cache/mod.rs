//! The paged KV cache: per layer, keys and values in fixed-size blocks addressed by
//! slot (block * block_size + offset). The router's allocator decides which blocks a
//! sequence owns; the shard only stores and reads them.

use crate::models::ModelSpec;
use candle_core::{Device, Result, Tensor};

pub struct KvCache {
    /// Per layer: (keys, values), each `[num_blocks * block_size, num_kv_heads, head_dim]`.
    layers: Vec<(Tensor, Tensor)>,
    num_blocks: usize,
    block_size: usize,
}

impl KvCache {
    pub fn new(
        spec: &ModelSpec,
        num_blocks: usize,
        block_size: usize,
        device: &Device,
    ) -> Result<Self> {
        let shape = (num_blocks * block_size, spec.num_kv_heads, spec.head_dim);
        let layers = (0..spec.num_layers)
            .map(|_| {
                Ok((
                    Tensor::zeros(shape, spec.dtype, device)?,
                    Tensor::zeros(shape, spec.dtype, device)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            num_blocks,
            block_size,
        })
    }

    /// Bytes of keys and values that one block takes over all layers.
    pub fn bytes_per_block(spec: &ModelSpec, block_size: usize) -> usize {
        2 * spec.num_layers
            * block_size
            * spec.num_kv_heads
            * spec.head_dim
            * spec.dtype.size_in_bytes()
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn layer(&self, index: usize) -> &(Tensor, Tensor) {
        &self.layers[index]
    }

    pub fn layer_mut(&mut self, index: usize) -> &mut (Tensor, Tensor) {
        &mut self.layers[index]
    }
}
