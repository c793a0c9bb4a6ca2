//! One decode worker in the scheduler's process: it prefills and decodes, in continuous
//! batches (how vLLM runs; `tandem up --colocated`). It plugs into the scheduler through the
//! scheduler's own seam, [`scheduler::cluster::Workers`], as TGI's backends plug into its
//! router: the scheduler crate links no model runtime.

use crate::{DecodeHandle, NewRequest, SubmitError, WorkerConfig};
use engine::Engine;
use engine::TokenId;
use engine::request::{CancellationToken, GenerationParams, RequestId, WorkerEvent};
use scheduler::cluster::{Cluster, Workers};
use scheduler::error::ApiError;
use std::sync::Arc;
use std::thread::JoinHandle;
use tokio::sync::mpsc;

/// A decode worker thread behind the scheduler's [`Workers`] seam.
pub struct Colocated {
    decode: DecodeHandle,
    thread: JoinHandle<()>,
}

impl Colocated {
    /// Starts the worker's batch loop on its own thread.
    pub fn start(engine: Arc<Engine>, worker: WorkerConfig) -> Colocated {
        let (decode, thread) = crate::spawn(engine, worker);
        Colocated { decode, thread }
    }
}

/// A scheduler cluster of one colocated worker.
pub fn cluster(engine: Arc<Engine>, worker: WorkerConfig) -> Cluster {
    let frontend = engine.frontend.clone();
    Cluster::new(frontend, Box::new(Colocated::start(engine, worker)))
}

impl Workers for Colocated {
    fn submit(
        &self,
        id: RequestId,
        prompt: Vec<TokenId>,
        params: GenerationParams,
        cancel: CancellationToken,
    ) -> Result<mpsc::UnboundedReceiver<WorkerEvent>, ApiError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let req = NewRequest {
            id,
            generated: Vec::new(),
            prompt,
            params,
            events: tx,
            cancel,
        };
        self.decode.submit_request(req).map_err(|e| match e {
            SubmitError::QueueFull => ApiError::Overloaded(
                "the server is at capacity (request queue full); retry shortly".into(),
            ),
            SubmitError::Stopped => ApiError::Internal("the worker has stopped".into()),
        })?;
        Ok(rx)
    }

    fn shutdown(self: Box<Self>) {
        let Colocated { decode, thread } = *self;
        drop(decode);
        let _ = thread.join();
    }
}
