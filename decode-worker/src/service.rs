//! The `tandem.v2.DecodeWorker` gRPC service: leases of KV blocks for prefill workers to
//! fill, the commit that hands a filled lease to the batch, and the token stream.
//!
//! A lease ([`crate::leases`]) is an [`engine::KvSequence`] of this worker's pool, reserved for one prompt and held here
//! until a `Generate` commits it, a `Release` or `Cancel` drops it, or it expires. Prefill
//! workers on this host write its blocks through the shared pool file; others stream them to
//! the TCP data plane ([`kv_store::tcp::KvReceiver`]), which has each slab land in its block
//! as it arrives ([`kv_store::tcp::SlabSink`]). A lease being written over TCP is never freed under the
//! writer: its release waits for the transfer's end or abort. A lease lent for writing in
//! place is taken back through the pool's fence ([`kv_store::shm::fence`]) before its blocks
//! are reused or decoded from: while a writer is inside them, they stay quarantined. The
//! commit's checksum is recomputed over the blocks themselves before anything decodes from
//! them.

use crate::leases::{Lease, Leases, Transfer};
use crate::{DecodeHandle, DecodeJob, NewRequest, SubmitError};
use engine::generation::GenerationState;
use engine::request::{CancellationToken, GenerationParams, RequestId, WorkerEvent};
use engine::{Engine, EngineError, TokenId};
use kv_store::events::BlockFeed;
use kv_store::shm::fence::Fence;
use kv_store::tcp::Connections;
use protocol::auth::ClusterSecret;
use protocol::pb::decode_worker_server::{DecodeWorker, DecodeWorkerServer};
use protocol::{LeaseId, pb};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// How the service runs.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// How long a lease lives without a commit.
    pub lease: Duration,
    /// How long a commit waits for a TCP transfer still arriving.
    pub transfer_wait: Duration,
    /// The TCP data plane as prefill workers reach it (`host:port`); empty: none.
    pub kv_data_addr: String,
    /// Signs the grants (and authenticates the planes); `None`: a loopback-only cluster.
    pub secret: Option<ClusterSecret>,
    /// Cores shared with a prefill worker on this host (`protocol::cores`); `None`: its own.
    pub sharing: Option<protocol::cores::Sharing>,
    /// The pooled KV store, when there is one.
    pub store: Option<crate::store::StoreUse>,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            lease: Duration::from_secs(30),
            transfer_wait: Duration::from_secs(10),
            kv_data_addr: String::new(),
            secret: None,
            sharing: None,
            store: None,
        }
    }
}

/// The gRPC service.
#[derive(Clone)]
pub struct DecodeService {
    engine: Arc<Engine>,
    handle: DecodeHandle,
    leases: Arc<Leases>,
    /// The data plane's connections, to revoke a writer whose lease expired.
    connections: Option<Arc<Connections>>,
    cancels: Arc<Mutex<HashMap<u64, CancellationToken>>>,
    cfg: Arc<ServiceConfig>,
    host_id: Arc<str>,
    /// The prefix cache's contents as block events (KV-aware routing).
    blocks: Arc<BlockFeed>,
}

impl DecodeService {
    pub fn new(
        engine: Arc<Engine>,
        handle: DecodeHandle,
        leases: Arc<Leases>,
        connections: Option<Arc<Connections>>,
        cfg: ServiceConfig,
    ) -> DecodeService {
        DecodeService {
            blocks: block_feed(&engine.kv),
            engine,
            handle,
            leases,
            connections,
            cancels: Arc::default(),
            cfg: Arc::new(cfg),
            host_id: kv_store::shm::host_id().into(),
        }
    }

