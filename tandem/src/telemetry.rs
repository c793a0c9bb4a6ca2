//! Logs and traces of a Tandem process: log lines on stderr (text, or JSON with
//! `--log-format json`), and, with `--otlp-endpoint` (or `OTEL_EXPORTER_OTLP_ENDPOINT`), spans
//! exported over OTLP/gRPC to a collector. Off by default: then no exporter, no propagator, and
//! the spans the code opens cost what the log layer makes of them.
//!
//! The service is `OTEL_SERVICE_NAME`, else `tandem-ROLE` (`tandem-scheduler`,
//! `tandem-prefill`, `tandem-decode`); the resource carries `tandem.role` too.

use crate::args::{LogFormat, TelemetryArgs};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Keeps the exporter (and the runtime its gRPC client lives on) until the process ends,
/// then flushes the spans still buffered.
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("tandem: flushing traces: {e}");
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Installs the global subscriber for a process of `role`.
pub fn init(role: &str, args: &TelemetryArgs) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_env("TANDEM_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            // Colours only on a terminal (not in CI logs, files, or `tandem up`'s children).
            .with_ansi(ansi)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let mut telemetry = Telemetry {
        provider: None,
        runtime: None,
    };
    let traces = match args.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
        None => None,
        Some(endpoint) => {
            // The tonic exporter must be built inside a runtime, and its channel's task runs
            // there: a small one of its own, apart from the serving runtime.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("tandem-otlp")
                .enable_all()
                .build()?;
            let exporter = {
                let _in = rt.enter();
                opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(endpoint)
                    .build()?
            };
            let service = std::env::var("OTEL_SERVICE_NAME")
                .ok()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| format!("tandem-{role}"));
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(service)
                .with_attribute(opentelemetry::KeyValue::new(
                    "tandem.role",
                    role.to_string(),
                ))
                .build();
            let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource)
                .build();
            opentelemetry::global::set_text_map_propagator(
                opentelemetry_sdk::propagation::TraceContextPropagator::new(),
            );
            let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("tandem"));
            telemetry.provider = Some(provider);
            telemetry.runtime = Some(rt);
            Some(layer)
        }
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(traces)
        .init();
    Ok(telemetry)
}
