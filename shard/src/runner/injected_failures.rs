//! A debug knob (`--debug-fail-steps`) that makes chosen Prefill/Decode steps fail as a
//! CUDA out-of-memory error after warmup would, so that the recovery path (the step's
//! requests fail, their blocks are freed, serving goes on) is tested without a GPU.

use anyhow::{bail, Result};
use std::collections::BTreeSet;

#[derive(Debug, Default)]
pub struct InjectedFailures {
    /// 1-based numbers of the steps (Prefill and Decode calls, warmup excluded) to fail.
    steps: BTreeSet<u64>,
    taken: u64,
}

impl InjectedFailures {
    pub fn new(steps: &[u64]) -> Self {
        Self {
            steps: steps.iter().copied().collect(),
            taken: 0,
        }
    }

    /// Counts a step; Err if it is one to fail.
    pub fn next_step(&mut self) -> Result<()> {
        self.taken += 1;
        if self.steps.contains(&self.taken) {
            bail!(
                "CUDA_ERROR_OUT_OF_MEMORY: out of memory (injected by --debug-fail-steps at step {})",
                self.taken
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fails_exactly_the_chosen_steps() {
        let mut failures = InjectedFailures::new(&[2, 4]);
        let outcomes: Vec<bool> = (0..5).map(|_| failures.next_step().is_ok()).collect();
        assert_eq!(outcomes, [true, false, true, false, true]);
        let mut none = InjectedFailures::default();
        assert!((0..100).all(|_| none.next_step().is_ok()));
    }
}
