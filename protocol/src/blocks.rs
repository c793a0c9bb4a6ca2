//! What a subscriber of block events (`tandem.v2.BlockEvents`, blocks.proto) knows of one
//! holder — a decode worker's prefix cache or the store's tiers — applied message by message.

use crate::pb;
use frontend::block::BlockHash;
use std::collections::HashMap;

/// The blocks one holder holds, and in which tier ([`pb::StoreTier::None`]: a worker's pool).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Holdings(pub HashMap<BlockHash, pb::StoreTier>);

impl Holdings {
    /// Applies one message of the holder's stream (in order).
    pub fn apply(&mut self, m: &pb::BlockEvents) {
        if m.cleared {
            self.0.clear();
        }
        let tier = pb::StoreTier::try_from(m.tier).unwrap_or(pb::StoreTier::None);
        for h in &m.removed {
            self.0.remove(&BlockHash(*h));
        }
        for h in &m.stored {
            self.0.insert(BlockHash(*h), tier);
        }
    }

    /// How many of `hashes`, from the first, the holder has.
    pub fn prefix(&self, hashes: &[BlockHash]) -> usize {
        hashes.iter().take_while(|h| self.0.contains_key(h)).count()
    }

    /// The tiers of the longest prefix of `hashes` held.
    pub fn tiers(&self, hashes: &[BlockHash]) -> Vec<pb::StoreTier> {
        hashes
            .iter()
            .map_while(|h| self.0.get(h).copied())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_apply_in_order() {
        let mut h = Holdings::default();
        h.apply(&pb::BlockEvents {
            cleared: true,
            stored: vec![1, 2, 3],
            tier: pb::StoreTier::Ram as i32,
            ..Default::default()
        });
        h.apply(&pb::BlockEvents {
            stored: vec![2],
            tier: pb::StoreTier::Disk as i32,
            ..Default::default()
        });
        h.apply(&pb::BlockEvents {
            removed: vec![1],
            ..Default::default()
        });
        let q = [BlockHash(2), BlockHash(3), BlockHash(1)];
        assert_eq!(h.prefix(&q), 2);
        assert_eq!(h.tiers(&q), [pb::StoreTier::Disk, pb::StoreTier::Ram]);
        assert_eq!(
            h.prefix(&[BlockHash(1), BlockHash(2)]),
            0,
            "a gap ends the prefix"
        );
        h.apply(&pb::BlockEvents {
            cleared: true,
            ..Default::default()
        });
        assert!(h.0.is_empty());
    }
}
