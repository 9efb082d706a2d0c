//! Integer weights quantized in groups along the input features, as AWQ and GPTQ store
//! them once their packing is undone: `w[o, i] = (code[i, o] - zero[g(i), o]) * scale[g(i), o]`
//! with `g(i)` the group of input feature `i` (`i / group_size`, or GPTQ's `g_idx` under
//! act-order).

use super::QuantizedWeight;
use crate::weights::{Part, Weights};
use candle_core::{bail, DType, Device, Result, Tensor};
use rayon::prelude::*;
use std::ops::Range;

pub struct GroupQuantized {
    in_dim: usize,
    out_dim: usize,
    /// `[in, out]`.
    codes: Vec<u8>,
    /// The group of each input feature, an index into the rows of `scales` and `zeros`.
    groups: Vec<u32>,
    /// `[groups, out]`.
    scales: Vec<f32>,
    /// `[groups, out]`.
    zeros: Vec<f32>,
}

impl GroupQuantized {
    /// `codes` `[in, out]`, `scales` and `zeros` `[groups, out]`, `groups` `[in]`.
    pub fn new(
        codes: Vec<u8>,
        groups: Vec<u32>,
        scales: Vec<f32>,
        zeros: Vec<f32>,
        out_dim: usize,
    ) -> Result<Self> {
        let in_dim = groups.len();
        let num_groups = scales.len() / out_dim.max(1);
        if codes.len() != in_dim * out_dim
            || scales.len() != num_groups * out_dim
            || zeros.len() != scales.len()
        {
            bail!(
                "quantized weight: {} codes, {} scales and {} zeros for {in_dim} inputs and {out_dim} outputs",
                codes.len(),
                scales.len(),
                zeros.len()
            )
        }
        if let Some(bad) = groups.iter().find(|&&g| g as usize >= num_groups) {
            bail!("quantized weight: group {bad} of {num_groups}")
        }
        Ok(Self {
            in_dim,
            out_dim,
            codes,
            groups,
            scales,
            zeros,
        })
    }
}

impl QuantizedWeight for GroupQuantized {
    fn dequantize(&self) -> Result<Tensor> {
        // In the stored `[in, out]` order (rows in parallel: a 70B model has ~1e10 of
        // these per rank), then transposed.
        let mut w = vec![0f32; self.out_dim * self.in_dim];
        w.par_chunks_mut(self.out_dim.max(1))
            .zip(self.codes.par_chunks(self.out_dim.max(1)))
            .zip(&self.groups)
            .for_each(|((row, codes), &g)| {
                let g = g as usize * self.out_dim;
                let scales = &self.scales[g..g + self.out_dim];
                let zeros = &self.zeros[g..g + self.out_dim];
                for (o, value) in row.iter_mut().enumerate() {
                    *value = (codes[o] as f32 - zeros[o]) * scales[o];
                }
            });
        Tensor::from_vec(w, (self.in_dim, self.out_dim), &Device::Cpu)?
            .t()?
            .contiguous()
    }
}

/// `bits`-bit values packed `32 / bits` to an int32, lowest bits first, from the
/// `[rows, cols]` words: the values of word `c` of a row are columns
/// `c * per_word + order[k]` for its `k`-th lowest value. Returns `[rows, cols * per_word]`.
pub fn unpack_columns(words: &Tensor, bits: u32, order: &[usize]) -> Result<Vec<u8>> {
    let words = words.flatten_all()?.to_vec1::<i32>()?;
    let mask = (1u32 << bits) - 1;
    let mut out = vec![0u8; words.len() * order.len()];
    out.par_chunks_mut(order.len())
        .zip(&words)
        .for_each(|(values, &word)| {
            for (k, &column) in order.iter().enumerate() {
                values[column] = ((word as u32 >> (bits * k as u32)) & mask) as u8;
            }
        });
    Ok(out)
}

/// `bits`-bit values packed along the rows: word `[r, c]` holds rows
/// `r * per_word .. (r + 1) * per_word` of column `c`, lowest bits first (GPTQ's
/// qweight). Returns `[rows * per_word, cols]`.
pub fn unpack_rows(words: &Tensor, bits: u32) -> Result<Vec<u8>> {
    let (rows, cols) = words.dims2()?;
    let words = words.flatten_all()?.to_vec1::<i32>()?;
    let per_word = (32 / bits) as usize;
    let mask = (1u32 << bits) - 1;
    let mut out = vec![0u8; rows * per_word * cols];
    out.par_chunks_mut((per_word * cols).max(1))
        .zip(words.par_chunks(cols.max(1)))
        .for_each(|(block, words)| {
            for (c, &word) in words.iter().enumerate() {
                for k in 0..per_word {
                    block[k * cols + c] = ((word as u32 >> (bits * k as u32)) & mask) as u8;
                }
            }
        });
    Ok(out)
}

/// Stored scales (f16, bf16 or f32) as f32.
pub fn to_f32s(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()
}

/// What a rank reads of a layer stored transposed (`[inputs or groups, outputs]`, as
/// AWQ and GPTQ store it): its output features (column-parallel) or its input features
/// (row-parallel).
pub struct Share {
    out_dim: usize,
    pub outputs: Range<usize>,
    pub inputs: Range<usize>,
}

impl Share {
    /// The share `part` of the `[out, in]` weights (dim 0: outputs, dim 1: inputs); its
    /// ends must fall on multiples of the features one int32 packs (`out_align`,
    /// `in_align`).
    pub fn of(
        w: &Weights,
        (out_dim, in_dim): (usize, usize),
        part: Option<&Part>,
        out_align: usize,
        in_align: usize,
    ) -> Result<Self> {
        let (outputs, inputs) = match part {
            None => (0..out_dim, 0..in_dim),
            Some(Part { dim: 0, range }) => (range.clone(), 0..in_dim),
            Some(Part { dim: 1, range }) => (0..out_dim, range.clone()),
            Some(part) => bail!("{part:?} of a linear layer"),
        };
        for (what, range, align) in [("output", &outputs, out_align), ("input", &inputs, in_align)] {
            if !range.start.is_multiple_of(align) || !range.end.is_multiple_of(align) {
                bail!(
                    "{}: a rank's {what} features {range:?} do not fall on the {align} features \
                     one packed int32 holds",
                    w.full_name("qweight")
                )
            }
        }
        Ok(Self {
            out_dim,
            outputs,
            inputs,
        })
    }

    /// The part of a `[num_rows, out / per_word]` tensor to read: the share's columns
    /// (column-parallel) or `rows` (row-parallel); None for all of it.
    pub fn part(&self, per_word: usize, rows: Range<usize>, num_rows: usize) -> Option<Part> {
        if self.outputs.len() != self.out_dim {
            Some(Part {
                dim: 1,
                range: self.outputs.start / per_word..self.outputs.end / per_word,
            })
        } else if rows.len() != num_rows {
            Some(Part { dim: 0, range: rows })
        } else {
            None
        }
    }
}

/// The groups of the rank's input features (each feature's group in `groups`, the whole
/// layer's): the range of scale and zero rows to read, and the features' groups within it.
pub fn groups_of_share(groups: &[u32]) -> (Range<usize>, Vec<u32>) {
    let first = groups.iter().copied().min().unwrap_or(0);
    let last = groups.iter().copied().max().unwrap_or(0);
    (
        first as usize..last as usize + 1,
        groups.iter().map(|g| g - first).collect(),
    )
}
