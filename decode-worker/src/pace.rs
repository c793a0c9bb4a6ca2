//! What a decode worker tells the scheduler's placement (the load it publishes) and, sharing
//! its host's cores, its pacer each step (`protocol::cores`): the prompts it has queued and the
//! credit its streams have against the pace.

use crate::{Seq, Worker};
use protocol::cores::Pacer;
use std::sync::atomic::Ordering;

impl Worker {
    /// What placement prices: the positions held and the prefill work left.
    pub(crate) fn publish_load(&self) {
        let context = self.running.iter().map(|s| s.kv.len()).sum();
        self.stats.context.store(context, Ordering::Relaxed);
        self.stats
            .prefill_tokens
            .store(self.queued_prompt_tokens(), Ordering::Relaxed);
    }

    /// The tokens the next step may compute, `decoding` of them decode tokens: the budget, or
    /// what the pacer allows of it.
    pub(crate) fn step_tokens(&self, decoding: usize) -> usize {
        let max = self.cfg.max_batch_tokens;
        let Some(p) = self.pacer.as_ref() else {
            return max;
        };
        let now = std::time::Instant::now();
        let queued: Vec<(usize, f64)> = self
            .queued_prompts()
            .map(|(left, s)| (left, now.duration_since(s.queued_at).as_secs_f64()))
            .collect();
        let credits = self.credits(p, decoding);
        let tokens = p.step_tokens(decoding, max, &credits, &queued);
        tracing::trace!(
            decoding,
            tokens,
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
        tokens
    }

    /// Prompt tokens still to prefill, running and waiting.
    fn queued_prompt_tokens(&self) -> usize {
        self.queued_prompts().map(|(left, _)| left).sum()
    }

    /// The prompt tokens each prompt still has to prefill, in the order they are served.
    pub(crate) fn queued_prompts(&self) -> impl Iterator<Item = (usize, &Seq)> + '_ {
        self.running
            .iter()
            .filter(|s| !s.decoding())
            .map(|s| (s.target_len().saturating_sub(s.kv.len()), s))
            .chain(self.waiting.iter().map(|s| (s.target_len(), s)))
    }

    /// The decoding streams' credits against the pace (`protocol::cores::stream_credit`), of
    /// those whose first token came within the hold (the others are lost already); none before
    /// the step time is known.
    pub(crate) fn credits(&self, pacer: &Pacer, decoding: usize) -> Vec<f64> {
        let Some(base) = pacer.decode_seconds(decoding) else {
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
