//! From submitted choices to text: each choice's worker events are detokenized, checked for
//! stop strings and timed, and arrive on one channel as [`ChoiceUpdate`]s that the chat and
//! completions endpoints format. Dropping the [`Submission`] (a client that went away)
//! cancels every choice on the workers.

use crate::cluster::Cluster;
use crate::error::ApiError;
use crate::metrics as m;
use frontend::request::{
    CancellationToken, FinishReason, GenerationParams, RequestId, WorkerError, WorkerEvent,
};
use frontend::sampling::TokenLogprobs;
use frontend::stop::StopMatcher;
use frontend::tokenizer::StreamDecoder;
use frontend::{Frontend, TokenId};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use tokio::sync::mpsc;

/// What one choice produced since its last update.
#[derive(Debug, Default)]
pub struct ChoiceUpdate {
    pub index: usize,
    /// Log-probabilities of prompt tokens 1.. (first update only, when asked for).
    pub prompt_logprobs: Option<Vec<TokenLogprobs>>,
    /// New text that is safe to show (stop strings are held back until resolved).
    pub text: String,
    /// Tokens generated in this update, with their log-probabilities if asked for.
    pub tokens: Vec<(TokenId, Option<TokenLogprobs>)>,
    /// Prompt tokens served from the prefix cache (first update only).
    pub cached_tokens: Option<usize>,
    /// Set on a choice's last update: "stop" or "length".
    pub finish: Option<&'static str>,
}

/// Cancels every choice of a request when dropped.
pub struct CancelGuard(Vec<CancellationToken>);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        for c in &self.0 {
            c.cancel();
        }
    }
}

/// A request in flight. Dropping it cancels every choice on the workers.
pub struct Submission {
    updates: mpsc::Receiver<Result<ChoiceUpdate, ApiError>>,
    pub n_choices: usize,
    _guard: CancelGuard,
}

impl Submission {
    /// The next update of any choice; `None` once every choice's driver has ended.
    pub async fn next(&mut self) -> Option<Result<ChoiceUpdate, ApiError>> {
        self.updates.recv().await
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Submits `n` choices for each prompt; choice `p·n + i` samples with seed `seed + i`.
pub fn submit(
    cluster: &Cluster,
    prompts: Vec<Vec<TokenId>>,
    params: &GenerationParams,
    n: usize,
    stops: &[String],
    endpoint: &'static str,
) -> Result<Submission, ApiError> {
    let started = Instant::now();
    let total = prompts.len() * n;
    let (tx, rx) = mpsc::channel(64.max(total * 4));
    let mut cancels = Vec::with_capacity(total);
    for (p, prompt) in prompts.into_iter().enumerate() {
        for i in 0..n {
            let mut params = params.clone();
            params.sampling.seed = params.sampling.seed.wrapping_add(i as u64);
            let cancel = CancellationToken::default();
            let id = RequestId(NEXT_ID.fetch_add(1, Ordering::Relaxed));
            // On failure the guard built from `cancels` cancels what was already submitted.
            let events = match cluster.submit(id, prompt.clone(), params, cancel.clone()) {
                Ok(ev) => ev,
                Err(e) => {
                    drop(CancelGuard(cancels));
                    return Err(e);
                }
            };
            cancels.push(cancel.clone());
            let driver = ChoiceDriver {
                index: p * n + i,
                fe: cluster.frontend().clone(),
                stop: StopMatcher::new(stops.to_vec()),
                decoder: StreamDecoder::default(),
                cancel,
                started,
                endpoint,
            };
            tokio::spawn(driver.run(events, tx.clone()));
        }
    }
    Ok(Submission {
        updates: rx,
        n_choices: total,
        _guard: CancelGuard(cancels),
    })
}

struct ChoiceDriver {
    index: usize,
    fe: Arc<Frontend>,
    stop: StopMatcher,
    decoder: StreamDecoder,
    cancel: CancellationToken,
    started: Instant,
    endpoint: &'static str,
}

impl ChoiceDriver {
    async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<WorkerEvent>,
        out: mpsc::Sender<Result<ChoiceUpdate, ApiError>>,
    ) {
        let mut first_token_at: Option<Instant> = None;
        let mut n_tokens = 0usize;
        loop {
            let ev = tokio::select! {
                ev = events.recv() => ev,
                _ = out.closed() => { self.cancel.cancel(); return; }
            };
            let mut up = ChoiceUpdate {
                index: self.index,
                ..Default::default()
            };
            match ev {
                None => {
                    let _ = out
                        .send(Err(ApiError::Internal(
                            "the worker dropped the request".into(),
                        )))
                        .await;
                    return;
                }
                Some(WorkerEvent::Error(e)) => {
                    let err = match e {
                        WorkerError::Overloaded(msg) => ApiError::Overloaded(msg),
                        WorkerError::Internal(msg) => ApiError::Internal(msg),
                    };
                    let _ = out.send(Err(err)).await;
                    return;
                }
                Some(WorkerEvent::PromptLogprobs(lp)) => up.prompt_logprobs = Some(lp),
                Some(WorkerEvent::Prefilled { cached_tokens }) => {
                    crate::metrics::record_prefix_hit(self.endpoint, cached_tokens);
                    up.cached_tokens = Some(cached_tokens);
                }
                Some(WorkerEvent::Done) => {
                    up.finish = Some("length");
                }
                Some(WorkerEvent::Token(t)) => {
                    let now = Instant::now();
                    if first_token_at.is_none() {
                        first_token_at = Some(now);
                        m::record_ttft(self.endpoint, now - self.started);
                    }
                    n_tokens += 1;
                    let piece = self.decoder.push(&self.fe.tokenizer, t.token);
                    let (text, stopped) = self.stop.push(&piece);
                    up.text = text;
                    up.tokens.push((t.token, t.logprobs));
                    if stopped {
                        self.cancel.cancel();
                        up.finish = Some("stop");
                    } else if let Some(reason) = t.finish {
                        let (tail, stopped) = self.stop.push(&self.decoder.finish());
                        up.text.push_str(&tail);
                        if !stopped {
                            up.text.push_str(&self.stop.flush());
                        }
                        up.finish = Some(if stopped { "stop" } else { finish_name(reason) });
                    }
                }
            }
            let done = up.finish.is_some();
            if done {
                m::record_generation(
                    self.endpoint,
                    n_tokens,
                    first_token_at.map(|t0| Instant::now() - t0),
                );
            }
            if out.send(Ok(up)).await.is_err() {
                self.cancel.cancel();
                return;
            }
            if done {
                return;
            }
        }
    }
}

fn finish_name(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}
