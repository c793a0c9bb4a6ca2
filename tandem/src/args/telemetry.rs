//! Logs and traces: the same flags on every process of a cluster.

use super::opt;
use clap::{Args, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Text,
    /// One JSON object per line, with the current span's fields (x_request_id among them).
    Json,
}

impl LogFormat {
    fn name(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

#[derive(Args, Debug, Clone, PartialEq, Default)]
pub struct TelemetryArgs {
    /// Export traces over OTLP/gRPC to this collector (`http://host:4317`); off by default. The service name is OTEL_SERVICE_NAME, else tandem-ROLE.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Log lines as text or JSON.
    #[arg(long, env = "TANDEM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl TelemetryArgs {
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        opt(&mut a, "otlp-endpoint", self.otlp_endpoint.as_ref());
        if self.log_format != LogFormat::Text {
            a.push(format!("--log-format={}", self.log_format.name()));
        }
        a
    }
}
