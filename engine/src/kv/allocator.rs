//! Which blocks are free, held, or cached — the KV pool's bookkeeping as plain data, with no
//! memory behind it (the pool puts it under a mutex and owns the mapping).
//!
//! Policy, after vLLM's `BlockPool`: allocation and release are O(1) on a free list; a full
//! block published under its prefix hash stays findable after its last holder lets go, and
//! such unheld cached blocks are evicted oldest-release first, only when the free list runs
//! dry. A block is overwritten only by its one holder, and never once published.

use super::{BlockHash, BlockId};
use crate::error::{EngineError, Result};
use std::collections::{BTreeMap, HashMap};

/// The pool's block states.
#[derive(Debug)]
pub(crate) struct BlockAllocator {
    free: Vec<BlockId>,
    refs: Vec<u16>,
    /// The prefix cache: full blocks by hash.
    by_hash: HashMap<BlockHash, BlockId>,
    hash_of: Vec<Option<BlockHash>>,
    /// Cached blocks that no sequence holds, by release time: reused by a prefix hit, or
    /// evicted (oldest first) when the free list runs dry.
    evictable: BTreeMap<u64, BlockId>,
    stamp: Vec<u64>,
    clock: u64,
    /// Whether a cached block's bytes were handed out since it was cached (write-through).
    spilled: Vec<bool>,
    /// An attached view of another process's pool: blocks are lent, never freed here.
    foreign: bool,
    /// Per block, bumped whenever its bytes may have been written other than by this
    /// process's forward passes (handed out anew, adopted, written by a transfer): a device
    /// holding a copy of the block knows its copy is stale.
    generation: Vec<u64>,
}

impl BlockAllocator {
    /// `n_blocks` free blocks.
    pub(crate) fn new(n_blocks: usize) -> BlockAllocator {
        BlockAllocator {
            free: (0..n_blocks as u32).rev().map(BlockId).collect(),
            foreign: false,
            ..BlockAllocator::foreign(n_blocks)
        }
    }

    /// The bookkeeping of a view of another process's pool: nothing to allocate, nothing
    /// freed; every block is the owner's to lend.
    pub(crate) fn foreign(n_blocks: usize) -> BlockAllocator {
        BlockAllocator {
            free: Vec::new(),
            refs: vec![0; n_blocks],
            by_hash: HashMap::new(),
            hash_of: vec![None; n_blocks],
            evictable: BTreeMap::new(),
            stamp: vec![0; n_blocks],
            clock: 0,
            spilled: vec![false; n_blocks],
            foreign: true,
            generation: vec![0; n_blocks],
        }
    }

    /// Blocks an allocation can get: free ones plus cached ones nobody holds.
    pub(crate) fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Cached blocks nobody holds.
    pub(crate) fn cached_unheld(&self) -> usize {
        self.evictable.len()
    }

    /// Takes `n` blocks, all or none, evicting the oldest unheld cached blocks if needed.
    pub(crate) fn allocate(&mut self, n: usize) -> Result<Vec<BlockId>> {
        self.allocate_evicting(n, &mut Vec::new())
    }

    /// [`allocate`](Self::allocate), pushing each cached block it evicts (with the hash it
    /// was cached under) to `evicted`: their contents are intact until the caller writes them.
    pub(crate) fn allocate_evicting(
        &mut self,
        n: usize,
        evicted: &mut Vec<(BlockHash, BlockId)>,
    ) -> Result<Vec<BlockId>> {
        let available = self.available();
        if available < n {
            return Err(EngineError::KvExhausted {
                needed: n,
                free: available,
            });
        }
        while self.free.len() < n {
            let (_, b) = self.evictable.pop_first().expect("counted above");
            if let Some(h) = self.hash_of[b.0 as usize].take() {
                self.by_hash.remove(&h);
                self.spilled[b.0 as usize] = false;
                evicted.push((h, b));
            }
            self.free.push(b);
        }
        let at = self.free.len() - n;
        let got: Vec<BlockId> = self.free.drain(at..).collect();
        for b in &got {
            self.refs[b.0 as usize] = 1;
            self.generation[b.0 as usize] += 1;
        }
        Ok(got)
    }

    /// Marks the blocks' bytes as written from outside this process's forward passes.
    pub(crate) fn bump_generation(&mut self, blocks: &[BlockId]) {
        for b in blocks {
            self.generation[b.0 as usize] += 1;
        }
    }

    /// The blocks' generations, in order ([`bump_generation`](Self::bump_generation)).
    pub(crate) fn generations(&self, blocks: &[BlockId]) -> Vec<u64> {
        blocks
            .iter()
            .map(|b| self.generation[b.0 as usize])
            .collect()
    }

    /// Lets go of one reference on each block; a cached block nobody holds becomes evictable,
    /// an uncached one free.
    pub(crate) fn release(&mut self, blocks: &[BlockId]) {
        self.release_caching(blocks, &mut Vec::new())
    }

