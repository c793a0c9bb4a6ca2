use super::*;
use crate::error::EngineError;
use crate::tokenizer::TokenId;
use proptest::prelude::*;

fn layout() -> KvLayout {
    KvLayout {
        n_layers: 2,
        kv_dim: 4,
        head_dim: 2,
        block_size: 4,
        dtype: KvDtype::F32,
    }
}

#[test]
fn write_read_and_free() {
    let pool = KvPool::new(layout(), 3);
    let mut s = KvSequence::new(pool.clone());
    s.reserve(5).unwrap();
    assert_eq!(pool.free_blocks(), 1);
    s.write(1, 4, &[1.0, 2.0, 3.0, 4.0], &[5.0, 6.0, 7.0, 8.0]);
    s.advance(5);
    let planes = s.layer_blocks(1);
    let KvSlice::F32(k) = planes[1].0 else {
        panic!("f32 pool")
    };
    let KvSlice::F32(v) = planes[1].1 else {
        panic!("f32 pool")
    };
    // Position 0 of block 1; K is stored transposed ([head][dim][position]).
    let sh = layout().attn_shape();
    let at = |h, d| k[sh.k_index(0, h, d)];
    assert_eq!(
        [at(0, 0), at(0, 1), at(1, 0), at(1, 1)],
        [1.0, 2.0, 3.0, 4.0]
    );
    assert_eq!(&v[..4], &[5.0, 6.0, 7.0, 8.0]);
    let mut t = KvSequence::new(pool.clone());
    assert!(matches!(
        t.reserve(9),
        Err(EngineError::KvExhausted { needed: 3, free: 1 })
    ));
    assert_eq!(pool.free_blocks(), 1, "a failed reserve takes nothing");
    drop(s);
    assert_eq!(pool.free_blocks(), 3);
    t.reserve(9).unwrap();
    assert_eq!(pool.free_blocks(), 0);
}

/// A block shared through the prefix cache cannot be overwritten through one of its
/// holders (it would change every sequence reading it): `write_slab` and `slab_mut_ptr`
/// refuse it, and the block keeps its bytes; a block held alone is written.
#[test]
fn slab_writes_refuse_shared_blocks() {
    let pool = KvPool::new(layout(), 4);
    let tokens: Vec<TokenId> = (1..=9).collect();
    let mut a = KvSequence::new(pool.clone());
    a.reserve(9).unwrap();
    let slab = a.slab_bytes();
    a.write_slab(0, 1, &vec![7u8; slab]).unwrap();
    a.advance(9);
    a.publish_prefix(&tokens);
    // Published: even its only holder may not overwrite it.
    assert!(matches!(
        a.write_slab(0, 1, &vec![1u8; slab]),
        Err(EngineError::BadBlocks(_))
    ));
    let mut b = KvSequence::new(pool.clone());
    assert_eq!(b.attach_prefix(&tokens), 8, "two full blocks of 4 found");
    assert!(b.write_slab(0, 1, &vec![1u8; slab]).is_err());
    assert!(b.slab_mut_ptr(0, 0).is_err());
    assert_eq!(
        a.slab(0, 1),
        &vec![7u8; slab][..],
        "the shared block kept its bytes"
    );
    // The partial third block is unpublished: a's alone.
    a.write_slab(2, 0, &vec![3u8; slab]).unwrap();
    assert_eq!(a.slab(2, 0), &vec![3u8; slab][..]);
    assert!(a.write_slab(2, 2, &vec![3u8; slab]).is_err(), "no layer 2");
    assert!(a.write_slab(2, 0, &[3u8; 3]).is_err(), "wrong slab size");
    assert!(
        a.write_slab(3, 0, &vec![3u8; slab]).is_err(),
        "no fourth block"
    );
}

/// Cached blocks reach the spill hook with their hash and every layer's bytes: on eviction,
/// or (write-through) once when their last holder lets go.
#[test]
fn cached_blocks_spill_their_bytes() {
    for when in [SpillWhen::Evicted, SpillWhen::Released] {
        let pool = KvPool::new(layout(), 2);
        type Spilled = Vec<(BlockHash, Vec<u8>)>;
        let got: Arc<Mutex<Spilled>> = Arc::default();
        let g = got.clone();
        pool.spill_to(
            when,
            Box::new(move |h, b| g.lock().unwrap().push((h, b.to_vec()))),
        );
        let tokens: Vec<TokenId> = (1..=8).collect();
        let mut a = KvSequence::new(pool.clone());
        a.reserve(8).unwrap();
        let slab = |layer: usize, blk: usize| -> Vec<u8> {
            (0..a_slab_bytes())
                .map(|i| (i * 3 + layer * 7 + blk * 11) as u8 | 1)
                .collect()
        };
        for blk in 0..2 {
            for layer in 0..2 {
                a.write_slab(blk, layer, &slab(layer, blk)).unwrap();
            }
        }
        a.set_filled(8);
        a.publish_prefix(&tokens);
        drop(a);
        let want = block_hashes(pool.hash_salt(), &tokens, 4);
        if when == SpillWhen::Evicted {
            assert!(got.lock().unwrap().is_empty(), "nothing evicted yet");
            let mut b = KvSequence::new(pool.clone());
            b.reserve(4).unwrap(); // evicts the oldest released block: block 0
        }
        let got = got.lock().unwrap();
        let n = if when == SpillWhen::Evicted { 1 } else { 2 };
        assert_eq!(got.len(), n, "{when:?}");
        for (i, (h, bytes)) in got.iter().enumerate() {
            assert_eq!(*h, want[i]);
            assert_eq!(
                *bytes,
                [slab(0, i), slab(1, i)].concat(),
                "{when:?} block {i}"
            );
        }
    }
}

