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
        max_model_len: st.cluster.engine().max_context(),
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

pub async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok", "time": unix_now() }))
}

pub async fn metrics(State(st): State<AppState>) -> String {
    st.metrics.render()
}
