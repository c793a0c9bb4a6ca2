//! The decode worker: a continuous-batching loop over a paged KV pool.
//!
//! Sequences arrive two ways: as new requests whose prompts this worker prefills itself
//! (colocated serving, and the short prompts of conditional disaggregation), or as
//! [`DecodeJob`]s whose prompts a prefill worker already put in the KV cache. Every step is one
//! forward call over the running batch: one token for each decoding sequence plus prefill
//! chunks of the waiting prompts, up to a per-step token budget
//! ([`WorkerConfig::max_batch_tokens`]), so a long prompt never stalls running streams for its
//! whole prefill. Sequences join and leave at any step.
//!
//! Memory: when the pool cannot give a sequence its next block, the newest running sequence is
//! preempted — its blocks are freed and it goes back to the front of the queue, to be
//! recomputed (prompt plus the tokens it already produced, which seeded sampling makes
//! identical) when memory frees up. A sequence that cannot fit even alone ends with an
//! explicit `Overloaded` error; new requests beyond the bounded queue are refused at once
//! ([`SubmitError::QueueFull`]). Nothing grows without bound and nothing waits forever.
//!
//! A sequence leaves when it finishes, or when its client goes away (its event channel closes
//! or its [`CancellationToken`] is set); its blocks return to the pool at once.
//!
//! # Layout
//! - this file: the batch loop;
//! - [`plan`]: the step planner's decisions (admission, each sequence's work) as pure functions;
//! - [`colocated`]: this worker behind the scheduler's seam, in the scheduler's process;
//! - [`service`]: the `tandem.v2.DecodeWorker` gRPC service (leases of blocks for prefill
//!   workers, commits, token streams) and [`service::serve`], a whole decode worker process;
//! - [`store`]: prefixes fetched from the pooled KV store, cached blocks written back to it.

pub mod colocated;
pub mod leases;
mod pace;
pub mod plan;
pub mod service;
pub mod store;

use engine::generation::GenerationState;
use engine::request::{CancellationToken, GenerationParams, RequestId, WorkerError, WorkerEvent};
use engine::sampler::{TokenLogprobs, logprobs};
use engine::{Engine, ForwardItem, KvSequence, LogitsWanted, TokenId};
use plan::{SeqState, Work};
use protocol::cores::Pacer;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvError, RecvTimeoutError, Sender, TryRecvError, channel};
use std::thread::JoinHandle;
use tokio::sync::mpsc::UnboundedSender;

/// A prompt to generate from.
pub struct NewRequest {
    pub id: RequestId,
    pub prompt: Vec<TokenId>,
    /// Tokens already produced for this request elsewhere (a resumed stream after a worker
    /// failed; usually empty): they are recomputed into the cache like a preempted sequence's,
    /// and generation continues after them without reporting the prompt again.
    pub generated: Vec<TokenId>,
    pub params: GenerationParams,
    pub events: UnboundedSender<WorkerEvent>,
    pub cancel: CancellationToken,
}

/// A sequence handed to the decode phase: its filled KV cache and where generation stands.
pub struct DecodeJob {
    pub id: RequestId,
    pub seq: KvSequence,
    pub state: GenerationState,
    /// The prompt (kept so that a preempted sequence can be recomputed).
    pub prompt: Vec<TokenId>,
    /// Tokens generated so far; the last one is not yet in the KV cache.
    pub generated: Vec<TokenId>,
    pub events: UnboundedSender<WorkerEvent>,
    pub cancel: CancellationToken,
}

/// Why a request was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the request queue is full")]
    QueueFull,
    #[error("the worker has stopped")]
    Stopped,
}

/// Default of [`WorkerConfig::max_batch_tokens`] (vLLM's `--max-num-batched-tokens`).
pub const DEFAULT_MAX_BATCH_TOKENS: usize = 256;
/// Default of [`WorkerConfig::max_running`] (vLLM's `--max-num-seqs`).
pub const DEFAULT_MAX_RUNNING: usize = 64;
/// Default of [`WorkerConfig::max_waiting`].
pub const DEFAULT_MAX_WAITING: usize = 256;

