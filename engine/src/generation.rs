//! One sequence's generation state: turns a logits row into the next [`TokenEvent`],
//! applying `min_tokens`, EOS/stop tokens, `max_tokens` and the context limit. The prefill
//! worker uses it for the first token and the decode worker for the rest, so both phases
//! decide identically.

use crate::request::{FinishReason, GenerationParams, TokenEvent};
use crate::sampler::{logprobs, sample};
use crate::tokenizer::{TokenId, Tokenizer};
use std::collections::HashMap;

/// Where a sequence stands.
#[derive(Debug, Clone)]
pub struct GenerationState {
    pub params: GenerationParams,
    pub prompt_len: usize,
    /// Tokens generated so far.
    pub generated: usize,
    counts: HashMap<TokenId, u32>,
}

impl GenerationState {
    pub fn new(params: GenerationParams, prompt_len: usize) -> GenerationState {
        GenerationState {
            params,
            prompt_len,
            generated: 0,
            counts: HashMap::new(),
        }
    }

    /// Rebuilds the state of a sequence that already produced `tokens` (used when a request
    /// is re-prefilled elsewhere and must continue exactly where it was).
    pub fn resume(
        params: GenerationParams,
        prompt_len: usize,
        tokens: &[TokenId],
    ) -> GenerationState {
        let mut s = GenerationState::new(params, prompt_len);
        for &t in tokens {
            *s.counts.entry(t).or_default() += 1;
        }
        s.generated = tokens.len();
        s
    }

    /// Absolute position of the next token.
    pub fn position(&self) -> usize {
        self.prompt_len + self.generated
    }

    /// Samples the next token from `logits` and says whether the sequence ends with it.
    pub fn next(&mut self, tok: &Tokenizer, logits: &[f32], max_context: usize) -> TokenEvent {
        let p = &self.params;
        let masked;
        let logits = if self.generated < p.min_tokens {
            let mut l = logits.to_vec();
            for &t in tok.eog.iter().chain(&p.stop_token_ids) {
                if let Some(v) = l.get_mut(t as usize) {
                    *v = f32::NEG_INFINITY;
                }
            }
            masked = l;
            &masked[..]
        } else {
            logits
        };
        let token = sample(&p.sampling, logits, &self.counts, self.position() as u64);
        let lp = p.logprobs.map(|n| logprobs(logits, token, n));
        *self.counts.entry(token).or_default() += 1;
        self.generated += 1;
        let finish = if (!p.ignore_eos && tok.is_eog(token)) || p.stop_token_ids.contains(&token) {
            Some(FinishReason::Stop)
        } else if self.generated >= p.max_tokens || self.position() >= max_context {
            Some(FinishReason::Length)
        } else {
            None
        };
        TokenEvent {
            token,
            logprobs: lp,
            finish,
        }
    }
}
