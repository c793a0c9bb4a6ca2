//! `POST /v1/completions`: prompts as text, lists of text, token ids or lists of token ids;
//! `echo` with prompt log-probabilities and `max_tokens: 0` for scoring (as vLLM allows).

use super::{Collected, collect, new_id, unix_now};
use crate::AppState;
use crate::error::{ApiError, AppJson};
use crate::pipeline::{Submission, submit};
use crate::protocol::*;
use crate::validate::{DefaultMax, MAX_CHOICES, MAX_PROMPTS, PlanInput, plan, too_long};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use frontend::sampling::TokenLogprobs;
use frontend::{Frontend, TokenId};

/// OpenAI's legacy default.
const DEFAULT_MAX_TOKENS: usize = 16;

/// Builds the legacy logprobs object; `offset` is where `tokens` start in the choice's text.
fn legacy_logprobs(
    fe: &Frontend,
    prompt: Option<(&[TokenId], &[TokenLogprobs])>,
    tokens: &[(TokenId, Option<TokenLogprobs>)],
    mut offset: usize,
) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    let top_map = |lp: &TokenLogprobs| -> serde_json::Map<String, serde_json::Value> {
        lp.top
            .iter()
            .map(|&(t, l)| (fe.tokenizer.token_text(t), serde_json::json!(l)))
            .collect()
    };
    let mut push = |id: TokenId, lp: Option<&TokenLogprobs>| {
        let text = fe.tokenizer.token_text(id);
        out.text_offset.push(offset);
        offset += text.len();
        out.tokens.push(text);
        out.token_logprobs.push(lp.map(|l| l.logprob));
        out.top_logprobs.push(lp.map(top_map));
    };
    if let Some((ids, lps)) = prompt {
        for (i, &id) in ids.iter().enumerate() {
            push(id, if i == 0 { None } else { lps.get(i - 1) });
        }
    }
    for (id, lp) in tokens {
        push(*id, lp.as_ref());
    }
    out
}

struct Prompt {
    ids: Vec<TokenId>,
    text: String,
}

/// Text completions (OpenAI's legacy `POST /v1/completions`).
#[utoipa::path(post, path = "/v1/completions", tag = "openai",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "The completion; with `stream: true`, server-sent events each holding a `CompletionResponse` with one choice's text, then `data: [DONE]`",
            content((crate::protocol::CompletionResponse = "application/json"), (crate::protocol::SseEvent = "text/event-stream"))),
        crate::error::Errors,
    ),
    security((), ("api_key" = [])))]
