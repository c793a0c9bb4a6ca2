//! The disaggregated cluster in one test process: decode and prefill workers each on their own
//! tokio runtime and gRPC port (as separate processes would be), the scheduler's remote cluster
//! in front. The same seeded requests give bit-identical tokens and log-probabilities run
//! alone, colocated, 1P+1D over shared memory, 1P+1D over TCP, 2P+1D, and across a decode
//! worker dying mid-stream and coming back (the only one), or a prefill worker dying under load.
//! "Dying" drops the worker's runtime: every connection and stream it had breaks at once.

use decode_worker::WorkerConfig;
use engine::request::{CancelFlag, GenerationParams, RequestId, WorkerEvent};
use engine::synthetic::testing::{Rng, Trace, generate_alone, mixed_params};
use engine::synthetic::{TinySpec, write};
use engine::{Engine, EngineConfig};
use scheduler::cluster::Cluster;
use scheduler::remote::RemoteConfig;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedReceiver;

const N_GEN: usize = 24;

fn config(shm: Option<PathBuf>) -> EngineConfig {
    EngineConfig {
        kv_budget_bytes: 8 << 20,
        model_id: None,
        precision: Default::default(),
        kv_dtype: Default::default(),
        kv_shared_path: shm,
    }
}

/// A worker on its own runtime; dropping (or [`kill`](Node::kill)ing) it breaks everything
/// it serves at once.
struct Node {
    addr: String,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Node {
    fn kill(mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn node<F, Fut>(bind: String, serve: F) -> Node
where
    F: FnOnce(tokio::net::TcpListener) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = std::io::Result<()>> + Send + 'static,
{
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind(&bind).await.unwrap();
            addr_tx
                .send(listener.local_addr().unwrap().to_string())
                .unwrap();
            let stopped = tokio::task::spawn_blocking(move || {
                let _ = stop_rx.recv();
            });
            tokio::select! {
                r = serve(listener) => r.unwrap(),
                _ = stopped => {}
            }
        });
        // Abrupt: no draining, every task and connection dropped now.
        rt.shutdown_background();
    });
    Node {
        addr: addr_rx.recv().unwrap(),
        stop: Some(stop_tx),
        thread: Some(thread),
    }
}

fn never() -> impl std::future::Future<Output = ()> + Send + 'static {
    std::future::pending()
}

fn decode_node(model: &Path, dir: &Path, bind: &str, max_running: usize) -> Node {
    let shm = kv_store::shm::pool_path(dir);
    let engine = Arc::new(Engine::load(model, &config(Some(shm))).unwrap());
    let worker = WorkerConfig {
        max_batch_tokens: 64,
        max_running,
        max_waiting: 256,
    };
    node(bind.to_string(), move |l| async move {
        decode_worker::service::serve(engine, worker, l, "127.0.0.1:0", "127.0.0.1", never()).await
    })
}

fn prefill_node(model: &Path) -> Node {
    let engine = Arc::new(Engine::load(model, &config(None)).unwrap());
    node("127.0.0.1:0".into(), move |l| async move {
        prefill_worker::service::serve(engine, Default::default(), l, never()).await
    })
}

fn remote(
    model: &Path,
    prefill: &[&Node],
    decode: &[&Node],
    transport: &str,
) -> (Arc<Engine>, RemoteConfig) {
    let frontend = Arc::new(Engine::load_frontend(model, &config(None)).unwrap());
    let cfg = RemoteConfig {
        prefill: prefill.iter().map(|n| n.addr.clone()).collect(),
        decode: decode.iter().map(|n| n.addr.clone()).collect(),
        // Short prompts prefill on the decode worker; the rest move their KV.
        disagg_min_tokens: 12,
        transport: transport.into(),
        hold: Duration::from_secs(30),
        poll: Duration::from_millis(50),
        ..Default::default()
    };
    (frontend, cfg)
}

async fn collect(mut rx: UnboundedReceiver<WorkerEvent>) -> Trace {
    let mut t: Trace = (vec![], vec![]);
    while let Some(ev) = rx.recv().await {
        match ev {
            WorkerEvent::Token(ev) => {
                t.0.push(ev.token);
                t.1.push(ev.logprobs.unwrap().logprob.to_bits());
                if ev.finish.is_some() {
                    break;
                }
            }
            WorkerEvent::Error(e) => panic!("request failed: {e}"),
            _ => {}
        }
    }
    t
}

struct Case {
    prompts: Vec<Vec<u32>>,
    params: Vec<GenerationParams>,
    want: Vec<Trace>,
}

fn case(model: &Path, n: usize, n_gen: usize, seed: u64) -> Case {
    let e = Engine::load(model, &config(None)).unwrap();
    let mut rng = Rng(seed);
    let shared: Vec<u32> = (0..40).map(|_| rng.next(250) as u32 + 3).collect();
    let prompts: Vec<Vec<u32>> = (0..n)
        .map(|i| {
            // Short (decode-local) and long prompts, half sharing a prefix (prefix caches).
            let mut p = if i % 2 == 0 { shared.clone() } else { vec![] };
            let own = rng.next(60) as usize + 1;
            p.extend((0..own).map(|_| rng.next(250) as u32 + 3));
            p
        })
        .collect();
    let params: Vec<GenerationParams> = (0..n).map(|i| mixed_params(i, n_gen, 4242)).collect();
    let want = prompts
        .iter()
        .zip(&params)
        .map(|(p, g)| generate_alone(&e, p, g.clone()))
        .collect();
    Case {
        prompts,
        params,
        want,
    }
}

fn submit_all(cluster: &Cluster, c: &Case) -> Vec<UnboundedReceiver<WorkerEvent>> {
    c.prompts
        .iter()
        .zip(&c.params)
        .enumerate()
        .map(|(i, (p, g))| {
            cluster
                .submit(
                    RequestId(1000 + i as u64),
                    p.clone(),
                    g.clone(),
                    CancelFlag::default(),
                )
                .unwrap()
        })
        .collect()
}

async fn check(cluster: &Cluster, c: &Case, what: &str) {
    let rxs = submit_all(cluster, c);
    for (i, rx) in rxs.into_iter().enumerate() {
        let got = tokio::time::timeout(Duration::from_secs(60), collect(rx))
            .await
            .unwrap_or_else(|_| panic!("{what}: request {i} hung"));
        assert_eq!(
            got, c.want[i],
            "{what}: request {i} differs from running alone"
        );
    }
}

fn tiny() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write(&TinySpec::default(), &path).unwrap();
    (dir, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_topology_gives_the_tokens_of_each_request_alone() {
    let (dir, model) = tiny();
    let c = case(&model, 24, N_GEN, 0xd15a66);

    let colocated = Cluster::start(Arc::new(Engine::load(&model, &config(None)).unwrap()), 64);
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
