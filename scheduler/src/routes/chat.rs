//! `POST /v1/chat/completions`.

use super::{Collected, collect, new_id, unix_now};
use crate::AppState;
use crate::error::{ApiError, AppJson};
use crate::pipeline::{Submission, submit};
use crate::protocol::*;
use crate::validate::{DefaultMax, PlanInput, plan};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use frontend::Frontend;
use frontend::TokenId;
use frontend::chat::ChatMessage;
use frontend::sampling::TokenLogprobs;

const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

/// Flattens OpenAI messages to the template's `{role, content}` list.
pub(crate) fn messages(msgs: Vec<ChatMessageIn>) -> Result<Vec<ChatMessage>, ApiError> {
    if msgs.is_empty() {
        return Err(ApiError::invalid(
            "messages must contain at least one message",
            "messages",
        ));
    }
    msgs.into_iter()
        .enumerate()
        .map(|(i, m)| {
            if !ROLES.contains(&m.role.as_str()) {
                return Err(ApiError::InvalidRequest {
                    message: format!("messages[{i}].role '{}' is not one of {}", m.role, ROLES.join(", ")),
                    param: Some(format!("messages[{i}].role")),
                    code: None,
                });
            }
            let content = match m.content {
                None => String::new(),
                Some(MessageContent::Text(s)) => s,
                Some(MessageContent::Parts(parts)) => {
                    let mut s = String::new();
                    for p in parts {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => s.push_str(&t),
                            (kind, _) => {
                                return Err(ApiError::InvalidRequest {
                                    message: format!("messages[{i}]: content part of type '{kind}' is not supported (text only)"),
                                    param: Some(format!("messages[{i}].content")),
                                    code: None,
                                });
                            }
                        }
                    }
                    s
                }
            };
            Ok(ChatMessage { role: m.role, content })
        })
        .collect()
}

pub(crate) fn chat_logprobs(
    fe: &Frontend,
    tokens: &[(TokenId, Option<TokenLogprobs>)],
) -> Option<ChatLogprobs> {
    if tokens.iter().all(|(_, lp)| lp.is_none()) {
        return None;
    }
    let entry = |id: TokenId, lp: f32| {
        let bytes = fe.tokenizer.token_bytes(id, false).to_vec();
        (fe.tokenizer.token_text(id), lp, bytes)
    };
    Some(ChatLogprobs {
        content: tokens
            .iter()
            .filter_map(|(id, lp)| lp.as_ref().map(|lp| (*id, lp)))
            .map(|(id, lp)| {
                let (token, logprob, bytes) = entry(id, lp.logprob);
                ChatTokenLogprob {
                    token,
                    logprob,
                    bytes,
                    top_logprobs: lp
                        .top
                        .iter()
                        .map(|&(t, l)| {
                            let (token, logprob, bytes) = entry(t, l);
                            ChatTopLogprob {
                                token,
                                logprob,
                                bytes,
                            }
                        })
                        .collect(),
                }
            })
            .collect(),
    })
}

