//! RMSNorm, as Llama-family checkpoints define it (weight only, no bias).

use crate::weights::Weights;
use candle_core::{Result, Tensor};

pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    /// `{prefix}.weight` of `[dim]`.
    pub fn load(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.tensor("weight", dim)?,
            eps: eps as f32,
        })
    }

    /// Normalises the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)
    }

    /// The residual stream after a block adds `h` to `x` (`[tokens, dim]`), and its
    /// norm: `(x + h, norm(x + h))`. One kernel on CUDA in bf16/f16.
    pub fn forward_add(&self, x: &Tensor, h: &Tensor) -> Result<(Tensor, Tensor)> {
        #[cfg(feature = "cuda")]
        if super::uses_cuda_kernels(x.device(), x.dtype()) && x.rank() == 2 && x.dim(1)? % 8 == 0 {
            return text_generation_kernels::add_rms_norm(
                &x.contiguous()?,
                &h.contiguous()?,
                &self.weight,
                self.eps,
            );
        }
        let sum = (x + h)?;
        let normed = self.forward(&sum)?;
        Ok((sum, normed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn normalises_rows() -> Result<()> {
        let norm = RmsNorm {
            weight: Tensor::new(&[1f32, 2.], &Device::Cpu)?,
            eps: 0.,
        };
        let y = norm
            .forward(&Tensor::new(&[[3f32, 4.]], &Device::Cpu)?)?
            .to_vec2::<f32>()?;
        let rms = (12.5f32).sqrt();
        assert!((y[0][0] - 3. / rms).abs() < 1e-6 && (y[0][1] - 8. / rms).abs() < 1e-6);
        Ok(())
    }
}
