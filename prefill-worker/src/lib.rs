//! The prefill worker: computes prompts' KV caches straight into blocks a decode worker
//! reserved, and samples each prompt's first token (time to first token ends here).
//!
//! Jobs wait in a bounded queue (a full one refuses at once, [`SubmitError::QueueFull`], so the
//! scheduler can go elsewhere or answer 503). The loop takes every queued job that fits a
//! token budget and runs them as one batched forward pass. Where the KV goes depends on the
//! target ([`target`]): on the decode worker's host the pass writes into the decode worker's
//! shared pool in place (zero copies); from another host each layer's slabs stream over TCP
//! as soon as that layer is computed, while the later layers still run.
//!
//! A job whose client went away ([`CancellationToken`]) is dropped before it computes.
//!
//! # Layout
//! - this file: jobs, the queue and the batching loop;
//! - [`target`]: choosing the transport and writing or pushing the KV;
//! - [`service`]: the `tandem.v2.PrefillWorker` gRPC service and [`service::run`].

pub mod backlog;
pub mod service;
pub mod target;

use engine::generation::GenerationState;
use engine::request::{CancellationToken, GenerationParams, RequestId, WorkerError, WorkerEvent};
use engine::sampler::logprobs;
use engine::{Engine, EngineError, ForwardItem, LogitsWanted, TokenId};
use protocol::pb;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::thread::JoinHandle;
use target::{LayerSum, Prepared, Targets, Transport};
use tokio::sync::oneshot;

/// A prompt to prefill into a decode worker's blocks.
pub struct PrefillJob {
    pub id: RequestId,
    pub prompt: Vec<TokenId>,
    /// Tokens already streamed (a re-prefill after a decode worker failed): their KV is
    /// computed too, except the last one's, and nothing new is sampled.
    pub generated: Vec<TokenId>,
    pub params: GenerationParams,
    pub target: pb::KvTarget,
    /// A forced transport, or `None` to pick one.
    pub transport: Option<Transport>,
    pub cancel: CancellationToken,
    pub reply: oneshot::Sender<Result<PrefillOutcome, WorkerError>>,
    /// The call's `prefill` span: the job's `kv.transfer` span goes under it.
    pub span: tracing::Span,
    /// The HTTP request's `x-request-id`, for the spans and log lines of the job.
    pub request_id: String,
}

impl PrefillJob {
    /// How many tokens [`tokens`](Self::tokens) holds.
    pub fn n_tokens(&self) -> usize {
        self.prompt.len() + self.generated.len().saturating_sub(1)
    }

    /// Every token whose KV this job produces.
    pub fn tokens(&self) -> Vec<TokenId> {
        let mut t = self.prompt.clone();
        if let Some((_, head)) = self.generated.split_last() {
            t.extend_from_slice(head);
        }
        t
    }
}

/// What a finished prefill reports.
#[derive(Debug)]
pub struct PrefillOutcome {
    /// For the client, in order: prefilled, prompt log-probabilities, the first token, done.
    pub events: Vec<WorkerEvent>,
    /// Over the written slabs, `(layer, block)` order (see `kv_store::Checksum`).
    pub checksum: u64,
    /// Positions the target blocks now hold.
    pub filled: usize,
    pub transport: Transport,
}

/// Why a job was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the prefill queue is full")]
    QueueFull,
    #[error("the prefill worker has stopped")]
    Stopped,
}

/// How the loop batches.
#[derive(Debug, Clone)]
pub struct PrefillConfig {
    /// Prompt tokens per forward pass at most (a longer prompt runs alone).
    pub max_batch_tokens: usize,
    /// Jobs waiting at most; beyond it, [`SubmitError::QueueFull`].
    pub max_waiting: usize,
    /// The cluster secret: authenticates the planes and verifies grants; `None`: a
    /// loopback-only cluster.
    pub secret: Option<protocol::auth::ClusterSecret>,
    /// The page through which this worker tells a decode worker on the same host that it is
    /// computing, so that it paces its steps and leaves cores free (`protocol::cores`).
    pub arbiter: Option<Arc<protocol::cores::CoreArbiter>>,
    /// The pooled KV store (`tandem kv-store`): before a prompt computes in this worker's own
    /// pool (KV going to a decode worker over TCP), the prefix the store holds beyond the
    /// pool's prefix cache is fetched instead of computed.
    pub store: Option<kv_store::store::client::StoreClient>,
}

/// Default of [`PrefillConfig::max_batch_tokens`]. A pass's prompts all get their first token
/// when it ends, so batching delays the first prompt by the others; on a CPU a pass of a few
/// hundred tokens already pays its fixed cost (the weights read once), so batching beyond that
/// gains little throughput for the delay it adds (a ~1,000-token prompt runs about alone).
pub const DEFAULT_MAX_BATCH_TOKENS: usize = 1024;
/// Default of [`PrefillConfig::max_waiting`].
pub const DEFAULT_MAX_WAITING: usize = 64;

