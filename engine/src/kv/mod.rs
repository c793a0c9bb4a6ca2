//! The paged KV cache: a pool of fixed-size blocks and the sequences that own them.
//!
//! Storage is one anonymous memory mapping of `n_blocks × n_layers × {K, V} × block_size × kv_dim`
//! values of the pool's [`KvDtype`] (f16 by default, f32 for exact comparisons);
//! the `(block, layer)` slab of K followed by V is contiguous, so a layer of a block can be
//! shipped as one range (what the disaggregated KV push sends). Allocation and release are
//! O(1) on a free list, under a short mutex; block contents are touched without locks,
//! because a block belongs to exactly one [`KvSequence`] at a time and only that sequence's
//! `&mut` methods write it.
//!
//! Budgeting: the pool is sized in bytes up front and never grows; running out is
//! [`crate::EngineError::KvExhausted`], which the server turns into a 503 rather than growing memory.
//!
//! Sharing: a pool can live in a file-backed shared mapping ([`KvPool::new_shared`], a file
//! under `/dev/shm`) that another process on the host maps too ([`KvPool::attach`]). The
//! attached view has no allocator of its own: its sequences are built over blocks the owner
//! reserved ([`KvSequence::adopt`]), and a forward pass on them writes K/V straight into the
//! owner's memory — the disaggregated prefill worker's zero-copy path, the CPU analogue of an
//! RDMA one-sided write.

use crate::error::Result;
use half::f16;
use kernels::attention::KvSlice;
use memmap2::MmapMut;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

mod allocator;
mod sequence;
use allocator::BlockAllocator;
pub use frontend::precision::KvDtype;
pub use sequence::KvSequence;

/// Tokens per KV block.
pub const BLOCK_SIZE: usize = 16;

/// Index of a block in a [`KvPool`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

/// The geometry of every block in a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub n_layers: usize,
    pub kv_dim: usize,
    /// Values per KV head (`kv_dim` is a whole number of heads); `Int8` scales are per head.
    pub head_dim: usize,
    pub block_size: usize,
    pub dtype: KvDtype,
}

impl KvLayout {
    /// The geometry of a Llama-family model's KV cache.
    pub fn for_model(cfg: &crate::config::LlamaConfig, dtype: KvDtype) -> KvLayout {
        KvLayout {
            dtype,
            n_layers: cfg.n_layers,
            kv_dim: cfg.kv_dim(),
            head_dim: cfg.head_dim,
            block_size: BLOCK_SIZE,
        }
    }

    /// Values in one layer's K (or V) of one block.
    pub fn plane(&self) -> usize {
        self.block_size * self.kv_dim
    }
    /// Bytes of one plane: its values, then (`Int8`) one f32 scale per position and head.
    pub fn plane_bytes(&self) -> usize {
        let scales = match self.dtype {
            KvDtype::Int8 => self.block_size * (self.kv_dim / self.head_dim) * 4,
            _ => 0,
        };
        (self.plane() * self.dtype.bytes()).next_multiple_of(4) + scales
    }
    /// The geometry attention reads blocks with (for any head count: only `n_kv_heads`,
    /// `head_dim` and `block_size` matter to the layout).
    pub fn attn_shape(&self) -> kernels::attention::AttnShape {
        let n_kv_heads = self.kv_dim / self.head_dim;
        kernels::attention::AttnShape {
            n_heads: n_kv_heads,
            n_kv_heads,
            head_dim: self.head_dim,
            block_size: self.block_size,
        }
    }
    /// Bytes one block takes over all layers.
    pub fn block_bytes(&self) -> usize {
        self.n_layers * 2 * self.plane_bytes()
    }
}

pub use frontend::block::{BlockHash, block_hashes};

/// A fixed pool of KV blocks.
pub struct KvPool {
    layout: KvLayout,
    n_blocks: usize,
    data: NonNull<u8>,
    /// The mapping holding every block: anonymous, or a shared file for another process to
    /// map. Zero pages cost nothing until written, so the budget is a ceiling, not an up-front
    /// commitment.
    _map: MmapMut,
    /// The shared file, when there is one; removed when its owner drops the pool.
    shared: Option<SharedFile>,
    allocator: Mutex<BlockAllocator>,
    /// The first link of its blocks' hash chains ([`frontend::block::salt`]): 0 until the
    /// engine that owns the pool names its model and KV format.
    hash_salt: std::sync::atomic::AtomicU64,
    spill: std::sync::OnceLock<Spill>,
    watch: std::sync::OnceLock<WatchFn>,
    id: u64,
}

