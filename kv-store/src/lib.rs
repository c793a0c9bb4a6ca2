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
//! - [`events`]: which blocks a holder has, as a stream of block events (KV-aware routing).
//! - [`frame`]: the data plane's frame format (versioned).
//! - [`tcp`]: the sender (prefill side); `tcp::recv`, the receiving server (decode side).
//! - [`shm`]: where shared pools live, which host a worker is on, cleaning up after crashes;
//!   `shm::fence`, which keeps an in-place writer out of blocks its lease no longer holds.
//!
//! - [`store`]: the pooled store — immutable blocks named by `BlockHash`, a RAM tier spilling
//!   to a disk tier, two-phase puts, leased reads, LRU eviction.

pub mod events;
pub mod frame;
pub mod shm;
pub mod store;
pub mod tcp;

use engine::KvSequence;

/// CRC-32 over slabs fed in `(layer, block)` order: corruption detection on the data path, as
/// iSCSI and RDMA NICs do (carry-less-multiply folding chosen at run time by `crc32fast`:
/// over 40 GB/s on data in cache, so a pass costs what reading the bytes costs).
#[derive(Default, Clone)]
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

/// The CRC-32 of each of `seq`'s blocks `blocks` (its slabs in layer order: its bytes as the
/// store holds them): what a fetch into a shared pool (`store::pool`) is checked against.
pub fn block_crcs(seq: &KvSequence, blocks: std::ops::Range<usize>) -> Vec<u32> {
    blocks
        .map(|b| {
            let mut c = crc32fast::Hasher::new();
            for layer in 0..seq.pool().layout().n_layers {
                c.update(seq.slab(b, layer));
            }
            c.finalize()
        })
        .collect()
}

/// Blocks a prefill with `cached` positions already in place and `filled` in all writes:
/// from the first block past the cached ones to the last one written.
pub fn written_blocks(cached: usize, filled: usize, block_size: usize) -> std::ops::Range<usize> {
    cached / block_size..filled.div_ceil(block_size)
}

#[cfg(test)]
mod tests {
    /// The standard CRC-32 check value, and the same digest however the bytes are split.
    #[test]
    fn checksum_is_crc32_and_independent_of_the_split() {
        let mut c = super::Checksum::new();
        c.update(b"1234");
        c.update(b"56789");
        assert_eq!(c.digest(), 0xcbf4_3926);
        let data: Vec<u8> = (0..100_003u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let mut whole = super::Checksum::new();
        whole.update(&data);
        for cut in [0, 1, 255, 256, 4097, 100_002] {
            let mut parts = super::Checksum::new();
            parts.update(&data[..cut]);
            parts.update(&data[cut..]);
            assert_eq!(parts.digest(), whole.digest(), "cut at {cut}");
        }
    }
}
