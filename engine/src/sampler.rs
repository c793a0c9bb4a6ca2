//! Token sampling: penalties, temperature, top-k, top-p, min-p, and a random draw keyed by
//! `(seed, position)`, so a request's tokens never depend on what else runs beside it.

use crate::tokenizer::TokenId;
pub use frontend::sampling::{SamplingParams, TokenLogprobs};
use std::collections::HashMap;

/// A uniform draw in `[0, 1)` from `(seed, position)` alone (SplitMix64 finalizer).
pub fn uniform(seed: u64, position: u64) -> f64 {
    let mut z = seed
        ^ position
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// Index of the largest value; ties go to the lowest id.
pub fn argmax(logits: &[f32]) -> TokenId {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as TokenId
}

/// Picks the next token from `logits` (one row of `vocab` floats).
/// `counts` holds how often each token was generated so far (for penalties);
/// `position` is the absolute position the token will take.
pub fn sample(
    p: &SamplingParams,
    logits: &[f32],
    counts: &HashMap<TokenId, u32>,
    position: u64,
) -> TokenId {
    let penalized;
    let logits = if (p.frequency_penalty != 0.0 || p.presence_penalty != 0.0) && !counts.is_empty()
    {
        let mut l = logits.to_vec();
        for (&t, &c) in counts {
            if let Some(v) = l.get_mut(t as usize) {
                *v -= p.frequency_penalty * c as f32 + p.presence_penalty;
            }
        }
        penalized = l;
        &penalized[..]
    } else {
        logits
    };
    if p.temperature <= 0.0 || p.top_k == 1 {
        return argmax(logits);
    }
    let cand = candidates(logits, p.top_k);
    let inv_t = 1.0 / p.temperature as f64;
    let max = logits[cand[0] as usize] as f64;
    let mut probs: Vec<f64> = cand
        .iter()
        .map(|&id| kernels::math::exp((logits[id as usize] as f64 - max) * inv_t))
        .collect();
    let z: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|q| *q /= z);
    let mut keep = probs.len();
    if p.top_p < 1.0 {
        let mut cum = 0.0;
        for (i, q) in probs.iter().enumerate() {
            cum += q;
            if cum >= p.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
    }
    if p.min_p > 0.0 {
        let floor = probs[0] * p.min_p as f64;
        keep = keep.min(probs.iter().take_while(|q| **q >= floor).count().max(1));
    }
    let total: f64 = probs[..keep].iter().sum();
    let mut u = uniform(p.seed, position) * total;
    for i in 0..keep {
        u -= probs[i];
        if u < 0.0 {
            return cand[i];
        }
    }
    cand[keep - 1]
}

/// Token ids by logit, highest first (ties: lowest id first, so the order is fully
/// determined), the `top_k` first only when `top_k` > 0. Sorted as integers: each id beside
/// its logit's place in `f32::total_cmp`'s order, reversed (5–10× faster than comparing
/// pairs of floats over a 50k vocabulary).
fn candidates(logits: &[f32], top_k: usize) -> Vec<TokenId> {
    let mut keys: Vec<u64> = logits
        .iter()
        .enumerate()
        .map(|(id, &v)| (u64::from(!total_order_key(v)) << 32) | id as u64)
        .collect();
    if top_k > 0 && top_k < keys.len() {
        keys.select_nth_unstable(top_k - 1);
        keys.truncate(top_k);
    }
    keys.sort_unstable();
    keys.into_iter().map(|k| k as u32).collect()
}

/// `v`'s place in `f32::total_cmp`'s order, as an unsigned integer.
fn total_order_key(v: f32) -> u32 {
    let b = v.to_bits() as i32;
    // What total_cmp does (negative floats' magnitude bits flipped), then the sign bit
    // flipped so that unsigned order is signed order.
    ((b ^ (((b >> 31) as u32) >> 1) as i32) as u32) ^ 0x8000_0000
}

pub fn logprobs(logits: &[f32], chosen: TokenId, top_n: usize) -> TokenLogprobs {
    let ls = kernels::ops::log_softmax(logits);
    let mut top: Vec<(TokenId, f32)> = Vec::new();
    if top_n > 0 {
        let mut idx: Vec<(f32, TokenId)> = ls
            .iter()
            .enumerate()
            .map(|(i, &v)| (v, i as TokenId))
            .collect();
        let by = |a: &(f32, TokenId), b: &(f32, TokenId)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        let n = top_n.min(idx.len());
        idx.select_nth_unstable_by(n - 1, by);
        idx.truncate(n);
        idx.sort_unstable_by(by);
        top = idx.into_iter().map(|(v, i)| (i, v)).collect();
    }
    TokenLogprobs {
        logprob: ls[chosen as usize],
        top,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        (0..50)
            .map(|i| ((i * 37 % 50) as f32) * 0.1 - 2.0)
            .collect()
    }

    /// The integer sort against sorting pairs with the comparator it replaces.
    #[test]
    fn candidates_are_in_logit_then_id_order() {
        use proptest::prelude::*;
        let special = prop::sample::select(vec![
            0.0f32,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::MIN_POSITIVE,
            -1e-45,
            1.5,
        ]);
        let logit = prop_oneof![3 => -30.0f32..30.0, 1 => special];
        let vocab = prop::collection::vec(logit, 1..400);
        proptest!(|(l in vocab, top_k in 0usize..50)| {
            let by = |a: &(f32, TokenId), b: &(f32, TokenId)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
            let mut want: Vec<(f32, TokenId)> =
                l.iter().enumerate().map(|(i, &v)| (v, i as TokenId)).collect();
            want.sort_unstable_by(by);
            if top_k > 0 {
                want.truncate(top_k);
            }
            let want: Vec<TokenId> = want.into_iter().map(|c| c.1).collect();
            prop_assert_eq!(candidates(&l, top_k), want);
        });
    }

    #[test]
    fn greedy_is_argmax_with_lowest_id_on_ties() {
        let mut l = logits();
        l[7] = 100.0;
        l[9] = 100.0;
        assert_eq!(sample(&SamplingParams::greedy(), &l, &HashMap::new(), 3), 7);
    }

    #[test]
    fn same_seed_and_position_same_token_and_draws_follow_distribution() {
        let l = logits();
        let p = SamplingParams {
            temperature: 1.0,
            seed: 42,
            ..Default::default()
        };
        let a = sample(&p, &l, &HashMap::new(), 5);
        assert_eq!(a, sample(&p, &l, &HashMap::new(), 5));
        // Empirical frequencies over positions approach the softmax.
        let mut probs = l.clone();
        kernels::ops::softmax(&mut probs);
        let mut hist = vec![0usize; l.len()];
        let n = 20000;
        for pos in 0..n {
            hist[sample(&p, &l, &HashMap::new(), pos) as usize] += 1;
        }
        for (h, q) in hist.iter().zip(&probs) {
            assert!((*h as f32 / n as f32 - q).abs() < 0.01);
        }
    }

    #[test]
    fn cuts_restrict_support() {
        let l = logits();
        let mut order: Vec<usize> = (0..l.len()).collect();
        order.sort_by(|a, b| l[*b].total_cmp(&l[*a]));
        let k = SamplingParams {
            temperature: 1.0,
            top_k: 3,
            seed: 1,
            ..Default::default()
        };
        let tp = SamplingParams {
            temperature: 1.0,
            top_p: 0.05,
            seed: 1,
            ..Default::default()
        };
        let mp = SamplingParams {
            temperature: 1.0,
            min_p: 0.9,
            seed: 1,
            ..Default::default()
        };
        for pos in 0..500 {
            let t = sample(&k, &l, &HashMap::new(), pos) as usize;
            assert!(order[..3].contains(&t));
            assert_eq!(sample(&tp, &l, &HashMap::new(), pos) as usize, order[0]);
            let m = sample(&mp, &l, &HashMap::new(), pos) as usize;
            assert!(l[m] >= l[order[0]] + (0.9f32).ln() - 1e-4);
        }
    }

    #[test]
    fn penalties_push_away_repeated_tokens() {
        let mut l = vec![0.0f32; 10];
        l[3] = 1.0;
        let counts = HashMap::from([(3u32, 2u32)]);
        let p = SamplingParams {
            temperature: 0.0,
            frequency_penalty: 0.6,
            ..Default::default()
        };
        assert_ne!(sample(&p, &l, &counts, 0), 3);
        let p = SamplingParams {
            temperature: 0.0,
            presence_penalty: 0.5,
            ..Default::default()
        };
        assert_eq!(sample(&p, &l, &counts, 0), 3);
        let p = SamplingParams {
            temperature: 0.0,
            presence_penalty: 1.5,
            ..Default::default()
        };
        assert_ne!(sample(&p, &l, &counts, 0), 3);
    }

    #[test]
    fn logprobs_are_normalized_and_sorted() {
        let l = logits();
        let lp = logprobs(&l, 4, 5);
        assert_eq!(lp.top.len(), 5);
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
        let z: f64 = l.iter().map(|v| (*v as f64).exp()).sum();
        assert!((lp.logprob as f64 - ((l[4] as f64).exp() / z).ln()).abs() < 1e-5);
    }
}
