//! The disaggregated cluster: prefill and decode workers in other processes, reached over
//! gRPC (`tandem.v1`), and the life of each request across them.
//!
//! A request (see `ARCHITECTURE.md`):
//! 1. a decode worker is picked by load; a prompt shorter than
//!    [`RemoteConfig::disagg_min_tokens`] is prefilled there (conditional disaggregation) and
//!    the rest is skipped;
//! 2. `Reserve` on it gives blocks (and the prefix it already caches);
//! 3. a prefill worker, picked by queue depth, computes the KV into them (`Prefill`) and
//!    samples the first token, which streams to the client at once;
//! 4. `Generate` commits the blocks (checksum) and streams the rest.
//!
//! Failures: a prefill worker that fails or dies is replaced by the next one (the lease is
//! rewritten whole); with none left the decode worker prefills. A decode worker that dies
//! mid-stream is replaced by a healthy one, waiting up to [`RemoteConfig::hold`] for one (a
//! survivor or the restarted worker), and the request is re-prefilled with the tokens already
//! streamed: seeded sampling makes the continuation the same tokens it would have been, so
//! the client sees one unbroken stream. A client that goes away cancels everywhere.

use crate::error::ApiError;
use engine::request::{CancelFlag, GenerationParams, RequestId, WorkerError, WorkerEvent};
use engine::{Engine, TokenId};
use protocol::pb;
use protocol::pb::decode_worker_client::DecodeWorkerClient;
use protocol::pb::prefill_worker_client::PrefillWorkerClient;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// How the scheduler reaches and uses its workers.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// Prefill workers' gRPC addresses (`host:port`).
    pub prefill: Vec<String>,
    /// Decode workers' gRPC addresses.
    pub decode: Vec<String>,
    /// Prompts shorter than this many tokens are prefilled on the decode worker.
    pub disagg_min_tokens: usize,
    /// Prefills queued (or running) on the least busy prefill worker at which a prompt is
    /// prefilled on its decode worker instead (Dynamo's rule: disaggregate only while the
    /// prefill queue is short); 0: no limit.
    pub max_prefill_queue: usize,
    /// KV transport to ask for: `""` (the prefill worker picks), `"shm"` or `"tcp"`.
    pub transport: String,
    /// How long a request waits for a decode worker when none is healthy.
    pub hold: Duration,
    /// Requests in flight at most; beyond it, 503.
    pub max_inflight: usize,
    /// How often worker health and load are polled.
    pub poll: Duration,
    /// etcd endpoints to discover workers from (cargo feature `etcd`), beside the static ones.
    pub etcd: Vec<String>,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig {
            prefill: Vec::new(),
            decode: Vec::new(),
            disagg_min_tokens: 64,
            max_prefill_queue: 0,
            transport: String::new(),
            hold: Duration::from_secs(60),
            max_inflight: 256,
            poll: Duration::from_millis(200),
            etcd: Vec::new(),
        }
    }
}

/// One worker as the scheduler sees it.
pub struct Worker<C> {
    pub addr: String,
    client: C,
    healthy: AtomicBool,
    /// Requests this scheduler has on it now.
    inflight: AtomicUsize,
    stats: Mutex<pb::WorkerStats>,
}

impl<C: Clone> Worker<C> {
    fn new(addr: &str, make: impl Fn(Channel) -> C) -> Result<Arc<Worker<C>>, ApiError> {
        let ep = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| ApiError::Internal(format!("bad worker address {addr}: {e}")))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5));
        Ok(Arc::new(Worker {
            addr: addr.to_string(),
            client: make(ep.connect_lazy()),
            healthy: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            stats: Mutex::new(pb::WorkerStats::default()),
        }))
    }
}

impl<C> Worker<C> {
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// The load it reported last.
    pub fn stats(&self) -> pb::WorkerStats {
        self.stats.lock().expect("stats poisoned").clone()
    }

    fn down(&self, why: &Status) {
        if self.healthy.swap(false, Ordering::AcqRel) {
            tracing::warn!(worker = %self.addr, error = %why.message(), "worker unreachable");
        }
    }
}

