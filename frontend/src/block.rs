//! A KV block's name: the chained hash over the tokens of full blocks, salted with the model
//! and KV format, so that equal names mean equal KV contents in any process of any host.
//!
//! Specified in `kv-store/SPEC.md` (§ Block hashes), whose test vectors
//! [`tests::spec_vectors`] checks: another implementation that hashes the same way can find
//! Tandem's blocks in a store.
//!
//! It lives here, below the engine, because the scheduler routes by it (which worker, which
//! store tier holds a prompt's prefix) without linking a model runtime.

use crate::TokenId;

/// A full block's identity: a hash chained over every token from the start of the sequence up
/// to the block's end, starting from a [`salt`], so equal hashes mean equal KV contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub u64);

impl std::fmt::Display for BlockHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Version of the hash scheme, part of every salt: a change to how blocks are hashed (or to
/// what a block holds) bumps it, so old and new blocks never match.
pub const HASH_VERSION: u32 = 1;

/// The first link of every chain for one model and KV format: xxh3-64 over the ASCII bytes
/// `tandem-kv-block`, the version, the engine fingerprint (which covers the GGUF file, the
/// weight precision and the KV dtype) and the block size, each little-endian.
pub fn salt(fingerprint: u64, block_size: usize) -> u64 {
    let mut b = Vec::with_capacity(15 + 4 + 8 + 4);
    b.extend_from_slice(b"tandem-kv-block");
    b.extend_from_slice(&HASH_VERSION.to_le_bytes());
    b.extend_from_slice(&fingerprint.to_le_bytes());
    b.extend_from_slice(&(block_size as u32).to_le_bytes());
    xxhash_rust::xxh3::xxh3_64(&b)
}

/// Hashes of the full blocks of `tokens`: `h_i = xxh3_64_with_seed(tokens_i as u32 LE, seed =
/// h_{i-1})` with `h_{-1} = salt`. A partial last block has no hash.
pub fn block_hashes(salt: u64, tokens: &[TokenId], block_size: usize) -> Vec<BlockHash> {
    let mut h = salt;
    let mut bytes = Vec::with_capacity(block_size * 4);
    tokens
        .chunks_exact(block_size)
        .map(|blk| {
            bytes.clear();
            bytes.extend(blk.iter().flat_map(|t| t.to_le_bytes()));
            h = xxhash_rust::xxh3::xxh3_64_with_seed(&bytes, h);
            BlockHash(h)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectors of kv-store/SPEC.md: change them only with [`HASH_VERSION`].
    #[test]
    fn spec_vectors() {
        let s = salt(0x0123_4567_89ab_cdef, 16);
        assert_eq!(format!("{s:016x}"), SPEC_SALT);
        let tokens: Vec<TokenId> = (0..40).map(|i| i * 7 + 1).collect();
        let h: Vec<String> = block_hashes(s, &tokens, 16)
            .iter()
            .map(|h| h.to_string())
            .collect();
        assert_eq!(h, SPEC_CHAIN, "two full blocks of 40 tokens");
    }
    // Computed independently with Python's `xxhash` package (kv-store/SPEC.md shows how).
    const SPEC_SALT: &str = "712332d6b1124db9";
    const SPEC_CHAIN: [&str; 2] = ["4aaf74ca9f00c86e", "2802aa67e5476ccf"];

    #[test]
    fn chains_depend_on_everything_before() {
        let s = salt(7, 4);
        let a = block_hashes(s, &[1, 2, 3, 4, 5, 6, 7, 8], 4);
        let b = block_hashes(s, &[1, 2, 3, 9, 5, 6, 7, 8], 4);
        assert_eq!(a.len(), 2);
        assert_ne!(a[0], b[0]);
        assert_ne!(a[1], b[1], "a block's hash covers its whole prefix");
        assert_eq!(
            block_hashes(s, &[1, 2, 3, 4, 5], 4),
            a[..1],
            "partial block unhashed"
        );
        assert_ne!(
            block_hashes(salt(8, 4), &[1, 2, 3, 4], 4),
            a[..1],
            "model salts"
        );
        assert_ne!(salt(7, 4), salt(7, 8), "block size salts");
    }
}
