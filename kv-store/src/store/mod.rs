//! The pooled KV store: immutable KV blocks named by their [`BlockHash`], in a RAM tier that
//! spills to a disk tier, shared by every worker of a model.
//!
//! The rules (kv-store/SPEC.md, § The store), after Mooncake Store's:
//! - **Put is two-phase**: [`Store::put_start`] says which of the blocks the store lacks and
//!   stages them; the slabs arrive ([`Store::slot`], written in place by the data plane);
//!   [`Store::put_end`] checks the sender's checksum over them and publishes them. A put that
//!   never ends expires ([`Limits::put_ttl`]) unless a transfer is writing it.
//! - **Objects are immutable**: a block is written once; a put of a block already held skips it.
//! - **Reads take a lease** ([`Store::lease`], [`Limits::lease_ttl`]): a leased block is never
//!   evicted nor removed until the lease is released or lapses.
//! - **Eviction is LRU** from RAM to disk (the file is written once; a block read from disk is
//!   brought back into RAM) and from disk to nothing. A full store refuses puts and drops
//!   blocks; it never fails a read it leased.
//! - **Restart keeps the disk tier**: reopening the directory re-indexes its files, oldest
//!   first; a file whose checksum fails is removed when read, and the block is a miss.
//!
//! One mutex guards the index; RAM payloads are shared (`Arc`) so readers copy outside it; disk
//! reads of leased blocks run outside it too. Disk writes (spills) run under it: simple, and on
//! a page cache a 400 KiB write costs a fraction of a millisecond.

pub mod client;
pub mod disk;
pub mod fetch;
pub mod get;
mod index;
pub mod pool;
pub mod service;

use crate::Checksum;
use disk::{Dir, Shape};
use frontend::block::BlockHash;
use protocol::LeaseId;
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub use disk::Shape as BlockShape;

/// Where a block lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    Ram,
    Disk,
}

impl Tier {
    pub fn name(self) -> &'static str {
        match self {
            Tier::Ram => "ram",
            Tier::Disk => "disk",
        }
    }
}

/// How much the store holds and how long its promises last.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Bytes of block payload in RAM.
    pub ram_bytes: usize,
    /// The disk tier: a directory and the bytes of payload it may hold.
    pub disk: Option<(PathBuf, u64)>,
    /// Bytes staged by puts in flight (beyond `ram_bytes`): more are refused.
    pub staging_bytes: usize,
    /// How long a read lease holds its blocks.
    pub lease_ttl: Duration,
    /// How long a put may take from its start to its end (when no transfer is writing it).
    pub put_ttl: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            ram_bytes: 256 << 20,
            disk: None,
            staging_bytes: 64 << 20,
            lease_ttl: Duration::from_secs(10),
            put_ttl: Duration::from_secs(30),
        }
    }
}

/// Why a call failed. None of these is a reason to fail a request: the caller computes the KV
/// instead.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    #[error("no put or lease {0}")]
    Unknown(LeaseId),
    #[error("the store is full: {0}")]
    Full(String),
    #[error("{0}")]
    Invalid(String),
    #[error("checksum mismatch: {got:#x} sent, {want:#x} received")]
    Checksum { got: u64, want: u64 },
    #[error("block {0} is damaged on disk and was removed")]
    Corrupt(BlockHash),
    #[error("disk tier: {0}")]
    Io(String),
}

/// Counters since start, for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub ram_blocks: u64,
    pub ram_bytes: u64,
    pub disk_blocks: u64,
    pub disk_bytes: u64,
    pub hits_ram: u64,
    pub hits_disk: u64,
    pub misses: u64,
    pub puts: u64,
    pub stored: u64,
    pub put_refused: u64,
    pub spilled: u64,
    pub evicted_disk: u64,
    pub dropped: u64,
    pub corrupt: u64,
    pub leases: u64,
    pub puts_open: u64,
}

/// A read lease: the longest prefix of the asked blocks the store holds, pinned.
#[derive(Debug, Clone)]
pub struct Lease {
    pub id: LeaseId,
    /// Each leased block and the tier it lay in when leased.
    pub blocks: Vec<(BlockHash, Tier)>,
    pub shape: Shape,
}

/// What a put must send.
#[derive(Debug, Clone)]
pub struct PutStart {
    pub id: LeaseId,
    /// For each block of the put, whether the store wants its slabs (false: held already).
    pub want: Vec<bool>,
}

