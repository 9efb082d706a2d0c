//! The gated feed-forward block: `down(silu(gate(x)) * up(x))`.

use super::linear::Linear;
use crate::weights::Weights;
use candle_core::{Result, Tensor};

pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    pub fn load(w: &Weights, hidden_size: usize, intermediate_size: usize) -> Result<Self> {
        Ok(Self {
            gate_proj: Linear::load(&w.pp("gate_proj"), hidden_size, intermediate_size, false)?,
            up_proj: Linear::load(&w.pp("up_proj"), hidden_size, intermediate_size, false)?,
            down_proj: Linear::load(&w.pp("down_proj"), intermediate_size, hidden_size, false)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?.silu()?;
        self.down_proj.forward(&(gate * self.up_proj.forward(x)?)?)
    }
}
