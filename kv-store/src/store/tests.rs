use super::*;

const SHAPE: Shape = Shape {
    slab_bytes: 64,
    slabs: 3,
};
const BLOCK: usize = 192;

/// A block's payload: bytes that depend on its hash and position, never all zero.
fn payload(h: BlockHash) -> Vec<u8> {
    (0..BLOCK)
        .map(|i| {
            (h.0.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .rotate_left(i as u32 % 64) as u8)
                | 1
        })
        .collect()
}

fn hashes(from: u64, n: u64) -> Vec<BlockHash> {
    (from..from + n)
        .map(|i| BlockHash(0xabc0_0000 + i))
        .collect()
}

/// Puts `hs` the way a client does: start, the wanted slabs, end with their checksum.
fn put(store: &Store, hs: &[BlockHash]) -> Result<usize, StoreError> {
    let s = store.put_start(hs, SHAPE)?;
    let wanted: Vec<BlockHash> = hs
        .iter()
        .zip(&s.want)
        .filter(|w| *w.1)
        .map(|w| *w.0)
        .collect();
    let mut c = Checksum::new();
    for layer in 0..SHAPE.slabs as usize {
        for (i, h) in wanted.iter().enumerate() {
            let p = payload(*h);
            let slab = &p[layer * 64..][..64];
            store.write(s.id, i, layer, slab).unwrap();
            c.update(slab);
        }
    }
    store.put_end(s.id, None, c.digest())
}

fn limits(ram_blocks: usize, disk: Option<(&std::path::Path, u64)>) -> Limits {
    Limits {
        ram_bytes: ram_blocks * BLOCK,
        disk: disk.map(|(p, blocks)| (p.to_owned(), blocks * BLOCK as u64)),
        ..Limits::default()
    }
}

fn read_all(store: &Store, hs: &[BlockHash]) -> Vec<Tier> {
    let l = store
        .lease(hs, SHAPE, usize::MAX)
        .expect("a prefix is held");
    for (h, _) in &l.blocks {
        assert_eq!(
            &*store.read(l.id, *h).unwrap(),
            &payload(*h)[..],
            "block {h}"
        );
    }
    store.release(l.id);
    l.blocks.iter().map(|b| b.1).collect()
}

#[test]
fn put_then_lease_reads_the_longest_prefix_and_objects_are_immutable() {
    let store = Store::open(limits(16, None)).unwrap();
    let hs = hashes(0, 4);
    assert_eq!(put(&store, &hs[..3]), Ok(3));
    assert_eq!(
        store.lookup(&hs),
        vec![Tier::Ram; 3],
        "the fourth was never put"
    );
    assert_eq!(read_all(&store, &hs), vec![Tier::Ram; 3]);
    // A second put of the same blocks plus one new: only the new one is wanted.
    let s = store.put_start(&hs, SHAPE).unwrap();
    assert_eq!(s.want, vec![false, false, false, true]);
    store.put_abort(s.id, None);
    // A gap stops the prefix: blocks after a missing one are not leased.
    assert_eq!(put(&store, &hashes(10, 1)), Ok(1));
    let mut gap = hashes(0, 4);
    gap.push(BlockHash(0xabc0_0000 + 10));
    assert_eq!(store.lookup(&gap).len(), 3);
    let s = store.stats();
    assert_eq!((s.hits_ram, s.misses, s.stored), (3, 1, 4));
}

#[test]
fn a_wrong_checksum_publishes_nothing() {
    let store = Store::open(limits(16, None)).unwrap();
    let hs = hashes(0, 2);
    let s = store.put_start(&hs, SHAPE).unwrap();
    for (i, h) in hs.iter().enumerate() {
        for layer in 0..3 {
            store
                .write(s.id, i, layer, &payload(*h)[layer * 64..][..64])
                .unwrap();
        }
    }
    assert!(matches!(
        store.put_end(s.id, None, 12345),
        Err(StoreError::Checksum { .. })
    ));
    assert!(store.lookup(&hs).is_empty());
    assert_eq!(
        store.put_end(s.id, None, 12345),
        Err(StoreError::Unknown(s.id)),
        "ended once"
    );
}

