//! How long each call to a shard may take before the shard group is declared stuck.
//! A shard that stops answering (a collective that never completes, a GPU fault, a
//! process stopped by the kernel) does not die, so nothing else would notice it.

use std::time::Duration;

/// A step's deadline grows with the tokens it computes: on a slow CPU a long prompt
/// takes a few milliseconds a token, ten times that is still "answering".
const PER_TOKEN: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// The base of a Prefill's or Decode's deadline.
    pub step_base: Duration,
    /// Warmup: the largest prefill, CUDA graph capture, the KV cache's allocation.
    pub warmup: Duration,
    /// Info, ClearCache, FilterBatch: no forward pass of their own, but the shard
    /// answers them after the step it is running.
    pub control: Duration,
    /// A /health probe of idle shards: below the 5 s timeout of Kubernetes probes.
    pub health: Duration,
}

const HEALTH_PROBE: Duration = Duration::from_secs(2);

impl Deadlines {
    pub fn new(step_base: Duration, warmup: Duration) -> Self {
        Self {
            step_base,
            warmup,
            control: step_base,
            health: step_base.min(HEALTH_PROBE),
        }
    }

    /// A Prefill or Decode computing `tokens` tokens (prompt tokens and decode rows).
    pub fn step(&self, tokens: usize) -> Duration {
        self.step_base + PER_TOKEN * tokens as u32
    }
}

impl Default for Deadlines {
    fn default() -> Self {
        Self::new(Duration::from_secs(30), Duration::from_secs(1800))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_gets_the_base_deadline_plus_its_tokens() {
        let deadlines = Deadlines::new(Duration::from_secs(5), Duration::from_secs(60));
        assert_eq!(deadlines.step(1), Duration::from_millis(5010));
        assert_eq!(deadlines.step(8192), Duration::from_millis(5000 + 81_920));
        assert_eq!(deadlines.control, Duration::from_secs(5));
        assert_eq!(deadlines.health, Duration::from_secs(2));
    }
}
