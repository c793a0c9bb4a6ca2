//! The disaggregated cluster: prefill and decode workers in other processes, reached over
//! gRPC (`tandem.v2`), and the life of each request across them.
//!
//! A request (see `docs/ARCHITECTURE.md`):
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
//!
//! # Layout
//! - this file: the workers, the routing table (static and discovered), health and load polling;
//! - [`policy`]: the routing rules as pure functions of the workers' loads;
//! - [`kv_route`]: KV-aware routing, a pure function of where a prompt's prefix is and the
//!   load; `blocks`: following the workers' and the store's block events for it;
//! - `driver`: one request's life across them.

mod blocks;
mod driver;
pub mod kv_route;
pub mod policy;

use crate::error::ApiError;
use crate::plan::placement;
use frontend::TokenId;
use frontend::request::{CancellationToken, GenerationParams, RequestId, WorkerEvent};
use protocol::pb;
use protocol::pb::decode_worker_client::DecodeWorkerClient;
use protocol::pb::prefill_worker_client::PrefillWorkerClient;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore, mpsc};
use tonic::Status;
use tonic::transport::Channel;

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
    /// KV transport to ask for; `None`: the prefill worker picks.
    pub transport: Option<protocol::KvTransport>,
    /// How long a request waits for a decode worker when none is healthy.
    pub hold: Duration,
    /// Requests in flight at most; beyond it, 503.
    pub max_inflight: usize,
    /// How often worker health and load are polled.
    pub poll: Duration,
    /// The etcd to discover workers from (cargo feature `etcd`), beside the static ones; no
    /// endpoints: none.
    pub etcd: protocol::discovery::EtcdConfig,
    /// The model fingerprint a decode worker must report to be routed to (the scheduler's
    /// frontend's: same weights, precision and KV format); `None`: any.
    pub fingerprint: Option<u64>,
    /// The cluster secret every connection to a worker proves (`protocol::auth`); `None`: a
    /// loopback-only cluster.
    pub secret: Option<protocol::auth::ClusterSecret>,
    /// How long a `Prefill` call may take before it is cancelled and retried elsewhere.
    pub prefill_timeout: Duration,
    /// Per-request placement from the engine's measured costs against this SLO
    /// ([`crate::plan::placement`]); `None`: the fixed rules of `disagg_min_tokens` and
    /// `max_prefill_queue`.
    pub placement: Option<CostPlacement>,
    /// KV-aware routing of requests to decode workers ([`kv_route`]); `None`: by load alone.
    pub kv_routing: Option<kv_route::KvRouting>,
    /// The pooled KV store whose tiers KV-aware routing counts (`host:port`).
    pub kv_store: Option<String>,
}

/// The cost model and the SLO that per-request placement decides with.
#[derive(Debug, Clone)]
pub struct CostPlacement {
    pub cost: Arc<crate::plan::cost::CostModel>,
    pub slo: crate::plan::placement::Slo,
}

/// Default of [`RemoteConfig::disagg_min_tokens`].
pub const DEFAULT_DISAGG_MIN_TOKENS: usize = 64;
/// Default of [`RemoteConfig::hold`], in seconds.
pub const DEFAULT_HOLD_SECS: u64 = 60;
/// Default of [`RemoteConfig::max_inflight`].
pub const DEFAULT_MAX_INFLIGHT: usize = 256;
/// Default of [`RemoteConfig::prefill_timeout`], in seconds.
pub const DEFAULT_PREFILL_TIMEOUT_SECS: u64 = 120;

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig {
            prefill: Vec::new(),
            decode: Vec::new(),
            disagg_min_tokens: DEFAULT_DISAGG_MIN_TOKENS,
            max_prefill_queue: 0,
            transport: None,
            hold: Duration::from_secs(DEFAULT_HOLD_SECS),
            max_inflight: DEFAULT_MAX_INFLIGHT,
            poll: Duration::from_millis(200),
            etcd: Default::default(),
            fingerprint: None,
            secret: None,
            prefill_timeout: Duration::from_secs(DEFAULT_PREFILL_TIMEOUT_SECS),
            placement: None,
            kv_routing: Some(kv_route::KvRouting::default()),
            kv_store: None,
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
    /// Prompt tokens this scheduler sent it to prefill, not yet prefilled.
    prefill_tokens: AtomicUsize,
    stats: Mutex<pb::WorkerStats>,
    /// The blocks its prefix cache holds (decode workers, with KV-aware routing).
    blocks: Arc<blocks::Followed>,
}

