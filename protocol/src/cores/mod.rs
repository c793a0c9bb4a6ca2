//! Sharing one host's cores between a decode worker and a prefill worker, the decode steps
//! first — the CPU analogue of resizing a GPU's SM partitions per step (semi-PD, DuetServe).
//!
//! Both workers run a compute thread per core. The prefill worker drops its threads to
//! `SCHED_IDLE` ([`yield_cores`]): the kernel runs them only on cores nothing else wants, and
//! a waking decode thread preempts them at once. That alone would starve prefill while the
//! decode batch runs step after step, so the decode worker paces itself: while the prefill
//! worker computes (it says so in a shared page, [`CoreArbiter`]), each decode step runs at
//! full speed on every core and the worker then idles to the end of a period sized to the
//! TPOT target; prefill gets every cycle the steps leave. A step then carries its decode
//! tokens and only the prompt chunks of its own that fit [`STEP_SHARE`] of what the decode
//! tokens leave of the period (timed by a running fit of its steps against their work,
//! attention included: [`StepFit`], [`StepCost`]), so the pass
//! keeps the rest however many prompts the decode worker prefills itself. With no pass, the
//! decode worker runs without rests, each step with streams decoding holding to the period
//! plus the credit they have against it ([`stream_credit`]), so that its own prompts' chunks
//! keep the streams within the bound too; with no decode batch prefill has the whole machine.
//!
//! The page holds a count of passes in progress and a heartbeat (CLOCK_MONOTONIC, the same
//! clock for every process on the host): a prefill worker that dies mid-pass leaves a count
//! that the heartbeat's age voids, so the decode worker stops pacing.

use memmap2::MmapMut;
use std::fs::OpenOptions;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

mod fit;
pub use fit::{StepCost, StepFit, prefill_pairs};

/// How old a heartbeat may be before the passes it vouches for are taken as dead.
pub const STALE: Duration = Duration::from_secs(30);

const PAGE: usize = 64;

/// The shared page of one host's workers.
pub struct CoreArbiter {
    map: MmapMut,
}

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl std::fmt::Debug for CoreArbiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoreArbiter")
            .field("prefill_active", &self.prefill_active())
            .finish()
    }
}

impl CoreArbiter {
    /// Maps the page at `path`, creating it (zeroed) if needed.
    pub fn open(path: &Path) -> io::Result<CoreArbiter> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        if f.metadata()?.len() < PAGE as u64 {
            f.set_len(PAGE as u64)?;
        }
        // SAFETY: the file is ours and at least PAGE bytes long; every access goes through
        // the atomics below, so concurrent writers in other processes are well defined.
        let map = unsafe { memmap2::MmapOptions::new().len(PAGE).map_mut(&f)? };
        Ok(CoreArbiter { map })
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < PAGE / 8);
        // SAFETY: the mapping is PAGE bytes, page-aligned, and lives as long as `self`; a
        // u64 at an 8-byte offset is aligned for AtomicU64.
        unsafe { &*(self.map.as_ptr().add(i * 8) as *const AtomicU64) }
    }

    /// Prefill is computing a pass now (on this host).
    pub fn prefill_active(&self) -> bool {
        self.word(0).load(Ordering::Acquire) > 0
            && now_ns().saturating_sub(self.word(1).load(Ordering::Acquire))
                < STALE.as_nanos() as u64
    }

    /// Marks a prefill pass as computing until the guard drops.
    pub fn computing(&self) -> Computing<'_> {
        self.word(1).store(now_ns(), Ordering::Release);
        self.word(0).fetch_add(1, Ordering::AcqRel);
        Computing(self)
    }
}

/// A prefill pass in progress; see [`CoreArbiter::computing`].
pub struct Computing<'a>(&'a CoreArbiter);

impl Drop for Computing<'_> {
    fn drop(&mut self) {
        let a = self.0;
        let _ = a
            .word(0)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        a.word(1).store(now_ns(), Ordering::Release);
    }
}

