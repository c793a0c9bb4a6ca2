//! `tandem plan`: for a workload (prompt and output lengths, arrival rate) and an SLO, the
//! layouts of a machine's cores — one colocated worker, a prefill and a decode worker sharing
//! the cores, or workers pinned to cores of their own — with each one's predicted TTFT and
//! TPOT from the cost model, and the cheapest that meets the SLO.
//!
//! The predictions are steady-state means (Dynamo's SLA planner works the same way from its
//! profiles): the decode batch from Little's law (`batch = rate × output tokens × TPOT`, per
//! worker), the step time from the cost model at that batch and context — solved together, as
//! the step time is linear in the batch —, and the prefill queue as an M/D/1 queue (Poisson
//! arrivals, fixed service time) whose utilisation says whether the layout keeps up at all.
//! They assume every prompt of a disaggregated layout goes to a prefill worker; the scheduler's
//! per-request placement ([`super::placement`]) only does better.

use super::cost::{CostModel, ForwardCost, Work};
use super::placement::Slo;

/// What the cluster is asked to serve.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Workload {
    /// Mean prompt tokens (not found in a cache).
    pub isl: usize,
    /// Mean output tokens.
    pub osl: usize,
    /// Requests per second, arriving at random (Poisson).
    pub rate: f64,
}

/// How the cores are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One worker prefilling and decoding (`tandem up --colocated`).
    Colocated { threads: usize },
    /// One prefill and one decode worker on the same cores, the decode worker's steps first
    /// (`tandem up`, the default).
    Shared { threads: usize },
    /// Workers with a core each (`tandem up --pin`).
    Pinned { prefill: usize, decode: usize },
}

impl Layout {
    /// Cores the layout occupies.
    pub fn cores(&self) -> usize {
        match *self {
            Layout::Colocated { threads } | Layout::Shared { threads } => threads,
            Layout::Pinned { prefill, decode } => prefill + decode,
        }
    }

    /// The `tandem up` flags that run it with this SLO.
    pub fn up_flags(&self, slo: Slo) -> Vec<String> {
        let mut a: Vec<String> = match *self {
            Layout::Colocated { threads } => {
                return vec![
                    "--colocated".into(),
                    "--threads".into(),
                    threads.to_string(),
                ];
            }
            Layout::Shared { threads } => vec!["--threads".into(), threads.to_string()],
            Layout::Pinned { prefill, decode } => vec![
                "--pin".into(),
                "--prefill".into(),
                prefill.to_string(),
                "--decode".into(),
                decode.to_string(),
            ],
        };
        a.extend([
            "--slo-ttft-ms".into(),
            format!("{:.0}", slo.ttft_s * 1e3),
            "--slo-tpot-ms".into(),
            format!("{:.0}", slo.tpot_s * 1e3),
        ]);
        a
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Layout::Colocated { threads } => write!(f, "colocated, {threads} thread(s)"),
            Layout::Shared { threads } => {
                write!(f, "1 prefill + 1 decode sharing {threads} core(s)")
            }
            Layout::Pinned { prefill, decode } => {
                write!(f, "{prefill} prefill + {decode} decode, a core each")
            }
        }
    }
}

/// A layout's predicted steady state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    /// Median time to first token.
    pub ttft_s: f64,
    /// Its 90th percentile: what the SLO is checked against (attainment ≥ 0.9).
    pub ttft_p90_s: f64,
    pub tpot_s: f64,
    /// Share of the time prefill computes (its queue's utilisation); ≥ 1: it cannot keep up.
    pub prefill_load: f64,
    /// Sequences each decode worker holds, on average.
    pub batch: f64,
    pub meets: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub layout: Layout,
    pub prediction: Prediction,
}

/// The step budget the prediction assumes (the workers' `--max-batch-tokens`).
pub const STEP_BUDGET: usize = 256;

/// Decode step time and batch per worker at `rate` requests/s: `s = f(B)`, `B = rate·osl·s`.
fn decode_steady(f: &ForwardCost, w: Workload, rate: f64) -> Option<(f64, f64)> {
    let ctx = w.isl as f64 + w.osl as f64 / 2.0;
    let per_seq = f.per_token_s + f.per_decode_pair_s * ctx;
    let load = rate * w.osl as f64 * per_seq;
    (load < 1.0).then(|| {
        let s = f.fixed_s / (1.0 - load);
        (s, rate * w.osl as f64 * s)
    })
}

/// The wait in an M/D/1 queue (service time `t`, utilisation `rho`) at quantile `q`: no wait
/// with probability `1 − rho`, else about exponential with the mean that makes the overall
/// mean Pollaczek–Khinchine's `rho·t / (2(1 − rho))`.
fn wait(t: f64, rho: f64, q: f64) -> f64 {
    let mean = rho / (2.0 * (1.0 - rho)) * t;
    if rho <= 1.0 - q || mean <= 0.0 {
        return 0.0;
    }
    (mean / rho) * (rho / (1.0 - q)).ln()
}

