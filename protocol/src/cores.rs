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
//! tokens leave of the period (timed by a running fit of its steps, [`StepFit`]), so the pass
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
}

/// While a prefill pass runs, the share of each period beyond its decode tokens that a decode
/// step may fill with prompt chunks of its own; the rest of the period is the prefill
/// worker's. Without the bound a stream of short prompts placed on the decode worker keeps
/// every step past its period, and the pass, at idle priority, starves.
pub const STEP_SHARE: f64 = 0.5;
/// Prompt-chunk tokens a paced step may always carry, so that its own prompts still move
/// while a pass runs however full its decode batch.
pub const MIN_CHUNK: usize = 4;

/// How fast a decode worker's steps move its queued prompts: `tokens` prompt tokens a step of
/// `step_s` seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pace {
    pub tokens: usize,
    pub step_s: f64,
}

impl Pace {
    /// Of the `queued` prompts (each one's tokens left and how long it has waited, in the order
    /// they are served), those still within the first-token bound `hold_s` that this pace would
    /// take past it.
    pub fn late(&self, queued: &[(usize, f64)], hold_s: f64) -> usize {
        let mut tokens = 0;
        queued
            .iter()
            .filter(|&&(q, waited)| {
                tokens += q;
                let done = tokens.div_ceil(self.tokens.max(1)) as f64 * self.step_s;
                waited <= hold_s && waited + done > hold_s
            })
            .count()
    }
}

/// Whether a paced step with no pass beside it holds to the period and the streams' credit,
/// whichever makes fewer requests miss. Held (`held`: the chunk tokens a period leaves beside
/// the decode tokens), the queued prompts (`queued`: the prompt tokens each still has and how
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
pub fn holds(
    streams: usize,
    queued: &[(usize, f64)],
    held: Pace,
    whole: Pace,
    hold_s: f64,
) -> bool {
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
    tokens: f64,
}

impl ArrivalRate {
    pub const TAU_S: f64 = 2.0;

    fn decay(&self, now_s: f64) -> f64 {
        (-(now_s - self.at_s).max(0.0) / Self::TAU_S).exp()
    }

    /// A prompt of `tokens` arrived at `at_s` (seconds on any clock that only goes forward).
    pub fn observe(&mut self, at_s: f64, tokens: usize) {
        let d = self.decay(at_s);
        self.weight = self.weight * d + 1.0;
        self.tokens = self.tokens * d + tokens as f64;
        self.at_s = self.at_s.max(at_s);
    }

    /// How far ahead [`holds`] counts the prompts to come: the window the rate is measured
    /// over, and at least the first-token bound `hold_s`. Held steps slower than the prompts
    /// come make every later prompt wait longer; within the bound alone they would seem to
    /// cost a prompt or two.
    pub fn horizon(hold_s: f64) -> f64 {
        hold_s.max(Self::TAU_S)
    }

    /// The prompt tokens that come in `period_s`, at the rate as of `now_s`: what a held step
    /// carries at least, so that its queue does not grow while a stream behind the pace catches
    /// up on shorter steps (with four prompt tokens a step, a 32-stream run's prompts queued
    /// behind such a stream for seconds while more kept coming).
    pub fn per_period(&self, now_s: f64, period_s: f64) -> usize {
        (self.tokens * self.decay(now_s) / Self::TAU_S * period_s).ceil() as usize
    }

    /// Prompts per second, as of `now_s`.
    pub fn rate(&self, now_s: f64) -> f64 {
        self.weight * self.decay(now_s) / Self::TAU_S
    }

