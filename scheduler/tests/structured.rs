//! Structured outputs through the HTTP API on a tiny synthetic model: `response_format`
//! (`json_object`, `json_schema`) and `structured_outputs` (`regex`, `choice`, `grammar`) on
//! both endpoints, streamed and not, greedy and seeded; `logit_bias`; fields that change
//! nothing generated are accepted.

mod common;

use serde_json::{Value, json};

fn content(v: &Value) -> String {
    let c = &v["choices"][0];
    c["message"]["content"]
        .as_str()
        .or(c["text"].as_str())
        .unwrap_or_else(|| panic!("{v}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_match_their_constraints_on_both_endpoints() {
    let srv = common::tiny().await;
    let chat = format!("{}/v1/chat/completions", srv.url);
    let comp = format!("{}/v1/completions", srv.url);
    let msgs = json!([{"role": "user", "content": "give me data"}]);
    let schema = json!({"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 500},
        "ok": {"type": "boolean"},
        "kind": {"enum": ["cat", "dog"]}},
        "required": ["id", "ok", "kind"], "additionalProperties": false});
    for seed in [None, Some(7), Some(8)] {
        let temp = if seed.is_some() { 1.0 } else { 0.0 };
        let (s, v) = common::post(
            &chat,
            json!({"model": "tiny", "messages": msgs, "max_tokens": 64, "temperature": temp, "seed": seed,
                   "response_format": {"type": "json_schema", "json_schema": {"name": "rec", "strict": true, "schema": schema}}}),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        let out: Value = serde_json::from_str(&content(&v)).unwrap_or_else(|e| panic!("{e}: {v}"));
        let id = out["id"].as_i64().unwrap();
        assert!((1..=500).contains(&id) && out["ok"].is_boolean(), "{out}");
        assert!(
            ["cat", "dog"].contains(&out["kind"].as_str().unwrap()),
            "{out}"
        );
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");

        let (s, v) = common::post(
            &chat,
            json!({"model": "tiny", "messages": msgs, "max_tokens": 48, "temperature": temp, "seed": seed,
                   "response_format": {"type": "json_object"}}),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        let text = content(&v);
        assert!(text.starts_with('{'), "{text}");
        if v["choices"][0]["finish_reason"] == "stop" {
            assert!(serde_json::from_str::<Value>(&text).unwrap().is_object());
        }

        let (s, v) = common::post(
            &comp,
            json!({"model": "tiny", "prompt": "pick:", "max_tokens": 16, "temperature": temp, "seed": seed,
                   "structured_outputs": {"choice": ["alpha", "beta", "gamma delta"]}}),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        assert!(
            ["alpha", "beta", "gamma delta"].contains(&content(&v).as_str()),
            "{v}"
        );

        let (s, v) = common::post(
            &comp,
            json!({"model": "tiny", "prompt": "code:", "max_tokens": 16, "temperature": temp, "seed": seed,
                   "structured_outputs": {"regex": "[A-Z]{2}-[0-9]{3}"}}),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        let t = content(&v);
        let b = t.as_bytes();
        assert!(
            b.len() == 6
                && b[..2].iter().all(u8::is_ascii_uppercase)
                && b[2] == b'-'
                && b[3..].iter().all(u8::is_ascii_digit),
            "{t}"
        );

        let (s, v) = common::post(
            &chat,
            json!({"model": "tiny", "messages": msgs, "max_tokens": 32, "temperature": temp, "seed": seed,
                   "structured_outputs": {"grammar": "start: \"go \" d (\"+\" d)*\nd: /[0-9]/\n"}}),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        let t = content(&v);
        let rest = t.strip_prefix("go ").unwrap_or_else(|| panic!("{t}"));
        if v["choices"][0]["finish_reason"] == "stop" {
            assert!(
                rest.split('+')
                    .all(|d| d.len() == 1 && d.as_bytes()[0].is_ascii_digit()),
                "{t}"
            );
        }
    }

    // Streamed: the deltas join to a valid object.
    let lines = common::post_sse(
        &chat,
        json!({"model": "tiny", "messages": msgs, "max_tokens": 64, "stream": true, "seed": 3,
               "response_format": {"type": "json_schema", "json_schema": {"name": "rec", "schema": schema}}}),
    )
    .await;
    let mut text = String::new();
    for l in &lines {
        if let Ok(v) = serde_json::from_str::<Value>(l)
            && let Some(d) = v["choices"][0]["delta"]["content"].as_str()
        {
            text.push_str(d);
        }
    }
    let out: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert!(out["id"].is_i64(), "{out}");

    // Fields that change nothing generated are accepted; so are tools with tool_choice none.
    let (s, v) = common::post(
        &chat,
        json!({"model": "tiny", "messages": msgs, "max_tokens": 4, "user": "u1", "store": false,
               "metadata": {"a": "b"}, "service_tier": "auto", "modalities": ["text"],
               "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logit_bias_steers_greedy_decoding() {
    let srv = common::tiny().await;
    let comp = format!("{}/v1/completions", srv.url);
    let base = json!({"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 5, "temperature": 0,
                      "logprobs": 0});
    let (_, free) = common::post(&comp, base.clone()).await;
    let mut biased = base.clone();
    // Token 113 is the byte 'q' in the synthetic vocabulary's byte range.
    biased["logit_bias"] = json!({"113": 100});
    let (s, v) = common::post(&comp, biased).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(content(&v), "qqqqq", "{v}");
    assert_ne!(content(&free), "qqqqq");
}
