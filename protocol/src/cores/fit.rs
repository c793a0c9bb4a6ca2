//! What a decode worker's step costs: its work in token-equivalents ([`StepCost`]) and a
//! running fit of the step's time against that work ([`StepFit`]).

use super::STEP_SHARE;

/// A step's work in token-equivalents: each token, plus each position a prompt chunk's token
/// attends to, weighed by what attending to one costs against a token's matmuls — the cost
/// profile's `per_prefill_pair_s / per_token_s` (`tandem plan profile`); zero counts tokens
/// alone. By tokens alone, a chunk deep into a long prompt (attention over a thousand
/// positions) took 5 ms more than the fit of the steps around it said, and steps paced by it
/// broke the streams' bound while they carried such chunks.
///
/// A decode token counts as one whatever its context: its attention grows slowly, with the
/// streams, and the fit's running line follows it. Weighed by the profile's decode-pair cost
/// too, the fit came closer on 32 streams (mean error 2.9 against 4.4 ms) but their first
/// tokens came later (TTFT p50 1.09–1.14× colocated's against 0.99–1.03× in the same rounds)
/// at equal goodput (`scripts/bench/step_fit.py`, bench/RESULTS.md).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepCost {
    /// Token-equivalents of one attention pair of a prompt chunk.
    pub prefill_pair: f64,
}

impl StepCost {
    /// The work of one decode token.
    pub const DECODE: f64 = 1.0;

    /// The work of prefilling positions `from..to` of one sequence (`from` already cached):
    /// each position attends to itself and every one before it.
    pub fn chunk(&self, from: usize, to: usize) -> f64 {
        let (a, b) = (from as f64, to.max(from) as f64);
        (b - a) + self.prefill_pair * (b * (b + 1.0) - a * (a + 1.0)) / 2.0
    }

    /// The most positions a chunk from `from` may prefill within `work`.
    pub fn chunk_within(&self, from: usize, work: f64) -> usize {
        if work.is_infinite() {
            return usize::MAX;
        }
        if work <= 0.0 {
            return 0;
        }
        // n + r·(n·from + n(n+1)/2) ≤ work: the root of (r/2)n² + b·n − work, written so that
        // it does not cancel for a small r.
        let (r, b) = (
            self.prefill_pair,
            1.0 + self.prefill_pair * (from as f64 + 0.5),
        );
        let mut n = (2.0 * work / (b + (b * b + 2.0 * r * work).sqrt())).floor() as usize;
        // Rounding either way: settle on the exact bound.
        while self.chunk(from, from + n + 1) <= work {
            n += 1;
        }
        while n > 0 && self.chunk(from, from + n) > work {
            n -= 1;
        }
        n
    }
}

/// A running least-squares fit of a step's time against its work ([`StepCost`]), `a +
/// c·work`, each step weighing a little less than the next (so it follows the machine's
/// speed).
#[derive(Debug, Clone, Copy, Default)]
pub struct StepFit {
    w: f64,
    x: f64,
    y: f64,
    xx: f64,
    xy: f64,
}

impl StepFit {
    const DECAY: f64 = 0.98;

    pub fn observe(&mut self, work: f64, seconds: f64) {
        let d = Self::DECAY;
        self.w = self.w * d + 1.0;
        self.x = self.x * d + work;
        self.y = self.y * d + seconds;
        self.xx = self.xx * d + work * work;
        self.xy = self.xy * d + work * seconds;
    }

    /// `(a, c)`: fixed seconds per step and seconds per token-equivalent; `None` before any
    /// step. While the steps seen had too few distinct sizes to separate them, every second
    /// is charged to the work (an overestimate of its cost, so a bound on work stays safe).
    pub fn line(&self) -> Option<(f64, f64)> {
        if self.w <= 0.0 || self.x <= 0.0 {
            return None;
        }
        let var = self.w * self.xx - self.x * self.x;
        if var > 1e-3 * self.w * self.xx {
            let c = (self.w * self.xy - self.x * self.y) / var;
            let a = (self.y - c * self.x) / self.w;
            if c > 0.0 && a >= 0.0 {
                return Some((a, c));
            }
        }
        Some((0.0, self.y / self.x))
    }

    /// The work a step may compute within `seconds`; `None` before any step was seen.
    pub fn work_within(&self, seconds: f64) -> Option<f64> {
        let (a, c) = self.line()?;
        Some(((seconds - a) / c).max(0.0))
    }

    /// The time of a step of `work`; `None` before any step was seen.
    pub fn seconds(&self, work: f64) -> Option<f64> {
        self.line().map(|(a, c)| a + c * work)
    }

    /// The work of a step paced to `period_s` beside a pass, `decode` of it its decode
    /// tokens': those and the prompt chunks that fit [`STEP_SHARE`] of what they leave of the
    /// period (the step's plan adds [`MIN_CHUNK`](super::MIN_CHUNK) tokens whatever it is);
    /// `None` before any step was seen.
    pub fn paced_work(&self, decode: f64, period_s: f64) -> Option<f64> {
        let (a, c) = self.line()?;
        let left = STEP_SHARE * (period_s - a - c * decode);
        Some(decode + (left / c).max(0.0))
    }
}
