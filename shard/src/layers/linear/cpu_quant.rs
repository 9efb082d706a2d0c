//! Quantized GGUF weights on CPU: their blocks, copied once at load, multiplied by
//! `text-generation-cpu-kernels` (f32 activations, each weight block dequantized in
//! cache): the dense product of the dequantized weights, and each row's result the
//! same whatever rows share its batch.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use text_generation_cpu_kernels::{BlockFormat, QuantMatrix};

pub struct CpuQuantWeight {
    /// `[out, in]`.
    matrix: QuantMatrix,
}

impl CpuQuantWeight {
    /// The blocks of a CPU `[out, in]` tensor; None for formats the kernels lack.
    pub fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        let Some(format) = block_format(q.dtype()) else {
            return Ok(None);
        };
        let (out, in_dim) = q.shape().dims2()?;
        let matrix = QuantMatrix::new(format, out, in_dim, q.data()?.into_owned())
            .map_err(candle_core::Error::wrap)?;
        Ok(Some(Self { matrix }))
    }

    /// The parts' rows one after the other; None unless they share format and inputs.
    pub fn concat_outputs(parts: &[&Self]) -> Option<Self> {
        let matrices: Vec<&QuantMatrix> = parts.iter().map(|p| &p.matrix).collect();
        QuantMatrix::concat_outputs(&matrices).map(|matrix| Self { matrix })
    }

    pub fn out_dim(&self) -> usize {
        self.matrix.out_features()
    }

    /// `x`: `[..., in]` -> `[..., out]`, computed in f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.to_dtype(DType::F32)?
            .contiguous()?
            .apply_op1_no_bwd(self)?
            .to_dtype(x.dtype())
    }
}

fn block_format(dtype: GgmlDType) -> Option<BlockFormat> {
    Some(match dtype {
        GgmlDType::Q4_0 => BlockFormat::Q4_0,
        GgmlDType::Q4_1 => BlockFormat::Q4_1,
        GgmlDType::Q5_0 => BlockFormat::Q5_0,
        GgmlDType::Q5_1 => BlockFormat::Q5_1,
        GgmlDType::Q8_0 => BlockFormat::Q8_0,
        GgmlDType::Q2K => BlockFormat::Q2K,
        GgmlDType::Q3K => BlockFormat::Q3K,
        GgmlDType::Q4K => BlockFormat::Q4K,
        GgmlDType::Q5K => BlockFormat::Q5K,
        GgmlDType::Q6K => BlockFormat::Q6K,
        _ => return None,
    })
}

impl CustomOp1 for CpuQuantWeight {
    fn name(&self) -> &'static str {
        "cpu-quant-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), Some((start, end))) = (storage, layout.contiguous_offsets())
        else {
            bail!("cpu-quant-matmul takes contiguous f32 activations");
        };
        let dims = layout.shape().dims();
        if dims.last() != Some(&self.matrix.in_features()) {
            bail!(
                "cpu-quant-matmul: activations {dims:?} for {} input features",
                self.matrix.in_features()
            );
        }
        let y = self.matrix.matmul_to_vec(&x[start..end]);
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("at least one dimension") = self.matrix.out_features();
        Ok((CpuStorage::F32(y), Shape::from(out_dims)))
    }
}