#[test]
fn ram_spills_to_disk_and_disk_evicts_least_recently_used() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(limits(2, Some((dir.path(), 3)))).unwrap();
    let hs = hashes(0, 6);
    for h in &hs[..4] {
        put(&store, std::slice::from_ref(h)).unwrap();
    }
    // RAM holds the newest two; the older two were written to disk.
    assert_eq!(store.lookup(&hs[2..4]), vec![Tier::Ram; 2]);
    assert_eq!(store.lookup(&hs[..2]), vec![Tier::Disk; 2]);
    // Reading block 0 from disk brings it back into RAM (evicting block 2 to disk).
    assert_eq!(read_all(&store, &hs[..1]), vec![Tier::Disk]);
    assert_eq!(store.lookup(&hs[..1]), vec![Tier::Ram]);
    assert_eq!(store.lookup(&hs[2..3]), vec![Tier::Disk]);
    // Two more: disk holds three blocks at most, so the least recently used one goes.
    put(&store, &hs[4..6]).unwrap();
    let s = store.stats();
    assert_eq!((s.ram_blocks, s.disk_blocks), (2, 3), "{s:?}");
    assert!(
        store.lookup(&hs[1..2]).is_empty(),
        "block 1 was the least recently used"
    );
    for h in &hs {
        if !store.lookup(std::slice::from_ref(h)).is_empty() {
            read_all(&store, std::slice::from_ref(h));
        }
    }
}

#[test]
fn leased_blocks_are_never_evicted_and_a_full_store_drops_instead_of_failing() {
    let store = Store::open(limits(2, None)).unwrap();
    let hs = hashes(0, 4);
    put(&store, &hs[..2]).unwrap();
    let l = store.lease(&hs, SHAPE, usize::MAX).unwrap();
    assert_eq!(l.blocks.len(), 2);
    // RAM is full of leased blocks: the new ones are dropped, the put still succeeds.
    assert_eq!(put(&store, &hs[2..4]), Ok(0));
    for (h, _) in &l.blocks {
        assert_eq!(&*store.read(l.id, *h).unwrap(), &payload(*h)[..]);
    }
    store.release(l.id);
    assert_eq!(put(&store, &hs[2..4]), Ok(2), "released blocks make room");
    assert!(store.lookup(&hs[..1]).is_empty());
    assert!(matches!(
        store.read(l.id, hs[0]),
        Err(StoreError::Unknown(_))
    ));
}

#[test]
fn leases_lapse_and_abandoned_puts_expire_but_not_under_a_writer() {
    let store = Store::open(Limits {
        lease_ttl: Duration::from_millis(50),
        put_ttl: Duration::from_millis(50),
        staging_bytes: 2 * BLOCK,
        ..limits(1, None)
    })
    .unwrap();
    let hs = hashes(0, 2);
    put(&store, &hs[..1]).unwrap();
    let l = store.lease(&hs, SHAPE, 1).unwrap();
    let abandoned = store.put_start(&hs[1..2], SHAPE).unwrap();
    let written = store.put_start(&hs[1..2], SHAPE).unwrap();
    assert!(
        store.slot(written.id, 7, 0, 0, 64).is_some(),
        "connection 7 writes it"
    );
    assert!(
        store.slot(written.id, 8, 0, 1, 64).is_none(),
        "and no other connection"
    );
    assert!(matches!(
        store.put_start(&hashes(5, 1), SHAPE),
        Err(StoreError::Full(_))
    ));
    std::thread::sleep(Duration::from_millis(80));
    let s = store.stats();
    assert_eq!(
        (s.leases, s.puts_open),
        (0, 1),
        "the lease lapsed, the idle put expired"
    );
    assert!(matches!(
        store.read(l.id, hs[0]),
        Err(StoreError::Unknown(_))
    ));
    assert_eq!(
        store.put_end(abandoned.id, None, 0),
        Err(StoreError::Unknown(abandoned.id))
    );
    assert_eq!(
        store.put_end(written.id, Some(8), 0),
        Err(StoreError::Unknown(written.id))
    );
    store.put_abort(written.id, Some(7));
    assert_eq!(store.stats().puts_open, 0);
}

#[test]
fn restart_keeps_the_disk_tier_and_a_damaged_file_is_a_miss() {
    let dir = tempfile::tempdir().unwrap();
    let hs = hashes(0, 3);
    {
        let store = Store::open(limits(1, Some((dir.path(), 8)))).unwrap();
        put(&store, &hs).unwrap();
    }
    // The block that was in RAM is gone with the process; the spilled two are found again.
    let store = Store::open(limits(1, Some((dir.path(), 8)))).unwrap();
    assert_eq!(store.lookup(&hs), vec![Tier::Disk; 2]);
    assert_eq!(read_all(&store, &hs[..1]), vec![Tier::Disk]);

    // Damage block 1's file: its read fails with Corrupt, and the block is forgotten.
    let path = disk::Dir::open(dir.path()).unwrap().path(hs[1]);
    let mut bytes = std::fs::read(&path).unwrap();
    *bytes.last_mut().unwrap() ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    let l = store.lease(&hs, SHAPE, usize::MAX).unwrap();
    assert_eq!(l.blocks.len(), 2);
    assert_eq!(store.read(l.id, hs[1]), Err(StoreError::Corrupt(hs[1])));
    store.release(l.id);
    assert_eq!(store.lookup(&hs).len(), 1);
    assert!(!path.exists());
    assert_eq!(store.stats().corrupt, 1);
}

