//! A linear layer over dense or quantized (GGUF) weights, with an optional bias, and its
//! tensor-parallel forms: column-parallel (a share of the outputs) and row-parallel
//! (a share of the inputs, summed over the group).

use crate::dist::{even_split, Comm};
use crate::weights::{Part, Weights};
use candle_core::quantized::QMatMul;
use candle_core::{DType, Module, Result, Tensor};
use std::ops::Range;

/// From this many rows on, a CPU matmul with a quantized weight dequantizes the weight
/// and runs a dense f32 matmul: candle's CPU quantized kernel costs about as much per
/// row as dequantizing the whole matrix, while gemm's per-row cost is tiny (prefill of
/// 512 tokens on SmolLM2: ~30x faster).
const CPU_DEQUANTIZE_MIN_ROWS: usize = 8;

pub struct Linear {
    /// `[out, in]`.
    weight: QMatMul,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: QMatMul, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// `{prefix}.weight` (and `{prefix}.bias` when `bias`).
    pub fn load(w: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        Self::load_column_parallel(w, in_dim, out_dim, bias, None)
    }

    /// Column-parallel: only the output features `outputs` (weight rows and bias
    /// entries) of the `[out_dim, in_dim]` layer; all of them for None.
    pub fn load_column_parallel(
        w: &Weights,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        outputs: Option<Range<usize>>,
    ) -> Result<Self> {
        let part = outputs.map(|range| Part { dim: 0, range });
        let weight = w.matmul_weight_part("weight", (out_dim, in_dim), part.as_ref())?;
        let bias = if bias {
            Some(w.tensor_part("bias", out_dim, part.as_ref())?)
        } else {
            None
        };
        Ok(Self::new(weight, bias))
    }

    /// `x`: `[tokens, in]` -> `[tokens, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            QMatMul::QTensor(q) if x.device().is_cpu() && x.dim(0)? >= CPU_DEQUANTIZE_MIN_ROWS => {
                let w = q.dequantize(x.device())?;
                x.to_dtype(DType::F32)?
                    .matmul(&w.t()?)?
                    .to_dtype(x.dtype())?
            }
            // candle's quantized matmul takes f32 activations.
            QMatMul::QTensor(_) if x.dtype() != DType::F32 => self
                .weight
                .forward(&x.to_dtype(DType::F32)?)?
                .to_dtype(x.dtype())?,
            _ => self.weight.forward(x)?,
        };
        match &self.bias {
            Some(bias) => y.broadcast_add(bias),
            None => Ok(y),
        }
    }
}

/// Row-parallel: this rank holds an even share of the input features, and the partial
/// products are summed over the group. No bias: every rank would add it.
pub struct RowParallelLinear {
    linear: Linear,
    comm: Comm,
}

impl RowParallelLinear {
    /// `{prefix}.weight` of `[out_dim, in_dim]`, this rank's columns.
    pub fn load(w: &Weights, in_dim: usize, out_dim: usize, comm: &Comm) -> Result<Self> {
        let part = even_split(&**comm, in_dim, "the input features of a row-parallel layer")?
            .map(|range| Part { dim: 1, range });
        let weight = w.matmul_weight_part("weight", (out_dim, in_dim), part.as_ref())?;
        Ok(Self {
            linear: Linear::new(weight, None),
            comm: comm.clone(),
        })
    }

    /// `x`: `[tokens, in / world_size]` (this rank's features) -> `[tokens, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.comm.all_reduce_sum(&self.linear.forward(x)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::Device;

    /// Both CPU paths of a quantized weight (quantized kernel for few rows, dequantized
    /// matmul for many) agree with the dense product of the dequantized weight.
    #[test]
    fn quantized_paths_agree() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (64, 256), &dev)?;
        let q = QTensor::quantize(&w, GgmlDType::Q8_0)?;
        let dense = q.dequantize(&dev)?;
        let linear = Linear::new(QMatMul::from_qtensor(q)?, None);
        for rows in [1, CPU_DEQUANTIZE_MIN_ROWS + 3] {
            let x = Tensor::randn(0f32, 1., (rows, 256), &dev)?;
            let expected = x.matmul(&dense.t()?)?;
            let err = (linear.forward(&x)? - &expected)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            let scale = expected.abs()?.max_all()?.to_scalar::<f32>()?;
            // The quantized kernel also quantizes x to 8 bits.
            assert!(err < 0.02 * scale, "rows {rows}: {err} vs {scale}");
        }
        Ok(())
    }

    #[test]
    fn dense_with_bias() -> Result<()> {
        let w = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &Device::Cpu)?;
        let b = Tensor::new(&[1f32, 0., -1.], &Device::Cpu)?;
        let linear = Linear::new(QMatMul::Tensor(w), Some(b));
        let y = linear.forward(&Tensor::new(&[[1f32, 1.]], &Device::Cpu)?)?;
        assert_eq!(y.to_vec2::<f32>()?, vec![vec![4., 7., 10.]]);
        Ok(())
    }
}