/// A block's payload (layer-major slabs) and the CRC-32 of its bytes — computed when its put
/// was checked, or read from its file's header when that checked out — which readers that
/// copy without summing hand on (`pool`).
#[derive(Debug, Clone)]
pub struct Block {
    pub bytes: Arc<[u8]>,
    pub crc: u32,
}

impl Block {
    fn new(bytes: Arc<[u8]>) -> Block {
        let crc = crc32fast::hash(&bytes);
        Block { bytes, crc }
    }
}

struct Entry {
    shape: Shape,
    ram: Option<Block>,
    on_disk: bool,
    /// Leases holding it.
    leased: u32,
    /// Its place in the LRU orders.
    tick: u64,
}

struct Put {
    shape: Shape,
    /// The wanted blocks, each staged as `slabs × slab_bytes` (layer-major).
    blocks: Vec<(BlockHash, Box<[u8]>)>,
    deadline: Instant,
    /// The data-plane connection writing into the staging, once one does: the put then lives
    /// until that connection ends or aborts it, and no other may write, end or abort it.
    writer: Option<u64>,
}

struct ReadLease {
    blocks: Vec<BlockHash>,
    deadline: Instant,
}

struct Index {
    limits: Limits,
    dir: Option<Dir>,
    entries: HashMap<BlockHash, Entry>,
    /// `(tick, hash)` of blocks in RAM, and of blocks on disk: oldest first.
    ram_lru: BTreeSet<(u64, BlockHash)>,
    disk_lru: BTreeSet<(u64, BlockHash)>,
    tick: u64,
    ram_bytes: usize,
    disk_bytes: u64,
    staged_bytes: usize,
    puts: HashMap<LeaseId, Put>,
    leases: HashMap<LeaseId, ReadLease>,
    stats: Stats,
    /// Hears every change of a block's tier ([`Store::watch`]).
    watch: Option<StoreWatch>,
}

/// Hears a block's new tier, or `None` when the store no longer holds it.
pub type StoreWatch = Box<dyn Fn(BlockHash, Option<Tier>) + Send + Sync>;

/// The store. Cheap to share (`Arc`).
pub struct Store {
    index: Mutex<Index>,
}