pub async fn handler(
    State(st): State<AppState>,
    AppJson(req): AppJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    st.check_model(&req.model)?;
    let msgs = messages(req.messages)?;
    if req.top_logprobs.is_some() && req.logprobs != Some(true) {
        return Err(ApiError::invalid(
            "top_logprobs requires logprobs to be true",
            "top_logprobs",
        ));
    }
    let fe = st.cluster.frontend().clone();
    let prompt = tokio::task::spawn_blocking(move || -> Result<Vec<TokenId>, ApiError> {
        let text = fe.template.render(&msgs, true).map_err(|e| {
            ApiError::invalid(
                format!("could not apply the chat template: {e}"),
                "messages",
            )
        })?;
        if fe.tokenizer.surely_longer_than(&text, fe.max_context()) {
            return Err(crate::validate::too_long(
                fe.max_context(),
                text.len(),
                "messages",
            ));
        }
        fe.tokenizer
            .encode(&text, false)
            .map_err(|e| ApiError::Internal(e.to_string()))
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    let fe = st.cluster.frontend();
    let logprobs = (req.logprobs == Some(true)).then(|| req.top_logprobs.unwrap_or(0));
    let p = plan(PlanInput {
        sampling: &req.sampling,
        max_tokens: req.max_completion_tokens.or(req.max_tokens),
        default_max: DefaultMax::RemainingContext,
        min_max_tokens: 1,
        logprobs,
        prompt_logprobs: None,
        prompt_len: prompt.len(),
        max_context: fe.max_context(),
        prompt_param: "messages",
        tokenizer: &fe.tokenizer,
    })?;
    let prompt_tokens = prompt.len();
    crate::metrics::record_prompt_tokens("chat", prompt_tokens);
    let sub = submit(&st.cluster, vec![prompt], &p.params, p.n, &p.stops, "chat")?;
    let (id, created, model) = (new_id("chatcmpl"), unix_now(), st.model_id().to_string());
    if p.stream {
        return Ok(stream(
            st,
            sub,
            id,
            created,
            model,
            prompt_tokens,
            p.include_usage,
        ));
    }
    let choices = collect(sub).await?;
    let usage = super::usage(prompt_tokens, &choices, p.n);
    let resp = ChatCompletionResponse {
        id,
        object: "chat.completion",
        created,
        model,
        choices: choices
            .into_iter()
            .enumerate()
            .map(|(index, c): (usize, Collected)| ChatChoice {
                index,
                logprobs: chat_logprobs(fe, &c.tokens),
                message: ChatMessageOut {
                    role: "assistant",
                    content: c.text,
                },
                finish_reason: c.finish,
            })
            .collect(),
        usage,
    };
    Ok(axum::Json(resp).into_response())
}

fn stream(
    st: AppState,
    mut sub: Submission,
    id: String,
    created: u64,
    model: String,
    prompt_tokens: usize,
    include_usage: bool,
) -> Response {
    let (tx, resp) = super::sse_channel();
    tokio::spawn(async move {
        let usage_field = include_usage.then_some(None);
        let chunk =
            |choices: Vec<ChatChunkChoice>, usage: Option<Option<Usage>>| ChatCompletionChunk {
                id: id.clone(),
                object: "chat.completion.chunk",
                created,
                model: model.clone(),
                choices,
                usage,
            };
        for index in 0..sub.n_choices {
            let first = chunk(
                vec![ChatChunkChoice {
                    index,
                    delta: ChatDelta {
                        role: Some("assistant"),
                        content: Some(String::new()),
                    },
                    logprobs: None,
                    finish_reason: None,
                }],
                usage_field.clone(),
            );
            if !tx.json(&first).await {
                return;
            }
        }
        let (mut open, mut completion_tokens, mut cached_tokens) = (sub.n_choices, 0usize, 0usize);
        while open > 0 {
            let ev = match sub.next().await {
                Some(Ok(u)) => {
                    completion_tokens += u.tokens.len();
                    if u.index == 0 {
                        cached_tokens += u.cached_tokens.unwrap_or(0);
                    }
                    if u.finish.is_some() {
                        open -= 1;
                    }
                    if u.text.is_empty()
                        && u.finish.is_none()
                        && u.tokens.iter().all(|(_, l)| l.is_none())
                    {
                        continue;
                    }
                    chunk(
                        vec![ChatChunkChoice {
                            index: u.index,
                            logprobs: chat_logprobs(st.cluster.frontend(), &u.tokens),
                            delta: ChatDelta {
                                role: None,
                                content: (!u.text.is_empty() || u.finish.is_none())
                                    .then_some(u.text),
                            },
                            finish_reason: u.finish,
                        }],
                        usage_field.clone(),
                    )
                }
                Some(Err(e)) => {
                    tx.error(&e).await;
                    break;
                }
                None => break,
            };
            if !tx.json(&ev).await {
                return;
            }
        }
        if include_usage {
            let u = Usage::new(prompt_tokens, completion_tokens, cached_tokens);
            tx.json(&chunk(vec![], Some(Some(u)))).await;
        }
        tx.done().await;
    });
    resp
}
