//! `tandem plan`: for a workload (prompt and output lengths, arrival rate) and an SLO, the
//! layouts of a machine's cores — one colocated worker, a prefill and a decode worker sharing
//! the cores, or workers pinned to cores of their own — with each one's predicted TTFT, TPOT
//! and SLO attainment, and the cheapest that meets the SLO.
//!
//! Each layout is predicted by replaying the workload through it on the cost model
//! ([`super::simulate`]): Dynamo's SLA planner sizes from steady-state averages, which miss
//! what the SLO measures — the tail a burst of long prompts makes (an earlier version of this
//! planner did so, and under-predicted TPOT about 2×, bench/RESULTS.md).

use super::placement::Slo;
use super::simulate::{Run, simulate};
use std::fmt;

/// Prompt lengths: a mix of fixed lengths and uniform ranges, each with a weight — `360`,
/// `900-1100:0.25,32-256:0.75` (bench's `mixed` dataset).
#[derive(Debug, Clone, PartialEq)]
pub struct Prompts(Vec<(usize, usize, f64)>);

impl Prompts {
    pub fn fixed(tokens: usize) -> Prompts {
        Prompts(vec![(tokens, tokens, 1.0)])
    }

    pub fn mean(&self) -> f64 {
        let total: f64 = self.0.iter().map(|p| p.2).sum();
        self.0
            .iter()
            .map(|&(lo, hi, w)| (lo + hi) as f64 / 2.0 * w / total)
            .sum()
    }

    /// A length from two uniform draws in (0, 1]: one picks the part, one the length in it.
    pub fn sample(&self, pick: f64, within: f64) -> usize {
        let total: f64 = self.0.iter().map(|p| p.2).sum();
        let mut left = pick * total;
        let &(lo, hi, _) = self
            .0
            .iter()
            .find(|p| {
                left -= p.2;
                left <= 0.0
            })
            .unwrap_or_else(|| self.0.last().expect("at least one part"));
        let n = ((hi - lo + 1) as f64 * within).ceil() as usize;
        (lo + n.max(1) - 1).min(hi).max(1)
    }
}

impl std::str::FromStr for Prompts {
    type Err = String;

    fn from_str(s: &str) -> Result<Prompts, String> {
        let bad = || format!("{s:?}: want N, LO-HI, or a mix like 900-1100:0.25,32-256:0.75");
        let parts = s
            .split(',')
            .map(|part| {
                let (len, w) = match part.split_once(':') {
                    Some((l, w)) => (l, w.trim().parse::<f64>().map_err(|_| bad())?),
                    None => (part, 1.0),
                };
                let (lo, hi) = match len.split_once('-') {
                    Some((a, b)) => (a.trim().parse(), b.trim().parse()),
                    None => (len.trim().parse(), len.trim().parse()),
                };
                let (lo, hi): (usize, usize) = (lo.map_err(|_| bad())?, hi.map_err(|_| bad())?);
                if lo == 0 || hi < lo || !(w > 0.0 && w.is_finite()) {
                    return Err(bad());
                }
                Ok((lo, hi, w))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Prompts(parts))
    }
}

impl fmt::Display for Prompts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, &(lo, hi, w)) in self.0.iter().enumerate() {
            let sep = if i > 0 { "," } else { "" };
            let len = if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}-{hi}")
            };
            if self.0.len() == 1 {
                write!(f, "{len}")?;
            } else {
                write!(f, "{sep}{len}:{w}")?;
            }
        }
        Ok(())
    }
}

/// What the cluster is asked to serve.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// Prompt tokens (not found in a cache).
    pub prompts: Prompts,
    /// Output tokens.
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
    /// Worker pods of `threads` cores each on a cluster's nodes, the KV over TCP
    /// (deploy/kubernetes; no prefill pods: the decode pods prefill every prompt).
    Pods {
        prefill: usize,
        decode: usize,
        threads: usize,
    },
}

impl Layout {
    /// Cores the layout occupies.
    pub fn cores(&self) -> usize {
        match *self {
            Layout::Colocated { threads } | Layout::Shared { threads } => threads,
            Layout::Pinned { prefill, decode } => prefill + decode,
            Layout::Pods {
                prefill,
                decode,
                threads,
            } => (prefill + decode) * threads,
        }
    }

    /// The `tandem up` flags that run it with this SLO (for pods: the scheduler's; the pool
    /// sizes and threads go in the overlay, `tandem plan --pods --emit-kustomize`).
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
            Layout::Pods { .. } => Vec::new(),
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
            Layout::Pods {
                prefill,
                decode,
                threads,
            } => write!(
                f,
                "{prefill} prefill + {decode} decode pods of {threads} core(s), KV over TCP"
            ),
        }
    }
}

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
    let Run {
        served,
        prefill_load,
        batch,
    } = simulate(cost, w, slo, layout, pace, REQUESTS, SEED);
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
    rank(cost, w, slo, layouts, pace)
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
    rank(cost, w, slo, layouts, 1.0)
}

fn rank(
    cost: &super::cost::CostModel,
    w: &Workload,
    slo: Slo,
    layouts: Vec<Layout>,
    pace: f64,
) -> Vec<Candidate> {
    let mut c: Vec<Candidate> = layouts
        .into_iter()
        .map(|layout| Candidate {
            layout,
            prediction: predict(cost, w, slo, layout, pace),
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
    fn prompt_mixes_parse_and_draw_from_their_parts() {
        let mix: Prompts = "900-1100:0.25,32-256:0.75".parse().unwrap();
        assert_eq!(mix.to_string(), "900-1100:0.25,32-256:0.75");
        assert!((mix.mean() - (0.25 * 1000.0 + 0.75 * 144.0)).abs() < 1e-9);
        let n = 20_000;
        let mut long = 0;
        for i in 0..n {
            let (a, b) = (
                (i as f64 + 0.5) / n as f64,
                ((i * 7919) % n) as f64 / n as f64 + 1e-9,
            );
            let len = mix.sample(a, b);
            assert!(
                (900..=1100).contains(&len) || (32..=256).contains(&len),
                "{len}"
            );
            long += usize::from(len >= 900);
        }
        assert!((long as f64 / n as f64 - 0.25).abs() < 0.01, "{long}");
        // Both ends of a range are drawn.
        let r: Prompts = "10-12".parse().unwrap();
        assert_eq!((r.sample(0.5, 1e-9), r.sample(0.5, 1.0)), (10, 12));
        assert_eq!("360".parse::<Prompts>().unwrap(), Prompts::fixed(360));
        for bad in ["0", "5-3", "a", "10:0", "10:x", "", "1-2:0.5,"] {
            assert!(bad.parse::<Prompts>().is_err(), "{bad}");
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
        assert!(shared.tpot_s <= 0.8 * 0.025 + 1e-12, "{shared:?}");
        assert!(colocated.tpot_p90_s > 0.025, "{colocated:?}");
        assert!(
            shared.tpot_p90_s <= 0.025 && shared.attainment > colocated.attainment + 0.03,
            "{shared:?} {colocated:?}"
        );
        assert!(shared.prefill_load > 0.1, "{shared:?}");
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
