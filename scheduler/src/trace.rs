//! Each HTTP request's span, `http.request`: it continues the client's `traceparent` (or
//! starts a trace), carries the request's `x-request-id` (the client's, or a new one, echoed
//! in the response), and stays open until the response's last byte — a stream's too. The
//! driver's spans (`queue`, `route`) and the workers' (`prefill`, `kv.transfer`, `decode`)
//! hang under it; [`request_id`] gives the id to what runs inside the request.

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use futures::StreamExt;
use tracing::Instrument;

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The `x-request-id` of the HTTP request being served on this task ("" outside one).
pub fn request_id() -> String {
    REQUEST_ID.try_with(|r| r.clone()).unwrap_or_default()
}

pub async fn trace_request(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().clone();
    let id = req
        .headers()
        .get(protocol::trace::REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let span = tracing::info_span!(
        "http.request",
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
        gen_ai.operation.name = tracing::field::Empty,
        gen_ai.request.model = tracing::field::Empty,
        x_request_id = %id,
    );
    protocol::trace::continue_from_headers(&span, req.headers());
    let mut resp = REQUEST_ID
        .scope(id.clone(), next.run(req).instrument(span.clone()))
        .await;
    span.record(
        "http.response.status_code",
        i64::from(resp.status().as_u16()),
    );
    if let Ok(v) = axum::http::HeaderValue::from_str(&id) {
        resp.headers_mut().insert(protocol::trace::REQUEST_ID, v);
    }
    let streamed = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if !streamed {
        return resp;
    }
    // A stream: the span ends with its last event, not when its headers leave.
    let (parts, body) = resp.into_parts();
    let end = EndOnDrop(span);
    let body = body.into_data_stream().map(move |chunk| {
        let _open = &end;
        chunk
    });
    Response::from_parts(parts, axum::body::Body::from_stream(body))
}

/// Ends a span when dropped: OpenTelemetry takes a span's end from its last exit, so this
/// enters and leaves it once more (the body's end, for a stream).
struct EndOnDrop(tracing::Span);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        let _last = self.0.enter();
    }
}

/// Names the operation and the model on the request's span (the handlers know them).
pub fn record_model(operation: &'static str, model: &str) {
    let span = tracing::Span::current();
    span.record("gen_ai.operation.name", operation);
    span.record("gen_ai.request.model", model);
}
