//! Every kind of bad input gets OpenAI's error envelope with the right 4xx status, and the
//! server keeps serving.

mod common;

use serde_json::{Value, json};

fn assert_envelope(status: u16, body: &Value, want_status: u16, what: &str) {
    assert_eq!(status, want_status, "{what}: {body}");
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {body}"
    );
    assert!(e["type"].is_string(), "{what}: {body}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{what}: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_is_an_openai_error() {
    let srv = common::tiny().await;
    let chat = format!("{}/v1/chat/completions", srv.url);
    let comp = format!("{}/v1/completions", srv.url);
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let client = reqwest::Client::new();

    // Invalid JSON, missing content type.
    for (body, ctype) in [
        ("{not json", "application/json"),
        ("{\"model\": \"tiny\"", "application/json"),
        ("{}", "text/plain"),
    ] {
        let r = client
            .post(&chat)
            .header("content-type", ctype)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        assert_envelope(status, &v, 400, body);
    }

    let cases: Vec<(&str, &str, Value, u16, Option<&str>)> = vec![
        (
            "wrong type messages",
            "chat",
            json!({"model": "tiny", "messages": "hi"}),
            400,
            None,
        ),
        (
            "wrong type max_tokens",
            "chat",
            json!({"model": "tiny", "messages": msgs, "max_tokens": "ten"}),
            400,
            None,
        ),
        (
            "wrong type temperature",
            "chat",
            json!({"model": "tiny", "messages": msgs, "temperature": "hot"}),
            400,
            None,
        ),
        (
            "missing model",
            "chat",
            json!({"messages": msgs}),
            400,
            None,
        ),
        (
            "unknown model",
            "chat",
            json!({"model": "gpt-9", "messages": msgs}),
            404,
            Some("model"),
        ),
        (
            "too many prompts",
            "comp",
            json!({"model": "tiny", "prompt": vec!["x"; 65]}),
            400,
            Some("prompt"),
        ),
        (
            "too many choices (prompts × n)",
            "comp",
            json!({"model": "tiny", "prompt": vec!["x"; 8], "n": 9}),
            400,
            Some("n"),
        ),
        (
            "a stop string too long",
            "chat",
            json!({"model": "tiny", "messages": msgs, "stop": "y".repeat(257)}),
            400,
            Some("stop"),
        ),
        (
            "too many stop_token_ids",
            "comp",
            json!({"model": "tiny", "prompt": "x", "stop_token_ids": vec![1; 65]}),
            400,
            Some("stop_token_ids"),
        ),
        (
            "unknown model (completions)",
            "comp",
            json!({"model": "gpt-9", "prompt": "x"}),
            404,
            Some("model"),
        ),
        (
            "empty messages",
            "chat",
            json!({"model": "tiny", "messages": []}),
            400,
            Some("messages"),
        ),
        (
            "bad role",
            "chat",
            json!({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}),
            400,
            Some("messages[0].role"),
        ),
        (
            "image part",
            "chat",
            json!({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            400,
            Some("messages[0].content"),
        ),
        (
            "context overflow",
            "chat",
            json!({"model": "tiny", "messages": msgs, "max_tokens": 100000}),
            400,
            Some("messages"),
        ),
        (
            "context overflow (prompt)",
            "comp",
            json!({"model": "tiny", "prompt": "a".repeat(600)}),
            400,
            Some("prompt"),
        ),
        (
            "temperature",
            "chat",
            json!({"model": "tiny", "messages": msgs, "temperature": 3.0}),
            400,
            Some("temperature"),
        ),
        (
            "negative temperature",
            "comp",
            json!({"model": "tiny", "prompt": "x", "temperature": -0.1}),
            400,
            Some("temperature"),
        ),
        (
            "top_p zero",
            "chat",
            json!({"model": "tiny", "messages": msgs, "top_p": 0.0}),
            400,
            Some("top_p"),
        ),
        (
            "top_p above one",
            "chat",
            json!({"model": "tiny", "messages": msgs, "top_p": 1.5}),
            400,
            Some("top_p"),
        ),
        (
            "top_k",
            "comp",
            json!({"model": "tiny", "prompt": "x", "top_k": -5}),
            400,
            Some("top_k"),
        ),
        (
            "min_p",
            "comp",
            json!({"model": "tiny", "prompt": "x", "min_p": 2.0}),
            400,
            Some("min_p"),
        ),
        (
            "frequency_penalty",
            "chat",
            json!({"model": "tiny", "messages": msgs, "frequency_penalty": 5}),
            400,
            Some("frequency_penalty"),
        ),
        (
            "presence_penalty",
            "chat",
            json!({"model": "tiny", "messages": msgs, "presence_penalty": -3}),
            400,
            Some("presence_penalty"),
        ),
        (
            "n zero",
            "chat",
            json!({"model": "tiny", "messages": msgs, "n": 0}),
            400,
            Some("n"),
        ),
        (
            "n huge",
            "comp",
            json!({"model": "tiny", "prompt": "x", "n": 1000}),
            400,
            Some("n"),
        ),
        (
            "logprobs too many",
            "comp",
            json!({"model": "tiny", "prompt": "x", "logprobs": 50}),
            400,
            Some("logprobs"),
        ),
        (
            "top_logprobs without logprobs",
            "chat",
            json!({"model": "tiny", "messages": msgs, "top_logprobs": 2}),
            400,
            Some("top_logprobs"),
        ),
        (
            "chat max_tokens 0",
            "chat",
            json!({"model": "tiny", "messages": msgs, "max_tokens": 0}),
            400,
            Some("max_tokens"),
        ),
        (
            "min_tokens above max",
            "comp",
            json!({"model": "tiny", "prompt": "x", "max_tokens": 2, "min_tokens": 5}),
            400,
            Some("min_tokens"),
        ),
        (
            "empty prompt",
            "comp",
            json!({"model": "tiny", "prompt": ""}),
            400,
            Some("prompt"),
        ),
        (
            "empty prompt list",
            "comp",
            json!({"model": "tiny", "prompt": []}),
            400,
            Some("prompt"),
        ),
        (
            "token out of range",
            "comp",
            json!({"model": "tiny", "prompt": [1, 2, 999999]}),
            400,
            Some("prompt"),
        ),
        (
            "negative token",
            "comp",
            json!({"model": "tiny", "prompt": [1, -2]}),
            400,
            None,
        ),
        (
            "stream_options without stream",
            "comp",
            json!({"model": "tiny", "prompt": "x", "stream_options": {"include_usage": true}}),
            400,
            Some("stream_options"),
        ),
        (
            "suffix",
            "comp",
            json!({"model": "tiny", "prompt": "x", "suffix": "y"}),
            400,
            Some("suffix"),
        ),
        // Output constraints that do not compile, and fields that would change the output but
        // are not implemented: 400s naming the field, before any work.
        (
            "invalid JSON schema",
            "chat",
            json!({"model": "tiny", "messages": msgs, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}}),
            400,
            Some("response_format"),
        ),
        (
            "schema not an object",
            "chat",
            json!({"model": "tiny", "messages": msgs, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}}),
            400,
            Some("response_format"),
        ),
        (
            "unknown response_format type",
            "chat",
            json!({"model": "tiny", "messages": msgs, "response_format": {"type": "yaml"}}),
            400,
            Some("response_format"),
        ),
        (
            "bad regex",
            "completions",
            json!({"model": "tiny", "prompt": "x", "structured_outputs": {"regex": "(a"}}),
            400,
            Some("structured_outputs"),
        ),
        (
            "bad grammar",
            "completions",
            json!({"model": "tiny", "prompt": "x", "structured_outputs": {"grammar": "start: undefined_rule"}}),
            400,
            Some("structured_outputs"),
        ),
        (
            "two structured outputs",
            "completions",
            json!({"model": "tiny", "prompt": "x", "structured_outputs": {"regex": "a", "choice": ["b"]}}),
            400,
            Some("structured_outputs"),
        ),
        (
            "empty choice",
            "completions",
            json!({"model": "tiny", "prompt": "x", "structured_outputs": {"choice": []}}),
            400,
            Some("structured_outputs"),
        ),
        (
            "both response_format and structured_outputs",
            "chat",
            json!({"model": "tiny", "messages": msgs, "response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}),
            400,
            Some("structured_outputs"),
        ),
        (
            "logit_bias out of the vocabulary",
            "chat",
            json!({"model": "tiny", "messages": msgs, "logit_bias": {"99999999": 1}}),
            400,
            Some("logit_bias"),
        ),
        (
            "logit_bias out of range",
            "chat",
            json!({"model": "tiny", "messages": msgs, "logit_bias": {"5": 101}}),
            400,
            Some("logit_bias"),
        ),
        (
            "tool_choice naming no tool",
            "chat",
            json!({"model": "tiny", "messages": msgs, "tools": [{"type": "function", "function": {"name": "f"}}],
                   "tool_choice": {"type": "function", "function": {"name": "g"}}}),
            400,
            Some("tool_choice"),
        ),
        (
            "tool_choice required without tools",
            "chat",
            json!({"model": "tiny", "messages": msgs, "tool_choice": "required"}),
            400,
            Some("tool_choice"),
        ),
        (
            "a forced tool call and a response format",
            "chat",
            json!({"model": "tiny", "messages": msgs, "tools": [{"type": "function", "function": {"name": "f"}}],
                   "tool_choice": "required", "response_format": {"type": "json_object"}}),
            400,
            Some("tool_choice"),
        ),
        (
            "functions (the deprecated form)",
            "chat",
            json!({"model": "tiny", "messages": msgs, "functions": [{"name": "f"}]}),
            400,
            Some("functions"),
        ),
        (
            "prediction",
            "chat",
            json!({"model": "tiny", "messages": msgs, "prediction": {"type": "content", "content": "x"}}),
            400,
            Some("prediction"),
        ),
        (
            "audio modality",
            "chat",
            json!({"model": "tiny", "messages": msgs, "modalities": ["text", "audio"]}),
            400,
            Some("modalities"),
        ),
        (
            "web search",
            "chat",
            json!({"model": "tiny", "messages": msgs, "web_search_options": {}}),
            400,
            Some("web_search_options"),
        ),
    ];
    for (what, ep, body, want, param) in cases {
        let url = if ep == "chat" { &chat } else { &comp };
        let (status, v) = common::post(url, body).await;
        assert_envelope(status, &v, want, what);
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], p, "{what}: {v}");
        }
    }
    let (_, v) = common::post(
        &chat,
        json!({"model": "tiny", "messages": msgs, "max_tokens": 100000}),
    )
    .await;
    assert_eq!(v["error"]["code"], "context_length_exceeded");

    // A prompt far past the context (within the body limit) is refused before it is
    // tokenized, with the context error.
    for (url, body, param) in [
        (
            &comp,
            json!({"model": "tiny", "prompt": "abc ".repeat(200_000)}),
            "prompt",
        ),
        (
            &chat,
            json!({"model": "tiny", "messages": [{"role": "user", "content": "abc ".repeat(200_000)}]}),
            "messages",
        ),
    ] {
        let (status, v) = common::post(url, body).await;
        assert_envelope(status, &v, 400, "a prompt past the context");
        assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
        assert_eq!(v["error"]["param"], param, "{v}");
    }

    // Oversized body.
    let big = json!({"model": "tiny", "prompt": "a ".repeat(1 << 20)});
    let (status, v) = common::post(&comp, big).await;
    assert_envelope(status, &v, 413, "oversized body");

    // Wrong method and unknown route.
    let r = client.get(&chat).send().await.unwrap();
    let status = r.status().as_u16();
    assert_envelope(status, &r.json().await.unwrap(), 405, "GET on a POST route");
    let r = client
        .get(format!("{}/v2/nothing", srv.url))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    assert_envelope(status, &r.json().await.unwrap(), 404, "unknown route");
    let r = client
        .get(format!("{}/v1/models/nope", srv.url))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    assert_envelope(status, &r.json().await.unwrap(), 404, "unknown model card");

    // Still serving.
    let (status, v) = common::post(
        &chat,
        json!({"model": "tiny", "messages": msgs, "max_tokens": 3}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    let r = client
        .get(format!("{}/health", srv.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}
