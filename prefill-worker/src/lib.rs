//! The prefill worker: runs a prompt through the model, filling a sequence's KV blocks,
//! samples the first token (time to first token ends here), reports prompt log-probabilities
//! when asked, and hands the sequence to a decode worker.
//!
//! Jobs wait in a bounded queue; a full queue refuses new work at once ([`SubmitError::QueueFull`])
//! so the scheduler can answer 503 instead of letting latency grow without bound.
//! Full blocks of a prompt's prefix that an earlier prompt already computed are reused from
//! the pool's prefix cache. Chunked prefill and the layer-by-layer KV push to a remote decode worker
//! grow here (issues 5 and 6).

use decode_worker::{DecodeHandle, DecodeJob};
use engine::generation::GenerationState;
use engine::request::{WorkerError, WorkerEvent};
use engine::sampler::logprobs;
use engine::{Engine, EngineError, LogitsWanted};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;

/// A prompt to prefill: the same request a worker that prefills for itself takes.
pub use decode_worker::NewRequest as PrefillJob;
pub use decode_worker::SubmitError;

/// Submits prompts to a running prefill worker.
#[derive(Clone)]
pub struct PrefillHandle {
    tx: SyncSender<PrefillJob>,
    /// Jobs submitted and not yet picked up (the `tandem_prefill_queue_depth` gauge).
    queued: Arc<AtomicUsize>,
}

impl PrefillHandle {
    pub fn submit(&self, job: PrefillJob) -> Result<(), SubmitError> {
        self.queued.fetch_add(1, Ordering::Relaxed);
        let r = self.tx.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => SubmitError::QueueFull,
            TrySendError::Disconnected(_) => SubmitError::Stopped,
        });
        let depth = if r.is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed) - 1
        } else {
            self.queued.load(Ordering::Relaxed)
        };
        metrics::gauge!("tandem_prefill_queue_depth").set(depth as f64);
        r
    }
}

/// Starts a prefill worker on its own thread, feeding `decode`; at most `queue` jobs wait.
pub fn spawn(
    engine: Arc<Engine>,
    decode: DecodeHandle,
    queue: usize,
) -> (PrefillHandle, JoinHandle<()>) {
    let (tx, rx) = sync_channel(queue);
    let queued = Arc::new(AtomicUsize::new(0));
    let q = queued.clone();
    let th = std::thread::Builder::new()
        .name("tandem-prefill".into())
        .spawn(move || run(engine, decode, rx, q))
        .expect("spawn prefill thread");
    (PrefillHandle { tx, queued }, th)
}

fn run(
    engine: Arc<Engine>,
    decode: DecodeHandle,
    rx: Receiver<PrefillJob>,
    queued: Arc<AtomicUsize>,
) {
    while let Ok(job) = rx.recv() {
        let depth = queued.fetch_sub(1, Ordering::Relaxed) - 1;
        metrics::gauge!("tandem_prefill_queue_depth").set(depth as f64);
        if job.cancel.is_cancelled() || job.events.is_closed() {
            continue;
        }
        let events = job.events.clone();
        if let Err(e) = prefill(&engine, &decode, job) {
            let err = match e {
                EngineError::KvExhausted { .. } => WorkerError::Overloaded(e.to_string()),
                other => WorkerError::Internal(other.to_string()),
            };
            let _ = events.send(WorkerEvent::Error(err));
        }
    }
}

fn prefill(engine: &Engine, decode: &DecodeHandle, job: PrefillJob) -> Result<(), EngineError> {
    let PrefillJob {
        id,
        prompt,
        params,
        events,
        cancel,
    } = job;
    let mut seq = engine.new_sequence();
    let want = if params.prompt_logprobs.is_some() {
        LogitsWanted::All
    } else {
        LogitsWanted::Last
    };
    // Reuse cached full blocks of the prompt's prefix (not when every prompt position's
    // logits are wanted); batch-invariant kernels make a hit bit-identical to a cold prefill.
    let cached = if want == LogitsWanted::Last {
        seq.attach_prefix(&prompt)
    } else {
        0
    };
    let logits = engine.prefill(&mut seq, &prompt[cached..], want)?;
    seq.publish_prefix(&prompt);
    if want == LogitsWanted::Last {
        let _ = events.send(WorkerEvent::Prefilled {
            cached_tokens: cached,
        });
    }
    let vocab = engine.model.config().vocab_size;
    let last = match want {
        LogitsWanted::All => {
            let n = params.prompt_logprobs.unwrap_or(0);
            let lps = (1..prompt.len())
                .map(|i| logprobs(&logits[(i - 1) * vocab..i * vocab], prompt[i], n))
                .collect();
            let _ = events.send(WorkerEvent::PromptLogprobs(lps));
            &logits[(prompt.len() - 1) * vocab..]
        }
        _ => &logits[..],
    };
    if params.max_tokens == 0 {
        let _ = events.send(WorkerEvent::Done);
        return Ok(());
    }
    let mut state = GenerationState::new(params, prompt.len());
    let ev = state.next(&engine.tokenizer, last, engine.max_context());
    let (token, done) = (ev.token, ev.finish.is_some());
    if events.send(WorkerEvent::Token(ev)).is_err() || done {
        return Ok(());
    }
    let job = DecodeJob {
        id,
        seq,
        state,
        prompt,
        generated: vec![token],
        events,
        cancel,
    };
    if let Err(job) = decode.submit(job) {
        let _ = job.events.send(WorkerEvent::Error(WorkerError::Internal(
            "the decode worker has stopped".into(),
        )));
    }
    Ok(())
}
