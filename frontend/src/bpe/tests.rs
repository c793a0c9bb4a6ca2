//! The flat-table BPE against the `tokenizers` crate's `BPE` on random vocabularies, merges
//! and words.

use super::*;
use proptest::prelude::*;
use tokenizers::models::bpe::BPE;

/// A vocabulary grown the way BPE training grows one: the alphabet, then each merge joins two
/// tokens already there. Some merges repeat a pair (with another rank) and some joined texts
/// repeat a token, as real vocabularies may.
fn vocabulary(alphabet: &[char], picks: &[(usize, usize)]) -> (Vec<String>, Vec<(String, String)>) {
    let mut tokens: Vec<String> = alphabet.iter().map(|c| c.to_string()).collect();
    let mut merges = Vec::new();
    for &(a, b) in picks {
        let (a, b) = (
            tokens[a % tokens.len()].clone(),
            tokens[b % tokens.len()].clone(),
        );
        let joined = format!("{a}{b}");
        if !tokens.contains(&joined) || a.len() == 1 {
            tokens.push(joined);
        }
        merges.push((a, b));
    }
    (tokens, merges)
}

fn theirs(tokens: &[String], merges: &[(String, String)]) -> BPE {
    let vocab: ahash::AHashMap<String, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    BPE::builder()
        .vocab_and_merges(vocab, merges.to_vec())
        .build()
        .unwrap()
}

fn ours(tokens: &[String], merges: &[(String, String)]) -> Bpe {
    let merges: Strings = merges.iter().map(|(a, b)| format!("{a} {b}")).collect();
    Bpe::new(tokens.iter().collect(), &merges).unwrap()
}

fn ids(m: &impl Model, word: &str) -> Vec<(u32, (usize, usize))> {
    m.tokenize(word)
        .unwrap()
        .into_iter()
        .map(|t| (t.id, t.offsets))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn merges_as_the_tokenizers_crate_does(
        picks in prop::collection::vec((0usize..64, 0usize..64), 1..120),
        words in prop::collection::vec("[abcdé€z]{0,24}", 1..12),
    ) {
        // 'z' is not in the vocabulary: dropped by both.
        let (tokens, merges) = vocabulary(&['a', 'b', 'c', 'd', 'é', '€'], &picks);
        let (theirs, ours) = (theirs(&tokens, &merges), ours(&tokens, &merges));
        for w in &words {
            let want: Vec<u32> = ids(&theirs, w).into_iter().map(|t| t.0).collect();
            let got: Vec<u32> = ids(&ours, w).into_iter().map(|t| t.0).collect();
            prop_assert_eq!(got, want, "word {:?}", w);
        }
        for (i, t) in tokens.iter().enumerate() {
            prop_assert_eq!(ours.token_to_id(t), theirs.token_to_id(t));
            prop_assert_eq!(ours.id_to_token(i as u32), Some(t.clone()));
        }
        prop_assert_eq!(ours.get_vocab(), theirs.get_vocab());
    }
}

#[test]
fn offsets_cover_the_word_in_order() {
    let (tokens, merges) = vocabulary(&['a', 'b', 'é'], &[(0, 1), (3, 2), (2, 2), (4, 0)]);
    let bpe = ours(&tokens, &merges);
    let word = "abéabééaa";
    let got = ids(&bpe, word);
    let mut at = 0;
    for (id, (s, e)) in &got {
        assert_eq!(*s, at);
        assert_eq!(&word[*s..*e], tokens[*id as usize]);
        at = *e;
    }
    assert_eq!(at, word.len());
}

#[test]
fn a_merge_outside_the_vocabulary_is_refused() {
    let tokens: Strings = ["a", "b"].into_iter().collect();
    let err = Bpe::new(tokens.clone(), &["a b"].into_iter().collect())
        .err()
        .unwrap();
    assert!(err.contains("'ab'"), "{err}");
    let err = Bpe::new(tokens, &["ab"].into_iter().collect())
        .err()
        .unwrap();
    assert!(err.contains("malformed"), "{err}");
}
