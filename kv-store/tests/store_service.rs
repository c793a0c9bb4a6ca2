//! The store as a service, through its client: puts over the data plane, lookups, fetches
//! written in place, the cluster secret, and a store that goes away.

use frontend::block::BlockHash;
use kv_store::store::client::StoreClient;
use kv_store::store::{BlockShape, Limits, Store, Tier};
use kv_store::tcp::{ConnId, SlabSink, Slot};
use protocol::LeaseId;
use protocol::auth::ClusterSecret;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SHAPE: BlockShape = BlockShape {
    slab_bytes: 4096,
    slabs: 5,
};

fn payload(h: BlockHash) -> Arc<[u8]> {
    (0..SHAPE.bytes())
        .map(|i| ((h.0 as usize * 31 + i * 7) % 251) as u8 + 1)
        .collect::<Vec<u8>>()
        .into()
}

/// Fetched blocks land here: `n` blocks of the shape, laid out as the store's objects.
struct Blocks {
    mem: Mutex<Vec<Vec<u8>>>,
    ends: Mutex<Vec<(u32, u64)>>,
}

impl Blocks {
    fn new(n: usize) -> Arc<Blocks> {
        Arc::new(Blocks {
            mem: Mutex::new(vec![vec![0u8; SHAPE.bytes()]; n]),
            ends: Mutex::default(),
        })
    }
}

// SAFETY: each slot lies inside one of the boxed buffers, which are never resized or freed
// while the test's fetch runs.
unsafe impl SlabSink for Blocks {
    fn slots(
        &self,
        _: ConnId,
        _: LeaseId,
        layer: u32,
        blocks: &[u32],
        len: usize,
        out: &mut Vec<Option<Slot>>,
    ) {
        let mut m = self.mem.lock().unwrap();
        for &b in blocks {
            out.push(
                m.get_mut(b as usize)
                    .filter(|_| len == SHAPE.slab_bytes as usize)
                    .map(|buf| Slot {
                        ptr: buf[layer as usize * len..].as_mut_ptr(),
                        len,
                    }),
            );
        }
    }
    fn end(&self, _: ConnId, _: LeaseId, slabs: u32, checksum: u64) {
        self.ends.lock().unwrap().push((slabs, checksum));
    }
    fn abort(&self, _: ConnId, _: LeaseId) {}
}

