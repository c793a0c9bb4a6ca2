//! Structured outputs through the HTTP API on a tiny synthetic model: `response_format`
//! (`json_object`, `json_schema`) and `structured_outputs` (`regex`, `choice`, `grammar`) on
//! both endpoints, streamed and not, greedy and seeded; tool calls (`required`, named, `auto`,
//! streamed, a full round trip); `logit_bias`; fields that change nothing generated are
//! accepted.

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

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
         "parameters": {"type": "object", "properties": {
             "city": {"type": "string", "maxLength": 12},
             "unit": {"enum": ["celsius", "fahrenheit"]}},
             "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
             "a": {"type": "integer", "minimum": 0, "maximum": 99},
             "b": {"type": "integer", "minimum": 0, "maximum": 99}},
             "required": ["a", "b"], "additionalProperties": false}}}
    ])
}

fn check_call(call: &Value) {
    assert!(call["id"].as_str().unwrap().starts_with("call_"), "{call}");
    assert_eq!(call["type"], "function");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    match call["function"]["name"].as_str().unwrap() {
        "get_weather" => {
            assert!(args["city"].as_str().unwrap().len() <= 12, "{args}");
            assert!(["celsius", "fahrenheit"].contains(&args["unit"].as_str().unwrap()));
        }
        "add" => assert!(args["a"].as_i64().unwrap() <= 99 && args["b"].as_i64().unwrap() <= 99),
        other => panic!("called {other}"),
    }
}

/// Rebuilds streamed tool calls from their deltas as OpenAI's clients do, checking each
/// delta's shape: a call's first delta has its index, id, type and name with empty
/// arguments, the next ones only argument fragments for that index.
fn assemble(deltas: &[Value]) -> Vec<Value> {
    let mut calls: Vec<Value> = Vec::new();
    for d in deltas {
        let i = d["index"].as_u64().unwrap() as usize;
        if d.get("id").is_some() {
            assert_eq!(i, calls.len(), "{d}");
            assert_eq!(d["type"], "function", "{d}");
            assert!(d["function"]["name"].is_string(), "{d}");
            calls.push(d.clone());
        } else {
            assert_eq!(i + 1, calls.len(), "fragments continue the last call: {d}");
            assert!(
                d.get("type").is_none() && d["function"].get("name").is_none(),
                "{d}"
            );
            let more = d["function"]["arguments"].as_str().unwrap();
            let args = calls[i]["function"]["arguments"]
                .as_str()
                .unwrap()
                .to_string()
                + more;
            calls[i]["function"]["arguments"] = json!(args);
        }
    }
    calls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_are_valid_when_required_or_named_and_round_trip() {
    tool_calls_with_template(None).await;
}

/// A model whose template has tool syntax of its own (Qwen2.5's) renders the tools, the calls
/// and the results itself; calls are enforced and parsed as with the default convention.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_through_a_template_with_tool_syntax() {
    let qwen = include_str!("../../frontend/testdata/qwen2.5-tools.jinja");
    tool_calls_with_template(Some(qwen.to_string())).await;
}

async fn tool_calls_with_template(chat_template: Option<String>) {
    // The tools' description alone outgrows the default 512-position context.
    let srv = common::start(common::Options {
        spec: engine::synthetic::TinySpec {
            n_ctx: 4096,
            chat_template,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let chat = format!("{}/v1/chat/completions", srv.url);
    let msgs = json!([{"role": "user", "content": "weather in Paris?"}]);
    for (choice, seed) in [
        (json!("required"), 1),
        (json!("required"), 2),
        (json!({"type": "function", "function": {"name": "add"}}), 3),
    ] {
        let (s, v) = common::post(
            &chat,
            json!({"model": "tiny", "messages": msgs, "tools": weather_tools(), "tool_choice": choice,
                   "max_tokens": 200, "temperature": 1.0, "seed": seed}),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        let c = &v["choices"][0];
        assert_eq!(c["finish_reason"], "tool_calls", "{v}");
        assert!(c["message"]["content"].is_null(), "{v}");
        let calls = c["message"]["tool_calls"].as_array().unwrap();
        assert!(!calls.is_empty());
        for call in calls {
            check_call(call);
            if choice.is_object() {
                assert_eq!(call["function"]["name"], "add");
            }
        }
    }
    // Streamed: content stays empty, the call arrives in deltas (its index, id and name, then
    // argument fragments) that add up to what the same request gets unstreamed.
    let req = json!({"model": "tiny", "messages": msgs, "tools": weather_tools(), "tool_choice": "required",
               "parallel_tool_calls": false, "max_tokens": 200, "seed": 5});
    let (s, whole) = common::post(&chat, req.clone()).await;
    assert_eq!(s, 200, "{whole}");
    let mut streamed = req.clone();
    streamed["stream"] = json!(true);
    let lines = common::post_sse(&chat, streamed).await;
    let (mut deltas, mut finish, mut text) = (Vec::new(), None, String::new());
    for l in &lines {
        let Ok(v) = serde_json::from_str::<Value>(l) else {
            continue;
        };
        let c = &v["choices"][0];
        text.push_str(c["delta"]["content"].as_str().unwrap_or(""));
        if let Some(t) = c["delta"]["tool_calls"].as_array() {
            deltas.extend(t.iter().cloned());
        }
        if let Some(f) = c["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
    }
    assert_eq!(finish.as_deref(), Some("tool_calls"), "{lines:?}");
    assert!(
        deltas.len() >= 2,
        "a head and argument fragments: {deltas:?}"
    );
    let calls = assemble(&deltas);
    assert_eq!(calls.len(), 1, "parallel_tool_calls false: one call");
    check_call(&calls[0]);
    let want = &whole["choices"][0]["message"]["tool_calls"][0]["function"];
    assert_eq!(calls[0]["function"], *want, "streamed = not streamed");
    assert!(text.trim().is_empty(), "{text:?}");

    // The round trip: the call in an assistant message (content null), its result as a tool
    // message, and an answer.
    let call = &calls[0];
    let (s, v) = common::post(
        &chat,
        json!({"model": "tiny", "tools": weather_tools(), "max_tokens": 8, "messages": [
            {"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "{\"temp\": 21}"}
        ]}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert!(v["choices"][0]["message"].is_object());

    // auto: the model chooses (the tiny model writes text, no call).
    let (s, v) = common::post(
        &chat,
        json!({"model": "tiny", "messages": msgs, "tools": weather_tools(), "max_tokens": 8, "seed": 1}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
}