const UNSTABLE: Prediction = Prediction {
    ttft_s: f64::INFINITY,
    ttft_p90_s: f64::INFINITY,
    tpot_s: f64::INFINITY,
    prefill_load: f64::INFINITY,
    batch: f64::INFINITY,
    meets: false,
};

/// The steady state of `layout` under `w`, with a decode worker pacing its steps to
/// `pace × TPOT bound` while it shares cores with a computing prefill worker.
pub fn predict(cost: &CostModel, w: Workload, slo: Slo, layout: Layout, pace: f64) -> Prediction {
    let prompt = Work::prefill(0, w.isl);
    let p = match layout {
        Layout::Colocated { threads } => {
            let f = cost.forward(threads);
            // Each step carries the decode batch and the prompt tokens that arrived during
            // it: s = fixed + (rate·s)·(osl·per-seq + prompt work) — linear in s again.
            let ctx = w.isl as f64 + w.osl as f64 / 2.0;
            let per_request = w.osl as f64 * (f.per_token_s + f.per_decode_pair_s * ctx)
                + (f.seconds(prompt) - f.fixed_s);
            let load = w.rate * per_request;
            if load >= 1.0 {
                return UNSTABLE;
            }
            let s = f.fixed_s / (1.0 - load);
            let batch = w.rate * w.osl as f64 * s;
            // A new prompt's chunks fill the steps' spare budget, behind the prompt work
            // queued before it.
            let spare = (STEP_BUDGET as f64 - batch).max(1.0);
            let steps = (w.isl as f64 / spare).ceil().max(1.0);
            let full = f.seconds(Work {
                tokens: STEP_BUDGET as f64,
                prefill_pairs: spare.min(w.isl as f64) * w.isl as f64 / 2.0,
                decode_pairs: batch * ctx,
            });
            let rho = w.rate * (f.seconds(prompt) - f.fixed_s);
            Prediction {
                ttft_s: steps * full + wait(f.seconds(prompt), rho, 0.5),
                ttft_p90_s: steps * full + wait(f.seconds(prompt), rho, 0.9),
                tpot_s: s,
                prefill_load: rho,
                batch,
                meets: false,
            }
        }
        Layout::Shared { threads } => {
            let f = cost.forward(threads);
            let Some((base, batch)) = decode_steady(f, w, w.rate) else {
                return UNSTABLE;
            };
            let period = (pace * slo.tpot_s).max(base);
            let share = if batch > 0.0 {
                1.0 - base / period
            } else {
                1.0
            }
            .max(0.05);
            let t = f.seconds(prompt) / share;
            let rho = w.rate * t;
            if rho >= 1.0 {
                return UNSTABLE;
            }
            Prediction {
                ttft_s: t + wait(t, rho, 0.5) + cost.link.calls_s,
                ttft_p90_s: t + wait(t, rho, 0.9) + cost.link.calls_s,
                tpot_s: (1.0 - rho) * base + rho * period,
                prefill_load: rho,
                batch,
                meets: false,
            }
        }
        Layout::Pinned { prefill, decode } => {
            let (fp, fd) = (cost.forward(1), cost.forward(1));
            let Some((s, batch)) = decode_steady(fd, w, w.rate / decode as f64) else {
                return UNSTABLE;
            };
            let t = fp.seconds(prompt);
            let rho = w.rate * t / prefill as f64;
            if rho >= 1.0 {
                return UNSTABLE;
            }
            Prediction {
                ttft_s: t + wait(t, rho, 0.5) + cost.link.calls_s,
                ttft_p90_s: t + wait(t, rho, 0.9) + cost.link.calls_s,
                tpot_s: s,
                prefill_load: rho,
                batch,
                meets: false,
            }
        }
    };
    Prediction {
        meets: p.ttft_p90_s <= slo.ttft_s && p.tpot_s <= slo.tpot_s,
        ..p
    }
}

