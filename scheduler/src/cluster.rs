//! The workers a scheduler routes to: one colocated worker in this process (how vLLM runs;
//! `tandem up --colocated`), or the disaggregated cluster of prefill and decode worker
//! processes reached over gRPC ([`crate::remote`]).

use crate::error::ApiError;
use crate::remote::{Remote, RemoteConfig};
use decode_worker::{DecodeHandle, NewRequest, SubmitError, WorkerConfig};
use engine::request::{CancelFlag, GenerationParams, RequestId, WorkerEvent};
use engine::{Engine, TokenId};
use std::sync::Arc;
use std::thread::JoinHandle;
use tokio::sync::mpsc;

enum Entry {
    Colocated(DecodeHandle),
    Remote(Arc<Remote>),
}

/// Where requests go.
pub struct Cluster {
    engine: Arc<Engine>,
    entry: Entry,
    threads: Vec<JoinHandle<()>>,
}

impl Cluster {
    /// A colocated worker; at most `queue` requests wait to start before new ones get 503.
    pub fn start(engine: Arc<Engine>, queue: usize) -> Cluster {
        Cluster::colocated(
            engine,
            WorkerConfig {
                max_waiting: queue,
                ..WorkerConfig::default()
            },
        )
    }

    /// One worker in this process prefills and decodes, in continuous batches.
    pub fn colocated(engine: Arc<Engine>, worker: WorkerConfig) -> Cluster {
        let (decode, thread) = decode_worker::spawn(engine.clone(), worker);
        Cluster {
            engine,
            entry: Entry::Colocated(decode),
            threads: vec![thread],
        }
    }

    /// Worker processes over gRPC; `engine` is the model's frontend (tokenizer, template,
    /// limits: [`Engine::load_frontend`]). Call inside a tokio runtime.
    pub fn remote(engine: Arc<Engine>, cfg: RemoteConfig) -> Result<Cluster, ApiError> {
        Ok(Cluster {
            engine,
            entry: Entry::Remote(Remote::start(cfg)?),
            threads: Vec::new(),
        })
    }

    /// The disaggregated workers, when this cluster has them.
    pub fn remote_workers(&self) -> Option<&Arc<Remote>> {
        match &self.entry {
            Entry::Remote(r) => Some(r),
            Entry::Colocated(_) => None,
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
        match &self.entry {
            Entry::Remote(r) => r.submit(id, prompt, params, cancel),
            Entry::Colocated(d) => {
                let (tx, rx) = mpsc::unbounded_channel();
                let req = NewRequest {
                    id,
                    generated: Vec::new(),
                    prompt,
                    params,
                    events: tx,
                    cancel,
                };
                d.submit_request(req).map_err(|e| match e {
                    SubmitError::QueueFull => ApiError::Overloaded(
                        "the server is at capacity (request queue full); retry shortly".into(),
                    ),
                    SubmitError::Stopped => ApiError::Internal("the worker has stopped".into()),
                })?;
                Ok(rx)
            }
        }
    }

    /// Stops the workers after in-flight work drains (call once the HTTP server has stopped).
    pub fn shutdown(self) {
        let Cluster { entry, threads, .. } = self;
        drop(entry);
        for t in threads {
            let _ = t.join();
        }
    }
}
