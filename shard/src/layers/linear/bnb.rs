//! bitsandbytes' formats, quantized at load from dense weights. NF4 and FP4: the
//! weights flattened row-major, blocks of 64 scaled by their absmax, each weight the
//! nearest of 16 values (`w = table[code] * absmax`); the absmax is kept in f32 (no
//! second quantization of the scales). int8: LLM.int8()'s weights, one absmax scale per
//! output feature (`w = code * absmax / 127`); activations are not quantized, so its
//! outlier decomposition has nothing to do.

use super::QuantizedWeight;
use candle_core::{Device, Result, Tensor};
use model_store::quantization::BNB_BLOCK;
use rayon::prelude::*;

/// bitsandbytes' NF4 code book (quantiles of a normal distribution).
pub const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// bitsandbytes' FP4 (E2M1 in its own code order): bit 3 the sign.
pub const FP4: [f32; 16] = [
    0.0,
    0.005_208_333,
    0.666_666_7,
    1.0,
    0.333_333_34,
    0.5,
    0.166_666_67,
    0.25,
    -0.0,
    -0.005_208_333,
    -0.666_666_7,
    -1.0,
    -0.333_333_34,
    -0.5,
    -0.166_666_67,
    -0.25,
];

pub struct BlockQuantized {
    out_dim: usize,
    in_dim: usize,
    /// One 4-bit code per weight, row-major `[out, in]`.
    codes: Vec<u8>,
    /// One per block of `BNB_BLOCK` consecutive codes.
    absmax: Vec<f32>,
    table: &'static [f32; 16],
}

/// `dense` `[out, in]` f32 in blocks of `BNB_BLOCK`, each weight the nearest value of
/// `table` (NF4 or FP4) times its block's absmax.
pub fn quantize_blocks(dense: &Tensor, table: &'static [f32; 16]) -> Result<BlockQuantized> {
    let (out_dim, in_dim) = dense.dims2()?;
    let values = dense.flatten_all()?.to_vec1::<f32>()?;
    let mut codes = vec![0u8; values.len()];
    let mut absmax = vec![0f32; values.len().div_ceil(BNB_BLOCK)];
    codes
        .par_chunks_mut(BNB_BLOCK)
        .zip(values.par_chunks(BNB_BLOCK))
        .zip(&mut absmax)
        .for_each(|((codes, block), absmax)| {
            let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            // bitsandbytes multiplies by the reciprocal.
            let inverse = if max > 0.0 { 1.0 / max } else { 0.0 };
            for (code, v) in codes.iter_mut().zip(block) {
                *code = nearest(table, v * inverse);
            }
            *absmax = max;
        });
    Ok(BlockQuantized {
        out_dim,
        in_dim,
        codes,
        absmax,
        table,
    })
}

/// The index of the value of `table` nearest `x` (the first of equals).
fn nearest(table: &[f32; 16], x: f32) -> u8 {
    let mut best = 0;
    for (i, v) in table.iter().enumerate() {
        if (x - v).abs() < (x - table[best]).abs() {
            best = i;
        }
    }
    best as u8
}

impl QuantizedWeight for BlockQuantized {
    fn dequantize(&self) -> Result<Tensor> {
        let w: Vec<f32> = self
            .codes
            .par_iter()
            .enumerate()
            .map(|(i, &c)| self.table[c as usize] * self.absmax[i / BNB_BLOCK])
            .collect();
        Tensor::from_vec(w, (self.out_dim, self.in_dim), &Device::Cpu)
    }
}

pub struct RowInt8 {
    /// `[out, in]`.
    codes: Vec<i8>,
    /// Per output feature.
    absmax: Vec<f32>,
}

/// LLM.int8()'s weights: `round(w * 127 / absmax)` per output feature.
pub fn quantize_rows_int8(dense: &Tensor) -> Result<RowInt8> {
    let rows = dense.to_vec2::<f32>()?;
    let mut codes = Vec::with_capacity(rows.len() * rows.first().map_or(0, Vec::len));
    let mut absmax = Vec::with_capacity(rows.len());
    for row in &rows {
        let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let factor = if max > 0.0 { 127.0 / max } else { 0.0 };
        codes.extend(row.iter().map(|v| (v * factor).round_ties_even() as i8));
        absmax.push(max);
    }
    Ok(RowInt8 { codes, absmax })
}

impl QuantizedWeight for RowInt8 {
    fn dequantize(&self) -> Result<Tensor> {
        let in_dim = self.codes.len() / self.absmax.len().max(1);
        let w: Vec<f32> = self
            .codes
            .par_iter()
            .enumerate()
            .map(|(i, &c)| c as f32 * (self.absmax[i / in_dim] / 127.0))
            .collect();
        Tensor::from_vec(w, (self.absmax.len(), in_dim), &Device::Cpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each weight becomes its block's absmax times the nearest table value; a block's
    /// largest magnitude is exact.
    #[test]
    fn blocks_keep_their_absmax_and_nearest_codes() -> Result<()> {
        let mut values = vec![0f32; 2 * BNB_BLOCK];
        values[0] = -2.0;
        values[1] = 0.6; // 0.3 of the absmax: NF4's nearest is 0.3379, FP4's 0.3333.
        values[BNB_BLOCK] = 0.25; // The second block's absmax.
        values[BNB_BLOCK + 1] = 0.02; // 0.08 of it: NF4 0.0796, FP4 0.0052 (nearer than 0.1667).
        let dense = Tensor::from_vec(values, (2, BNB_BLOCK), &Device::Cpu)?;
        let nf4 = quantize_blocks(&dense, &NF4)?.dequantize()?.to_vec2::<f32>()?;
        assert_eq!(nf4[0][..2], [-2.0, 2.0 * NF4[11]]);
        assert_eq!(nf4[1][..2], [0.25, 0.25 * NF4[8]]);
        assert_eq!(nf4[0][2], 0.0);
        let fp4 = quantize_blocks(&dense, &FP4)?.dequantize()?.to_vec2::<f32>()?;
        assert_eq!(fp4[0][..2], [-2.0, 2.0 * FP4[4]]);
        assert_eq!(fp4[1][..2], [0.25, 0.25 * FP4[1]]);
        let int8 = quantize_rows_int8(&dense)?.dequantize()?.to_vec2::<f32>()?;
        // 0.6 * 127 / 2 = 38.1: code 38.
        assert_eq!(int8[0][..2], [-127.0 * (2.0 / 127.0), 38.0 * (2.0 / 127.0)]);
        Ok(())
    }
}
