//! The internal plane under attack, as an insider holding the cluster secret and a lease id
//! would mount it (the strongest case: without the secret nothing connects at all, and lease
//! ids are 128 random bits) — and as an outsider with the wrong secret. Each test ends by
//! checking that seeded requests through the cluster still give the tokens they give alone.

mod common;

use common::nodes::*;
use engine::Engine;
use kv_store::tcp::KvSender;
use protocol::pb::decode_worker_client::DecodeWorkerClient;
use protocol::{LeaseId, pb};
use scheduler::cluster::Cluster;
use std::time::{Duration, Instant};
use tonic::Code;

/// Deterministic bytes for `(block, layer)` of one writer (`tag`).
fn slab(len: usize, tag: u8, block: u32, layer: u32) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32 * 31 + block * 7 + layer * 3 + tag as u32 * 101) as u8)
        .collect()
}

async fn free_blocks(dc: &mut DecodeWorkerClient<tonic::transport::Channel>) -> u64 {
    dc.stats(pb::Empty {})
        .await
        .unwrap()
        .into_inner()
        .kv_blocks_free
}

/// A second connection can neither write a live lease nor end it, and nothing lands after the
/// end or the commit: the legitimate writer's bytes are exactly what the commit finds (the
/// decode worker re-hashes the blocks, so one foreign byte would fail the commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_on_a_foreign_connection_never_land() {
    let (dir, model) = tiny();
    let d = decode_node(&model, dir.path(), "127.0.0.1:0", 16);
    let p = prefill_node(&model);
    let engine = Engine::load(&model, &config(None)).unwrap();
    let layout = engine.kv.layout();
    let len = engine.new_sequence().slab_bytes();
    let fp = engine.frontend.fingerprint;
    let mut dc = DecodeWorkerClient::new(channel(&d.addr));
    let prompt: Vec<u32> = (3..43).collect();
    let target = reserve(&mut dc, &prompt, fp).await;
    let lease = LeaseId::from_wire(&target.lease_id).unwrap();
    let blocks = kv_store::written_blocks(0, prompt.len(), layout.block_size);
    let addr = target.kv_data_addr.clone();
    let sum = tokio::task::spawn_blocking(move || {
        let k = secret();
        let mut writer = KvSender::connect(&addr, Some(&k)).unwrap();
        let mut rogue = KvSender::connect(&addr, Some(&k)).unwrap();
        let mut sum = kv_store::Checksum::new();
        for layer in 0..layout.n_layers as u32 {
            let mine: Vec<Vec<u8>> = blocks
                .clone()
                .map(|b| slab(len, 1, b as u32, layer))
                .collect();
            let theirs: Vec<Vec<u8>> = blocks
                .clone()
                .map(|b| slab(len, 2, b as u32, layer))
                .collect();
            let frames = |v: &[Vec<u8>]| -> Vec<(u32, Vec<u8>)> {
                v.iter()
                    .enumerate()
                    .map(|(i, s)| (i as u32, s.clone()))
                    .collect()
            };
            let send = |c: &mut KvSender, v: &[(u32, Vec<u8>)]| {
                let f: Vec<(u32, &[u8])> = v.iter().map(|(b, s)| (*b, &s[..])).collect();
                c.slabs(lease, layer, &f)
            };
            send(&mut writer, &frames(&mine)).unwrap();
            if layer == 0 {
                // The writer's first frame opens the lease (on another thread of the
                // receiver: give it time to land first).
                std::thread::sleep(Duration::from_millis(300));
            }
            // The rogue writes the same blocks after the writer, layer by layer.
            send(&mut rogue, &frames(&theirs)).unwrap();
            for s in &mine {
                sum.update(s);
            }
        }
        // A bogus end from the rogue, before the real one: ignored.
        rogue.end(lease, 1, 0xdead).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        writer
            .end(lease, (blocks.len() * layout.n_layers) as u32, sum.digest())
            .unwrap();
        // Late payload after the end: dropped.
        std::thread::sleep(Duration::from_millis(200));
        let late = slab(len, 3, 0, 0);
        rogue.slabs(lease, 0, &[(0, &late[..])]).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        sum.digest()
    })
    .await
    .unwrap();
    let commit = pb::Commit {
        lease_id: target.lease_id.clone(),
        checksum: sum,
        filled: prompt.len() as u32,
    };
    let params = engine::synthetic::testing::mixed_params(0, 4, 1);
    let stream = dc
        .generate(pb::GenerateRequest {
            request_id: 7,
            prompt: prompt.clone(),
            generated: vec![5],
            params: Some((&params).into()),
            commit: Some(commit),
        })
        .await;
    assert!(
        stream.is_ok(),
        "the commit found foreign bytes: {:?}",
        stream.err()
    );
    drop(stream);

    let c = case(&model, 8, 16, 0xa77ac);
    let (fe, cfg) = remote(&model, &[&p], &[&d], "tcp");
    let cluster = Cluster::remote(fe, cfg).unwrap();
    check(&cluster, &c, "after the attack").await;
}

