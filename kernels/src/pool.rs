//! The persistent compute pool every parallel kernel runs on.
//!
//! Threads are started once and sized to the cores; a parallel call costs a store, a
//! notification only when a worker went to sleep, and a spin on a counter — no spawning, no
//! allocation, no work stealing. Between calls, idle workers spin briefly (the gaps between
//! the matmuls of one forward pass are microseconds) and then sleep on a condition variable,
//! so an idle server burns no CPU. A caller about to block on another process (a layer's
//! experts on expert workers sharing these cores) sends them to sleep at once ([`rest`]), so
//! their spinning does not take the cores that process computes on.
//!
//! The caller always takes part in its own call. One call runs at a time: a second thread
//! calling while the pool is busy runs its tasks serially on itself (correct, just not
//! parallel). Which thread runs which task never changes a result: tasks write disjoint
//! outputs, and every kernel's arithmetic is fixed per output (batch invariance).

use std::cell::UnsafeCell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins for the next call before it sleeps.
const SPIN: Duration = Duration::from_micros(300);

type Task<'a> = dyn Fn(usize) + Sync + 'a;

/// A borrowed task closure with its lifetime erased (see the safety argument in [`Pool::run`]).
#[derive(Clone, Copy)]
struct JobPtr(*const Task<'static>);

struct Shared {
    /// Bumped (Release) after a job is published; workers wait for it to change.
    epoch: AtomicU64,
    job: UnsafeCell<JobPtr>,
    n_tasks: AtomicUsize,
    next: AtomicUsize,
    /// Workers that have not yet finished the current job.
    active: AtomicUsize,
    panicked: AtomicBool,
    shutdown: AtomicBool,
    sleeping: AtomicUsize,
    /// Set by [`Pool::rest`]: idle workers sleep now instead of spinning; cleared by a call.
    resting: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the thread holding `Pool::gate`, before the epoch store that
// publishes it, and read by workers only after observing that epoch and before they decrement
// `active`; the writer waits for `active == 0` before the next write.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

/// A fixed set of compute threads.
pub struct Pool {
    shared: Arc<Shared>,
    workers: usize,
    gate: Mutex<()>,
}

impl Pool {
    /// A pool of `threads` compute threads in all: the caller plus `threads - 1` workers.
    pub fn new(threads: usize) -> Pool {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: UnsafeCell::new(JobPtr(&noop as &Task<'static>)),
            n_tasks: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            sleeping: AtomicUsize::new(0),
            resting: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let workers = threads.max(1) - 1;
        for i in 0..workers {
            let s = shared.clone();
            std::thread::Builder::new()
                .name(format!("tandem-compute-{i}"))
                .spawn(move || worker(&s))
                .expect("spawning a compute thread");
        }
        Pool {
            shared,
            workers,
            gate: Mutex::new(()),
        }
    }

    /// Threads that run a call (the caller included).
    pub fn threads(&self) -> usize {
        self.workers + 1
    }

    /// The caller will not call for a while (it is about to wait on another process): idle
    /// workers go to sleep now rather than spin for the next call. The next call wakes them
    /// (a notification, microseconds).
    pub fn rest(&self) {
        self.shared.resting.store(true, Ordering::Relaxed);
    }

    /// Runs `f(0) .. f(n_tasks - 1)` across the pool and returns when all have finished.
    /// A panic in any task is re-raised here after every thread has left the call.
    pub fn run(&self, n_tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if n_tasks == 0 {
            return;
        }
        let guard = match self.gate.try_lock() {
            Ok(g) if self.workers > 0 && n_tasks > 1 => g,
            _ => {
                (0..n_tasks).for_each(f);
                return;
            }
        };
        let s = &*self.shared;
        // SAFETY: we hold the gate and the previous job has fully drained (`active == 0` was
        // awaited before the previous call returned), so no worker reads `job` now. The
        // lifetime is erased only for the duration of this call: we do not return (or unwind)
        // before every worker has decremented `active`, after which none touches `f` again.
        unsafe {
            *s.job.get() = JobPtr(
                std::mem::transmute::<*const Task<'_>, *const Task<'static>>(f as *const Task<'_>),
            );
        }
        s.n_tasks.store(n_tasks, Ordering::Relaxed);
        s.next.store(0, Ordering::Relaxed);
        s.active.store(self.workers, Ordering::Relaxed);
        s.resting.store(false, Ordering::Relaxed);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.sleeping.load(Ordering::SeqCst) > 0 {
            let _l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| drain(s, f)));
        let start = Instant::now();
        let mut spins = 0u32;
        while s.active.load(Ordering::Acquire) != 0 {
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(256) || start.elapsed() < SPIN {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        let worker_panicked = s.panicked.swap(false, Ordering::Relaxed);
        drop(guard);
        if let Err(p) = mine {
            resume_unwind(p);
        }
        if worker_panicked {
            panic!("a compute task panicked on a pool thread");
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        let _l = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.shared.wake.notify_all();
    }
}

fn noop(_: usize) {}

fn drain(s: &Shared, f: &Task<'_>) {
    let n = s.n_tasks.load(Ordering::Relaxed);
    loop {
        let t = s.next.fetch_add(1, Ordering::Relaxed);
        if t >= n {
            return;
        }
        f(t);
    }
}

fn worker(s: &Shared) {
    // Epoch 0 is "no job yet": a call made before this thread got going is still seen.
    let mut seen = 0;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            if s.shutdown.load(Ordering::Relaxed) {
                return;
            }
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            spins = spins.wrapping_add(1);
            let resting = s.resting.load(Ordering::Relaxed);
            if !resting && (!spins.is_multiple_of(256) || start.elapsed() < SPIN) {
                std::hint::spin_loop();
                continue;
            }
            let mut l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.sleeping.fetch_add(1, Ordering::SeqCst);
            while s.epoch.load(Ordering::SeqCst) == seen && !s.shutdown.load(Ordering::SeqCst) {
                l = s.wake.wait(l).unwrap_or_else(|e| e.into_inner());
            }
            s.sleeping.fetch_sub(1, Ordering::SeqCst);
        }
        // SAFETY: the epoch we observed (Acquire) was published after `job` was written, and
        // the caller keeps the closure alive until we decrement `active` below.
        let job = unsafe { *s.job.get() };
        let f: &Task<'_> = unsafe { &*job.0 };
        if catch_unwind(AssertUnwindSafe(|| drain(s, f))).is_err() {
            s.panicked.store(true, Ordering::Relaxed);
        }
        s.active.fetch_sub(1, Ordering::Release);
    }
}

/// A raw pointer that tasks may share because each touches a disjoint part of what it points to.
pub struct SendPtr<T>(pub *mut T);
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}
impl<T> SendPtr<T> {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper, not its field).
    pub fn get(self) -> *mut T {
        self.0
    }
}
// SAFETY: only used to hand disjoint sub-slices to tasks (see `for_rows`).
unsafe impl<T> Sync for SendPtr<T> {}
unsafe impl<T> Send for SendPtr<T> {}

/// Runs `f(i, row_i)` for every `row_len`-long row of `out` on the global pool, `per_task`
/// rows to a task (one task runs on the caller alone).
pub fn for_rows<T: Send>(
    out: &mut [T],
    row_len: usize,
    per_task: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    if row_len == 0 {
        return;
    }
    assert!(out.len().is_multiple_of(row_len));
    let n = out.len() / row_len;
    let per_task = per_task.max(1);
    let p = SendPtr(out.as_mut_ptr());
    global().run(n.div_ceil(per_task), &|t| {
        for i in t * per_task..((t + 1) * per_task).min(n) {
            // SAFETY: row i lies inside `out` and belongs to this task alone.
            let row = unsafe { std::slice::from_raw_parts_mut(p.get().add(i * row_len), row_len) };
            f(i, row);
        }
    });
}

static GLOBAL: OnceLock<Pool> = OnceLock::new();

/// Sizes the process's pool (call once, before the first kernel runs); returns the size in
/// effect, which is the earlier one if the pool already started.
pub fn init(threads: usize) -> usize {
    GLOBAL.get_or_init(|| Pool::new(threads)).threads()
}

/// The process's pool: sized by [`init`], or to the machine's cores on first use.
pub fn global() -> &'static Pool {
    GLOBAL.get_or_init(|| {
        Pool::new(
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        )
    })
}

/// [`Pool::rest`] on the process's pool, if it started (never starts it).
pub fn rest() {
    if let Some(p) = GLOBAL.get() {
        p.rest();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resting_workers_sleep_and_the_next_call_wakes_them() {
        let pool = Pool::new(3);
        let sum = AtomicUsize::new(0);
        for round in 0..50 {
            pool.run(6, &|t| {
                sum.fetch_add(t, Ordering::Relaxed);
            });
            pool.rest();
            if round % 10 == 0 {
                let t = Instant::now();
                while pool.shared.sleeping.load(Ordering::SeqCst) < 2 {
                    assert!(t.elapsed() < Duration::from_secs(5), "workers still awake");
                    std::thread::yield_now();
                }
            }
        }
        assert_eq!(sum.load(Ordering::Relaxed), 50 * 15);
    }

    #[test]
    fn every_task_runs_exactly_once() {
        let pool = Pool::new(3);
        for n in [1usize, 2, 3, 7, 64, 1000] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.run(n, &|t| {
                hits[t].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n={n}");
        }
    }

    #[test]
    fn for_rows_visits_each_row_once_with_its_index() {
        let mut v = vec![0usize; 7 * 5];
        for_rows(&mut v, 5, 2, |i, row| {
            row.iter_mut().for_each(|x| *x += i + 1)
        });
        for (i, row) in v.chunks(5).enumerate() {
            assert!(row.iter().all(|&x| x == i + 1));
        }
    }

    #[test]
    fn sleeping_workers_wake_for_the_next_call() {
        let pool = Pool::new(2);
        let sum = AtomicUsize::new(0);
        pool.run(4, &|t| {
            sum.fetch_add(t, Ordering::Relaxed);
        });
        std::thread::sleep(Duration::from_millis(20)); // past SPIN: the worker sleeps
        pool.run(4, &|t| {
            sum.fetch_add(t, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 12);
    }

    #[test]
    fn concurrent_callers_both_complete() {
        let pool = Arc::new(Pool::new(2));
        let total = Arc::new(AtomicUsize::new(0));
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let (p, t) = (pool.clone(), total.clone());
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        p.run(8, &|_| {
                            t.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(total.load(Ordering::Relaxed), 4 * 200 * 8);
    }

    #[test]
    fn a_panicking_task_is_reraised_and_the_pool_survives() {
        let pool = Pool::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(16, &|t| {
                if t == 9 {
                    panic!("task 9");
                }
            })
        }));
        assert!(r.is_err());
        let n = AtomicUsize::new(0);
        pool.run(16, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 16);
    }
}
