//! One trace across the processes: the W3C trace context (`traceparent`, `tracestate`) and the
//! request id (`x-request-id`) ride in the gRPC metadata of every internal call, so that a
//! worker's spans hang under the scheduler's. With no tracer installed (tracing off) the
//! context is empty and nothing is written: the calls carry only the request id.

use opentelemetry::propagation::{Extractor, Injector};
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The request id's header and metadata key (Dynamo's, and the common proxies').
pub const REQUEST_ID: &str = "x-request-id";

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Writes `span`'s trace context and `request_id` into an outgoing call's metadata.
pub fn inject(span: &tracing::Span, request_id: &str, md: &mut MetadataMap) {
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut MetadataInjector(md))
    });
    if let Ok(v) = MetadataValue::try_from(request_id) {
        md.insert(REQUEST_ID, v);
    }
}

/// The request id an incoming call carries ("" when none).
pub fn request_id(md: &MetadataMap) -> String {
    md.get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// Makes `span` a child of the trace context an incoming call carries (if any).
pub fn continue_from(span: &tracing::Span, md: &MetadataMap) {
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&MetadataExtractor(md)));
    let _ = span.set_parent(cx);
}

/// The same for an HTTP request's headers (a client's `traceparent`).
pub fn continue_from_headers(span: &tracing::Span, headers: &tonic::codegen::http::HeaderMap) {
    struct Headers<'a>(&'a tonic::codegen::http::HeaderMap);
    impl Extractor for Headers<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).and_then(|v| v.to_str().ok())
        }
        fn keys(&self) -> Vec<&str> {
            self.0.keys().map(|k| k.as_str()).collect()
        }
    }
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Headers(headers)));
    let _ = span.set_parent(cx);
}
