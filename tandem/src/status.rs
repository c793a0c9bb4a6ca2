//! A worker's status server (`--status-listen`): plain HTTP beside its gRPC port, for what
//! probes and Prometheus ask — the answers Kubernetes' probes need from a process whose own
//! protocol is gRPC behind a cluster secret.
//!
//! - `GET /live`: 200 while the process runs and its runtime answers (liveness, startup).
//! - `GET /health`: 200 once the worker serves, 503 while it loads its model or drains after
//!   SIGTERM (readiness: "can take work now").
//! - `GET /metrics`: the process's Prometheus metrics (`tandem_prefill_backlog_seconds`,
//!   `tandem_kv_cache_usage_ratio`, queue depths, …).
//!
//! It starts before the model loads, so a startup probe sees a live process from the first
//! second, and it carries no secret: it tells nothing a metric would not and drives nothing.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

/// Where a worker is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Loading = 0,
    Serving = 1,
    Draining = 2,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Loading => "loading",
            Phase::Serving => "serving",
            Phase::Draining => "draining",
        }
    }
}

/// The phase, shared by the worker and its status server.
#[derive(Clone, Debug)]
pub struct Status {
    role: &'static str,
    phase: Arc<AtomicU8>,
}

impl Status {
    pub fn new(role: &'static str) -> Status {
        Status {
            role,
            phase: Arc::new(AtomicU8::new(Phase::Loading as u8)),
        }
    }

    pub fn set(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::Release);
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Loading,
            1 => Phase::Serving,
            _ => Phase::Draining,
        }
    }

    fn body(&self) -> String {
        format!(
            "{{\"role\":\"{}\",\"status\":\"{}\"}}",
            self.role,
            self.phase().name()
        )
    }
}

pub fn router(status: Status) -> Router {
    let metrics = scheduler::metrics::handle();
    Router::new()
        .route("/live", get(|| async { "ok" }))
        .route(
            "/health",
            get(|State(s): State<Status>| async move {
                let code = if s.phase() == Phase::Serving {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                (code, [("content-type", "application/json")], s.body())
            }),
        )
        .route("/metrics", get(move || async move { metrics.render() }))
        .with_state(status)
}

/// Binds `addr` and serves the status routes on the current runtime until the process ends.
pub async fn spawn(addr: &str, status: Status) -> anyhow::Result<()> {
    use anyhow::Context;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the status server on {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "status server (/live, /health, /metrics)");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(status)).await {
            tracing::warn!(error = %e, "status server stopped");
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(app: &Router, path: &str) -> (StatusCode, String) {
        use tower::ServiceExt;
        let r = app
            .clone()
            .oneshot(
                axum::http::Request::get(path)
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let code = r.status();
        let b = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        (code, String::from_utf8(b.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn probes_follow_the_phase() {
        let s = Status::new("decode");
        let app = router(s.clone());
        assert_eq!(get(&app, "/live").await.0, StatusCode::OK);
        let (code, body) = get(&app, "/health").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("\"loading\""), "{body}");
        s.set(Phase::Serving);
        assert_eq!(get(&app, "/health").await.0, StatusCode::OK);
        s.set(Phase::Draining);
        let (code, body) = get(&app, "/health").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("\"draining\""), "{body}");
        assert_eq!(get(&app, "/live").await.0, StatusCode::OK);
        metrics::gauge!("tandem_status_test_gauge").set(3.0);
        let (code, body) = get(&app, "/metrics").await;
        assert_eq!(code, StatusCode::OK);
        assert!(body.contains("tandem_status_test_gauge 3"), "{body}");
    }
}