impl Default for PrefillConfig {
    fn default() -> Self {
        PrefillConfig {
            max_batch_tokens: DEFAULT_MAX_BATCH_TOKENS,
            max_waiting: DEFAULT_MAX_WAITING,
            secret: None,
            arbiter: None,
            store: None,
        }
    }
}

/// Submits jobs to a running prefill loop. The loop stops when every handle is dropped.
#[derive(Clone)]
pub struct PrefillHandle {
    tx: SyncSender<PrefillJob>,
    /// Jobs submitted and not yet picked up.
    queued: Arc<AtomicUsize>,
    /// Their tokens, and the measured rate.
    backlog: Arc<backlog::Backlog>,
}

impl PrefillHandle {
    pub fn submit(&self, job: PrefillJob) -> Result<(), SubmitError> {
        let tokens = job.n_tokens();
        self.queued.fetch_add(1, Ordering::AcqRel);
        self.backlog.add(tokens);
        let r = self.tx.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => SubmitError::QueueFull,
            TrySendError::Disconnected(_) => SubmitError::Stopped,
        });
        if r.is_err() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            self.backlog.take(tokens);
        }
        metrics::gauge!("tandem_prefill_queue_depth").set(self.queued() as f64);
        r
    }

    /// Jobs waiting to start.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Their tokens.
    pub fn queued_tokens(&self) -> usize {
        self.backlog.tokens()
    }
}

/// Starts the prefill loop on its own thread.
pub fn spawn(engine: Arc<Engine>, cfg: PrefillConfig) -> (PrefillHandle, JoinHandle<()>) {
    let (tx, rx) = sync_channel(cfg.max_waiting);
    let queued = Arc::new(AtomicUsize::new(0));
    let backlog = Arc::new(backlog::Backlog::default());
    let (q, b) = (queued.clone(), backlog.clone());
    let th = std::thread::Builder::new()
        .name("tandem-prefill".into())
        .spawn(move || Loop::new(engine, cfg, q, b).run(rx))
        .expect("spawn prefill thread");
    (
        PrefillHandle {
            tx,
            queued,
            backlog,
        },
        th,
    )
}

struct Loop {
    engine: Arc<Engine>,
    cfg: PrefillConfig,
    queued: Arc<AtomicUsize>,
    backlog: Arc<backlog::Backlog>,
    targets: Targets,
}

impl Loop {
    fn new(
        engine: Arc<Engine>,
        cfg: PrefillConfig,
        queued: Arc<AtomicUsize>,
        backlog: Arc<backlog::Backlog>,
    ) -> Loop {
        let targets = Targets::new(engine.clone(), cfg.secret.clone());
        Loop {
            engine,
            cfg,
            queued,
            backlog,
            targets,
        }
    }

