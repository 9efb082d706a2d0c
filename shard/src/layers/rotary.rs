//! Rotary position embeddings with per-token positions (a ragged batch mixes positions
//! of several sequences). Two layouts of the rotated pairs exist: HF checkpoints rotate
//! the two halves of a head (`x[i]` with `x[i + d/2]`), llama.cpp's GGUF files permute
//! Q/K rows so that adjacent elements (`x[2i]`, `x[2i+1]`) form the pairs.

use candle_core::{bail, DType, Device, Result, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotaryLayout {
    /// Pairs `(i, i + d/2)`: Hugging Face checkpoints.
    HalfSplit,
    /// Pairs `(2i, 2i + 1)`: llama.cpp's layout of Llama GGUF files.
    Interleaved,
}

/// Frequency adjustments on top of `1 / theta^(2i/d)`.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.1's: long wavelengths slowed down by `factor`, short ones kept, smooth in between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Per-frequency divisors, as llama.cpp stores them in `rope_freqs.weight`.
    FrequencyFactors(Vec<f32>),
}

pub struct RotaryEmbedding {
    /// `[max_positions, head_dim / 2]`, in the activation dtype.
    cos: Tensor,
    sin: Tensor,
    layout: RotaryLayout,
}

/// The cos/sin rows of a batch's positions, computed once per forward pass.
pub struct RotaryAt {
    /// `[tokens, 1, head_dim / 2]`.
    cos: Tensor,
    sin: Tensor,
    layout: RotaryLayout,
}

impl RotaryEmbedding {
    pub fn new(
        head_dim: usize,
        max_positions: usize,
        theta: f64,
        scaling: Option<&RopeScaling>,
        layout: RotaryLayout,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if !head_dim.is_multiple_of(2) {
            bail!("rotary embeddings need an even head_dim, got {head_dim}")
        }
        let inv_freq = inverse_frequencies(head_dim, theta, scaling)?;
        let inv_freq = Tensor::from_vec(inv_freq, (1, head_dim / 2), device)?;
        let positions = Tensor::arange(0u32, max_positions as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((max_positions, 1))?;
        let angles = positions.broadcast_mul(&inv_freq)?;
        Ok(Self {
            cos: angles.cos()?.to_dtype(dtype)?,
            sin: angles.sin()?.to_dtype(dtype)?,
            layout,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    /// `positions`: `[tokens]` u32.
    pub fn at(&self, positions: &Tensor) -> Result<RotaryAt> {
        let tokens = positions.dim(0)?;
        let half = self.cos.dim(1)?;
        Ok(RotaryAt {
            cos: self
                .cos
                .index_select(positions, 0)?
                .reshape((tokens, 1, half))?,
            sin: self
                .sin
                .index_select(positions, 0)?
                .reshape((tokens, 1, half))?,
            layout: self.layout,
        })
    }
}

impl RotaryAt {
    /// The cos and sin rows, `[tokens, head_dim / 2]`, and the layout of the pairs, for
    /// kernels that rotate on their own.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn tables(&self) -> Result<(Tensor, Tensor, RotaryLayout)> {
        let (tokens, _, half) = self.cos.dims3()?;
        Ok((
            self.cos.reshape((tokens, half))?,
            self.sin.reshape((tokens, half))?,
            self.layout,
        ))
    }

    /// `x`: `[tokens, heads, head_dim]`, each token rotated by its own position.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (tokens, heads, head_dim) = x.dims3()?;
        // candle's rope kernels take `[batch, heads, seq, dim]` with per-batch cos/sin:
        // each token is its own batch entry of sequence length 1.
        let x = x.contiguous()?.reshape((tokens, heads, 1, head_dim))?;
        let rotated = match self.layout {
            RotaryLayout::HalfSplit => candle_nn::rotary_emb::rope(&x, &self.cos, &self.sin)?,
            RotaryLayout::Interleaved => candle_nn::rotary_emb::rope_i(&x, &self.cos, &self.sin)?,
        };
        rotated.reshape((tokens, heads, head_dim))
    }
}

fn inverse_frequencies(
    head_dim: usize,
    theta: f64,
    scaling: Option<&RopeScaling>,
) -> Result<Vec<f32>> {
    let base = (0..head_dim / 2).map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64));
    match scaling {
        None => Ok(base.map(|f| f as f32).collect()),
        Some(RopeScaling::FrequencyFactors(factors)) => {
            if factors.len() != head_dim / 2 {
                bail!(
                    "{} rope frequency factors for head_dim {head_dim}",
                    factors.len()
                )
            }
            Ok(base
                .zip(factors)
                .map(|(f, &d)| (f / d as f64) as f32)
                .collect())
        }
        Some(&RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            if high_freq_factor <= low_freq_factor {
                bail!("llama3 rope scaling needs high_freq_factor > low_freq_factor")
            }
            let old_context = original_max_position_embeddings as f64;
            let low_freq_wavelen = old_context / low_freq_factor;
            let high_freq_wavelen = old_context / high_freq_factor;
            Ok(base
                .map(|f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    let scaled = if wavelen < high_freq_wavelen {
                        f
                    } else if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        let smooth = (old_context / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    };
                    scaled as f32
                })
                .collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rotating by the positions of a ragged batch equals rotating each token alone, and
    /// both layouts rotate their pairs by the same angles.
    #[test]
    fn layouts_rotate_the_same_pairs() -> Result<()> {
        let dev = Device::Cpu;
        let half = RotaryEmbedding::new(
            4,
            16,
            10000.0,
            None,
            RotaryLayout::HalfSplit,
            DType::F32,
            &dev,
        )?;
        let inter = RotaryEmbedding::new(
            4,
            16,
            10000.0,
            None,
            RotaryLayout::Interleaved,
            DType::F32,
            &dev,
        )?;
        let positions = Tensor::new(&[3u32, 0, 7], &dev)?;
        // Token layout (a, b, c, d): half-split pairs (a, c), (b, d); interleaved pairs (a, b), (c, d).
        let x = Tensor::arange(0f32, 12., &dev)?.reshape((3, 1, 4))?;
        let y_half = half.at(&positions)?.apply(&x)?;
        let permute = Tensor::new(&[0u32, 2, 1, 3], &dev)?;
        let y_inter = inter
            .at(&positions)?
            .apply(&x.index_select(&permute, 2)?)?
            .index_select(&permute, 2)?;
        let diff = (y_half - y_inter)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        // Position 0 is the identity.
        let row0 = half
            .at(&positions)?
            .apply(&x)?
            .get(1)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(row0, vec![4., 5., 6., 7.]);
        Ok(())
    }

    #[test]
    fn llama3_scaling_keeps_high_and_slows_low_frequencies() -> Result<()> {
        let scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let plain = inverse_frequencies(128, 500000.0, None)?;
        let scaled = inverse_frequencies(128, 500000.0, Some(&scaling))?;
        assert_eq!(plain[0], scaled[0]);
        assert!((plain[63] / 8.0 - scaled[63]).abs() < 1e-12);
        Ok(())
    }
}
