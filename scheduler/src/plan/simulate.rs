//! The serving loop replayed on the cost model: Poisson arrivals of a workload through a layout's
//! workers, step by step, with the engine's own rules — a decode worker's step is its decoding
//! sequences' tokens and then prompt chunks, oldest first, up to its step budget; a prefill
//! worker batches whole prompts up to its token budget; each prompt placed by
//! [`super::placement::decide`], as the scheduler places it; a decode worker sharing its cores
//! rests to its pace while the prefill worker computes, which then gets only the rests.
//!
//! Averages hide what the SLO sees: a stream's time per output token is the mean of the steps
//! it met, and a burst of long prompts makes a few streams' steps slow, not every stream's a
//! little. So `tandem plan` predicts from each simulated request's own TTFT and TPOT —
//! medians, the 90th percentile, the share meeting the SLO — rather than from a steady state.
//! Deterministic: the arrivals come from a fixed seed.

use super::cost::{CostModel, ForwardCost, Work};
use super::layout::Layout;
use super::placement::{DecodeView, Place, PrefillView, Slo, decide};
use super::workload::Workload;
use std::collections::VecDeque;

/// A decode worker's step budget and sequence cap (the workers' defaults: `tandem`'s tests
/// hold them equal).
pub const STEP_BUDGET: usize = 256;
pub const MAX_RUNNING: usize = 64;
/// A prefill worker's batch budget (its default).
pub const PREFILL_BUDGET: usize = 2048;

/// One simulated request's latencies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Served {
    pub ttft_s: f64,
    /// Mean time per output token after the first; 0 for a single-token output.
    pub tpot_s: f64,
}

/// What a run of the simulation saw.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// In arrival order.
    pub served: Vec<Served>,
    /// Share of the run the prefill workers computed (busiest one); 0 without any.
    pub prefill_load: f64,
    /// Sequences per decode step, on average over steps.
    pub batch: f64,
}

/// SplitMix64: a small, fixed generator, so that a plan is the same every time.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }
}

/// One request to replay: when it arrives (seconds from the start), its prompt tokens and the
/// tokens it generates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Arrival {
    pub at: f64,
    pub prompt: usize,
    pub osl: usize,
}

/// `n` Poisson arrivals of the workload.
pub fn arrivals(w: &Workload, n: usize, seed: u64) -> Vec<Arrival> {
    let mut rng = Rng(seed);
    let mut at = 0.0;
    (0..n)
        .map(|_| {
            at += -rng.unit().ln() / w.rate;
            let prompt = w.prompts.sample(rng.unit(), rng.unit());
            Arrival {
                at,
                prompt,
                osl: w.osl,
            }
        })
        .collect()
}

/// A sequence on a decode worker.
#[derive(Debug, Clone, Copy)]
struct Seq {
    req: usize,
    /// Positions in its cache.
    have: usize,
    prompt: usize,
    /// Tokens produced (the first one by whoever prefilled it).
    out: usize,
    first_at: f64,
}

struct DecodeSim {
    f: ForwardCost,
    threads: usize,
    /// The prefill worker it shares its cores with, and the step period it then paces to.
    pace: Option<(usize, f64)>,
    running: Vec<Seq>,
    waiting: VecDeque<Seq>,
    /// Prefilled elsewhere, arriving at the given time.
    joining: VecDeque<(f64, Seq)>,
    /// Requests routed here and not finished (the scheduler's in-flight count).
    assigned: usize,
    /// The next step may start at; it computes until `busy_until`.
    free_at: f64,
    busy_until: f64,
}

impl DecodeSim {
    fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    /// When its next step starts, if it has anything to do.
    fn next_step(&self, now: f64) -> Option<f64> {
        if self.has_work() {
            Some(self.free_at.max(now))
        } else {
            self.joining.front().map(|&(t, _)| t.max(self.free_at))
        }
    }

    fn backlog(&self) -> usize {
        let queued = |s: &Seq| s.prompt - s.have.min(s.prompt);
        self.running.iter().map(queued).sum::<usize>()
            + self.waiting.iter().map(queued).sum::<usize>()
    }

    fn context(&self) -> usize {
        self.running.iter().map(|s| s.have).sum()
    }
}

struct Batch {
    jobs: Vec<(Seq, usize)>,
    /// Seconds of computing left, at full speed.
    left: f64,
}

struct PrefillSim {
    f: ForwardCost,
    threads: usize,
    /// The decode worker whose steps it yields to.
    yields_to: Option<usize>,
    queue: VecDeque<(Seq, usize)>,
    batch: Option<Batch>,
    busy_s: f64,
}

