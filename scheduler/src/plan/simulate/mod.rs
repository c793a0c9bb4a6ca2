//! The serving loop replayed on the cost model: Poisson arrivals of a workload through a layout's
//! workers, step by step, with the engine's own rules — a decode worker's step is its decoding
//! sequences' tokens and then prompt chunks, oldest first, up to its step budget; a prefill
//! worker batches whole prompts up to its token budget; each prompt placed by
//! [`super::placement::decide`], as the scheduler places it; a decode worker sharing its cores
//! rests to its pace while the prefill worker computes, its steps carrying only the chunks
//! that fit their share of the period, and the prefill worker gets the rests.
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
use protocol::cores::{ArrivalRate, Pace, holds, least_credit, overrun, stream_credit};
use std::collections::VecDeque;

/// A decode worker's step budget and sequence cap (the workers' defaults: `tandem`'s tests
/// hold them equal).
pub const STEP_BUDGET: usize = 256;
pub const MAX_RUNNING: usize = 64;
/// A prefill worker's batch budget (its default).
pub const PREFILL_BUDGET: usize = 1024;

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

impl Arrival {
    /// The tokens it makes: at least one (the first, from its prefill).
    pub fn outputs(&self) -> usize {
        self.osl.max(1)
    }
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
    /// How long its queued prompts may wait on the pace (`protocol::cores::holds`).
    hold_s: f64,
    /// The prompts it was given to prefill, for the prompts `holds` expects to come.
    arrivals: ArrivalRate,
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
        hold_s: slo.ttft_s,
        arrivals: ArrivalRate::default(),
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
    let osl = |r: usize| reqs[r].outputs();
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
                _ => {
                    ds[di].arrivals.observe(r.at, seq.prompt as f64);
                    ds[di].waiting.push_back(seq);
                }
            }
            next += 1;
        }
        // Decode steps due now.
        for d in &mut ds {
            if d.next_step(now).is_some_and(|s| s <= now) {
                let pass = d.pace.is_some_and(|(p, _)| ps[p].batch.is_some());
                let (finished, n_seqs) = step(d, now, pass, reqs, &mut served);
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
/// token each, prompt chunks fill the budget (while a `pass` runs beside a paced worker: the
/// share of what the decode tokens leave of the period, and then a rest to the period).
/// Returns the requests it finished and the sequences it stepped.
fn step(
    d: &mut DecodeSim,
    now: f64,
    pass: bool,
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
    // Beside a pass, the chunks that fit the step's share of the period; with none, those
    // that keep the step within the period and the streams' least credit against it, and at
    // least the prompt tokens that come in a period (`protocol::cores`).
    let pace = d.pace.map(|(_, p)| p).filter(|_| pass);
    if let Some((_, period)) = d.pace.filter(|_| pass || decoding > 0) {
        let decoding_seqs = || d.running.iter().filter(|s| s.have >= s.prompt);
        let decode = Work::decode(decoding, decoding_seqs().map(|s| s.have).sum());
        let pairs = d
            .running
            .iter()
            .find(|s| s.have < s.prompt)
            .map_or(0, |s| s.have) as f64;
        let base = d.f.seconds(decode);
        let credits: Vec<f64> = decoding_seqs()
            .filter(|s| served[s.req].ttft_s <= d.hold_s)
            .map(|s| {
                let osl = reqs[s.req].outputs();
                let since = now - s.first_at;
                stream_credit(
                    period,
                    since,
                    s.out - 1,
                    osl.saturating_sub(s.out),
                    osl,
                    base,
                )
            })
            .collect();
        let mut queued: Vec<(f64, f64)> = (d.running.iter().chain(&d.waiting))
            .filter(|s| s.have < s.prompt)
            .map(|s| ((s.prompt - s.have) as f64, now - reqs[s.req].at))
            .collect();
        // A whole step: as much of the queued prompts as the budget holds.
        let want = budget.min(queued.iter().map(|q| q.0 as usize).sum());
        queued.extend(d.arrivals.ahead(now, ArrivalRate::horizon(d.hold_s)));
        let held = Pace {
            work: d.f.chunk_within(pairs, period - base) as f64,
            step_s: period,
        };
        let prefill = |n: usize| Work::prefill(pairs as usize, pairs as usize + n);
        let whole = d.f.seconds(decode + prefill(want));
        let full = Pace {
            work: budget as f64,
            step_s: d.f.seconds(decode + prefill(budget)),
        };
        let chunk = if pass {
            d.f.paced_chunk(decode, pairs, period)
        } else if !holds(
            overrun(&credits, whole, period),
            &queued,
            held,
            full,
            d.hold_s,
        ) {
            budget
        } else {
            let credit = least_credit(&credits);
            let keep_up = d.arrivals.per_period(now, period).ceil() as usize;
            d.f.chunk_within(pairs, period + credit - base).max(keep_up)
        };
        budget = budget.min(chunk);
    }
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
        let osl = reqs[s.req].outputs();
        if s.out >= osl {
            served[s.req].tpot_s = if osl > 1 {
                (end - s.first_at) / (osl - 1) as f64
            } else {
                0.0
            };
        }
    }
    d.running.retain(|s| {
        let keep = s.out < reqs[s.req].outputs();
        finished += usize::from(!keep);
        keep
    });
    (finished, n_seqs)
}

#[cfg(test)]
mod tests;
