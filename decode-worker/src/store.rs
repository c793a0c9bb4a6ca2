//! The decode worker's use of the pooled KV store (`tandem kv-store`): before a prompt is
//! prefilled, the blocks of its prefix that the store holds beyond this worker's own prefix
//! cache are fetched straight into the prompt's blocks; blocks the prefix cache lets go of
//! are written back, so the next worker (or this one, later) finds them.
//!
//! Nothing here fails a request: a store that is slow, full, gone or sends bytes that do not
//! add up is a miss, and the prompt is computed as if there were no store.

use crate::leases::Leases;
use engine::kv::{BlockHash, SpillWhen};
use engine::{KvPool, KvSequence, TokenId};
use kv_store::store::client::{ClientError, StoreClient};
use kv_store::store::fetch;
use kv_store::store::pool::PoolTarget;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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
    let (client, shape) = (store.client.clone(), fetch::shape(pool));
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

/// Fetches into `seq` (its first `cached` positions from this worker's prefix cache, blocks
/// reserved for all of `tokens`) the blocks after those that the store holds, up to the last
/// full block before the final token (whose logits the prefill must compute): copied by the
/// store straight into the pool when it runs on this host and the pool is shared, over the
/// TCP data plane otherwise ([`fetch::over_tcp`]). Returns the sequence — its fetched blocks
/// filled, checked and published to the prefix cache — and the positions now cached. (An
/// error only when a fetch outlived its timeout and no blocks are left for a fresh sequence.)
pub async fn fetch_prefix(
    store: &StoreUse,
    leases: &Leases,
    seq: KvSequence,
    tokens: &[TokenId],
    cached: usize,
) -> Result<(KvSequence, usize), engine::EngineError> {
    let pool = seq.pool().clone();
    let bs = pool.layout().block_size;
    let hashes = fetch::usable_hashes(&pool, tokens);
    let first = cached / bs;
    if hashes.len() <= first {
        return Ok((seq, cached));
    }
    let hashes = &hashes[first..];
    // Copied in place by the store when it can reach the pool; else (or refused) over TCP.
    let in_pool = if pool.shared_path().is_some() && store.client.shm_usable() {
        match into_pool(store, leases, seq, first..first + hashes.len(), hashes).await {
            InPool::Done(s, got) => Ok((s, got)),
            InPool::Skipped(s) => Err(s),
            InPool::StillWriting => return fresh(&pool, tokens),
        }
    } else {
        Err(seq)
    };
    let (mut seq, got) = match in_pool {
        Ok(done) => done,
        Err(s) => match fetch::over_tcp(&store.client, s, first, hashes).await {
            fetch::Fetched::Landed(s, got) => (s, got),
            fetch::Fetched::Abandoned => return fresh(&pool, tokens),
        },
    };
    let now = fetch::adopt(&mut seq, tokens, first, got).unwrap_or(cached);
    Ok((seq, now))
}

/// How a fetch into the shared pool went.
enum InPool {
    /// Not made, or the store cannot reach this pool: fetch over TCP.
    Skipped(KvSequence),
    /// Made: the sequence (its blocks taken back from the store) and the outcome.
    Done(KvSequence, fetch::Got),
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
        fetch::FETCH_TIMEOUT,
        store.client.fetch_into(hashes, fetch::shape(&pool), &to),
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