pub async fn handler(
    State(st): State<AppState>,
    AppJson(req): AppJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    st.check_model(&req.model)?;
    crate::trace::record_model("text_completion", &req.model);
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix is not supported", "suffix"));
    }
    if let Some(b) = req.best_of
        && b != req.sampling.n.unwrap_or(1)
    {
        return Err(ApiError::invalid(
            "best_of other than n is not supported",
            "best_of",
        ));
    }
    let count = match &req.prompt {
        PromptSpec::Text(_) | PromptSpec::Tokens(_) => 1,
        PromptSpec::Texts(v) => v.len(),
        PromptSpec::TokenLists(v) => v.len(),
    };
    if count > MAX_PROMPTS {
        return Err(ApiError::invalid(
            format!("at most {MAX_PROMPTS} prompts are allowed in one request, got {count}"),
            "prompt",
        ));
    }
    let n = req.sampling.n.unwrap_or(1) as usize;
    if count * n > MAX_CHOICES {
        return Err(ApiError::invalid(
            format!("prompts × n may be at most {MAX_CHOICES}, got {count} × {n}"),
            "n",
        ));
    }
    let fe = st.cluster.frontend().clone();
    let max_len = st.max_model_len;
    let vocab = fe.config.vocab_size as u32;
    let spec = req.prompt.clone();
    let prompts = tokio::task::spawn_blocking(move || -> Result<Vec<Prompt>, ApiError> {
        let from_text = |t: String| -> Result<Prompt, ApiError> {
            if fe.tokenizer.surely_longer_than(&t, max_len) {
                return Err(too_long(max_len, t.len(), "prompt"));
            }
            let ids = fe
                .tokenizer
                .encode(&t, true)
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            Ok(Prompt { ids, text: t })
        };
        let from_ids = |ids: Vec<u32>| -> Result<Prompt, ApiError> {
            if let Some(bad) = ids.iter().find(|&&t| t >= vocab) {
                return Err(ApiError::invalid(
                    format!("token id {bad} is out of range (vocabulary size {vocab})"),
                    "prompt",
                ));
            }
            Ok(Prompt {
                text: fe.tokenizer.decode(&ids),
                ids,
            })
        };
        let ps: Vec<Prompt> = match spec {
            PromptSpec::Text(t) => vec![from_text(t)?],
            PromptSpec::Texts(v) => v.into_iter().map(from_text).collect::<Result<_, _>>()?,
            PromptSpec::Tokens(ids) => vec![from_ids(ids)?],
            PromptSpec::TokenLists(v) => v.into_iter().map(from_ids).collect::<Result<_, _>>()?,
        };
        if ps.is_empty() {
            return Err(ApiError::invalid(
                "prompt must not be an empty list",
                "prompt",
            ));
        }
        Ok(ps)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    let fe = st.cluster.frontend();
    let longest = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0);
    if let Some(empty) = prompts.iter().position(|p| p.ids.is_empty()) {
        return Err(ApiError::invalid(
            format!("prompt {empty} is empty"),
            "prompt",
        ));
    }
    let prompt_logprobs = if req.echo { req.logprobs } else { None };
    let p = plan(PlanInput {
        sampling: &req.sampling,
        max_tokens: req.max_tokens,
        default_max: DefaultMax::Fixed(DEFAULT_MAX_TOKENS),
        min_max_tokens: 0,
        logprobs: req.logprobs,
        prompt_logprobs,
        prompt_len: longest,
        max_context: st.max_model_len,
        prompt_param: "prompt",
        frontend: fe,
    })?;
    let prompt_tokens: usize = prompts.iter().map(|p| p.ids.len()).sum();
    crate::metrics::record_prompt_tokens("completions", prompt_tokens);
    let sub = submit(
        &st.cluster,
        prompts.iter().map(|p| p.ids.clone()).collect(),
        &p.params,
        p.n,
        &p.stops,
        "completions",
    )?;
    let (id, created, model) = (new_id("cmpl"), unix_now(), st.model_id().to_string());
    if p.stream {
        return Ok(stream(
            st,
            sub,
            prompts,
            req.echo,
            req.logprobs.is_some(),
            p.n,
            id,
            created,
            model,
            prompt_tokens,
            p.include_usage,
        ));
    }
    let choices = collect(sub).await?;
    let usage = super::usage(prompt_tokens, &choices, p.n);
    let resp = CompletionResponse {
        id,
        object: "text_completion",
        created,
        model,
        choices: choices
            .into_iter()
            .enumerate()
            .map(|(index, c): (usize, Collected)| {
                let prompt = &prompts[index / p.n];
                let echo_text = if req.echo { prompt.text.as_str() } else { "" };
                let logprobs = req.logprobs.map(|_| {
                    let pl = c
                        .prompt_logprobs
                        .as_deref()
                        .filter(|_| req.echo)
                        .map(|lps| (prompt.ids.as_slice(), lps));
                    legacy_logprobs(fe, pl, &c.tokens, 0)
                });
                CompletionChoice {
                    index,
                    text: format!("{echo_text}{}", c.text),
                    logprobs,
                    finish_reason: c.finish,
                }
            })
            .collect(),
        usage: Some(Some(usage)),
    };
    Ok(axum::Json(resp).into_response())
}

#[allow(clippy::too_many_arguments)]
fn stream(
    st: AppState,
    mut sub: Submission,
    prompts: Vec<Prompt>,
    echo: bool,
    want_logprobs: bool,
    n: usize,
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
            |choices: Vec<CompletionChoice>, usage: Option<Option<Usage>>| CompletionResponse {
                id: id.clone(),
                object: "text_completion",
                created,
                model: model.clone(),
                choices,
                usage,
            };
        let fe = st.cluster.frontend().clone();
        // Text offsets continue across chunks, per choice.
        let mut offsets = vec![0usize; sub.n_choices];
        let mut echoed = vec![false; sub.n_choices];
        let (mut open, mut completion_tokens, mut cached_tokens) = (sub.n_choices, 0usize, 0usize);
        while open > 0 {
            let u = match sub.next().await {
                Some(Ok(u)) => u,
                Some(Err(e)) => {
                    tx.error(&e).await;
                    break;
                }
                None => break,
            };
            completion_tokens += u.tokens.len();
            if u.index % n == 0 {
                cached_tokens += u.cached_tokens.unwrap_or(0);
            }
            if u.finish.is_some() {
                open -= 1;
            }
            let prompt = &prompts[u.index / n];
            let mut text = String::new();
            let mut prompt_part = None;
            if echo && !echoed[u.index] {
                // The prompt is echoed once, with the choice's first update.
                echoed[u.index] = true;
                text.push_str(&prompt.text);
                prompt_part = Some(prompt.ids.as_slice());
            }
            text.push_str(&u.text);
            if text.is_empty()
                && u.finish.is_none()
                && u.tokens.is_empty()
                && u.prompt_logprobs.is_none()
            {
                continue;
            }
            let logprobs = want_logprobs.then(|| {
                let pl = match (prompt_part, u.prompt_logprobs.as_deref()) {
                    (Some(ids), Some(lps)) => Some((ids, lps)),
                    _ => None,
                };
                legacy_logprobs(&fe, pl, &u.tokens, offsets[u.index])
            });
            offsets[u.index] += text.len();
            let c = chunk(
                vec![CompletionChoice {
                    index: u.index,
                    text,
                    logprobs,
                    finish_reason: u.finish,
                }],
                usage_field.clone(),
            );
            if !tx.json(&c).await {
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
