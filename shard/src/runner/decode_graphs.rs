//! CUDA graphs of decode steps. A decode step of a large model is hundreds of small
//! kernel launches whose host-side cost exceeds the GPU's work at small batches; a
//! graph replays the whole forward pass with one launch.
//!
//! One graph per padded batch size, captured after Warmup once the KV cache exists (the
//! graphs hold its addresses). Each graph reads its inputs from one packed u32 buffer
//! and leaves its logits in a buffer of its own; a step copies its inputs in, launches,
//! and reads the first rows of the logits. A batch that fits no graph (larger than the
//! largest, or a block table wider than the captured width) runs eagerly.

use crate::cache::KvCache;
use crate::models::{ForwardBatch, Model, SequenceLayout};
use anyhow::{ensure, Context, Result};
use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph};
use candle_core::{DType, Device, Tensor};

/// One decoding sequence, as the graph's inputs need it.
pub struct DecodeInput<'a> {
    pub token_id: u32,
    /// Position of the token (= tokens cached before it).
    pub position: usize,
    pub slot: u32,
    pub block_table: &'a [u32],
}

pub struct DecodeGraphs {
    /// Ascending batch sizes.
    graphs: Vec<DecodeGraph>,
    /// Block-table width the graphs were captured with.
    max_blocks: usize,
    device: Device,
}

struct DecodeGraph {
    batch_size: usize,
    /// `[batch_size * (4 + max_blocks)]` u32: token ids, positions, slots, context
    /// lengths, then the block tables row by row.
    inputs: Tensor,
    /// `[batch_size, vocab]` f32.
    logits: Tensor,
    graph: CudaGraph,
    /// `[batch_size + 1]` u32 `0..=batch_size`, read by the graph: the prefix sums of
    /// one token per sequence, and (the first `batch_size`) the rows whose logits are wanted.
    _row_index: Tensor,
}

impl DecodeGraphs {
    /// Captures a graph for each of `batch_sizes` whose block tables are at most
    /// `max_blocks` wide. The model must run with the CUDA kernels (bf16/f16 on CUDA).
    pub fn capture(
        model: &dyn Model,
        cache: &mut KvCache,
        batch_sizes: &[usize],
        max_blocks: usize,
        device: &Device,
    ) -> Result<Self> {
        ensure!(
            max_blocks > 0,
            "decode graphs need block tables of at least one block"
        );
        let mut sizes = batch_sizes.to_vec();
        sizes.sort_unstable();
        sizes.dedup();
        let graphs = sizes
            .into_iter()
            .map(|batch_size| {
                DecodeGraph::capture(model, cache, batch_size, max_blocks, device).with_context(
                    || format!("capturing the decode graph of batch size {batch_size}"),
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            graphs,
            max_blocks,
            device: device.clone(),
        })
    }

    pub fn batch_sizes(&self) -> Vec<usize> {
        self.graphs.iter().map(|g| g.batch_size).collect()
    }

    /// Logits `[seqs.len(), vocab]` of one decode step through the smallest graph that
    /// holds it, or None when none does. Valid until the next replay.
    pub fn replay(&self, seqs: &[DecodeInput]) -> Result<Option<Tensor>> {
        let Some(graph) = self.graphs.iter().find(|g| g.batch_size >= seqs.len()) else {
            return Ok(None);
        };
        if seqs.iter().any(|s| s.block_table.len() > self.max_blocks) {
            return Ok(None);
        }
        let (b, w) = (graph.batch_size, self.max_blocks);
        // Padding rows: token 0 at position 0 attending nothing, and a slot past the
        // cache, which the cache-writing kernel skips.
        let mut packed = vec![0u32; b * (4 + w)];
        for (i, seq) in seqs.iter().enumerate() {
            packed[i] = seq.token_id;
            packed[b + i] = seq.position as u32;
            packed[3 * b + i] = seq.position as u32 + 1;
            let row = 4 * b + i * w;
            packed[row..row + seq.block_table.len()].copy_from_slice(seq.block_table);
        }
        for i in 0..b {
            packed[2 * b + i] = seqs.get(i).map_or(u32::MAX, |s| s.slot);
        }
        let host = Tensor::from_vec(packed, b * (4 + w), &self.device)?;
        graph.inputs.slice_set(&host, 0, 0)?;
        graph.graph.launch()?;
        Ok(Some(graph.logits.narrow(0, 0, seqs.len())?))
    }
}

impl DecodeGraph {
    fn capture(
        model: &dyn Model,
        cache: &mut KvCache,
        batch_size: usize,
        max_blocks: usize,
        device: &Device,
    ) -> Result<Self> {
        let cuda = device.as_cuda_device()?;
        let stream = cuda.cuda_stream();
        let inputs = Tensor::zeros(batch_size * (4 + max_blocks), DType::U32, device)?;
        let row_index = Tensor::arange(0u32, batch_size as u32 + 1, device)?;
        let logits = Tensor::zeros((batch_size, model.spec().vocab_size), DType::F32, device)?;
        let forward = |cache: &mut KvCache| -> Result<()> {
            let b = batch_size;
            let field = |i: usize| inputs.narrow(0, i * b, b);
            let batch = ForwardBatch {
                input_ids: field(0)?,
                positions: field(1)?,
                slots: field(2)?.to_dtype(DType::I64)?,
                context_lens: field(3)?,
                block_tables: inputs
                    .narrow(0, 4 * b, b * max_blocks)?
                    .reshape((b, max_blocks))?,
                cu_seqlens_q: row_index.clone(),
                logits_indices: row_index.narrow(0, 0, b)?,
                // What the host-side checks read; the kernels read the tensors above.
                seqs: vec![
                    SequenceLayout {
                        new_tokens: 1,
                        context_len: 1,
                        block_table: vec![0],
                    };
                    b
                ],
                max_new_tokens: 1,
                max_context_len: 1,
                max_input_id: 0,
            };
            logits.slice_set(&model.forward(&batch, cache)?, 0, 0)?;
            Ok(())
        };
        // While capturing, candle may not upload host data (e.g. the strides of strided
        // ops): the warm-up pass puts every upload in its cache, and loads the kernels.
        let _uploads_cached = cuda.enable_cuda_graph_htod_cache();
        forward(cache)?;
        device.synchronize()?;
        // Relaxed: cuBLAS may set up its workspace on a first call inside the capture.
        stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)?;
        let captured = forward(cache);
        // The capture must end whatever happened inside it.
        let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        captured?;
        let graph = ended?.context("the capture recorded nothing")?;
        graph.upload()?;
        Ok(Self {
            batch_size,
            inputs,
            logits,
            graph,
            _row_index: row_index,
        })
    }
}
