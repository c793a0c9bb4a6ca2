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
        max_model_len: st.cluster.frontend().max_context(),
    }
}

pub async fn list(State(st): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: vec![card(&st)],
    })
}

pub async fn get(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ModelCard>, ApiError> {
    st.check_model(&id)?;
    Ok(Json(card(&st)))
}

/// 200 when requests can be served; with worker processes, 503 until a decode worker answers.
/// The body lists the workers and their health.
pub async fn health(
    State(st): State<AppState>,
) -> (axum::http::StatusCode, Json<serde_json::Value>) {
    use axum::http::StatusCode;
    let Some(r) = st.cluster.remote_workers() else {
        return (
            StatusCode::OK,
            Json(serde_json::json!({ "status": "ok", "time": unix_now() })),
        );
    };
    let list = |role: &str, ws: Vec<(String, bool)>| -> Vec<serde_json::Value> {
        ws.into_iter()
            .map(|(addr, healthy)| serde_json::json!({ "role": role, "addr": addr, "healthy": healthy }))
            .collect()
    };
    let decode: Vec<(String, bool)> = r
        .decode_workers()
        .iter()
        .map(|w| (w.addr.clone(), w.healthy()))
        .collect();
    let prefill: Vec<(String, bool)> = r
        .prefill_workers()
        .iter()
        .map(|w| (w.addr.clone(), w.healthy()))
        .collect();
    let up = decode.iter().any(|(_, h)| *h);
    let mut workers = list("decode", decode);
    workers.extend(list("prefill", prefill));
    (
        if up {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        Json(serde_json::json!({
            "status": if up { "ok" } else { "unavailable" },
            "time": unix_now(),
            "workers": workers,
        })),
    )
}

pub async fn metrics(State(st): State<AppState>) -> String {
    st.metrics.render()
}
