//! What a worker is asked to generate and what it streams back: the types the scheduler,
//! the prefill worker and the decode worker share (in-process today; the gRPC protocol of the
//! disaggregated cluster carries the same fields).

use crate::sampling::{SamplingParams, TokenLogprobs};
use crate::tokenizer::TokenId;

/// A request's id, unique within the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId(pub u64);

/// Everything a worker needs to generate one completion.
#[derive(Debug, Clone)]
pub struct GenerationParams {
    pub sampling: SamplingParams,
    /// Tokens to generate at most (0: only score the prompt).
    pub max_tokens: usize,
    /// EOS/stop tokens are ignored until this many tokens exist.
    pub min_tokens: usize,
    pub ignore_eos: bool,
    /// Extra token ids that end generation.
    pub stop_token_ids: Vec<TokenId>,
    /// Top log-probabilities to report per generated token (`None`: no logprobs).
    pub logprobs: Option<usize>,
    /// Top log-probabilities to report per prompt token (`echo` with `logprobs`).
    pub prompt_logprobs: Option<usize>,
    /// Added to the logits of these tokens before sampling (OpenAI's `logit_bias`; ids
    /// distinct and in the vocabulary, biases in [-100, 100]).
    pub logit_bias: Vec<(TokenId, f32)>,
    /// What the output must match (`response_format`, `structured_outputs`).
    pub constraint: Option<crate::constraint::Constraint>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS or a stop token (stop strings are matched by the scheduler).
    Stop,
    /// `max_tokens` or the context limit.
    Length,
}

/// One generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    pub token: TokenId,
    pub logprobs: Option<TokenLogprobs>,
    /// Set on the last token of the sequence.
    pub finish: Option<FinishReason>,
}

/// What a worker streams back for a request.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerEvent {
    /// The prompt is in the KV cache; this many of its tokens came from the prefix cache.
    Prefilled {
        cached_tokens: usize,
    },
    /// Log-probabilities of prompt tokens 1..n (token 0 has none), sent before any token.
    PromptLogprobs(Vec<TokenLogprobs>),
    Token(TokenEvent),
    /// Prompt scored and nothing to generate (`max_tokens: 0`).
    Done,
    /// The request failed on the worker; nothing more follows.
    Error(WorkerError),
}

/// A failure a worker reports for one request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WorkerError {
    /// No KV blocks left: the client should retry later.
    #[error("the server is out of KV-cache memory: {0}")]
    Overloaded(String),
    #[error("{0}")]
    Internal(String),
}

/// Cancelled by the scheduler when the client goes away: workers' compute loops check
/// `is_cancelled()` at each step (an atomic load) and drop the sequence; async code awaits
/// `cancelled()`.
pub use tokio_util::sync::CancellationToken;