/// Counts a request on a worker while alive.
struct Busy<'a>(&'a AtomicUsize);
impl<'a> Busy<'a> {
    fn on(c: &'a AtomicUsize) -> Busy<'a> {
        c.fetch_add(1, Ordering::AcqRel);
        Busy(c)
    }
}
impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

type Decode = Worker<DecodeWorkerClient<Channel>>;
type Prefill = Worker<PrefillWorkerClient<Channel>>;

/// The workers and the routing state.
pub struct Remote {
    cfg: RemoteConfig,
    members: RwLock<Members>,
    /// A worker came up.
    changed: Notify,
    inflight: AtomicUsize,
    /// Streams resumed on another (or a restarted) decode worker after theirs failed.
    pub resumed: AtomicUsize,
    /// Prefills retried on another prefill worker (or handed to the decode worker).
    pub prefill_retries: AtomicUsize,
}

/// The routing table.
#[derive(Default)]
struct Members {
    prefill: Vec<Arc<Prefill>>,
    decode: Vec<Arc<Decode>>,
}

/// What a worker does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Prefill,
    Decode,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "prefill" => Ok(Role::Prefill),
            "decode" => Ok(Role::Decode),
            other => Err(format!("unknown worker role '{other}'")),
        }
    }
}

impl Remote {
    /// Connects (lazily) to the workers and starts polling them (and watching etcd, when
    /// configured); call inside a tokio runtime.
    pub fn start(cfg: RemoteConfig) -> Result<Arc<Remote>, ApiError> {
        let r = Arc::new(Remote {
            cfg,
            members: RwLock::default(),
            changed: Notify::new(),
            inflight: AtomicUsize::new(0),
            resumed: AtomicUsize::new(0),
            prefill_retries: AtomicUsize::new(0),
        });
        for a in &r.cfg.prefill {
            r.add_worker(Role::Prefill, a)?;
        }
        for a in &r.cfg.decode {
            r.add_worker(Role::Decode, a)?;
        }
        if !r.cfg.etcd.is_empty() {
            r.discover()?;
        }
        tokio::spawn(poll(Arc::downgrade(&r)));
        Ok(r)
    }