    pub fn into_server(self) -> DecodeWorkerServer<DecodeService> {
        DecodeWorkerServer::new(self)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// Expires stale leases every `every` until the service is dropped, cutting off the
    /// data-plane connections still writing them.
    pub fn spawn_reaper(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let leases = Arc::downgrade(&self.leases);
        let conns = self.connections.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(l) = leases.upgrade() else { return };
                l.retry_quarantine();
                let (n, cut) = l.expire(Instant::now());
                if n > 0 {
                    metrics::counter!("tandem_kv_leases_expired_total").increment(n as u64);
                    tracing::warn!(
                        leases = n,
                        writers_cut = cut.len(),
                        "KV leases expired without a commit"
                    );
                }
                for c in cut {
                    if let Some(conns) = &conns {
                        conns.revoke(c);
                    }
                }
            }
        })
    }
}

/// The pool's prefix cache as a block feed: every block cached or evicted, as it happens.
fn block_feed(pool: &Arc<engine::KvPool>) -> Arc<BlockFeed> {
    let p = pool.clone();
    let (feed, tx) = BlockFeed::new(Box::new(move || {
        let held = p.cached_hashes().into_iter();
        held.map(|h| (h, pb::StoreTier::None)).collect()
    }));
    pool.watch_blocks(Box::new(move |c| {
        let _ = tx.send(match c {
            engine::kv::BlockChange::Stored(h) => (h, Some(pb::StoreTier::None)),
            engine::kv::BlockChange::Removed(h) => (h, None),
        });
    }));
    feed
}

fn params(p: Option<&pb::GenerationParams>) -> Result<GenerationParams, Status> {
    let p = p.ok_or_else(|| Status::invalid_argument("missing generation parameters"))?;
    GenerationParams::try_from(p).map_err(|e| Status::invalid_argument(e.to_string()))
}

fn engine_status(e: &EngineError) -> Status {
    match e {
        EngineError::KvExhausted { .. } => Status::resource_exhausted(e.to_string()),
        EngineError::ContextOverflow { .. } | EngineError::BadToken(_) => {
            Status::invalid_argument(e.to_string())
        }
        _ => Status::internal(e.to_string()),
    }
}

type EventStream = ReceiverStream<Result<pb::WorkerEvent, Status>>;

#[tonic::async_trait]
impl DecodeWorker for DecodeService {
    async fn reserve(
        &self,
        req: Request<pb::ReserveRequest>,
    ) -> Result<Response<pb::ReserveReply>, Status> {
        let r = req.into_inner();
        if r.fingerprint != self.engine.frontend.fingerprint {
            return Err(Status::failed_precondition(
                "engine fingerprints differ (another model file, precision or KV format)",
            ));
        }
        let max = self.engine.max_context();
        if r.tokens.is_empty() || r.tokens.len() > max {
            return Err(engine_status(&EngineError::ContextOverflow {
                len: r.tokens.len(),
                max,
            }));
        }
        let mut seq = self.engine.new_sequence();
        let mut cached = if r.use_prefix_cache {
            seq.attach_prefix(&r.tokens)
        } else {
            0
        };
        seq.reserve(r.tokens.len()).map_err(|e| engine_status(&e))?;
        if let Some(store) = self.cfg.store.as_ref().filter(|_| r.use_prefix_cache) {
            (seq, cached) = crate::store::fetch_prefix(store, &self.leases, seq, &r.tokens, cached)
                .await
                .map_err(|e| engine_status(&e))?;
        }
        let id = LeaseId::random();
        let kv = &self.engine.kv;
        let blocks: Vec<u32> = seq.block_table().iter().map(|b| b.0).collect();
        let written = kv_store::written_blocks(cached, r.tokens.len(), kv.layout().block_size);
        let lent = self
            .leases
            .lend(id, &blocks[written])
            .map_err(|e| Status::internal(format!("the KV fence: {e}")))?;
        let expires = Instant::now() + self.cfg.lease;
        let mut target = pb::KvTarget {
            lease_id: id.wire(),
            block_ids: blocks,
            cached_tokens: cached as u32,
            shm_path: kv
                .shared_path()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
            host_id: self.host_id.to_string(),
            pool_blocks: kv.n_blocks() as u64,
            kv_data_addr: self.cfg.kv_data_addr.clone(),
            fingerprint: self.engine.frontend.fingerprint,
            expires_unix_ms: protocol::grant::now_unix_ms() + self.cfg.lease.as_millis() as u64,
            grant: Vec::new(),
        };
        protocol::grant::sign(self.cfg.secret.as_ref(), &mut target);
        self.leases.lock().insert(
            id,
            Lease {
                request: r.request_id,
                tokens: r.tokens,
                seq,
                cached,
                expires,
                transfer: Transfer::Idle,
                writer: None,
                released: false,
                lent,
            },
        );
        Ok(Response::new(pb::ReserveReply {
            target: Some(target),
        }))
    }

