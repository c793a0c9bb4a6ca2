//! Cluster pieces for in-process tests: each worker on its own tokio runtime and gRPC port (as
//! a separate process would be), seeded request sets and their answers run alone.

use decode_worker::WorkerConfig;
use engine::request::{CancellationToken, GenerationParams, RequestId, WorkerEvent};
use engine::synthetic::testing::{Rng, Trace, generate_alone, mixed_params};
use engine::synthetic::{TinySpec, write};
use engine::{Engine, EngineConfig};
use frontend::constraint::Constraint;
use scheduler::cluster::Cluster;
use scheduler::remote::RemoteConfig;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedReceiver;

pub fn config(shm: Option<PathBuf>) -> EngineConfig {
    EngineConfig {
        kv_budget_bytes: 8 << 20,
        model_id: None,
        precision: Default::default(),
        kv_dtype: Default::default(),
        kv_shared_path: shm,
        device: Default::default(),
    }
}

/// The scheduler's view of `model` (no weights), with the workers' fingerprint.
pub fn frontend_of(model: &std::path::Path) -> engine::Frontend {
    engine::Frontend::load(model, None, config(None).numerics()).unwrap()
}

/// A worker on its own runtime; dropping (or [`kill`](Node::kill)ing) it breaks everything
/// it serves at once.
pub struct Node {
    pub addr: String,
    stop: Option<std::sync::mpsc::Sender<()>>,
    /// Things that live and die with the node (dropped senders stop them).
    companions: Vec<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Node {
    /// Ties `stop` to the node: dropped when the node dies.
    pub fn with_companion(mut self, stop: std::sync::mpsc::Sender<()>) -> Node {
        self.companions.push(stop);
        self
    }

    pub fn kill(mut self) {
        self.stop.take();
        self.companions.clear();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop.take();
        self.companions.clear();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn node<F, Fut>(bind: String, serve: F) -> Node
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
        companions: Vec::new(),
        thread: Some(thread),
    }
}

/// The test clusters' secret: every internal connection in these tests proves it.
pub fn secret() -> protocol::auth::ClusterSecret {
    protocol::auth::ClusterSecret::from_bytes(b"tandem-test-cluster-secret").unwrap()
}

/// A gRPC channel to a test worker, with the cluster's secret.
pub fn channel(addr: &str) -> tonic::transport::Channel {
    protocol::net::channel(addr, Some(secret())).unwrap()
}

pub fn never() -> impl std::future::Future<Output = ()> + Send + 'static {
    std::future::pending()
}

pub fn decode_node(model: &Path, dir: &Path, bind: &str, max_running: usize) -> Node {
    decode_node_with(model, dir, bind, max_running, Duration::from_secs(30))
}

/// A decode worker whose leases live `lease` without a commit.
pub fn decode_node_with(
    model: &Path,
    dir: &Path,
    bind: &str,
    max_running: usize,
    lease: Duration,
) -> Node {
    let shm = kv_store::shm::pool_path(dir);
    let engine = Arc::new(Engine::load(model, &config(Some(shm))).unwrap());
    let worker = WorkerConfig {
        max_batch_tokens: 64,
        max_running,
        max_waiting: 256,
    };
    node(bind.to_string(), move |l| async move {
        decode_worker::service::serve(
            engine,
            worker,
            l,
            "127.0.0.1:0",
            "127.0.0.1",
            decode_worker::service::ServiceConfig {
                secret: Some(secret()),
                lease,
                ..Default::default()
            },
            never(),
        )
        .await
    })
}

pub fn prefill_node(model: &Path) -> Node {
    let engine = Arc::new(Engine::load(model, &config(None)).unwrap());
    node("127.0.0.1:0".into(), move |l| async move {
        let cfg = prefill_worker::PrefillConfig {
            secret: Some(secret()),
            ..Default::default()
        };
        prefill_worker::service::serve(engine, cfg, l, never()).await
    })
}