/// Every layout of up to `cores` cores, the ones meeting the SLO first (fewest cores, then
/// earliest first token), then the rest (earliest first token).
pub fn candidates(
    cost: &CostModel,
    w: Workload,
    slo: Slo,
    cores: usize,
    pace: f64,
) -> Vec<Candidate> {
    let mut layouts = Vec::new();
    for t in 1..=cores {
        layouts.push(Layout::Colocated { threads: t });
    }
    // Unpinned workers run on every core whatever their thread count: sharing means all.
    layouts.push(Layout::Shared { threads: cores });
    for prefill in 1..cores {
        for decode in 1..=cores - prefill {
            layouts.push(Layout::Pinned { prefill, decode });
        }
    }
    let mut c: Vec<Candidate> = layouts
        .into_iter()
        .map(|layout| Candidate {
            layout,
            prediction: predict(cost, w, slo, layout, pace),
        })
        .collect();
    c.sort_by(|a, b| {
        let key = |x: &Candidate| {
            (
                !x.prediction.meets,
                if x.prediction.meets {
                    x.layout.cores()
                } else {
                    0
                },
            )
        };
        key(a)
            .cmp(&key(b))
            .then(a.prediction.ttft_s.total_cmp(&b.prediction.ttft_s))
    });
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::cost::tests::model;

    const SLO: Slo = Slo {
        ttft_s: 1.0,
        tpot_s: 0.1,
    };

    #[test]
    fn waits_are_m_d_1s_mean_spread_as_an_exponential_tail() {
        assert_eq!(
            wait(1.0, 0.3, 0.5),
            0.0,
            "most arrivals find the server idle"
        );
        assert_eq!(wait(1.0, 0.0, 0.9), 0.0);
        let (median, p90) = (wait(1.0, 0.8, 0.5), wait(1.0, 0.8, 0.9));
        assert!(0.0 < median && median < p90, "{median} {p90}");
        // P(W > t) = ρ·exp(−t·ρ/mean): at the 90th percentile that is 0.1.
        let mean = 0.8 / (2.0 * 0.2);
        assert!((0.8 * (-p90 * 0.8 / mean).exp() - 0.1).abs() < 1e-12);
    }

    #[test]
    fn the_decode_batch_and_step_time_solve_littles_law_together() {
        let m = model();
        let w = Workload {
            isl: 250,
            osl: 128,
            rate: 2.0,
        };
        let f = m.forward(2);
        let (s, b) = decode_steady(f, w, w.rate).unwrap();
        let again = f.seconds(Work::decode(1, 0)) - f.fixed_s;
        assert!(again > 0.0);
        let step = f.seconds(Work {
            tokens: b,
            prefill_pairs: 0.0,
            decode_pairs: b * (250.0 + 64.0),
        });
        assert!((step - s).abs() < 1e-9, "{step} vs {s}");
        assert!((b - 2.0 * 128.0 * s).abs() < 1e-9);
        // Past capacity there is no steady state.
        assert!(decode_steady(f, w, 1e4).is_none());
    }

    #[test]
    fn more_load_means_later_first_tokens_until_no_layout_keeps_up() {
        let m = model();
        let mut last = 0.0;
        for rate in [0.5, 1.0, 1.5] {
            let w = Workload {
                isl: 500,
                osl: 64,
                rate,
            };
            let p = predict(&m, w, SLO, Layout::Colocated { threads: 2 }, 0.8);
            assert!(p.ttft_s > last, "{rate}: {p:?}");
            last = p.ttft_s;
        }
        let flood = Workload {
            isl: 2000,
            osl: 64,
            rate: 50.0,
        };
        for c in candidates(&m, flood, SLO, 2, 0.8) {
            assert!(
                !c.prediction.meets && c.prediction.ttft_s.is_infinite(),
                "{c:?}"
            );
        }
    }

    #[test]
    fn the_cheapest_layout_that_meets_the_slo_comes_first() {
        let m = model();
        let light = Workload {
            isl: 100,
            osl: 32,
            rate: 0.2,
        };
        let c = candidates(&m, light, SLO, 2, 0.8);
        assert!(c[0].prediction.meets);
        assert_eq!(c[0].layout.cores(), 1, "{:?}", c[0]);
        assert_eq!(c.len(), 2 + 1 + 1);
        // Every layout meeting it comes before every one that does not.
        let first_miss = c
            .iter()
            .position(|x| !x.prediction.meets)
            .unwrap_or(c.len());
        assert!(c[first_miss..].iter().all(|x| !x.prediction.meets));
    }

    #[test]
    fn a_tight_tpot_bound_is_met_by_sharing_cores_when_colocated_chunks_break_it() {
        let m = model();
        let w = Workload {
            isl: 1000,
            osl: 64,
            rate: 0.3,
        };
        let slo = Slo {
            ttft_s: 3.0,
            tpot_s: 0.025,
        };
        let shared = predict(&m, w, slo, Layout::Shared { threads: 2 }, 0.8);
        assert!(shared.tpot_s <= 0.8 * 0.025 + 1e-12, "{shared:?}");
        assert!(shared.meets, "{shared:?}");
    }

    #[test]
    fn the_flags_run_the_layout() {
        let slo = Slo {
            ttft_s: 3.0,
            tpot_s: 0.025,
        };
        assert_eq!(
            Layout::Colocated { threads: 2 }.up_flags(slo),
            ["--colocated", "--threads", "2"]
        );
        assert_eq!(
            Layout::Pinned {
                prefill: 1,
                decode: 1
            }
            .up_flags(slo)
            .join(" "),
            "--pin --prefill 1 --decode 1 --slo-ttft-ms 3000 --slo-tpot-ms 25"
        );
    }
}
