//! HTTP handlers, one file per endpoint family.

pub mod chat;
pub mod completions;
pub mod models;

use crate::error::ApiError;
use crate::pipeline::{ChoiceUpdate, Submission};
use engine::TokenId;
use engine::sampler::TokenLogprobs;
use std::time::{SystemTime, UNIX_EPOCH};

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
    pub finish: Option<&'static str>,
}

impl Collected {
    fn absorb(&mut self, u: ChoiceUpdate) {
        self.text.push_str(&u.text);
        self.tokens.extend(u.tokens);
        if u.prompt_logprobs.is_some() {
            self.prompt_logprobs = u.prompt_logprobs;
        }
        if u.finish.is_some() {
            self.finish = u.finish;
        }
    }
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
