//! `--api-key`: the API routes want `Authorization: Bearer KEY` and answer OpenAI's 401
//! (`invalid_api_key`) without it; probes and scrapers (`/health`, `/metrics`) stay open.

mod common;

use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_routes_want_the_key_and_probes_do_not() {
    let srv = common::start(common::Options {
        api_key: Some("sk-tandem-test".into()),
        ..Default::default()
    })
    .await;
    let client = reqwest::Client::new();
    let body = json!({"model": "tiny", "prompt": "the", "max_tokens": 2});
    for auth in [
        None,
        Some("Bearer sk-wrong"),
        Some("sk-tandem-test"),
        Some("Bearer "),
    ] {
        for (method, path) in [
            ("GET", "/v1/models"),
            ("POST", "/v1/completions"),
            ("POST", "/tokenize"),
            ("POST", "/detokenize"),
        ] {
            let mut r = client.request(method.parse().unwrap(), format!("{}{path}", srv.url));
            if method == "POST" {
                r = r.json(&body);
            }
            if let Some(a) = auth {
                r = r.header("Authorization", a);
            }
            let resp = r.send().await.unwrap();
            assert_eq!(resp.status(), 401, "{path} with {auth:?}");
            let e: serde_json::Value = resp.json().await.unwrap();
            assert_eq!(e["error"]["code"], "invalid_api_key", "{e}");
            assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
        }
    }
    for path in ["/health", "/metrics"] {
        let s = client
            .get(format!("{}{path}", srv.url))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(s, 200, "{path}");
    }
    let ok = client
        .post(format!("{}/v1/completions", srv.url))
        .bearer_auth("sk-tandem-test")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let models = client
        .get(format!("{}/v1/models", srv.url))
        .bearer_auth("sk-tandem-test")
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 200);
}
