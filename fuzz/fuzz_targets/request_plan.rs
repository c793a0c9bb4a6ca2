//! HTTP request bodies from arbitrary bytes through the whole API path: JSON parsing,
//! validation, chat templating, tokenizing, planning, and — for what passes — generation on a
//! tiny synthetic model (colocated worker). The first byte picks the route. The answer must be
//! a well-formed response: never a 5xx other than 503, never a panic or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};
use tower::ServiceExt;

struct App {
    rt: tokio::runtime::Runtime,
    router: axum::Router,
    _dir: std::path::PathBuf,
}

fn app() -> &'static App {
    static A: OnceLock<App> = OnceLock::new();
    A.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("tandem-fuzz-plan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tiny.gguf");
        engine::synthetic::write(&engine::synthetic::TinySpec::default(), &path).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let router = rt.block_on(async {
            let engine = Arc::new(
                engine::Engine::load(
                    &path,
                    &engine::EngineConfig {
                        kv_budget_bytes: 8 << 20,
                        model_id: Some("tiny".into()),
                        precision: Default::default(),
                        kv_dtype: Default::default(),
                        kv_shared_path: None,
                        device: Default::default(),
                    },
                )
                .unwrap(),
            );
            let cluster = Arc::new(decode_worker::colocated::cluster(
                engine,
                decode_worker::WorkerConfig::default(),
            ));
            scheduler::router(scheduler::AppState::new(cluster), 1 << 20)
        });
        App {
            rt,
            router,
            _dir: dir,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&route, body)) = data.split_first() else {
        return;
    };
    let a = app();
    let uri = if route & 1 == 0 {
        "/v1/completions"
    } else {
        "/v1/chat/completions"
    };
    let req = axum::http::Request::post(uri)
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body.to_vec()))
        .unwrap();
    a.rt.block_on(async {
        let run = async {
            let resp = a.router.clone().oneshot(req).await.unwrap();
            let status = resp.status();
            let _ = axum::body::to_bytes(resp.into_body(), 64 << 20).await;
            status
        };
        let status = tokio::time::timeout(std::time::Duration::from_secs(60), run)
            .await
            .expect("the request hung");
        assert!(
            !status.is_server_error() || status.as_u16() == 503,
            "status {status} for {:?}",
            String::from_utf8_lossy(body)
        );
    });
});
