//! The decode worker's use of the pooled KV store (`tandem kv-store`): before a prompt is
//! prefilled, the blocks of its prefix that the store holds beyond this worker's own prefix
//! cache are fetched straight into the prompt's blocks; blocks the prefix cache lets go of
//! are written back, so the next worker (or this one, later) finds them.
//!
//! Nothing here fails a request: a store that is slow, full, gone or sends bytes that do not
//! add up is a miss, and the prompt is computed as if there were no store.

use crate::leases::Leases;
use engine::kv::{BlockHash, SpillWhen, block_hashes};
use engine::{KvPool, KvSequence, TokenId};
use kv_store::store::BlockShape;
use kv_store::store::Tier;
use kv_store::store::client::{ClientError, StoreClient};
use kv_store::store::pool::PoolTarget;
use kv_store::tcp::{ConnId, SlabSink, Slot};
use protocol::LeaseId;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// How a decode worker uses a store.
#[derive(Clone)]
pub struct StoreUse {
    pub client: StoreClient,
    /// Write every cached block when its last holder lets go, not only when evicted.
    pub write_through: bool,
}

impl std::fmt::Debug for StoreUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreUse")
            .field("write_through", &self.write_through)
            .finish_non_exhaustive()
    }
}

/// Bytes of blocks copied out for writing back and not yet sent: beyond this, more are
/// dropped (the store is a cache; the decode loop never waits for it). A burst of evictions —
/// a long prompt taking over a pool of cached blocks — fits whole.
const WRITE_BACK_BYTES: usize = 128 << 20;
/// Blocks per put.
const PUT_BATCH: usize = 32;

/// A block's shape in the store for this pool.
pub fn shape(pool: &KvPool) -> BlockShape {
    let l = pool.layout();
    BlockShape {
        slab_bytes: (2 * l.plane_bytes()) as u32,
        slabs: l.n_layers as u32,
    }
}

/// Connects `pool`'s cached blocks to the store: each block the pool lets go of (evicted, or
/// with write-through released) is copied and queued; a task writes them in batches.
pub fn write_back(store: &StoreUse, pool: &Arc<KvPool>) -> tokio::task::JoinHandle<()> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(BlockHash, Arc<[u8]>)>();
    let pending = Arc::new(AtomicUsize::new(0));
    let queued = pending.clone();
    let when = if store.write_through {
        SpillWhen::Released
    } else {
        SpillWhen::Evicted
    };
    pool.spill_to(
        when,
        Box::new(move |h, bytes| {
            let room =
                queued.fetch_add(bytes.len(), Ordering::AcqRel) + bytes.len() <= WRITE_BACK_BYTES;
            if !room || tx.send((h, Arc::from(bytes))).is_err() {
                queued.fetch_sub(bytes.len(), Ordering::AcqRel);
                metrics::counter!("tandem_kv_store_write_back_dropped_total").increment(1);
            }
        }),
    );
    let (client, shape) = (store.client.clone(), shape(pool));
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(PUT_BATCH);
        while rx.recv_many(&mut batch, PUT_BATCH).await > 0 {
            let (hashes, payloads): (Vec<BlockHash>, Vec<Arc<[u8]>>) = batch.drain(..).unzip();
            let bytes: usize = payloads.iter().map(|p| p.len()).sum();
            match client.put(&hashes, shape, payloads).await {
                Ok(sent) => {
                    metrics::counter!("tandem_kv_store_written_blocks_total").increment(sent as u64)
                }
                Err(e) => {
                    metrics::counter!("tandem_kv_store_write_back_failed_total").increment(1);
                    tracing::debug!(error = %e, blocks = hashes.len(), "writing blocks back to the store failed");
                }
            }
            pending.fetch_sub(bytes, Ordering::AcqRel);
        }
    })
}

/// The blocks of a sequence a fetch writes: the `n` blocks from block `first` on.
struct FetchInto {
    seq: Mutex<KvSequence>,
    first: usize,
    n: usize,
}

