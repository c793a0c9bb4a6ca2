//! The routing rules, as pure functions of what the scheduler knows about its workers (their
//! last reported load and this scheduler's own requests on them), so each decision is a unit
//! test away. The callers in [`super`] gather the loads and act on the answer.

/// A decode worker as routing sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLoad {
    pub healthy: bool,
    /// It serves the scheduler's model (equal fingerprints): a stream resumed there continues
    /// with the same weights and formats.
    pub same_model: bool,
    /// Requests this scheduler has on it now.
    pub inflight: usize,
    /// Requests it reported waiting to start.
    pub waiting: usize,
    /// KV blocks it reported free.
    pub free_blocks: u64,
}

/// The decode worker for a new (or resumed) request: a healthy one serving the scheduler's
/// model with the fewest requests (in flight plus waiting), then the most free KV blocks; ties
/// go to the first listed.
pub fn pick_decode(workers: &[DecodeLoad]) -> Option<usize> {
    workers
        .iter()
        .enumerate()
        .filter(|(_, w)| w.healthy && w.same_model)
        .min_by_key(|(_, w)| (w.inflight + w.waiting, u64::MAX - w.free_blocks))
        .map(|(i, _)| i)
}

/// A prefill worker as routing sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefillLoad {
    pub healthy: bool,
    /// It already failed this request.
    pub tried: bool,
    /// Its model's fingerprint.
    pub fingerprint: u64,
    /// Prefills on it now: this scheduler's in flight there, or what it reported queued,
    /// whichever is more.
    pub queue: usize,
}

/// The prefill worker for a prompt whose KV goes to a decode worker of `fingerprint`: a
/// healthy, untried one of the same model with the shortest queue.
pub fn pick_prefill(workers: &[PrefillLoad], fingerprint: u64) -> Option<usize> {
    workers
        .iter()
        .enumerate()
        .filter(|(_, w)| w.healthy && !w.tried && w.fingerprint == fingerprint)
        .min_by_key(|(_, w)| w.queue)
        .map(|(i, _)| i)
}

/// The rules that choose between disaggregated and local prefill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disaggregation {
    /// Prompts shorter than this are prefilled on the decode worker.
    pub min_tokens: usize,
    /// The least busy prefill worker's queue at which the decode worker prefills instead
    /// (Dynamo's rule); 0: no limit.
    pub max_prefill_queue: usize,
}

/// Where a prompt is prefilled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillPlace {
    /// On the chosen prefill worker (an index into the loads given).
    PrefillWorker(usize),
    /// On the decode worker itself, and why.
    Decode(LocalReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalReason {
    /// Shorter than [`Disaggregation::min_tokens`]: moving its KV costs more than it saves.
    Short,
    /// No prefill worker can take it.
    NoPrefillWorker,
    /// The least busy prefill worker's queue reached [`Disaggregation::max_prefill_queue`].
    PrefillBusy,
    /// The cost model predicts fewer SLO misses (or an earlier first token) here
    /// ([`crate::plan::placement`]).
    Predicted,
    /// Prompt log-probabilities are wanted: the decode worker computes them chunk by chunk
    /// (`max_num_batched_tokens` rows of logits at a time), where a prefill worker's single
    /// pass would hold prompt × vocabulary logits at once.
    PromptLogprobs,
}

/// What the rules need to know about one prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptShape {
    /// Positions to prefill.
    pub tokens: usize,
    /// Of those, the leading ones the chosen decode worker is expected to hold already or to
    /// fetch from the KV store (routing's view: its block index and the store's): only the
    /// rest is computed, so only the rest counts against the rules' thresholds (Dynamo's
    /// conditional disaggregation weighs the prefill length less the prefix hit likewise).
    pub cached: usize,
    /// Log-probabilities of the prompt's tokens are wanted (`echo` with `logprobs`).
    pub prompt_logprobs: bool,
}

