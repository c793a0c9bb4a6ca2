//! The seam between the HTTP front door and whatever generates tokens, as TGI's router
//! defines its `Backend`: a [`Workers`] implementation takes a tokenized prompt and streams
//! [`WorkerEvent`]s back. Two exist: the disaggregated cluster of prefill and decode worker
//! processes reached over gRPC ([`crate::remote`]), and one colocated worker in this process
//! (how vLLM runs; `tandem up --colocated`), which the `decode-worker` crate provides, so this
//! crate links no model runtime and no kernels.

use crate::error::ApiError;
use crate::remote::{Remote, RemoteConfig};
use frontend::request::{CancellationToken, GenerationParams, RequestId, WorkerEvent};
use frontend::{Frontend, TokenId};
use std::sync::Arc;
use tokio::sync::mpsc;

/// What generates tokens for the scheduler.
pub trait Workers: Send + Sync {
    /// Queues a prompt; its events arrive on the returned channel. A full queue is
    /// [`ApiError::Overloaded`] (503), never a wait.
    fn submit(
        &self,
        id: RequestId,
        prompt: Vec<TokenId>,
        params: GenerationParams,
        cancel: CancellationToken,
    ) -> Result<mpsc::UnboundedReceiver<WorkerEvent>, ApiError>;

    /// Stops after in-flight work drains (called once the HTTP server has stopped).
    fn shutdown(self: Box<Self>) {}
}

/// Where requests go: the model's frontend and the workers behind it.
pub struct Cluster {
    frontend: Arc<Frontend>,
    workers: Box<dyn Workers>,
    remote: Option<Arc<Remote>>,
}

impl Cluster {
    /// Requests go to `workers`; `frontend` tokenizes and renders for them.
    pub fn new(frontend: Arc<Frontend>, workers: Box<dyn Workers>) -> Cluster {
        Cluster {
            frontend,
            workers,
            remote: None,
        }
    }

    /// Worker processes over gRPC. Call inside a tokio runtime.
    pub fn remote(frontend: Arc<Frontend>, mut cfg: RemoteConfig) -> Result<Cluster, ApiError> {
        cfg.fingerprint.get_or_insert(frontend.fingerprint);
        let remote = Remote::start(cfg)?;
        Ok(Cluster {
            frontend,
            workers: Box::new(remote.clone()),
            remote: Some(remote),
        })
    }

    /// The disaggregated workers, when this cluster has them.
    pub fn remote_workers(&self) -> Option<&Arc<Remote>> {
        self.remote.as_ref()
    }

    /// The model's tokenizer, template, name and limits.
    pub fn frontend(&self) -> &Arc<Frontend> {
        &self.frontend
    }

    /// Queues a prompt; its events arrive on the returned channel.
    pub fn submit(
        &self,
        id: RequestId,
        prompt: Vec<TokenId>,
        params: GenerationParams,
        cancel: CancellationToken,
    ) -> Result<mpsc::UnboundedReceiver<WorkerEvent>, ApiError> {
        self.workers.submit(id, prompt, params, cancel)
    }

    /// Stops the workers after in-flight work drains (call once the HTTP server has stopped).
    pub fn shutdown(self) {
        self.workers.shutdown();
    }
}

impl Workers for Arc<Remote> {
    fn submit(
        &self,
        id: RequestId,
        prompt: Vec<TokenId>,
        params: GenerationParams,
        cancel: CancellationToken,
    ) -> Result<mpsc::UnboundedReceiver<WorkerEvent>, ApiError> {
        Remote::submit(self, id, prompt, params, cancel)
    }
}