struct Running {
    addr: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start(secret: Option<ClusterSecret>, limits: Limits) -> Running {
    let store = Arc::new(Store::open(limits.clone()).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(kv_store::store::service::serve(
        store,
        limits,
        listener,
        "127.0.0.1:0",
        "127.0.0.1",
        secret,
        async move {
            let _ = rx.await;
        },
    ));
    Running {
        addr,
        stop: Some(tx),
        task,
    }
}

fn hashes(n: u64) -> Vec<BlockHash> {
    (1..=n).map(|i| BlockHash(0x5eed_0000 + i)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_lookup_and_fetch_over_the_data_plane() {
    let secret = ClusterSecret::from_bytes(b"0123456789abcdef0123456789abcdef").unwrap();
    let s = start(Some(secret.clone()), Limits::default()).await;
    let client = StoreClient::new(&s.addr, Some(secret.clone())).unwrap();
    let hs = hashes(4);
    let sent = client
        .put(
            &hs[..3],
            SHAPE,
            hs[..3].iter().map(|&h| payload(h)).collect(),
        )
        .await
        .unwrap();
    assert_eq!(sent, 3);
    // The end frame is processed on the store's connection thread: wait until it published.
    let mut tiers = Vec::new();
    for _ in 0..100 {
        tiers = client.lookup(&hs).await.unwrap();
        if tiers.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(tiers, vec![Tier::Ram; 3]);
    // A second put of the same blocks sends nothing.
    assert_eq!(
        client
            .put(
                &hs[..2],
                SHAPE,
                hs[..2].iter().map(|&h| payload(h)).collect()
            )
            .await
            .unwrap(),
        0
    );

    let into = Blocks::new(4);
    let (tiers, crcs) = client.fetch(&hs, SHAPE, into.clone()).await.unwrap();
    assert_eq!(tiers, vec![Tier::Ram; 3]);
    {
        let mem = into.mem.lock().unwrap();
        for (i, crc) in crcs.iter().enumerate() {
            assert_eq!(
                *crc,
                crc32fast::hash(&mem[i]),
                "block {i}: the store's CRC is of what landed"
            );
        }
        for (i, h) in hs[..3].iter().enumerate() {
            assert_eq!(&mem[i][..], &payload(*h)[..], "block {i}");
        }
        assert!(
            mem[3].iter().all(|&b| b == 0),
            "nothing past the held prefix"
        );
    }

    // A get the store refuses (a shape of no bytes) ends at once, and the connection serves on.
    let t = std::time::Instant::now();
    let none = BlockShape {
        slab_bytes: 0,
        slabs: 5,
    };
    assert!(client.fetch(&hs, none, into.clone()).await.is_err());
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(
        client
            .fetch(&hs, SHAPE, into.clone())
            .await
            .unwrap()
            .0
            .len(),
        3
    );

    // Without the secret neither plane answers.
    let stranger = StoreClient::new(&s.addr, None).unwrap();
    assert!(stranger.lookup(&hs).await.is_err());

    let st = client.stats().await.unwrap();
    assert_eq!(
        (st.ram_blocks, st.hits_ram, st.leases),
        (3, 6, 0),
        "both fetches ended their leases"
    );
    stop(s).await;
}

/// On the store's host the client has the store copy straight into its shared pool; a pool
/// the store cannot map turns the client to the data plane for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_into_a_shared_pool_through_the_service() {
    use kv_store::shm::fence::{Fence, lease_tag};
    use kv_store::store::pool::PoolTarget;
    let s = start(None, Limits::default()).await;
    let client = StoreClient::new(&s.addr, None).unwrap();
    let hs = hashes(3);
    client
        .put(
            &hs[..2],
            SHAPE,
            hs[..2].iter().map(|&h| payload(h)).collect(),
        )
        .await
        .unwrap();
    for _ in 0..100 {
        if client.lookup(&hs).await.unwrap().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let path = kv_store::shm::pool_path(&kv_store::shm::dir());
    std::fs::write(&path, vec![0u8; 4 * SHAPE.bytes()]).unwrap();
    let fence = Fence::create(&path, 4).unwrap();
    let to = PoolTarget {
        path: path.clone(),
        blocks: vec![3, 1, 0],
        tag: lease_tag(&[9; 16]),
    };
    fence.grant(&to.blocks, to.tag).unwrap();
    let (tiers, crcs) = client.fetch_into(&hs, SHAPE, &to).await.unwrap();
    assert!(fence.revoke(&to.blocks).unwrap(), "the store let go");
    assert_eq!(tiers, vec![Tier::Ram; 2]);
    let file = std::fs::read(&path).unwrap();
    let block = |b: usize| &file[b * SHAPE.bytes()..][..SHAPE.bytes()];
    for ((h, b), crc) in hs[..2].iter().zip([3, 1]).zip(crcs) {
        assert_eq!(block(b), &payload(*h)[..]);
        assert_eq!(crc, crc32fast::hash(block(b)), "the CRC of what landed");
    }
    assert!(
        block(0).iter().all(|&b| b == 0),
        "nothing past the held prefix"
    );
    assert!(client.shm_usable());

    let elsewhere = tempfile::tempdir().unwrap();
    let outside = elsewhere.path().join(path.file_name().unwrap());
    std::fs::copy(&path, &outside).unwrap();
    let e = client
        .fetch_into(
            &hs,
            SHAPE,
            &PoolTarget {
                path: outside,
                ..to
            },
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("cannot map"), "{e}");
    assert!(!client.shm_usable(), "the client turns to the data plane");
    drop(fence);
    let _ = std::fs::remove_file(&path);
    stop(s).await;
}

async fn stop(mut s: Running) {
    let _ = s.stop.take().unwrap().send(());
    s.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_is_gone_fails_fast() {
    let s = start(None, Limits::default()).await;
    let client = StoreClient::new(&s.addr, None).unwrap();
    let hs = hashes(2);
    client
        .put(&hs, SHAPE, hs.iter().map(|&h| payload(h)).collect())
        .await
        .unwrap();
    stop(s).await;
    let t = std::time::Instant::now();
    assert!(client.fetch(&hs, SHAPE, Blocks::new(2)).await.is_err());
    assert!(client.lookup(&hs).await.is_err());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}
