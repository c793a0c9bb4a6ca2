//! What this engine costs on this machine: one forward call's time as a linear function of
//! what it computes, fitted per thread count from measurements (`tandem plan profile`), and
//! what moving KV between workers costs.
//!
//! A forward call over `T` tokens — a prefill pass, a decode step, or a colocated step mixing
//! both — takes
//!
//! ```text
//! t = fixed + per_token·T + per_prefill_pair·A_prefill + per_decode_pair·A_decode
//! ```
//!
//! where `A` counts attention pairs (a query position against one cached position): prefill
//! attention is tiled and compute-bound, decode attention streams the cache once per query,
//! so the two get their own coefficient. `fixed` is what a call pays whatever its size
//! (weights streamed once for a decode step, thread wake-ups), `per_token` the matmuls.
//! Both workers run the same kernels, so one fit per thread count prices every placement.

use serde::{Deserialize, Serialize};

/// What one forward call computes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Work {
    /// Token rows through the matmuls.
    pub tokens: f64,
    /// Prefill attention pairs: each new position against every position up to it.
    pub prefill_pairs: f64,
    /// Decode attention pairs: each decoding sequence's one query against its context.
    pub decode_pairs: f64,
}

impl Work {
    /// Prefill of positions `from..to` of one sequence (`from` already cached).
    pub fn prefill(from: usize, to: usize) -> Work {
        Work {
            tokens: to.saturating_sub(from) as f64,
            prefill_pairs: protocol::cores::prefill_pairs(from, to),
            decode_pairs: 0.0,
        }
    }

    /// One decode step of `batch` sequences holding `context` positions between them.
    pub fn decode(batch: usize, context: usize) -> Work {
        Work {
            tokens: batch as f64,
            prefill_pairs: 0.0,
            decode_pairs: context as f64,
        }
    }

    fn features(&self) -> [f64; 4] {
        [1.0, self.tokens, self.prefill_pairs, self.decode_pairs]
    }
}

impl std::ops::Add for Work {
    type Output = Work;
    fn add(self, o: Work) -> Work {
        Work {
            tokens: self.tokens + o.tokens,
            prefill_pairs: self.prefill_pairs + o.prefill_pairs,
            decode_pairs: self.decode_pairs + o.decode_pairs,
        }
    }
}

/// One measurement: a forward call's work and its time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub work: Work,
    pub seconds: f64,
}

/// The forward call's cost on `threads` compute threads.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ForwardCost {
    pub threads: usize,
    pub fixed_s: f64,
    pub per_token_s: f64,
    pub per_prefill_pair_s: f64,
    pub per_decode_pair_s: f64,
}

impl ForwardCost {
    /// A prompt chunk's attention against a token's cost, as a decode worker's pacer weighs
    /// its steps' work.
    pub fn step_cost(&self) -> protocol::cores::StepCost {
        let per_token = self.per_token_s.max(f64::MIN_POSITIVE);
        protocol::cores::StepCost {
            prefill_pair: (self.per_prefill_pair_s / per_token).max(0.0),
        }
    }

    /// Seconds one forward call over `w` takes.
    pub fn seconds(&self, w: Work) -> f64 {
        self.fixed_s
            + self.per_token_s * w.tokens
            + self.per_prefill_pair_s * w.prefill_pairs
            + self.per_decode_pair_s * w.decode_pairs
    }

    /// Prompt-chunk tokens a decode step over `decode` may carry while it paces to `period_s`
    /// beside a prefill pass: what fits `protocol::cores::STEP_SHARE` of what the decode work
    /// leaves of the period (attention over `pairs` positions a token), at least `MIN_CHUNK` —
    /// the decode worker's own bound, which it times by a fit of its steps.
    pub fn paced_chunk(&self, decode: Work, pairs: f64, period_s: f64) -> usize {
        let left = protocol::cores::STEP_SHARE * (period_s - self.seconds(decode));
        self.chunk_within(pairs, left)
    }

    /// Prompt-chunk tokens (attention over `pairs` positions a token) that `left_s` seconds of
    /// a step hold, at least `MIN_CHUNK`.
    pub fn chunk_within(&self, pairs: f64, left_s: f64) -> usize {
        let per = self.per_token_s + self.per_prefill_pair_s * pairs;
        let fits = if per > 0.0 {
            (left_s / per).max(0.0)
        } else {
            0.0
        };
        (fits as usize).max(protocol::cores::MIN_CHUNK)
    }