impl PrefillSim {
    fn queued_tokens(&self) -> usize {
        let b = self.batch.iter().flat_map(|b| &b.jobs);
        b.chain(&self.queue).map(|(s, _)| s.prompt).sum()
    }

    /// When it computes again from `now`: at once, or once its decode neighbour's step ends.
    fn runs_from(&self, ds: &[DecodeSim], now: f64) -> f64 {
        self.yields_to.map_or(now, |i| ds[i].busy_until.max(now))
    }

    fn start(&mut self) {
        if self.batch.is_some() || self.queue.is_empty() {
            return;
        }
        let mut jobs = vec![self.queue.pop_front().expect("not empty")];
        let mut tokens = jobs[0].0.prompt;
        while let Some(next) = self.queue.front() {
            if tokens + next.0.prompt > PREFILL_BUDGET {
                break;
            }
            tokens += next.0.prompt;
            jobs.push(self.queue.pop_front().expect("not empty"));
        }
        let work = jobs
            .iter()
            .fold(Work::default(), |w, (s, _)| w + Work::prefill(0, s.prompt));
        self.batch = Some(Batch {
            left: self.f.seconds(work),
            jobs,
        });
    }
}

/// Replays `n` requests of `w` through `layout`; a shared decode worker paces to
/// `pace × TPOT bound`.
pub fn simulate(
    cost: &CostModel,
    w: &Workload,
    slo: Slo,
    layout: Layout,
    pace: f64,
    n: usize,
    seed: u64,
) -> Run {
    replay(cost, &arrivals(w, n, seed), w.osl, slo, layout, pace)
}

