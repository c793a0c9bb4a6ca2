//! One trace across the processes of `tandem up --otlp-endpoint`: an OTLP receiver started
//! here (the OTLP trace service over tonic) collects what the scheduler, the prefill worker and
//! the decode worker export. A streamed chat request carrying a client's `traceparent` and an
//! `x-request-id` gives one trace: the scheduler's `http.request` under the client's span,
//! `queue` and `route` under it, the prefill worker's `prefill` (and its `kv.transfer`) and the
//! decode worker's `decode` under `route`; every span names the request id; the spans' times
//! nest and fit inside what the client measured.

mod common;

use common::{Proc, free_port, model};
use futures::StreamExt;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use serde_json::json;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Spans received, with their service's name.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<(String, Span)>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| string(&r.attributes, "service.name"))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push((service.clone(), s));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Any> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn string(attrs: &[KeyValue], key: &str) -> Option<String> {
    match attr(attrs, key)? {
        Any::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn int(attrs: &[KeyValue], key: &str) -> Option<i64> {
    match attr(attrs, key)? {
        Any::IntValue(i) => Some(*i),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_across_scheduler_prefill_and_decode() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = format!("http://{}", listener.local_addr().unwrap());
    let r = receiver.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(r))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });

    let port = free_port();
    let up = Proc(
        Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(["up", "--port", &port.to_string(), "--model", &model()])
            .args(["--kv-cache-mib", "64", "--served-model-name", "m"])
            .args(["--disagg-min-tokens", "8", "--otlp-endpoint", &otlp])
            // Export each batch of spans within 100 ms (the SDK's variable).
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .env_remove("OTEL_SERVICE_NAME")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(120);
    // Ready: every worker (the prefill worker too) answers.
    let ready = || async {
        let Ok(r) = reqwest::get(format!("{url}/health")).await else {
            return false;
        };
        let v: serde_json::Value = r.json().await.unwrap_or_default();
        v["workers"]
            .as_array()
            .is_some_and(|w| w.len() == 2 && w.iter().all(|w| w["healthy"] == true))
    };
    while !ready().await {
        assert!(Instant::now() < deadline, "tandem up never became healthy");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let sent = Instant::now();
    let resp = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .header("traceparent", format!("00-{trace_id}-{client_span}-01"))
        .header("x-request-id", "trace-test-1")
        .json(
            &json!({"model": "m", "max_tokens": 12, "seed": 7, "stream": true,
            "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "Tell me about lighthouses and the sea."}]}),
        )
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    assert_eq!(
        resp.headers().get("x-request-id").unwrap(),
        "trace-test-1",
        "the request id is echoed"
    );
    let mut body = String::new();
    let mut chunks = resp.bytes_stream();
    while let Some(c) = chunks.next().await {
        body.push_str(&String::from_utf8_lossy(&c.unwrap()));
    }
    let client_ns = sent.elapsed().as_nanos() as u64;
    let completion_tokens: i64 = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v["usage"]["completion_tokens"].as_i64())
        .expect("usage in the stream");

    // Wait for the six spans of this trace to arrive.
    let want = [
        "http.request",
        "queue",
        "route",
        "prefill",
        "kv.transfer",
        "decode",
    ];
    let tid = (0..16)
        .map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).unwrap())
        .collect::<Vec<u8>>();
    let deadline = Instant::now() + Duration::from_secs(30);
    let spans = loop {
        let spans: Vec<(String, Span)> = receiver
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| s.trace_id == tid)
            .cloned()
            .collect();
        if want.iter().all(|w| spans.iter().any(|(_, s)| s.name == *w)) {
            break spans;
        }
        let names: Vec<&str> = spans.iter().map(|(_, s)| s.name.as_str()).collect();
        assert!(
            Instant::now() < deadline,
            "spans of the trace so far: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    drop(up);

    let one = |name: &str| -> (String, Span) {
        let found: Vec<_> = spans.iter().filter(|(_, s)| s.name == name).collect();
        assert_eq!(found.len(), 1, "{name}: {found:?}");
        found[0].clone()
    };
    let (http_svc, http) = one("http.request");
    let (_, queue) = one("queue");
    let (_, route) = one("route");
    let (pre_svc, prefill) = one("prefill");
    let (_, transfer) = one("kv.transfer");
    let (dec_svc, decode) = one("decode");
    assert_eq!(http_svc, "tandem-scheduler");
    assert_eq!(pre_svc, "tandem-prefill");
    assert_eq!(dec_svc, "tandem-decode");

    // Parents: the client's span, then down the tree.
    let client = (0..8)
        .map(|i| u8::from_str_radix(&client_span[2 * i..2 * i + 2], 16).unwrap())
        .collect::<Vec<u8>>();
    assert_eq!(
        http.parent_span_id, client,
        "http.request continues the client's span"
    );
    assert_eq!(queue.parent_span_id, http.span_id);
    assert_eq!(route.parent_span_id, http.span_id);
    assert_eq!(prefill.parent_span_id, route.span_id, "across processes");
    assert_eq!(transfer.parent_span_id, prefill.span_id);
    assert_eq!(decode.parent_span_id, route.span_id, "across processes");

    // The request id on every span.
    for (_, s) in &spans {
        assert_eq!(
            string(&s.attributes, "x_request_id").as_deref(),
            Some("trace-test-1"),
            "{}",
            s.name
        );
    }
    assert_eq!(
        string(&http.attributes, "http.route").as_deref(),
        Some("/v1/chat/completions")
    );
    assert_eq!(
        int(&http.attributes, "http.response.status_code"),
        Some(200),
        "{:?}",
        http.attributes
    );
    assert_eq!(
        string(&http.attributes, "gen_ai.request.model").as_deref(),
        Some("m")
    );
    assert_eq!(
        string(&route.attributes, "tandem.prefill.placement").as_deref(),
        Some("prefill worker")
    );
    assert!(int(&prefill.attributes, "gen_ai.usage.input_tokens").unwrap() > 8);
    assert!(int(&transfer.attributes, "tandem.kv.bytes").unwrap() > 0);
    assert_eq!(
        int(&decode.attributes, "gen_ai.usage.output_tokens"),
        Some(completion_tokens - 1),
        "the decode worker streams every token but the prefill worker's first"
    );

    // Times: one host, one clock. Each span within its parent (1 ms of slack for clock
    // reads in different processes), the request's within what the client measured.
    let within = |inner: &Span, outer: &Span| {
        let slack = 1_000_000;
        assert!(
            inner.start_time_unix_nano + slack >= outer.start_time_unix_nano
                && inner.end_time_unix_nano <= outer.end_time_unix_nano + slack,
            "{} [{}, {}] not within {} [{}, {}]",
            inner.name,
            inner.start_time_unix_nano,
            inner.end_time_unix_nano,
            outer.name,
            outer.start_time_unix_nano,
            outer.end_time_unix_nano
        );
    };
    within(&queue, &http);
    within(&route, &http);
    within(&prefill, &route);
    within(&transfer, &prefill);
    within(&decode, &route);
    let http_ns = http.end_time_unix_nano - http.start_time_unix_nano;
    assert!(
        http_ns <= client_ns,
        "http.request {http_ns} ns > the client's {client_ns} ns"
    );
    // The stream is most of the request: the span lasted to its end, not to its headers.
    let decode_ns = decode.end_time_unix_nano - decode.start_time_unix_nano;
    assert!(http_ns >= decode_ns);
}