impl Disaggregation {
    /// Where a prompt is prefilled, given the prefill workers that could take it.
    pub fn place(
        &self,
        prompt: PromptShape,
        prefill: &[PrefillLoad],
        fingerprint: u64,
    ) -> PrefillPlace {
        if prompt.tokens.saturating_sub(prompt.cached) < self.min_tokens {
            return PrefillPlace::Decode(LocalReason::Short);
        }
        if prompt.prompt_logprobs {
            return PrefillPlace::Decode(LocalReason::PromptLogprobs);
        }
        let Some(best) = pick_prefill(prefill, fingerprint) else {
            return PrefillPlace::Decode(LocalReason::NoPrefillWorker);
        };
        if self.max_prefill_queue > 0 && prefill[best].queue >= self.max_prefill_queue {
            return PrefillPlace::Decode(LocalReason::PrefillBusy);
        }
        PrefillPlace::PrefillWorker(best)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(healthy: bool, inflight: usize, waiting: usize, free_blocks: u64) -> DecodeLoad {
        DecodeLoad {
            healthy,
            same_model: true,
            inflight,
            waiting,
            free_blocks,
        }
    }

    fn shape(tokens: usize) -> PromptShape {
        PromptShape {
            tokens,
            cached: 0,
            prompt_logprobs: false,
        }
    }

    fn p(healthy: bool, tried: bool, fingerprint: u64, queue: usize) -> PrefillLoad {
        PrefillLoad {
            healthy,
            tried,
            fingerprint,
            queue,
        }
    }

    #[test]
    fn decode_goes_to_the_least_loaded_healthy_worker() {
        assert_eq!(pick_decode(&[]), None);
        assert_eq!(pick_decode(&[d(false, 0, 0, 100)]), None);
        // Fewest requests first, counting both what we sent and what it queues.
        assert_eq!(
            pick_decode(&[d(true, 2, 1, 100), d(true, 1, 1, 10)]),
            Some(1)
        );
        // Then the most free blocks.
        assert_eq!(
            pick_decode(&[d(true, 1, 0, 10), d(true, 0, 1, 50)]),
            Some(1)
        );
        // An unhealthy idle worker loses to a busy healthy one; ties go to the first.
        assert_eq!(
            pick_decode(&[d(false, 0, 0, 99), d(true, 5, 5, 1)]),
            Some(1)
        );
        assert_eq!(pick_decode(&[d(true, 1, 0, 7), d(true, 1, 0, 7)]), Some(0));
        // Another model's worker (another file, precision or KV format) is never picked, even
        // idle: failover must not resume a stream on other weights.
        let other = DecodeLoad {
            same_model: false,
            ..d(true, 0, 0, 99)
        };
        assert_eq!(pick_decode(&[other, d(true, 9, 9, 1)]), Some(1));
        assert_eq!(pick_decode(&[other]), None);
    }

    #[test]
    fn prefill_goes_to_the_shortest_queue_of_the_same_model_not_yet_tried() {
        let ws = [
            p(true, false, 1, 3),
            p(true, true, 1, 0),
            p(true, false, 2, 0),
            p(false, false, 1, 0),
            p(true, false, 1, 2),
        ];
        assert_eq!(pick_prefill(&ws, 1), Some(4));
        assert_eq!(pick_prefill(&ws, 2), Some(2));
        assert_eq!(pick_prefill(&ws, 3), None);
    }

    #[test]
    fn disaggregation_rules() {
        let rules = Disaggregation {
            min_tokens: 64,
            max_prefill_queue: 0,
        };
        let ws = [p(true, false, 1, 5)];
        assert_eq!(
            rules.place(shape(63), &ws, 1),
            PrefillPlace::Decode(LocalReason::Short)
        );
        assert_eq!(
            rules.place(shape(64), &ws, 1),
            PrefillPlace::PrefillWorker(0)
        );
        // A long prompt whose prefix the decode worker holds (or fetches) is short to compute.
        let mostly_cached = |cached| PromptShape {
            cached,
            ..shape(1000)
        };
        assert_eq!(
            rules.place(mostly_cached(960), &ws, 1),
            PrefillPlace::Decode(LocalReason::Short)
        );
        assert_eq!(
            rules.place(mostly_cached(936), &ws, 1),
            PrefillPlace::PrefillWorker(0)
        );
        assert_eq!(
            rules.place(shape(64), &ws, 2),
            PrefillPlace::Decode(LocalReason::NoPrefillWorker)
        );
        let busy = Disaggregation {
            max_prefill_queue: 5,
            ..rules
        };
        assert_eq!(
            busy.place(shape(500), &ws, 1),
            PrefillPlace::Decode(LocalReason::PrefillBusy)
        );
        assert_eq!(
            busy.place(shape(500), &[p(true, false, 1, 4)], 1),
            PrefillPlace::PrefillWorker(0)
        );
        let scored = PromptShape {
            tokens: 500,
            cached: 0,
            prompt_logprobs: true,
        };
        assert_eq!(
            rules.place(scored, &ws, 1),
            PrefillPlace::Decode(LocalReason::PromptLogprobs)
        );
    }
}
