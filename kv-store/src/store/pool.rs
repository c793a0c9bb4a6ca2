//! Fetching into a shared pool on the store's host: the store copies a lease's blocks straight
//! into the blocks a decode worker reserved in its pool file (`engine::KvPool::new_shared`),
//! the way a prefill worker on that host writes its KV in place — the CPU analogue of an RDMA
//! one-sided write, and no socket in the way (kv-store/SPEC.md § Fetching into a shared pool).
//!
//! The decode worker lends the blocks through its pool's fence ([`crate::shm::fence`]) under
//! a tag and names them with the pool's path; the store maps the pool (once: mappings are
//! kept, keyed by the file's identity), **holds** the blocks through the fence for the whole
//! copy — so a worker that gave up waiting cannot reuse them under it — and copies each block
//! whole. It sums nothing: each block's CRC-32 was taken when its put was checked (or its file
//! read back), and the worker checks its copy against those ([`crate::block_crcs`]) — so the
//! check covers the block from the put on, and the copy is a plain `memcpy`.
//!
//! What the store agrees to map: a pool file as pools are named, in this host's
//! shared-memory folder, a regular file (no link), whose size is a whole number of blocks of
//! the asked shape; every block named lies in it.

use super::{Shape, Store, StoreError, Tier};
use crate::shm::fence::{Hold, HoldError};
use frontend::block::BlockHash;
use memmap2::MmapRaw;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Why a fetch into a pool was refused. The worker fetches over TCP instead (or computes).
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The store cannot reach the pool: another host, another `/dev/shm` (a container), a
    /// path that is not a pool. Fetching over shared memory will not work for this worker.
    #[error("the store cannot map {0}: {1}")]
    Unreachable(PathBuf, String),
    #[error("{0}")]
    Invalid(String),
    #[error("the pool's fence: {0}")]
    Fence(#[from] HoldError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where a fetch's blocks go: `blocks[i]` of the pool at `path` takes the `i`-th hash's bytes,
/// lent under the fence tag `tag`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolTarget {
    pub path: PathBuf,
    pub blocks: Vec<u32>,
    pub tag: u64,
}

/// What a fetch into a pool copied: the tiers of the blocks copied (a prefix of those asked)
/// and each one's CRC-32, as the store holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    pub tiers: Vec<Tier>,
    pub crcs: Vec<u32>,
}

/// A mapped pool and the identity of the file it maps.
struct Mapped {
    path: PathBuf,
    id: (u64, u64),
    map: Arc<MmapRaw>,
}

/// Pools mapped so far (a few decode workers per host): a mapping goes when its file does (or
/// is replaced), the oldest beyond [`Pools::KEEP`].
#[derive(Default)]
pub struct Pools(Mutex<Vec<Mapped>>);

impl Pools {
    const KEEP: usize = 16;

    /// Pools mapped now.
    pub fn mapped(&self) -> usize {
        self.0.lock().expect("pool mappings poisoned").len()
    }

    /// The mapping of the pool at `path`, checked as the module says.
    fn map(&self, path: &Path, shape: Shape) -> Result<Arc<MmapRaw>, PoolError> {
        let unreachable = |why: String| PoolError::Unreachable(path.to_owned(), why);
        if path.parent() != Some(crate::shm::dir().as_path()) || !crate::shm::is_pool_file(path) {
            return Err(unreachable(
                "not a KV pool in this host's shared-memory folder".into(),
            ));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| unreachable(e.to_string()))?;
        let meta = file.metadata().map_err(|e| unreachable(e.to_string()))?;
        let id = (meta.dev(), meta.ino());
        let block = shape.bytes() as u64;
        if !meta.is_file() || meta.len() == 0 || !meta.len().is_multiple_of(block) {
            return Err(PoolError::Invalid(format!(
                "a pool of {} bytes does not hold blocks of {block}",
                meta.len()
            )));
        }
        let mut maps = self.0.lock().expect("pool mappings poisoned");
        // A mapping outlives its file's name: one whose file was removed or replaced (its
        // worker stopped or restarted) would keep the whole pool's memory alive. Unmap those.
        maps.retain(|m| {
            std::fs::symlink_metadata(&m.path).is_ok_and(|md| (md.dev(), md.ino()) == m.id)
        });
        if let Some(m) = maps.iter().find(|m| m.path == path && m.id == id) {
            return Ok(m.map.clone());
        }
        let map = Arc::new(MmapRaw::map_raw(&file).map_err(|e| unreachable(e.to_string()))?);
        maps.retain(|m| m.path != path);
        if maps.len() >= Self::KEEP {
            maps.remove(0);
        }
        maps.push(Mapped {
            path: path.to_owned(),
            id,
            map: map.clone(),
        });
        Ok(map)
    }
}

/// Copies the longest held prefix of `hashes` (blocks of `shape`) into `to`: leases it, reads
/// it ([`Store::read_prefix`]: a damaged block ends it there), holds the target blocks through the
/// fence, copies, releases. No block held: nothing copied, no error.
pub fn fetch_into(
    store: &Store,
    pools: &Pools,
    hashes: &[BlockHash],
    shape: Shape,
    to: &PoolTarget,
) -> Result<Copied, PoolError> {
    if to.blocks.len() != hashes.len() {
        return Err(PoolError::Invalid(format!(
            "{} target blocks for {} hashes",
            to.blocks.len(),
            hashes.len()
        )));
    }
    let map = pools.map(&to.path, shape)?;
    let block = shape.bytes();
    let n_blocks = map.len() / block;
    if let Some(&b) = to.blocks.iter().find(|&&b| b as usize >= n_blocks) {
        return Err(PoolError::Invalid(format!(
            "block {b} of a pool of {n_blocks}"
        )));
    }
    let Some(lease) = store.lease(hashes, shape, hashes.len()) else {
        return Ok(Copied {
            tiers: Vec::new(),
            crcs: Vec::new(),
        });
    };
    let copied = (|| {
        let payloads = store.read_prefix(&lease);
        let targets = &to.blocks[..payloads.len()];
        let _hold = Hold::take(&to.path, targets, to.tag)?;
        // Each block whole: its bytes are contiguous on both sides (the store's object and the
        // pool's block are the same slabs in layer order). Summing each slab on the way (as
        // the data plane does) cost the copy 10–20% here; layer by layer, 25% more.
        for (p, &b) in payloads.iter().zip(targets) {
            // SAFETY: the block lies inside the mapping (`b` < the pool's blocks, checked
            // above), and the fence hold makes it the store's alone for the copy: the worker
            // lent these blocks under `tag` and cannot take them back while the hold lives.
            unsafe {
                let dst = map.as_mut_ptr().add(b as usize * block);
                std::ptr::copy_nonoverlapping(p.bytes.as_ptr(), dst, block);
            }
        }
        Ok(Copied {
            tiers: lease.blocks[..payloads.len()].iter().map(|b| b.1).collect(),
            crcs: payloads.iter().map(|p| p.crc).collect(),
        })
    })();
    store.release(lease.id);
    if let Ok(c) = &copied {
        metrics::counter!("tandem_kv_store_bytes_sent_total", "transport" => "shm")
            .increment((c.tiers.len() * block) as u64);
    }
    copied
}
