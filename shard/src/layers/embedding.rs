//! The token embedding and the lm_head, split over the vocabulary under tensor
//! parallelism: every rank holds an even share of the vocabulary's rows. The embedding
//! sums the ranks' lookups (a token's row lives on one rank, the others give zeros);
//! the lm_head gathers the ranks' logits, so every rank samples from the full vocabulary.

use super::linear::Linear;
use crate::dist::{all_gather, even_split, Comm};
use crate::weights::{Part, Weights};
use candle_core::quantized::QMatMul;
use candle_core::{DType, Result, Tensor};

pub struct VocabParallelEmbedding {
    /// `[vocab / world_size, hidden]`: this rank's rows.
    weight: Tensor,
    /// The token id of this rank's first row.
    first_id: i64,
    comm: Comm,
}

/// This rank's rows of a `[vocab, hidden]` matrix.
fn vocab_part(vocab: usize, comm: &Comm) -> Result<Option<Part>> {
    Ok(even_split(&**comm, vocab, "the vocabulary size")?.map(|range| Part { dim: 0, range }))
}

impl VocabParallelEmbedding {
    /// `name` is the `[vocab, hidden]` embedding matrix (`model.embed_tokens.weight`).
    pub fn load(w: &Weights, name: &str, vocab: usize, hidden: usize, comm: &Comm) -> Result<Self> {
        let part = vocab_part(vocab, comm)?;
        Ok(Self {
            weight: w.tensor_part(name, (vocab, hidden), part.as_ref())?,
            first_id: part.map_or(0, |p| p.range.start as i64),
            comm: comm.clone(),
        })
    }

    /// `ids`: `[tokens]` u32 -> `[tokens, hidden]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        if self.comm.world_size() == 1 {
            return self.weight.index_select(ids, 0);
        }
        let rows = self.weight.dim(0)? as i64;
        let local = ids
            .to_dtype(DType::I64)?
            .broadcast_sub(&Tensor::new(self.first_id, ids.device())?)?;
        let mine = (local.ge(0i64)? * local.lt(rows)?)?;
        let embedded = self.weight.index_select(&local.clamp(0i64, rows - 1)?, 0)?;
        let embedded = embedded.broadcast_mul(&mine.to_dtype(embedded.dtype())?.unsqueeze(1)?)?;
        self.comm.all_reduce_sum(&embedded)
    }
}

pub struct VocabParallelLmHead {
    /// This rank's vocabulary rows.
    linear: Linear,
    comm: Comm,
}

impl VocabParallelLmHead {
    /// The `[vocab, hidden]` matrix `name` (`lm_head.weight`, or the embedding when
    /// tied); quantized GGUF matrices stay quantized.
    pub fn load(w: &Weights, name: &str, vocab: usize, hidden: usize, comm: &Comm) -> Result<Self> {
        let part = vocab_part(vocab, comm)?;
        Ok(Self {
            linear: Linear::new(
                w.matmul_weight_part(name, (vocab, hidden), part.as_ref())?,
                None,
            )?,
            comm: comm.clone(),
        })
    }

    /// Tied to `embedding`'s (dense) rows.
    pub fn tied(embedding: &VocabParallelEmbedding) -> Result<Self> {
        Ok(Self {
            linear: Linear::new(QMatMul::Tensor(embedding.weight.clone()), None)?,
            comm: embedding.comm.clone(),
        })
    }

    /// `x`: `[tokens, hidden]` -> `[tokens, vocab]` logits, the same on every rank.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        all_gather(&*self.comm, &self.linear.forward(x)?, 1)
    }
}
