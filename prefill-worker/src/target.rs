//! Where a prefill's KV goes, and how it gets there.
//!
//! - [`Transport::Shm`]: the decode worker is on this host. Its pool file is mapped here
//!   ([`KvPool::attach`], cached per file) and the forward pass writes the reserved blocks in
//!   place: no byte is copied, the CPU analogue of an RDMA one-sided write. The prompt's cached
//!   prefix is read where it lies. The pass holds its blocks through the pool's fence
//!   ([`kv_store::shm::fence`]) from before its first write until it is done, so a lease the
//!   decode worker took back is never written, and one being written is never reused.
//! - [`Transport::Tcp`]: the decode worker is elsewhere. The pass runs into a sequence of this
//!   worker's own pool (its own prefix cache saves recomputing shared prefixes), and after
//!   each layer a sender thread streams that layer's slabs to the decode worker's data plane
//!   while the next layers compute.
//!
//! Either way the checksum covers the written blocks in `(layer, block)` order
//! ([`kv_store::sequence_checksum`]'s definition). It is summed by the forward pass's layer
//! hook ([`LayerSum`]) while each layer's KV is still in cache, so neither the sender thread nor
//! the end of the pass reads the KV again for it; the decode worker recomputes it before it
//! decodes.

use crate::PrefillJob;
use engine::kv::BlockId;
use engine::request::WorkerError;
use engine::{Engine, KvPool, KvSequence, TokenId};
use kv_store::shm::fence::{Hold, lease_tag};
use kv_store::tcp::KvSender;
use protocol::auth::ClusterSecret;
use protocol::{LeaseId, pb};
use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use protocol::KvTransport as Transport;

/// Checks what a `Prefill` call says about where the KV goes, before any of it is used: a
/// grant the decode worker signed under the cluster secret (so nobody else chose its blocks,
/// file or address), for `tokens` positions (prompt plus generated tokens but the last) in a
/// pool of `block_size`-position blocks, moved by `transport`. Everything here comes from the
/// network; a bad field is the caller's error (`InvalidArgument`), never a panic or a write
/// outside the pool.
pub fn check_target(
    t: &pb::KvTarget,
    tokens: usize,
    block_size: usize,
    transport: Option<Transport>,
    secret: Option<&ClusterSecret>,
) -> Result<(), String> {
    LeaseId::from_wire(&t.lease_id).map_err(|e| e.to_string())?;
    if !protocol::grant::verify(secret, t) {
        return Err("the grant is not signed with this cluster's secret".into());
    }
    if t.pool_blocks == 0 || t.pool_blocks > u32::MAX as u64 {
        return Err(format!("a pool of {} blocks", t.pool_blocks));
    }
    let need = tokens.div_ceil(block_size);
    if t.block_ids.len() < need {
        return Err(format!(
            "{} blocks for {tokens} positions ({need} needed)",
            t.block_ids.len()
        ));
    }
    let mut seen = std::collections::HashSet::with_capacity(t.block_ids.len());
    for &b in &t.block_ids {
        if b as u64 >= t.pool_blocks {
            return Err(format!("block {b} outside a pool of {}", t.pool_blocks));
        }
        if !seen.insert(b) {
            return Err(format!("block {b} named twice"));
        }
    }
    let cached = t.cached_tokens as usize;
    if !cached.is_multiple_of(block_size) || (tokens > 0 && cached >= tokens) {
        return Err(format!("{cached} cached positions of {tokens}"));
    }
    // Shared memory asked for: the file must be a pool here. (Over TCP the path is never
    // opened; on `auto` a path that is no pool here — another container's /dev/shm — means
    // TCP: [`Targets::pool`] checks it before mapping anything.)
    if transport == Some(Transport::Shm) && !is_pool_here(&t.shm_path) {
        return Err(format!("{} is not a KV pool file", t.shm_path));
    }
    Ok(())
}

/// Whether `path` names a decode worker's pool file as this process sees the file system.
fn is_pool_here(path: &str) -> bool {
    !path.is_empty() && kv_store::shm::is_pool_file(std::path::Path::new(path))
}

/// The open ends of transports: mapped pools and idle data-plane connections.
pub struct Targets {
    engine: Arc<Engine>,
    host_id: String,
    pools: HashMap<PathBuf, Arc<KvPool>>,
    senders: Arc<Senders>,
}

/// Idle data-plane connections per address, for the next transfer there.
#[derive(Default)]
struct Senders {
    secret: Option<ClusterSecret>,
    idle: Mutex<HashMap<String, Vec<(KvSender, Instant)>>>,
}