/// A watcher hears every block cached and evicted, in order; with a snapshot taken after
/// it started watching, it knows the cache's contents.
#[test]
fn block_changes_are_heard_in_order() {
    let pool = KvPool::new(layout(), 2);
    let heard: Arc<Mutex<Vec<BlockChange>>> = Arc::default();
    let h = heard.clone();
    pool.watch_blocks(Box::new(move |c| h.lock().unwrap().push(c)));
    let tokens: Vec<TokenId> = (1..=8).collect();
    let mut a = KvSequence::new(pool.clone());
    a.reserve(8).unwrap();
    a.set_filled(8);
    a.publish_prefix(&tokens);
    a.publish_prefix(&tokens); // again: nothing new
    drop(a);
    let want = block_hashes(pool.hash_salt(), &tokens, 4);
    let mut snapshot = pool.cached_hashes();
    snapshot.sort();
    let mut sorted = want.clone();
    sorted.sort();
    assert_eq!(snapshot, sorted);
    let mut b = KvSequence::new(pool.clone());
    b.reserve(4).unwrap();
    assert_eq!(
        *heard.lock().unwrap(),
        [
            BlockChange::Stored(want[0]),
            BlockChange::Stored(want[1]),
            BlockChange::Removed(want[0])
        ]
    );
    assert_eq!(pool.cached_hashes(), [want[1]]);
}

fn a_slab_bytes() -> usize {
    2 * layout().plane_bytes()
}

#[test]
fn a_shared_pool_file_is_private_to_its_user() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("pool");
    let _pool = KvPool::new_shared(layout(), 2, &path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
}

proptest! {
    #[test]
    fn blocks_are_never_shared_and_always_returned(ops in proptest::collection::vec((0usize..4, 0usize..40), 1..60)) {
        let pool = KvPool::new(layout(), 16);
        let mut seqs: Vec<KvSequence> = (0..4).map(|_| KvSequence::new(pool.clone())).collect();
        for (i, len) in ops {
            if len == 0 {
                seqs[i] = KvSequence::new(pool.clone());
            } else {
                let before = seqs[i].block_table().len();
                match seqs[i].reserve(len) {
                    Ok(()) => prop_assert!(seqs[i].block_table().len() * 4 >= len),
                    Err(_) => prop_assert_eq!(seqs[i].block_table().len(), before),
                }
            }
            let mut all: Vec<BlockId> = seqs.iter().flat_map(|s| s.block_table().to_vec()).collect();
            let n = all.len();
            all.sort();
            all.dedup();
            prop_assert_eq!(all.len(), n, "a block is owned twice");
            prop_assert_eq!(n + pool.free_blocks(), 16);
        }
        drop(seqs);
        prop_assert_eq!(pool.free_blocks(), 16);
    }
}

/// A device's copy-back (values already in the pool's format) lands exactly where the
/// converting write puts them, for f16 and f32.
#[test]
fn raw_writes_equal_converting_writes() {
    for dtype in [KvDtype::F16, KvDtype::F32] {
        let l = KvLayout { dtype, ..layout() };
        let (a, b) = (KvPool::new(l, 2), KvPool::new(l, 2));
        let (mut sa, mut sb) = (KvSequence::new(a), KvSequence::new(b));
        sa.reserve(6).unwrap();
        sb.reserve(6).unwrap();
        for pos in 0..6 {
            let k: Vec<f32> = (0..4).map(|i| (pos * 4 + i) as f32 * 0.37 - 1.1).collect();
            let v: Vec<f32> = k.iter().map(|x| x * -2.3 + 0.01).collect();
            sa.write(1, pos, &k, &v);
            let bytes = |x: &[f32]| -> Vec<u8> {
                match dtype {
                    KvDtype::F16 => x
                        .iter()
                        .flat_map(|x| f16::from_f32(*x).to_le_bytes())
                        .collect(),
                    _ => x.iter().flat_map(|x| x.to_le_bytes()).collect(),
                }
            };
            sb.write_raw(1, pos, &bytes(&k), &bytes(&v));
        }
        for i in 0..2 {
            assert_eq!(sa.slab(i, 1), sb.slab(i, 1), "{dtype}: block {i}");
        }
    }
}

/// A block's generation moves whenever its bytes may come from outside this process's forward
/// passes: handed out anew, adopted, or lent to a writer.
#[test]
fn generations_move_when_bytes_may_change_outside_forwards() {
    let pool = KvPool::new(layout(), 2);
    let mut s = KvSequence::new(pool.clone());
    s.reserve(4).unwrap();
    let b = s.block_table()[0];
    let g0 = pool.generations(&[b])[0];
    s.write(0, 0, &[1.0; 4], &[2.0; 4]);
    assert_eq!(pool.generations(&[b])[0], g0, "a forward's own write");
    s.slab_mut_ptr(0, 0).unwrap();
    let g1 = pool.generations(&[b])[0];
    assert!(g1 > g0, "lent to a writer");
    drop(s);
    let mut t = KvSequence::new(pool.clone());
    t.reserve(8).unwrap();
    assert!(pool.generations(&[b])[0] > g1, "handed out anew");
}
