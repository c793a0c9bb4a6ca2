//! The `tandem.v2.PrefillWorker` gRPC service, and [`serve`]: a whole prefill worker process.

use crate::target::Transport;
use crate::{PrefillConfig, PrefillHandle, PrefillJob, SubmitError};
use engine::Engine;
use engine::request::{CancellationToken, GenerationParams, RequestId, WorkerError};
use kv_store::store::client::StoreClient;
use protocol::pb;
use protocol::pb::prefill_worker_server::{PrefillWorker, PrefillWorkerServer};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// The gRPC service over a running prefill loop.
#[derive(Clone)]
pub struct PrefillService {
    engine: Arc<Engine>,
    handle: PrefillHandle,
    cancels: Arc<Mutex<HashMap<u64, CancellationToken>>>,
    /// Verifies the grants (`None`: a loopback-only cluster's unkeyed ones).
    secret: Option<protocol::auth::ClusterSecret>,
    /// The pooled KV store, when there is one.
    store: Option<StoreClient>,
    /// This host's id (`kv_store::shm::host_id`): whether a target's pool is here.
    host_id: String,
}

impl PrefillService {
    pub fn new(
        engine: Arc<Engine>,
        handle: PrefillHandle,
        secret: Option<protocol::auth::ClusterSecret>,
    ) -> PrefillService {
        PrefillService {
            engine,
            handle,
            cancels: Arc::default(),
            secret,
            store: None,
            host_id: kv_store::shm::host_id(),
        }
    }

    /// Fetches prompts' prefixes from `store` before computing them in this worker's pool.
    pub fn with_store(mut self, store: Option<StoreClient>) -> PrefillService {
        self.store = store;
        self
    }

    pub fn into_server(self) -> PrefillWorkerServer<PrefillService> {
        PrefillWorkerServer::new(self)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// One `Prefill` call of request `request_id`, inside its span (`span` records what the
    /// call learns).
    async fn prefill_call(
        &self,
        req: Request<pb::PrefillRequest>,
        request_id: String,
        span: tracing::Span,
    ) -> Result<Response<pb::PrefillReply>, Status> {
        let r = req.into_inner();

        let params = r
            .params
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("missing generation parameters"))
            .and_then(|p| {
                GenerationParams::try_from(p).map_err(|e| Status::invalid_argument(e.to_string()))
            })?;
        let target = r
            .target
            .ok_or_else(|| Status::invalid_argument("missing KV target"))?;
        let transport = Transport::parse(&r.transport).map_err(Status::invalid_argument)?;
        if r.prompt.is_empty() {
            return Err(Status::invalid_argument("empty prompt"));
        }
        let vocab = self.engine.model.config().vocab_size;
        if let Some(bad) = r
            .prompt
            .iter()
            .chain(&r.generated)
            .find(|&&t| t as usize >= vocab)
        {
            return Err(Status::invalid_argument(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        // Prompt plus the generated tokens but the last: what the KV covers.
        let positions = r.prompt.len() + r.generated.len().saturating_sub(1);
        let bs = self.engine.kv.layout().block_size;
        crate::target::check_target(&target, positions, bs, transport, self.secret.as_ref())
            .map_err(|e| Status::invalid_argument(format!("bad KV target: {e}")))?;
        let flag = CancellationToken::default();
        self.cancels
            .lock()
            .expect("cancel map poisoned")
            .insert(r.request_id, flag.clone());
        let _registered = Registered {
            map: &self.cancels,
            id: r.request_id,
            flag: flag.clone(),
        };
        let (tx, rx) = oneshot::channel();
        let job = PrefillJob {
            id: RequestId(r.request_id),
            prompt: r.prompt,
            generated: r.generated,
            params,
            target,
            transport,
            cancel: flag,
            reply: tx,
            span: span.clone(),
            request_id,
        };
        if let Some(store) = &self.store
            && job.params.prompt_logprobs.is_none()
            && crate::target::computes_locally(&job.target, job.transport, &self.host_id)
        {
            // Into this pool's prefix cache, where the prefill attaches it.
            let cached =
                kv_store::store::fetch::warm_over_tcp(store, &self.engine.kv, &job.tokens()).await;
            span.record("tandem.kv.store_prefix_tokens", cached as i64);
        }
        self.handle.submit(job).map_err(|e| match e {
            SubmitError::QueueFull => Status::resource_exhausted(e.to_string()),
            SubmitError::Stopped => Status::unavailable(e.to_string()),
        })?;
        let out = rx
            .await
            .map_err(|_| Status::cancelled("the prefill was cancelled"))?;
        match out {
            Ok(o) => {
                span.record("tandem.kv.transport", o.transport.name());
                if let Some(cached) = o.events.iter().find_map(|e| match e {
                    engine::request::WorkerEvent::Prefilled { cached_tokens } => {
                        Some(*cached_tokens)
                    }
                    _ => None,
                }) {
                    span.record("tandem.cached_tokens", cached as i64);
                }
                Ok(Response::new(pb::PrefillReply {
                    events: o.events.iter().map(pb::WorkerEvent::from).collect(),
                    checksum: o.checksum,
                    filled: o.filled as u32,
                    transport: o.transport.name().into(),
                }))
            }
            Err(WorkerError::Overloaded(m)) => Err(Status::resource_exhausted(m)),
            Err(WorkerError::Internal(m)) => Err(Status::internal(m)),
        }
    }
}

/// Forgets a request's cancel flag when its call ends (answered or dropped by the client).
struct Registered<'a> {
    map: &'a Mutex<HashMap<u64, CancellationToken>>,
    id: u64,
    flag: CancellationToken,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        // The call ended: if it was dropped mid-flight, the loop skips the job.
        self.flag.cancel();
        self.map
            .lock()
            .expect("cancel map poisoned")
            .remove(&self.id);
    }
}

#[tonic::async_trait]
impl PrefillWorker for PrefillService {
    async fn prefill(
        &self,
        req: Request<pb::PrefillRequest>,
    ) -> Result<Response<pb::PrefillReply>, Status> {
        let request_id = protocol::trace::request_id(req.metadata());
        let span = tracing::info_span!(
            "prefill",
            otel.kind = "server",
            x_request_id = %request_id,
            gen_ai.usage.input_tokens = req.get_ref().prompt.len() as i64,
            tandem.cached_tokens = tracing::field::Empty,
            tandem.kv.transport = tracing::field::Empty,
            tandem.kv.store_prefix_tokens = tracing::field::Empty,
        );
        protocol::trace::continue_from(&span, req.metadata());
        self.prefill_call(req, request_id, span.clone())
            .instrument(span)
            .await
    }