/// How long an idle connection is kept for reuse (well inside the receiver's idle limit).
const SENDER_IDLE: Duration = Duration::from_secs(60);
/// A grant this close to its expiry is not started in place (shared memory).
const GRANT_MARGIN_MS: u64 = 1_000;

impl Senders {
    /// An idle connection to `addr`, or a new one.
    fn take(&self, addr: &str) -> Result<KvSender, String> {
        let pooled = {
            let mut idle = self.idle.lock().expect("sender pool poisoned");
            let v = idle.entry(addr.to_string()).or_default();
            v.retain(|(_, at)| at.elapsed() < SENDER_IDLE);
            v.pop()
        };
        match pooled {
            Some((c, _)) => Ok(c),
            None => KvSender::connect(addr, self.secret.as_ref())
                .map_err(|e| format!("connecting to {addr}: {e}")),
        }
    }

    fn put(&self, addr: &str, c: KvSender) {
        self.idle
            .lock()
            .expect("sender pool poisoned")
            .entry(addr.to_string())
            .or_default()
            .push((c, Instant::now()));
    }
}

/// A job ready to compute: the sequence the pass writes, and how its KV leaves.
///
/// Field order is drop order: `push` (which joins the sender thread reading `seq`'s slabs)
/// drops before `seq` (which returns the blocks to the pool). `seq` is private to this crate,
/// so nothing outside can move the sequence out from under the sender:
///
/// ```compile_fail
/// fn take(p: prefill_worker::target::Prepared) -> engine::KvSequence {
///     p.seq
/// }
/// ```
pub struct Prepared {
    /// The TCP transfer reading `seq`'s slabs; `None` when the pass writes in place (shm).
    push: Option<TcpPush>,
    pub(crate) seq: KvSequence,
    /// Positions of `seq` that the decode worker already has (not sent, not hashed).
    target_cached: usize,
    /// The blocks the pass writes for the decode worker (sent, hashed).
    written: Range<usize>,
    /// Positions `seq` held before the pass (read in place, not computed).
    pub computed_from: usize,
    transport: Transport,
    /// Writing in place: the hold on the decode worker's blocks, let go when this drops
    /// (after the pass, and after `seq`).
    _hold: Option<Hold>,
}

/// A prefill's transfer, done.
pub struct Sealed {
    pub checksum: u64,
    pub transport: Transport,
    /// Prompt positions that came from a prefix cache (the decode worker's).
    pub cached: usize,
}

/// Whether `t` names a shared pool on the host `host_id` (this worker's, read once).
fn pool_on_host(t: &pb::KvTarget, host_id: &str) -> bool {
    t.host_id == host_id && !t.shm_path.is_empty()
}

/// Whether a job's KV will be computed in this worker's own pool and sent over TCP (as
/// [`Targets::prepare`] decides, before it tries to map the decode worker's pool).
pub fn computes_locally(t: &pb::KvTarget, transport: Option<Transport>, host_id: &str) -> bool {
    match transport {
        Some(tr) => tr == Transport::Tcp,
        None => !pool_on_host(t, host_id),
    }
}

impl Targets {
    pub fn new(engine: Arc<Engine>, secret: Option<ClusterSecret>) -> Targets {
        Targets {
            engine,
            host_id: kv_store::shm::host_id(),
            pools: HashMap::new(),
            senders: Arc::new(Senders {
                secret,
                idle: Mutex::default(),
            }),
        }
    }