/// Replays `reqs` (in arrival order) through `layout`, placing prompts as the scheduler would
/// for streams of `horizon` output tokens; a shared decode worker paces to `pace × TPOT bound`.
pub fn replay(
    cost: &CostModel,
    reqs: &[Arrival],
    horizon: usize,
    slo: Slo,
    layout: Layout,
    pace: f64,
) -> Run {
    let n = reqs.len();
    let decode = |threads: usize, pace: Option<(usize, f64)>| DecodeSim {
        f: *cost.forward(threads),
        threads,
        pace,
        running: Vec::new(),
        waiting: VecDeque::new(),
        joining: VecDeque::new(),
        assigned: 0,
        free_at: 0.0,
        busy_until: 0.0,
    };
    let prefill = |threads: usize, yields_to: Option<usize>| PrefillSim {
        f: *cost.forward(threads),
        threads,
        yields_to,
        queue: VecDeque::new(),
        batch: None,
        busy_s: 0.0,
    };
    let (mut ds, mut ps): (Vec<DecodeSim>, Vec<PrefillSim>) = match layout {
        Layout::Colocated { threads } => (vec![decode(threads, None)], vec![]),
        Layout::Shared { threads } => (
            vec![decode(threads, Some((0, pace * slo.tpot_s)))],
            vec![prefill(threads, Some(0))],
        ),
        Layout::Pinned {
            prefill: p,
            decode: d,
        } => (
            (0..d).map(|_| decode(1, None)).collect(),
            (0..p).map(|_| prefill(1, None)).collect(),
        ),
        Layout::Pods {
            prefill: p,
            decode: d,
            threads,
        } => (
            (0..d).map(|_| decode(threads, None)).collect(),
            (0..p).map(|_| prefill(threads, None)).collect(),
        ),
    };
    let tcp = matches!(layout, Layout::Pods { .. });
    let mut served = vec![
        Served {
            ttft_s: f64::INFINITY,
            tpot_s: f64::INFINITY,
        };
        n
    ];
    let (mut steps, mut stepped) = (0usize, 0usize);
    let horizon = horizon.max(1);
    let osl = |r: usize| reqs[r].osl.max(1);
    let mut next = 0;
    let mut now = 0.0f64;
    let mut done = 0;
    while done < n {
        // The next event: an arrival, a decode step, a prefill batch ending.
        let mut t = reqs.get(next).map_or(f64::INFINITY, |r| r.at);
        for d in &ds {
            if let Some(s) = d.next_step(now) {
                t = t.min(s);
            }
        }
        for p in &ps {
            if let Some(b) = &p.batch {
                t = t.min(p.runs_from(&ds, now) + b.left);
            }
        }
        if !t.is_finite() {
            break; // nothing left that could finish: the rest count as missed
        }
        // Prefill progress up to `t`: all of it, but what its decode neighbour's steps take.
        for p in &mut ps {
            let from = p.runs_from(&ds, now);
            if let Some(b) = &mut p.batch {
                let ran = (t - from).clamp(0.0, b.left);
                b.left -= ran;
                p.busy_s += ran;
            }
        }
        now = t;
        // Prefill batches done: first tokens now, the KV at its decode worker a link later.
        for p in &mut ps {
            if p.batch.as_ref().is_some_and(|b| b.left <= 1e-12) {
                let b = p.batch.take().expect("checked");
                for (mut s, d) in b.jobs {
                    let moved = if tcp { cost.tcp_seconds(s.prompt) } else { 0.0 };
                    let at = now + cost.link.calls_s + moved;
                    s.first_at = at;
                    s.have = s.prompt;
                    s.out = 1;
                    served[s.req].ttft_s = at - reqs[s.req].at;
                    if osl(s.req) == 1 {
                        served[s.req].tpot_s = 0.0;
                        ds[d].assigned -= 1;
                        done += 1;
                    } else {
                        ds[d].joining.push_back((at, s));
                    }
                }
            }
            p.start();
        }
        // Arrivals: routed to the least busy decode worker, placed as the scheduler would.
        while next < n && reqs[next].at <= now {
            let r = reqs[next];
            let di = (0..ds.len())
                .min_by_key(|&i| ds[i].assigned)
                .expect("a decode worker");
            let pi = (0..ps.len())
                .min_by_key(|&i| ps[i].queue.len() + usize::from(ps[i].batch.is_some()));
            let d = &ds[di];
            let view = DecodeView {
                threads: d.threads,
                running: d.running.len() + d.waiting.len(),
                context: d.context(),
                backlog: d.backlog(),
                max_batch_tokens: STEP_BUDGET,
                horizon,
                pace_s: d.pace.map(|(_, p)| p),
            };
            let pview = pi.map(|i| PrefillView {
                threads: ps[i].threads,
                backlog: ps[i].queued_tokens(),
                tcp,
            });
            let seq = Seq {
                req: next,
                have: 0,
                prompt: r.prompt.max(1),
                out: 0,
                first_at: 0.0,
            };
            ds[di].assigned += 1;
            match (
                decide(cost, slo, r.prompt, 0, &view, pview.as_ref()).place,
                pi,
            ) {
                (Place::Prefill, Some(i)) => {
                    ps[i].queue.push_back((seq, di));
                    ps[i].start();
                }
                _ => ds[di].waiting.push_back(seq),
            }
            next += 1;
        }
        // Decode steps due now.
        for d in &mut ds {
            if d.next_step(now).is_some_and(|s| s <= now) {
                let sharing = d.pace.filter(|&(p, _)| ps[p].batch.is_some());
                let (finished, n_seqs) = step(d, now, sharing.map(|(_, p)| p), reqs, &mut served);
                d.assigned -= finished;
                done += finished;
                steps += 1;
                stepped += n_seqs;
            }
        }
    }
    let end = now.max(1e-9);
    Run {
        served,
        prefill_load: ps.iter().map(|p| p.busy_s / end).fold(0.0, f64::max),
        batch: stepped as f64 / steps.max(1) as f64,
    }
}

