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
//! keeps the rest however many prompts the decode worker prefills itself. With no prefill
//! work the decode worker runs flat out, and with no decode batch prefill has the whole
//! machine.
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
}

/// While a prefill pass runs, the share of each period beyond its decode tokens that a decode
/// step may fill with prompt chunks of its own; the rest of the period is the prefill
/// worker's. Without the bound a stream of short prompts placed on the decode worker keeps
/// every step past its period, and the pass, at idle priority, starves.
pub const STEP_SHARE: f64 = 0.5;
/// Prompt-chunk tokens a paced step may always carry, so that its own prompts still move
/// while a pass runs however full its decode batch.
pub const MIN_CHUNK: usize = 4;

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
    fit: StepFit,
}

impl Pacer {
    pub fn new(arbiter: CoreArbiter, period: Duration) -> Pacer {
        Pacer {
            arbiter,
            period,
            fit: StepFit::default(),
        }
    }

    pub fn open(s: &Sharing) -> io::Result<Pacer> {
        Ok(Pacer::new(CoreArbiter::open(&s.path)?, s.period))
    }

    pub fn period(&self) -> Duration {
        self.period
    }

    /// The tokens the next step may compute, `decode` of them decode tokens and `max` its
    /// budget: all of it while prefill is idle; while a pass runs, the decode tokens and the
    /// chunks that fit [`STEP_SHARE`] of what they leave of the period
    /// ([`StepFit::chunk_tokens`]).
    pub fn step_tokens(&self, decode: usize, max: usize) -> usize {
        if !self.arbiter.prefill_active() {
            return max;
        }
        let period = self.period.as_secs_f64();
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
        let mut pacer = Pacer::new(CoreArbiter::open(&p).unwrap(), Duration::from_millis(50));
        assert_eq!(pacer.step_tokens(3, 256), 256);
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
            assert!(pacer.step_tokens(3, 256) < 256);
        }
        assert!(!decode.prefill_active());
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