#[test]
fn random_operations_keep_the_accounting_true() {
    // A small random walk of puts, leases, reads and releases; every read returns the bytes
    // that were put, and the byte counts always match the blocks held.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(limits(5, Some((dir.path(), 7)))).unwrap();
    // A watcher replaying the changes always knows what the store holds, tier and all.
    let seen: Arc<Mutex<HashMap<BlockHash, Tier>>> = Arc::default();
    let w = seen.clone();
    store.watch(Box::new(move |h, t| {
        let mut m = w.lock().unwrap();
        match t {
            Some(t) => m.insert(h, t),
            None => m.remove(&h),
        };
    }));
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut held: Vec<Lease> = Vec::new();
    for _ in 0..400 {
        let start = next() % 20;
        let hs = hashes(start, 1 + next() % 4);
        match next() % 4 {
            0 | 1 => {
                let _ = put(&store, &hs);
            }
            2 => {
                if let Some(l) = store.lease(&hs, SHAPE, usize::MAX) {
                    for (h, _) in &l.blocks {
                        match store.read(l.id, *h) {
                            Ok(p) => assert_eq!(&*p, &payload(*h)[..]),
                            Err(e) => panic!("{e}"),
                        }
                    }
                    held.push(l);
                }
            }
            _ => {
                if !held.is_empty() {
                    let l = held.swap_remove(next() as usize % held.len());
                    store.release(l.id);
                }
            }
        }
        let s = store.stats();
        let held: HashMap<BlockHash, Tier> = store.held().into_iter().collect();
        assert_eq!(*seen.lock().unwrap(), held);
        assert_eq!(s.ram_bytes, s.ram_blocks * BLOCK as u64);
        assert_eq!(s.disk_bytes, s.disk_blocks * BLOCK as u64);
    }
    for l in held {
        store.release(l.id);
    }
    let files = disk::Dir::open(dir.path()).unwrap().scan().unwrap().len() as u64;
    assert_eq!(files, store.stats().disk_blocks);
}

/// A decode worker's shared pool file of `n` blocks of [`SHAPE`] in this host's shared-memory
/// folder, with its fence (both removed when dropped).
struct SharedPool {
    path: std::path::PathBuf,
    fence: Option<crate::shm::fence::Fence>,
}

impl SharedPool {
    fn new(n: u32) -> SharedPool {
        let path = crate::shm::pool_path(&crate::shm::dir());
        std::fs::write(&path, vec![0u8; n as usize * BLOCK]).unwrap();
        let fence = crate::shm::fence::Fence::create(&path, n).unwrap();
        SharedPool {
            path,
            fence: Some(fence),
        }
    }
    fn block(&self, b: u32) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()[b as usize * BLOCK..][..BLOCK].to_vec()
    }
}

