//! Starts a whole Tandem server (scheduler + prefill + decode workers) in-process on a free
//! port, over a tiny synthetic model written as a real GGUF.
#![allow(dead_code)]

pub mod nodes;

use engine::synthetic::{TinySpec, write};
use engine::{Engine, EngineConfig};
use scheduler::AppState;
use std::sync::Arc;
use tokio::sync::oneshot;

pub struct TestServer {
    pub url: String,
    pub state: AppState,
    /// The colocated worker's engine (its KV pool is what the tests watch).
    pub engine: Arc<Engine>,
    stop: Option<oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

pub struct Options {
    pub spec: TinySpec,
    pub queue: usize,
    pub kv_bytes: usize,
    pub max_body: usize,
    pub precision: engine::Precision,
    pub api_key: Option<String>,
    pub max_connections: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            spec: TinySpec::default(),
            queue: 64,
            kv_bytes: 16 << 20,
            max_body: 1 << 20,
            precision: engine::Precision::default(),
            api_key: None,
            max_connections: scheduler::DEFAULT_MAX_CONNECTIONS,
        }
    }
}

pub async fn start(opts: Options) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write(&opts.spec, &path).unwrap();
    let engine = Arc::new(
        Engine::load(
            &path,
            &EngineConfig {
                kv_budget_bytes: opts.kv_bytes,
                model_id: None,
                precision: opts.precision,
                kv_dtype: Default::default(),
                kv_shared_path: None,
                device: Default::default(),
            },
        )
        .unwrap(),
    );
    let cluster = Arc::new(decode_worker::colocated::cluster(
        engine.clone(),
        decode_worker::WorkerConfig {
            max_waiting: opts.queue,
            ..Default::default()
        },
    ));
    let state = AppState::new(cluster).with_api_key(opts.api_key.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = oneshot::channel();
    let st = state.clone();
    tokio::spawn(async move {
        scheduler::serve(listener, st, opts.max_body, opts.max_connections, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    TestServer {
        url,
        state,
        engine,
        stop: Some(tx),
        _dir: dir,
    }
}

pub async fn tiny() -> TestServer {
    start(Options::default()).await
}

/// POSTs JSON and returns (status, body as JSON).
pub async fn post(url: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

/// POSTs a streaming request and returns the `data:` payloads in order.
pub async fn post_sse(url: &str, body: serde_json::Value) -> Vec<String> {
    let r = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let text = r.text().await.unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}