/// How a worker batches.
#[derive(Debug, Clone, Copy)]
pub struct WorkerConfig {
    /// Tokens per forward call: decode tokens first, prefill chunks fill the rest.
    pub max_batch_tokens: usize,
    /// Sequences in the running batch at most.
    pub max_running: usize,
    /// New requests waiting to start at most; beyond it, [`SubmitError::QueueFull`].
    pub max_waiting: usize,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            max_batch_tokens: DEFAULT_MAX_BATCH_TOKENS,
            max_running: DEFAULT_MAX_RUNNING,
            max_waiting: DEFAULT_MAX_WAITING,
        }
    }
}

enum Incoming {
    Request(NewRequest),
    Prefilled(DecodeJob),
}

/// What a worker reports about its load (the scheduler routes on it; `/metrics` shows it).
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Requests submitted and not yet admitted to the batch.
    pub waiting: AtomicUsize,
    /// Sequences in the running batch.
    pub running: AtomicUsize,
    /// Sequences preempted for recompute so far.
    pub preemptions: AtomicUsize,
    /// Positions the running sequences hold.
    pub context: AtomicUsize,
    /// Prompt (and recompute) tokens still to prefill, waiting and running sequences'.
    pub prefill_tokens: AtomicUsize,
}

/// Submits work to a running worker. Cloneable; the worker stops when every handle is dropped
/// and its batch has drained.
#[derive(Clone)]
pub struct DecodeHandle {
    tx: Sender<Incoming>,
    stats: Arc<WorkerStats>,
    max_waiting: usize,
    max_batch_tokens: usize,
    pace: Option<std::time::Duration>,
}

impl DecodeHandle {
    /// Queues a new request (this worker prefills it), or refuses it when the queue is full.
    pub fn submit_request(&self, r: NewRequest) -> Result<(), SubmitError> {
        let waiting = &self.stats.waiting;
        let before = waiting.fetch_add(1, Ordering::AcqRel);
        if before >= self.max_waiting {
            waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(SubmitError::QueueFull);
        }
        metrics::gauge!("tandem_prefill_queue_depth").set((before + 1) as f64);
        self.tx.send(Incoming::Request(r)).map_err(|_| {
            waiting.fetch_sub(1, Ordering::AcqRel);
            SubmitError::Stopped
        })
    }

    /// The worker's load right now.
    pub fn stats(&self) -> &WorkerStats {
        &self.stats
    }

    /// Tokens per forward step.
    pub fn max_batch_tokens(&self) -> usize {
        self.max_batch_tokens
    }

    /// The step period it paces to while a prefill worker on its cores computes.
    pub fn pace(&self) -> Option<std::time::Duration> {
        self.pace
    }

    /// Hands over a prefilled sequence; if the worker has stopped the job comes back.
    pub fn submit(&self, job: DecodeJob) -> Result<(), Box<DecodeJob>> {
        self.tx
            .send(Incoming::Prefilled(job))
            .map_err(|e| match e.0 {
                Incoming::Prefilled(j) => Box::new(j),
                Incoming::Request(_) => unreachable!("sent a prefilled job"),
            })
    }
}

/// Starts a worker on its own thread.
pub fn spawn(engine: Arc<Engine>, cfg: WorkerConfig) -> (DecodeHandle, JoinHandle<()>) {
    spawn_paced(engine, cfg, None)
}

/// Starts a worker that shares its cores with a prefill worker on this host: while that one
/// computes, each step carries its decode tokens and only the prompt chunks that fit its share
/// of the pacer's period, and is followed by a rest to the period (`protocol::cores`).
pub fn spawn_paced(
    engine: Arc<Engine>,
    cfg: WorkerConfig,
    pacer: Option<Pacer>,
) -> (DecodeHandle, JoinHandle<()>) {
    let (tx, rx) = channel();
    let stats = Arc::new(WorkerStats::default());
    let st = stats.clone();
    let pace = pacer.as_ref().map(Pacer::period);
    let th = std::thread::Builder::new()
        .name("tandem-decode".into())
        .spawn(move || Worker::new(engine, cfg, st, pacer).run(rx))
        .expect("spawn decode thread");
    (
        DecodeHandle {
            tx,
            stats,
            max_waiting: cfg.max_waiting,
            max_batch_tokens: cfg.max_batch_tokens,
            pace,
        },
        th,
    )
}