/// Puts the calling thread — and every thread it starts afterwards — in `SCHED_IDLE`: it runs
/// only on cores no other thread wants. Call before the compute pool starts.
pub fn yield_cores() -> io::Result<()> {
    // The kernel's `struct sched_param` is one int. The system call is made directly: musl's
    // `sched_setscheduler` wrapper is a stub that returns ENOSYS (and its struct has more
    // fields), so the static image would never yield.
    let priority: libc::c_int = 0;
    // SAFETY: pid 0 is the calling thread; `priority` is a valid kernel `sched_param` that
    // outlives the call. Lowering one's own policy needs no privilege.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_setscheduler,
            0 as libc::pid_t,
            libc::SCHED_IDLE,
            &priority as *const libc::c_int,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A decode worker's share of its host's cores: the page it watches and the step period it
/// paces to while a prefill worker computes.
#[derive(Debug, Clone, PartialEq)]
pub struct Sharing {
    pub path: std::path::PathBuf,
    pub period: Duration,
    /// How long queued prompts may wait on the pace: the first-token bound ([`holds`]).
    pub hold: Duration,
    /// What its steps' work is: a prompt chunk's attention weighed against a token
    /// ([`StepCost`], from the cost profile; tokens alone by default).
    pub cost: StepCost,
}

/// While a prefill pass runs, the share of each period beyond its decode tokens that a decode
/// step may fill with prompt chunks of its own; the rest of the period is the prefill
/// worker's. Without the bound a stream of short prompts placed on the decode worker keeps
/// every step past its period, and the pass, at idle priority, starves.
pub const STEP_SHARE: f64 = 0.5;
/// Prompt-chunk tokens a paced step always carries, whatever its work allows, so that its own
/// prompts still move while a pass runs however full its decode batch.
pub const MIN_CHUNK: usize = 4;

/// How fast a decode worker's steps move its queued prompts: `work` of them a step of `step_s`
/// seconds — prompt tokens, or their work in token-equivalents ([`StepCost`]), in the unit the
/// queue is counted in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pace {
    pub work: f64,
    pub step_s: f64,
}

impl Pace {
    /// Of the `queued` prompts (each one's work left and how long it has waited, in the order
    /// they are served), those still within the first-token bound `hold_s` that this pace would
    /// take past it.
    pub fn late(&self, queued: &[(f64, f64)], hold_s: f64) -> usize {
        let mut work = 0.0;
        queued
            .iter()
            .filter(|&&(q, waited)| {
                work += q;
                let done = (work / self.work.max(1.0)).ceil() * self.step_s;
                waited <= hold_s && waited + done > hold_s
            })
            .count()
    }
}

/// Whether a paced step with no pass beside it holds to the period and the streams' credit,
/// whichever makes fewer requests miss. Held (`held`: the chunk work a period leaves beside
/// the decode tokens), the queued prompts (`queued`: the work each still has and how
/// long it has waited, in the order they are served; those expected to come,
/// [`ArrivalRate::ahead`], with minus the time until they do) it makes miss the first-token
/// bound `hold_s` beyond those that whole steps (`whole`) would. Run whole (as a colocated
/// server's): the `streams` it would overrun ([`overrun`]). Requests lost already (a prompt
/// waiting past the bound; a stream behind its pace, or — the caller leaves it out — whose
/// first token was late) count on neither side. A tie holds. Held regardless, a 32-stream
/// burst at TPOT ≤ 100 ms got its first tokens 2.8–4× later than colocated's; whole
/// regardless, §5's mix at TPOT ≤ 25 ms breaks every stream's bound; and counting as late the
/// prompts of a burst of long ones that miss either way, that mix's streams lost their bound to
/// whole steps that brought no prompt in time.
pub fn holds(streams: usize, queued: &[(f64, f64)], held: Pace, whole: Pace, hold_s: f64) -> bool {
    held.late(queued, hold_s)
        .saturating_sub(whole.late(queued, hold_s))
        <= streams
}

/// Of the decoding streams' `credits` ([`stream_credit`]), those on pace (at most [`ON_PACE`]
/// of the period short of it) that a whole step of `whole_s` would overrun ([`holds`]).
pub fn overrun(credits: &[f64], whole_s: f64, period_s: f64) -> usize {
    credits
        .iter()
        .filter(|&&c| (-ON_PACE * period_s..whole_s - period_s).contains(&c))
        .count()
}

/// How fast prompts reach a worker and how long they are, each arrival weighing less as it
/// ages (time constant [`ArrivalRate::TAU_S`]): [`holds`] counts the prompts that will queue
/// behind held steps, not only those queued now. A 32-stream closed loop brings a prompt
/// every ~0.2 s while its streams start; held steps that drain one or two queued prompts in
/// time fall behind that rate, and every prompt after them waits.
#[derive(Debug, Clone, Copy, Default)]
pub struct ArrivalRate {
    at_s: f64,
    weight: f64,
    work: f64,
}

impl ArrivalRate {
    pub const TAU_S: f64 = 2.0;

    fn decay(&self, now_s: f64) -> f64 {
        (-(now_s - self.at_s).max(0.0) / Self::TAU_S).exp()
    }

