//! Whether the shards served a step recently: a /health probe then needs no
//! shard round trip (TGI's semantics).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A successful step older than this no longer vouches for the shards.
const RECENT: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub struct GenerationHealth {
    last_success: Mutex<Option<Instant>>,
}

impl GenerationHealth {
    /// Records the outcome of a shard call: a failure forgets past successes.
    pub fn record(&self, success: bool) {
        *self.lock() = success.then(Instant::now);
    }

    pub fn recently_healthy(&self) -> bool {
        self.lock().is_some_and(|at| at.elapsed() < RECENT)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.last_success
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_forgets_the_last_success() {
        let health = GenerationHealth::default();
        assert!(!health.recently_healthy());
        health.record(true);
        assert!(health.recently_healthy());
        health.record(false);
        assert!(!health.recently_healthy());
    }
}
