//! `tandem plan`: for a workload (prompt and output lengths, arrival rate) and an SLO, the
//! layouts of a machine's cores — one colocated worker, a prefill and a decode worker sharing
//! the cores, or workers pinned to cores of their own — or the splits of a cluster's worker
//! pods, with each one's predicted TTFT, TPOT and SLO attainment, and the cheapest that meets
//! the SLO.
//!
//! Each layout is predicted by replaying the workload through it on the cost model
//! ([`super::simulate`]): Dynamo's SLA planner sizes from steady-state averages, which miss
//! what the SLO measures — the tail a burst of long prompts makes (an earlier version of this
//! planner did so, and under-predicted TPOT about 2×, bench/RESULTS.md).

use super::layout::Layout;
use super::placement::Slo;
use super::simulate::{Arrival, Run, arrivals, replay};
use super::workload::Workload;

/// A layout's predicted latencies under the workload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    /// Median time to first token.
    pub ttft_s: f64,
    /// Its 90th percentile.
    pub ttft_p90_s: f64,
    /// Median time per output token.
    pub tpot_s: f64,
    pub tpot_p90_s: f64,
    /// Share of requests meeting both bounds.
    pub attainment: f64,
    /// Share of the time the busiest prefill worker computes; 0 without one.
    pub prefill_load: f64,
    /// Sequences per decode step, on average.
    pub batch: f64,
    /// Attainment ≥ [`ATTAINMENT`].
    pub meets: bool,
}

/// The share of the replayed requests that must meet the SLO for a layout to be planned: a
/// deployment is held to 0.9, and the 0.05 above it is margin for the cost model's error (its
/// fits are within 11–16% on average).
pub const ATTAINMENT: f64 = 0.95;
/// Requests replayed per layout, and the seed of their arrivals.
pub const REQUESTS: usize = 1000;
const SEED: u64 = 0x7a4d_e11a;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub layout: Layout,
    pub prediction: Prediction,
}

