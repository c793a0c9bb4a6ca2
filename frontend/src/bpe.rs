//! Byte-level BPE over flat tables, as a `tokenizers` model.
//!
//! The `tokenizers` crate's own `BPE` is built from a vocabulary of owned strings, a list of
//! owned merge pairs and a reverse map of owned strings again: for a 49,152-token vocabulary
//! with 48,900 merges that is ~250,000 allocations and ~25 ms, most of what a bundle spends
//! before it can serve (`tandem edge`). This model keeps the vocabulary as the GGUF reader's
//! one text ([`Strings`]) with a table of ids hashed by their text, and the merges as a map
//! from a pair of ids to (rank, merged id): built in a few milliseconds with no allocation per
//! token. It merges exactly as the crate's `BPE` does (lowest rank first, then leftmost; a
//! character missing from the vocabulary is dropped, as there is no unknown token; a repeated
//! vocabulary entry or merge: the later one wins), which the tests check against it.
//! Pre-tokenization and special tokens stay the crate's (`TokenizerImpl` over this model).

use crate::gguf::Strings;
use hashbrown::HashTable;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::BpeTrainer;
use tokenizers::{Model, Token};

/// Byte-level BPE: a vocabulary and ranked merges over token ids.
pub struct Bpe {
    tokens: Strings,
    /// Token ids, found by the hash of their text.
    by_text: HashTable<u32>,
    hasher: ahash::RandomState,
    /// (left, right) → (rank, merged id).
    merges: ahash::AHashMap<(u32, u32), (u32, u32)>,
}

/// One symbol of a word being merged: a token over `start..end` of the word, linked to its
/// living neighbours.
#[derive(Clone, Copy)]
struct Symbol {
    id: u32,
    start: usize,
    end: usize,
    prev: usize,
    next: usize,
}

const NONE: usize = usize::MAX;

impl Bpe {
    /// Builds the model from a vocabulary (token id = index) and merges written `"left right"`,
    /// highest priority first.
    pub fn new(tokens: Strings, merges: &Strings) -> Result<Bpe, String> {
        // Fixed seeds: the table's layout does not depend on the process.
        let hasher = ahash::RandomState::with_seeds(0x7464, 0x6d65, 0x6270, 0x6531);
        let n = u32::try_from(tokens.len()).map_err(|_| "too many tokens".to_string())?;
        let mut by_text = HashTable::with_capacity(tokens.len());
        for id in 0..n {
            let text = tokens.get(id as usize).expect("in range");
            let h = hasher.hash_one(text);
            let entry = by_text.entry(
                h,
                |&j: &u32| tokens.get(j as usize) == Some(text),
                |&j: &u32| hasher.hash_one(tokens.get(j as usize).expect("in range")),
            );
            match entry {
                hashbrown::hash_table::Entry::Occupied(mut e) => *e.get_mut() = id,
                hashbrown::hash_table::Entry::Vacant(e) => {
                    e.insert(id);
                }
            }
        }
        let mut bpe = Bpe {
            tokens,
            by_text,
            hasher,
            merges: ahash::AHashMap::with_capacity(merges.len()),
        };
        let mut joined = String::new();
        for (rank, m) in merges.iter().enumerate() {
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| format!("malformed merge '{m}'"))?;
            let id = |t: &str| {
                bpe.id(t)
                    .ok_or_else(|| format!("merge token '{t}' is not in the vocabulary"))
            };
            joined.clear();
            joined.push_str(a);
            joined.push_str(b);
            let merged = (id(a)?, id(b)?);
            let new = (rank as u32, id(&joined)?);
            bpe.merges.insert(merged, new);
        }
        Ok(bpe)
    }

    /// The id of a token's text.
    pub fn id(&self, text: &str) -> Option<u32> {
        self.by_text
            .find(self.hasher.hash_one(text), |&j| {
                self.tokens.get(j as usize) == Some(text)
            })
            .copied()
    }

    /// The ids `word` is made of.
    fn merge(&self, word: &str) -> Vec<Symbol> {
        let mut symbols: Vec<Symbol> = Vec::with_capacity(word.len());
        for (start, c) in word.char_indices() {
            let end = start + c.len_utf8();
            if let Some(id) = self.id(&word[start..end]) {
                let i = symbols.len();
                symbols.push(Symbol {
                    id,
                    start,
                    end,
                    prev: i.checked_sub(1).unwrap_or(NONE),
                    next: i + 1,
                });
            }
        }
        if let Some(last) = symbols.last_mut() {
            last.next = NONE;
        }
        let pair = |s: &[Symbol], i: usize| -> Option<(u32, u32)> {
            let next = s[i].next;
            (next != NONE)
                .then(|| self.merges.get(&(s[i].id, s[next].id)).copied())
                .flatten()
        };
        // Candidates by (rank, position): the heap's top is the merge to make next, unless a
        // merge since has changed the pair at its position.
        let mut queue: BinaryHeap<Reverse<(u32, usize, u32)>> = (0..symbols.len())
            .filter_map(|i| pair(&symbols, i).map(|(rank, id)| Reverse((rank, i, id))))
            .collect();
        while let Some(Reverse((_, i, id))) = queue.pop() {
            if symbols[i].end == symbols[i].start || pair(&symbols, i).map(|p| p.1) != Some(id) {
                continue; // stale: this symbol was merged away, or its right neighbour changed
            }
            let right = symbols[i].next;
            let after = symbols[right].next;
            symbols[i] = Symbol {
                id,
                end: symbols[right].end,
                next: after,
                ..symbols[i]
            };
            symbols[right].end = symbols[right].start; // dead
            if after != NONE {
                symbols[after].prev = i;
            }
            let prev = symbols[i].prev;
            for at in [prev, i] {
                if at != NONE
                    && let Some((rank, id)) = pair(&symbols, at)
                {
                    queue.push(Reverse((rank, at, id)));
                }
            }
        }
        symbols.retain(|s| s.end > s.start);
        symbols
    }
}

impl Model for Bpe {
    type Trainer = BpeTrainer;

    fn tokenize(&self, sequence: &str) -> tokenizers::Result<Vec<Token>> {
        Ok(self
            .merge(sequence)
            .into_iter()
            .map(|s| {
                let text = self.tokens.get(s.id as usize).unwrap_or_default();
                Token::new(s.id, text.to_string(), (s.start, s.end))
            })
            .collect())
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.id(token)
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        self.tokens.get(id as usize).map(str::to_string)
    }

    fn get_vocab(&self) -> HashMap<String, u32> {
        // The ids the text look-up answers (a repeated text maps to its last id).
        self.tokens
            .iter()
            .filter_map(|t| Some((t.to_string(), self.id(t)?)))
            .collect()
    }

    fn get_vocab_size(&self) -> usize {
        self.tokens.len()
    }

    fn save(&self, _folder: &Path, _prefix: Option<&str>) -> tokenizers::Result<Vec<PathBuf>> {
        Err("a GGUF's tokenizer is saved with its model, not on its own".into())
    }

    fn get_trainer(&self) -> BpeTrainer {
        BpeTrainer::default()
    }
}

#[cfg(test)]
mod tests;
