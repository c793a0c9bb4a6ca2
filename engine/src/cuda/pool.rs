//! Device copies of host KV pools.
//!
//! The host [`KvPool`] stays the one source of block ids, reference counts, prefix hashes and
//! transfers; its device copy has the same byte layout (block-major, K transposed, V by
//! position, in the pool's dtype), so a block moves either way as one range. Each device
//! block remembers the host generation it was last made equal to: a block whose host
//! generation moved (allocated anew, adopted from another process, written by a transfer or
//! a store fetch) is uploaded before a forward reads it; blocks a forward writes are written
//! on both sides and so stay equal.

use super::{Gpu, dev};
use crate::error::Result;
use crate::kv::{KvPool, KvSequence};
use cudarc::driver::{CudaSlice, DevicePtr};
use std::collections::HashMap;
use std::sync::{Arc, Weak};

/// One host pool's device copy.
struct DevPool {
    host: Weak<KvPool>,
    bytes: CudaSlice<u8>,
    /// Per block: the host generation + 1 the device copy equals, 0 for none.
    resident: Vec<u64>,
}

/// Every pool a model computes in (its own; on a prefill worker, each decode worker's shared
/// pool it writes into), by [`KvPool::id`].
#[derive(Default)]
pub(super) struct DevicePools {
    pools: HashMap<u64, DevPool>,
}

impl DevicePools {
    /// Frees the device copies of pools that no longer exist.
    pub(super) fn forget_dropped(&mut self) {
        self.pools.retain(|_, p| p.host.strong_count() > 0);
    }

    /// Makes the device copy of `seq`'s filled blocks current before a forward that appends
    /// `new` positions (and marks the blocks those land in as the device's); returns the
    /// device address of the pool's copy.
    pub(super) fn sync(&mut self, gpu: &Gpu, seq: &KvSequence, new: usize) -> Result<u64> {
        let host = seq.pool();
        let layout = host.layout();
        let bb = layout.block_bytes();
        let p = match self.pools.entry(host.id()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let n = host.n_blocks();
                // Never read before written: a block is uploaded or computed before any
                // forward reads it (the generations below).
                let bytes = gpu.scratch::<u8>(n * bb)?;
                e.insert(DevPool {
                    host: Arc::downgrade(host),
                    bytes,
                    resident: vec![0; n],
                })
            }
        };
        let bs = layout.block_size;
        let blocks = seq.block_table();
        let filled = seq.len().div_ceil(bs);
        let used = (seq.len() + new).div_ceil(bs).min(blocks.len());
        let gens = host.generations(&blocks[..used]);
        for (i, (&b, g)) in blocks[..used].iter().zip(gens).enumerate() {
            let bi = b.0 as usize;
            if p.resident[bi] == g + 1 {
                continue;
            }
            if i < filled {
                // SAFETY: `seq` holds the block and is borrowed, so nothing writes it now.
                let src = unsafe { host.block_raw(b) };
                let mut dst = p.bytes.slice_mut(bi * bb..(bi + 1) * bb);
                gpu.stream.memcpy_htod(src, &mut dst).map_err(dev)?;
            }
            p.resident[bi] = g + 1;
        }
        let (addr, _sync) = p.bytes.device_ptr(&gpu.stream);
        Ok(addr)
    }
}
