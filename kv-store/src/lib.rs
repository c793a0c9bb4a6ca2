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
//!
//! The pooled RAM → disk store of the architecture lands here too (not built yet).

pub mod frame;
pub mod tcp;

/// xxh3 over slabs fed in `(layer, block)` order.
#[derive(Default)]
pub struct Checksum(xxhash_rust::xxh3::Xxh3);

impl Checksum {
    pub fn new() -> Checksum {
        Checksum::default()
    }
    pub fn update(&mut self, slab: &[u8]) {
        self.0.update(slab);
    }
    pub fn digest(&self) -> u64 {
        self.0.digest()
    }
}