/// When a pool hands its cached blocks out ([`KvPool::spill_to`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpillWhen {
    /// When evicted to make room.
    Evicted,
    /// When no sequence holds them any more (write-through).
    Released,
}

/// A change to a pool's prefix cache ([`KvPool::watch_blocks`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockChange {
    Stored(BlockHash),
    Removed(BlockHash),
}

/// Hears a pool's [`BlockChange`]s.
pub type WatchFn = Box<dyn Fn(BlockChange) + Send + Sync>;

/// Takes a spilled block: its hash and bytes.
pub type SpillFn = Box<dyn Fn(BlockHash, &[u8]) + Send + Sync>;

struct Spill {
    when: SpillWhen,
    to: SpillFn,
}

/// The file behind a shared pool.
#[derive(Debug)]
struct SharedFile {
    path: std::path::PathBuf,
    /// Whether this process created it (and removes it), or attached to another's.
    owner: bool,
}

impl Drop for SharedFile {
    fn drop(&mut self) {
        if self.owner {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

// SAFETY: block contents are reached only through the owning KvSequence (see module docs);
// the allocator is behind a mutex.
unsafe impl Send for KvPool {}
unsafe impl Sync for KvPool {}

impl KvPool {
    /// A pool of as many blocks as fit in `budget_bytes` (at least one).
    /// Pages are committed lazily by the OS as blocks are first written.
    pub fn with_budget(layout: KvLayout, budget_bytes: usize) -> Arc<KvPool> {
        Self::new(layout, Self::blocks_for(layout, budget_bytes))
    }

    /// Blocks that fit in `budget_bytes` (at least one).
    pub fn blocks_for(layout: KvLayout, budget_bytes: usize) -> usize {
        (budget_bytes / layout.block_bytes()).max(1)
    }

    pub fn new(layout: KvLayout, n_blocks: usize) -> Arc<KvPool> {
        let bytes = Self::size(layout, n_blocks);
        let map = MmapMut::map_anon(bytes).expect("mapping the KV pool");
        Self::from_map(layout, n_blocks, map, None, true)
    }

    /// A pool of `n_blocks` in a new shared file at `path` (created; removed when the pool
    /// drops), which other processes of this host can [`attach`](Self::attach) to.
    pub fn new_shared(
        layout: KvLayout,
        n_blocks: usize,
        path: &std::path::Path,
    ) -> std::io::Result<Arc<KvPool>> {
        use std::os::unix::fs::OpenOptionsExt;
        let bytes = Self::size(layout, n_blocks);
        // Readable and writable by this user only: every request's KV is in it.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        let shared = SharedFile {
            path: path.to_owned(),
            owner: true,
        };
        f.set_len(bytes as u64)?;
        // SAFETY: the file is ours (just created); other processes only write blocks the
        // owner reserved for them, which this process does not touch until they are handed back.
        let map = unsafe { MmapMut::map_mut(&f)? };
        Ok(Self::from_map(layout, n_blocks, map, Some(shared), true))
    }

    /// Maps another process's shared pool. The view allocates nothing: its sequences are
    /// [`KvSequence::adopt`]ed over blocks the owner reserved. Fails when the file's size does
    /// not match `layout × n_blocks` (a different model or KV format).
    pub fn attach(
        layout: KvLayout,
        n_blocks: usize,
        path: &std::path::Path,
    ) -> std::io::Result<Arc<KvPool>> {
        let bytes = Self::size(layout, n_blocks);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        let len = f.metadata()?.len();
        if len != bytes as u64 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "shared KV pool {} holds {len} bytes, this layout needs {bytes}",
                    path.display()
                ),
            ));
        }
        // SAFETY: see `new_shared`: this process writes only blocks lent to it.
        let map = unsafe { MmapMut::map_mut(&f)? };
        let shared = SharedFile {
            path: path.to_owned(),
            owner: false,
        };
        Ok(Self::from_map(layout, n_blocks, map, Some(shared), false))
    }

    /// The shared file's path, if this pool lives in one.
    pub fn shared_path(&self) -> Option<&std::path::Path> {
        self.shared.as_ref().map(|s| s.path.as_path())
    }

    fn size(layout: KvLayout, n_blocks: usize) -> usize {
        assert!(n_blocks > 0 && n_blocks < u32::MAX as usize);
        n_blocks
            .checked_mul(layout.block_bytes())
            .expect("KV pool size overflows")
    }

    fn from_map(
        layout: KvLayout,
        n_blocks: usize,
        mut map: MmapMut,
        shared: Option<SharedFile>,
        allocates: bool,
    ) -> Arc<KvPool> {
        let data = NonNull::new(map.as_mut_ptr()).expect("mmap returns a non-null pointer");
        Arc::new(KvPool {
            layout,
            n_blocks,
            data,
            _map: map,
            shared,
            allocator: Mutex::new(if allocates {
                BlockAllocator::new(n_blocks)
            } else {
                BlockAllocator::foreign(n_blocks)
            }),
            hash_salt: Default::default(),
            spill: Default::default(),
            watch: Default::default(),
            id: {
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            },
        })
    }

    /// Salts this pool's block hashes for the model and KV format whose blocks it holds, before
    /// any is published: blocks that leave the pool (the store, routing) are then named the
    /// same in every process serving that model.
    pub fn set_hash_salt(&self, salt: u64) {
        self.hash_salt
            .store(salt, std::sync::atomic::Ordering::Relaxed);
    }
    /// The first link of this pool's block hash chains.
    pub fn hash_salt(&self) -> u64 {
        self.hash_salt.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn layout(&self) -> KvLayout {
        self.layout
    }
    pub fn n_blocks(&self) -> usize {
        self.n_blocks
    }
    /// This pool's identity for the life of the process (never reused, unlike its address).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Each block's generation: changed whenever the block's bytes may have been written by
    /// anything but this process's forward passes (allocated anew, adopted, written through
    /// [`KvSequence::slab_mut_ptr`]). What a device copy of the pool checks its blocks by.
    pub fn generations(&self, blocks: &[BlockId]) -> Vec<u64> {
        self.allocator().generations(blocks)
    }

    pub(crate) fn bump_generation(&self, blocks: &[BlockId]) {
        self.allocator().bump_generation(blocks)
    }

    /// Block `b`'s bytes, every layer (the pool is block-major, so one range): what a device
    /// copy of the pool uploads.
    ///
    /// # Safety
    /// The caller must hold the block, with no writer alive for the borrow's lifetime.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA backend's
    pub(crate) unsafe fn block_raw(&self, b: BlockId) -> &[u8] {
        let off = self.plane_offset(b, 0, false);
        // SAFETY: the block lies in the mapping; exclusivity per the caller.
        unsafe {
            std::slice::from_raw_parts(self.data.as_ptr().add(off), self.layout.block_bytes())
        }
    }

    fn allocator(&self) -> std::sync::MutexGuard<'_, BlockAllocator> {
        self.allocator.lock().expect("kv allocator poisoned")
    }

    /// Blocks a new allocation can get: free ones plus cached ones nobody holds.
    pub fn free_blocks(&self) -> usize {
        self.allocator().available()
    }

    /// Cached blocks nobody holds (part of [`free_blocks`](Self::free_blocks)).
    pub fn cached_blocks(&self) -> usize {
        self.allocator().cached_unheld()
    }

    fn allocate(&self, n: usize) -> Result<Vec<BlockId>> {
        let spill = self.spill.get().filter(|s| s.when == SpillWhen::Evicted);
        let watch = self.watch.get();
        if spill.is_none() && watch.is_none() {
            return self.allocator().allocate(n);
        }
        let mut evicted = Vec::new();
        let mut a = self.allocator();
        let got = a.allocate_evicting(n, &mut evicted)?;
        // The evicted blocks are the caller's now, unwritten until this returns.
        for (h, b) in evicted {
            if let Some(s) = spill {
                (s.to)(h, self.block_bytes_of(b));
            }
            if let Some(w) = watch {
                w(BlockChange::Removed(h));
            }
        }
        drop(a);
        Ok(got)
    }

    fn release(&self, blocks: &[BlockId]) {
        let Some(spill) = self.spill.get().filter(|s| s.when == SpillWhen::Released) else {
            return self.allocator().release(blocks);
        };
        let mut unheld = Vec::new();
        let mut a = self.allocator();
        a.release_caching(blocks, &mut unheld);
        // Under the lock: an unheld block may be evicted and rewritten as soon as it is let go.
        for (h, b) in unheld {
            if a.first_spill(b) {
                (spill.to)(h, self.block_bytes_of(b));
            }
        }
    }

    /// A block's bytes over every layer, `(layer, K then V)` slabs in order: the pooled
    /// store's object layout. Sound only while no one writes the block (the caller's contract).
    fn block_bytes_of(&self, b: BlockId) -> &[u8] {
        let r = self.slab_range(b, 0);
        // SAFETY: a block's slabs are contiguous (`plane_offset`), in bounds of the mapping.
        unsafe {
            std::slice::from_raw_parts(self.data.as_ptr().add(r.start), self.layout.block_bytes())
        }
    }

    /// Hands every cached block's bytes to `to` when the pool is about to lose them — evicted
    /// for reuse ([`SpillWhen::Evicted`]), or already when its last holder lets go
    /// ([`SpillWhen::Released`], once per caching) — with its hash: how blocks reach the
    /// pooled KV store. `to` runs under the pool's lock and must only copy (no pool calls).
    /// Set once; later calls are ignored.
    pub fn spill_to(&self, when: SpillWhen, to: SpillFn) {
        let _ = self.spill.set(Spill { when, to });
    }

    fn lookup(&self, hashes: &[BlockHash]) -> Vec<BlockId> {
        self.allocator().lookup(hashes)
    }

    fn register(&self, b: BlockId, h: BlockHash) {
        let mut a = self.allocator();
        if a.register(b, h)
            && let Some(w) = self.watch.get()
        {
            w(BlockChange::Stored(h));
        }
    }

    /// Hands every change to the prefix cache's contents to `to`, in order: a block cached
    /// under a hash, or evicted. `to` runs under the pool's lock and must not call the pool.
    /// Set once; later calls are ignored. With [`cached_hashes`](Self::cached_hashes) taken
    /// after it is set, a watcher knows the cache's contents at all times.
    pub fn watch_blocks(&self, to: WatchFn) {
        let _ = self.watch.set(to);
    }

    /// The hashes of every block in the prefix cache now.
    pub fn cached_hashes(&self) -> Vec<BlockHash> {
        self.allocator().cached_hashes()
    }

    /// The allocator's view of [`KvSequence`]'s own bookkeeping of shared blocks (checked in
    /// debug builds).
    fn exclusive(&self, b: BlockId) -> bool {
        self.allocator().exclusive(b)
    }

    /// Byte range of the `(block, layer)` slab — its K plane then its V plane — in the mapping.
    fn slab_range(&self, block: BlockId, layer: usize) -> std::ops::Range<usize> {
        let off = self.plane_offset(block, layer, false);
        off..off + 2 * self.layout.plane_bytes()
    }

    /// Byte offset of a plane in the mapping.
    fn plane_offset(&self, block: BlockId, layer: usize, v: bool) -> usize {
        assert!((block.0 as usize) < self.n_blocks && layer < self.layout.n_layers);
        ((block.0 as usize * self.layout.n_layers + layer) * 2 + v as usize)
            * self.layout.plane_bytes()
    }

    /// # Safety
    /// The caller must hold the block (through its owning sequence) for the borrow's lifetime,
    /// with no writer alive.
    unsafe fn plane(&self, block: BlockId, layer: usize, v: bool) -> KvSlice<'_> {
        let (off, n, l) = (
            self.plane_offset(block, layer, v),
            self.layout.plane(),
            self.layout,
        );
        // SAFETY: in bounds by construction (the mapping holds n_blocks whole blocks; plane
        // sizes are multiples of 4 bytes and the mapping is page-aligned, so every plane and
        // its scales are aligned for their types); exclusivity per the caller.
        unsafe {
            let p = self.data.as_ptr().add(off);
            match l.dtype {
                KvDtype::F32 => KvSlice::F32(std::slice::from_raw_parts(p.cast::<f32>(), n)),
                KvDtype::F16 => KvSlice::F16(std::slice::from_raw_parts(p.cast::<f16>(), n)),
                KvDtype::Int8 => KvSlice::I8 {
                    q: std::slice::from_raw_parts(p.cast::<i8>(), n),
                    scale: std::slice::from_raw_parts(
                        p.add(n.next_multiple_of(4)).cast::<f32>(),
                        l.block_size * (l.kv_dim / l.head_dim),
                    ),
                },
            }
        }
    }

    /// [`write_position`](Self::write_position) of values already in the pool's format
    /// (`kv_dim` elements of f16 or f32, head by head).
    ///
    /// # Safety
    /// The caller must hold the block exclusively for the duration of the call.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA backend's
    unsafe fn write_position_raw(
        &self,
        block: BlockId,
        layer: usize,
        v: bool,
        pos: usize,
        x: &[u8],
    ) {
        let (off, l) = (self.plane_offset(block, layer, v), self.layout);
        let shape = l.attn_shape();
        let (hd, heads, e) = (l.head_dim, l.kv_dim / l.head_dim, l.dtype.bytes());
        assert!(
            l.dtype != KvDtype::Int8,
            "raw writes carry f16 or f32 values"
        );
        assert!(pos < l.block_size && x.len() == l.kv_dim * e);
        // SAFETY: as `write_position`; every index lies inside the plane.
        unsafe {
            let base = self.data.as_ptr().add(off);
            if v {
                // V is stored by position: the row is contiguous.
                let dst = base.add(shape.v_index(pos, 0, 0) * e);
                std::ptr::copy_nonoverlapping(x.as_ptr(), dst, x.len());
                return;
            }
            // K is stored transposed: one element at a time, as its type.
            for h in 0..heads {
                for d in 0..hd {
                    let (i, j) = (shape.k_index(pos, h, d), h * hd + d);
                    if e == 2 {
                        let bits = u16::from_le_bytes([x[2 * j], x[2 * j + 1]]);
                        *base.cast::<u16>().add(i) = bits;
                    } else {
                        let bits = u32::from_le_bytes([
                            x[4 * j],
                            x[4 * j + 1],
                            x[4 * j + 2],
                            x[4 * j + 3],
                        ]);
                        *base.cast::<u32>().add(i) = bits;
                    }
                }
            }
        }
    }

    /// Writes position `pos`'s K (`v == false`) or V values (`x`, `kv_dim` of them) into a
    /// block's plane in the attention layout (K transposed; see `kernels::attention`),
    /// converting to the pool's dtype.
    ///
    /// # Safety
    /// The caller must hold the block exclusively for the duration of the call.
    unsafe fn write_position(&self, block: BlockId, layer: usize, v: bool, pos: usize, x: &[f32]) {
        let (off, l) = (self.plane_offset(block, layer, v), self.layout);
        let shape = l.attn_shape();
        let (hd, heads) = (l.head_dim, l.kv_dim / l.head_dim);
        assert!(pos < l.block_size && x.len() == l.kv_dim);
        let index = |h: usize, d: usize| {
            if v {
                shape.v_index(pos, h, d)
            } else {
                shape.k_index(pos, h, d)
            }
        };
        // SAFETY: as above; every index lies inside the plane (or its scales).
        unsafe {
            let base = self.data.as_ptr().add(off);
            match l.dtype {
                KvDtype::F32 => {
                    let p = base.cast::<f32>();
                    for h in 0..heads {
                        for d in 0..hd {
                            *p.add(index(h, d)) = x[h * hd + d];
                        }
                    }
                }
                KvDtype::F16 => {
                    let p = base.cast::<f16>();
                    for h in 0..heads {
                        for d in 0..hd {
                            *p.add(index(h, d)) = f16::from_f32(x[h * hd + d]);
                        }
                    }
                }
                KvDtype::Int8 => {
                    let q = base.cast::<i8>();
                    let scales = base.add(l.plane().next_multiple_of(4)).cast::<f32>();
                    for (h, xh) in x.chunks(hd).enumerate() {
                        let amax = xh.iter().fold(0f32, |a, v| a.max(v.abs()));
                        let s = amax / 127.0;
                        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
                        for (d, v) in xh.iter().enumerate() {
                            *q.add(index(h, d)) = (v * inv).round().clamp(-127.0, 127.0) as i8;
                        }
                        let si = if v {
                            shape.v_scale_index(pos, h)
                        } else {
                            shape.k_scale_index(pos, h)
                        };
                        *scales.add(si) = s;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
