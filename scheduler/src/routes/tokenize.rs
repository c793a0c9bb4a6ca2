//! `POST /tokenize` and `POST /detokenize`, in vLLM's shape: a prompt (or chat messages through
//! the model's template) to token ids, and ids back to text — what clients use to count tokens
//! and build token prompts.

use crate::AppState;
use crate::error::{ApiError, AppJson};
use crate::protocol::ChatMessageIn;
use axum::Json;
use axum::extract::State;
use frontend::TokenId;
use serde::{Deserialize, Serialize};

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct TokenizeRequest {
    /// Optional; when given, it must name the served model.
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<ChatMessageIn>>,
    /// With `prompt`: add the model's BOS token if it wants one.
    #[serde(default = "yes")]
    pub add_special_tokens: bool,
    /// With `messages`: end with the assistant's turn opening.
    #[serde(default = "yes")]
    pub add_generation_prompt: bool,
    #[serde(default)]
    pub return_token_strs: bool,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: usize,
    #[schema(value_type = Vec<u32>)]
    pub tokens: Vec<TokenId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_strs: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    #[schema(value_type = Vec<u32>)]
    pub tokens: Vec<TokenId>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

/// A prompt, or chat messages through the model's template, to token ids (vLLM's shape).
#[utoipa::path(post, path = "/tokenize", tag = "tokens",
    request_body = TokenizeRequest,
    responses((status = 200, body = TokenizeResponse), crate::error::Errors),
    security((), ("api_key" = [])))]
pub async fn tokenize(
    State(st): State<AppState>,
    AppJson(req): AppJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    if let Some(m) = &req.model {
        st.check_model(m)?;
    }
    let fe = st.cluster.frontend().clone();
    let text_and_special = match (req.prompt, req.messages) {
        (Some(p), None) => (p, req.add_special_tokens),
        (None, Some(m)) => {
            let msgs = super::chat::messages(m, fe.template.renders_tools())?;
            let text = fe
                .template
                .render(&msgs, req.add_generation_prompt)
                .map_err(|e| {
                    ApiError::invalid(
                        format!("could not apply the chat template: {e}"),
                        "messages",
                    )
                })?;
            (text, false)
        }
        _ => {
            return Err(ApiError::invalid(
                "give exactly one of prompt and messages",
                "prompt",
            ));
        }
    };
    let want_strs = req.return_token_strs;
    let max_len = st.max_model_len;
    let resp = tokio::task::spawn_blocking(move || -> Result<TokenizeResponse, ApiError> {
        let (text, special) = text_and_special;
        let tokens = fe
            .tokenizer
            .encode(&text, special)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok(TokenizeResponse {
            count: tokens.len(),
            max_model_len: max_len,
            token_strs: want_strs
                .then(|| tokens.iter().map(|&t| fe.tokenizer.token_text(t)).collect()),
            tokens,
        })
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(Json(resp))
}

/// Token ids back to text (vLLM's shape).
#[utoipa::path(post, path = "/detokenize", tag = "tokens",
    request_body = DetokenizeRequest,
    responses((status = 200, body = DetokenizeResponse), crate::error::Errors),
    security((), ("api_key" = [])))]
pub async fn detokenize(
    State(st): State<AppState>,
    AppJson(req): AppJson<DetokenizeRequest>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    if let Some(m) = &req.model {
        st.check_model(m)?;
    }
    let tok = &st.cluster.frontend().tokenizer;
    let vocab = tok.vocab_size();
    if let Some(bad) = req.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::invalid(
            format!("token id {bad} is outside the vocabulary of {vocab}"),
            "tokens",
        ));
    }
    Ok(Json(DetokenizeResponse {
        prompt: tok.decode(&req.tokens),
    }))
}