    /// The prompts expected within `horizon_s` after `now_s` at the rate and mean length seen,
    /// as [`holds`] takes its queue: each one's tokens and minus the seconds until it comes.
    pub fn ahead(&self, now_s: f64, horizon_s: f64) -> impl Iterator<Item = (usize, f64)> {
        let rate = self.rate(now_s);
        let mean = if self.weight > 0.0 {
            (self.tokens / self.weight).round() as usize
        } else {
            0
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

/// A running least-squares fit of a step's time against its tokens, `a + c·tokens`, each
/// step weighing a little less than the next (so it follows the machine's speed).
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

    pub fn observe(&mut self, tokens: usize, seconds: f64) {
        let (x, d) = (tokens as f64, Self::DECAY);
        self.w = self.w * d + 1.0;
        self.x = self.x * d + x;
        self.y = self.y * d + seconds;
        self.xx = self.xx * d + x * x;
        self.xy = self.xy * d + x * seconds;
    }

    /// `(a, c)`: fixed seconds per step and seconds per token; `None` before any step. While
    /// the steps seen had too few distinct sizes to separate them, every second is charged to
    /// the tokens (an overestimate of a token's cost, so a bound on tokens stays safe).
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

    /// Tokens a step may compute within `seconds` (at least `decode` + [`MIN_CHUNK`]); `None`
    /// before any step was seen.
    pub fn tokens_within(&self, decode: usize, seconds: f64) -> Option<usize> {
        let (a, c) = self.line()?;
        let fits = ((seconds - a) / c).max(0.0) as usize;
        Some(fits.max(decode + MIN_CHUNK))
    }

    /// The time of a step of `tokens`; `None` before any step was seen.
    pub fn seconds(&self, tokens: usize) -> Option<f64> {
        self.line().map(|(a, c)| a + c * tokens as f64)
    }

    /// Prompt-chunk tokens beside `decode` decode tokens in a step paced to `period_s` beside a
    /// pass: what fits [`STEP_SHARE`] of what the decode tokens leave of the period (at least
    /// [`MIN_CHUNK`]); `None` before any step was seen.
    pub fn chunk_tokens(&self, decode: usize, period_s: f64) -> Option<usize> {
        let (a, c) = self.line()?;
        let left = STEP_SHARE * (period_s - a - c * decode as f64);
        Some(((left / c).max(0.0) as usize).max(MIN_CHUNK))
    }
}

/// Paces a decode worker's steps while a prefill worker shares its cores.
pub struct Pacer {
    arbiter: CoreArbiter,
    period: Duration,
    hold: Duration,
    fit: StepFit,
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
            arrivals: ArrivalRate::default(),
            epoch: std::time::Instant::now(),
        }
    }

    /// A prompt of `tokens` to prefill arrived.
    pub fn arrived(&mut self, tokens: usize) {
        let now = self.epoch.elapsed().as_secs_f64();
        self.arrivals.observe(now, tokens);
    }

    pub fn open(s: &Sharing) -> io::Result<Pacer> {
        Ok(Pacer::new(CoreArbiter::open(&s.path)?, s.period, s.hold))
    }

    pub fn period(&self) -> Duration {
        self.period
    }

    /// The first-token bound its queued prompts are held to ([`holds`]).
    pub fn hold(&self) -> Duration {
        self.hold
    }

    /// The time a step of the `decode` decode tokens alone takes, by the fit of the steps seen.
    pub fn decode_seconds(&self, decode: usize) -> Option<f64> {
        self.fit.seconds(decode)
    }

