//! A linear layer over dense or quantized weights (GGUF blocks, AWQ, GPTQ, FP8,
//! bitsandbytes), with an optional bias, and its tensor-parallel forms: column-parallel
//! (a share of the outputs) and row-parallel (a share of the inputs, summed over the
//! group). `factory` reads each layer in the checkpoint's format; one module per format.

mod awq;
mod bnb;
mod cpu_quant;
mod factory;
mod fp8;
mod gptq;
mod groups;

use crate::dist::{even_split, Comm};
use crate::weights::{Part, Weights};
use candle_core::quantized::QMatMul;
use candle_core::{bail, DType, Module, Result, Tensor};
use cpu_quant::CpuQuantWeight;
use std::ops::Range;

/// `[out, in]`.
enum Weight {
    /// Dense weights anywhere, quantized ones on CUDA: candle's products.
    Candle(QMatMul),
    /// Quantized on CPU: our batch-invariant kernels over the GGUF blocks.
    CpuQuant(CpuQuantWeight),
    /// Quantized on CPU in a format those kernels lack (GGUF ones, AWQ, GPTQ, FP8,
    /// bitsandbytes): dequantized to f32 once, at load.
    Dequantized(Tensor),
}

/// A quantized format's weights of one layer (a rank's share), as loaded.
trait QuantizedWeight {
    /// `[out, in]` f32 on the CPU: exactly the values its codes and scales stand for.
    fn dequantize(&self) -> Result<Tensor>;
}

impl Weight {
    fn new(weight: QMatMul) -> Result<Self> {
        Ok(match weight {
            QMatMul::QTensor(q) if q.device().is_cpu() => match CpuQuantWeight::from_qtensor(&q)? {
                Some(w) => Self::CpuQuant(w),
                None => Self::Dequantized(q.dequantize(&q.device())?),
            },
            weight => Self::Candle(weight),
        })
    }
}

pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

/// The `pick`ed weight of every part; None if one has another kind.
fn weights_of<'a, T>(
    parts: &'a [Linear],
    pick: impl Fn(&'a Weight) -> Option<&'a T>,
) -> Option<Vec<&'a T>> {
    parts.iter().map(|p| pick(&p.weight)).collect()
}

