//! HTTP handlers, one file per endpoint family.

pub mod chat;
pub mod completions;
pub mod models;
pub mod tokenize;

use crate::error::ApiError;
use crate::pipeline::{ChoiceUpdate, Submission};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use frontend::TokenId;
use frontend::sampling::TokenLogprobs;
use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio_stream::wrappers::ReceiverStream;

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// A finished choice, gathered from its updates.
#[derive(Debug, Default)]
pub(crate) struct Collected {
    pub text: String,
    pub tokens: Vec<(TokenId, Option<TokenLogprobs>)>,
    pub prompt_logprobs: Option<Vec<TokenLogprobs>>,
    pub cached_tokens: usize,
    pub finish: Option<&'static str>,
}

impl Collected {
    fn absorb(&mut self, u: ChoiceUpdate) {
        self.text.push_str(&u.text);
        self.tokens.extend(u.tokens);
        if u.prompt_logprobs.is_some() {
            self.prompt_logprobs = u.prompt_logprobs;
        }
        self.cached_tokens += u.cached_tokens.unwrap_or(0);
        if u.finish.is_some() {
            self.finish = u.finish;
        }
    }
}

/// Usage of a finished non-streaming request: `n` choices per prompt, each prompt's
/// prefix-cache hit counted once (its first choice's).
pub(crate) fn usage(
    prompt_tokens: usize,
    choices: &[Collected],
    n: usize,
) -> crate::protocol::Usage {
    let completion_tokens = choices.iter().map(|c| c.tokens.len()).sum::<usize>();
    let cached_tokens = choices
        .iter()
        .step_by(n)
        .map(|c| c.cached_tokens)
        .sum::<usize>();
    crate::protocol::Usage::new(prompt_tokens, completion_tokens, cached_tokens)
}

/// Waits for every choice to finish (non-streaming responses).
pub(crate) async fn collect(mut sub: Submission) -> Result<Vec<Collected>, ApiError> {
    let mut out: Vec<Collected> = (0..sub.n_choices).map(|_| Collected::default()).collect();
    let mut open = sub.n_choices;
    while open > 0 {
        match sub.next().await {
            Some(Ok(u)) => {
                let i = u.index;
                let done = u.finish.is_some();
                out[i].absorb(u);
                if done {
                    open -= 1;
                }
            }
            Some(Err(e)) => return Err(e),
            None => {
                return Err(ApiError::Internal(
                    "generation ended without finishing".into(),
                ));
            }
        }
    }
    Ok(out)
}

/// The sending side of a server-sent-events response.
pub(crate) struct SseTx(tokio::sync::mpsc::Sender<Result<Event, Infallible>>);

/// A streaming response and the handle that feeds it; dropping the response (the client
/// went away) makes every send fail, which ends the feeding task.
pub(crate) fn sse_channel() -> (SseTx, Response) {
    let (tx, rx) = tokio::sync::mpsc::channel(32);
    let resp = Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response();
    (SseTx(tx), resp)
}

impl SseTx {
    /// Sends one JSON event; false when the client is gone.
    pub(crate) async fn json(&self, v: &impl serde::Serialize) -> bool {
        let data = serde_json::to_string(v).expect("response types serialize");
        self.0.send(Ok(Event::default().data(data))).await.is_ok()
    }

    /// An error in the middle of a stream: OpenAI's envelope as one event.
    pub(crate) async fn error(&self, e: &ApiError) {
        self.json(&e.body()).await;
    }

    /// The closing `data: [DONE]`.
    pub(crate) async fn done(&self) {
        let _ = self.0.send(Ok(Event::default().data("[DONE]"))).await;
    }
}
