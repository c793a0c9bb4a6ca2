//! Tandem's scheduler: the OpenAI-compatible HTTP front door.
//!
//! # Layout
//! - [`protocol`]: OpenAI wire types; [`error`]: the one mapping of errors to OpenAI's envelope.
//! - [`validate`]: every request field checked once, turned into worker parameters.
//! - [`cluster`]: the workers requests go to: colocated in this process, or [`remote`]
//!   prefill and decode worker processes over gRPC (routing, KV handoff, failover).
//! - [`plan`]: the engine's measured costs, per-request prefill placement and capacity planning.
//! - [`pipeline`]: worker events → detokenized, stop-checked choice updates; cancellation.
//! - [`routes`]: one module per endpoint family; [`metrics`]: Prometheus; [`openapi`]: the
//!   document of them all.
//!
//! [`serve`] runs the server until its shutdown future resolves, then drains.

pub mod cluster;
pub mod error;
pub mod metrics;
pub mod openapi;
pub mod pipeline;
pub mod plan;
pub mod protocol;
pub mod remote;
pub mod routes;
pub mod structured;
pub mod tools;
pub mod trace;
pub mod validate;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use cluster::Cluster;
use error::ApiError;
use metrics_exporter_prometheus::PrometheusHandle;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Largest request body accepted (bytes).
pub const DEFAULT_MAX_BODY: usize = 8 << 20;

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub cluster: Arc<Cluster>,
    pub metrics: PrometheusHandle,
    /// When the server started (the model card's `created`).
    pub started_unix: u64,
    /// Required as `Authorization: Bearer KEY` on the API routes (`/v1/…`), when set
    /// (vLLM's `--api-key`); `/live`, `/health` and `/metrics` stay open for probes and scrapers.
    pub api_key: Option<Arc<str>>,
    /// Longest sequence (prompt + completion) a request may ask for: the model's context
    /// length, or less (vLLM's `--max-model-len`).
    pub max_model_len: usize,
}

impl AppState {
    pub fn new(cluster: Arc<Cluster>) -> AppState {
        AppState {
            metrics: metrics::handle(),
            started_unix: routes::unix_now(),
            api_key: None,
            max_model_len: cluster.frontend().max_context(),
            cluster,
        }
    }

    /// The same state, requiring `key` on the API routes (`None`: open).
    pub fn with_api_key(mut self, key: Option<String>) -> AppState {
        self.api_key = key.filter(|k| !k.is_empty()).map(Arc::from);
        self
    }

    /// The same state, serving sequences of at most `len` tokens (`None`, or more than the
    /// model's context length: the model's context length).
    pub fn with_max_model_len(mut self, len: Option<usize>) -> AppState {
        if let Some(len) = len {
            self.max_model_len = self.max_model_len.min(len.max(1));
        }
        self
    }

    pub fn model_id(&self) -> &str {
        &self.cluster.frontend().model_id
    }

    /// A request naming another model is a 404, as OpenAI answers.
    pub fn check_model(&self, id: &str) -> Result<(), ApiError> {
        if id == self.model_id() {
            Ok(())
        } else {
            Err(ApiError::NotFound {
                message: format!(
                    "The model '{id}' does not exist. This server serves '{}'.",
                    self.model_id()
                ),
                param: Some("model".into()),
                code: Some("model_not_found"),
            })
        }
    }
}

async fn count_requests(req: Request, next: Next) -> Response {
    let endpoint = match req.extensions().get::<MatchedPath>().map(|p| p.as_str()) {
        Some("/v1/chat/completions") => "chat",
        Some("/v1/completions") => "completions",
        Some("/v1/models") | Some("/v1/models/{id}") => "models",
        Some("/health") | Some("/live") => "health",
        Some("/metrics") => "metrics",
        Some("/tokenize") | Some("/detokenize") => "tokenize",
        Some("/openapi.json") => "openapi",
        _ => "other",
    };
    let resp = next.run(req).await;
    metrics::record_request(endpoint, resp.status().as_u16());
    resp
}

/// Refuses every route but the probes (`/live`, `/health`, `/metrics`) and the API's description
/// (`/openapi.json`) whose `Authorization: Bearer` does not carry the key.
async fn require_api_key(
    axum::extract::State(st): axum::extract::State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    if let Some(key) = &st.api_key
        && !matches!(
            req.uri().path(),
            "/live" | "/health" | "/metrics" | "/openapi.json"
        )
    {
        let given = req
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !same_secret(given.as_bytes(), key.as_bytes()) {
            return ApiError::Unauthorized(
                "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'.".into(),
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Equality of two secrets in time that depends on their lengths only.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The full HTTP API.
pub fn router(state: AppState, max_body: usize) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(routes::chat::handler))
        .route("/v1/completions", post(routes::completions::handler))
        .route("/v1/models", get(routes::models::list))
        .route("/v1/models/{id}", get(routes::models::get))
        .route("/tokenize", post(routes::tokenize::tokenize))
        .route("/detokenize", post(routes::tokenize::detokenize))
        .route("/live", get(routes::models::live))
        .route("/health", get(routes::models::health))
        .route("/metrics", get(routes::models::metrics))
        .route("/openapi.json", get(openapi::document))
        .fallback(|| async {
            ApiError::NotFound {
                message: "no such route".into(),
                param: None,
                code: Some("not_found"),
            }
        })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed.into_response() })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ))
        .layer(middleware::from_fn(count_requests))
        .layer(middleware::from_fn(trace::trace_request))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// Connections the HTTP server holds open at most by default.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// How long a client may take to send a request's headers (slowloris) or go idle between
/// requests on a kept-alive connection.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request body may take to arrive once its headers have.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `state` on `listener` until `shutdown` resolves; in-flight requests finish first.
/// At most `max_connections` connections are open at once (beyond, new ones are closed at
/// accept, counted in `tandem_http_connections_refused_total`); a client that does not send
/// its headers within [`HEADER_READ_TIMEOUT`], or its body within [`BODY_READ_TIMEOUT`], is
/// dropped — so slow or idle sockets cannot starve the server of connections or descriptors.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    max_body: usize,
    max_connections: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    let app = router(state, max_body).layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
        BODY_READ_TIMEOUT,
    ));
    let mut http = Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    http.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(20));
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: back off rather than spin.
                    tracing::warn!(error = %e, "accepting an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            ::metrics::counter!("tandem_http_connections_refused_total").increment(1);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = http
            .serve_connection_with_upgrades(TokioIo::new(stream), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
