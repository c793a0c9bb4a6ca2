//! One sequence's generation state: turns a logits row into the next [`TokenEvent`],
//! applying `logit_bias`, `min_tokens`, the output constraint (`response_format`,
//! `structured_outputs`: a token mask from `frontend::constraint`), EOS/stop tokens,
//! `max_tokens` and the context limit. The prefill worker uses it for the first token and the
//! decode worker for the rest, so both phases decide identically; a sequence resumed elsewhere
//! replays its tokens into the constraint and continues exactly.

use crate::request::{FinishReason, GenerationParams, TokenEvent};
use crate::sampler::{logprobs, sample};
use crate::tokenizer::TokenId;
use frontend::Frontend;
use frontend::constraint::{ConstraintError, ConstraintMatcher};
use std::borrow::Cow;
use std::collections::HashMap;

/// Where a sequence stands.
#[derive(Debug, Clone)]
pub struct GenerationState {
    pub params: GenerationParams,
    pub prompt_len: usize,
    /// Tokens generated so far.
    pub generated: usize,
    counts: HashMap<TokenId, u32>,
    /// Where the output stands in its constraint; built on the first token (it needs the
    /// tokenizer), after replaying `replay`.
    matcher: Option<Box<ConstraintMatcher>>,
    /// Tokens generated before this state existed (a resumed sequence), for the constraint.
    replay: Vec<TokenId>,
}

impl GenerationState {
    pub fn new(params: GenerationParams, prompt_len: usize) -> GenerationState {
        GenerationState {
            params,
            prompt_len,
            generated: 0,
            counts: HashMap::new(),
            matcher: None,
            replay: Vec::new(),
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
        if s.params.constraint.is_some() {
            s.replay = tokens.to_vec();
        }
        s
    }

    /// Absolute position of the next token.
    pub fn position(&self) -> usize {
        self.prompt_len + self.generated
    }

    /// The sequence's constraint matcher, built on first use (after replaying the tokens of a
    /// resumed sequence); `None` without a constraint.
    fn matcher(
        &mut self,
        fe: &Frontend,
    ) -> Result<Option<&mut ConstraintMatcher>, ConstraintError> {
        let Some(c) = &self.params.constraint else {
            return Ok(None);
        };
        if self.matcher.is_none() {
            let mut m = fe.grammars()?.matcher(c)?;
            m.replay(&std::mem::take(&mut self.replay))?;
            self.matcher = Some(Box::new(m));
        }
        Ok(self.matcher.as_deref_mut())
    }

    /// Whether the output is constrained (its token mask is worth computing ahead).
    pub fn is_constrained(&self) -> bool {
        self.params.constraint.is_some()
    }

    /// Computes the next token's mask ahead of [`next`](Self::next), which then only applies
    /// it: the decode loop runs this beside the forward pass that computes the logits. A
    /// no-op without a constraint.
    pub fn prepare(&mut self, fe: &Frontend) -> Result<(), ConstraintError> {
        match self.matcher(fe)? {
            Some(m) => m.prepare(),
            None => Ok(()),
        }
    }

    /// Samples the next token from `logits` and says whether the sequence ends with it. Fails
    /// only when the constraint cannot be applied (it compiled in the scheduler; a failure here
    /// is the worker's).
    pub fn next(
        &mut self,
        fe: &Frontend,
        logits: &[f32],
        max_context: usize,
    ) -> Result<TokenEvent, ConstraintError> {
        let mut l = Cow::Borrowed(logits);
        for &(t, bias) in &self.params.logit_bias {
            if let Some(v) = l.to_mut().get_mut(t as usize) {
                *v += bias;
            }
        }
        if let Some(m) = self.matcher(fe)? {
            m.mask(l.to_mut())?;
        }
        let tok = &fe.tokenizer;
        let p = &self.params;
        if self.generated < p.min_tokens {
            let held = |t: usize| {
                tok.eog.contains(&(t as TokenId)) || p.stop_token_ids.contains(&(t as TokenId))
            };
            // Only what `min_tokens` holds back may end a constrained output: the constraint wins.
            let other = l.iter().enumerate().any(|(t, v)| v.is_finite() && !held(t));
            if other {
                let l = l.to_mut();
                for &t in tok.eog.iter().chain(&p.stop_token_ids) {
                    if let Some(v) = l.get_mut(t as usize) {
                        *v = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let logits = &l[..];
        let token = sample(&p.sampling, logits, &self.counts, self.position() as u64);
        let lp = p.logprobs.map(|n| logprobs(logits, token, n));
        *self.counts.entry(token).or_default() += 1;
        self.generated += 1;
        let complete = match self.matcher.as_mut() {
            Some(m) => {
                m.consume(token)?;
                m.is_stopped()
            }
            None => false,
        };
        let finish = if (!p.ignore_eos && tok.is_eog(token))
            || p.stop_token_ids.contains(&token)
            || complete
        {
            Some(FinishReason::Stop)
        } else if self.generated >= p.max_tokens || self.position() >= max_context {
            Some(FinishReason::Length)
        } else {
            None
        };
        Ok(TokenEvent {
            token,
            logprobs: lp,
            finish,
        })
    }
}

/// Computes the next-token masks of `states` (constrained sequences about to sample from the
/// logits `forward` computes) and runs `forward`, overlapping the two where a core is free:
/// with a core the compute pool leaves idle, the masks are computed on a thread of their own
/// while `forward` runs, so the step does not wait for them. Where the pool has every core,
/// the masks are spread over the pool's threads first instead: a third thread would only
/// preempt the pool's threads in the middle of the forward pass's kernels (each call waits
/// for its slowest thread), which measured slower than sharing the cores this way. A mask
/// that fails is computed again, and its error reported, when the token is sampled.
pub fn with_masks_ahead<R>(
    fe: &Frontend,
    states: Vec<&mut GenerationState>,
    forward: impl FnOnce() -> R,
) -> R {
    // Read once: available_parallelism reads the affinity mask and cgroup files.
    static SPARE_CORE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let spare_core = *SPARE_CORE.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        cores > kernels::pool::global().threads()
    });
    masks_ahead(fe, states, spare_core, forward)
}

/// [`with_masks_ahead`] with the way chosen: on a thread of its own beside `forward`
/// (`own_thread`), or over the compute pool before it.
pub fn masks_ahead<R>(
    fe: &Frontend,
    states: Vec<&mut GenerationState>,
    own_thread: bool,
    forward: impl FnOnce() -> R,
) -> R {
    if states.is_empty() {
        return forward();
    }
    if own_thread {
        return std::thread::scope(|scope| {
            scope.spawn(move || {
                for st in states {
                    let _ = st.prepare(fe);
                }
            });
            forward()
        });
    }
    let states: Vec<std::sync::Mutex<&mut GenerationState>> =
        states.into_iter().map(std::sync::Mutex::new).collect();
    kernels::pool::global().run(states.len(), &|i| {
        let mut st = states[i].lock().expect("one task per state");
        let _ = st.prepare(fe);
    });
    forward()
}
