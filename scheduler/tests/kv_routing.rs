//! KV-aware routing with real decode workers (tiny model, each on its own runtime and port):
//! the scheduler follows their block events and sends a prompt back to the worker that caches
//! its prefix, where routing by load sends it to whichever is idle and computes it again.

mod common;

use common::nodes::*;
use engine::request::{CancellationToken, GenerationParams, RequestId, WorkerEvent};
use scheduler::cluster::Cluster;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedReceiver;

/// Waits for the `Prefilled` event: the cached prompt tokens.
async fn prefilled(rx: &mut UnboundedReceiver<WorkerEvent>) -> usize {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
            Ok(Some(WorkerEvent::Prefilled { cached_tokens })) => return cached_tokens,
            Ok(Some(WorkerEvent::Error(e))) => panic!("{e}"),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => panic!("no prefill reported"),
        }
    }
}

async fn finish(mut rx: UnboundedReceiver<WorkerEvent>) {
    while let Some(ev) = rx.recv().await {
        match ev {
            WorkerEvent::Token(t) if t.finish.is_some() => return,
            WorkerEvent::Done => return,
            WorkerEvent::Error(e) => panic!("{e}"),
            _ => {}
        }
    }
}

fn params(max_tokens: usize) -> GenerationParams {
    engine::synthetic::testing::mixed_params(0, max_tokens, 1)
}

/// Two prompt families, A and B: A's first request occupies worker 0 while B's first goes to
/// worker 1. Then B and A once more each, one at a time, both workers idle: the cached tokens
/// each reports.
async fn second_visits(kv: bool) -> (usize, usize) {
    let (_d, model) = tiny();
    let (dir0, dir1) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let w0 = decode_node(&model, dir0.path(), "127.0.0.1:0", 64);
    let w1 = decode_node(&model, dir1.path(), "127.0.0.1:0", 64);
    let (fe, mut cfg) = remote(&model, &[], &[&w0, &w1], "");
    if !kv {
        cfg.kv_routing = None;
    }
    let cluster = Cluster::remote(fe, cfg).unwrap();
    assert!(
        cluster
            .remote_workers()
            .unwrap()
            .wait_ready(Duration::from_secs(10))
            .await
    );
    let a: Vec<u32> = (0..70).map(|i| 3 + (i * 7) % 200).collect();
    let b: Vec<u32> = (0..70).map(|i| 5 + (i * 11) % 190).collect();
    let submit = |id: u64, p: &[u32], n: usize| {
        cluster
            .submit(
                RequestId(id),
                p.to_vec(),
                params(n),
                CancellationToken::default(),
            )
            .unwrap()
    };
    let mut a1 = submit(1, &a, 400);
    assert_eq!(prefilled(&mut a1).await, 0);
    // A still decodes on worker 0: B goes to the idle worker 1.
    let mut b1 = submit(2, &b, 2);
    assert_eq!(prefilled(&mut b1).await, 0);
    finish(a1).await;
    finish(b1).await;
    // The block events reach the scheduler, and both workers are idle again (the last
    // request's count on its worker drops a moment after its stream ends).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut b2 = submit(3, &b, 2);
    let b_cached = prefilled(&mut b2).await;
    finish(b2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut a2 = submit(4, &a, 2);
    let a_cached = prefilled(&mut a2).await;
    finish(a2).await;
    (a_cached, b_cached)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_go_back_to_the_worker_caching_their_prefix() {
    let (a, b) = second_visits(true).await;
    assert!(a >= 48 && b >= 48, "KV routing: cached {a} and {b} of 70");
    // By load B goes to the first of two idle workers, where its prefix is not.
    let (_, b) = second_visits(false).await;
    assert_eq!(b, 0, "load routing: B cached {b} of 70");
}
