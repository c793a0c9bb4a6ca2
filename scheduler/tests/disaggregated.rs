//! The disaggregated cluster in one test process: decode and prefill workers each on their own
//! tokio runtime and gRPC port (as separate processes would be), the scheduler's remote cluster
//! in front. The same seeded requests give bit-identical tokens and log-probabilities run
//! alone, colocated, 1P+1D over shared memory, 1P+1D over TCP, 2P+1D, and across a decode
//! worker dying mid-stream and coming back (the only one), or a prefill worker dying under load.
//! "Dying" drops the worker's runtime: every connection and stream it had breaks at once.

mod common;

use common::nodes::*;
use engine::Engine;
use engine::request::{CancellationToken, RequestId, WorkerEvent};
use engine::synthetic::testing::Trace;
use scheduler::cluster::Cluster;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

const N_GEN: usize = 24;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_topology_gives_the_tokens_of_each_request_alone() {
    let (dir, model) = tiny();
    let c = case(&model, 24, N_GEN, 0xd15a66);

    let colocated = decode_worker::colocated::cluster(
        Arc::new(Engine::load(&model, &config(None)).unwrap()),
        Default::default(),
    );
    check(&colocated, &c, "colocated").await;

    let d = decode_node(&model, dir.path(), "127.0.0.1:0", 64);
    let p1 = prefill_node(&model);
    let p2 = prefill_node(&model);
    for (name, prefill, transport) in [
        ("1P+1D shm", vec![&p1], "shm"),
        ("1P+1D tcp", vec![&p1], "tcp"),
        ("2P+1D auto", vec![&p1, &p2], ""),
    ] {
        let (fe, cfg) = remote(&model, &prefill, &[&d], transport);
        let cluster = Cluster::remote(fe, cfg).unwrap();
        assert!(
            cluster
                .remote_workers()
                .unwrap()
                .wait_ready(Duration::from_secs(10))
                .await
        );
        check(&cluster, &c, name).await;
        // Again: now the prompts' prefixes are cached on both sides.
        check(&cluster, &c, &format!("{name}, prefix-cached")).await;
    }
    // Placed one by one by a cost model under which the less loaded side wins (a token costs
    // the same everywhere; the decode worker's steps also carry its running batch): some
    // prompts go out, some stay, and nothing changes a single bit.
    let (fe, mut cfg) = remote(&model, &[&p1], &[&d], "");
    cfg.placement = Some(scheduler::remote::CostPlacement {
        cost: Arc::new(per_token_cost()),
        slo: scheduler::plan::placement::Slo {
            ttft_s: 60.0,
            tpot_s: 60.0,
        },
    });
    let cluster = Cluster::remote(fe, cfg).unwrap();
    let r = cluster.remote_workers().unwrap().clone();
    assert!(r.wait_ready(Duration::from_secs(10)).await);
    check(&cluster, &c, "1P+1D placed by cost").await;
    let (out, stayed) = (
        r.placed_prefill.load(Ordering::Relaxed),
        r.placed_decode.load(Ordering::Relaxed),
    );
    assert!(
        out > 0 && stayed > 0,
        "{out} prompts moved, {stayed} stayed"
    );
}

