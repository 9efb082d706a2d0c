//! A linear layer over dense or quantized (GGUF) weights, with an optional bias.

use crate::weights::Weights;
use candle_core::quantized::QMatMul;
use candle_core::{DType, Module, Result, Tensor};

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
        let weight = w.matmul_weight("weight", (out_dim, in_dim))?;
        let bias = if bias { Some(w.tensor("bias", out_dim)?) } else { None };
        Ok(Self::new(weight, bias))
    }

    /// `x`: `[tokens, in]` -> `[tokens, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            // candle's quantized matmul takes f32 activations.
            QMatMul::QTensor(_) if x.dtype() != DType::F32 => {
                self.weight.forward(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?
            }
            _ => self.weight.forward(x)?,
        };
        match &self.bias {
            Some(bias) => y.broadcast_add(bias),
            None => Ok(y),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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
