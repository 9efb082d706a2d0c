//! The building blocks of the Llama-family models, each written once and loaded from
//! checkpoint prefixes so names mirror the checkpoint (`...self_attn.q_proj`).

pub mod attention;
pub mod embedding;
pub mod linear;
pub mod mlp;
pub mod norm;
pub mod rotary;

use candle_core::{bail, CpuStorage, DType, Device, Result, Storage, Tensor};

/// Whether `dtype` activations on `device` run through our CUDA kernels
/// (`text-generation-kernels`: bf16/f16). f32 on CUDA takes candle's ops instead, which
/// compute what the CPU computes: the exact path that CUDA output is checked against.
pub fn uses_cuda_kernels(device: &Device, dtype: DType) -> bool {
    cfg!(feature = "cuda") && device.is_cuda() && matches!(dtype, DType::BF16 | DType::F16)
}

/// `f` of the elements of contiguous f32 CPU tensors, without copying them.
pub(crate) fn with_cpu_f32<R>(tensors: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Result<R> {
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let data = guards
        .iter()
        .map(|(storage, layout)| match (&**storage, layout.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) => Ok(&data[start..end]),
            _ => bail!("expected a contiguous f32 CPU tensor, got {:?}", layout.shape()),
        })
        .collect::<Result<Vec<&[f32]>>>()?;
    Ok(f(&data))
}
