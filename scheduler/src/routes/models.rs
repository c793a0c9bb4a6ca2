//! `GET /v1/models`, `GET /v1/models/{id}`, `GET /health`, `GET /metrics`.

use super::unix_now;
use crate::AppState;
use crate::error::ApiError;
use crate::protocol::{ModelCard, ModelList};
use axum::Json;
use axum::extract::{Path, State};

fn card(st: &AppState) -> ModelCard {
    ModelCard {
        id: st.model_id().to_string(),
        object: "model",
        created: st.started_unix,
        owned_by: "tandem",
        max_model_len: st.max_model_len,
    }
}

/// The served model.
#[utoipa::path(get, path = "/v1/models", tag = "openai",
    responses((status = 200, body = ModelList), crate::error::Errors),
    security((), ("api_key" = [])))]
pub async fn list(State(st): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: vec![card(&st)],
    })
}

/// One model, by id.
#[utoipa::path(get, path = "/v1/models/{id}", tag = "openai",
    params(("id" = String, Path, description = "The model's id")),
    responses((status = 200, body = ModelCard), crate::error::Errors),
    security((), ("api_key" = [])))]
pub async fn get(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ModelCard>, ApiError> {
    st.check_model(&id)?;
    Ok(Json(card(&st)))
}

/// 200 when requests can be served; with worker processes, 503 until a decode worker answers.
/// `GET /health`'s body.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Health {
    /// `ok`, or `unavailable` when no decode worker is healthy.
    pub status: &'static str,
    /// Unix seconds.
    pub time: u64,
    /// The cluster's workers (absent when colocated).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<Vec<WorkerHealth>>,
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct WorkerHealth {
    /// `decode` or `prefill`.
    pub role: &'static str,
    pub addr: String,
    pub healthy: bool,
    /// Requests this scheduler has on the worker now.
    pub inflight: usize,
}

/// Liveness: the process runs and its runtime answers (a probe that restarts it when not).
/// Says nothing about the workers: that is `/health`.
#[utoipa::path(get, path = "/live", tag = "probes",
    responses((status = 200, body = String, content_type = "text/plain")))]
pub async fn live() -> &'static str {
    "ok"
}

/// The body lists the workers and their health.
#[utoipa::path(get, path = "/health", tag = "probes",
    responses(
        (status = 200, description = "Serving: at least one decode worker is healthy", body = Health),
        (status = 503, description = "No decode worker is healthy", body = Health),
    ))]
pub async fn health(State(st): State<AppState>) -> (axum::http::StatusCode, Json<Health>) {
    use axum::http::StatusCode;
    let Some(r) = st.cluster.remote_workers() else {
        return (
            StatusCode::OK,
            Json(Health {
                status: "ok",
                time: unix_now(),
                workers: None,
            }),
        );
    };
    fn list<C>(
        role: &'static str,
        ws: &[std::sync::Arc<crate::remote::Worker<C>>],
    ) -> impl Iterator<Item = WorkerHealth> {
        ws.iter().map(move |w| WorkerHealth {
            role,
            addr: w.addr.clone(),
            healthy: w.healthy(),
            inflight: w.inflight(),
        })
    }
    let mut workers: Vec<WorkerHealth> = list("decode", &r.decode_workers()).collect();
    let up = workers.iter().any(|w| w.healthy);
    workers.extend(list("prefill", &r.prefill_workers()));
    (
        if up {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        Json(Health {
            status: if up { "ok" } else { "unavailable" },
            time: unix_now(),
            workers: Some(workers),
        }),
    )
}

/// Prometheus metrics, in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "probes",
    responses((status = 200, body = String, content_type = "text/plain")))]
pub async fn metrics(State(st): State<AppState>) -> String {
    st.metrics.render()
}