    /// A prompt of `work` (its tokens, or their work: [`Pace`]) arrived at `at_s` (seconds on
    /// any clock that only goes forward).
    pub fn observe(&mut self, at_s: f64, work: f64) {
        let d = self.decay(at_s);
        self.weight = self.weight * d + 1.0;
        self.work = self.work * d + work;
        self.at_s = self.at_s.max(at_s);
    }

    /// How far ahead [`holds`] counts the prompts to come: the window the rate is measured
    /// over, and at least the first-token bound `hold_s`. Held steps slower than the prompts
    /// come make every later prompt wait longer; within the bound alone they would seem to
    /// cost a prompt or two.
    pub fn horizon(hold_s: f64) -> f64 {
        hold_s.max(Self::TAU_S)
    }

    /// The prompts' work that comes in `period_s`, at the rate as of `now_s`: what a held step
    /// carries at least, so that its queue does not grow while a stream behind the pace catches
    /// up on shorter steps (with four prompt tokens a step, a 32-stream run's prompts queued
    /// behind such a stream for seconds while more kept coming).
    pub fn per_period(&self, now_s: f64, period_s: f64) -> f64 {
        self.work * self.decay(now_s) / Self::TAU_S * period_s
    }

    /// Prompts per second, as of `now_s`.
    pub fn rate(&self, now_s: f64) -> f64 {
        self.weight * self.decay(now_s) / Self::TAU_S
    }

    /// The prompts expected within `horizon_s` after `now_s` at the rate and mean length seen,
    /// as [`holds`] takes its queue: each one's work and minus the seconds until it comes.
    pub fn ahead(&self, now_s: f64, horizon_s: f64) -> impl Iterator<Item = (f64, f64)> {
        let rate = self.rate(now_s);
        let mean = if self.weight > 0.0 {
            self.work / self.weight
        } else {
            0.0
        };
        let n = (rate * horizon_s).floor() as usize;
        (1..=n).map(move |k| (mean, -(k as f64) / rate))
    }
}

/// The least of the streams' `credits` ([`stream_credit`]): what a held step may take beyond
/// the period (below it, for a stream behind its pace); infinite with no stream.
pub fn least_credit(credits: &[f64]) -> f64 {
    credits.iter().copied().fold(f64::INFINITY, f64::min)
}

/// How far short of its pace a stream may be and still count as on it ([`holds`]), as a share
/// of the period: a held step spends the least credit, and the step-time fit's error leaves
/// that stream a little either side of nothing.
pub const ON_PACE: f64 = 0.1;

/// Of the margin the pace leaves under the TPOT bound (the period is 0.9 of it), the share a
/// stream's tokens ahead may be lent against (see [`stream_credit`]).
pub const AHEAD_MARGIN: f64 = 0.1;

/// How much longer than `period_s` the next step may take while a stream's mean time per
/// output token (from its first token on, as a client measures it) stays within the period:
/// the time its `after_first` tokens so far saved against the period (`since_first_s` spent),
/// plus what a few of its `left` tokens still to come would save at `base_s` a step — only as
/// many as keep the loan within [`AHEAD_MARGIN`] of the period over its `outputs` tokens,
/// since a queue that goes on may hold them to the period. Negative: the stream is behind.
///
/// The least credit over the running streams bounds the decode worker's steps while it shares
/// its cores and no pass runs: a paced worker that ran flat out then would chunk a long prompt
/// into steps that break every stream's bound (a colocated server's failure), and one capped
/// to the period always would starve a burst of prompts that the streams' slack could absorb.
pub fn stream_credit(
    period_s: f64,
    since_first_s: f64,
    after_first: usize,
    left: usize,
    outputs: usize,
    base_s: f64,
) -> f64 {
    let saved = (period_s - base_s).max(1e-6);
    let lend = AHEAD_MARGIN * period_s * outputs.saturating_sub(1) as f64 / saved;
    let ahead = (left as f64).min(lend.floor());
    period_s * after_first as f64 - since_first_s + ahead * (period_s - base_s).max(0.0)
}

/// Paces a decode worker's steps while a prefill worker shares its cores.
pub struct Pacer {
    arbiter: CoreArbiter,
    period: Duration,
    hold: Duration,
    fit: StepFit,
    cost: StepCost,
    arrivals: ArrivalRate,
    epoch: std::time::Instant,
}

