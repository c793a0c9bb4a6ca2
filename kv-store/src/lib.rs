//! How KV blocks move between Tandem's processes.
//!
//! A prompt's KV cache is a set of `(block, layer)` **slabs** — one block's K plane then its V
//! plane for one layer, contiguous in every pool (`engine::kv`). On one host a prefill worker
//! writes slabs straight into a decode worker's shared pool (no bytes move at all: see
//! `engine::KvPool::attach`); across hosts it streams them over the TCP data plane here, each
//! layer as soon as it is computed. Either way both sides hash the slabs in `(layer, block)`
//! order ([`Checksum`]) and the commit carries the sum, so a transfer that lost or garbled a
//! byte is refused and redone.
//!
//! # Layout
//! - [`frame`]: the data plane's frame format (versioned).
//! - [`tcp`]: the sender (prefill side) and the receiving server (decode side).
//! - [`shm`]: where shared pools live, which host a worker is on, cleaning up after crashes.
//!
//! The pooled RAM → disk store of the architecture lands here too (not built yet).

pub mod frame;
pub mod shm;
pub mod tcp;

use engine::KvSequence;

/// CRC-32 over slabs fed in `(layer, block)` order: corruption detection on the data path, as
/// iSCSI and RDMA NICs do (PCLMULQDQ-accelerated, chosen at run time by `crc32fast`, so it
/// keeps up with the transports it guards).
#[derive(Default)]
pub struct Checksum(crc32fast::Hasher);

impl Checksum {
    pub fn new() -> Checksum {
        Checksum::default()
    }
    pub fn update(&mut self, slab: &[u8]) {
        self.0.update(slab);
    }
    pub fn digest(&self) -> u64 {
        self.0.clone().finalize() as u64
    }
}

/// The [`Checksum`] of `seq`'s blocks `blocks` (every layer): what a transfer of those blocks
/// must reproduce on the other side.
pub fn sequence_checksum(seq: &KvSequence, blocks: std::ops::Range<usize>) -> u64 {
    let mut c = Checksum::new();
    for layer in 0..seq.pool().layout().n_layers {
        for b in blocks.clone() {
            c.update(seq.slab(b, layer));
        }
    }
    c.digest()
}

/// Blocks a prefill with `cached` positions already in place and `filled` in all writes:
/// from the first block past the cached ones to the last one written.
pub fn written_blocks(cached: usize, filled: usize, block_size: usize) -> std::ops::Range<usize> {
    cached / block_size..filled.div_ceil(block_size)
}
