//! The internal plane validates what it is told, as the HTTP API does: a bad `Prefill` target
//! or a bad `Generate` fails that call alone (`InvalidArgument`), never the worker, its batch or
//! the next request. A target must be a grant signed with the cluster secret; the bogus ones
//! here are re-signed (an insider holding the secret) so that each structural check is met.

mod common;

use common::nodes::*;
use protocol::pb;
use scheduler::cluster::Cluster;
use tonic::Code;

fn generate(
    prompt: Vec<u32>,
    generated: Vec<u32>,
    commit: Option<pb::Commit>,
) -> pb::GenerateRequest {
    let params = engine::synthetic::testing::mixed_params(0, 4, 1);
    pb::GenerateRequest {
        request_id: 900,
        prompt,
        generated,
        params: Some((&params).into()),
        commit,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_targets_and_bad_generates_fail_alone() {
    let Pair {
        dir: _dir,
        model,
        decode: d,
        prefill: p,
        fe,
        mut dc,
        mut pc,
    } = pair();
    let vocab = fe.config.vocab_size as u32;
    let prompt: Vec<u32> = (3..43).collect();
    let target = reserve(&mut dc, &prompt, fe.fingerprint).await;
    let params = engine::synthetic::testing::mixed_params(0, 4, 1);
    let prefill = |target: pb::KvTarget, prompt: Vec<u32>| pb::PrefillRequest {
        request_id: 7,
        prompt,
        generated: Vec::new(),
        params: Some((&params).into()),
        target: Some(target),
        transport: "shm".into(),
    };
    let bogus = [
        (
            "zero pool blocks",
            pb::KvTarget {
                pool_blocks: 0,
                ..target.clone()
            },
        ),
        (
            "a file that is not a pool",
            pb::KvTarget {
                shm_path: "/etc/passwd".into(),
                ..target.clone()
            },
        ),
        (
            "blocks outside the pool",
            pb::KvTarget {
                block_ids: target
                    .block_ids
                    .iter()
                    .map(|b| b + target.pool_blocks as u32)
                    .collect(),
                ..target.clone()
            },
        ),
        (
            "a block named twice",
            pb::KvTarget {
                block_ids: vec![target.block_ids[0]; target.block_ids.len()],
                ..target.clone()
            },
        ),
        (
            "too few blocks",
            pb::KvTarget {
                block_ids: vec![target.block_ids[0]],
                ..target.clone()
            },
        ),
    ];
    let mut unsigned = target.clone();
    unsigned.block_ids.reverse();
    let e = pc
        .prefill(prefill(unsigned, prompt.clone()))
        .await
        .expect_err("unsigned");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("not signed"), "{e}");
    for (what, mut t) in bogus {
        protocol::grant::sign(Some(&secret()), &mut t);
        let e = pc
            .prefill(prefill(t, prompt.clone()))
            .await
            .expect_err(what);
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e}");
    }
    let mut bad_prompt = prompt.clone();
    bad_prompt[5] = vocab;
    let e = pc
        .prefill(prefill(target.clone(), bad_prompt.clone()))
        .await
        .expect_err("vocab");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    // The worker is alive and the genuine target still works.
    let ok = pc
        .prefill(prefill(target.clone(), prompt.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.filled as usize, prompt.len());

    // Generate: an id outside the vocabulary, or a prompt longer than the context, fails that
    // call; a commit whose prompt is not the reserved one is refused (it would key the prefix
    // cache with blocks computed for other tokens).
    let e = dc
        .generate(generate(bad_prompt, vec![], None))
        .await
        .expect_err("vocab");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let long: Vec<u32> = (0..fe.max_context() as u32 + 1)
        .map(|i| 3 + i % 50)
        .collect();
    let e = dc
        .generate(generate(long, vec![], None))
        .await
        .expect_err("context");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let mut other = prompt.clone();
    other[0] = 4;
    let e = dc
        .generate(generate(
            other,
            vec![7],
            Some(pb::Commit {
                lease_id: target.lease_id,
                checksum: ok.checksum,
                filled: prompt.len() as u32,
            }),
        ))
        .await
        .expect_err("another prompt");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");

    // Meanwhile and after, seeded requests through the cluster give the tokens they give alone.
    let c = case(&model, 8, 16, 0xbad);
    let (fe, cfg) = remote(&model, &[&p], &[&d], "auto");
    let cluster = Cluster::remote(fe, cfg).unwrap();
    let bad = async {
        let mut dc = dc.clone();
        for _ in 0..8 {
            let mut b: Vec<u32> = (3..30).collect();
            b[3] = vocab + 7;
            let e = dc
                .generate(generate(b, vec![], None))
                .await
                .expect_err("vocab");
            assert_eq!(e.code(), Code::InvalidArgument);
        }
    };
    tokio::join!(check(&cluster, &c, "beside bad generates"), bad);
}

/// A decode worker in another container names a pool file this prefill worker cannot see (its
/// own /dev/shm, same kernel boot id): on `auto` the KV goes over TCP, on `tcp` the path is
/// never looked at, and only `shm` asked for outright is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_file_this_host_cannot_see_means_tcp() {
    // Every part bound: a field left to `..` would be dropped (a worker stopped) right here.
    let Pair {
        dir: _dir,
        model: _model,
        decode: _decode,
        prefill: _prefill,
        fe,
        mut dc,
        mut pc,
    } = pair();
    let prompt: Vec<u32> = (3..43).collect();
    let params = engine::synthetic::testing::mixed_params(0, 4, 1);
    for (transport, ok) in [("", true), ("tcp", true), ("shm", false)] {
        let mut target = reserve(&mut dc, &prompt, fe.fingerprint).await;
        target.shm_path = "/dev/shm/tandem-kv-1-0000dead.pool".into();
        protocol::grant::sign(Some(&secret()), &mut target);
        let r = pc
            .prefill(pb::PrefillRequest {
                request_id: 8,
                prompt: prompt.clone(),
                generated: Vec::new(),
                params: Some((&params).into()),
                target: Some(target),
                transport: transport.into(),
            })
            .await;
        match (r, ok) {
            (Ok(r), true) => {
                let r = r.into_inner();
                assert_eq!(r.filled as usize, prompt.len(), "{transport:?}");
                assert_eq!(r.transport, "tcp", "{transport:?}");
            }
            (Err(e), false) => assert_eq!(e.code(), Code::InvalidArgument, "{e}"),
            (r, _) => panic!("transport {transport:?}: {r:?}"),
        }
    }
}