    /// Checks the job's target and opens its transport.
    pub fn prepare(&mut self, job: &PrefillJob) -> Result<Prepared, WorkerError> {
        let t = &job.target;
        let tokens = job.tokens();
        let layout = self.engine.kv.layout();
        let bs = layout.block_size;
        let cached = t.cached_tokens as usize;
        if t.fingerprint != self.engine.frontend.fingerprint {
            return Err(WorkerError::Internal(
                "the decode worker runs another model, precision or KV format".into(),
            ));
        }
        if tokens.is_empty()
            || !cached.is_multiple_of(bs)
            || cached >= tokens.len()
            || t.block_ids.len() < tokens.len().div_ceil(bs)
        {
            return Err(WorkerError::Internal(format!(
                "bad KV target: {} blocks, {cached} cached, for {} tokens",
                t.block_ids.len(),
                tokens.len()
            )));
        }
        let transport = match job.transport {
            Some(tr) => tr,
            None if pool_on_host(t, &self.host_id) => match self.pool(t) {
                Ok(_) => Transport::Shm,
                Err(e) => {
                    tracing::debug!(error = %e, "shared pool not reachable; KV goes over TCP");
                    Transport::Tcp
                }
            },
            None => Transport::Tcp,
        };
        match transport {
            Transport::Shm => {
                // A grant about to lapse is not started (same host, same clock): the decode
                // worker is about to take it back.
                if protocol::grant::now_unix_ms() + GRANT_MARGIN_MS > t.expires_unix_ms {
                    return Err(WorkerError::Internal("the KV grant has lapsed".into()));
                }
                let pool = self.pool(t).map_err(|e| {
                    WorkerError::Internal(format!("mapping the decode worker's KV pool: {e}"))
                })?;
                let written = kv_store::written_blocks(cached, tokens.len(), bs);
                let lease = LeaseId::from_wire(&t.lease_id)
                    .map_err(|e| WorkerError::Internal(e.to_string()))?;
                let hold = Hold::take(
                    std::path::Path::new(&t.shm_path),
                    &t.block_ids[written.clone()],
                    lease_tag(&lease.0),
                )
                .map_err(|e| WorkerError::Internal(format!("the KV lease: {e}")))?;
                let blocks = t.block_ids.iter().map(|&b| BlockId(b)).collect();
                let seq = KvSequence::adopt(pool, blocks, cached)
                    .map_err(|e| WorkerError::Internal(e.to_string()))?;
                Ok(Prepared {
                    seq,
                    target_cached: cached,
                    written,
                    computed_from: cached,
                    push: None,
                    transport,
                    _hold: Some(hold),
                })
            }
            Transport::Tcp => {
                if t.kv_data_addr.is_empty() {
                    return Err(WorkerError::Internal(
                        "the decode worker has no TCP data plane".into(),
                    ));
                }
                let mut seq = self.engine.new_sequence();
                let local = if job.params.prompt_logprobs.is_none() {
                    seq.attach_prefix(&tokens)
                } else {
                    0
                };
                seq.reserve(tokens.len())
                    .map_err(|e| crate::engine_error(&e))?;
                let written = kv_store::written_blocks(cached, tokens.len(), bs);
                let lease = LeaseId::from_wire(&t.lease_id)
                    .map_err(|e| WorkerError::Internal(e.to_string()))?;
                let push = TcpPush::start(
                    &seq,
                    written.clone(),
                    lease,
                    t.kv_data_addr.clone(),
                    self.senders.clone(),
                );
                Ok(Prepared {
                    seq,
                    target_cached: cached,
                    written,
                    computed_from: local,
                    push: Some(push),
                    transport,
                    _hold: None,
                })
            }
        }
    }

    /// The decode worker's pool, mapped once per file.
    fn pool(&mut self, t: &pb::KvTarget) -> std::io::Result<Arc<KvPool>> {
        if !is_pool_here(&t.shm_path) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} is not a KV pool file on this host", t.shm_path),
            ));
        }
        let path = PathBuf::from(&t.shm_path);
        if let Some(p) = self.pools.get(&path)
            && p.n_blocks() as u64 == t.pool_blocks
        {
            return Ok(p.clone());
        }
        // A decode worker that restarted has a new file; forget pools whose file is gone.
        self.pools.retain(|p, _| p.exists());
        let pool = KvPool::attach(self.engine.kv.layout(), t.pool_blocks as usize, &path)?;
        pool.set_hash_salt(self.engine.kv.hash_salt());
        self.pools.insert(path, pool.clone());
        Ok(pool)
    }
}

impl Prepared {
    /// Tokens the pass computes.
    pub fn inputs<'a>(&self, tokens: &'a [TokenId]) -> &'a [TokenId] {
        &tokens[self.computed_from..]
    }

    /// Whether `seq` lives in this worker's own pool (so its prefix cache may keep it).
    pub fn local(&self) -> bool {
        self.transport == Transport::Tcp
    }

    /// How the KV goes to the decode worker.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// Blocks the pass writes for the decode worker (sent over TCP, or written in place).
    pub fn written_blocks(&self) -> usize {
        self.written.len()
    }

    /// What the forward pass's layer hook does for this job: sum each layer's written slabs
    /// and announce the layer to the sender thread, if any.
    pub fn layer_sum(&self) -> LayerSum {
        LayerSum {
            blocks: self.written.clone(),
            sum: kv_store::Checksum::new(),
            push: self.push.as_ref().and_then(|p| p.layers.clone()),
        }
    }

    /// The pass is complete, `sum` fed every layer: finish the transfer.
    pub fn finish(self, sum: LayerSum) -> Result<Sealed, WorkerError> {
        let LayerSum { sum, push, .. } = sum;
        drop(push);
        let checksum = sum.digest();
        if let Some(p) = self.push {
            p.finish(checksum)?;
        }
        Ok(Sealed {
            checksum,
            transport: self.transport,
            cached: self.target_cached,
        })
    }
}

