//! A worker's read of a prompt's prefix from the store into one of its own sequences, over
//! the data plane: the slabs land straight in the sequence's blocks, each block is checked
//! against the CRC its put was taken under, and the blocks that check out join the sequence
//! (and its pool's prefix cache). Both workers use it: a decode worker for what its shared pool
//! cannot get copied in place, a prefill worker whose pool computes for a decode worker on
//! another host (TCP), so that neither computes what the store holds.
//!
//! Nothing here fails a request: a store that is slow, gone or sends bytes that do not add up
//! is a miss, and the prompt is computed as if there were no store.

use super::client::{ClientError, StoreClient};
use super::{BlockShape, Tier};
use crate::tcp::{ConnId, SlabSink, Slot};
use engine::kv::{BlockHash, block_hashes};
use engine::{KvPool, KvSequence, TokenId};
use protocol::LeaseId;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a fetch may take in all before the prompt is computed instead. (On a multi-thread
/// runtime the client blocks its thread in place for the transfer, so the data plane's stall
/// timeout — [`super::client::FETCH_STALL`], per read — bounds it instead.)
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// A block's shape in the store for `pool`'s blocks.
pub fn shape(pool: &KvPool) -> BlockShape {
    let l = pool.layout();
    BlockShape {
        slab_bytes: (2 * l.plane_bytes()) as u32,
        slabs: l.n_layers as u32,
    }
}

/// What a store read answered: each block's tier and CRC, for the leading blocks it held.
pub type Got = Result<(Vec<Tier>, Vec<u32>), ClientError>;

/// How a fetch into a sequence ended.
pub enum Fetched {
    /// The transfer is over: the sequence back, and what the store answered.
    Landed(KvSequence, Got),
    /// It outlived [`FETCH_TIMEOUT`] and its blocking transfer still holds the sequence: the
    /// caller computes with a fresh one.
    Abandoned,
}

/// Where a read over the data plane lands: the `n` blocks of a sequence from block `first` on,
/// slab by slab as the receiver asks (block indices in the transfer count from `first`).
pub struct SequenceSink {
    seq: Mutex<KvSequence>,
    first: usize,
    n: usize,
}

impl SequenceSink {
    pub fn new(seq: KvSequence, first: usize, n: usize) -> SequenceSink {
        SequenceSink {
            seq: Mutex::new(seq),
            first,
            n,
        }
    }

    /// The sequence, between transfers.
    pub fn sequence(&self) -> std::sync::MutexGuard<'_, KvSequence> {
        self.seq.lock().expect("fetch sequence poisoned")
    }

    pub fn into_sequence(self) -> KvSequence {
        self.seq.into_inner().expect("fetch sequence poisoned")
    }
}

// SAFETY: the slots are blocks of the sequence this sink owns (past its shared prefix:
// `slab_mut_ptr` refuses the others), reserved and not yet lent to anyone: nothing else reads
// or writes them until the fetch returns and the sequence is taken back out of the sink, and
// the sink (holding the sequence, so its blocks) outlives the transfer.
unsafe impl SlabSink for SequenceSink {
    fn slots(
        &self,
        _: ConnId,
        _: LeaseId,
        layer: u32,
        blocks: &[u32],
        len: usize,
        out: &mut Vec<Option<Slot>>,
    ) {
        let mut seq = self.sequence();
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

/// Reads `hashes`' blocks (the leading ones the store holds) over the data plane into `seq`'s
/// blocks from block `first` on (reserved, past its attached prefix).
pub async fn over_tcp(
    client: &StoreClient,
    seq: KvSequence,
    first: usize,
    hashes: &[BlockHash],
) -> Fetched {
    let shape = shape(seq.pool());
    let sink = Arc::new(SequenceSink::new(seq, first, hashes.len()));
    let got = tokio::time::timeout(FETCH_TIMEOUT, client.fetch(hashes, shape, sink.clone()))
        .await
        .unwrap_or(Err(ClientError::Timeout));
    // The transfer is over (or abandoned: a timed-out blocking fetch keeps its own reference
    // to the sink, and with it the sequence, until it stops).
    match Arc::try_unwrap(sink) {
        Ok(s) => Fetched::Landed(s.into_sequence(), got),
        Err(_) => Fetched::Abandoned,
    }
}

/// Takes what a read landed in `seq`'s blocks from `first` on (by either transport) into the
/// sequence: each block checked against its CRC from the store, then the sequence filled and
/// its prefix published up to the last block read. Returns the positions now cached, or `None`
/// when nothing was (a miss, a failed read, a block that does not check out — counted).
pub fn adopt(seq: &mut KvSequence, tokens: &[TokenId], first: usize, got: Got) -> Option<usize> {
    let n = match got {
        Ok((tiers, crcs)) if !tiers.is_empty() => {
            let n = crcs.len().min(tiers.len());
            if crate::block_crcs(seq, first..first + n) != crcs[..n] {
                metrics::counter!("tandem_kv_checksum_failures_total").increment(1);
                tracing::warn!("blocks fetched from the store fail their checksum; computing them");
                return None;
            }
            for t in &tiers[..n] {
                metrics::counter!("tandem_kv_store_fetched_blocks_total", "tier" => t.name())
                    .increment(1);
            }
            n
        }
        Ok(_) => return None,
        Err(e) => {
            metrics::counter!("tandem_kv_store_fetch_failed_total").increment(1);
            tracing::debug!(error = %e, "store fetch failed; computing the prompt");
            return None;
        }
    };
    let now = (first + n) * seq.pool().layout().block_size;
    seq.set_filled(now);
    seq.publish_prefix(&tokens[..now]);
    Some(now)
}

/// The hashes of `tokens`' full blocks a prefill may take from a cache: all but a last block
/// holding the final token (whose logits the prefill must compute).
pub fn usable_hashes(pool: &KvPool, tokens: &[TokenId]) -> Vec<BlockHash> {
    let bs = pool.layout().block_size;
    let usable = tokens.len().saturating_sub(1) / bs * bs;
    block_hashes(pool.hash_salt(), &tokens[..usable], bs)
}

/// Fetches over the data plane the blocks of `tokens`' prefix that the store holds beyond
/// `pool`'s own prefix cache into that cache, where a prefill attaching the prefix finds
/// them. Returns the positions the prefix cache now holds (a miss, a failure, a pool without
/// free blocks: what it held before).
pub async fn warm_over_tcp(client: &StoreClient, pool: &Arc<KvPool>, tokens: &[TokenId]) -> usize {
    let bs = pool.layout().block_size;
    let hashes = usable_hashes(pool, tokens);
    let mut seq = KvSequence::new(pool.clone());
    let cached = seq.attach_prefix(tokens);
    let first = cached / bs;
    if hashes.len() <= first || seq.reserve(hashes.len() * bs).is_err() {
        return cached;
    }
    match over_tcp(client, seq, first, &hashes[first..]).await {
        // The fetched blocks are published; dropping the sequence leaves them cached.
        Fetched::Landed(mut seq, got) => adopt(&mut seq, tokens, first, got).unwrap_or(cached),
        Fetched::Abandoned => cached,
    }
}