pub fn remote(
    model: &Path,
    prefill: &[&Node],
    decode: &[&Node],
    transport: &str,
) -> (Arc<engine::Frontend>, RemoteConfig) {
    let frontend = Arc::new(frontend_of(model));
    let cfg = RemoteConfig {
        prefill: prefill.iter().map(|n| n.addr.clone()).collect(),
        decode: decode.iter().map(|n| n.addr.clone()).collect(),
        // Short prompts prefill on the decode worker; the rest move their KV.
        disagg_min_tokens: 12,
        transport: protocol::KvTransport::parse(transport).unwrap(),
        hold: Duration::from_secs(30),
        poll: Duration::from_millis(50),
        secret: Some(secret()),
        ..Default::default()
    };
    (frontend, cfg)
}

pub async fn collect(mut rx: UnboundedReceiver<WorkerEvent>) -> Trace {
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

pub struct Case {
    pub prompts: Vec<Vec<u32>>,
    pub params: Vec<GenerationParams>,
    pub want: Vec<Trace>,
}

pub fn case(model: &Path, n: usize, n_gen: usize, seed: u64) -> Case {
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
    // Every fourth from the second asks for JSON under a schema, every fourth from the fourth
    // for a grammar's output (constrained decoding in every topology and across failover).
    let params: Vec<GenerationParams> = (0..n)
        .map(|i| {
            let mut p = mixed_params(i, n_gen, 4242);
            p.constraint = match i % 4 {
                1 => Some(Constraint::JsonSchema(
                    r#"{"type":"object","properties":{"k":{"type":"array","items":{"type":"integer"}}},"required":["k"]}"#.into(),
                )),
                3 => Some(Constraint::Grammar(
                    "start: w (\" \" w)*\nw: /[a-z]{1,6}/\n".into(),
                )),
                _ => None,
            };
            p
        })
        .collect();
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

pub fn submit_all(cluster: &Cluster, c: &Case) -> Vec<UnboundedReceiver<WorkerEvent>> {
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
                    CancellationToken::default(),
                )
                .unwrap()
        })
        .collect()
}

pub async fn check(cluster: &Cluster, c: &Case, what: &str) {
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

pub fn tiny() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write(&TinySpec::default(), &path).unwrap();
    (dir, path)
}

/// Reserves blocks for `tokens` on a decode worker (no prefix cache): the KV target a prefill
/// worker is sent.
pub async fn reserve(
    c: &mut protocol::pb::decode_worker_client::DecodeWorkerClient<tonic::transport::Channel>,
    tokens: &[u32],
    fingerprint: u64,
) -> protocol::pb::KvTarget {
    c.reserve(protocol::pb::ReserveRequest {
        request_id: 1,
        tokens: tokens.to_vec(),
        fingerprint,
        use_prefix_cache: false,
    })
    .await
    .unwrap()
    .into_inner()
    .target
    .unwrap()
}

/// A decode worker (16 running sequences) and a prefill worker on the tiny model, with a gRPC
/// client to each: what the internal-plane tests drive call by call.
pub struct Pair {
    pub model: PathBuf,
    pub decode: Node,
    pub prefill: Node,
    pub fe: engine::Frontend,
    pub dc: protocol::pb::decode_worker_client::DecodeWorkerClient<tonic::transport::Channel>,
    pub pc: protocol::pb::prefill_worker_client::PrefillWorkerClient<tonic::transport::Channel>,
    /// Holds the model file (last: dropped after the workers); bind it for as long as the
    /// model is read.
    pub dir: tempfile::TempDir,
}

pub fn pair() -> Pair {
    let (dir, model) = tiny();
    let decode = decode_node(&model, dir.path(), "127.0.0.1:0", 16);
    let prefill = prefill_node(&model);
    Pair {
        fe: frontend_of(&model),
        dc: protocol::pb::decode_worker_client::DecodeWorkerClient::new(channel(&decode.addr)),
        pc: protocol::pb::prefill_worker_client::PrefillWorkerClient::new(channel(&prefill.addr)),
        model,
        decode,
        prefill,
        dir,
    }
}
