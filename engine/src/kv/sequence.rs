//! A sequence's view of the pool: its block table, how many positions are filled, and the
//! reads and writes of its blocks (the pool's allocator, prefix cache and memory are in the
//! parent module).

use super::{BlockId, KvPool, block_hashes};
use crate::error::{EngineError, Result};
use crate::tokenizer::TokenId;
use kernels::attention::KvBlockRef;
use std::sync::Arc;

/// One sequence's KV cache: its block table and how many positions are filled.
/// Dropping it returns its blocks to the pool.
pub struct KvSequence {
    pool: Arc<KvPool>,
    blocks: Vec<BlockId>,
    len: usize,
    /// Leading blocks other sequences may read — found in the prefix cache, published to it,
    /// or (adopted) filled by their owner: never overwritten through this sequence. Every
    /// other block is this sequence's alone (held once, unpublished).
    shared: usize,
}

impl KvSequence {
    pub fn new(pool: Arc<KvPool>) -> KvSequence {
        KvSequence {
            pool,
            blocks: Vec::new(),
            len: 0,
            shared: 0,
        }
    }

    /// A sequence over `blocks` that another party reserved in `pool` (an
    /// [`attached`](KvPool::attach) view, or the owner's pool for blocks being handed over),
    /// holding `len` filled positions (the owner's, read in place: their full blocks count as
    /// shared). Dropping it releases a reference on each block (nothing, in an attached view).
    pub fn adopt(pool: Arc<KvPool>, blocks: Vec<BlockId>, len: usize) -> Result<KvSequence> {
        let bs = pool.layout.block_size;
        if blocks.iter().any(|b| b.0 as usize >= pool.n_blocks) || len > blocks.len() * bs {
            return Err(EngineError::BadBlocks(format!(
                "{} blocks for {len} positions in a pool of {}",
                blocks.len(),
                pool.n_blocks
            )));
        }
        // Their bytes were written elsewhere (the owner, a transfer): any device copy is stale.
        pool.bump_generation(&blocks);
        Ok(KvSequence {
            shared: len / bs,
            pool,
            blocks,
            len,
        })
    }

    /// Marks the first `len` positions filled, when another process wrote them (a KV
    /// transfer into this sequence's blocks).
    pub fn set_filled(&mut self, len: usize) {
        assert!(len <= self.capacity(), "filled past the blocks held");
        self.len = len;
    }

    /// Block `i`'s K and V of `layer`, as bytes (what a KV transfer moves).
    pub fn slab(&self, i: usize, layer: usize) -> &[u8] {
        let r = self.pool.slab_range(self.blocks[i], layer);
        // SAFETY: this sequence holds the block and is borrowed shared, so no write is alive.
        unsafe { std::slice::from_raw_parts(self.pool.data.as_ptr().add(r.start), r.len()) }
    }

    /// Overwrites block `i`'s slab of `layer` (bytes from another pool of the same layout).
    /// Refused for a block this sequence shares (a prefix-cache block, held by others too or
    /// findable by its hash): writing it would change every sequence that reads it.
    pub fn write_slab(&mut self, i: usize, layer: usize, bytes: &[u8]) -> Result<()> {
        let dst = self.slab_mut_ptr(i, layer)?;
        let len = self.slab_bytes();
        if bytes.len() != len {
            return Err(EngineError::BadBlocks(format!(
                "a slab of {} bytes for slabs of {len}",
                bytes.len()
            )));
        }
        // SAFETY: the block is this sequence's alone (checked) and it is borrowed mutably, so
        // nothing else reads or writes these bytes; the range lies in the mapping.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, len) }
        Ok(())
    }

    /// Where block `i`'s slab of `layer` lives, for a writer outside this process's forward
    /// passes (the TCP data plane reading straight into the block). Refused, as
    /// [`write_slab`](Self::write_slab), for a block shared with other sequences. Writing
    /// through the pointer is sound only while this sequence holds the block and nothing else
    /// reads or writes it (the caller's contract: the pointer outlives this borrow).
    pub fn slab_mut_ptr(&mut self, i: usize, layer: usize) -> Result<*mut u8> {
        let Some(&b) = self.blocks.get(i) else {
            return Err(EngineError::BadBlocks(format!(
                "block {i} of a sequence of {}",
                self.blocks.len()
            )));
        };
        if layer >= self.pool.layout.n_layers {
            return Err(EngineError::BadBlocks(format!("layer {layer}")));
        }
        if i < self.shared {
            return Err(EngineError::BadBlocks(format!(
                "block {} is shared (prefix cache); it cannot be overwritten",
                b.0
            )));
        }
        debug_assert!(self.pool.exclusive(b), "block {b:?} is held elsewhere");
        self.pool.bump_generation(&[b]);
        let r = self.pool.slab_range(b, layer);
        // SAFETY: in bounds of the mapping (slab_range checks the block and layer).
        Ok(unsafe { self.pool.data.as_ptr().add(r.start) })
    }