    /// The least-squares fit of the samples in relative error (each sample weighted by the
    /// inverse of its time, so a 3 ms decode step counts as much as a 2 s prefill), with every
    /// coefficient ≥ 0 (a coefficient that would go negative is dropped and the rest refitted).
    /// `None` with fewer samples than coefficients or none positive.
    pub fn fit(threads: usize, samples: &[Sample]) -> Option<ForwardCost> {
        let mut active = [true; 4];
        loop {
            let idx: Vec<usize> = (0..4).filter(|&i| active[i]).collect();
            if idx.is_empty() || samples.len() < idx.len() {
                return None;
            }
            let n = idx.len();
            // Normal equations over the active features, rows scaled by 1/seconds.
            let mut a = vec![vec![0.0f64; n + 1]; n];
            for s in samples.iter().filter(|s| s.seconds > 0.0) {
                let f = s.work.features();
                let w = 1.0 / s.seconds;
                for (r, &i) in idx.iter().enumerate() {
                    for (c, &j) in idx.iter().enumerate() {
                        a[r][c] += f[i] * w * f[j] * w;
                    }
                    a[r][n] += f[i] * w * s.seconds * w;
                }
            }
            let x = solve(a)?;
            match (0..n).find(|&r| x[r] < 0.0) {
                Some(r) => active[idx[r]] = false,
                None => {
                    let mut c = [0.0; 4];
                    for (r, &i) in idx.iter().enumerate() {
                        c[i] = x[r];
                    }
                    return Some(ForwardCost {
                        threads,
                        fixed_s: c[0],
                        per_token_s: c[1],
                        per_prefill_pair_s: c[2],
                        per_decode_pair_s: c[3],
                    });
                }
            }
        }
    }
}

/// Gaussian elimination with partial pivoting on an augmented `n × (n+1)` system, columns
/// scaled first (the features span ten orders of magnitude).
fn solve(mut a: Vec<Vec<f64>>) -> Option<Vec<f64>> {
    let n = a.len();
    let scale: Vec<f64> = (0..n)
        .map(|c| a[c][c].sqrt().max(f64::MIN_POSITIVE))
        .collect();
    for row in a.iter_mut() {
        for (v, sc) in row.iter_mut().zip(&scale) {
            *v /= sc;
        }
    }
    for (r, row) in a.iter_mut().enumerate() {
        for v in row.iter_mut() {
            *v /= scale[r];
        }
    }
    for col in 0..n {
        let p = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[p][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, p);
        let pivot = a[col].clone();
        for (r, row) in a.iter_mut().enumerate() {
            if r != col {
                let k = row[col] / pivot[col];
                for (v, pv) in row[col..].iter_mut().zip(&pivot[col..]) {
                    *v -= k * pv;
                }
            }
        }
    }
    Some((0..n).map(|r| a[r][n] / a[r][r] / scale[r]).collect())
}

/// Moving a prompt's KV from a prefill worker to a decode worker, and the calls around it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LinkCost {
    /// The three calls of a disaggregated request (Reserve, Prefill, Generate) on loopback.
    pub calls_s: f64,
    /// TCP data plane throughput (loopback: an upper bound for a real network).
    pub tcp_bytes_per_s: f64,
}

/// The engine's costs on one machine, as `tandem plan profile` measured them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostModel {
    /// Bumped when the format changes.
    pub version: u32,
    /// The model measured (its fingerprint: weights, precision, KV format).
    pub model_id: String,
    pub fingerprint: u64,
    /// The CPU (`/proc/cpuinfo`'s model name) and its cores.
    pub cpu: String,
    pub cores: usize,
    /// KV bytes per token position (all layers).
    pub kv_bytes_per_token: u64,
    /// One fit per thread count measured, ascending.
    pub forward: Vec<ForwardCost>,
    pub link: LinkCost,
    /// The measurements the fits came from, per thread count, for `tandem plan profile` to
    /// report each fit's error.
    pub samples: Vec<(usize, Vec<Sample>)>,
}

/// The current [`CostModel::version`].
pub const COST_MODEL_VERSION: u32 = 1;

impl CostModel {
    /// The fit for `threads` compute threads: the one measured with that many, or else the
    /// nearest measured below (fewer threads: slower, so predictions err late), or the
    /// fewest measured.
    pub fn forward(&self, threads: usize) -> &ForwardCost {
        self.forward
            .iter()
            .rev()
            .find(|f| f.threads <= threads)
            .or(self.forward.first())
            .expect("a cost model has at least one fit")
    }

    /// Seconds to move `tokens` positions' KV over TCP.
    pub fn tcp_seconds(&self, tokens: usize) -> f64 {
        (tokens as u64 * self.kv_bytes_per_token) as f64 / self.link.tcp_bytes_per_s.max(1.0)
    }

    pub fn load(path: &std::path::Path) -> Result<CostModel, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading the cost profile {}: {e}", path.display()))?;
        let m: CostModel = serde_json::from_str(&text)
            .map_err(|e| format!("parsing the cost profile {}: {e}", path.display()))?;
        if m.version != COST_MODEL_VERSION || m.forward.is_empty() {
            return Err(format!(
                "{} is a cost profile of another format (version {}, {} fits): measure it again \
                 with `tandem plan profile`",
                path.display(),
                m.version,
                m.forward.len()
            ));
        }
        Ok(m)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A model of roughly SmolLM2 on two Zen 5 cores (the shape of a real profile).
    pub(crate) fn model() -> CostModel {
        let two = ForwardCost {
            threads: 2,
            fixed_s: 2.5e-3,
            per_token_s: 0.9e-3,
            per_prefill_pair_s: 0.1e-6,
            per_decode_pair_s: 0.4e-6,
        };
        let one = ForwardCost {
            threads: 1,
            fixed_s: 4.0e-3,
            per_token_s: 1.8e-3,
            per_prefill_pair_s: 0.2e-6,
            per_decode_pair_s: 0.7e-6,
        };
        CostModel {
            version: COST_MODEL_VERSION,
            model_id: "m".into(),
            fingerprint: 7,
            cpu: "test".into(),
            cores: 2,
            kv_bytes_per_token: 23_040,
            forward: vec![one, two],
            link: LinkCost {
                calls_s: 3e-3,
                tcp_bytes_per_s: 2e9,
            },
            samples: Vec::new(),
        }
    }