fn quantile(mut v: Vec<f64>, q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// `layout` under `w`, replayed on the cost model, with a decode worker pacing its steps to
/// `pace × TPOT bound` while it shares cores with a computing prefill worker.
pub fn predict(
    cost: &super::cost::CostModel,
    w: &Workload,
    slo: Slo,
    layout: Layout,
    pace: f64,
) -> Prediction {
    predict_on(cost, &arrivals(w, REQUESTS, SEED), w.osl, slo, layout, pace)
}

/// `layout` under the requests `reqs` (a measured trace, or a workload's arrivals), placed as
/// for streams of `horizon` output tokens.
pub fn predict_on(
    cost: &super::cost::CostModel,
    reqs: &[Arrival],
    horizon: usize,
    slo: Slo,
    layout: Layout,
    pace: f64,
) -> Prediction {
    let Run {
        served,
        prefill_load,
        batch,
    } = replay(cost, reqs, horizon, slo, layout, pace);
    let ttft: Vec<f64> = served.iter().map(|s| s.ttft_s).collect();
    let tpot: Vec<f64> = served.iter().map(|s| s.tpot_s).collect();
    let met = served
        .iter()
        .filter(|s| s.ttft_s <= slo.ttft_s && s.tpot_s <= slo.tpot_s)
        .count();
    let attainment = met as f64 / served.len().max(1) as f64;
    Prediction {
        ttft_s: quantile(ttft.clone(), 0.5),
        ttft_p90_s: quantile(ttft, 0.9),
        tpot_s: quantile(tpot.clone(), 0.5),
        tpot_p90_s: quantile(tpot, 0.9),
        attainment,
        prefill_load,
        batch,
        meets: attainment >= ATTAINMENT,
    }
}

/// Every layout of up to `cores` cores, the ones meeting the SLO first (fewest cores, then
/// earliest first token), then the rest (most requests within the SLO first).
pub fn candidates(
    cost: &super::cost::CostModel,
    w: &Workload,
    slo: Slo,
    cores: usize,
    pace: f64,
) -> Vec<Candidate> {
    let reqs = arrivals(w, REQUESTS, SEED);
    candidates_on(cost, &reqs, w.osl, slo, cores, pace)
}

/// [`candidates`] under the requests `reqs` (e.g. a `tandem bench` run's, to tell the cost
/// model's error from the sampling error of a short run), placed as for streams of `horizon`
/// output tokens.
pub fn candidates_on(
    cost: &super::cost::CostModel,
    reqs: &[Arrival],
    horizon: usize,
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
    rank(cost, reqs, horizon, slo, layouts, pace)
}

/// Every split of up to `max_pods` worker pods of `threads` cores (at least one decode pod),
/// ranked as [`candidates`] ranks a machine's layouts.
pub fn pod_candidates(
    cost: &super::cost::CostModel,
    w: &Workload,
    slo: Slo,
    threads: usize,
    max_pods: usize,
) -> Vec<Candidate> {
    let mut layouts = Vec::new();
    for prefill in 0..max_pods {
        for decode in 1..=max_pods - prefill {
            layouts.push(Layout::Pods {
                prefill,
                decode,
                threads,
            });
        }
    }
    rank(cost, &arrivals(w, REQUESTS, SEED), w.osl, slo, layouts, 1.0)
}

fn rank(
    cost: &super::cost::CostModel,
    reqs: &[Arrival],
    horizon: usize,
    slo: Slo,
    layouts: Vec<Layout>,
    pace: f64,
) -> Vec<Candidate> {
    let mut c: Vec<Candidate> = layouts
        .into_iter()
        .map(|layout| Candidate {
            layout,
            prediction: predict_on(cost, reqs, horizon, slo, layout, pace),
        })
        .collect();
    c.sort_by(|a, b| {
        let (pa, pb) = (&a.prediction, &b.prediction);
        pb.meets
            .cmp(&pa.meets)
            .then(if pa.meets && pb.meets {
                a.layout.cores().cmp(&b.layout.cores())
            } else {
                pb.attainment.total_cmp(&pa.attainment)
            })
            .then(pa.ttft_s.total_cmp(&pb.ttft_s))
    });
    c
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::cost::tests::model;
    use crate::plan::workload::Prompts;

    const SLO: Slo = Slo {
        ttft_s: 1.0,
        tpot_s: 0.1,
    };

    fn workload(isl: usize, osl: usize, rate: f64) -> Workload {
        Workload {
            prompts: Prompts::fixed(isl),
            osl,
            rate,
        }
    }

    #[test]
    fn more_load_means_later_first_tokens_until_no_layout_keeps_up() {
        let m = model();
        let mut last = 0.0;
        for rate in [0.2, 0.6, 0.9] {
            let p = predict(
                &m,
                &workload(500, 64, rate),
                SLO,
                Layout::Colocated { threads: 2 },
                0.8,
            );
            assert!(p.ttft_p90_s > last, "{rate}: {p:?}");
            last = p.ttft_p90_s;
        }
        for c in candidates(&m, &workload(2000, 64, 50.0), SLO, 2, 0.8) {
            assert!(
                !c.prediction.meets && c.prediction.attainment < 0.05,
                "{c:?}"
            );
        }
    }

    #[test]
    fn the_cheapest_layout_that_meets_the_slo_comes_first() {
        let c = candidates(&model(), &workload(100, 32, 0.2), SLO, 2, 0.8);
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
    fn sharing_cores_keeps_a_tight_tpot_bound_that_colocated_chunks_break() {
        let m = model();
        let w = workload(1000, 64, 0.3);
        let slo = Slo {
            ttft_s: 3.0,
            tpot_s: 0.025,
        };
        let shared = predict(&m, &w, slo, Layout::Shared { threads: 2 }, 0.8);
        let colocated = predict(&m, &w, slo, Layout::Colocated { threads: 2 }, 0.8);
        // The streams' mean TPOT keeps to the pace but for the credit lent against it.
        let lent = 1.0 + protocol::cores::AHEAD_MARGIN;
        assert!(shared.tpot_s <= 0.8 * 0.025 * lent, "{shared:?}");
        assert!(colocated.tpot_p90_s > 0.025, "{colocated:?}");
        assert!(
            shared.tpot_p90_s <= 0.025 && shared.attainment > colocated.attainment + 0.03,
            "{shared:?} {colocated:?}"
        );
        // The decode worker's steps holding to the pace, prompts hardly need the prefill
        // worker.
        assert!(shared.prefill_load < 0.01, "{shared:?}");
    }
}