/// 1 ms a call and 1 ms a token on any thread count; attention and the link free.
fn per_token_cost() -> scheduler::plan::cost::CostModel {
    use scheduler::plan::cost::*;
    CostModel {
        version: COST_MODEL_VERSION,
        model_id: "tiny".into(),
        fingerprint: 0,
        cpu: "test".into(),
        cores: 1,
        kv_bytes_per_token: 1,
        forward: vec![ForwardCost {
            threads: 1,
            fixed_s: 1e-3,
            per_token_s: 1e-3,
            per_prefill_pair_s: 0.0,
            per_decode_pair_s: 0.0,
        }],
        link: LinkCost {
            calls_s: 0.0,
            tcp_bytes_per_s: 1e9,
        },
        samples: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_worker_dying_mid_stream_is_invisible_to_the_client() {
    let (dir, model) = tiny();
    let c = case(&model, 12, 160, 0xfa11);
    // One sequence at a time: when the worker dies, some streams are midway, others waiting.
    let d = decode_node(&model, dir.path(), "127.0.0.1:0", 1);
    let addr = d.addr.clone();
    let p = prefill_node(&model);
    let (fe, cfg) = remote(&model, &[&p], &[&d], "");
    let cluster = Cluster::remote(fe, cfg).unwrap();
    let r = cluster.remote_workers().unwrap().clone();
    assert!(r.wait_ready(Duration::from_secs(10)).await);
    let mut rxs = submit_all(&cluster, &c);
    // Wait until the first stream is under way, then kill its (only) decode worker.
    let mut first: Trace = (vec![], vec![]);
    while first.0.len() < 5 {
        match rxs[0].recv().await.unwrap() {
            WorkerEvent::Token(t) => {
                first.0.push(t.token);
                first.1.push(t.logprobs.unwrap().logprob.to_bits());
            }
            WorkerEvent::Error(e) => panic!("{e}"),
            _ => {}
        }
    }
    d.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The worker comes back on its address (as `tandem up` restarts it).
    let _d2 = decode_node(&model, dir.path(), &addr, 1);
    let rest = collect(rxs.remove(0)).await;
    first.0.extend(rest.0);
    first.1.extend(rest.1);
    assert_eq!(first, c.want[0], "the interrupted stream differs");
    for (i, rx) in rxs.into_iter().enumerate() {
        let got = tokio::time::timeout(Duration::from_secs(60), collect(rx))
            .await
            .unwrap_or_else(|_| panic!("request {} hung", i + 1));
        assert_eq!(got, c.want[i + 1], "request {} differs", i + 1);
    }
    assert!(
        r.resumed.load(Ordering::Relaxed) >= 1,
        "no stream was resumed: the kill came too late to test anything"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefill_worker_dying_under_load_loses_nothing() {
    let (dir, model) = tiny();
    let c = case(&model, 32, 8, 0xbeef);
    let d = decode_node(&model, dir.path(), "127.0.0.1:0", 64);
    let p1 = prefill_node(&model);
    let p2 = prefill_node(&model);
    let (fe, cfg) = remote(&model, &[&p1, &p2], &[&d], "");
    let mut p2 = Some(p2);
    let cluster = Cluster::remote(fe, cfg).unwrap();
    let r = cluster.remote_workers().unwrap().clone();
    assert!(r.wait_ready(Duration::from_secs(10)).await);
    let rxs = submit_all(&cluster, &c);
    // Kill one while the burst is in flight; then the other too (the decode worker prefills).
    p1.kill();
    let mut got = Vec::new();
    for (i, rx) in rxs.into_iter().enumerate() {
        if i == c.prompts.len() / 2 {
            let rest = submit_all(&cluster, &c);
            p2.take().unwrap().kill();
            for (j, rx) in rest.into_iter().enumerate() {
                let t = tokio::time::timeout(Duration::from_secs(60), collect(rx))
                    .await
                    .unwrap_or_else(|_| panic!("second wave request {j} hung"));
                assert_eq!(t, c.want[j], "second wave request {j} differs");
            }
        }
        let t = tokio::time::timeout(Duration::from_secs(60), collect(rx))
            .await
            .unwrap_or_else(|_| panic!("request {i} hung"));
        got.push(t);
    }
    assert_eq!(got, c.want);
    let retries = r.prefill_retries.load(Ordering::Relaxed);
    eprintln!("prefill retries: {retries}");
    assert!(
        retries >= 1,
        "no prefill was retried: the kill tested nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_go_away_free_their_blocks_on_every_worker() {
    // A long context, so that the streams are far from done when their clients leave.
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    let spec = engine::synthetic::TinySpec {
        n_ctx: 8192,
        ..Default::default()
    };
    engine::synthetic::write(&spec, &model).unwrap();
    let n_gen = 8000;
    let prompts: Vec<Vec<u32>> = (0..6)
        .map(|i| (0..20 + 7 * i).map(|t| t % 200 + 3).collect())
        .collect();
    let d = decode_node(&model, dir.path(), "127.0.0.1:0", 64);
    let p = prefill_node(&model);
    let (fe, cfg) = remote(&model, &[&p], &[&d], "");
    let cluster = Cluster::remote(fe, cfg).unwrap();
    let r = cluster.remote_workers().unwrap().clone();
    assert!(r.wait_ready(Duration::from_secs(10)).await);
    let total = r.decode_workers()[0].stats().kv_blocks_total;
    let cancels: Vec<CancellationToken> = prompts
        .iter()
        .map(|_| CancellationToken::default())
        .collect();
    let mut rxs: Vec<_> = prompts
        .iter()
        .zip(&cancels)
        .enumerate()
        .map(|(i, (p, f))| {
            let g = engine::synthetic::testing::mixed_params(i, n_gen, 77);
            cluster
                .submit(RequestId(5000 + i as u64), p.clone(), g, f.clone())
                .unwrap()
        })
        .collect();
    // Every stream under way (a few tokens each), then every client gone.
    for rx in &mut rxs {
        let mut n = 0;
        while n < 3 {
            if let WorkerEvent::Token(_) = rx.recv().await.unwrap() {
                n += 1;
            }
        }
    }
    // A fresh report, while every stream still runs.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let busy = r.decode_workers()[0].stats();
    assert_eq!(
        busy.running as usize,
        prompts.len(),
        "a stream ended early: {busy:?}"
    );
    drop(rxs);
    for f in &cancels {
        f.cancel();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = r.decode_workers()[0].stats();
        if s.running == 0 && s.waiting == 0 && s.kv_blocks_free == total {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "blocks not freed after the clients left: {s:?} (while busy: {busy:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        busy.kv_blocks_free < total,
        "the streams held no blocks: nothing was tested"
    );
}

/// A commit whose checksum does not match what the blocks hold (a transfer that garbled or
/// lost bytes) is refused with DATA_LOSS — which the scheduler answers with a re-prefill —
/// and the lease's blocks go back to the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_with_a_wrong_checksum_is_refused_and_its_blocks_freed() {
    use protocol::pb;
    use protocol::pb::decode_worker_client::DecodeWorkerClient;
    let (dir, model) = tiny();
    let d = decode_node(&model, dir.path(), "127.0.0.1:0", 4);
    let fingerprint = frontend_of(&model).fingerprint;
    let mut c = DecodeWorkerClient::new(channel(&d.addr));
    let free = |s: pb::WorkerStats| s.kv_blocks_free;
    let before = free(c.stats(pb::Empty {}).await.unwrap().into_inner());
    let prompt: Vec<u32> = (3..43).collect();
    let target = reserve(&mut c, &prompt, fingerprint).await;
    assert!(free(c.stats(pb::Empty {}).await.unwrap().into_inner()) < before);
    let params = engine::synthetic::testing::mixed_params(0, 4, 1);
    let refused = c
        .generate(pb::GenerateRequest {
            request_id: 1,
            prompt: prompt.clone(),
            generated: vec![7],
            params: Some((&params).into()),
            // Nothing was written: whatever the blocks hold, this is not its checksum.
            commit: Some(pb::Commit {
                lease_id: target.lease_id,
                checksum: 0x5eed,
                filled: prompt.len() as u32,
            }),
        })
        .await
        .expect_err("a commit with a wrong checksum");
    assert_eq!(refused.code(), tonic::Code::DataLoss, "{refused}");
    assert_eq!(
        free(c.stats(pb::Empty {}).await.unwrap().into_inner()),
        before
    );
}

/// Routing (and so failover) only picks decode workers of the scheduler's model: an idle
/// worker serving other weights is passed over for a busy one of the same fingerprint, and the
/// streams give the tokens they give alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decode_workers_of_another_model_are_never_picked() {
    let (dir, model) = tiny();
    let other = dir.path().join("other.gguf");
    engine::synthetic::write(
        &engine::synthetic::TinySpec {
            seed: 4242,
            ..Default::default()
        },
        &other,
    )
    .unwrap();
    let foreign = decode_node(&other, dir.path(), "127.0.0.1:0", 64);
    let own = decode_node(&model, dir.path(), "127.0.0.1:0", 64);
    // The foreign worker is listed first and stays idle: by load alone it would win.
    let (fe, cfg) = remote(&model, &[], &[&foreign, &own], "auto");
    let cluster = Cluster::remote(fe, cfg).unwrap();
    let r = cluster.remote_workers().unwrap().clone();
    let t0 = std::time::Instant::now();
    while !r.decode_workers().iter().all(|w| w.healthy()) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "workers never came up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // No prefill workers: each decode worker prefills itself, so a request routed to the
    // foreign one would come back with its weights' tokens, not the alone-run's.
    let c = case(&model, 8, N_GEN, 0xf1f1);
    check(&cluster, &c, "beside a worker of another model").await;
}
