//! The decode worker: owns the running batch of sequences whose prompts are already in the KV
//! cache, and steps them one token at a time, all of them in one forward call per step.
//!
//! Sequences arrive as [`DecodeJob`]s (from the prefill worker, today over an in-process
//! channel; across processes the same job arrives with its KV blocks pushed into this
//! worker's pool). A sequence leaves the batch when it finishes, when its client goes away
//! (its event channel closes or its [`CancelFlag`] is set), or when the KV pool cannot give it
//! another block (it then ends with an explicit `Overloaded` error, never silence).
//!
//! Continuous batching with a token budget, preemption and prefix caching grow here (issue 5).

use engine::generation::GenerationState;
use engine::request::{CancelFlag, RequestId, WorkerError, WorkerEvent};
use engine::{Engine, KvSequence, TokenId};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvError, Sender, TryRecvError, channel};
use std::thread::JoinHandle;
use tokio::sync::mpsc::UnboundedSender;

/// A sequence handed to the decode phase: its filled KV cache and where generation stands.
pub struct DecodeJob {
    pub id: RequestId,
    pub seq: KvSequence,
    pub state: GenerationState,
    /// The last sampled token, not yet in the KV cache.
    pub last: TokenId,
    pub events: UnboundedSender<WorkerEvent>,
    pub cancel: CancelFlag,
}

impl DecodeJob {
    fn gone(&self) -> bool {
        self.cancel.is_cancelled() || self.events.is_closed()
    }
}

/// Submits sequences to a running decode worker. Cloneable; the worker stops when every
/// handle is dropped and its batch has drained.
#[derive(Clone)]
pub struct DecodeHandle {
    tx: Sender<DecodeJob>,
}

impl DecodeHandle {
    /// Hands a sequence over; if the worker has stopped the job comes back.
    pub fn submit(&self, job: DecodeJob) -> Result<(), Box<DecodeJob>> {
        self.tx.send(job).map_err(|e| Box::new(e.0))
    }
}

/// Starts a decode worker on its own thread.
pub fn spawn(engine: Arc<Engine>) -> (DecodeHandle, JoinHandle<()>) {
    let (tx, rx) = channel();
    let th = std::thread::Builder::new()
        .name("tandem-decode".into())
        .spawn(move || run(engine, rx))
        .expect("spawn decode thread");
    (DecodeHandle { tx }, th)
}

fn run(engine: Arc<Engine>, rx: Receiver<DecodeJob>) {
    let mut running: Vec<DecodeJob> = Vec::new();
    let mut open = true;
    loop {
        // Admit new sequences: block only when there is nothing to do.
        if running.is_empty() {
            if !open {
                return;
            }
            match rx.recv() {
                Ok(j) => running.push(j),
                Err(RecvError) => return,
            }
        }
        while open {
            match rx.try_recv() {
                Ok(j) => running.push(j),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        running.retain(|j| !j.gone());
        if running.is_empty() {
            metrics::gauge!("tandem_decode_running_sequences").set(0.0);
        }
        // Every sequence needs room for one more position before the step.
        running.retain_mut(|j| match j.seq.reserve(j.seq.len() + 1) {
            Ok(()) => true,
            Err(e) => {
                let _ = j
                    .events
                    .send(WorkerEvent::Error(WorkerError::Overloaded(e.to_string())));
                false
            }
        });
        if running.is_empty() {
            continue;
        }
        step(&engine, &mut running);
    }
}

/// One forward call over the whole batch, then one sampled token per sequence.
fn step(engine: &Engine, running: &mut Vec<DecodeJob>) {
    metrics::gauge!("tandem_decode_running_sequences").set(running.len() as f64);
    metrics::gauge!("tandem_kv_blocks_total").set(engine.kv.n_blocks() as f64);
    metrics::gauge!("tandem_kv_blocks_free").set(engine.kv.free_blocks() as f64);
    metrics::gauge!("tandem_kv_blocks_cached_unused").set(engine.kv.cached_blocks() as f64);
    let mut batch: Vec<(&mut KvSequence, TokenId)> =
        running.iter_mut().map(|j| (&mut j.seq, j.last)).collect();
    let result = engine.decode_step(&mut batch);
    drop(batch);
    let logits = match result {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "decode step failed");
            for j in running.drain(..) {
                let _ = j
                    .events
                    .send(WorkerEvent::Error(WorkerError::Internal(e.to_string())));
            }
            return;
        }
    };
    let max_ctx = engine.max_context();
    let mut finished = vec![false; running.len()];
    for ((j, l), done) in running.iter_mut().zip(&logits).zip(finished.iter_mut()) {
        let ev = j.state.next(&engine.tokenizer, l, max_ctx);
        j.last = ev.token;
        *done = ev.finish.is_some();
        if j.events.send(WorkerEvent::Token(ev)).is_err() {
            *done = true;
        }
    }
    let mut it = finished.into_iter();
    running.retain(|_| !it.next().expect("one flag per job"));
}
