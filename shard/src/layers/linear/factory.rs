//! The one place that knows the formats: a linear layer's weight read in the format of
//! the checkpoint's quantization config, and placed where its products run.

use super::{awq, bnb, fp8, gptq, QuantizedWeight, Weight};
use crate::weights::{Part, Weights};
use candle_core::quantized::QMatMul;
use candle_core::{DType, Result};
use model_store::quantization::{LoadTimeFormat, Quantization};

/// The `[out, in]` weight of the layer at `w`, this rank's `part` of it.
pub(super) fn load(w: &Weights, shape: (usize, usize), part: Option<&Part>) -> Result<Weight> {
    let dense = || Weight::new(w.matmul_weight_part("weight", shape, part)?);
    match w.quantization() {
        None => dense(),
        Some(Quantization::Awq { group_size }) if w.contains("qweight") => {
            place(&awq::load(w, shape, part, *group_size)?, None, w)
        }
        Some(Quantization::Gptq(cfg)) if w.contains("qweight") => {
            place(&gptq::load(w, shape, part, cfg)?, None, w)
        }
        Some(Quantization::Fp8 { .. }) if w.contains("weight_scale") => {
            place(&fp8::load(w, shape, part)?, None, w)
        }
        Some(Quantization::AtLoad(format)) => {
            // Quantized whole, then cut: each rank holds what one rank would (bitsandbytes'
            // blocks run across rows, per-channel scales across the inputs).
            let whole = w
                .stored_part("weight", &[shape.0, shape.1], None)?
                .to_dtype(DType::F32)?;
            let quantized: Box<dyn QuantizedWeight> = match format {
                LoadTimeFormat::Fp8 => Box::new(fp8::quantize(&whole)?),
                LoadTimeFormat::Nf4 => Box::new(bnb::quantize_blocks(&whole, &bnb::NF4)?),
                LoadTimeFormat::Fp4 => Box::new(bnb::quantize_blocks(&whole, &bnb::FP4)?),
                LoadTimeFormat::Int8 => Box::new(bnb::quantize_rows_int8(&whole)?),
            };
            place(quantized.as_ref(), part, w)
        }
        // Layers a quantized checkpoint keeps dense (AWQ's modules_to_not_convert,
        // compressed-tensors' `ignore`).
        Some(_) => dense(),
    }
}

/// Where quantized weights go for their products. Today they are dequantized here, at
/// load: to f32 on the CPU (the exact product of the format), to the activation dtype
/// on other devices (dense GEMMs); fused quantized kernels are to take their codes
/// here instead. `cut`: the rank's part, of weights quantized whole.
fn place(quantized: &dyn QuantizedWeight, cut: Option<&Part>, w: &Weights) -> Result<Weight> {
    let mut dense = quantized.dequantize()?;
    if let Some(part) = cut {
        dense = dense.narrow(part.dim, part.range.start, part.range.len())?;
    }
    if w.device().is_cpu() {
        return Ok(Weight::Dequantized(dense));
    }
    Ok(Weight::Candle(QMatMul::Tensor(
        dense.to_dtype(w.dtype())?.to_device(w.device())?,
    )))
}