/// One sequence in the worker.
struct Seq {
    prompt: Vec<TokenId>,
    generated: Vec<TokenId>,
    state: GenerationState,
    kv: KvSequence,
    events: UnboundedSender<WorkerEvent>,
    cancel: CancellationToken,
    /// Admission order: lower is older (and keeps its memory longer).
    arrival: u64,
    /// The first token has been produced (prefill reported); later prefills are recomputes.
    started: bool,
    /// When it was (or when the sequence came here with it): the pace's credit counts from it.
    first_at: Option<std::time::Instant>,
    /// When it came here: how long its prompt has waited (`protocol::cores::holds`).
    queued_at: std::time::Instant,
    /// Prompt tokens found in the prefix cache at the first prefill.
    cached: usize,
    prompt_lps: Vec<TokenLogprobs>,
    /// Counted in the waiting gauge until admitted.
    counted: bool,
}

impl Seq {
    fn gone(&self) -> bool {
        self.cancel.is_cancelled() || self.events.is_closed()
    }

    /// Tokens whose K/V must be in the cache before the next decode step.
    fn target_len(&self) -> usize {
        self.prompt.len() + self.generated.len().saturating_sub(1)
    }

    fn target_token(&self, i: usize) -> TokenId {
        if i < self.prompt.len() {
            self.prompt[i]
        } else {
            self.generated[i - self.prompt.len()]
        }
    }

    fn decoding(&self) -> bool {
        self.started && self.kv.len() == self.target_len()
    }

    fn fail(&self, e: WorkerError) {
        let _ = self.events.send(WorkerEvent::Error(e));
    }
}

struct Worker {
    engine: Arc<Engine>,
    cfg: WorkerConfig,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    stats: Arc<WorkerStats>,
    next_arrival: u64,
    pacer: Option<Pacer>,
}

impl Worker {
    fn new(
        engine: Arc<Engine>,
        cfg: WorkerConfig,
        stats: Arc<WorkerStats>,
        pacer: Option<Pacer>,
    ) -> Worker {
        Worker {
            engine,
            cfg,
            pacer,
            waiting: VecDeque::new(),
            running: Vec::new(),
            stats,
            next_arrival: 0,
        }
    }

