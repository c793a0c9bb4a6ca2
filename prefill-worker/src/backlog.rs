//! Queued prefill work, in seconds: the tokens waiting to start over the rate this worker has
//! measured. What a prefill pool's autoscaler reads (`tandem_prefill_backlog_seconds`): llm-d
//! scales prefill on queued work rather than on request counts, since one long prompt weighs
//! as much as a hundred short ones.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Weight of the newest batch in the rate's running mean.
const ALPHA: f64 = 0.2;

/// Tokens queued and the measured prefill rate, shared by the submitting handle and the loop.
#[derive(Default, Debug)]
pub struct Backlog {
    tokens: AtomicUsize,
    /// Tokens per second (an exponentially weighted mean over batches), as f64 bits; 0 until
    /// the first batch.
    rate: AtomicU64,
}

impl Backlog {
    /// Tokens queued (submitted, not yet in a forward pass).
    pub fn tokens(&self) -> usize {
        self.tokens.load(Ordering::Acquire)
    }

    /// Tokens per second the worker has measured; 0 before its first batch.
    pub fn rate(&self) -> f64 {
        f64::from_bits(self.rate.load(Ordering::Acquire))
    }

    /// Seconds of queued work at the measured rate (0 before any batch was measured: an
    /// estimate needs one).
    pub fn seconds(&self) -> f64 {
        let rate = self.rate();
        if rate > 0.0 {
            self.tokens() as f64 / rate
        } else {
            0.0
        }
    }

    pub fn add(&self, tokens: usize) {
        self.tokens.fetch_add(tokens, Ordering::AcqRel);
        self.publish();
    }

    pub fn take(&self, tokens: usize) {
        // Never below zero, whatever the order of a racing add.
        let _ = self
            .tokens
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                Some(t.saturating_sub(tokens))
            });
        self.publish();
    }

    /// A forward pass computed `tokens` in `secs`.
    pub fn measured(&self, tokens: usize, secs: f64) {
        if tokens == 0 || secs <= 0.0 {
            return;
        }
        let now = tokens as f64 / secs;
        let old = self.rate();
        let rate = if old > 0.0 {
            old + ALPHA * (now - old)
        } else {
            now
        };
        self.rate.store(rate.to_bits(), Ordering::Release);
        self.publish();
    }

    fn publish(&self) {
        metrics::gauge!("tandem_prefill_backlog_seconds").set(self.seconds());
        metrics::gauge!("tandem_prefill_backlog_tokens").set(self.tokens() as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_queued_tokens_over_the_running_rate() {
        let b = Backlog::default();
        b.add(4000);
        assert_eq!(b.seconds(), 0.0, "no rate measured yet");
        b.measured(1000, 0.5); // 2000 tok/s
        assert!((b.seconds() - 2.0).abs() < 1e-9);
        b.measured(1000, 1.0); // 1000 tok/s → 2000 + 0.2·(1000 − 2000) = 1800
        assert!((b.rate() - 1800.0).abs() < 1e-9);
        b.take(2200);
        assert!((b.seconds() - 1800.0 / 1800.0).abs() < 1e-9);
        b.take(10_000);
        assert_eq!(b.tokens(), 0);
        b.measured(0, 1.0);
        b.measured(10, 0.0);
        assert!(
            (b.rate() - 1800.0).abs() < 1e-9,
            "empty passes change nothing"
        );
    }
}