    #[cfg(feature = "etcd")]
    fn discover(self: &Arc<Self>) -> Result<(), ApiError> {
        use protocol::discovery::{Change, watch};
        let (tx, mut rx) = mpsc::unbounded_channel();
        tokio::spawn(watch(self.cfg.etcd.clone(), tx));
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(c) = rx.recv().await {
                let Some(r) = me.upgrade() else { return };
                let (up, role, addr) = match c {
                    Change::Up { role, addr } => (true, role, addr),
                    Change::Down { role, addr } => (false, role, addr),
                };
                let Ok(role) = role.parse::<Role>() else {
                    continue;
                };
                if up {
                    if let Err(e) = r.add_worker(role, &addr) {
                        tracing::warn!(error = %e, "ignoring a discovered worker");
                    }
                } else {
                    r.remove_worker(role, &addr);
                }
            }
        });
        Ok(())
    }

    #[cfg(not(feature = "etcd"))]
    fn discover(self: &Arc<Self>) -> Result<(), ApiError> {
        Err(ApiError::Internal(
            "this build has no etcd discovery (build with `--features etcd`)".into(),
        ))
    }

    /// Adds a worker to the routing table (no-op when it is there already).
    pub fn add_worker(&self, role: Role, addr: &str) -> Result<(), ApiError> {
        let mut m = self.members.write().expect("members poisoned");
        match role {
            Role::Prefill if !m.prefill.iter().any(|w| w.addr == addr) => {
                m.prefill.push(Worker::new(addr, |c| {
                    PrefillWorkerClient::new(c).max_decoding_message_size(64 << 20)
                })?);
            }
            Role::Decode if !m.decode.iter().any(|w| w.addr == addr) => {
                m.decode.push(Worker::new(addr, |c| {
                    DecodeWorkerClient::new(c).max_decoding_message_size(64 << 20)
                })?);
            }
            _ => return Ok(()),
        }
        tracing::info!(?role, worker = %addr, "worker joined the routing table");
        Ok(())
    }

    /// Drops a worker from the routing table (requests on it fail over as if it died).
    pub fn remove_worker(&self, role: Role, addr: &str) {
        let mut m = self.members.write().expect("members poisoned");
        let before = m.prefill.len() + m.decode.len();
        match role {
            Role::Prefill => m.prefill.retain(|w| w.addr != addr),
            Role::Decode => m.decode.retain(|w| w.addr != addr),
        }
        if m.prefill.len() + m.decode.len() < before {
            tracing::info!(?role, worker = %addr, "worker left the routing table");
        }
    }

    /// The prefill workers in the routing table now.
    pub fn prefill_workers(&self) -> Vec<Arc<Prefill>> {
        self.members
            .read()
            .expect("members poisoned")
            .prefill
            .clone()
    }

    /// The decode workers in the routing table now.
    pub fn decode_workers(&self) -> Vec<Arc<Decode>> {
        self.members
            .read()
            .expect("members poisoned")
            .decode
            .clone()
    }

    /// Waits until every worker has answered once (or `timeout` passes); returns whether all did.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let decode = self.decode_workers();
            let all = !decode.is_empty()
                && self.prefill_workers().iter().all(|w| w.healthy())
                && decode.iter().all(|w| w.healthy());
            if all {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts a request's driver; its events arrive on the returned channel.
    pub fn submit(
        self: &Arc<Self>,
        engine: &Arc<Engine>,
        id: RequestId,
        prompt: Vec<TokenId>,
        params: GenerationParams,
        cancel: CancelFlag,
    ) -> Result<mpsc::UnboundedReceiver<WorkerEvent>, ApiError> {
        if self.inflight.load(Ordering::Acquire) >= self.cfg.max_inflight {
            return Err(ApiError::Overloaded(
                "the server is at capacity (requests in flight); retry shortly".into(),
            ));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let me = self.clone();
        let max_context = engine.max_context();
        tokio::spawn(async move {
            let _busy = Busy::on(&me.inflight);
            let d = Driver {
                remote: &me,
                id: id.0,
                prompt,
                params,
                cancel,
                tx,
                sent: Vec::new(),
                reported: false,
                max_context,
            };
            d.run().await;
        });
        Ok(rx)
    }

    /// The least loaded healthy decode worker, waiting up to the hold time for one.
    async fn decode_worker(&self, cancel: &CancelFlag) -> Option<Arc<Decode>> {
        let deadline = tokio::time::Instant::now() + self.cfg.hold;
        loop {
            let decode = self.decode_workers();
            let best = decode.into_iter().filter(|w| w.healthy()).min_by_key(|w| {
                let s = w.stats();
                (
                    w.inflight.load(Ordering::Acquire) + s.waiting as usize,
                    u64::MAX - s.kv_blocks_free,
                )
            });
            if let Some(w) = best {
                return Some(w);
            }
            if cancel.is_cancelled() || tokio::time::Instant::now() >= deadline {
                return None;
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), self.changed.notified()).await;
        }
    }

    /// The healthy prefill worker with the shortest queue, among those not yet `tried`.
    fn prefill_worker(&self, fingerprint: u64, tried: &[String]) -> Option<Arc<Prefill>> {
        self.prefill_workers()
            .into_iter()
            .filter(|w| {
                w.healthy() && !tried.contains(&w.addr) && w.stats().fingerprint == fingerprint
            })
            .min_by_key(|w| queue_depth(w))
    }
}

/// Prefills on `w` now: this scheduler's in flight there, or what it last reported queued.
fn queue_depth(w: &Prefill) -> usize {
    w.inflight
        .load(Ordering::Acquire)
        .max(w.stats().waiting as usize)
}

/// Polls every worker's `Stats`: health and load for routing.
async fn poll(remote: std::sync::Weak<Remote>) {
    loop {
        let Some(r) = remote.upgrade() else { return };
        let period = r.cfg.poll;
        let mut calls = Vec::new();
        for w in &r.decode_workers() {
            calls.push(poll_one(&r, w, |mut c| async move {
                c.stats(pb::Empty {}).await
            }));
        }
        for w in &r.prefill_workers() {
            calls.push(poll_one(&r, w, |mut c| async move {
                c.stats(pb::Empty {}).await
            }));
        }
        drop(r);
        for c in calls {
            let _ = c.await;
        }
        tokio::time::sleep(period).await;
    }
}