impl Pacer {
    pub fn new(arbiter: CoreArbiter, period: Duration, hold: Duration) -> Pacer {
        Pacer {
            arbiter,
            period,
            hold,
            fit: StepFit::default(),
            cost: StepCost::default(),
            arrivals: ArrivalRate::default(),
            epoch: std::time::Instant::now(),
        }
    }

    /// A prompt of `work` to prefill arrived ([`StepCost::chunk`]).
    pub fn arrived(&mut self, work: f64) {
        let now = self.epoch.elapsed().as_secs_f64();
        self.arrivals.observe(now, work);
    }

    pub fn open(s: &Sharing) -> io::Result<Pacer> {
        let mut p = Pacer::new(CoreArbiter::open(&s.path)?, s.period, s.hold);
        p.cost = s.cost;
        Ok(p)
    }

    /// What its steps' work is: the profile's weight of a prompt pair ([`StepCost`]), scaled
    /// as its steps say ([`StepFit::scale`]).
    pub fn cost(&self) -> StepCost {
        StepCost {
            prefill_pair: self.cost.prefill_pair * self.fit.scale(),
        }
    }

    pub fn period(&self) -> Duration {
        self.period
    }

    /// The first-token bound its queued prompts are held to ([`holds`]).
    pub fn hold(&self) -> Duration {
        self.hold
    }

    /// The time of a step of `work` ([`StepCost`]) by the fit of the steps seen.
    pub fn step_seconds(&self, work: f64) -> Option<f64> {
        self.fit.seconds(work)
    }

    /// The work ([`StepCost`]) the next step may compute (infinite: what its batch budget
    /// holds). While prefill is idle: all of it, but, with streams decoding (their `credits`)
    /// where holding them to the pace makes fewer requests miss than a whole step ([`holds`];
    /// `queued`: each queued prompt's work left and time waited), only what fits the period
    /// plus the least of their credits, but at least the decode tokens' and the prompts' work
    /// that comes in a period ([`ArrivalRate::per_period`]). While a pass runs: the decode
    /// tokens' and the chunks' that fit [`STEP_SHARE`] of what they leave of the period
    /// ([`StepFit::paced_work`]).
    pub fn step_work(&self, step: StepWork, credits: &[f64], queued: &[(f64, f64)]) -> f64 {
        let period = self.period.as_secs_f64();
        if self.arbiter.prefill_active() {
            return self
                .fit
                .paced_work(step.decode, period)
                .unwrap_or(step.decode);
        }
        let (Some(level), Some(whole), Some(full)) = (
            self.fit.work_within(period),
            self.fit.seconds(step.whole),
            self.fit.seconds(step.full),
        ) else {
            return f64::INFINITY;
        };
        if step.decode <= 0.0 {
            return f64::INFINITY;
        }
        let held = Pace {
            work: (level - step.decode).max(MIN_CHUNK as f64),
            step_s: period,
        };
        let whole_pace = Pace {
            work: step.full - step.decode,
            step_s: full,
        };
        let hold = self.hold.as_secs_f64();
        let now = self.epoch.elapsed().as_secs_f64();
        let mut queue = queued.to_vec();
        queue.extend(self.arrivals.ahead(now, ArrivalRate::horizon(hold)));
        if !holds(
            overrun(credits, whole, period),
            &queue,
            held,
            whole_pace,
            hold,
        ) {
            return f64::INFINITY;
        }
        let credit = least_credit(credits);
        let keep_up = step.decode + self.arrivals.per_period(now, period);
        self.fit
            .work_within(period + credit)
            .map_or(f64::INFINITY, |fits| fits.max(keep_up))
    }

    /// After a step of `tokens`, its prompt chunks attending to `pairs` positions in all, that
    /// began at `start`: how long to leave the cores to prefill (nothing while prefill is idle
    /// or the step used its whole period).
    pub fn rest(&mut self, tokens: usize, pairs: f64, start: std::time::Instant) -> Duration {
        let took = start.elapsed();
        let attention = self.cost.prefill_pair * pairs;
        self.fit
            .observe(tokens as f64, attention, took.as_secs_f64());
        if !self.arbiter.prefill_active() {
            return Duration::ZERO;
        }
        self.period.saturating_sub(took)
    }
}

/// A decode worker's next step by its work ([`StepCost`]), as its queue stands.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepWork {
    /// Its decode tokens'.
    pub decode: f64,
    /// Run whole now: its decode tokens' and as much of the queued prompts as the batch budget
    /// holds.
    pub whole: f64,
    /// A whole step's with its budget full (a new prompt's work in what the queue leaves of
    /// it): the pace at which whole steps move a queue.
    pub full: f64,
}

#[cfg(test)]
mod tests;