impl Drop for SharedPool {
    fn drop(&mut self) {
        drop(self.fence.take());
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The store copies the held prefix into the lent blocks (any order of pool blocks) with each
/// block's CRC — from RAM and from disk alike; blocks past the prefix stay untouched.
#[test]
fn a_fetch_into_a_shared_pool_copies_the_held_prefix_in_place() {
    use super::pool::{PoolTarget, Pools, fetch_into};
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(limits(2, Some((dir.path(), 8)))).unwrap();
    let hs = hashes(0, 5);
    assert_eq!(put(&store, &hs[..4]).unwrap(), 4); // two in RAM, two spilled to disk
    let pool = SharedPool::new(12);
    let tag = crate::shm::fence::lease_tag(&[6; 16]);
    let blocks = vec![9, 8, 7, 2, 3];
    pool.fence.as_ref().unwrap().grant(&blocks, tag).unwrap();
    let pools = Pools::default();
    let to = PoolTarget {
        path: pool.path.clone(),
        blocks: blocks.clone(),
        tag,
    };
    let got = fetch_into(&store, &pools, &hs, SHAPE, &to).unwrap();
    assert_eq!(got.tiers.len(), 4, "the held prefix");
    assert!(got.tiers.contains(&Tier::Disk) && got.tiers.contains(&Tier::Ram));
    for ((h, &b), crc) in hs[..4].iter().zip(&blocks).zip(&got.crcs) {
        assert_eq!(pool.block(b), payload(*h), "block {b}");
        assert_eq!(
            *crc,
            crc32fast::hash(&payload(*h)),
            "block {b}'s CRC as put"
        );
    }
    assert_eq!(pool.block(3), vec![0; BLOCK], "past the prefix: untouched");
    assert_eq!(store.stats().leases, 0, "the lease ended with the copy");
    // Again through the kept mapping; nothing held is no copy and no error.
    assert_eq!(fetch_into(&store, &pools, &hs, SHAPE, &to).unwrap(), got);
    let none = fetch_into(
        &store,
        &pools,
        &hashes(50, 2),
        SHAPE,
        &PoolTarget {
            blocks: vec![0, 1],
            ..to.clone()
        },
    )
    .unwrap();
    assert!(none.tiers.is_empty());
    // The worker goes (its pool file with it): the next get, into another pool, unmaps it.
    assert_eq!(pools.mapped(), 1);
    drop(pool);
    let other = SharedPool::new(4);
    other.fence.as_ref().unwrap().grant(&[0], tag).unwrap();
    let to = PoolTarget {
        path: other.path.clone(),
        blocks: vec![0],
        tag,
    };
    assert_eq!(
        fetch_into(&store, &pools, &hs[..1], SHAPE, &to)
            .unwrap()
            .tiers
            .len(),
        1
    );
    assert_eq!(pools.mapped(), 1, "the gone pool's mapping was dropped");
}

/// What the store refuses to write: blocks not lent under the tag (or taken back), blocks past
/// the pool, a file that is not a pool in the shared-memory folder, a pool of another block
/// size, target lists of another length.
#[test]
fn a_fetch_into_a_pool_writes_only_lent_blocks_of_a_real_pool() {
    use super::pool::{PoolError, PoolTarget, Pools, fetch_into};
    use crate::shm::fence::HoldError;
    let store = Store::open(limits(8, None)).unwrap();
    let hs = hashes(0, 3);
    put(&store, &hs).unwrap();
    let pool = SharedPool::new(6);
    let fence = pool.fence.as_ref().unwrap();
    let (tag, other) = (
        crate::shm::fence::lease_tag(&[1; 16]),
        crate::shm::fence::lease_tag(&[2; 16]),
    );
    fence.grant(&[0, 1], tag).unwrap();
    fence.grant(&[2], other).unwrap();
    let pools = Pools::default();
    let to = |blocks: Vec<u32>| PoolTarget {
        path: pool.path.clone(),
        blocks,
        tag,
    };
    let err = |t: &PoolTarget, hs: &[BlockHash], shape| {
        fetch_into(&store, &pools, hs, shape, t).unwrap_err()
    };
    assert!(matches!(
        err(&to(vec![0, 1, 2]), &hs, SHAPE),
        PoolError::Fence(HoldError::Revoked(2))
    ));
    assert!(matches!(
        err(&to(vec![0, 1, 6]), &hs, SHAPE),
        PoolError::Invalid(_)
    ));
    assert!(matches!(
        err(&to(vec![0, 1]), &hs, SHAPE),
        PoolError::Invalid(_)
    ));
    let other_shape = Shape {
        slab_bytes: 100,
        slabs: 3,
    };
    assert!(matches!(
        err(&to(vec![0]), &hs[..1], other_shape),
        PoolError::Invalid(_)
    ));
    let elsewhere = tempfile::tempdir().unwrap();
    let outside = elsewhere.path().join(pool.path.file_name().unwrap());
    std::fs::copy(&pool.path, &outside).unwrap();
    let not_a_pool = crate::shm::dir().join(format!("tandem-test-{}.bin", std::process::id()));
    std::fs::write(&not_a_pool, vec![0u8; 6 * BLOCK]).unwrap();
    for path in [outside, not_a_pool.clone()] {
        let t = PoolTarget {
            path,
            ..to(vec![0])
        };
        assert!(matches!(
            err(&t, &hs[..1], SHAPE),
            PoolError::Unreachable(..)
        ));
    }
    let _ = std::fs::remove_file(&not_a_pool);
    assert_eq!(
        pool.block(0),
        vec![0; BLOCK],
        "nothing was written by a refused fetch"
    );
    assert!(fence.revoke(&[0, 1]).unwrap());
    assert!(matches!(
        err(&to(vec![0, 1]), &hs[..2], SHAPE),
        PoolError::Fence(HoldError::Revoked(0))
    ));
    assert_eq!(store.stats().leases, 0, "refused fetches hold no lease");
}