// SAFETY: the slots are blocks of the sequence this sink owns (past its shared prefix:
// `slab_mut_ptr` refuses the others), reserved and not yet lent to anyone: nothing else reads
// or writes them until the fetch returns and the sequence is taken back out of the sink, and
// the sink (holding the sequence, so its blocks) outlives the transfer.
unsafe impl SlabSink for FetchInto {
    fn slots(
        &self,
        _: ConnId,
        _: LeaseId,
        layer: u32,
        blocks: &[u32],
        len: usize,
        out: &mut Vec<Option<Slot>>,
    ) {
        let mut seq = self.seq.lock().expect("fetch sequence poisoned");
        let ok_len = len == seq.slab_bytes();
        for &b in blocks {
            let slot = (ok_len && (b as usize) < self.n)
                .then(|| {
                    seq.slab_mut_ptr(self.first + b as usize, layer as usize)
                        .ok()
                })
                .flatten()
                .map(|ptr| Slot { ptr, len });
            out.push(slot);
        }
    }
    fn end(&self, _: ConnId, _: LeaseId, _: u32, _: u64) {}
    fn abort(&self, _: ConnId, _: LeaseId) {}
}

/// How long a fetch may take in all before the prompt is computed instead. (On a multi-thread
/// runtime the client blocks its thread in place for the transfer, so the data plane's stall
/// timeout — `kv_store::store::client::FETCH_STALL`, per read — bounds it instead.)
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Fetches into `seq` (its first `cached` positions from this worker's prefix cache, blocks
/// reserved for all of `tokens`) the blocks after those that the store holds, up to the last
/// full block before the final token (whose logits the prefill must compute): copied by the
/// store straight into the pool when it runs on this host and the pool is shared, over the
/// TCP data plane otherwise. Returns the sequence — its fetched blocks filled, checked and
/// published to the prefix cache — and the positions now cached. (An error only when a fetch
/// outlived its timeout and no blocks are left for a fresh sequence.)
pub async fn fetch_prefix(
    store: &StoreUse,
    leases: &Leases,
    seq: KvSequence,
    tokens: &[TokenId],
    cached: usize,
) -> Result<(KvSequence, usize), engine::EngineError> {
    let pool = seq.pool().clone();
    let bs = pool.layout().block_size;
    let usable = tokens.len().saturating_sub(1) / bs;
    let first = cached / bs;
    if usable <= first {
        return Ok((seq, cached));
    }
    let hashes: Vec<BlockHash> = block_hashes(pool.hash_salt(), &tokens[..usable * bs], bs);
    let hashes = &hashes[first..];
    let mut seq = Some(seq);
    let mut got = None;
    if pool.shared_path().is_some() && store.client.shm_usable() {
        match into_pool(
            store,
            leases,
            seq.take().expect("the sequence"),
            first..usable,
            hashes,
        )
        .await
        {
            InPool::Skipped(s) => seq = Some(s), // over TCP below
            InPool::Done(s, g) => {
                seq = Some(s);
                got = Some(g);
            }
            InPool::StillWriting => return fresh(&pool, tokens),
        }
    }
    let got = match got {
        Some(g) => g,
        None => {
            let sink = Arc::new(FetchInto {
                seq: Mutex::new(seq.take().expect("the sequence")),
                first,
                n: usable - first,
            });
            let got = tokio::time::timeout(
                FETCH_TIMEOUT,
                store.client.fetch(hashes, shape(&pool), sink.clone()),
            )
            .await
            .unwrap_or(Err(ClientError::Timeout));
            // The transfer is over (or abandoned: a timed-out blocking fetch keeps its own
            // reference to the sink, and with it the sequence, until it stops).
            match Arc::try_unwrap(sink) {
                Ok(s) => seq = Some(s.seq.into_inner().expect("fetch sequence poisoned")),
                Err(_) => return fresh(&pool, tokens),
            }
            got
        }
    };
    let mut seq = seq.expect("the sequence");
    let fetched = match got {
        Ok((tiers, crcs)) if !tiers.is_empty() => {
            // Each block's CRC as the store took it, over what landed (either transport).
            let n = crcs.len();
            let ok = kv_store::block_crcs(&seq, first..first + n) == crcs;
            if !ok {
                metrics::counter!("tandem_kv_checksum_failures_total").increment(1);
                tracing::warn!("blocks fetched from the store fail their checksum; computing them");
                0
            } else {
                for t in &tiers[..n] {
                    metrics::counter!("tandem_kv_store_fetched_blocks_total", "tier" => t.name())
                        .increment(1);
                }
                n
            }
        }
        Ok(_) => 0,
        Err(e) => {
            metrics::counter!("tandem_kv_store_fetch_failed_total").increment(1);
            tracing::debug!(error = %e, "store fetch failed; computing the prompt");
            0
        }
    };
    if fetched == 0 {
        return Ok((seq, cached));
    }
    let now = (first + fetched) * bs;
    seq.set_filled(now);
    seq.publish_prefix(&tokens[..now]);
    Ok((seq, now))
}

/// How a fetch into the shared pool went.
enum InPool {
    /// Not made, or the store cannot reach this pool: fetch over TCP.
    Skipped(KvSequence),
    /// Made: the sequence (its blocks taken back from the store) and the outcome.
    Done(KvSequence, Result<(Vec<Tier>, Vec<u32>), ClientError>),
    /// Timed out with the store still inside the blocks: they stay quarantined.
    StillWriting,
}

/// The store copies `hashes`' blocks into `seq`'s blocks `blocks` in this worker's shared
/// pool, lent to it through the fence for the call.
async fn into_pool(
    store: &StoreUse,
    leases: &Leases,
    mut seq: KvSequence,
    blocks: std::ops::Range<usize>,
    hashes: &[BlockHash],
) -> InPool {
    let pool = seq.pool().clone();
    let Some(path) = pool.shared_path().map(|p| p.to_owned()) else {
        return InPool::Skipped(seq);
    };
    let lent: Vec<u32> = match seq.writable_blocks(blocks) {
        Ok(b) => b.iter().map(|b| b.0).collect(),
        Err(_) => return InPool::Skipped(seq),
    };
    let tag = match leases.lend_to_store(&lent) {
        Ok(Some(tag)) => tag,
        Ok(None) => return InPool::Skipped(seq),
        Err(e) => {
            tracing::warn!(error = %e, "the KV fence failed; fetching over TCP");
            // Zero what was written of the tags before the blocks go anywhere.
            return match leases.take_back_from_store(seq, lent) {
                Some(s) => InPool::Skipped(s),
                None => InPool::StillWriting,
            };
        }
    };
    let to = PoolTarget {
        path,
        blocks: lent.clone(),
        tag,
    };
    let got = tokio::time::timeout(
        FETCH_TIMEOUT,
        store.client.fetch_into(hashes, shape(&pool), &to),
    )
    .await
    .unwrap_or(Err(ClientError::Timeout));
    match leases.take_back_from_store(seq, lent) {
        None => InPool::StillWriting,
        Some(s) => match got {
            Err(ClientError::Unreachable(_)) => InPool::Skipped(s),
            got => InPool::Done(s, got),
        },
    }
}

/// A new sequence for `tokens` (its cached prefix attached, its blocks reserved), when the one
/// a fetch was writing cannot be used.
fn fresh(
    pool: &Arc<KvPool>,
    tokens: &[TokenId],
) -> Result<(KvSequence, usize), engine::EngineError> {
    tracing::warn!("a store fetch outlived its timeout; computing the prompt");
    let mut s = KvSequence::new(pool.clone());
    let c = s.attach_prefix(tokens);
    s.reserve(tokens.len())?;
    Ok((s, c))
}

/// Before this worker prefills `tokens` itself: fetches the blocks of their prefix that the
/// store holds beyond the prefix cache into the prefix cache, where the batch finds them when
/// it admits the prompt. (A miss, a failure or no free blocks: nothing happens.)
pub async fn warm_prefix(
    store: &StoreUse,
    leases: &Leases,
    pool: &Arc<KvPool>,
    tokens: &[TokenId],
) {
    let bs = pool.layout().block_size;
    let usable = tokens.len().saturating_sub(1) / bs * bs;
    let mut seq = KvSequence::new(pool.clone());
    let cached = seq.attach_prefix(tokens);
    if usable <= cached || seq.reserve(usable).is_err() {
        return;
    }
    // The fetched blocks are published; dropping the sequence leaves them cached.
    let _ = fetch_prefix(store, leases, seq, tokens, cached).await;
}