    type GenerateStream = EventStream;

    async fn generate(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let started = Instant::now();
        let span = tracing::info_span!(
            "decode",
            otel.kind = "server",
            x_request_id = %protocol::trace::request_id(req.metadata()),
            tandem.committed = req.get_ref().commit.is_some(),
            tandem.resumed_after = req.get_ref().generated.len() as i64,
            gen_ai.usage.output_tokens = tracing::field::Empty,
            tandem.time_to_first_token_ms = tracing::field::Empty,
        );
        protocol::trace::continue_from(&span, req.metadata());
        let r = req.into_inner();
        let params = params(r.params.as_ref())?;
        let prompt: Vec<TokenId> = r.prompt;
        let generated: Vec<TokenId> = r.generated;
        if prompt.is_empty() {
            return Err(Status::invalid_argument("empty prompt"));
        }
        // Checked here, per request: a bad id or length reaching the batch would fail every
        // sequence stepped with it.
        let vocab = self.engine.model.config().vocab_size;
        if let Some(bad) = prompt
            .iter()
            .chain(&generated)
            .find(|&&t| t as usize >= vocab)
        {
            return Err(Status::invalid_argument(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        let max = self.engine.max_context();
        if prompt.len() + generated.len() > max {
            return Err(engine_status(&EngineError::ContextOverflow {
                len: prompt.len() + generated.len(),
                max,
            }));
        }
        let (tx, mut rx) = mpsc::unbounded_channel::<WorkerEvent>();
        let cancel = CancellationToken::default();
        let id = RequestId(r.request_id);
        match r.commit {
            Some(c) => {
                if generated.is_empty() {
                    return Err(Status::invalid_argument(
                        "a commit continues after the first token: `generated` is empty",
                    ));
                }
                let lease_id = LeaseId::from_wire(&c.lease_id)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                let mut lease = self.leases.take(lease_id, self.cfg.transfer_wait).await?;
                let filled = c.filled as usize;
                let want = prompt.len() + generated.len() - 1;
                if filled != want || filled > lease.seq.capacity() {
                    return Err(Status::invalid_argument(format!(
                        "the commit fills {filled} positions; prompt and generated tokens need {want}"
                    )));
                }
                let continues = prompt
                    .iter()
                    .chain(&generated[..generated.len() - 1])
                    .eq(lease.tokens.iter());
                if !continues {
                    return Err(Status::invalid_argument(
                        "the commit's prompt is not the one its lease was reserved for",
                    ));
                }
                if let Transfer::Ended(sent) = lease.transfer
                    && sent != c.checksum
                {
                    return Err(Status::data_loss(
                        "the KV sender's checksum differs from the commit's",
                    ));
                }
                let bs = self.engine.kv.layout().block_size;
                let blocks = kv_store::written_blocks(lease.cached, filled, bs);
                let seq = lease.seq;
                let got = tokio::task::spawn_blocking(move || {
                    let sum = kv_store::sequence_checksum(&seq, blocks);
                    (seq, sum)
                })
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
                lease.seq = got.0;
                if got.1 != c.checksum {
                    metrics::counter!("tandem_kv_checksum_failures_total").increment(1);
                    return Err(Status::data_loss(format!(
                        "KV checksum mismatch on lease {lease_id} (blocks garbled in transfer)"
                    )));
                }
                let mut seq = lease.seq;
                seq.set_filled(filled);
                seq.publish_prefix(&prompt);
                let job = DecodeJob {
                    id,
                    seq,
                    state: GenerationState::resume(params, prompt.len(), &generated),
                    prompt,
                    generated,
                    events: tx,
                    cancel: cancel.clone(),
                };
                self.handle
                    .submit(job)
                    .map_err(|_| Status::unavailable("the decode worker has stopped"))?;
            }
            None => {
                // The batch looks the prompt up in the prefix cache when it admits it (not
                // when every prompt position's log-probabilities are wanted).
                if let Some(store) = &self.cfg.store
                    && (!generated.is_empty() || params.prompt_logprobs.is_none())
                {
                    let known = generated.len().saturating_sub(1);
                    let target: Vec<TokenId> =
                        prompt.iter().chain(&generated[..known]).copied().collect();
                    crate::store::warm_prefix(store, &self.leases, &self.engine.kv, &target).await;
                }
                self.handle
                    .submit_request(NewRequest {
                        id,
                        prompt,
                        generated,
                        params,
                        events: tx,
                        cancel: cancel.clone(),
                    })
                    .map_err(|e| match e {
                        SubmitError::QueueFull => Status::resource_exhausted(e.to_string()),
                        SubmitError::Stopped => Status::unavailable(e.to_string()),
                    })?;
            }
        }
        self.cancels
            .lock()
            .expect("cancel map poisoned")
            .insert(r.request_id, cancel.clone());
        let (out, out_rx) = mpsc::channel(64);
        let cancels = self.cancels.clone();
        let forward = async move {
            // Forward until the sequence ends; a client gone drops `rx`, which the batch
            // sees as a cancelled sequence and frees its blocks.
            let mut tokens = 0usize;
            loop {
                tokio::select! {
                    ev = rx.recv() => match ev {
                        Some(ev) => {
                            if let WorkerEvent::Token(_) = ev {
                                if tokens == 0 {
                                    let ms = started.elapsed().as_secs_f64() * 1e3;
                                    tracing::Span::current()
                                        .record("tandem.time_to_first_token_ms", ms);
                                }
                                tokens += 1;
                            }
                            if out.send(Ok(pb::WorkerEvent::from(&ev))).await.is_err() {
                                break;
                            }
                        }
                        None => break,
                    },
                    _ = out.closed() => break,
                }
            }
            tracing::Span::current().record("gen_ai.usage.output_tokens", tokens as i64);
            cancel.cancel();
            cancels
                .lock()
                .expect("cancel map poisoned")
                .remove(&r.request_id);
        };
        // The span ends with the stream.
        tokio::spawn(tracing::Instrument::instrument(forward, span));
        Ok(Response::new(ReceiverStream::new(out_rx)))
    }

    async fn release(
        &self,
        req: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let id = LeaseId::from_wire(&req.into_inner().lease_id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.leases.release(id);
        Ok(Response::new(pb::Empty {}))
    }

    async fn cancel(&self, req: Request<pb::CancelRequest>) -> Result<Response<pb::Empty>, Status> {
        let id = req.into_inner().request_id;
        if let Some(c) = self.cancels.lock().expect("cancel map poisoned").get(&id) {
            c.cancel();
        }
        let leases: Vec<LeaseId> = self
            .leases
            .lock()
            .iter()
            .filter(|(_, l)| l.request == id)
            .map(|(&k, _)| k)
            .collect();
        for l in leases {
            self.leases.release(l);
        }
        Ok(Response::new(pb::Empty {}))
    }

    type BlockEventsStream = ReceiverStream<Result<pb::BlockEvents, Status>>;

    async fn block_events(
        &self,
        _: Request<pb::Empty>,
    ) -> Result<Response<Self::BlockEventsStream>, Status> {
        Ok(Response::new(self.blocks.subscribe()))
    }

    async fn stats(&self, _: Request<pb::Empty>) -> Result<Response<pb::WorkerStats>, Status> {
        let kv = &self.engine.kv;
        let st = self.handle.stats();
        Ok(Response::new(pb::WorkerStats {
            role: "decode".into(),
            model_id: self.engine.frontend.model_id.clone(),
            fingerprint: self.engine.frontend.fingerprint,
            kv_blocks_total: kv.n_blocks() as u64,
            kv_blocks_free: kv.free_blocks() as u64,
            waiting: st.waiting.load(Ordering::Relaxed) as u32,
            running: st.running.load(Ordering::Relaxed) as u32,
            max_context: self.engine.max_context() as u32,
            block_size: kv.layout().block_size as u32,
            context_tokens: st.context.load(Ordering::Relaxed) as u64,
            prefill_tokens: st.prefill_tokens.load(Ordering::Relaxed) as u64,
            threads: self.engine.threads() as u32,
            max_batch_tokens: self.handle.max_batch_tokens() as u32,
            pace_us: self.handle.pace().map_or(0, |p| p.as_micros() as u32),
        }))
    }
}

/// Runs a decode worker: the batch loop, the gRPC service on `listener` and the TCP data plane
/// on `kv_bind`, advertised to prefill workers as `advertise_host:port`, both planes behind
/// the handshake under `service.secret` (`service.kv_data_addr` is filled in here). Returns once `shutdown` resolves and in-flight streams have
/// ended — or with an error as soon as the batch loop dies (a panic), so that the process
/// exits and its supervisor restarts it rather than keeping a worker that serves nothing.
pub async fn serve(
    engine: Arc<Engine>,
    worker: crate::WorkerConfig,
    listener: tokio::net::TcpListener,
    kv_bind: &str,
    advertise_host: &str,
    service: ServiceConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let secret = service.secret.clone();
    let pacer = match &service.sharing {
        Some(s) => Some(protocol::cores::Pacer::open(s)?),
        None => None,
    };
    let (handle, thread) = crate::spawn_paced(engine.clone(), worker, pacer);
    let fence = match engine.kv.shared_path() {
        Some(p) => Some(Fence::create(p, engine.kv.n_blocks() as u32)?),
        None => None,
    };
    let leases = Leases::new(fence);
    let receiver = kv_store::tcp::KvReceiver::bind(
        kv_bind,
        leases.clone(),
        secret.clone(),
        kv_store::tcp::ReceiverLimits::default(),
    )?;
    let cfg = ServiceConfig {
        kv_data_addr: format!("{advertise_host}:{}", receiver.local_addr().port()),
        ..service
    };
    tracing::info!(
        grpc = %listener.local_addr()?,
        kv_data = %cfg.kv_data_addr,
        shm = ?engine.kv.shared_path(),
        authenticated = secret.is_some(),
        "decode worker serving"
    );
    let write_back = cfg
        .store
        .as_ref()
        .map(|s| crate::store::write_back(s, &engine.kv));
    let svc = DecodeService::new(engine, handle, leases, Some(receiver.connections()), cfg);
    let reaper = svc.spawn_reaper(Duration::from_secs(1));
    // Draining waits for open streams: the schedulers' block event streams end first.
    let feed = svc.blocks.clone();
    let shutdown = async move {
        shutdown.await;
        feed.close();
    };
    let server = tonic::transport::Server::builder()
        .add_service(svc.into_server())
        .serve_with_incoming_shutdown(
            protocol::net::incoming(listener, secret, protocol::net::DEFAULT_MAX_CONNECTIONS),
            shutdown,
        );
    let result = protocol::net::serve_beside(server, thread, "decode batch").await;
    reaper.abort();
    if let Some(w) = write_back {
        w.abort();
    }
    drop(receiver);
    result
}
