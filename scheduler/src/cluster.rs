//! The workers a scheduler routes to. Today `tandem up` runs its workers in this process,
//! connected by channels; the disaggregated cluster (issue 6) puts the same jobs on gRPC and
//! picks workers by load and prefix overlap.

use crate::error::ApiError;
use decode_worker::{DecodeHandle, NewRequest, SubmitError, WorkerConfig};
use engine::request::{CancelFlag, GenerationParams, RequestId, WorkerEvent};
use engine::{Engine, TokenId};
use prefill_worker::PrefillHandle;
use std::sync::Arc;
use std::thread::JoinHandle;
use tokio::sync::mpsc;

/// How the in-process workers split the work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Topology {
    /// One worker prefills and decodes, in continuous batches under a token budget (how vLLM
    /// runs): the default in one process.
    #[default]
    Colocated,
    /// A prefill worker thread hands each prefilled sequence to a decode worker thread.
    Split,
}

/// How to start a cluster.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClusterConfig {
    pub topology: Topology,
    pub worker: WorkerConfig,
}

enum Entry {
    Colocated(DecodeHandle),
    Split(PrefillHandle),
}

/// An in-process cluster.
pub struct Cluster {
    engine: Arc<Engine>,
    entry: Entry,
    threads: Vec<JoinHandle<()>>,
}

impl Cluster {
    /// A colocated worker; at most `queue` requests wait to start before new ones get 503.
    pub fn start(engine: Arc<Engine>, queue: usize) -> Cluster {
        Cluster::start_with(
            engine,
            ClusterConfig {
                topology: Topology::Colocated,
                worker: WorkerConfig {
                    max_waiting: queue,
                    ..WorkerConfig::default()
                },
            },
        )
    }

    pub fn start_with(engine: Arc<Engine>, cfg: ClusterConfig) -> Cluster {
        let (decode, d_thread) = decode_worker::spawn(engine.clone(), cfg.worker);
        match cfg.topology {
            Topology::Colocated => Cluster {
                engine,
                entry: Entry::Colocated(decode),
                threads: vec![d_thread],
            },
            Topology::Split => {
                let (prefill, p_thread) =
                    prefill_worker::spawn(engine.clone(), decode, cfg.worker.max_waiting);
                Cluster {
                    engine,
                    entry: Entry::Split(prefill),
                    threads: vec![p_thread, d_thread],
                }
            }
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
        let req = NewRequest {
            id,
            prompt,
            params,
            events: tx,
            cancel,
        };
        let r = match &self.entry {
            Entry::Colocated(d) => d.submit_request(req),
            Entry::Split(p) => p.submit(req),
        };
        r.map_err(|e| match e {
            SubmitError::QueueFull => ApiError::Overloaded(
                "the server is at capacity (request queue full); retry shortly".into(),
            ),
            SubmitError::Stopped => ApiError::Internal("the worker has stopped".into()),
        })?;
        Ok(rx)
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