    /// [`release`](Self::release), pushing each cached block that becomes unheld to `unheld`.
    pub(crate) fn release_caching(
        &mut self,
        blocks: &[BlockId],
        unheld: &mut Vec<(BlockHash, BlockId)>,
    ) {
        if self.foreign {
            return;
        }
        for &b in blocks {
            let i = b.0 as usize;
            assert!(self.refs[i] > 0, "double free of KV block {b:?}");
            self.refs[i] -= 1;
            if self.refs[i] == 0 {
                if let Some(h) = self.hash_of[i] {
                    unheld.push((h, b));
                    self.clock += 1;
                    self.stamp[i] = self.clock;
                    self.evictable.insert(self.clock, b);
                } else {
                    self.free.push(b);
                }
            }
        }
    }

    /// Takes a reference on the cached blocks of the longest cached prefix of `hashes`.
    pub(crate) fn lookup(&mut self, hashes: &[BlockHash]) -> Vec<BlockId> {
        let mut got = Vec::new();
        for h in hashes {
            let Some(&b) = self.by_hash.get(h) else { break };
            let i = b.0 as usize;
            if self.refs[i] == 0 {
                self.evictable.remove(&self.stamp[i]);
            }
            self.refs[i] += 1;
            got.push(b);
        }
        got
    }

    /// Makes a full, never-again-written block findable by its hash (the first block
    /// published under a hash keeps it); whether it was newly cached.
    pub(crate) fn register(&mut self, b: BlockId, h: BlockHash) -> bool {
        let i = b.0 as usize;
        if self.hash_of[i].is_none() && !self.by_hash.contains_key(&h) {
            self.hash_of[i] = Some(h);
            self.by_hash.insert(h, b);
            return true;
        }
        false
    }

    /// Every cached block's hash.
    pub(crate) fn cached_hashes(&self) -> Vec<BlockHash> {
        self.by_hash.keys().copied().collect()
    }

    /// Whether cached block `b` is handed out for the first time since it was cached (and
    /// marks it handed out).
    pub(crate) fn first_spill(&mut self, b: BlockId) -> bool {
        !std::mem::replace(&mut self.spilled[b.0 as usize], true)
    }

    /// Whether one holder may overwrite block `b`: it is held once and not in the prefix
    /// cache. In a foreign view the owner lent the blocks and keeps that count.
    pub(crate) fn exclusive(&self, b: BlockId) -> bool {
        let i = b.0 as usize;
        self.foreign || (self.refs[i] == 1 && self.hash_of[i].is_none())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: [BlockHash; 3] = [BlockHash(10), BlockHash(11), BlockHash(12)];

    #[test]
    fn allocation_is_all_or_nothing() {
        let mut a = BlockAllocator::new(3);
        let x = a.allocate(2).unwrap();
        assert!(matches!(
            a.allocate(2),
            Err(EngineError::KvExhausted { needed: 2, free: 1 })
        ));
        assert_eq!(a.available(), 1);
        a.release(&x);
        assert_eq!(a.available(), 3);
    }

    #[test]
    fn cached_blocks_outlive_their_holder_and_are_found_by_prefix() {
        let mut a = BlockAllocator::new(4);
        let x = a.allocate(3).unwrap();
        for (b, h) in x.iter().zip(H) {
            a.register(*b, h);
        }
        a.release(&x);
        assert_eq!((a.available(), a.cached_unheld()), (4, 3));
        // The longest cached prefix, stopping at the first miss.
        assert_eq!(a.lookup(&[H[0], H[1], BlockHash(99), H[2]]), &x[..2]);
        assert_eq!(a.cached_unheld(), 1, "found blocks are held again");
        assert!(!a.exclusive(x[0]), "a cached block is never overwritten");
    }

    #[test]
    fn unheld_cached_blocks_are_evicted_oldest_release_first() {
        let mut a = BlockAllocator::new(3);
        let x = a.allocate(3).unwrap();
        for (b, h) in x.iter().zip(H) {
            a.register(*b, h);
        }
        // Released in the order 2, 0, 1: block 2 is the oldest.
        a.release(&[x[2]]);
        a.release(&[x[0]]);
        a.release(&[x[1]]);
        assert_eq!(a.allocate(1).unwrap(), [x[2]]);
        assert!(a.lookup(&[H[2]]).is_empty(), "the evicted hash is gone");
        assert_eq!(a.lookup(&[H[0]]), [x[0]], "the others stay findable");
        assert_eq!(a.allocate(1).unwrap(), [x[1]]);
    }

    #[test]
    fn a_block_is_exclusive_only_to_its_one_holder() {
        let mut a = BlockAllocator::new(2);
        let x = a.allocate(1).unwrap();
        assert!(a.exclusive(x[0]));
        a.register(x[0], H[0]);
        assert!(!a.exclusive(x[0]), "published");
        let mut b = BlockAllocator::new(2);
        let y = b.allocate(1).unwrap();
        b.register(y[0], H[1]);
        let again = b.lookup(&[H[1]]);
        assert_eq!(again, y);
        assert!(!b.exclusive(y[0]), "held twice");
        let f = BlockAllocator::foreign(2);
        assert!(f.exclusive(BlockId(1)), "a view writes what it was lent");
        assert_eq!(f.available(), 0, "and allocates nothing");
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn a_double_free_is_caught() {
        let mut a = BlockAllocator::new(1);
        let x = a.allocate(1).unwrap();
        a.release(&x);
        a.release(&x);
    }
}