/// A transfer whose writer stalls mid-frame: the lease expires, the writer's connection is
/// cut, and the blocks come back — only after the connection's thread has stopped, so no late
/// byte reaches a block given to the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_transfer_expires_and_its_blocks_come_back() {
    let (dir, model) = tiny();
    let d = decode_node_with(
        &model,
        dir.path(),
        "127.0.0.1:0",
        16,
        Duration::from_secs(1),
    );
    let p = prefill_node(&model);
    let fe = frontend_of(&model);
    let mut dc = DecodeWorkerClient::new(channel(&d.addr));
    let before = free_blocks(&mut dc).await;
    let prompt: Vec<u32> = (3..43).collect();
    let target = reserve(&mut dc, &prompt, fe.fingerprint).await;
    assert!(free_blocks(&mut dc).await < before);
    let lease = LeaseId::from_wire(&target.lease_id).unwrap();
    let addr = target.kv_data_addr.clone();
    let engine = Engine::load(&model, &config(None)).unwrap();
    let len = engine.new_sequence().slab_bytes();
    let mut writer =
        tokio::task::spawn_blocking(move || KvSender::connect(&addr, Some(&secret())).unwrap())
            .await
            .unwrap();
    // One whole layer, then a frame of two slabs of which only part of the first is sent.
    let s0 = slab(len, 1, 0, 0);
    writer.slabs(lease, 0, &[(0, &s0[..])]).unwrap();
    let mut raw = writer.into_stream();
    let header = kv_store::frame::Frame::Slabs {
        lease,
        layer: 1,
        n: 2,
        len: len as u32,
    }
    .encode();
    use std::io::{Read, Write};
    raw.write_all(&header).unwrap();
    raw.write_all(&kv_store::frame::encode_blocks([0, 1]))
        .unwrap();
    raw.write_all(&s0[..len / 2]).unwrap();
    let t0 = Instant::now();
    while free_blocks(&mut dc).await < before {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the stalled lease's blocks never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The writer was cut off: its connection reads as closed.
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    assert!(matches!(raw.read(&mut b), Ok(0) | Err(_)));
    // Its late bytes go nowhere; the blocks serve the next requests intact.
    let _ = raw.write_all(&s0[len / 2..]);
    let c = case(&model, 8, 16, 0x57a11);
    let (fe, cfg) = remote(&model, &[&p], &[&d], "tcp");
    let cluster = Cluster::remote(fe, cfg).unwrap();
    check(&cluster, &c, "after the expiry").await;
}

/// A decode worker that stops answering (its data plane black-holed): the prefill sending to
/// it fails within the handshake and send deadlines, and the other prefills finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_decode_peer_fails_only_its_own_prefill() {
    let Pair {
        dir: _dir,
        model,
        decode: d,
        prefill: p,
        fe,
        mut dc,
        mut pc,
    } = pair();
    // Accepts connections and never says a word.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let prompt: Vec<u32> = (3..43).collect();
    let mut target = reserve(&mut dc, &prompt, fe.fingerprint).await;
    target.kv_data_addr = hole.local_addr().unwrap().to_string();
    protocol::grant::sign(Some(&secret()), &mut target);
    let params = engine::synthetic::testing::mixed_params(0, 4, 1);
    let doomed = async {
        let t0 = Instant::now();
        let r = pc
            .prefill(pb::PrefillRequest {
                request_id: 77,
                prompt: prompt.clone(),
                generated: Vec::new(),
                params: Some((&params).into()),
                target: Some(target),
                transport: "tcp".into(),
            })
            .await;
        (r, t0.elapsed())
    };
    let c = case(&model, 8, 16, 0xb1ac);
    let (fe2, cfg) = remote(&model, &[&p], &[&d], "tcp");
    let cluster = Cluster::remote(fe2, cfg).unwrap();
    let ((r, took), ()) = tokio::join!(doomed, check(&cluster, &c, "beside a black hole"));
    let e = r.expect_err("a prefill into a black hole");
    assert_eq!(e.code(), Code::Internal, "{e}");
    assert!(took < Duration::from_secs(20), "it took {took:?}");
    drop(hole);
}

