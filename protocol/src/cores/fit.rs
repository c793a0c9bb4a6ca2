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
        to.saturating_sub(from) as f64 + self.prefill_pair * prefill_pairs(from, to)
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

/// The attention pairs of prefilling positions `from..to` of one sequence (`from` already
/// cached): each position against itself and every one before it, `Σ_{i=from}^{to-1} (i + 1)`.
pub fn prefill_pairs(from: usize, to: usize) -> f64 {
    let (a, b) = (from as f64, to.max(from) as f64);
    (b * (b + 1.0) - a * (a + 1.0)) / 2.0
}

/// A running least-squares fit of a step's time against its work ([`StepCost`]), `a +
/// c·work`, each step weighing a little less than the next (so it follows the machine's
/// speed).
///
/// The prompt chunks' attention gets a coefficient of its own: the fit is of `a + c·tokens +
/// q·attention` (the attention weighed by the profile), pulled a little toward `q = c` (the
/// profile's weight), and the work it prices weighs attention by `q / c` of the profile's
/// ([`StepFit::scale`]) — live, a prompt pair cost 1.4–1.9× what the profile measured, and a
/// fit by the profile's weight alone still ran deep chunks 3.3 ms past what it said. Where
/// the three terms do not separate (no chunk seen, or a negative coefficient), the fit is of
/// the profile's work alone.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepFit {
    /// Decayed sums of `z zᵀ` and `z·seconds`, `z = [1, tokens, attention]`.
    zz: [[f64; 3]; 3],
    zy: [f64; 3],
}

/// How strongly the attention's coefficient is pulled toward the tokens' (the profile's
/// weight), against the steps' weight: enough to settle a fit whose steps barely separate the
/// terms, far below what steps with chunks say.
const RIDGE: f64 = 0.1;

impl StepFit {
    const DECAY: f64 = 0.98;

    /// A step of `tokens` with prompt-chunk `attention` (its pairs by the profile's weight,
    /// [`StepCost`]) took `seconds`.
    pub fn observe(&mut self, tokens: f64, attention: f64, seconds: f64) {
        let z = [1.0, tokens, attention];
        for i in 0..3 {
            for j in 0..3 {
                self.zz[i][j] = self.zz[i][j] * Self::DECAY + z[i] * z[j];
            }
            self.zy[i] = self.zy[i] * Self::DECAY + z[i] * seconds;
        }
    }

    /// `(a, c, q)` of the three-term fit, where the steps separate them.
    fn terms(&self) -> Option<[f64; 3]> {
        if self.zz[2][2] <= 0.0 {
            return None;
        }
        let r = RIDGE * self.zz[0][0];
        let mut m = self.zz;
        m[1][1] += r;
        m[2][2] += r;
        m[1][2] -= r;
        m[2][1] -= r;
        let [a, c, q] = solve3(m, self.zy)?;
        (a >= 0.0 && c > 0.0 && q >= 0.0).then_some([a, c, q])
    }

    /// What the live steps weigh a prompt pair at against the profile's weight: `q / c`, or 1
    /// where the three terms do not separate.
    pub fn scale(&self) -> f64 {
        self.terms().map_or(1.0, |[_, c, q]| q / c)
    }

    /// `(a, c)`: fixed seconds per step and seconds per token-equivalent of the work weighed by
    /// [`StepFit::scale`]; `None` before any step. While the steps seen had too few distinct
    /// sizes to separate them, every second is charged to the work (an overestimate of its
    /// cost, so a bound on work stays safe).
    pub fn line(&self) -> Option<(f64, f64)> {
        if let Some([a, c, _]) = self.terms() {
            return Some((a, c));
        }
        // The profile's work alone: x = tokens + attention.
        let [[w, t, at], [_, tt, tat], [_, _, atat]] = self.zz;
        let (x, y) = (t + at, self.zy[0]);
        let (xx, xy) = (tt + 2.0 * tat + atat, self.zy[1] + self.zy[2]);
        if w <= 0.0 || x <= 0.0 {
            return None;
        }
        let var = w * xx - x * x;
        if var > 1e-3 * w * xx {
            let c = (w * xy - x * y) / var;
            let a = (y - c * x) / w;
            if c > 0.0 && a >= 0.0 {
                return Some((a, c));
            }
        }
        Some((0.0, y / x))
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

/// `m x = b` by Cramer's rule; `None` where `m` is (nearly) singular.
fn solve3(m: [[f64; 3]; 3], b: [f64; 3]) -> Option<[f64; 3]> {
    let det = |m: [[f64; 3]; 3]| {
        m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
            - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    };
    let d = det(m);
    let scale = m[0][0] * m[1][1] * m[2][2];
    // (NaN sums fail the comparison too.)
    if d.is_nan() || d.abs() <= 1e-12 * scale.abs() {
        return None;
    }
    let mut x = [0.0; 3];
    for (k, xk) in x.iter_mut().enumerate() {
        let mut mk = m;
        for i in 0..3 {
            mk[i][k] = b[i];
        }
        *xk = det(mk) / d;
    }
    Some(x)
}