/// One `Stats` call to `w` (bounded by five poll periods), recorded.
fn poll_one<C, F, Fut>(r: &Arc<Remote>, w: &Arc<Worker<C>>, call: F) -> tokio::task::JoinHandle<()>
where
    C: Clone + Send + Sync + 'static,
    F: FnOnce(C) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<tonic::Response<pb::WorkerStats>, Status>> + Send,
{
    let (r, w) = (r.clone(), w.clone());
    tokio::spawn(async move {
        let res = tokio::time::timeout(r.cfg.poll * 5, call(w.client.clone())).await;
        update(&r, &w, res);
    })
}

fn update<C>(
    r: &Remote,
    w: &Worker<C>,
    res: Result<Result<tonic::Response<pb::WorkerStats>, Status>, tokio::time::error::Elapsed>,
) {
    match res {
        Ok(Ok(s)) => {
            *w.stats.lock().expect("stats poisoned") = s.into_inner();
            if !w.healthy.swap(true, Ordering::AcqRel) {
                tracing::info!(worker = %w.addr, "worker up");
                r.changed.notify_waiters();
            }
        }
        Ok(Err(e)) => w.down(&e),
        Err(_) => w.down(&Status::deadline_exceeded("stats timed out")),
    }
}

/// Why a phase of a request stopped.
enum Fault {
    /// The decode worker is gone (or lost the lease): start over on another one.
    DecodeLost,
    /// The request ends with this error.
    Fatal(WorkerError),
    /// The client went away.
    Cancelled,
}

fn is_lost(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::Aborted
            | Code::NotFound
            | Code::DataLoss
            | Code::DeadlineExceeded
    )
}

fn fatal(s: &Status) -> WorkerError {
    match s.code() {
        Code::ResourceExhausted => WorkerError::Overloaded(s.message().to_string()),
        _ => WorkerError::Internal(s.message().to_string()),
    }
}

/// One request's life across the workers.
struct Driver<'a> {
    remote: &'a Remote,
    id: u64,
    prompt: Vec<TokenId>,
    params: GenerationParams,
    cancel: CancelFlag,
    tx: mpsc::UnboundedSender<WorkerEvent>,
    /// Tokens already forwarded to the client.
    sent: Vec<TokenId>,
    /// The prompt's report (prefilled / prompt log-probabilities) was forwarded.
    reported: bool,
    max_context: usize,
}

/// What forwarding an event did.
enum Forwarded {
    More,
    Finished,
}

