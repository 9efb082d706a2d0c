//! A request's sampling parameters, validated.

use anyhow::{ensure, Result};
use proto::v3::NextTokenChooserParameters;

/// The most alternatives (`top_n_tokens`) a request may ask for per token: the device
/// sampler's limit, applied on every device alike.
pub const MAX_TOP_N_TOKENS: usize = 32;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub typical_p: f32,
    pub min_p: f32,
    pub do_sample: bool,
    pub seed: u64,
    pub repetition_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            typical_p: 1.0,
            min_p: 0.0,
            do_sample: false,
            seed: 0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
        }
    }
}

impl SamplingParams {
    /// Unset parameters (`None`) mean plain greedy decoding.
    pub fn from_proto(p: Option<&NextTokenChooserParameters>) -> Result<Self> {
        let Some(p) = p else {
            return Ok(Self::default());
        };
        let params = Self {
            temperature: p.temperature,
            top_k: p.top_k as usize,
            top_p: p.top_p,
            typical_p: p.typical_p,
            min_p: p.min_p,
            do_sample: p.do_sample,
            seed: p.seed,
            repetition_penalty: p.repetition_penalty,
            frequency_penalty: p.frequency_penalty,
            presence_penalty: p.presence_penalty,
        };
        ensure!(
            params.temperature.is_finite() && params.temperature > 0.0,
            "temperature must be > 0, got {}",
            params.temperature
        );
        for (name, value) in [("top_p", params.top_p), ("typical_p", params.typical_p)] {
            ensure!(
                value > 0.0 && value <= 1.0,
                "{name} must be in (0, 1], got {value}"
            );
        }
        ensure!(
            (0.0..=1.0).contains(&params.min_p),
            "min_p must be in [0, 1], got {}",
            params.min_p
        );
        ensure!(
            params.repetition_penalty.is_finite() && params.repetition_penalty > 0.0,
            "repetition_penalty must be > 0, got {}",
            params.repetition_penalty
        );
        for (name, value) in [
            ("frequency_penalty", params.frequency_penalty),
            ("presence_penalty", params.presence_penalty),
        ] {
            ensure!(value.is_finite(), "{name} must be finite, got {value}");
        }
        Ok(params)
    }

    /// Whether any processor changes the distribution.
    pub fn warps(&self) -> bool {
        self.temperature != 1.0
            || self.top_k > 0
            || self.top_p < 1.0
            || self.typical_p < 1.0
            || self.min_p > 0.0
    }

    pub fn penalises(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.frequency_penalty != 0.0
            || self.presence_penalty != 0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_invalid_parameters() {
        let valid = NextTokenChooserParameters::greedy();
        assert!(SamplingParams::from_proto(Some(&valid)).is_ok());
        for bad in [
            NextTokenChooserParameters {
                temperature: 0.0,
                ..valid.clone()
            },
            NextTokenChooserParameters {
                top_p: 1.5,
                ..valid.clone()
            },
            NextTokenChooserParameters {
                typical_p: 0.0,
                ..valid.clone()
            },
            NextTokenChooserParameters {
                min_p: 1.5,
                ..valid.clone()
            },
            NextTokenChooserParameters {
                min_p: f32::NAN,
                ..valid.clone()
            },
            NextTokenChooserParameters {
                repetition_penalty: -1.0,
                ..valid.clone()
            },
        ] {
            assert!(SamplingParams::from_proto(Some(&bad)).is_err(), "{bad:?}");
        }
    }
}
