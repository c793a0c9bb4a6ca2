//! Tandem's scheduler: the OpenAI-compatible HTTP front door.
//!
//! # Layout
//! - [`protocol`]: OpenAI wire types; [`error`]: the one mapping of errors to OpenAI's envelope.
//! - [`validate`]: every request field checked once, turned into worker parameters.
//! - [`cluster`]: the workers requests go to: colocated in this process, or [`remote`]
//!   prefill and decode worker processes over gRPC (routing, KV handoff, failover).
//! - [`pipeline`]: worker events → detokenized, stop-checked choice updates; cancellation.
//! - [`routes`]: one module per endpoint family; [`metrics`]: Prometheus.
//!
//! [`serve`] runs the server until its shutdown future resolves, then drains.

pub mod cluster;
pub mod error;
pub mod metrics;
pub mod pipeline;
pub mod protocol;
pub mod remote;
pub mod routes;
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
use std::net::SocketAddr;
use std::sync::Arc;

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
    /// (vLLM's `--api-key`); `/health` and `/metrics` stay open for probes and scrapers.
    pub api_key: Option<Arc<str>>,
}

impl AppState {
    pub fn new(cluster: Arc<Cluster>) -> AppState {
        AppState {
            cluster,
            metrics: metrics::handle(),
            started_unix: routes::unix_now(),
            api_key: None,
        }
    }

    /// The same state, requiring `key` on the API routes (`None`: open).
    pub fn with_api_key(mut self, key: Option<String>) -> AppState {
        self.api_key = key.filter(|k| !k.is_empty()).map(Arc::from);
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
        Some("/health") => "health",
        Some("/metrics") => "metrics",
        _ => "other",
    };
    let resp = next.run(req).await;
    metrics::record_request(endpoint, resp.status().as_u16());
    resp
}

/// Refuses API routes (`/v1/…`) whose `Authorization: Bearer` does not carry the key.
async fn require_api_key(
    axum::extract::State(st): axum::extract::State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    if let Some(key) = &st.api_key
        && req.uri().path().starts_with("/v1")
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
        .route("/health", get(routes::models::health))
        .route("/metrics", get(routes::models::metrics))
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
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// Serves `state` on `listener` until `shutdown` resolves; in-flight requests finish first.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    max_body: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router(state, max_body).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}