/// A scheduler with another secret is refused by every worker: nothing is served, the
/// request fails cleanly; a client with no secret at all gets nowhere either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_is_refused_everywhere() {
    let (dir, model) = tiny();
    let d = decode_node(&model, dir.path(), "127.0.0.1:0", 16);
    let p = prefill_node(&model);
    let (fe, mut cfg) = remote(&model, &[&p], &[&d], "tcp");
    cfg.secret = protocol::auth::ClusterSecret::from_bytes(b"an-entirely-different-secret");
    cfg.hold = Duration::from_secs(1);
    let cluster = Cluster::remote(fe, cfg).unwrap();
    let c = case(&model, 1, 4, 5);
    let mut rx = submit_all(&cluster, &c).pop().unwrap();
    let first = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("the request hung");
    assert!(
        matches!(first, Some(engine::request::WorkerEvent::Error(_)) | None),
        "served with the wrong secret: {first:?}"
    );
    for addr in [&d.addr, &p.addr] {
        let no_secret = protocol::net::channel(addr, None).unwrap();
        let e = DecodeWorkerClient::new(no_secret)
            .stats(pb::Empty {})
            .await
            .expect_err("no secret");
        assert_eq!(e.code(), Code::Unavailable, "{e}");
    }
}

async fn until_free(
    dc: &mut DecodeWorkerClient<tonic::transport::Channel>,
    want: u64,
    what: &str,
) -> Duration {
    let t0 = Instant::now();
    while free_blocks(dc).await < want {
        assert!(t0.elapsed() < Duration::from_secs(10), "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    t0.elapsed()
}

/// A prefill worker writing in place (shared memory) that stalls inside its blocks: the lease
/// expires, but its blocks stay out of use (quarantined) while the writer holds them, and come
/// back once it lets go; a commit of a lease still being written is refused; a writer arriving
/// after the lease was taken back (expired, or released) is refused before it writes a byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_in_place_writer_never_writes_a_reused_block() {
    use kv_store::shm::fence::{Hold, HoldError, lease_tag};
    let (dir, model) = tiny();
    let d = decode_node_with(
        &model,
        dir.path(),
        "127.0.0.1:0",
        16,
        Duration::from_secs(1),
    );
    let p = prefill_node(&model);
    let fe = frontend_of(&model);
    let bs = Engine::load(&model, &config(None))
        .unwrap()
        .kv
        .layout()
        .block_size;
    let mut dc = DecodeWorkerClient::new(channel(&d.addr));
    let before = free_blocks(&mut dc).await;
    let prompt: Vec<u32> = (3..43).collect();
    let hold = |t: &pb::KvTarget| {
        let lease = LeaseId::from_wire(&t.lease_id).unwrap();
        let written = kv_store::written_blocks(0, prompt.len(), bs);
        Hold::take(
            std::path::Path::new(&t.shm_path),
            &t.block_ids[written],
            lease_tag(&lease.0),
        )
    };

    // Expiry under a stalled writer: quarantined, then freed when it lets go.
    let target = reserve(&mut dc, &prompt, fe.fingerprint).await;
    assert!(!target.shm_path.is_empty());
    let stalled = hold(&target).expect("the writer holds its lease's blocks");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        free_blocks(&mut dc).await < before,
        "the blocks were reused under a writer"
    );
    drop(stalled);
    let back = until_free(&mut dc, before, "the quarantined blocks never came back").await;
    eprintln!("quarantined blocks back {back:?} after the writer let go");
    // The expired grant no longer lets anyone in.
    assert!(matches!(hold(&target), Err(HoldError::Revoked(_))));

    // Released before its writer starts: the writer is refused.
    let target = reserve(&mut dc, &prompt, fe.fingerprint).await;
    dc.release(pb::ReleaseRequest {
        lease_id: target.lease_id.clone(),
    })
    .await
    .unwrap();
    until_free(&mut dc, before, "a released lease's blocks never came back").await;
    assert!(matches!(hold(&target), Err(HoldError::Revoked(_))));

    // A commit while the writer is still inside: refused, and the blocks wait for it.
    let d2 = decode_node(&model, dir.path(), "127.0.0.1:0", 16);
    let mut dc2 = DecodeWorkerClient::new(channel(&d2.addr));
    let before2 = free_blocks(&mut dc2).await;
    let target = reserve(&mut dc2, &prompt, fe.fingerprint).await;
    let inside = hold(&target).unwrap();
    let params = engine::synthetic::testing::mixed_params(0, 4, 1);
    let refused = dc2
        .generate(pb::GenerateRequest {
            request_id: 9,
            prompt: prompt.clone(),
            generated: vec![5],
            params: Some((&params).into()),
            commit: Some(pb::Commit {
                lease_id: target.lease_id.clone(),
                checksum: 0,
                filled: prompt.len() as u32,
            }),
        })
        .await
        .expect_err("a commit under a writer was accepted");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(free_blocks(&mut dc2).await < before2);
    drop(inside);
    until_free(
        &mut dc2,
        before2,
        "the refused commit's blocks never came back",
    )
    .await;

    // Through it all the pool served correctly, in place.
    let c = case(&model, 8, 16, 0xf3_4ce);
    let (fe, cfg) = remote(&model, &[&p], &[&d, &d2], "shm");
    let cluster = Cluster::remote(fe, cfg).unwrap();
    check(&cluster, &c, "after the fenced expiries").await;
}