    /// The pool's ids of blocks `range` of this sequence, for another process to write in
    /// place (the store copying into a shared pool). Refused, as
    /// [`write_slab`](Self::write_slab), when one is shared with other sequences; the same
    /// contract as [`slab_mut_ptr`](Self::slab_mut_ptr) for the writes.
    pub fn writable_blocks(&mut self, range: std::ops::Range<usize>) -> Result<Vec<BlockId>> {
        if range.end > self.blocks.len() || range.start < self.shared {
            return Err(EngineError::BadBlocks(format!(
                "blocks {range:?} of a sequence of {} whose first {} are shared",
                self.blocks.len(),
                self.shared
            )));
        }
        let blocks = self.blocks[range].to_vec();
        debug_assert!(blocks.iter().all(|&b| self.pool.exclusive(b)));
        self.pool.bump_generation(&blocks);
        Ok(blocks)
    }

    /// Bytes of one slab.
    pub fn slab_bytes(&self) -> usize {
        2 * self.pool.layout.plane_bytes()
    }

    /// Positions the blocks held now can store.
    pub fn capacity(&self) -> usize {
        self.blocks.len() * self.pool.layout.block_size
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn block_table(&self) -> &[BlockId] {
        &self.blocks
    }
    pub fn pool(&self) -> &Arc<KvPool> {
        &self.pool
    }

    /// Makes room for `total` positions, allocating blocks all-or-nothing.
    pub fn reserve(&mut self, total: usize) -> Result<()> {
        let bs = self.pool.layout.block_size;
        let need = total.div_ceil(bs).saturating_sub(self.blocks.len());
        if need > 0 {
            let got = self.pool.allocate(need)?;
            self.blocks.extend(got);
        }
        Ok(())
    }

    /// Marks `n` more positions as filled (after a forward pass wrote them).
    pub(crate) fn advance(&mut self, n: usize) {
        assert!(self.len + n <= self.blocks.len() * self.pool.layout.block_size);
        self.len += n;
    }

    /// On an empty sequence: attaches the cached blocks of the longest cached prefix of
    /// `tokens`, always leaving at least one token to compute (its logits are needed); returns
    /// how many tokens are now cached. Shared blocks are full and lie below `len`, so this
    /// sequence never writes them.
    pub fn attach_prefix(&mut self, tokens: &[TokenId]) -> usize {
        assert!(
            self.blocks.is_empty() && self.len == 0,
            "attach_prefix needs an empty sequence"
        );
        let bs = self.pool.layout.block_size;
        let usable = tokens.len().saturating_sub(1) / bs * bs;
        let hashes = block_hashes(self.pool.hash_salt(), &tokens[..usable], bs);
        self.blocks = self.pool.lookup(&hashes);
        self.len = self.blocks.len() * bs;
        self.shared = self.blocks.len();
        self.len
    }

    /// Publishes the full blocks holding `tokens` (this sequence's first tokens, already
    /// computed) to the pool's prefix cache.
    pub fn publish_prefix(&mut self, tokens: &[TokenId]) {
        let bs = self.pool.layout.block_size;
        let n = tokens.len().min(self.len) / bs;
        self.shared = self.shared.max(n);
        for (h, &b) in block_hashes(self.pool.hash_salt(), &tokens[..n * bs], bs)
            .into_iter()
            .zip(&self.blocks)
        {
            self.pool.register(b, h);
        }
    }

    /// Writes K and V (`kv_dim` each) of position `pos` in `layer`.
    pub(crate) fn write(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let l = self.pool.layout;
        let b = self.blocks[pos / l.block_size];
        let p = pos % l.block_size;
        // SAFETY: this sequence owns `b` and is borrowed mutably.
        unsafe {
            self.pool.write_position(b, layer, false, p, k);
            self.pool.write_position(b, layer, true, p, v);
        }
    }

    /// [`write`](Self::write) of values already in the pool's format (f16 or f32, `kv_dim`
    /// of each, head by head): what a device that computed them copies back.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA backend's
    pub(crate) fn write_raw(&mut self, layer: usize, pos: usize, k: &[u8], v: &[u8]) {
        let l = self.pool.layout;
        let b = self.blocks[pos / l.block_size];
        let p = pos % l.block_size;
        // SAFETY: this sequence owns `b` and is borrowed mutably.
        unsafe {
            self.pool.write_position_raw(b, layer, false, p, k);
            self.pool.write_position_raw(b, layer, true, p, v);
        }
    }

    /// `(K, V)` planes of every block of `layer`, in table order.
    pub(crate) fn layer_blocks(&self, layer: usize) -> Vec<KvBlockRef<'_>> {
        self.blocks
            .iter()
            // SAFETY: this sequence owns its blocks and is borrowed shared, so no write is alive.
            .map(|&b| unsafe {
                (
                    self.pool.plane(b, layer, false),
                    self.pool.plane(b, layer, true),
                )
            })
            .collect()
    }
}

impl Drop for KvSequence {
    fn drop(&mut self) {
        self.pool.release(&self.blocks);
    }
}
