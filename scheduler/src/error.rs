//! API errors and their one mapping to HTTP: OpenAI's envelope
//! `{"error": {"message", "type", "param", "code"}}` with the matching status.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// An error a client sees.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed or out of range.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
        code: Option<&'static str>,
    },
    /// 401: `--api-key` is set and the request's `Authorization: Bearer` does not carry it.
    #[error("{0}")]
    Unauthorized(String),
    /// 404: unknown model or route.
    #[error("{message}")]
    NotFound {
        message: String,
        param: Option<String>,
        code: Option<&'static str>,
    },
    /// 405
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 413
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 503 with `Retry-After`: the server is at capacity; nothing was lost, try again.
    #[error("{0}")]
    Overloaded(String),
    /// 500
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: impl Into<Option<&'static str>>) -> ApiError {
        ApiError::InvalidRequest {
            message: message.into(),
            param: param.into().map(str::to_string),
            code: None,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The envelope's body.
    pub fn body(&self) -> ErrorBody {
        let (kind, param, code) = match self {
            ApiError::InvalidRequest { param, code, .. } => (
                "invalid_request_error",
                param.clone(),
                code.map(str::to_string),
            ),
            ApiError::Unauthorized(_) => (
                "invalid_request_error",
                None,
                Some("invalid_api_key".into()),
            ),
            ApiError::NotFound { param, code, .. } => (
                "invalid_request_error",
                param.clone(),
                code.map(str::to_string),
            ),
            ApiError::MethodNotAllowed => (
                "invalid_request_error",
                None,
                Some("method_not_allowed".into()),
            ),
            ApiError::PayloadTooLarge(_) => (
                "invalid_request_error",
                None,
                Some("payload_too_large".into()),
            ),
            ApiError::Overloaded(_) => ("server_overloaded", None, Some("overloaded".into())),
            ApiError::Internal(_) => ("server_error", None, None),
        };
        ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind: kind.into(),
                param,
                code,
            },
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

/// Seconds a client should wait before retrying after a 503.
pub const RETRY_AFTER_SECS: u32 = 1;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status(), Json(self.body())).into_response();
        if matches!(self, ApiError::Overloaded(_)) {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        resp
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> ApiError {
        let status = r.status();
        let text = r.body_text();
        match r {
            _ if status == StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::PayloadTooLarge(format!("request body is too large: {text}"))
            }
            JsonRejection::MissingJsonContentType(_) => ApiError::invalid(
                "expected a JSON body with 'Content-Type: application/json'",
                None,
            ),
            JsonRejection::JsonSyntaxError(_) => {
                ApiError::invalid(format!("invalid JSON: {text}"), None)
            }
            JsonRejection::JsonDataError(_) => ApiError::invalid(text, None),
            _ => ApiError::invalid(text, None),
        }
    }
}

/// `Json` whose rejections are OpenAI-style errors.
pub struct AppJson<T>(pub T);

impl<S, T> FromRequest<S> for AppJson<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        Ok(AppJson(Json::<T>::from_request(req, state).await?.0))
    }
}

/// The errors any API route may answer, each in OpenAI's envelope: the statuses of
/// [`ApiError`] as `/openapi.json` documents them (`crate::openapi`).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // a description of responses, never built
pub(crate) enum Errors {
    /// Malformed JSON, a field out of range, an unsupported field (`invalid_request_error`).
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// The API key is missing or wrong (only when the server runs with `--api-key`).
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// `model` names a model this server does not serve.
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// The body is larger than `--max-body-bytes`.
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// Every worker is busy or none is up; retry after the `Retry-After` seconds.
    #[response(status = 503, headers(("Retry-After" = u32, description = "Seconds to wait")))]
    Overloaded(ErrorBody),
    /// A fault in the server.
    #[response(status = 500)]
    Internal(ErrorBody),
}