    #[test]
    fn a_pacer_weighs_a_prompt_pair_by_its_cost_against_a_tokens() {
        let m = model();
        let f = m.forward(usize::MAX);
        assert_eq!(f.threads, 2);
        let w = f.step_cost().prefill_pair;
        assert!(
            (w - f.per_prefill_pair_s / f.per_token_s).abs() < 1e-15,
            "{w}"
        );
        assert!(w > 0.0);
    }

    #[test]
    fn prefill_pairs_count_each_position_against_those_up_to_it() {
        assert_eq!(Work::prefill(0, 3).prefill_pairs, 6.0); // 1 + 2 + 3
        assert_eq!(Work::prefill(2, 4).prefill_pairs, 7.0); // 3 + 4
        assert_eq!(Work::prefill(2, 4).tokens, 2.0);
        assert_eq!(Work::prefill(4, 2), Work::default());
        let w = Work::prefill(0, 10) + Work::decode(3, 300);
        assert_eq!((w.tokens, w.decode_pairs), (13.0, 300.0));
    }

    #[test]
    fn the_fit_recovers_the_coefficients_it_was_given_from_noisy_samples() {
        let truth = model().forward[1];
        // Deterministic ±3% noise.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut noise = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            1.0 + ((state % 1000) as f64 / 1000.0 - 0.5) * 0.06
        };
        let mut samples = Vec::new();
        for n in [16, 64, 256, 1024, 2048] {
            let w = Work::prefill(0, n);
            samples.push(Sample {
                work: w,
                seconds: truth.seconds(w) * noise(),
            });
        }
        for (b, ctx) in [
            (1, 64),
            (1, 1024),
            (8, 256),
            (32, 512),
            (32, 1024),
            (64, 256),
        ] {
            let w = Work::decode(b, b * ctx);
            samples.push(Sample {
                work: w,
                seconds: truth.seconds(w) * noise(),
            });
        }
        let fit = ForwardCost::fit(2, &samples).unwrap();
        for s in &samples {
            let err = fit.seconds(s.work) / s.seconds - 1.0;
            assert!(err.abs() < 0.08, "{err} at {:?}", s.work);
        }
        assert!((fit.per_token_s / truth.per_token_s - 1.0).abs() < 0.1);
        assert!((fit.fixed_s / truth.fixed_s - 1.0).abs() < 0.25);
    }

    #[test]
    fn a_coefficient_that_would_go_negative_is_dropped() {
        // Times exactly proportional to tokens: no fixed cost, no attention.
        let samples: Vec<Sample> = [(1usize, 10usize), (4, 40), (16, 100), (64, 400)]
            .iter()
            .flat_map(|&(b, ctx)| {
                [Work::decode(b, ctx), Work::prefill(0, b * 8)].map(|w| Sample {
                    work: w,
                    seconds: 1e-3 * w.tokens,
                })
            })
            .collect();
        let fit = ForwardCost::fit(1, &samples).unwrap();
        for c in [
            fit.fixed_s,
            fit.per_token_s,
            fit.per_prefill_pair_s,
            fit.per_decode_pair_s,
        ] {
            assert!(c >= 0.0);
        }
        assert!((fit.per_token_s - 1e-3).abs() < 1e-6);
        assert!(ForwardCost::fit(1, &samples[..2]).is_none());
    }

    #[test]
    fn the_fit_for_a_thread_count_is_the_nearest_measured_at_or_below() {
        let m = model();
        assert_eq!(m.forward(1).threads, 1);
        assert_eq!(m.forward(2).threads, 2);
        assert_eq!(m.forward(8).threads, 2);
        assert_eq!(m.forward(0).threads, 1);
        assert!((m.tcp_seconds(1000) - 23_040_000.0 / 2e9).abs() < 1e-12);
    }

    #[test]
    fn a_profile_round_trips_through_its_file_and_other_versions_are_refused() {
        let dir = std::env::temp_dir().join(format!("tandem-cost-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("p.json");
        let m = model();
        std::fs::write(&p, serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(CostModel::load(&p).unwrap(), m);
        let old = CostModel { version: 0, ..m };
        std::fs::write(&p, serde_json::to_string(&old).unwrap()).unwrap();
        assert!(
            CostModel::load(&p)
                .unwrap_err()
                .contains("tandem plan profile")
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