impl<C: Clone> Worker<C> {
    fn new(
        addr: &str,
        secret: Option<protocol::auth::ClusterSecret>,
        make: impl Fn(Channel) -> C,
    ) -> Result<Arc<Worker<C>>, ApiError> {
        let channel = protocol::net::channel(addr, secret).map_err(ApiError::Internal)?;
        Ok(Arc::new(Worker {
            addr: addr.to_string(),
            client: make(channel),
            healthy: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            prefill_tokens: AtomicUsize::new(0),
            stats: Mutex::new(pb::WorkerStats::default()),
            blocks: Arc::default(),
        }))
    }
}

impl<C> Worker<C> {
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Requests this scheduler has on it now.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
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

/// Counts a request (or `n` of its tokens) on a worker while alive.
struct Busy<'a>(&'a AtomicUsize, usize);
impl<'a> Busy<'a> {
    fn on(c: &'a AtomicUsize) -> Busy<'a> {
        Busy::add(c, 1)
    }
    fn add(c: &'a AtomicUsize, n: usize) -> Busy<'a> {
        c.fetch_add(n, Ordering::AcqRel);
        Busy(c, n)
    }
}
impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::AcqRel);
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
    /// Places for requests in flight ([`RemoteConfig::max_inflight`]): taken before a request
    /// starts, so a burst cannot pass the limit between a check and a count.
    admission: Arc<Semaphore>,
    /// Streams resumed on another (or a restarted) decode worker after theirs failed.
    pub resumed: AtomicUsize,
    /// Prefills retried on another prefill worker (or handed to the decode worker).
    pub prefill_retries: AtomicUsize,
    /// Prompts placed on a prefill worker and on their decode worker, so far.
    pub placed_prefill: AtomicUsize,
    pub placed_decode: AtomicUsize,
    /// The blocks the pooled store holds, by tier (with KV-aware routing and a store).
    store_blocks: Arc<blocks::Followed>,
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
            admission: Arc::new(Semaphore::new(cfg.max_inflight.max(1))),
            cfg,
            members: RwLock::default(),
            changed: Notify::new(),
            resumed: AtomicUsize::new(0),
            prefill_retries: AtomicUsize::new(0),
            placed_prefill: AtomicUsize::new(0),
            placed_decode: AtomicUsize::new(0),
            store_blocks: Arc::default(),
        });
        if let (Some(_), Some(addr)) = (&r.cfg.kv_routing, &r.cfg.kv_store) {
            blocks::follow_store(&r.store_blocks, addr, r.cfg.secret.clone())
                .map_err(ApiError::Internal)?;
        }
        for a in &r.cfg.prefill {
            r.add_worker(Role::Prefill, a)?;
        }
        for a in &r.cfg.decode {
            r.add_worker(Role::Decode, a)?;
        }
        if !r.cfg.etcd.endpoints.is_empty() {
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
                match c {
                    Change::Up { role, entry } => {
                        let Ok(role) = role.parse::<Role>() else {
                            continue;
                        };
                        if !r.admits(entry.fingerprint) {
                            tracing::warn!(
                                worker = %entry.addr,
                                fingerprint = format_args!("{:016x}", entry.fingerprint),
                                "not routing to a discovered worker of another model"
                            );
                        } else if let Err(e) = r.add_worker(role, &entry.addr) {
                            tracing::warn!(error = %e, "ignoring a discovered worker");
                        }
                    }
                    Change::Down { role, addr } => {
                        if let Ok(role) = role.parse::<Role>() {
                            r.remove_worker(role, &addr);
                        }
                    }
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

    /// Whether a worker announcing `fingerprint` serves this scheduler's model.
    pub fn admits(&self, fingerprint: u64) -> bool {
        self.cfg.fingerprint.is_none_or(|f| f == fingerprint)
    }

    /// Adds a worker to the routing table (no-op when it is there already).
    pub fn add_worker(&self, role: Role, addr: &str) -> Result<(), ApiError> {
        let mut m = self.members.write().expect("members poisoned");
        match role {
            Role::Prefill if !m.prefill.iter().any(|w| w.addr == addr) => {
                m.prefill
                    .push(Worker::new(addr, self.cfg.secret.clone(), |c| {
                        PrefillWorkerClient::new(c).max_decoding_message_size(64 << 20)
                    })?);
            }
            Role::Decode if !m.decode.iter().any(|w| w.addr == addr) => {
                let w = Worker::new(addr, self.cfg.secret.clone(), |c| {
                    DecodeWorkerClient::new(c).max_decoding_message_size(64 << 20)
                })?;
                if self.cfg.kv_routing.is_some() {
                    blocks::follow_decode(&w.blocks, addr, w.client.clone());
                }
                m.decode.push(w);
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
        id: RequestId,
        prompt: Vec<TokenId>,
        params: GenerationParams,
        cancel: CancellationToken,
    ) -> Result<mpsc::UnboundedReceiver<WorkerEvent>, ApiError> {
        let admitted = self.admission.clone().try_acquire_owned().map_err(|_| {
            ApiError::Overloaded(
                "the server is at capacity (requests in flight); retry shortly".into(),
            )
        })?;
        let (tx, rx) = mpsc::unbounded_channel();
        driver::spawn(self.clone(), id.0, prompt, params, cancel, tx, admitted);
        Ok(rx)
    }

    /// The decode worker for a prefill of `tokens` — by where their prefix is cached and the
    /// load ([`kv_route`]), or by load alone — waiting up to the hold time for a healthy one;
    /// with the leading tokens it is expected to hold or fetch from the store (0 when routing
    /// by load, which knows no caches).
    async fn decode_worker(
        &self,
        tokens: &[TokenId],
        cancel: &CancellationToken,
    ) -> Option<(Arc<Decode>, usize)> {
        let deadline = tokio::time::Instant::now() + self.cfg.hold;
        loop {
            let decode = self.decode_workers();
            if let Some((i, reason, cached)) = self.route(&decode, tokens) {
                metrics::counter!("tandem_route_decisions_total", "reason" => reason.name())
                    .increment(1);
                return Some((decode[i].clone(), cached));
            }
            if cancel.is_cancelled() || tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = tokio::time::timeout(Duration::from_millis(100), self.changed.notified()) => {}
            }
        }
    }

    /// The routing decision among `decode` for a prefill of `tokens`: the worker, why, and the
    /// leading tokens it holds or can fetch from the store, as the index sees them.
    fn route(
        &self,
        decode: &[Arc<Decode>],
        tokens: &[TokenId],
    ) -> Option<(usize, kv_route::RouteReason, usize)> {
        let stats: Vec<pb::WorkerStats> = decode.iter().map(|w| w.stats()).collect();
        let loads: Vec<policy::DecodeLoad> = decode
            .iter()
            .zip(&stats)
            .map(|(w, s)| policy::DecodeLoad {
                healthy: w.healthy(),
                same_model: self.admits(s.fingerprint),
                inflight: w.inflight.load(Ordering::Acquire),
                waiting: s.waiting as usize,
                free_blocks: s.kv_blocks_free,
            })
            .collect();
        let Some(r) = &self.cfg.kv_routing else {
            return policy::pick_decode(&loads).map(|i| (i, kv_route::RouteReason::Load, 0));
        };
        // The model's block hashes, salted as its workers salt them.
        let model = stats
            .iter()
            .zip(&loads)
            .find(|(s, l)| l.same_model && s.block_size > 0);
        let hashes = match model {
            Some((s, _)) => {
                let bs = s.block_size as usize;
                let salt = frontend::block::salt(self.cfg.fingerprint.unwrap_or(s.fingerprint), bs);
                let usable = tokens.len().saturating_sub(1) / bs * bs;
                frontend::block::block_hashes(salt, &tokens[..usable], bs)
            }
            None => Vec::new(),
        };
        let bs = model.map_or(1, |(s, _)| s.block_size.max(1) as usize);
        let candidates: Vec<kv_route::KvCandidate> = decode
            .iter()
            .zip(&stats)
            .zip(&loads)
            .map(|((w, s), l)| kv_route::KvCandidate {
                load: *l,
                cached_blocks: w.blocks.prefix(&hashes),
                prefill_blocks: w.prefill_tokens.load(Ordering::Acquire) / bs,
                decode_blocks: s.kv_blocks_total.saturating_sub(s.kv_blocks_free),
            })
            .collect();
        let store: Vec<kv_route::StoreTier> = self
            .store_blocks
            .tiers(&hashes)
            .into_iter()
            .map(|t| match t {
                pb::StoreTier::Disk => kv_route::StoreTier::Disk,
                _ => kv_route::StoreTier::Ram,
            })
            .collect();
        let draw = if r.temperature > 0.0 {
            rand::random::<f64>()
        } else {
            0.0
        };
        let (i, reason) = kv_route::pick(r, &candidates, hashes.len(), &store, draw)?;
        Some((i, reason, candidates[i].cached_blocks.max(store.len()) * bs))
    }

    /// The prefill workers with their loads as routing sees them (`tried`: failed this request).
    fn prefill_loads(&self, tried: &[String]) -> (Vec<Arc<Prefill>>, Vec<policy::PrefillLoad>) {
        let workers = self.prefill_workers();
        let loads = workers
            .iter()
            .map(|w| policy::PrefillLoad {
                healthy: w.healthy(),
                tried: tried.contains(&w.addr),
                fingerprint: w.stats().fingerprint,
                queue: queue_depth(w),
            })
            .collect();
        (workers, loads)
    }

    /// The healthy prefill worker with the shortest queue, among those not yet `tried`.
    fn prefill_worker(&self, fingerprint: u64, tried: &[String]) -> Option<Arc<Prefill>> {
        let (workers, loads) = self.prefill_loads(tried);
        policy::pick_prefill(&loads, fingerprint).map(|i| workers[i].clone())
    }

    /// Where a prompt going to decode worker `d` is prefilled: by the cost model when there
    /// is one (with its prediction), else by the fixed rules.
    fn place_prefill(
        &self,
        prompt: policy::PromptShape,
        d: &Decode,
        horizon: usize,
    ) -> (policy::PrefillPlace, Option<placement::Decision>) {
        let fingerprint = d.stats().fingerprint;
        let (workers, loads) = self.prefill_loads(&[]);
        let Some(cp) = &self.cfg.placement else {
            let rules = policy::Disaggregation {
                min_tokens: self.cfg.disagg_min_tokens,
                max_prefill_queue: self.cfg.max_prefill_queue,
            };
            return (rules.place(prompt, &loads, fingerprint), None);
        };
        if prompt.prompt_logprobs {
            return (
                policy::PrefillPlace::Decode(policy::LocalReason::PromptLogprobs),
                None,
            );
        }
        let best = policy::pick_prefill(&loads, fingerprint);
        let ds = d.stats();
        // This scheduler's own requests count at once; the reported load lags a poll behind.
        let reported = ds.running as usize + ds.waiting as usize;
        let running = reported.max(d.inflight().saturating_sub(1));
        let context = ds.context_tokens as usize + running.saturating_sub(reported) * prompt.tokens;
        let view = placement::DecodeView {
            threads: ds.threads.max(1) as usize,
            running,
            context,
            backlog: (ds.prefill_tokens as usize).max(d.prefill_tokens.load(Ordering::Acquire)),
            max_batch_tokens: ds.max_batch_tokens.max(1) as usize,
            horizon,
            pace_s: (ds.pace_us > 0).then(|| ds.pace_us as f64 / 1e6),
        };
        let pview = best.map(|i| {
            let w = &workers[i];
            let s = w.stats();
            placement::PrefillView {
                threads: s.threads.max(1) as usize,
                backlog: (s.prefill_tokens as usize).max(w.prefill_tokens.load(Ordering::Acquire)),
                tcp: self.cfg.transport == Some(protocol::KvTransport::Tcp),
            }
        });
        let cached = prompt.cached.min(prompt.tokens);
        let decision = placement::decide(
            &cp.cost,
            cp.slo,
            prompt.tokens,
            cached,
            &view,
            pview.as_ref(),
        );
        let place = match (decision.place, best) {
            (placement::Place::Prefill, Some(i)) => policy::PrefillPlace::PrefillWorker(i),
            (_, None) => policy::PrefillPlace::Decode(policy::LocalReason::NoPrefillWorker),
            (placement::Place::Decode, Some(_)) => {
                policy::PrefillPlace::Decode(policy::LocalReason::Predicted)
            }
        };
        (place, Some(decision))
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
            let s = s.into_inner();
            let foreign = !r.admits(s.fingerprint);
            *w.stats.lock().expect("stats poisoned") = s;
            if !w.healthy.swap(true, Ordering::AcqRel) {
                if foreign {
                    tracing::warn!(worker = %w.addr, "worker up, serving another model file, precision or KV format than the scheduler's: not routed to");
                }
                tracing::info!(worker = %w.addr, "worker up");
                r.changed.notify_waiters();
            }
        }
        Ok(Err(e)) => w.down(&e),
        Err(_) => w.down(&Status::deadline_exceeded("stats timed out")),
    }
}
