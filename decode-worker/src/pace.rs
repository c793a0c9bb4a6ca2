//! What a decode worker tells the scheduler's placement (the load it publishes) and, sharing
//! its host's cores, its pacer each step (`protocol::cores`): the prompts it has queued and the
//! credit its streams have against the pace.

use crate::plan::{Budget, Work};
use crate::{Seq, Worker};
use protocol::cores::{MIN_CHUNK, Pacer, StepCost, StepWork};
use std::sync::atomic::Ordering;
use std::time::Instant;

/// A planned step as the pacer times it: its work ([`StepCost`]), and for the trace its tokens,
/// how deep into its prompt its deepest chunk starts, and its attention pairs (of the chunks,
/// of the decode tokens) — what `scripts/bench/step_fit.py` reads.
pub(crate) struct Timed {
    work: f64,
    tokens: usize,
    deepest: Option<usize>,
    prefill_pairs: f64,
    decode_pairs: f64,
}

impl Worker {
    /// The step `plan` as its pacer times it; `None` for a worker not pacing.
    pub(crate) fn timed(&self, plan: &[(usize, Work)]) -> Option<Timed> {
        let cost = self.pacer.as_ref()?.cost();
        let mut t = Timed {
            work: 0.0,
            tokens: 0,
            deepest: None,
            prefill_pairs: 0.0,
            decode_pairs: 0.0,
        };
        for &(i, w) in plan {
            t.work += w.cost(&cost);
            t.tokens += w.tokens();
            match w {
                Work::Chunk { from, to } => {
                    t.deepest = t.deepest.max(Some(from));
                    t.prefill_pairs += protocol::cores::prefill_pairs(from, to);
                }
                Work::Decode => t.decode_pairs += self.running[i].kv.len() as f64,
            }
        }
        Some(t)
    }

    /// After the step `t` that began at `started`: the pacer learns its time, and the worker
    /// leaves the cores to a pass for the rest of the period.
    pub(crate) fn rest_after(&mut self, t: Timed, started: Instant) {
        let Some(p) = self.pacer.as_mut() else {
            return;
        };
        tracing::trace!(
            tokens = t.tokens,
            work = t.work,
            deepest = t.deepest,
            prefill_pairs = t.prefill_pairs,
            decode_pairs = t.decode_pairs,
            predicted_ms = p.step_seconds(t.work).map(|s| s * 1e3),
            took_ms = started.elapsed().as_secs_f64() * 1e3,
            "step timed"
        );
        let rest = p.rest(t.tokens, t.prefill_pairs, started);
        if !rest.is_zero() {
            kernels::pool::rest(); // its idle threads sleep too, rather than spin
            std::thread::sleep(rest);
        }
    }

    /// What placement prices: the positions held and the prefill work left.
    pub(crate) fn publish_load(&self) {
        let context = self.running.iter().map(|s| s.kv.len()).sum();
        self.stats.context.store(context, Ordering::Relaxed);
        self.stats
            .prefill_tokens
            .store(self.queued_prompt_tokens(), Ordering::Relaxed);
    }

    /// What the next step may compute: the batch budget, and the work the pacer allows of it.
    pub(crate) fn step_budget(&self) -> Budget {
        let max = self.cfg.max_batch_tokens;
        let Some(p) = self.pacer.as_ref() else {
            return Budget::tokens(max);
        };
        let cost = p.cost();
        let decoding = self.running.iter().filter(|s| s.decoding()).count();
        let decode = decoding as f64 * StepCost::DECODE;
        // Run whole: the budget's tokens over the queue, oldest first; full, the rest of the
        // budget as a new prompt's.
        let (mut whole, mut left) = (decode, max.saturating_sub(decoding));
        let now = std::time::Instant::now();
        let queued: Vec<(f64, f64)> = self
            .queued_prompts()
            .map(|(from, to, s)| {
                let n = left.min(to - from);
                whole += cost.chunk(from, from + n);
                left -= n;
                let waited = now.duration_since(s.queued_at).as_secs_f64();
                (cost.chunk(from, to), waited)
            })
            .collect();
        let step = StepWork {
            decode,
            whole,
            full: whole + cost.chunk(0, left),
        };
        let credits = self.credits(p, decode);
        let work = p.step_work(step, &credits, &queued);
        tracing::trace!(
            decoding,
            work,
            whole,
            streams = credits.len(),
            least = protocol::cores::least_credit(&credits),
            on_pace = protocol::cores::overrun(&credits, f64::INFINITY, p.period().as_secs_f64()),
            queued = queued.len(),
            fresh = queued
                .iter()
                .filter(|q| q.1 <= p.hold().as_secs_f64())
                .count(),
            "paced step"
        );
        Budget {
            tokens: max,
            work,
            cost,
            floor: MIN_CHUNK,
        }
    }

    /// Prompt tokens still to prefill, running and waiting.
    fn queued_prompt_tokens(&self) -> usize {
        self.queued_prompts().map(|(from, to, _)| to - from).sum()
    }

    /// The positions each prompt still has to prefill (`from..to`), in the order they are
    /// served.
    pub(crate) fn queued_prompts(&self) -> impl Iterator<Item = (usize, usize, &Seq)> + '_ {
        self.running
            .iter()
            .filter(|s| !s.decoding())
            .map(|s| (s.kv.len().min(s.target_len()), s.target_len(), s))
            .chain(self.waiting.iter().map(|s| (0, s.target_len(), s)))
    }

    /// The decoding streams' credits against the pace (`protocol::cores::stream_credit`; a
    /// decode-only step of `decode` work), of those whose first token came within the hold (the
    /// others are lost already); none before the step time is known.
    pub(crate) fn credits(&self, pacer: &Pacer, decode: f64) -> Vec<f64> {
        let Some(base) = pacer.step_seconds(decode) else {
            return Vec::new();
        };
        let (period, now) = (pacer.period().as_secs_f64(), std::time::Instant::now());
        self.running
            .iter()
            .filter(|s| s.decoding())
            .filter_map(|s| {
                let first = s.first_at?;
                if first.duration_since(s.queued_at) > pacer.hold() {
                    return None;
                }
                let since = now.duration_since(first).as_secs_f64();
                // A request without max_tokens may stop anywhere: lend against no more than
                // a long answer's tokens.
                let outputs = s.state.params.max_tokens.min(512);
                let made = s.generated.len();
                protocol::cores::stream_credit(
                    period,
                    since,
                    made.saturating_sub(1),
                    outputs.saturating_sub(made),
                    outputs,
                    base,
                )
                .into()
            })
            .collect()
    }
}