/// A job's share of the forward pass's layer hook.
pub struct LayerSum {
    blocks: Range<usize>,
    sum: kv_store::Checksum,
    push: Option<Sender<Push>>,
}

impl LayerSum {
    /// Layer `layer` of `seq` is complete: sum its written slabs (in cache now) and hand it to
    /// the sender thread.
    pub fn layer_done(&mut self, layer: usize, seq: &KvSequence) {
        for b in self.blocks.clone() {
            self.sum.update(seq.slab(b, layer));
        }
        if let Some(p) = &self.push {
            let _ = p.send(Push::Layer(layer));
        }
    }
}

/// What the sender thread hears.
enum Push {
    /// This layer is complete: send its slabs.
    Layer(usize),
    /// Every layer was announced; the end frame carries this checksum.
    Seal(u64),
}

/// Slab addresses per layer, for the sender thread.
struct Slabs(Vec<Vec<(*const u8, usize)>>);
// SAFETY: the slabs belong to a sequence that outlives the sender thread: `TcpPush` is a
// field of the `Prepared` holding the sequence, declared before it (so dropped, and the thread
// joined, first), and joins the thread in `finish`, which runs before the `Prepared` drops.
unsafe impl Send for Slabs {}

/// A TCP transfer running beside the forward pass.
struct TcpPush {
    layers: Option<Sender<Push>>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl TcpPush {
    fn start(
        seq: &KvSequence,
        blocks: std::ops::Range<usize>,
        lease: LeaseId,
        addr: String,
        senders: Arc<Senders>,
    ) -> TcpPush {
        let n_layers = seq.pool().layout().n_layers;
        let slabs = Slabs(
            (0..n_layers)
                .map(|l| {
                    blocks
                        .clone()
                        .map(|b| {
                            let s = seq.slab(b, l);
                            (s.as_ptr(), s.len())
                        })
                        .collect()
                })
                .collect(),
        );
        let (tx, rx) = channel();
        let first = blocks.start as u32;
        let thread = std::thread::Builder::new()
            .name("tandem-kv-push".into())
            .spawn(move || push(rx, slabs, first, lease, &addr, &senders))
            .expect("spawn KV push thread");
        TcpPush {
            layers: Some(tx),
            thread: Some(thread),
        }
    }

    fn finish(mut self, checksum: u64) -> Result<(), WorkerError> {
        if let Some(tx) = self.layers.take() {
            let _ = tx.send(Push::Seal(checksum));
        }
        let t = self.thread.take().expect("joined once");
        match t.join() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(WorkerError::Internal(format!("KV transfer over TCP: {e}"))),
            Err(_) => Err(WorkerError::Internal("the KV push thread panicked".into())),
        }
    }
}

impl Drop for TcpPush {
    fn drop(&mut self) {
        // Abandoned (the pass failed): the thread sees the channel close, drops its
        // connection mid-transfer (the receiver aborts the lease) and ends.
        self.layers = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The sender thread: each layer's slabs as they are announced, then the end frame.
fn push(
    rx: Receiver<Push>,
    slabs: Slabs,
    first_block: u32,
    lease: LeaseId,
    addr: &str,
    senders: &Senders,
) -> Result<(), String> {
    let mut conn = senders.take(addr)?;
    let abandoned = || "the prefill pass was abandoned".to_string();
    let mut sent = 0u32;
    for (want, layer_slabs) in slabs.0.iter().enumerate() {
        // Layers are announced in order; a closed channel means the pass was abandoned.
        let Ok(Push::Layer(layer)) = rx.recv() else {
            return Err(abandoned());
        };
        debug_assert_eq!(layer, want);
        let frames: Vec<(u32, &[u8])> = layer_slabs
            .iter()
            .enumerate()
            .map(|(i, &(ptr, len))| {
                // SAFETY: see `Slabs`; the layer is complete and no longer written.
                let bytes = unsafe { std::slice::from_raw_parts(ptr, len) };
                (first_block + i as u32, bytes)
            })
            .collect();
        conn.slabs(lease, layer as u32, &frames)
            .map_err(|e| format!("sending to {addr}: {e}"))?;
        sent += frames.len() as u32;
    }
    let Ok(Push::Seal(digest)) = rx.recv() else {
        return Err(abandoned());
    };
    conn.end(lease, sent, digest)
        .map_err(|e| format!("sending to {addr}: {e}"))?;
    senders.put(addr, conn);
    Ok(())
}
