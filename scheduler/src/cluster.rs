//! The workers a scheduler routes to. Today `tandem up` runs one prefill and one decode worker
//! in this process, connected by channels; the disaggregated cluster (issue 6) puts the same
//! jobs on gRPC and picks workers by load and prefix overlap.

use crate::error::ApiError;
use engine::request::{CancelFlag, GenerationParams, RequestId, WorkerEvent};
use engine::{Engine, TokenId};
use prefill_worker::{PrefillHandle, PrefillJob, SubmitError};
use std::sync::Arc;
use std::thread::JoinHandle;
use tokio::sync::mpsc;

/// An in-process cluster: one prefill worker feeding one decode worker.
pub struct Cluster {
    engine: Arc<Engine>,
    prefill: PrefillHandle,
    threads: Vec<JoinHandle<()>>,
}

impl Cluster {
    /// Starts the workers; at most `queue` prompts wait for prefill before new ones get 503.
    pub fn start(engine: Arc<Engine>, queue: usize) -> Cluster {
        let (decode, d_thread) = decode_worker::spawn(engine.clone());
        let (prefill, p_thread) = prefill_worker::spawn(engine.clone(), decode, queue);
        Cluster {
            engine,
            prefill,
            threads: vec![p_thread, d_thread],
        }
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Queues a prompt; its events arrive on the returned channel.
    pub fn submit(
        &self,
        id: RequestId,
        prompt: Vec<TokenId>,
        params: GenerationParams,
        cancel: CancelFlag,
    ) -> Result<mpsc::UnboundedReceiver<WorkerEvent>, ApiError> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.prefill
            .submit(PrefillJob {
                id,
                prompt,
                params,
                events: tx,
                cancel,
            })
            .map_err(|e| match e {
                SubmitError::QueueFull => ApiError::Overloaded(
                    "the server is at capacity (prefill queue full); retry shortly".into(),
                ),
                SubmitError::Stopped => ApiError::Internal("the prefill worker has stopped".into()),
            })?;
        Ok(rx)
    }

    /// Stops the workers after in-flight work drains (call once the HTTP server has stopped).
    pub fn shutdown(self) {
        let Cluster {
            prefill, threads, ..
        } = self;
        drop(prefill);
        for t in threads {
            let _ = t.join();
        }
    }
}
