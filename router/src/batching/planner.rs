//! How large the next batch may be: the first batch fills the budgets; while a
//! batch runs, new requests join only when enough are waiting
//! (`waiting_served_ratio`) or they waited too long (`max_waiting_tokens`),
//! so that prefills do not stall the running decodes at every step. Joining
//! prompts share a forward pass with one decode step of the running batch (a
//! mixed step) whenever both fit the prefill budget the warmup proved.
//!
//! With chunked prefill (TGI v3), the budget of every step is shared instead: the
//! running requests' decode rows first, then chunks of waiting prompts in what is
//! left, so that a long prompt never stalls the running decodes for more than one
//! budget's pass, and requests join at every step.

use super::queue::BatchLimits;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchingConfig {
    pub max_batch_prefill_tokens: u32,
    pub max_batch_total_tokens: u32,
    pub max_batch_size: Option<usize>,
    /// New requests join when at least `running size * ratio` of them wait.
    pub waiting_served_ratio: f32,
    /// Decode steps after which waiting requests join whatever their number.
    pub max_waiting_tokens: usize,
    /// The shards compute on GPUs: the loop polls for each step's answer instead of
    /// sleeping on it (on CPUs the spinning thread would slow the model down), and
    /// decode steps run ahead.
    pub shards_on_gpu: bool,
    /// The shards prefill prompts in chunks (`Request.chunk_len`).
    pub chunking: bool,
}

/// Why new requests joined the running batch (`tgi_batch_concat{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConcatReason {
    /// Enough requests were waiting.
    Backpressure,
    /// They had waited `max_waiting_tokens` steps.
    WaitExceeded,
}

impl ConcatReason {
    pub fn as_label(self) -> &'static str {
        match self {
            ConcatReason::Backpressure => "backpressure",
            ConcatReason::WaitExceeded => "wait_exceeded",
        }
    }
}

impl BatchingConfig {
    /// Limits for a batch formed while nothing runs.
    pub fn first_batch_limits(&self) -> BatchLimits {
        BatchLimits {
            min_size: None,
            max_size: self.max_batch_size,
            prefill_token_budget: self.max_batch_prefill_tokens,
            chunking: self.chunking,
            token_budget: self.max_batch_total_tokens,
        }
    }

    /// Whether a joining batch of `prompt_tokens` new tokens shares one forward pass
    /// with the decode step of `running_size` running requests (a mixed step): the
    /// warmup proved passes of up to `max_batch_prefill_tokens` tokens. A larger one
    /// is prefilled alone, then decoded together with the running batch.
    pub fn fits_mixed_step(&self, prompt_tokens: usize, running_size: usize) -> bool {
        prompt_tokens.saturating_add(running_size) <= self.max_batch_prefill_tokens as usize
    }

    /// Limits for requests joining a running batch of `running_size` requests
    /// holding up to `running_max_tokens` tokens, `waiting_steps` decode steps
    /// after the last join.
    pub fn join_limits(
        &self,
        running_size: usize,
        running_max_tokens: u32,
        waiting_steps: usize,
    ) -> (BatchLimits, ConcatReason) {
        let (min_size, reason) = if waiting_steps >= self.max_waiting_tokens {
            (None, ConcatReason::WaitExceeded)
        } else if self.chunking {
            // Joining costs the running requests at most one budget's pass.
            (None, ConcatReason::Backpressure)
        } else {
            let min_size = (running_size as f32 * self.waiting_served_ratio).floor() as usize;
            (Some(min_size), ConcatReason::Backpressure)
        };
        let limits = BatchLimits {
            min_size,
            max_size: self
                .max_batch_size
                .map(|max_size| max_size.saturating_sub(running_size)),
            // With chunking, the running requests' decode rows share the pass's budget.
            prefill_token_budget: if self.chunking {
                self.max_batch_prefill_tokens
                    .saturating_sub(running_size as u32)
            } else {
                self.max_batch_prefill_tokens
            },
            chunking: self.chunking,
            token_budget: self
                .max_batch_total_tokens
                .saturating_sub(running_max_tokens),
        };
        (limits, reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_join_shares_the_running_decode_pass_while_the_two_fit_the_prefill_budget() {
        let config = config();
        let budget = config.max_batch_prefill_tokens as usize;
        assert!(config.fits_mixed_step(budget - 10, 10));
        assert!(!config.fits_mixed_step(budget - 10, 11));
        assert!(!config.fits_mixed_step(usize::MAX, 1), "saturates");
    }

    fn config() -> BatchingConfig {
        BatchingConfig {
            max_batch_prefill_tokens: 512,
            max_batch_total_tokens: 4096,
            max_batch_size: Some(8),
            waiting_served_ratio: 0.3,
            max_waiting_tokens: 20,
            shards_on_gpu: false,
            chunking: false,
        }
    }

    #[test]
    fn with_chunking_the_running_decode_rows_share_the_prefill_budget() {
        let chunking = BatchingConfig {
            chunking: true,
            ..config()
        };
        assert!(chunking.first_batch_limits().chunking);
        let (limits, reason) = chunking.join_limits(10, 1000, 3);
        assert_eq!(limits.prefill_token_budget, 502);
        assert_eq!(limits.min_size, None, "requests join at every step");
        assert_eq!(reason, ConcatReason::Backpressure);
        assert!(limits.chunking);
        assert!(chunking.fits_mixed_step(502, 10), "a join always shares the pass");
        assert_eq!(chunking.join_limits(600, 0, 3).0.prefill_token_budget, 0);
        assert_eq!(config().join_limits(10, 1000, 3).0.prefill_token_budget, 512);
    }

    #[test]
    fn the_first_batch_gets_the_whole_budgets() {
        let limits = config().first_batch_limits();
        assert_eq!(limits.min_size, None);
        assert_eq!(limits.max_size, Some(8));
        assert_eq!(limits.prefill_token_budget, 512);
        assert_eq!(limits.token_budget, 4096);
    }

    #[test]
    fn joining_needs_enough_waiting_requests_until_the_wait_is_too_long() {
        let (limits, reason) = config().join_limits(10, 1000, 3);
        assert_eq!(limits.min_size, Some(3));
        assert_eq!(reason, ConcatReason::Backpressure);
        assert_eq!(limits.token_budget, 3096);

        let (limits, reason) = config().join_limits(10, 1000, 20);
        assert_eq!(limits.min_size, None);
        assert_eq!(reason, ConcatReason::WaitExceeded);
    }

    #[test]
    fn a_full_running_batch_leaves_no_room() {
        let (limits, _) = config().join_limits(8, 100, 1);
        assert_eq!(limits.max_size, Some(0));
        let (limits, _) = config().join_limits(3, 5000, 1);
        assert_eq!(limits.max_size, Some(5));
        assert_eq!(limits.token_budget, 0);
        let unbounded = BatchingConfig {
            max_batch_size: None,
            ..config()
        };
        assert_eq!(unbounded.join_limits(100, 0, 1).0.max_size, None);
    }
}