    async fn cancel(&self, req: Request<pb::CancelRequest>) -> Result<Response<pb::Empty>, Status> {
        let id = req.into_inner().request_id;
        if let Some(f) = self.cancels.lock().expect("cancel map poisoned").get(&id) {
            f.cancel();
        }
        Ok(Response::new(pb::Empty {}))
    }

    async fn stats(&self, _: Request<pb::Empty>) -> Result<Response<pb::WorkerStats>, Status> {
        let kv = &self.engine.kv;
        Ok(Response::new(pb::WorkerStats {
            role: "prefill".into(),
            model_id: self.engine.frontend.model_id.clone(),
            fingerprint: self.engine.frontend.fingerprint,
            kv_blocks_total: kv.n_blocks() as u64,
            kv_blocks_free: kv.free_blocks() as u64,
            waiting: self.handle.queued() as u32,
            running: 0,
            max_context: self.engine.max_context() as u32,
            block_size: kv.layout().block_size as u32,
            context_tokens: 0,
            prefill_tokens: self.handle.queued_tokens() as u64,
            threads: self.engine.threads() as u32,
            max_batch_tokens: 0,
            pace_us: 0,
        }))
    }
}

/// Runs a prefill worker: the batching loop and the gRPC service on `listener` (behind the
/// handshake under `cfg.secret`), until `shutdown` resolves — or with an error as soon as the
/// batching loop dies ([`protocol::net::serve_beside`]).
pub async fn serve(
    engine: Arc<Engine>,
    cfg: PrefillConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (secret, store) = (cfg.secret.clone(), cfg.store.clone());
    let (handle, thread) = crate::spawn(engine.clone(), cfg);
    tracing::info!(grpc = %listener.local_addr()?, authenticated = secret.is_some(), "prefill worker serving");
    let server = tonic::transport::Server::builder()
        .add_service(
            PrefillService::new(engine, handle, secret.clone())
                .with_store(store)
                .into_server(),
        )
        .serve_with_incoming_shutdown(
            protocol::net::incoming(listener, secret, protocol::net::DEFAULT_MAX_CONNECTIONS),
            shutdown,
        );
    protocol::net::serve_beside(server, thread, "prefill").await
}
