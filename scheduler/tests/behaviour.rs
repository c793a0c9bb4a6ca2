//! What a vLLM user expects beyond the happy path: stop strings, seeds and batch invariance,
//! `n`, logprobs and echo scoring, cancellation on disconnect, overload answers, metrics.

mod common;

use serde_json::{Value, json};
use std::time::{Duration, Instant};

fn text_of(v: &Value) -> String {
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_cut_the_text_and_never_split_across_chunks() {
    let srv = common::tiny().await;
    let url = format!("{}/v1/completions", srv.url);
    let base = json!({"model": "tiny", "prompt": "the theory", "max_tokens": 40, "temperature": 0});
    let (_, v) = common::post(&url, base.clone()).await;
    let full = text_of(&v);
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 12, "{full:?}");
    // A stop string from the middle of the text.
    let stop: String = chars[8..11].iter().collect();
    let want = &full[..full.find(&stop).unwrap()];
    let mut req = base.clone();
    req["stop"] = json!([stop.clone(), "\u{1}never"]);
    let (_, v) = common::post(&url, req.clone()).await;
    assert_eq!(text_of(&v), want);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    req["stream"] = json!(true);
    let events = common::post_sse(&url, req).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let mut streamed = String::new();
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).unwrap();
        let t = c["choices"][0]["text"].as_str().unwrap();
        assert!(!t.contains(&stop));
        streamed.push_str(t);
    }
    assert_eq!(streamed, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_sampling_is_reproducible_alone_in_a_crowd_and_across_n() {
    let srv = common::tiny().await;
    let url = format!("{}/v1/completions", srv.url);
    let req = |seed: u64, n: u32| json!({"model": "tiny", "prompt": "in the", "max_tokens": 24, "temperature": 1.0, "top_p": 0.9, "seed": seed, "n": n, "logprobs": 2});
    let (_, alone) = common::post(&url, req(11, 1)).await;
    // The same request 12 times at once (they share decode batches), plus unrelated traffic.
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let url = url.clone();
        let body = if i % 4 == 3 {
            req(1000 + i, 1)
        } else {
            req(11, 1)
        };
        tasks.push(tokio::spawn(async move {
            (i, common::post(&url, body).await.1)
        }));
    }
    for t in tasks {
        let (i, v) = t.await.unwrap();
        if i % 4 != 3 {
            assert_eq!(v["choices"][0]["text"], alone["choices"][0]["text"]);
            assert_eq!(
                v["choices"][0]["logprobs"], alone["choices"][0]["logprobs"],
                "logprobs are bit-identical too"
            );
        }
    }
    // n = 3 gives the choices seeds 11, 12, 13 would give alone.
    let (_, three) = common::post(&url, req(11, 3)).await;
    assert_eq!(three["choices"].as_array().unwrap().len(), 3);
    for i in 0..3 {
        let (_, one) = common::post(&url, req(11 + i as u64, 1)).await;
        assert_eq!(three["choices"][i]["text"], one["choices"][0]["text"]);
        assert_eq!(three["choices"][i]["index"], i);
    }
    // A different seed gives a different text (24 sampled tokens at T=1 over 264 tokens).
    let (_, other) = common::post(&url, req(12345, 1)).await;
    assert_ne!(other["choices"][0]["text"], alone["choices"][0]["text"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_with_max_tokens_zero_scores_the_prompt() {
    let srv = common::tiny().await;
    let url = format!("{}/v1/completions", srv.url);
    let (status, v) = common::post(&url, json!({"model": "tiny", "prompt": "the other theory", "max_tokens": 0, "echo": true, "logprobs": 1})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(text_of(&v), "the other theory");
    let lp = &v["choices"][0]["logprobs"];
    let n = lp["tokens"].as_array().unwrap().len();
    assert_eq!(n, v["usage"]["prompt_tokens"].as_u64().unwrap() as usize);
    assert_eq!(v["usage"]["completion_tokens"], 0);
    assert!(lp["token_logprobs"][0].is_null());
    for i in 1..n {
        let x = lp["token_logprobs"][i].as_f64().unwrap();
        assert!(x <= 0.0 && x.is_finite());
        assert_eq!(lp["top_logprobs"][i].as_object().unwrap().len(), 1);
    }
    let joined: String = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(joined, "the other theory");
    assert_eq!(
        lp["text_offset"][1].as_u64().unwrap() as usize,
        lp["tokens"][0].as_str().unwrap().len()
    );
    // The same scoring from token ids gives the same numbers.
    let ids: Vec<u32> = srv
        .state
        .cluster
        .frontend()
        .tokenizer
        .encode("the other theory", true)
        .unwrap();
    let (_, v2) = common::post(
        &url,
        json!({"model": "tiny", "prompt": ids, "max_tokens": 0, "echo": true, "logprobs": 1}),
    )
    .await;
    assert_eq!(v2["choices"][0]["logprobs"], v["choices"][0]["logprobs"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_logprobs_and_usage_chunk() {
    let srv = common::tiny().await;
    let url = format!("{}/v1/chat/completions", srv.url);
    let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "the"}], "max_tokens": 5, "logprobs": true, "top_logprobs": 3, "ignore_eos": true});
    let (_, v) = common::post(&url, body.clone()).await;
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 5);
    for c in content {
        let tops = c["top_logprobs"].as_array().unwrap();
        assert_eq!(tops.len(), 3);
        assert!(tops[0]["logprob"].as_f64() >= tops[1]["logprob"].as_f64());
        assert!(c["logprob"].as_f64().unwrap() <= tops[0]["logprob"].as_f64().unwrap() + 1e-6);
    }
    let mut s = body;
    s["stream"] = json!(true);
    s["stream_options"] = json!({"include_usage": true});
    let events = common::post_sse(&url, s).await;
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["choices"].as_array().unwrap().len(), 0);
    assert_eq!(usage["usage"]["completion_tokens"], 5);
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert!(first["usage"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_frees_its_kv_blocks() {
    let spec = engine::synthetic::TinySpec {
        n_ctx: 4096,
        ..Default::default()
    };
    let srv = common::start(common::Options {
        spec,
        kv_bytes: 64 << 20,
        ..Default::default()
    })
    .await;
    let engine = srv.engine.clone();
    let total = engine.kv.n_blocks();
    let url = format!("{}/v1/completions", srv.url);
    let body = |stream: bool| json!({"model": "tiny", "prompt": "the", "max_tokens": 3000, "ignore_eos": true, "stream": stream});
    // How long the whole generation takes when nobody leaves.
    let t0 = Instant::now();
    let (status, _) = common::post(&url, body(false)).await;
    assert_eq!(status, 200);
    let full = t0.elapsed();
    for stream in [true, false] {
        let url2 = url.clone();
        let client = tokio::spawn(async move {
            let mut r = reqwest::Client::new()
                .post(&url2)
                .json(&body(stream))
                .send()
                .await
                .unwrap();
            while let Ok(Some(_)) = r.chunk().await {}
        });
        // Leave once the sequence is running on the workers (well before it could finish).
        let t1 = Instant::now();
        while engine.kv.free_blocks() == total {
            assert!(t1.elapsed() < full, "the request never started");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        client.abort();
        let _ = client.await;
        let left = Instant::now();
        while engine.kv.free_blocks() != total {
            assert!(
                left.elapsed() < full / 2,
                "blocks not freed after disconnect (stream={stream}); a full run takes {full:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_answers_503_with_retry_after_and_loses_nothing() {
    // A KV budget for only a few sequences of this size.
    let srv = common::start(common::Options {
        kv_bytes: 48 * 2 * 2 * 16 * 32 * 4 * 6,
        queue: 4,
        ..Default::default()
    })
    .await;
    let url = format!("{}/v1/completions", srv.url);
    let mut tasks = Vec::new();
    for i in 0..24 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let body = json!({"model": "tiny", "prompt": "the theory ".repeat(6), "max_tokens": 40, "ignore_eos": true, "seed": i});
            let r = reqwest::Client::new().post(&url).json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            let retry = r.headers().get("retry-after").map(|h| h.to_str().unwrap().to_string());
            (status, retry, r.json::<Value>().await.unwrap())
        }));
    }
    let (mut ok, mut busy) = (0, 0);
    for t in tasks {
        let (status, retry, v) = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("no request hangs")
            .unwrap();
        match status {
            200 => {
                assert_eq!(v["usage"]["completion_tokens"], 40, "complete response");
                ok += 1;
            }
            503 => {
                assert!(retry.is_some());
                assert_eq!(v["error"]["code"], "overloaded");
                busy += 1;
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert!(ok > 0 && busy > 0, "ok {ok}, 503 {busy}");
    let engine = &srv.engine;
    let t0 = Instant::now();
    while engine.kv.free_blocks() != engine.kv.n_blocks() {
        assert!(t0.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_latencies_and_tokens() {
    let srv = common::tiny().await;
    let (s, _) = common::post(&format!("{}/v1/chat/completions", srv.url), json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "ignore_eos": true})).await;
    assert_eq!(s, 200);
    let (s, _) = common::post(
        &format!("{}/v1/chat/completions", srv.url),
        json!({"model": "nope", "messages": []}),
    )
    .await;
    assert_eq!(s, 404);
    let m = reqwest::get(format!("{}/metrics", srv.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "tandem_requests_total{endpoint=\"chat\",status=\"200\"}",
        "tandem_requests_total{endpoint=\"chat\",status=\"404\"}",
        "tandem_time_to_first_token_seconds_bucket",
        "tandem_time_per_output_token_seconds_bucket",
        "tandem_prompt_tokens_total",
        "tandem_generation_tokens_total",
        "tandem_prefill_queue_depth",
        "tandem_decode_running_sequences",
        "tandem_kv_blocks_free",
    ] {
        assert!(m.contains(needle), "{needle} missing from:\n{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_system_prompt_is_served_from_the_prefix_cache() {
    let srv = common::tiny().await;
    let url = format!("{}/v1/chat/completions", srv.url);
    let system = "the other theory ".repeat(20);
    let body = |q: &str| json!({"model": "tiny", "messages": [{"role": "system", "content": system}, {"role": "user", "content": q}], "max_tokens": 8, "seed": 4});
    let (_, first) = common::post(&url, body("in the")).await;
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let (_, second) = common::post(&url, body("in the")).await;
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    let prompt = second["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        cached >= prompt - 16 && cached < prompt,
        "cached {cached} of {prompt}"
    );
    assert_eq!(
        second["choices"][0]["message"], first["choices"][0]["message"],
        "same tokens with or without a hit"
    );
    let m = reqwest::get(format!("{}/metrics", srv.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("tandem_prefix_cache_hit_tokens_total"));
}

/// `/tokenize` and `/detokenize` in vLLM's shape: a prompt or chat messages to ids (the same
/// ids the completions endpoint counts), and back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_and_detokenize_round_trip() {
    let srv = common::tiny().await;
    let (s, v) = common::post(
        &format!("{}/tokenize", srv.url),
        json!({"model": "tiny", "prompt": "hello there", "return_token_strs": true}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let ids: Vec<u64> = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    assert_eq!(v["count"], ids.len());
    assert!(v["max_model_len"].as_u64().unwrap() > 0);
    assert_eq!(
        v["token_strs"].as_array().unwrap().concat_strs(),
        "hello there"
    );
    let (s, back) = common::post(&format!("{}/detokenize", srv.url), json!({"tokens": ids})).await;
    assert_eq!(s, 200, "{back}");
    assert_eq!(back["prompt"], "hello there");
    // The completions endpoint counts the same tokens.
    let (_, c) = common::post(
        &format!("{}/v1/completions", srv.url),
        json!({"model": "tiny", "prompt": "hello there", "max_tokens": 1}),
    )
    .await;
    assert_eq!(c["usage"]["prompt_tokens"], v["count"], "{c}");
    // Chat messages go through the template, as the chat endpoint does.
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let (_, t) = common::post(&format!("{}/tokenize", srv.url), json!({"messages": msgs})).await;
    let (_, c) = common::post(
        &format!("{}/v1/chat/completions", srv.url),
        json!({"model": "tiny", "messages": msgs, "max_tokens": 1}),
    )
    .await;
    assert_eq!(c["usage"]["prompt_tokens"], t["count"], "{t} {c}");
    // Bad input: both or neither of prompt and messages, an id outside the vocabulary, another
    // model.
    for (path, body, param) in [
        (
            "/tokenize",
            json!({"prompt": "a", "messages": msgs}),
            "prompt",
        ),
        ("/tokenize", json!({}), "prompt"),
        ("/detokenize", json!({"tokens": [1, 99999999]}), "tokens"),
        (
            "/detokenize",
            json!({"model": "gpt-9", "tokens": [1]}),
            "model",
        ),
    ] {
        let (s, v) = common::post(&format!("{}{path}", srv.url), body).await;
        assert!(s == 400 || s == 404, "{path}: {v}");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
}

trait ConcatStrs {
    fn concat_strs(&self) -> String;
}

impl ConcatStrs for Vec<serde_json::Value> {
    fn concat_strs(&self) -> String {
        self.iter().map(|s| s.as_str().unwrap()).collect()
    }
}
