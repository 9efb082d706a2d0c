//! FP8 E4M3 weights with per-tensor or per-channel scales: `weight` `[out, in]`
//! F8_E4M3 and `weight_scale` (`[]`/`[1]`, or `[out]`/`[out, 1]`), as llm-compressor
//! (compressed-tensors) and FBGEMM write them, or dense weights quantized at load with
//! one scale per output feature. `w = code * scale`. Activations are not quantized:
//! the product is that of the dequantized weights (in f32 on the CPU), whatever
//! activation scheme (dynamic per-token, static `input_scale`) the checkpoint names.

use super::QuantizedWeight;
use crate::weights::{Part, Weights};
use candle_core::{bail, DType, Result, Tensor};

/// The largest finite E4M3 value.
const E4M3_MAX: f32 = 448.0;

pub struct Fp8Weight {
    /// `[out, in]` F8E4M3.
    codes: Tensor,
    /// `[out, 1]` (per channel) or `[1, 1]` (per tensor) f32.
    scales: Tensor,
}

impl QuantizedWeight for Fp8Weight {
    fn dequantize(&self) -> Result<Tensor> {
        self.codes.to_dtype(DType::F32)?.broadcast_mul(&self.scales)
    }
}

/// The checkpoint's `[out, in]` layer at `w` (this rank's `part`).
pub fn load(w: &Weights, (out_dim, in_dim): (usize, usize), part: Option<&Part>) -> Result<Fp8Weight> {
    let codes = w.stored_part("weight", &[out_dim, in_dim], part)?;
    if codes.dtype() != DType::F8E4M3 {
        bail!(
            "{}: {:?} in an FP8 checkpoint (F8_E4M3 expected)",
            w.full_name("weight"),
            codes.dtype()
        )
    }
    let scale_dims = w.stored_dims("weight_scale")?;
    let scales = match scale_dims.iter().product::<usize>() {
        1 => w.stored_part("weight_scale", &scale_dims, None)?.reshape((1, 1))?,
        n if n == out_dim => {
            let rows = part.filter(|p| p.dim == 0);
            w.stored_part("weight_scale", &scale_dims, rows)?.reshape(((), 1))?
        }
        _ => bail!(
            "{}: shape {scale_dims:?} is neither per-tensor nor per-channel for {out_dim} outputs",
            w.full_name("weight_scale")
        ),
    };
    Ok(Fp8Weight {
        codes,
        scales: scales.to_dtype(DType::F32)?,
    })
}

/// `dense` `[out, in]` f32 to E4M3 (round to nearest even), each output feature
/// scaled so that its largest magnitude is E4M3's largest value.
pub fn quantize(dense: &Tensor) -> Result<Fp8Weight> {
    // A division, as the reference computes it (`tensor / f64` multiplies by the inverse).
    let largest = Tensor::new(&[E4M3_MAX], dense.device())?;
    let scales = dense
        .abs()?
        .max_keepdim(1)?
        .broadcast_div(&largest)?
        .maximum(f32::MIN_POSITIVE)?;
    Ok(Fp8Weight {
        codes: dense.broadcast_div(&scales)?.to_dtype(DType::F8E4M3)?,
        scales,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// E4M3 codes round to the nearest value, ties to the even code, and decode exactly.
    #[test]
    fn quantizes_to_the_nearest_e4m3_value() -> Result<()> {
        // Row scales of 1: 448 is the row's largest magnitude.
        let dense = Tensor::new(&[[448f32, 1.0, 1.0625, 1.1875, -0.3, 0.0]], &Device::Cpu)?;
        let q = quantize(&dense)?;
        let values = q.dequantize()?.to_vec2::<f32>()?;
        // Between 1 and 1.125 (codes ...000 and ...001), 1.0625 is a tie: to the even 1.
        // 1.1875 is the tie between 1.125 (odd) and 1.25 (even). -0.3 lies between
        // -0.28125 and -0.3125: nearer the latter.
        assert_eq!(values, vec![vec![448.0, 1.0, 1.0, 1.25, -0.3125, 0.0]]);
        Ok(())
    }
}
