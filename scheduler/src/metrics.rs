//! Prometheus metrics: requests by endpoint and status, TTFT and TPOT histograms, prompt,
//! prefix-cache-hit and generated token counters. One global recorder per process; `/metrics` renders it.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use std::time::Duration;

/// Installs the recorder once and returns its handle.
pub fn handle() -> PrometheusHandle {
    static H: OnceLock<PrometheusHandle> = OnceLock::new();
    H.get_or_init(|| {
        let latency = [
            0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
            30.0, 60.0,
        ];
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("seconds".into()), &latency)
            .expect("valid buckets")
            .build_recorder();
        let h = recorder.handle();
        // Another recorder may already be installed (tests embedding several servers).
        let _ = metrics::set_global_recorder(recorder);
        h
    })
    .clone()
}

pub fn record_request(endpoint: &'static str, status: u16) {
    metrics::counter!("tandem_requests_total", "endpoint" => endpoint, "status" => status.to_string()).increment(1);
}

pub fn record_prompt_tokens(endpoint: &'static str, n: usize) {
    metrics::counter!("tandem_prompt_tokens_total", "endpoint" => endpoint).increment(n as u64);
}

pub fn record_ttft(endpoint: &'static str, d: Duration) {
    metrics::histogram!("tandem_time_to_first_token_seconds", "endpoint" => endpoint)
        .record(d.as_secs_f64());
}

/// At a choice's end: tokens generated and time from first to last token.
pub fn record_generation(endpoint: &'static str, n_tokens: usize, since_first: Option<Duration>) {
    metrics::counter!("tandem_generation_tokens_total", "endpoint" => endpoint)
        .increment(n_tokens as u64);
    if let (Some(d), true) = (since_first, n_tokens > 1) {
        metrics::histogram!("tandem_time_per_output_token_seconds", "endpoint" => endpoint)
            .record(d.as_secs_f64() / (n_tokens - 1) as f64);
    }
}

/// Prompt tokens whose KV came from the prefix cache.
pub fn record_prefix_hit(endpoint: &'static str, n: usize) {
    metrics::counter!("tandem_prefix_cache_hit_tokens_total", "endpoint" => endpoint)
        .increment(n as u64);
}