impl Driver<'_> {
    fn gone(&self) -> bool {
        self.cancel.is_cancelled() || self.tx.is_closed()
    }

    fn forward(&mut self, ev: WorkerEvent) -> Forwarded {
        match ev {
            WorkerEvent::Prefilled { .. } | WorkerEvent::PromptLogprobs(_) => {
                // A re-prefill reports the prompt again; the client heard it once.
                if !self.reported {
                    self.reported = true;
                    let _ = self.tx.send(ev);
                }
                Forwarded::More
            }
            WorkerEvent::Token(t) => {
                let done = t.finish.is_some();
                self.sent.push(t.token);
                let _ = self.tx.send(WorkerEvent::Token(t));
                if done {
                    Forwarded::Finished
                } else {
                    Forwarded::More
                }
            }
            ev @ (WorkerEvent::Done | WorkerEvent::Error(_)) => {
                let _ = self.tx.send(ev);
                Forwarded::Finished
            }
        }
    }

    fn fail(&self, e: WorkerError) {
        let _ = self.tx.send(WorkerEvent::Error(e));
    }

    /// Every token whose KV a prefill of this request produces now.
    fn prefill_tokens(&self) -> Vec<TokenId> {
        let mut t = self.prompt.clone();
        if let Some((_, head)) = self.sent.split_last() {
            t.extend_from_slice(head);
        }
        t
    }

    async fn run(mut self) {
        let mut attempts = 0usize;
        loop {
            if self.gone() {
                return;
            }
            attempts += 1;
            if attempts > 16 {
                self.fail(WorkerError::Internal(
                    "the request failed on every attempt (workers keep failing)".into(),
                ));
                return;
            }
            let Some(d) = self.remote.decode_worker(&self.cancel).await else {
                if !self.gone() {
                    self.fail(WorkerError::Overloaded(format!(
                        "no decode worker became available within {:?}",
                        self.remote.cfg.hold
                    )));
                }
                return;
            };
            let _busy = Busy::on(&d.inflight);
            let commit = if self.prompt.len() < self.remote.cfg.disagg_min_tokens {
                None
            } else {
                match self.prefill_phase(&d).await {
                    Ok(Some((commit, events))) => {
                        let mut finished = false;
                        for ev in events {
                            if let Forwarded::Finished = self.forward(ev) {
                                finished = true;
                            }
                        }
                        if finished {
                            release(&d, commit.lease_id);
                            return;
                        }
                        Some(commit)
                    }
                    // No prefill worker could: the decode worker prefills.
                    Ok(None) => None,
                    Err(Fault::DecodeLost) => continue,
                    Err(Fault::Cancelled) => return,
                    Err(Fault::Fatal(e)) => {
                        self.fail(e);
                        return;
                    }
                }
            };
            if self.sent.len() + self.prompt.len() >= self.max_context && !self.sent.is_empty() {
                // Cannot happen with a consistent worker (it ends the stream at the context).
                self.fail(WorkerError::Internal(
                    "the stream ran past the context".into(),
                ));
                return;
            }
            match self.generate_phase(&d, commit).await {
                Ok(()) => return,
                Err(Fault::DecodeLost) => {
                    if !self.sent.is_empty() {
                        self.remote.resumed.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("tandem_stream_resumes_total").increment(1);
                    }
                    continue;
                }
                Err(Fault::Cancelled) => return,
                Err(Fault::Fatal(e)) => {
                    self.fail(e);
                    return;
                }
            }
        }
    }

    /// Reserve on `d`, then prefill on a prefill worker: the commit and the events for the
    /// client, or `None` when no prefill worker is left.
    async fn prefill_phase(
        &mut self,
        d: &Arc<Decode>,
    ) -> Result<Option<(pb::Commit, Vec<WorkerEvent>)>, Fault> {
        let fingerprint = d.stats().fingerprint;
        let Some(best) = self.remote.prefill_worker(fingerprint, &[]) else {
            return Ok(None);
        };
        let max_queue = self.remote.cfg.max_prefill_queue;
        if max_queue > 0 && queue_depth(&best) >= max_queue {
            metrics::counter!("tandem_prefill_spills_total").increment(1);
            return Ok(None);
        }
        let tokens = self.prefill_tokens();
        let st = d.stats();
        let need = tokens.len().div_ceil(st.block_size.max(1) as usize) as u64;
        if need > st.kv_blocks_total {
            return Err(Fault::Fatal(WorkerError::Overloaded(format!(
                "the prompt needs {need} KV blocks, more than the decode worker's {}",
                st.kv_blocks_total
            ))));
        }
        // Blocks free up as other sequences finish: wait for them (bounded), as a colocated
        // worker's queue would.
        let deadline = tokio::time::Instant::now() + self.remote.cfg.hold;
        let target = loop {
            let mut dc = d.client.clone();
            let reserve = dc.reserve(pb::ReserveRequest {
                request_id: self.id,
                tokens: tokens.clone(),
                fingerprint,
                use_prefix_cache: self.params.prompt_logprobs.is_none(),
            });
            match self.until_gone(reserve).await? {
                Ok(r) => {
                    break r
                        .into_inner()
                        .target
                        .ok_or(Fault::Fatal(WorkerError::Internal(
                            "the decode worker reserved no target".into(),
                        )))?;
                }
                Err(s) if is_lost(&s) => {
                    d.down(&s);
                    return Err(Fault::DecodeLost);
                }
                Err(s)
                    if s.code() == Code::ResourceExhausted
                        && tokio::time::Instant::now() < deadline =>
                {
                    self.until_gone(tokio::time::sleep(Duration::from_millis(20)))
                        .await?;
                }
                Err(s) => return Err(Fault::Fatal(fatal(&s))),
            }
        };
        let lease = target.lease_id;
        let mut tried = Vec::new();
        loop {
            let Some(p) = self.remote.prefill_worker(fingerprint, &tried) else {
                release(d, lease);
                return Ok(None);
            };
            tried.push(p.addr.clone());
            let _busy = Busy::on(&p.inflight);
            let mut pc = p.client.clone();
            let call = pc.prefill(pb::PrefillRequest {
                request_id: self.id,
                prompt: self.prompt.clone(),
                generated: self.sent.clone(),
                params: Some(pb::GenerationParams::from(&self.params)),
                target: Some(target.clone()),
                transport: self.remote.cfg.transport.clone(),
            });
            match self.until_gone(call).await {
                Err(Fault::Cancelled) => {
                    cancel_prefill(&p, self.id);
                    release(d, lease);
                    return Err(Fault::Cancelled);
                }
                Err(f) => return Err(f),
                Ok(Ok(reply)) => {
                    let r = reply.into_inner();
                    let mut events = Vec::with_capacity(r.events.len());
                    for e in &r.events {
                        events.push(
                            WorkerEvent::try_from(e)
                                .map_err(|e| Fault::Fatal(WorkerError::Internal(e.to_string())))?,
                        );
                    }
                    metrics::counter!("tandem_kv_transfers_total", "transport" => r.transport)
                        .increment(1);
                    let commit = pb::Commit {
                        lease_id: lease,
                        checksum: r.checksum,
                        filled: r.filled,
                    };
                    return Ok(Some((commit, events)));
                }
                Ok(Err(s)) => {
                    if s.code() == Code::Unavailable {
                        p.down(&s);
                    }
                    self.remote.prefill_retries.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("tandem_prefill_retries_total").increment(1);
                    tracing::warn!(worker = %p.addr, error = %s.message(), "prefill failed; trying another worker");
                }
            }
        }
    }

    /// Streams the rest of the request from `d`.
    async fn generate_phase(
        &mut self,
        d: &Arc<Decode>,
        commit: Option<pb::Commit>,
    ) -> Result<(), Fault> {
        let mut dc = d.client.clone();
        let call = dc.generate(pb::GenerateRequest {
            request_id: self.id,
            prompt: self.prompt.clone(),
            generated: self.sent.clone(),
            params: Some(pb::GenerationParams::from(&self.params)),
            commit,
        });
        let mut stream = match self.until_gone(call).await? {
            Ok(s) => s.into_inner(),
            Err(s) if is_lost(&s) => {
                if s.code() == Code::Unavailable {
                    d.down(&s);
                }
                return Err(Fault::DecodeLost);
            }
            Err(s) => return Err(Fault::Fatal(fatal(&s))),
        };
        loop {
            let msg = match self.until_gone(stream.message()).await {
                Ok(m) => m,
                Err(f) => {
                    cancel_decode(d, self.id);
                    return Err(f);
                }
            };
            match msg {
                Ok(Some(e)) => {
                    let ev = WorkerEvent::try_from(&e)
                        .map_err(|e| Fault::Fatal(WorkerError::Internal(e.to_string())))?;
                    if let Forwarded::Finished = self.forward(ev) {
                        return Ok(());
                    }
                }
                // The stream broke (or ended early): the worker died or is shutting down.
                Ok(None) => return Err(Fault::DecodeLost),
                Err(s) => {
                    d.down(&s);
                    tracing::warn!(worker = %d.addr, error = %s.message(), tokens = self.sent.len(), "decode stream broke; resuming elsewhere");
                    return Err(Fault::DecodeLost);
                }
            }
        }
    }

    /// Awaits `f` unless the client goes away first.
    async fn until_gone<T>(&self, f: impl std::future::Future<Output = T>) -> Result<T, Fault> {
        let cancelled = async {
            loop {
                if self.cancel.is_cancelled() {
                    return;
                }
                tokio::select! {
                    _ = self.tx.closed() => return,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        };
        tokio::select! {
            v = f => Ok(v),
            _ = cancelled => Err(Fault::Cancelled),
        }
    }
}

fn release(d: &Arc<Decode>, lease: u64) {
    let mut c = d.client.clone();
    tokio::spawn(async move {
        let _ = c.release(pb::ReleaseRequest { lease_id: lease }).await;
    });
}

fn cancel_decode(d: &Arc<Decode>, id: u64) {
    let mut c = d.client.clone();
    tokio::spawn(async move {
        let _ = c.cancel(pb::CancelRequest { request_id: id }).await;
    });
}

fn cancel_prefill(p: &Arc<Prefill>, id: u64) {
    let mut c = p.client.clone();
    tokio::spawn(async move {
        let _ = c.cancel(pb::CancelRequest { request_id: id }).await;
    });
}
