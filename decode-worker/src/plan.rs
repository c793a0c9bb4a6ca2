//! The step planner's decisions as pure functions of the batch's state (mistral.rs's
//! `Scheduler::schedule() -> SchedulerOutput`, vLLM's chunked-prefill budget): which waiting
//! sequence may start, and what each running sequence computes in the next forward call. The
//! worker gathers the state, reserves the memory (preempting when the pool runs short) and
//! runs the plan.

use protocol::cores::StepCost;

/// What one sequence contributes to a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// One token.
    Decode,
    /// Prefill of target positions `from..to`.
    Chunk { from: usize, to: usize },
}

impl Work {
    pub fn tokens(&self) -> usize {
        match *self {
            Work::Decode => 1,
            Work::Chunk { from, to } => to - from,
        }
    }

    /// Its work in token-equivalents.
    pub fn cost(&self, cost: &StepCost) -> f64 {
        match *self {
            Work::Decode => StepCost::DECODE,
            Work::Chunk { from, to } => cost.chunk(from, to),
        }
    }
}

/// What a step may still compute: batch tokens, and work in token-equivalents (the pacer's
/// bound, [`StepCost`]; infinite without one).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    pub tokens: usize,
    pub work: f64,
    pub cost: StepCost,
    /// Prompt tokens the step carries whatever its work allows (`protocol::cores::MIN_CHUNK`).
    pub floor: usize,
}

impl Budget {
    /// `tokens` batch tokens, no bound on their work.
    pub fn tokens(tokens: usize) -> Budget {
        Budget {
            tokens,
            work: f64::INFINITY,
            cost: StepCost::default(),
            floor: 0,
        }
    }

    /// A decoding sequence computes its token (never cut).
    pub fn take_decode(&mut self) {
        self.tokens = self.tokens.saturating_sub(1);
        self.work -= StepCost::DECODE;
    }

    /// Where a prompt at `have` of its `target` positions may prefill to within the budget.
    pub fn chunk_end(&self, have: usize, target: usize) -> usize {
        let fits = self.cost.chunk_within(have, self.work).max(self.floor);
        target.min(have.saturating_add(fits.min(self.tokens)))
    }

    pub fn take_chunk(&mut self, from: usize, to: usize) {
        self.tokens -= to - from;
        self.work -= self.cost.chunk(from, to);
        self.floor = self.floor.saturating_sub(to - from);
    }
}

/// A running sequence as the planner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqState {
    /// Its cache holds everything but the last generated token: it decodes one token.
    pub decoding: bool,
    /// Positions in its cache.
    pub have: usize,
    /// Positions it needs before it decodes (prompt plus tokens generated, but the last).
    pub target: usize,
    /// Positions its blocks can hold now.
    pub capacity: usize,
}

/// This step's work, in batch order: one token for every decoding sequence, then prefill
/// chunks in batch order (oldest first) until the `budget` is spent; a chunk never runs past
/// the blocks its sequence holds.
pub fn compose(seqs: &[SeqState], mut budget: Budget) -> Vec<(usize, Work)> {
    let mut plan = Vec::new();
    for (i, s) in seqs.iter().enumerate() {
        if s.decoding {
            plan.push((i, Work::Decode));
            budget.take_decode();
        }
    }
    for (i, s) in seqs.iter().enumerate() {
        if s.decoding {
            continue;
        }
        let to = budget.chunk_end(s.have, s.target).min(s.capacity);
        if to > s.have {
            plan.push((i, Work::Chunk { from: s.have, to }));
            budget.take_chunk(s.have, to);
        }
    }
    plan
}

/// Whether the next waiting sequence may join a batch of `running` sequences: its first
/// chunk's blocks plus one block of headroom per running sequence must be free (an empty batch
/// always takes it: it then fails or waits on its own).
pub fn admits(running: usize, free_blocks: usize, first_chunk_blocks: usize) -> bool {
    running == 0 || free_blocks >= first_chunk_blocks + running
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoding(have: usize) -> SeqState {
        SeqState {
            decoding: true,
            have,
            target: have,
            capacity: have + 16,
        }
    }

    fn prefilling(have: usize, target: usize, capacity: usize) -> SeqState {
        SeqState {
            decoding: false,
            have,
            target,
            capacity,
        }
    }

    #[test]
    fn decode_tokens_first_then_chunks_oldest_first_within_the_budget() {
        let seqs = [
            prefilling(0, 100, 112),
            decoding(40),
            prefilling(10, 30, 32),
            decoding(7),
        ];
        assert_eq!(
            compose(&seqs, Budget::tokens(64)),
            [
                (1, Work::Decode),
                (3, Work::Decode),
                (0, Work::Chunk { from: 0, to: 62 }),
            ]
        );
        // A bigger budget reaches the second prompt, which stops at its target.
        assert_eq!(
            compose(&seqs, Budget::tokens(200)),
            [
                (1, Work::Decode),
                (3, Work::Decode),
                (0, Work::Chunk { from: 0, to: 100 }),
                (2, Work::Chunk { from: 10, to: 30 }),
            ]
        );
    }

    #[test]
    fn a_chunk_stops_at_the_blocks_held_and_a_spent_budget_adds_nothing() {
        assert_eq!(
            compose(&[prefilling(16, 100, 48)], Budget::tokens(256)),
            [(0, Work::Chunk { from: 16, to: 48 })]
        );
        assert_eq!(compose(&[prefilling(48, 100, 48)], Budget::tokens(256)), []);
        let many: Vec<SeqState> = (0..5).map(|_| decoding(3)).collect();
        let plan = compose(
            &[many.clone(), vec![prefilling(0, 9, 16)]].concat(),
            Budget::tokens(4),
        );
        assert_eq!(
            plan.len(),
            5,
            "decode tokens are never cut; no budget is left for the chunk"
        );
        assert!(plan.iter().all(|(_, w)| *w == Work::Decode));
    }

    #[test]
    fn a_work_budget_gives_a_chunk_deep_into_its_prompt_fewer_tokens_and_the_floor_at_least() {
        let cost = StepCost { prefill_pair: 1e-3 };
        // Two decode tokens cost 2 of the 60.5 of work.
        let budget = Budget {
            tokens: 256,
            work: 60.5,
            cost,
            floor: 4,
        };
        let early = [decoding(100), decoding(50), prefilling(0, 1000, 1008)];
        let late = [decoding(100), decoding(50), prefilling(900, 1000, 1008)];
        let chunk = |seqs: &[SeqState]| match compose(seqs, budget)[2] {
            (2, Work::Chunk { from, to }) => (from, to),
            other => panic!("{other:?}"),
        };
        // 56 tokens from 0 cost 56 + 1.6; from 900, 30 cost 30 + 27.5.
        assert_eq!(chunk(&early), (0, 56));
        assert_eq!(chunk(&late), (900, 930));
        let (from, to) = chunk(&late);
        let spent = 2.0 + cost.chunk(from, to);
        assert!(spent <= 60.5 && spent + cost.chunk(to, to + 1) > 60.5);
        // Whatever the work left, the floor's tokens.
        let spent_already = Budget {
            work: 1.0,
            ..budget
        };
        assert_eq!(
            compose(&late, spent_already)[2],
            (2, Work::Chunk { from: 900, to: 904 })
        );
    }

    #[test]
    fn admission_keeps_a_block_of_headroom_per_running_sequence() {
        assert!(admits(0, 0, 10), "an empty batch always takes the next");
        assert!(admits(3, 5, 2));
        assert!(!admits(3, 4, 2));
    }
}