    fn run(mut self, rx: Receiver<Incoming>) {
        let mut open = true;
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                if !open {
                    return;
                }
                match rx.recv() {
                    Ok(m) => self.accept(m),
                    Err(RecvError) => return,
                }
            }
            while open {
                match rx.try_recv() {
                    Ok(m) => self.accept(m),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => open = false,
                }
            }
            if !self.step() && open {
                // Nothing could run (waiting for memory lent outside the batch): wait for news
                // instead of spinning.
                match rx.recv_timeout(std::time::Duration::from_millis(2)) {
                    Ok(m) => self.accept(m),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => open = false,
                }
            }
        }
    }

    fn accept(&mut self, m: Incoming) {
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        let seq = match m {
            Incoming::Request(r) => {
                let state = GenerationState::resume(r.params, r.prompt.len(), &r.generated);
                let started = !r.generated.is_empty();
                Seq {
                    started,
                    first_at: started.then(std::time::Instant::now),
                    queued_at: std::time::Instant::now(),
                    prompt: r.prompt,
                    generated: r.generated,
                    state,
                    kv: self.engine.new_sequence(),
                    events: r.events,
                    cancel: r.cancel,
                    arrival,
                    cached: 0,
                    prompt_lps: Vec::new(),
                    counted: true,
                }
            }
            Incoming::Prefilled(j) => Seq {
                prompt: j.prompt,
                generated: j.generated,
                state: j.state,
                kv: j.seq,
                events: j.events,
                cancel: j.cancel,
                arrival,
                started: true,
                first_at: Some(std::time::Instant::now()),
                queued_at: std::time::Instant::now(),
                cached: 0,
                prompt_lps: Vec::new(),
                counted: false,
            },
        };
        if seq.started {
            // Already prefilled: straight into the batch (its blocks are already held).
            self.running.push(seq);
        } else {
            if let Some(p) = self.pacer.as_mut() {
                let work = p.cost().chunk(0, seq.target_len());
                p.arrived(work);
            }
            self.waiting.push_back(seq);
        }
    }

    fn uncount(&self, s: &mut Seq) {
        if s.counted {
            s.counted = false;
            let left = self.stats.waiting.fetch_sub(1, Ordering::AcqRel) - 1;
            metrics::gauge!("tandem_prefill_queue_depth").set(left as f64);
        }
    }

    /// Admits waiting sequences while there is room in the batch and in memory.
    fn admit(&mut self) {
        let bs = self.engine.kv.layout().block_size;
        while self.running.len() < self.cfg.max_running {
            let Some(s) = self.waiting.front() else { break };
            // Room for the first chunk plus one block of headroom per running sequence.
            let first = s.target_len().min(self.cfg.max_batch_tokens).div_ceil(bs);
            if !plan::admits(self.running.len(), self.engine.kv.free_blocks(), first) {
                break;
            }
            let mut s = self.waiting.pop_front().expect("front exists");
            self.uncount(&mut s);
            if s.kv.is_empty() && (s.started || s.state.params.prompt_logprobs.is_none()) {
                let target: Vec<TokenId> = (0..s.target_len()).map(|i| s.target_token(i)).collect();
                let hit = s.kv.attach_prefix(&target);
                if !s.started {
                    s.cached = hit;
                }
            }
            self.running.push(s);
        }
    }

    /// Frees the newest running sequence other than `keep` that is newer than it; returns
    /// whether one was preempted.
    fn preempt_newer_than(&mut self, keep: usize) -> bool {
        let arrival = self.running[keep].arrival;
        let victim = self
            .running
            .iter()
            .enumerate()
            .filter(|(i, s)| *i != keep && s.arrival > arrival)
            .max_by_key(|(_, s)| s.arrival)
            .map(|(i, _)| i);
        match victim {
            Some(v) => {
                self.preempt(v);
                true
            }
            None => false,
        }
    }

    fn preempt(&mut self, i: usize) {
        let mut s = self.running.swap_remove(i);
        s.kv = self.engine.new_sequence(); // frees every block it held
        metrics::counter!("tandem_preemptions_total").increment(1);
        self.stats.preemptions.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(arrival = s.arrival, "preempted a sequence for recompute");
        // Re-admission keeps arrival order among the preempted.
        let at = self
            .waiting
            .iter()
            .position(|w| w.counted || w.arrival > s.arrival)
            .unwrap_or(self.waiting.len());
        self.waiting.insert(at, s);
    }

    /// One step; returns whether anything ran.
    fn step(&mut self) -> bool {
        // Clients that went away free their blocks (and queue places) first.
        self.running.retain(|s| !s.gone());
        let gone: Vec<usize> = (0..self.waiting.len())
            .filter(|&i| self.waiting[i].gone())
            .collect();
        for i in gone.into_iter().rev() {
            let mut s = self.waiting.remove(i).expect("index in range");
            self.uncount(&mut s);
        }
        self.admit();
        let plan = self.plan();
        metrics::gauge!("tandem_decode_running_sequences").set(self.running.len() as f64);
        self.stats
            .running
            .store(self.running.len(), Ordering::Relaxed);
        let kv = &self.engine.kv;
        metrics::gauge!("tandem_kv_blocks_total").set(kv.n_blocks() as f64);
        metrics::gauge!("tandem_kv_blocks_free").set(kv.free_blocks() as f64);
        metrics::gauge!("tandem_kv_blocks_cached_unused").set(kv.cached_blocks() as f64);
        // Held by sequences (cached blocks nobody holds count as free): what the decode pool's
        // autoscaler reads, as vLLM's kv_cache_usage_perc.
        metrics::gauge!("tandem_kv_cache_usage_ratio")
            .set(1.0 - kv.free_blocks() as f64 / kv.n_blocks().max(1) as f64);
        self.publish_load();
        if plan.is_empty() {
            return false;
        }
        let started = std::time::Instant::now();
        let timed = self.timed(&plan);
        self.execute(plan);
        // Sequences that finished (or lost their client) in this step are gone now: an idle
        // worker must not keep reporting them.
        self.stats
            .running
            .store(self.running.len(), Ordering::Relaxed);
        metrics::gauge!("tandem_decode_running_sequences").set(self.running.len() as f64);
        self.publish_load();
        if let Some(t) = timed {
            self.rest_after(t, started);
        }
        true
    }

    /// Chooses this step's work and reserves its memory, preempting when needed: one token for
    /// every decoding sequence, then prefill chunks, oldest first, until the budget is spent.
    fn plan(&mut self) -> Vec<(usize, Work)> {
        // Sorted oldest first: the oldest keep their memory, the newest give theirs up.
        self.running.sort_by_key(|s| s.arrival);
        let mut i = 0;
        while i < self.running.len() {
            let s = &self.running[i];
            if !s.decoding() {
                i += 1;
                continue;
            }
            let need = s.kv.len() + 1;
            if self.reserve_or_preempt(i, need) {
                i += 1;
            }
        }
        let budget = self.step_budget();
        let mut left = budget;
        for _ in self.running.iter().filter(|s| s.decoding()) {
            left.take_decode();
        }
        let mut i = 0;
        while i < self.running.len() && left.tokens > 0 {
            let s = &self.running[i];
            if s.decoding() {
                i += 1;
                continue;
            }
            let (have, target) = (s.kv.len(), s.target_len());
            let to = left.chunk_end(have, target);
            if self.reserve_or_preempt(i, to) {
                left.take_chunk(have, to);
                i += 1;
            }
        }
        // The final plan, by state (preemption may have removed planned sequences).
        let states: Vec<SeqState> = self
            .running
            .iter()
            .map(|s| SeqState {
                decoding: s.decoding(),
                have: s.kv.len(),
                target: s.target_len(),
                capacity: s.kv.capacity(),
            })
            .collect();
        plan::compose(&states, budget)
    }

    /// Makes room for sequence `i` (in the arrival-sorted batch) to hold `total` positions.
    /// Newer sequences are preempted first; with none newer, `i` itself goes back to the queue,
    /// or fails when it is alone (it cannot fit at all). Returns whether `i` still runs.
    fn reserve_or_preempt(&mut self, i: usize, total: usize) -> bool {
        loop {
            let err = match self.running[i].kv.reserve(total) {
                Ok(()) => return true,
                Err(e) => e,
            };
            if self.preempt_newer_than(i) {
                // The victim sat after `i`; restore the order for the indices that follow.
                self.running.sort_by_key(|s| s.arrival);
                continue;
            }
            let bs = self.engine.kv.layout().block_size;
            if self.running.len() == 1 && total.div_ceil(bs) > self.engine.kv.n_blocks() {
                let s = self.running.remove(i);
                s.fail(WorkerError::Overloaded(format!(
                    "the sequence needs {total} KV positions, more than the pool can hold: {err}"
                )));
            } else {
                // Alone, it would fit the pool: the blocks are lent outside the batch (leases
                // for prefill workers) and come back when those commit or expire.
                self.preempt(i);
                self.running.sort_by_key(|s| s.arrival);
            }
            return false;
        }
    }

    fn execute(&mut self, plan: Vec<(usize, Work)>) {
        let engine = self.engine.clone();
        let vocab = engine.model.config().vocab_size;
        // Inputs and logits wanted per item.
        let mut inputs: Vec<(Vec<TokenId>, LogitsWanted)> = Vec::with_capacity(plan.len());
        for (i, w) in &plan {
            let s = &self.running[*i];
            inputs.push(match *w {
                Work::Decode => (
                    vec![*s.generated.last().expect("a decoding sequence has a token")],
                    LogitsWanted::Last,
                ),
                Work::Chunk { from, to } => {
                    let toks = (from..to).map(|t| s.target_token(t)).collect();
                    let want = if s.started {
                        LogitsWanted::None
                    } else if s.state.params.prompt_logprobs.is_some() {
                        LogitsWanted::All
                    } else if to == s.target_len() {
                        LogitsWanted::Last
                    } else {
                        LogitsWanted::None
                    };
                    (toks, want)
                }
            });
        }
        // Disjoint mutable borrows of the planned sequences, in plan order.
        let mut slots: Vec<Option<&mut Seq>> = self.running.iter_mut().map(Some).collect();
        let mut items: Vec<ForwardItem<'_>> = Vec::with_capacity(plan.len());
        // Constrained sequences that sample from this step's logits: their token masks are
        // computed alongside the forward pass (`with_masks_ahead`).
        let mut ahead: Vec<&mut GenerationState> = Vec::new();
        for ((i, w), (toks, want)) in plan.iter().zip(&inputs) {
            let s = slots[*i].take().expect("each sequence planned once");
            let samples = match w {
                Work::Decode => true,
                Work::Chunk { to, .. } => !s.started && *to == s.target_len(),
            };
            let Seq { kv, state, .. } = s;
            if samples && state.is_constrained() {
                ahead.push(state);
            }
            items.push(ForwardItem {
                seq: kv,
                tokens: toks,
                logits: *want,
            });
        }
        let result = engine::generation::with_masks_ahead(&engine.frontend, ahead, || {
            engine.model.forward(&mut items)
        });
        drop(items);
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "forward step failed");
                let mut failed: Vec<usize> = plan.iter().map(|(i, _)| *i).collect();
                failed.sort_unstable_by(|a, b| b.cmp(a));
                for i in failed {
                    let s = self.running.remove(i);
                    s.fail(WorkerError::Internal(e.to_string()));
                }
                return;
            }
        };
        let max_ctx = engine.max_context();
        let mut finished = vec![false; self.running.len()];
        for (((i, w), (_, want)), l) in plan.iter().zip(&inputs).zip(&logits) {
            let s = &mut self.running[*i];
            let row = match (w, want) {
                (Work::Decode, _) => &l[..],
                (Work::Chunk { from, to }, LogitsWanted::All) => {
                    // Prompt log-probabilities: row r predicts target token from + r + 1.
                    let n = s.state.params.prompt_logprobs.unwrap_or(0);
                    for t in (*from + 1)..(*to + 1).min(s.prompt.len()) {
                        let r = t - 1 - from;
                        s.prompt_lps
                            .push(logprobs(&l[r * vocab..(r + 1) * vocab], s.prompt[t], n));
                    }
                    if *to < s.target_len() {
                        continue;
                    }
                    &l[(to - from - 1) * vocab..]
                }
                (Work::Chunk { .. }, LogitsWanted::Last) => &l[..],
                (Work::Chunk { .. }, _) => continue,
            };
            if !s.started {
                // The prompt is complete: report it, then sample the first token.
                s.started = true;
                s.first_at = Some(std::time::Instant::now());
                if s.state.params.prompt_logprobs.is_none() {
                    s.kv.publish_prefix(&s.prompt);
                    let _ = s.events.send(WorkerEvent::Prefilled {
                        cached_tokens: s.cached,
                    });
                } else {
                    let lps = std::mem::take(&mut s.prompt_lps);
                    let _ = s.events.send(WorkerEvent::PromptLogprobs(lps));
                }
                if s.state.params.max_tokens == 0 {
                    let _ = s.events.send(WorkerEvent::Done);
                    finished[*i] = true;
                    continue;
                }
            }
            let ev = match s.state.next(&engine.frontend, row, max_ctx) {
                Ok(ev) => ev,
                Err(e) => {
                    let _ = s
                        .events
                        .send(WorkerEvent::Error(WorkerError::Internal(e.to_string())));
                    finished[*i] = true;
                    continue;
                }
            };
            s.generated.push(ev.token);
            let done = ev.finish.is_some();
            if s.events.send(WorkerEvent::Token(ev)).is_err() || done {
                finished[*i] = true;
            }
        }
        let mut it = finished.into_iter();
        self.running
            .retain(|_| !it.next().expect("one flag per sequence"));
    }
}