    /// The tokens the next step may compute, `decode` of them decode tokens and `max` its
    /// budget. While prefill is idle: all of it, but, with streams decoding (their `credits`)
    /// where holding them to the pace makes fewer requests miss than a whole step ([`holds`];
    /// `queued`: each queued prompt's tokens left and time waited), only what fits the period
    /// plus the least of their credits, but at least the prompt tokens that come in a period
    /// ([`ArrivalRate::per_period`]). While a pass runs:
    /// the decode tokens and the chunks that fit [`STEP_SHARE`] of what they leave of the
    /// period ([`StepFit::chunk_tokens`]).
    pub fn step_tokens(
        &self,
        decode: usize,
        max: usize,
        credits: &[f64],
        queued: &[(usize, f64)],
    ) -> usize {
        let period = self.period.as_secs_f64();
        if !self.arbiter.prefill_active() {
            // A whole step: the decode tokens and as much of the queued prompts as it holds.
            let want = decode + queued.iter().map(|&(q, _)| q).sum::<usize>();
            let (Some(level), Some(whole), Some(full)) = (
                self.fit.tokens_within(decode, period),
                self.fit.seconds(max.min(want)),
                self.fit.seconds(max),
            ) else {
                return max;
            };
            let held = Pace {
                tokens: level.saturating_sub(decode),
                step_s: period,
            };
            let whole_pace = Pace {
                tokens: max.saturating_sub(decode),
                step_s: full,
            };
            let hold = self.hold.as_secs_f64();
            if decode == 0 {
                return max;
            }
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
                return max;
            }
            let credit = least_credit(credits);
            let keep_up = decode + self.arrivals.per_period(now, period);
            return self
                .fit
                .tokens_within(decode, period + credit)
                .map_or(max, |fits| max.min(fits.max(keep_up)));
        }
        let chunk = self.fit.chunk_tokens(decode, period).unwrap_or(MIN_CHUNK);
        max.min(decode + chunk)
    }

    /// After a step of `tokens` that began at `start`: how long to leave the cores to prefill
    /// (nothing while prefill is idle or the step used its whole period).
    pub fn rest(&mut self, tokens: usize, start: std::time::Instant) -> Duration {
        let took = start.elapsed();
        self.fit.observe(tokens, took.as_secs_f64());
        if !self.arbiter.prefill_active() {
            return Duration::ZERO;
        }
        self.period.saturating_sub(took)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_in_progress_is_seen_by_another_mapping_until_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cores");
        let prefill = CoreArbiter::open(&p).unwrap();
        let decode = CoreArbiter::open(&p).unwrap();
        assert!(!decode.prefill_active());
        let mut pacer = Pacer::new(
            CoreArbiter::open(&p).unwrap(),
            Duration::from_millis(50),
            Duration::from_secs(1),
        );
        assert_eq!(pacer.step_tokens(3, 256, &[], &[]), 256);
        assert_eq!(pacer.rest(1, std::time::Instant::now()), Duration::ZERO);
        {
            let _a = prefill.computing();
            let _b = prefill.computing();
            assert!(decode.prefill_active());
            let rest = pacer.rest(1, std::time::Instant::now());
            assert!(rest > Duration::from_millis(40) && rest <= Duration::from_millis(50));
            // A step that took its whole period leaves nothing.
            let long_ago = std::time::Instant::now() - Duration::from_millis(60);
            assert_eq!(pacer.rest(1, long_ago), Duration::ZERO);
            assert!(pacer.step_tokens(3, 256, &[], &[]) < 256);
        }
        assert!(!decode.prefill_active());
    }

    #[test]
    fn a_streams_credit_is_what_it_saved_against_the_period_and_a_little_lent() {
        // 10 tokens after the first in 100 ms against a 20 ms period saved 100 ms.
        let saved = stream_credit(0.02, 0.1, 10, 0, 64, 0.005);
        assert!((saved - 0.1).abs() < 1e-12, "{saved}");
        // A fresh stream borrows against the tokens ahead that keep the overrun within the
        // margin over its output: 0.1 × 20 ms × 63 / 15 ms = 8.4, so 8 tokens of 15 ms.
        let fresh = stream_credit(0.02, 0.0, 0, 63, 64, 0.005);
        assert!((fresh - 8.0 * 0.015).abs() < 1e-12, "{fresh}");
        // A stream behind the pace has none.
        assert!(stream_credit(0.02, 0.5, 10, 50, 64, 0.005) < 0.0);
    }

    #[test]
    fn a_step_holds_to_the_pace_where_that_makes_fewer_requests_miss() {
        // A 20 ms period leaves 10 chunk tokens; prompts have 1 s for their first token, so
        // 500 tokens drain in time; a whole step takes 150 ms and carries 250 prompt tokens.
        let (per, whole, period, hold) = (10, 0.15, 0.02, 1.0);
        let held = Pace {
            tokens: per,
            step_s: period,
        };
        let full = Pace {
            tokens: 250,
            step_s: whole,
        };
        let poor = [0.01; 6]; // credits a whole step would overrun
        let h = |credits: &[f64], queued: &[(usize, f64)]| {
            holds(overrun(credits, whole, period), queued, held, full, hold)
        };
        let fresh = |n| vec![(200, 0.0); n];
        // A chat turn queued: holding keeps it in time and six streams within the bound.
        assert!(h(&poor, &fresh(1)));
        // A burst of prompts that cannot all drain in time: holding would make five miss
        // their first token (the first two of seven are in time), against six streams.
        assert!(h(&poor, &fresh(7)));
        assert!(!h(&poor[..4], &fresh(7)));
        // Streams with credit enough for a whole step lose nothing to it, and streams behind
        // their pace are lost either way.
        assert!(!h(&[0.2; 6], &fresh(7)));
        assert!(!h(&[-0.01; 6], &fresh(7)));
        // A stream a held step left a little short of nothing (the fit's error) is on pace.
        assert!(h(&[-0.001; 6], &fresh(7)));
        // Prompts that waited past the bound already are lost either way.
        assert!(h(&poor[..1], &[(200, 1.5); 7]));
        // A tie holds.
        assert!(h(&[0.01; 5], &fresh(7)));
        // A burst that whole steps would not bring in time either (ten prompts of 500
        // tokens: whole steps make seven of them miss, held ones nine): holding costs two
        // prompts, so it spares two streams their bound, but not one.
        let long = vec![(500, 0.0); 10];
        assert_eq!(full.late(&long, hold), 7);
        assert_eq!(held.late(&long, hold), 9);
        assert!(h(&poor[..2], &long));
        assert!(!h(&poor[..1], &long));
        assert_eq!(overrun(&[0.2, -0.3], whole, period), 0);
    }

    #[test]
    fn prompts_expected_to_come_count_against_holding_where_held_steps_fall_behind_them() {
        // Five prompts of 250 tokens a second for the last few seconds.
        let mut a = ArrivalRate::default();
        assert_eq!(a.ahead(0.0, 1.0).count(), 0);
        for k in 0..40 {
            a.observe(k as f64 * 0.2, 240 + 20 * (k % 2));
        }
        let rate = a.rate(7.8);
        assert!((4.5..5.5).contains(&rate), "{rate}");
        let ahead: Vec<_> = a.ahead(7.8, 1.0).collect();
        assert_eq!(ahead.len(), 5);
        assert!(ahead.iter().all(|&(t, _)| t == 250));
        assert!(ahead.windows(2).all(|w| w[1].1 < w[0].1 && w[0].1 < 0.0));
        // A held step carries at least the ~1,250 tokens a second that come: 113 a 90 ms
        // period.
        let k = a.per_period(7.8, 0.09);
        assert!((110..=125).contains(&k), "{k}");
        // The rate fades once prompts stop coming.
        assert!(a.rate(17.8) < 0.05 * rate);
        // A 90 ms period that leaves 67 chunk tokens (~740 a second) beside the streams: one
        // queued prompt drains in time, so the held step spares two streams …
        let (whole, period, hold) = (0.18, 0.09, 1.0);
        let held = Pace {
            tokens: 67,
            step_s: period,
        };
        let full = Pace {
            tokens: 254,
            step_s: whole,
        };
        let poor = [0.01, 0.02];
        assert!(holds(
            overrun(&poor, whole, period),
            &[(250, 0.0)],
            held,
            full,
            hold
        ));
        // … but with the prompts that come behind it (two seconds of them), held steps make
        // more of them miss.
        let mut queue = vec![(250, 0.0)];
        queue.extend(a.ahead(7.8, ArrivalRate::horizon(hold)));
        assert_eq!(full.late(&queue, hold), 0);
        assert!(!holds(
            overrun(&poor, whole, period),
            &queue,
            held,
            full,
            hold
        ));
    }

    #[test]
    fn steps_that_spend_every_credit_keep_a_streams_mean_within_the_margin() {
        // However a queue spends the credit (each step the period plus all of it, or a
        // decode-only step at `base`), the stream's mean time per token after its first stays
        // within the period and the margin lent.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 11) as f64 / (1u64 << 53) as f64
        };
        for _ in 0..500 {
            let period = 0.005 + 0.2 * next();
            let base = period * (0.05 + 0.9 * next());
            let outputs = 2 + (next() * 300.0) as usize;
            let mut since = 0.0;
            for made in 1..outputs {
                let credit = stream_credit(period, since, made - 1, outputs - made, outputs, base);
                since += if next() < 0.7 {
                    (period + credit).max(base)
                } else {
                    base
                };
            }
            let mean = since / (outputs - 1) as f64;
            assert!(
                mean <= period * (1.0 + AHEAD_MARGIN) + 1e-12,
                "{mean} {period} {base} {outputs}"
            );
        }
    }

    #[test]
    fn a_paced_step_carries_the_chunk_tokens_that_fit_its_share_of_the_period() {
        // Steps cost 2 ms + 0.1 ms a token.
        let mut f = StepFit::default();
        assert_eq!(f.chunk_tokens(4, 0.01), None);
        for t in [1, 8, 40, 3, 200, 17, 64] {
            f.observe(t, 0.002 + 1e-4 * t as f64);
        }
        let (a, c) = f.line().unwrap();
        assert!(
            (a - 0.002).abs() < 1e-6 && (c - 1e-4).abs() < 1e-8,
            "{a} {c}"
        );
        // A 20 ms period: 2 ms fixed and 0.4 ms for 4 decode tokens leave 17.6 ms, half of
        // it for 88 chunk tokens.
        let k = f.chunk_tokens(4, 0.02).unwrap();
        assert!((87..=88).contains(&k), "{k}");
        // A decode batch that fills the period alone still moves its prompts a little.
        assert_eq!(f.chunk_tokens(200, 0.02), Some(MIN_CHUNK));
        // Steps all of one size: every second is charged to the tokens.
        let mut g = StepFit::default();
        for _ in 0..5 {
            g.observe(10, 0.003);
        }
        let (a, c) = g.line().unwrap();
        assert_eq!(a, 0.0);
        assert!((c - 3e-4).abs() < 1e-9);
        let k = g.chunk_tokens(10, 0.023).unwrap();
        assert!((33..=34).contains(&k), "{k}");
    }

    #[test]
    fn a_dead_prefill_workers_count_is_voided_by_its_heartbeats_age() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cores");
        let a = CoreArbiter::open(&p).unwrap();
        std::mem::forget(a.computing()); // died mid-pass
        assert!(a.prefill_active());
        a.word(1)
            .store(now_ns() - STALE.as_nanos() as u64 - 1, Ordering::Release);
        assert!(!a.prefill_active());
    }

    #[test]
    fn idle_scheduling_applies_to_the_thread_and_those_it_starts() {
        std::thread::spawn(|| {
            yield_cores().unwrap();
            // SAFETY: querying the calling thread's policy (directly: musl's wrapper is a stub).
            let policy = || unsafe { libc::syscall(libc::SYS_sched_getscheduler, 0) };
            assert_eq!(policy(), libc::SCHED_IDLE as libc::c_long);
            let child = std::thread::spawn(policy);
            assert_eq!(child.join().unwrap(), libc::SCHED_IDLE as libc::c_long);
        })
        .join()
        .unwrap();
    }
}
