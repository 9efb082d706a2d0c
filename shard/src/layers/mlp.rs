//! The gated feed-forward block: `down(silu(gate(x)) * up(x))`.
//!
//! On a CUDA device with dense bf16/f16 weights, gate and up are one `[2 * intermediate, hidden]`
//! projection whose output the fused `silu_mul` kernel reads in one pass (one GEMM and
//! one kernel instead of two GEMMs and three elementwise ops); a single row (decode at
//! batch 1) gets the activation inside the GEMV (quantized formats too: they are
//! dequantized at load). Quantized weights on CPU are one projection too (one parallel
//! product instead of two).

use super::linear::{Linear, RowParallelLinear};
use super::uses_cuda_kernels;
use super::with_cpu_f32;
use crate::dist::{even_split, Comm};
use crate::weights::Weights;
use candle_core::{DType, Result, Tensor, D};
use text_generation_cpu_kernels::silu_mul;

enum GateUp {
    Split {
        gate: Linear,
        up: Linear,
    },
    /// Rows `[gate | up]` of one projection.
    Fused(Linear),
}

pub struct Mlp {
    gate_up: GateUp,
    down_proj: RowParallelLinear,
}

impl Mlp {
    /// Gate and up column-parallel, down row-parallel: this rank's share of the
    /// intermediate features.
    pub fn load(
        w: &Weights,
        hidden_size: usize,
        intermediate_size: usize,
        comm: &Comm,
    ) -> Result<Self> {
        let part = even_split(&**comm, intermediate_size, "the MLP's intermediate size")?;
        let column = |name: &str| {
            Linear::load_column_parallel(&w.pp(name), hidden_size, intermediate_size, false, part.clone())
        };
        let parts = [column("gate_proj")?, column("up_proj")?];
        // CUDA kernels read rows in 16-byte vectors: 8 half-precision elements. On the
        // CPU, quantized weights make one parallel product instead of two.
        let fuse = (uses_cuda_kernels(w.device(), w.dtype()) && parts[0].out_dim() % 8 == 0)
            || (w.device().is_cpu() && (w.is_gguf() || w.quantization().is_some()));
        let fused = if fuse {
            Linear::concat_outputs(&parts)?
        } else {
            None
        };
        let gate_up = match fused {
            Some(fused) => GateUp::Fused(fused),
            None => {
                let [gate, up] = parts;
                GateUp::Split { gate, up }
            }
        };
        Ok(Self {
            gate_up,
            down_proj: RowParallelLinear::load(
                &w.pp("down_proj"),
                intermediate_size,
                hidden_size,
                comm,
            )?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let activated = match &self.gate_up {
            GateUp::Split { gate, up } => (gate.forward(x)?.silu()? * up.forward(x)?)?,
            #[cfg(feature = "cuda")]
            GateUp::Fused(gate_up) if uses_cuda_kernels(x.device(), x.dtype()) => {
                match gate_up.gemv_weight(x)? {
                    // A single row: SwiGLU inside the projection's kernel.
                    Some(w) => text_generation_kernels::gemv_silu_mul(&x.contiguous()?, w)?,
                    None => text_generation_kernels::silu_mul(&gate_up.forward(x)?)?,
                }
            }
            GateUp::Fused(gate_up) => {
                let y = gate_up.forward(x)?;
                let half = y.dim(D::Minus1)? / 2;
                if y.device().is_cpu() && y.dtype() == DType::F32 {
                    // One parallel pass (candle's three run on one thread), the same bits.
                    let mut dims = y.dims().to_vec();
                    *dims.last_mut().expect("a last dimension") = half;
                    let y = y.contiguous()?;
                    let out = with_cpu_f32(&[&y], |data| silu_mul(data[0], half))?;
                    Tensor::from_vec(out, dims, y.device())?
                } else {
                    (y.narrow(D::Minus1, 0, half)?.silu()? * y.narrow(D::Minus1, half, half)?)?
                }
            }
        };
        self.down_proj.forward(&activated)
    }
}