/// One step of `d` at `now`: sequences that arrived join (up to the cap), decoding ones make a
/// token each, prompt chunks fill the budget. Returns the requests it finished and the
/// sequences it stepped.
fn step(
    d: &mut DecodeSim,
    now: f64,
    pace: Option<f64>,
    reqs: &[Arrival],
    served: &mut [Served],
) -> (usize, usize) {
    while d.joining.front().is_some_and(|&(t, _)| t <= now) {
        let (_, s) = d.joining.pop_front().expect("checked");
        d.waiting.push_back(s);
    }
    while d.running.len() < MAX_RUNNING {
        let Some(s) = d.waiting.pop_front() else {
            break;
        };
        d.running.push(s);
    }
    let decoding = d.running.iter().filter(|s| s.have >= s.prompt).count();
    let mut budget = STEP_BUDGET.saturating_sub(decoding);
    let mut work = Work::default();
    let mut chunks = vec![0usize; d.running.len()];
    for (i, s) in d.running.iter().enumerate() {
        if s.have >= s.prompt {
            work = work + Work::decode(1, s.have);
        } else if budget > 0 {
            let c = (s.prompt - s.have).min(budget);
            work = work + Work::prefill(s.have, s.have + c);
            chunks[i] = c;
            budget -= c;
        }
    }
    let end = now + d.f.seconds(work);
    d.busy_until = end;
    d.free_at = pace.map_or(end, |p| end.max(now + p));
    let n_seqs = d.running.len();
    let mut finished = 0;
    for (i, s) in d.running.iter_mut().enumerate() {
        if s.have >= s.prompt {
            s.have += 1;
            s.out += 1;
        } else if chunks[i] > 0 {
            s.have += chunks[i];
            if s.have >= s.prompt {
                s.out = 1;
                s.first_at = end;
                served[s.req].ttft_s = end - reqs[s.req].at;
            }
        }
        let osl = reqs[s.req].osl.max(1);
        if s.out >= osl {
            served[s.req].tpot_s = if osl > 1 {
                (end - s.first_at) / (osl - 1) as f64
            } else {
                0.0
            };
        }
    }
    d.running.retain(|s| {
        let keep = s.out < reqs[s.req].osl.max(1);
        finished += usize::from(!keep);
        keep
    });
    (finished, n_seqs)
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

    fn workload(prompts: &str, osl: usize, rate: f64) -> Workload {
        Workload {
            prompts: prompts.parse::<Prompts>().unwrap(),
            osl,
            rate,
        }
    }

    /// A request alone: its own steps and nothing else.
    fn alone(layout: Layout, prompt: usize, osl: usize) -> Served {
        let run = simulate(
            &model(),
            &workload(&prompt.to_string(), osl, 1e-4),
            SLO,
            layout,
            0.8,
            3,
            1,
        );
        let same = |a: &Served| {
            close(a.ttft_s, run.served[0].ttft_s) && close(a.tpot_s, run.served[0].tpot_s)
        };
        assert!(run.served.iter().all(same), "{run:?}");
        run.served[0]
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9
    }

    #[test]
    fn a_trace_replays_each_requests_own_arrival_and_lengths() {
        let m = model();
        let layout = Layout::Colocated { threads: 2 };
        // A workload's arrivals replayed are the workload simulated.
        let w = workload("200-400", 16, 2.0);
        assert_eq!(
            replay(&m, &arrivals(&w, 40, 9), w.osl, SLO, layout, 0.8),
            simulate(&m, &w, SLO, layout, 0.8, 40, 9)
        );
        // Requests far apart, each alone: its own chunks, then its own output's steps.
        let f = m.forward(2);
        let trace = [
            Arrival {
                at: 0.0,
                prompt: 100,
                osl: 1,
            },
            Arrival {
                at: 50.0,
                prompt: 300,
                osl: 3,
            },
        ];
        let run = replay(&m, &trace, 2, SLO, layout, 0.8);
        let (a, b) = (run.served[0], run.served[1]);
        assert!(
            close(a.ttft_s, f.seconds(Work::prefill(0, 100))) && a.tpot_s == 0.0,
            "{a:?}"
        );
        let ttft = f.seconds(Work::prefill(0, 256)) + f.seconds(Work::prefill(256, 300));
        let tpot = (f.seconds(Work::decode(1, 300)) + f.seconds(Work::decode(1, 301))) / 2.0;
        assert!(close(b.ttft_s, ttft) && close(b.tpot_s, tpot), "{b:?}");
    }

    #[test]
    fn a_request_alone_costs_its_chunks_and_then_its_decode_steps() {
        let m = model();
        let f = m.forward(2);
        // 600 tokens: chunks of 256, 256, 88, the first token at the end of the last.
        let ttft: f64 = [(0, 256), (256, 512), (512, 600)]
            .iter()
            .map(|&(a, b)| f.seconds(Work::prefill(a, b)))
            .sum();
        let tpot = (600..603)
            .map(|c| f.seconds(Work::decode(1, c)))
            .sum::<f64>()
            / 3.0;
        let s = alone(Layout::Colocated { threads: 2 }, 600, 4);
        assert!(
            close(s.ttft_s, ttft) && close(s.tpot_s, tpot),
            "{s:?} vs {ttft} {tpot}"
        );
        // On a prefill worker: one pass, then the link; no pacing once prefill is idle.
        let s = alone(Layout::Shared { threads: 2 }, 600, 4);
        let pass = f.seconds(Work::prefill(0, 600)) + m.link.calls_s;
        assert!(close(s.ttft_s, pass) && close(s.tpot_s, tpot), "{s:?}");
        let one = m.forward(1);
        let s = alone(
            Layout::Pinned {
                prefill: 1,
                decode: 1,
            },
            600,
            4,
        );
        assert!(
            close(
                s.ttft_s,
                one.seconds(Work::prefill(0, 600)) + m.link.calls_s
            ),
            "{s:?}"
        );
    }

    #[test]
    fn arrivals_are_poisson_at_the_rate_and_the_same_for_a_seed() {
        let w = workload("32-256", 8, 4.0);
        let a = arrivals(&w, 20_000, 9);
        let gaps: Vec<f64> = a.windows(2).map(|p| p[1].at - p[0].at).collect();
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64;
        assert!((mean - 0.25).abs() < 0.01, "{mean}");
        // An exponential's standard deviation is its mean.
        assert!((var.sqrt() / mean - 1.0).abs() < 0.05, "{var}");
        let again = arrivals(&w, 20_000, 9);
        assert!(
            a.iter()
                .zip(&again)
                .all(|(x, y)| x.at == y.at && x.prompt == y.prompt)
        );
        assert_ne!(arrivals(&w, 10, 10)[0].at, a[0].at);
    }

    #[test]
    fn a_paced_decode_worker_leaves_its_prefill_neighbour_the_rest_of_each_period() {
        let m = model();
        // A stream decoding, then a long prompt: it prefills in the rests of 20 ms periods,
        // and the stream's steps stretch to the period while it does.
        let w = workload("1000", 200, 0.4);
        let slo = Slo {
            ttft_s: 3.0,
            tpot_s: 0.025,
        };
        let run = simulate(&m, &w, slo, Layout::Shared { threads: 2 }, 0.8, 200, 3);
        let f = m.forward(2);
        let pass = f.seconds(Work::prefill(0, 1000));
        let step = f.seconds(Work::decode(1, 1100));
        let slowest = run.served.iter().map(|s| s.ttft_s).fold(0.0, f64::max);
        // With a stream or more decoding, a pass takes at least pass / (1 − step/period).
        assert!(
            slowest > pass / (1.0 - step / 0.02) * 0.99,
            "{slowest} {pass}"
        );
        let mut tpot: Vec<f64> = run.served.iter().map(|s| s.tpot_s).collect();
        tpot.sort_by(f64::total_cmp);
        assert!(
            tpot[tpot.len() / 2] <= 0.02 + 1e-9,
            "{}",
            tpot[tpot.len() / 2]
        );
        assert!(
            run.prefill_load > 0.1 && run.prefill_load < 1.0,
            "{}",
            run.prefill_load
        );
    }

    #[test]
    fn pods_pay_the_kv_transfer_over_tcp() {
        let mut m = model();
        // Calls so dear that one pass beats eight chunks on an idle decode pod.
        for f in &mut m.forward {
            f.fixed_s = 0.2;
        }
        let w = workload("2000", 4, 1e-4);
        let slo = Slo {
            ttft_s: 10.0,
            tpot_s: 0.1,
        };
        // The prompt goes to the prefill pod; its first token waits for the KV to cross.
        let pods = Layout::Pods {
            prefill: 1,
            decode: 1,
            threads: 2,
        };
        let run = simulate(&m, &w, slo, pods, 1.0, 2, 1);
        let pass = m.forward(2).seconds(Work::prefill(0, 2000));
        let want = pass + m.link.calls_s + m.tcp_seconds(2000);
        assert!(run.prefill_load > 0.0, "{run:?}");
        assert!(
            close(run.served[0].ttft_s, want),
            "{:?} vs {want}",
            run.served[0]
        );
    }

    #[test]
    fn pinned_decode_workers_split_the_streams() {
        let m = model();
        let w = workload("100", 50, 2.0);
        let one = simulate(
            &m,
            &w,
            SLO,
            Layout::Pinned {
                prefill: 1,
                decode: 1,
            },
            0.8,
            300,
            5,
        );
        let mut more = m.clone();
        more.cores = 3;
        let two = simulate(
            &more,
            &w,
            SLO,
            Layout::Pinned {
                prefill: 1,
                decode: 2,
            },
            0.8,
            300,
            5,
        );
        assert!(
            two.batch < one.batch * 0.75,
            "{} vs {}",
            two.batch,
            one.batch
        );
        let median = |r: &Run| {
            let mut t: Vec<f64> = r.served.iter().map(|s| s.tpot_s).collect();
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        };
        assert!(
            median(&two) < median(&one),
            "{} vs {}",
            median(&two),
            median(&one)
        );
    }
}
