//! The building blocks of the Llama-family models, each written once and loaded from
//! checkpoint prefixes so names mirror the checkpoint (`...self_attn.q_proj`).

pub mod attention;
pub mod embedding;
pub mod linear;
pub mod mlp;
pub mod norm;
pub mod rotary;

use candle_core::{DType, Device};

/// Whether `dtype` activations on `device` run through our CUDA kernels
/// (`text-generation-kernels`: bf16/f16). f32 on CUDA takes candle's ops instead, which
/// compute what the CPU computes: the exact path that CUDA output is checked against.
pub fn uses_cuda_kernels(device: &Device, dtype: DType) -> bool {
    cfg!(feature = "cuda") && device.is_cuda() && matches!(dtype, DType::BF16 | DType::F16)
}