impl Linear {
    /// Quantized weights on CPU are converted here, once.
    pub fn new(weight: QMatMul, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self {
            weight: Weight::new(weight)?,
            bias,
        })
    }

    /// `{prefix}.weight`, or the tensors of its quantized format (and `{prefix}.bias` when `bias`).
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
        let weight = factory::load(w, (out_dim, in_dim), part.as_ref())?;
        let bias = if bias {
            Some(w.tensor_part("bias", out_dim, part.as_ref())?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// One layer whose outputs are those of `parts` side by side (weight rows and biases
    /// concatenated), so that one product replaces several; None unless the weights are
    /// all dense, all dequantized on the CPU, or all CPU blocks of one format (other
    /// quantized weights are kept as loaded).
    pub fn concat_outputs(parts: &[Linear]) -> Result<Option<Self>> {
        let weight = if let Some(dense) = weights_of(parts, |w| match w {
            Weight::Candle(QMatMul::Tensor(w)) => Some(w),
            _ => None,
        }) {
            Weight::Candle(QMatMul::Tensor(Tensor::cat(&dense, 0)?))
        } else if let Some(dequantized) = weights_of(parts, |w| match w {
            Weight::Dequantized(w) => Some(w),
            _ => None,
        }) {
            Weight::Dequantized(Tensor::cat(&dequantized, 0)?)
        } else if let Some(blocks) = weights_of(parts, |w| match w {
            Weight::CpuQuant(w) => Some(w),
            _ => None,
        }) {
            match CpuQuantWeight::concat_outputs(&blocks) {
                Some(w) => Weight::CpuQuant(w),
                None => return Ok(None),
            }
        } else {
            return Ok(None);
        };
        let biases: Vec<&Tensor> = parts.iter().filter_map(|p| p.bias.as_ref()).collect();
        let bias = match biases.len() {
            0 => None,
            n if n == parts.len() => Some(Tensor::cat(&biases, 0)?),
            n => bail!("{n} of {} concatenated layers have a bias", parts.len()),
        };
        Ok(Some(Self { weight, bias }))
    }

    /// The number of output features (weights are `[out, in]`).
    pub fn out_dim(&self) -> usize {
        match &self.weight {
            Weight::Candle(QMatMul::QTensor(q)) => q.shape().dims()[0],
            Weight::Candle(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) | Weight::Dequantized(w) => {
                w.dims()[0]
            }
            Weight::CpuQuant(w) => w.out_dim(),
        }
    }

    /// One row only: there our kernel beats cuBLAS on every Llama-3.1-8B projection
    /// (2.0-3.1 TB/s against 1.7-2.8), while at 8 rows it reads x from L1 eight times
    /// per weight and falls behind (1.2-1.7 TB/s against 1.5-2.7; `bench_kernels gemv`).
    #[cfg(feature = "cuda")]
    fn takes_gemv(x: &Tensor, w: &Tensor) -> Result<bool> {
        Ok(x.rank() == 2
            && x.dim(0)? == 1
            && w.dim(1)? % 8 == 0
            && super::uses_cuda_kernels(x.device(), x.dtype()))
    }

    /// The dense weight, when `x` is a row our GEMV takes and there is no bias: for
    /// kernels that fuse more into the product.
    #[cfg(feature = "cuda")]
    pub fn gemv_weight(&self, x: &Tensor) -> Result<Option<&Tensor>> {
        match &self.weight {
            Weight::Candle(QMatMul::Tensor(w))
                if self.bias.is_none() && Self::takes_gemv(x, w)? =>
            {
                Ok(Some(w))
            }
            _ => Ok(None),
        }
    }

    /// `x`: `[tokens, in]` -> `[tokens, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            Weight::CpuQuant(w) => w.forward(x)?,
            Weight::Dequantized(w) => x
                .to_dtype(DType::F32)?
                .matmul(&w.t()?)?
                .to_dtype(x.dtype())?,
            // f32 activations on CUDA: the weight dequantized for every product, the exact
            // path that matches the CPU (candle's quantized kernels quantize the
            // activations to 8 bits, so a sequence's tokens would depend on its batch).
            Weight::Candle(QMatMul::QTensor(q)) if x.dtype() == DType::F32 => {
                x.matmul(&q.dequantize(x.device())?.t()?)?
            }
            // A single decode row: our bandwidth-bound kernel instead of cuBLAS.
            #[cfg(feature = "cuda")]
            Weight::Candle(QMatMul::Tensor(w)) if Self::takes_gemv(x, w)? => {
                text_generation_kernels::gemv(&x.contiguous()?, w)?
            }
            // candle's quantized matmul takes f32 activations.
            Weight::Candle(w @ QMatMul::QTensor(_)) => {
                w.forward(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?
            }
            Weight::Candle(w) => w.forward(x)?,
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
    /// The `[out_dim, in_dim]` layer at `w`, this rank's columns.
    pub fn load(w: &Weights, in_dim: usize, out_dim: usize, comm: &Comm) -> Result<Self> {
        let part = even_split(
            &**comm,
            in_dim,
            "the input features of a row-parallel layer",
        )?
        .map(|range| Part { dim: 1, range });
        Ok(Self {
            linear: Linear {
                weight: factory::load(w, (out_dim, in_dim), part.as_ref())?,
                bias: None,
            },
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

    /// On CPU a quantized weight, in each format of GGUF weights, gives the dense
    /// product of candle's dequantization of it, and a row's result is the same bits
    /// alone or batched (batch invariance).
    #[test]
    fn quantized_rows_match_the_dense_product_alone_or_batched() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (40, 512), &dev)?;
        let x = Tensor::randn(0f32, 1., (11, 512), &dev)?;
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            let q = QTensor::quantize(&w, dtype)?;
            let dense = q.dequantize(&dev)?;
            let linear = Linear::new(QMatMul::from_qtensor(q)?, None)?;
            let batched = linear.forward(&x)?;
            let expected = x.matmul(&dense.t()?)?;
            let scale = expected.abs()?.max_all()?.to_scalar::<f32>()?;
            let diff = (&batched - expected)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-5 * scale, "{dtype:?}: {diff} vs {scale}");
            for row in [0, 5, 10] {
                let alone = linear.forward(&x.narrow(0, row, 1)?)?.flatten_all()?;
                let in_batch = batched.narrow(0, row, 1)?.flatten_all()?;
                assert_eq!(
                    alone.to_vec1::<f32>()?,
                    in_batch.to_vec1::<f32>()?,
                    "{dtype:?} row {row}"
                );
            }
        }
        Ok(())
    }

    /// A GGUF format the kernels lack (Q8_1, ggml's activation format) is dequantized
    /// once at load and gives the dense product.
    #[test]
    fn formats_the_kernels_lack_are_dequantized_once() -> Result<()> {
        let dev = Device::Cpu;
        let q = QTensor::quantize(&Tensor::randn(0f32, 1., (8, 64), &dev)?, GgmlDType::Q8_1)?;
        let dense = q.dequantize(&dev)?;
        let linear = Linear::new(QMatMul::from_qtensor(q)?, None)?;
        assert!(matches!(linear.weight, Weight::Dequantized(_)));
        let x = Tensor::randn(0f32, 1., (3, 64), &dev)?;
        let diff = (linear.forward(&x)? - x.matmul(&dense.t()?)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-4, "{diff}");
        Ok(())
    }

    /// The concatenated layer computes each part's outputs, in order; quantized parts
    /// and a bias on only some parts are not concatenated.
    #[test]
    fn concat_outputs_matches_the_parts() -> Result<()> {
        let dev = Device::Cpu;
        let part = |out: usize, bias: bool| -> Result<Linear> {
            let b = if bias {
                Some(Tensor::randn(0f32, 1., out, &dev)?)
            } else {
                None
            };
            Linear::new(
                QMatMul::Tensor(Tensor::randn(0f32, 1., (out, 32), &dev)?),
                b,
            )
        };
        let x = Tensor::randn(0f32, 1., (3, 32), &dev)?;
        for bias in [false, true] {
            let parts = [part(8, bias)?, part(4, bias)?, part(4, bias)?];
            let fused = Linear::concat_outputs(&parts)?.expect("dense parts concatenate");
            let expected = Tensor::cat(
                &parts
                    .iter()
                    .map(|p| p.forward(&x))
                    .collect::<Result<Vec<_>>>()?,
                1,
            )?;
            let diff = (fused.forward(&x)? - expected)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-5, "bias {bias}: {diff}");
        }
        assert!(Linear::concat_outputs(&[part(4, true)?, part(4, false)?]).is_err());
        let quantized = |dtype: GgmlDType| -> Result<Linear> {
            let q = QTensor::quantize(&Tensor::randn(0f32, 1., (4, 32), &dev)?, dtype)?;
            Linear::new(QMatMul::from_qtensor(q)?, None)
        };
        assert!(Linear::concat_outputs(&[part(4, false)?, quantized(GgmlDType::Q8_0)?])?.is_none());
        let mixed = [quantized(GgmlDType::Q8_0)?, quantized(GgmlDType::Q4_0)?];
        assert!(Linear::concat_outputs(&mixed)?.is_none());
        let parts = [quantized(GgmlDType::Q8_0)?, quantized(GgmlDType::Q8_0)?];
        let fused = Linear::concat_outputs(&parts)?.expect("blocks of one format concatenate");
        let expected = Tensor::cat(&[parts[0].forward(&x)?, parts[1].forward(&x)?], 1)?;
        assert_eq!(
            fused.forward(&x)?.to_vec2::<f32>()?,
            expected.to_vec2::<f32>()?
        );
        Ok(())
    }

    #[test]
    fn dense_with_bias() -> Result<()> {
        let w = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &Device::Cpu)?;
        let b = Tensor::new(&[1f32, 0., -1.], &Device::Cpu)?;
        let linear = Linear::new(QMatMul::Tensor(w), Some(b))?;
        let y = linear.forward(&Tensor::new(&[[1f32, 1.]], &Device::Cpu)?)?;
        assert_eq!(y.to_vec2::<f32>()?, vec![vec![4., 7., 10.]]);
        Ok(())
    }
}
