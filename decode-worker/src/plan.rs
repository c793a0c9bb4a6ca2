//! The step planner's decisions as pure functions of the batch's state (mistral.rs's
//! `Scheduler::schedule() -> SchedulerOutput`, vLLM's chunked-prefill budget): which waiting
//! sequence may start, and what each running sequence computes in the next forward call. The
//! worker gathers the state, reserves the memory (preempting when the pool runs short) and
//! runs the plan.

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
/// chunks in batch order (oldest first) until `max_batch_tokens` are spent; a chunk never runs
/// past the blocks its sequence holds.
pub fn compose(seqs: &[SeqState], max_batch_tokens: usize) -> Vec<(usize, Work)> {
    let mut plan = Vec::new();
    let mut budget = max_batch_tokens;
    for (i, s) in seqs.iter().enumerate() {
        if s.decoding {
            plan.push((i, Work::Decode));
            budget = budget.saturating_sub(1);
        }
    }
    for (i, s) in seqs.iter().enumerate() {
        if s.decoding {
            continue;
        }
        let to = s.target.min(s.have + budget).min(s.capacity);
        if to > s.have {
            plan.push((i, Work::Chunk { from: s.have, to }));
            budget -= to - s.have;
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
            compose(&seqs, 64),
            [
                (1, Work::Decode),
                (3, Work::Decode),
                (0, Work::Chunk { from: 0, to: 62 }),
            ]
        );
        // A bigger budget reaches the second prompt, which stops at its target.
        assert_eq!(
            compose(&seqs, 200),
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
            compose(&[prefilling(16, 100, 48)], 256),
            [(0, Work::Chunk { from: 16, to: 48 })]
        );
        assert_eq!(compose(&[prefilling(48, 100, 48)], 256), []);
        let many: Vec<SeqState> = (0..5).map(|_| decoding(3)).collect();
        let plan = compose(&[many.clone(), vec![prefilling(0, 9, 16)]].concat(), 4);
        assert_eq!(
            plan.len(),
            5,
            "decode tokens are never cut; no budget is left for the chunk"
        );
        assert!(plan.iter().all(|(_, w)| *w == Work::Decode));
    }

    #[test]
    fn admission_keeps_a_block_of_headroom_per_running_sequence() {
        assert!(admits(0, 0, 10), "an empty batch always takes the next");
        assert!(admits(3, 5, 2));
        assert!(!admits(3, 4, 2));
    }
}