impl Store {
    /// A store with these limits; with a disk tier, its directory is re-indexed (files oldest
    /// first in the LRU order, so the newest are evicted last).
    pub fn open(limits: Limits) -> std::io::Result<Store> {
        let mut ix = Index {
            dir: None,
            entries: HashMap::new(),
            ram_lru: BTreeSet::new(),
            disk_lru: BTreeSet::new(),
            tick: 0,
            ram_bytes: 0,
            disk_bytes: 0,
            staged_bytes: 0,
            puts: HashMap::new(),
            leases: HashMap::new(),
            stats: Stats::default(),
            watch: None,
            limits,
        };
        if let Some((path, _)) = ix.limits.disk.clone() {
            let dir = Dir::open(&path)?;
            let mut files = dir.scan()?;
            files.sort_by_key(|f| f.2);
            for (h, shape, _) in files {
                ix.tick += 1;
                ix.disk_bytes += shape.bytes() as u64;
                ix.disk_lru.insert((ix.tick, h));
                ix.entries.insert(
                    h,
                    Entry {
                        shape,
                        ram: None,
                        on_disk: true,
                        leased: 0,
                        tick: ix.tick,
                    },
                );
            }
            ix.dir = Some(dir);
            ix.make_room(0);
            tracing::info!(blocks = ix.disk_lru.len(), bytes = ix.disk_bytes, path = %path.display(), "disk tier re-indexed");
        }
        Ok(Store {
            index: Mutex::new(ix),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        let mut ix = self.index.lock().expect("store index poisoned");
        ix.expire(Instant::now());
        ix
    }

    /// The tiers of the longest prefix of `hashes` the store holds (no lease: for routing).
    pub fn lookup(&self, hashes: &[BlockHash]) -> Vec<Tier> {
        let ix = self.lock();
        hashes
            .iter()
            .map_while(|h| ix.entries.get(h).map(Entry::tier))
            .collect()
    }

    /// Leases the longest prefix of `hashes` held with this `shape` (at most `max` blocks):
    /// those blocks stay until [`release`](Self::release) or the lease lapses. An empty prefix
    /// takes no lease.
    pub fn lease(&self, hashes: &[BlockHash], shape: Shape, max: usize) -> Option<Lease> {
        let mut ix = self.lock();
        let mut blocks = Vec::new();
        for &h in hashes.iter().take(max) {
            let tick = ix.next_tick();
            let Some(e) = ix.entries.get_mut(&h).filter(|e| e.shape == shape) else {
                break;
            };
            e.leased += 1;
            let tier = e.tier();
            let old = std::mem::replace(&mut e.tick, tick);
            let (in_ram, on_disk) = (e.ram.is_some(), e.on_disk);
            ix.retick(h, old, tick, in_ram, on_disk);
            blocks.push((h, tier));
        }
        let hits = blocks.len() as u64;
        ix.stats.misses += (hashes.len().min(max) as u64) - hits;
        if blocks.is_empty() {
            return None;
        }
        for (_, t) in &blocks {
            match t {
                Tier::Ram => ix.stats.hits_ram += 1,
                Tier::Disk => ix.stats.hits_disk += 1,
            }
        }
        let id = LeaseId::random();
        let deadline = Instant::now() + ix.limits.lease_ttl;
        ix.leases.insert(
            id,
            ReadLease {
                blocks: blocks.iter().map(|b| b.0).collect(),
                deadline,
            },
        );
        Some(Lease { id, blocks, shape })
    }

    /// A leased block's payload (layer-major slabs) ([`read_block`](Self::read_block)).
    pub fn read(&self, lease: LeaseId, h: BlockHash) -> Result<Arc<[u8]>, StoreError> {
        self.read_block(lease, h).map(|b| b.bytes)
    }

    /// A leased block's payload and CRC. From disk it is read and checked outside the index
    /// lock and brought back into RAM; a damaged file is removed ([`StoreError::Corrupt`]:
    /// the caller recomputes this block and those after it).
    pub fn read_block(&self, lease: LeaseId, h: BlockHash) -> Result<Block, StoreError> {
        let dir = {
            let ix = self.lock();
            let l = ix.leases.get(&lease).ok_or(StoreError::Unknown(lease))?;
            if !l.blocks.contains(&h) {
                return Err(StoreError::Invalid(format!(
                    "block {h} is not in lease {lease}"
                )));
            }
            let e = ix.entries.get(&h).ok_or(StoreError::Corrupt(h))?;
            if let Some(p) = &e.ram {
                return Ok(p.clone());
            }
            ix.dir.clone().expect("a block not in RAM is on disk")
        };
        // The lease pins the file: no eviction removes it while it is read here, unlocked.
        match dir.read(h) {
            Ok((_, payload, crc)) => {
                let payload = Block {
                    bytes: payload.into(),
                    crc,
                };
                let mut ix = self.lock();
                let bytes = payload.bytes.len();
                ix.make_room(bytes);
                if ix.ram_bytes + bytes <= ix.limits.ram_bytes {
                    let tick = ix.next_tick();
                    let e = ix
                        .entries
                        .get_mut(&h)
                        .expect("a leased block stays indexed");
                    if e.ram.is_none() {
                        e.ram = Some(payload.clone());
                        let old = std::mem::replace(&mut e.tick, tick);
                        ix.ram_bytes += bytes;
                        ix.retick(h, old, tick, true, true);
                        ix.note(h);
                    }
                }
                Ok(payload)
            }
            Err(disk::ReadError::Corrupt { path, what }) => {
                tracing::warn!(path = %path.display(), %what, "damaged block file removed");
                let mut ix = self.lock();
                ix.stats.corrupt += 1;
                ix.forget_disk(h);
                Err(StoreError::Corrupt(h))
            }
            Err(disk::ReadError::Io(e)) => Err(StoreError::Io(e.to_string())),
        }
    }

    /// The blocks of `lease` that can be read, in order: a prefix, ended by the first that
    /// cannot (a damaged disk file: removed, and the reader computes it and those after it).
    /// Every payload is of the lease's shape.
    pub fn read_prefix(&self, lease: &Lease) -> Vec<Block> {
        let mut blocks = Vec::with_capacity(lease.blocks.len());
        for (h, _) in &lease.blocks {
            match self.read_block(lease.id, *h) {
                Ok(b) if b.bytes.len() == lease.shape.bytes() => blocks.push(b),
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(block = %h, error = %e, "store read failed; the read stops before it");
                    break;
                }
            }
        }
        blocks
    }

    /// Ends a read lease (a lapsed or unknown one is not an error: the blocks are free anyway).
    pub fn release(&self, lease: LeaseId) {
        let mut ix = self.lock();
        if let Some(l) = ix.leases.remove(&lease) {
            ix.unpin(&l.blocks);
        }
    }

    /// Starts a put of `hashes`' blocks of `shape`: says which the store lacks and stages room
    /// for them. Refused ([`StoreError::Full`]) when the staging is full.
    pub fn put_start(&self, hashes: &[BlockHash], shape: Shape) -> Result<PutStart, StoreError> {
        if shape.slabs == 0 || shape.slab_bytes == 0 {
            return Err(StoreError::Invalid("a block of no bytes".into()));
        }
        let mut ix = self.lock();
        ix.stats.puts += 1;
        let mut seen = std::collections::HashSet::new();
        let want: Vec<bool> = hashes
            .iter()
            .map(|h| !ix.entries.contains_key(h) && seen.insert(*h))
            .collect();
        let n = want.iter().filter(|w| **w).count();
        let bytes = n * shape.bytes();
        if ix.staged_bytes + bytes > ix.limits.staging_bytes {
            ix.stats.put_refused += 1;
            return Err(StoreError::Full(format!(
                "{} bytes staged, {bytes} more asked, {} allowed",
                ix.staged_bytes, ix.limits.staging_bytes
            )));
        }
        ix.staged_bytes += bytes;
        let blocks = hashes
            .iter()
            .zip(&want)
            .filter(|(_, w)| **w)
            .map(|(h, _)| (*h, vec![0u8; shape.bytes()].into_boxed_slice()))
            .collect();
        let id = LeaseId::random();
        let deadline = Instant::now() + ix.limits.put_ttl;
        ix.puts.insert(
            id,
            Put {
                shape,
                blocks,
                deadline,
                writer: None,
            },
        );
        Ok(PutStart { id, want })
    }

    /// Where slab `layer` of the put's `i`-th wanted block goes (`len` bytes), for data-plane
    /// connection `conn` writing in place. The first connection to ask becomes the put's
    /// writer: from then the put does not expire, and its memory stays valid and untouched by
    /// anyone else until that connection's [`put_end`](Self::put_end) or
    /// [`put_abort`](Self::put_abort). `None`: no such put, block or layer, a slab of another
    /// size, or another connection's put.
    pub fn slot(
        &self,
        put: LeaseId,
        conn: u64,
        i: usize,
        layer: usize,
        len: usize,
    ) -> Option<crate::tcp::Slot> {
        let mut out = Vec::with_capacity(1);
        self.slots(put, conn, &[i as u32], layer, len, &mut out);
        out.pop().flatten()
    }

    /// [`slot`](Self::slot) for each of `blocks` (a frame's), under one lock, pushed to `out`.
    pub fn slots(
        &self,
        put: LeaseId,
        conn: u64,
        blocks: &[u32],
        layer: usize,
        len: usize,
        out: &mut Vec<Option<crate::tcp::Slot>>,
    ) {
        let mut ix = self.lock();
        let p = ix
            .puts
            .get_mut(&put)
            .filter(|p| len == p.shape.slab_bytes as usize && layer < p.shape.slabs as usize);
        let Some(p) = p else {
            out.extend(blocks.iter().map(|_| None));
            return;
        };
        if *p.writer.get_or_insert(conn) != conn {
            out.extend(blocks.iter().map(|_| None));
            return;
        }
        out.extend(blocks.iter().map(|&i| {
            let (_, staged) = p.blocks.get_mut(i as usize)?;
            let at = layer * len;
            Some(crate::tcp::Slot {
                ptr: staged[at..at + len].as_mut_ptr(),
                len,
            })
        }));
    }

    /// Copies a slab into a put (the in-process path; the data plane writes through
    /// [`slot`](Self::slot)).
    pub fn write(
        &self,
        put: LeaseId,
        i: usize,
        layer: usize,
        slab: &[u8],
    ) -> Result<(), StoreError> {
        let mut ix = self.lock();
        let p = ix.puts.get_mut(&put).ok_or(StoreError::Unknown(put))?;
        if p.writer.is_some() {
            return Err(StoreError::Invalid(format!(
                "put {put} is a data-plane transfer's"
            )));
        }
        if slab.len() != p.shape.slab_bytes as usize || layer >= p.shape.slabs as usize {
            return Err(StoreError::Invalid(format!(
                "slab {layer} of {} bytes for blocks of {:?}",
                slab.len(),
                p.shape
            )));
        }
        let (_, staged) = p
            .blocks
            .get_mut(i)
            .ok_or_else(|| StoreError::Invalid(format!("block {i} is not in the put")))?;
        staged[layer * slab.len()..][..slab.len()].copy_from_slice(slab);
        Ok(())
    }

    /// Ends a put: `checksum` is the sender's [`Checksum`] over the wanted blocks' slabs in
    /// `(layer, block)` order. On a match the blocks are published (LRU-newest), evicting older
    /// ones; blocks that cannot get room are dropped (the store is full of leased blocks).
    /// Returns how many were published. `conn`: the data-plane connection ending it (`None`
    /// in process); only the put's writer may end it.
    pub fn put_end(
        &self,
        put: LeaseId,
        conn: Option<u64>,
        checksum: u64,
    ) -> Result<usize, StoreError> {
        let p = {
            let mut ix = self.lock();
            let p = ix.puts.get(&put).ok_or(StoreError::Unknown(put))?;
            if p.writer.is_some() && p.writer != conn {
                return Err(StoreError::Unknown(put));
            }
            let p = ix.puts.remove(&put).expect("just found");
            ix.staged_bytes -= p.blocks.len() * p.shape.bytes();
            p
        };
        // Summed outside the lock: the put is ours alone now (and each block's CRC too).
        let len = p.shape.slab_bytes as usize;
        let mut c = Checksum::new();
        for layer in 0..p.shape.slabs as usize {
            for (_, b) in &p.blocks {
                c.update(&b[layer * len..][..len]);
            }
        }
        if c.digest() != checksum {
            return Err(StoreError::Checksum {
                got: checksum,
                want: c.digest(),
            });
        }
        let blocks: Vec<(BlockHash, Block)> = p
            .blocks
            .into_iter()
            .map(|(h, b)| (h, Block::new(Arc::from(b))))
            .collect();
        let mut ix = self.lock();
        let mut stored = 0;
        for (h, payload) in blocks {
            if ix.entries.contains_key(&h) {
                continue; // another put published it meanwhile: objects are immutable
            }
            let bytes = payload.bytes.len();
            ix.make_room(bytes);
            if ix.ram_bytes + bytes > ix.limits.ram_bytes {
                ix.stats.dropped += 1;
                continue;
            }
            let tick = ix.next_tick();
            ix.ram_bytes += bytes;
            ix.ram_lru.insert((tick, h));
            ix.entries.insert(
                h,
                Entry {
                    shape: p.shape,
                    ram: Some(payload),
                    on_disk: false,
                    leased: 0,
                    tick,
                },
            );
            ix.note(h);
            stored += 1;
        }
        ix.stats.stored += stored as u64;
        Ok(stored)
    }

    /// Drops a put (its transfer broke): nothing of it is published. Only its writer (when a
    /// connection writes it) may.
    pub fn put_abort(&self, put: LeaseId, conn: Option<u64>) {
        let mut ix = self.lock();
        if ix
            .puts
            .get(&put)
            .is_some_and(|p| p.writer.is_none() || p.writer == conn)
        {
            let p = ix.puts.remove(&put).expect("just found");
            ix.staged_bytes -= p.blocks.len() * p.shape.bytes();
        }
    }

    /// Hands every change of a block's best tier (RAM, else disk, else gone) to `to`, in
    /// order, from now on; it runs under the index lock and must not call the store. With
    /// [`held`](Self::held) taken after, a watcher knows what the store holds at all times.
    pub fn watch(&self, to: StoreWatch) {
        self.lock().watch = Some(to);
    }

    /// Every block held now, with its best tier.
    pub fn held(&self) -> Vec<(BlockHash, Tier)> {
        let ix = self.lock();
        ix.entries.iter().map(|(h, e)| (*h, e.tier())).collect()
    }

    pub fn stats(&self) -> Stats {
        let ix = self.lock();
        Stats {
            ram_blocks: ix.ram_lru.len() as u64,
            ram_bytes: ix.ram_bytes as u64,
            disk_blocks: ix.disk_lru.len() as u64,
            disk_bytes: ix.disk_bytes,
            leases: ix.leases.len() as u64,
            puts_open: ix.puts.len() as u64,
            ..ix.stats.clone()
        }
    }
}

impl Entry {
    fn tier(&self) -> Tier {
        if self.ram.is_some() {
            Tier::Ram
        } else {
            Tier::Disk
        }
    }
}

#[cfg(test)]
mod tests;