    fn run(mut self, rx: Receiver<PrefillJob>) {
        let mut held: Option<PrefillJob> = None;
        loop {
            let first = match held.take() {
                Some(j) => j,
                None => match rx.recv() {
                    Ok(j) => j,
                    Err(_) => return,
                },
            };
            let mut tokens = first.n_tokens();
            let mut batch = vec![first];
            while tokens < self.cfg.max_batch_tokens {
                match rx.try_recv() {
                    Ok(j) => {
                        let n = j.n_tokens();
                        if tokens + n > self.cfg.max_batch_tokens {
                            held = Some(j);
                            break;
                        }
                        tokens += n;
                        batch.push(j);
                    }
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            // The held job was counted out of the queue too: it is the next batch's head.
            let taken = batch.len() + usize::from(held.is_some());
            let left = self.queued.fetch_sub(taken, Ordering::AcqRel) - taken;
            let held_tokens = held.as_ref().map_or(0, PrefillJob::n_tokens);
            self.backlog.take(tokens + held_tokens);
            metrics::gauge!("tandem_prefill_queue_depth").set(left as f64);
            self.run_batch(batch);
            if held.is_some() {
                self.queued.fetch_add(1, Ordering::AcqRel);
                self.backlog.add(held_tokens);
            }
        }
    }

    /// One forward pass over every live job of the batch.
    fn run_batch(&mut self, batch: Vec<PrefillJob>) {
        let mut live = Vec::new();
        // Each job's KV on its way to the decode worker: from here to the sealed transfer
        // (over TCP, layer by layer beside the pass; in place, the pass itself).
        let mut transfers = Vec::new();
        let block_bytes = self.engine.kv.layout().block_bytes();
        for job in batch {
            if job.cancel.is_cancelled() || job.reply.is_closed() {
                continue;
            }
            match self.targets.prepare(&job) {
                Ok(p) => {
                    transfers.push(tracing::info_span!(parent: &job.span, "kv.transfer",
                        x_request_id = %job.request_id,
                        tandem.kv.transport = p.transport().name(),
                        tandem.kv.bytes = (p.written_blocks() * block_bytes) as i64,
                        tandem.kv.blocks = p.written_blocks() as i64,
                    ));
                    live.push((job.tokens(), job, p));
                }
                Err(e) => {
                    let _ = job.reply.send(Err(e));
                }
            }
        }
        if live.is_empty() {
            return;
        }
        let _computing = self.cfg.arbiter.as_ref().map(|a| a.computing());
        let started = std::time::Instant::now();
        let want: Vec<LogitsWanted> = live.iter().map(|(_, j, _)| logits_wanted(j)).collect();
        let inputs: Vec<Vec<TokenId>> = live.iter().map(|(t, _, p)| p.inputs(t).to_vec()).collect();
        let mut sums: Vec<LayerSum> = live.iter().map(|(_, _, p)| p.layer_sum()).collect();
        let mut items: Vec<ForwardItem<'_>> = live
            .iter_mut()
            .zip(&inputs)
            .zip(&want)
            .map(|(((_, _, p), toks), w)| ForwardItem {
                seq: &mut p.seq,
                tokens: toks,
                logits: *w,
            })
            .collect();
        let result = self
            .engine
            .model
            .forward_with(&mut items, &mut |layer, items| {
                for (sum, it) in sums.iter_mut().zip(items) {
                    sum.layer_done(layer, it.seq);
                }
            });
        drop(items);
        let tokens: usize = inputs.iter().map(Vec::len).sum();
        let secs = started.elapsed().as_secs_f64();
        metrics::histogram!("tandem_prefill_batch_seconds").record(secs);
        self.backlog.measured(tokens, secs);
        metrics::counter!("tandem_prefill_tokens_total").increment(tokens as u64);
        match result {
            Ok(logits) => {
                let jobs = live.into_iter().zip(logits).zip(sums).zip(transfers);
                for ((((tokens, job, prep), l), sum), transfer) in jobs {
                    let out = self.finish(&tokens, &job, prep, sum, &l);
                    drop(transfer);
                    let _ = job.reply.send(out);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "prefill forward pass failed");
                // The hooks' senders first: a sender thread ends when its channel closes.
                drop(sums);
                for (_, job, prep) in live {
                    drop(prep);
                    let _ = job.reply.send(Err(engine_error(&e)));
                }
            }
        }
    }

    /// The job's KV is complete: seal the transfer, sample the first token.
    fn finish(
        &self,
        tokens: &[TokenId],
        job: &PrefillJob,
        mut prep: Prepared,
        sum: LayerSum,
        logits: &[f32],
    ) -> Result<PrefillOutcome, WorkerError> {
        if job.params.prompt_logprobs.is_none() && prep.local() {
            // This worker's own prefix cache (TCP transfers compute into the local pool).
            prep.seq.publish_prefix(&job.prompt);
        }
        let sealed = prep.finish(sum)?;
        let mut events = Vec::new();
        if job.generated.is_empty() {
            let p = &job.params;
            let vocab = self.engine.model.config().vocab_size;
            let last = if let Some(n) = p.prompt_logprobs {
                // Every prompt position was computed (no prefix cache): row i predicts i + 1.
                let lps = (1..tokens.len())
                    .map(|i| logprobs(&logits[(i - 1) * vocab..i * vocab], tokens[i], n))
                    .collect();
                events.push(WorkerEvent::PromptLogprobs(lps));
                &logits[(tokens.len() - 1) * vocab..]
            } else {
                events.push(WorkerEvent::Prefilled {
                    cached_tokens: sealed.cached,
                });
                logits
            };
            if p.max_tokens == 0 {
                events.push(WorkerEvent::Done);
            } else {
                let mut state = GenerationState::new(p.clone(), job.prompt.len());
                let ev = state
                    .next(&self.engine.frontend, last, self.engine.max_context())
                    .map_err(|e| WorkerError::Internal(e.to_string()))?;
                events.push(WorkerEvent::Token(ev));
            }
        }
        Ok(PrefillOutcome {
            events,
            checksum: sealed.checksum,
            filled: tokens.len(),
            transport: sealed.transport,
        })
    }
}

/// Logits a job needs: every prompt position's for prompt log-probabilities, the last one's
/// to sample a first token, none for a re-prefill.
fn logits_wanted(job: &PrefillJob) -> LogitsWanted {
    if !job.generated.is_empty() {
        LogitsWanted::None
    } else if job.params.prompt_logprobs.is_some() {
        LogitsWanted::All
    } else {
        LogitsWanted::Last
    }
}

/// An engine error as a worker error: running out of KV memory is overload, the rest internal.
pub(crate) fn engine_error(e: &EngineError) -> WorkerError {
    match e {
        EngineError::KvExhausted { .. } => WorkerError::Overloaded(e.to_string()),
        other => WorkerError::Internal(other.to_string()),
    }
}
