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

/// Flattens OpenAI messages to the template's `{role, content}` list; tool calls and results
/// go as they are to a template that renders them (`native`), else in the Hermes text form.
pub(crate) fn messages(
    msgs: Vec<ChatMessageIn>,
    native: bool,
) -> Result<Vec<ChatMessage>, ApiError> {
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
            let calls_err = |e: String| ApiError::InvalidRequest {
                message: format!("messages[{i}].tool_calls: {e}"),
                param: Some(format!("messages[{i}].tool_calls")),
                code: None,
            };
            if native {
                let tool_calls = match (m.role.as_str(), &m.tool_calls) {
                    ("assistant", Some(calls)) if !calls.is_empty() => {
                        Some(crate::tools::native_calls(calls).map_err(calls_err)?)
                    }
                    _ => None,
                };
                return Ok(ChatMessage {
                    tool_calls,
                    tool_call_id: m.tool_call_id.filter(|_| m.role == "tool"),
                    ..ChatMessage::new(m.role, content)
                });
            }
            // Tool calls and results in the form the model reads (`tools`).
            let content = match (m.role.as_str(), &m.tool_calls) {
                ("assistant", Some(calls)) if !calls.is_empty() => {
                    let calls = crate::tools::render_calls(calls).map_err(calls_err)?;
                    if content.is_empty() { calls } else { format!("{content}\n{calls}") }
                }
                ("tool", _) => crate::tools::render_result(&content),
                _ => content,
            };
            Ok(ChatMessage::new(m.role, content))
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

/// Chat completions (OpenAI's `POST /v1/chat/completions`).
#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai",
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "The completion; with `stream: true`, server-sent events each holding a `ChatCompletionChunk`, then `data: [DONE]`",
            content((crate::protocol::ChatCompletionResponse = "application/json"), (crate::protocol::SseEvent = "text/event-stream"))),
        crate::error::Errors,
    ),
    security((), ("api_key" = [])))]
pub async fn handler(
    State(st): State<AppState>,
    AppJson(req): AppJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    st.check_model(&req.model)?;
    crate::trace::record_model("chat", &req.model);
    let tools = crate::tools::parse(&req.sampling)?;
    let forced_call = tools.as_ref().and_then(|t| t.constraint());
    let formatted = [
        &req.sampling.response_format,
        &req.sampling.structured_outputs,
    ]
    .iter()
    .any(|v| v.as_ref().is_some_and(|v| !v.is_null()));
    if forced_call.is_some() && formatted {
        return Err(ApiError::invalid(
            "a required or named tool call cannot be combined with response_format or structured_outputs",
            "tool_choice",
        ));
    }
    let native = st.cluster.frontend().template.renders_tools();
    let mut msgs = messages(req.messages, native)?;
    // The tools go to a template with tool syntax, else into the system prompt.
    let tool_list = match &tools {
        Some(t) if native => Some(t.openai_list()),
        Some(t) => {
            t.describe(&mut msgs);
            None
        }
        None => None,
    };
    if req.top_logprobs.is_some() && req.logprobs != Some(true) {
        return Err(ApiError::invalid(
            "top_logprobs requires logprobs to be true",
            "top_logprobs",
        ));
    }
    let fe = st.cluster.frontend().clone();
    let max_len = st.max_model_len;
    let prompt = tokio::task::spawn_blocking(move || -> Result<Vec<TokenId>, ApiError> {
        let text = fe
            .template
            .render_with_tools(&msgs, tool_list.as_ref(), true)
            .map_err(|e| {
                ApiError::invalid(
                    format!("could not apply the chat template: {e}"),
                    "messages",
                )
            })?;
        if fe.tokenizer.surely_longer_than(&text, max_len) {
            return Err(crate::validate::too_long(max_len, text.len(), "messages"));
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
        max_context: st.max_model_len,
        prompt_param: "messages",
        frontend: fe,
    })?;
    let mut p = p;
    if let Some(c) = forced_call {
        crate::structured::compile(fe, &c, "tools")?;
        p.params.constraint = Some(c);
    }
    let prompt_tokens = prompt.len();
    crate::metrics::record_prompt_tokens("chat", prompt_tokens);
    let sub = submit(&st.cluster, vec![prompt], &p.params, p.n, &p.stops, "chat")?;
    let (id, created, model) = (new_id("chatcmpl"), unix_now(), st.model_id().to_string());
    if p.stream {
        return Ok(stream(
            st,
            sub,
            Head { id, created, model },
            prompt_tokens,
            p.include_usage,
            tools,
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
            .map(|(index, c): (usize, Collected)| {
                let (content, tool_calls) = match &tools {
                    Some(t) => crate::tools::split(&c.text, t),
                    None => (c.text, Vec::new()),
                };
                let called = !tool_calls.is_empty();
                ChatChoice {
                    index,
                    logprobs: chat_logprobs(fe, &c.tokens),
                    message: ChatMessageOut {
                        role: "assistant",
                        content: (!called || !content.is_empty()).then_some(content),
                        tool_calls,
                    },
                    finish_reason: if called { Some("tool_calls") } else { c.finish },
                }
            })
            .collect(),
        usage,
    };
    Ok(axum::Json(resp).into_response())
}

/// What every chunk of a stream names: the completion's id, creation time and model.
struct Head {
    id: String,
    created: u64,
    model: String,
}

fn stream(
    st: AppState,
    mut sub: Submission,
    Head { id, created, model }: Head,
    prompt_tokens: usize,
    include_usage: bool,
    tools: Option<crate::tools::Tools>,
) -> Response {
    let (tx, resp) = super::sse_channel();
    let mut calls: Vec<crate::tools::CallStream> =
        (0..sub.n_choices).map(|_| Default::default()).collect();
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
                        tool_calls: None,
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
                    // With tools, text that may be a call is held until the call completes.
                    let (text, done, mut finish) = match &tools {
                        Some(t) => {
                            let cs = &mut calls[u.index];
                            let (mut text, done) = cs.push(&u.text, t);
                            if u.finish.is_some() {
                                text.push_str(&cs.finish());
                            }
                            (text, done, u.finish)
                        }
                        None => (u.text, Vec::new(), u.finish),
                    };
                    if finish.is_some() && calls[u.index].sent > 0 {
                        finish = Some("tool_calls");
                    }
                    if text.is_empty()
                        && done.is_empty()
                        && finish.is_none()
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
                                content: (!text.is_empty()
                                    || (finish.is_none() && done.is_empty()))
                                .then_some(text),
                                tool_calls: (!done.is_empty()).then_some(done),
                            },
                            finish_reason: finish,
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
