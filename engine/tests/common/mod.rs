//! What the golden tests against llama.cpp share: reading fixtures, comparing logits with the
//! recorded ones, perplexity over windows.

#![allow(dead_code)] // each test binary uses its own share

use engine::{Engine, LogitsWanted};
use serde_json::Value;

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// How `logits` (every position's, `vocab` wide) compare with a fixture's recorded positions
/// (each position's top ids and the probe ids' values, its argmax and top-2 gap).
pub struct LogitsCheck {
    pub max_diff: f32,
    pub compared: usize,
    /// Positions whose argmax differs, each at a near tie (gap < 1e-3; asserted).
    pub argmax_flips: usize,
}

pub fn compare_logits(f: &Value, logits: &[f32], vocab: usize) -> LogitsCheck {
    let probe = ids(&f["probe_ids"]);
    let (mut max_diff, mut compared, mut argmax_flips) = (0f32, 0usize, 0usize);
    for (p, pos) in f["positions"].as_array().unwrap().iter().enumerate() {
        let row = &logits[p * vocab..(p + 1) * vocab];
        let mut check = |id: u32, want: f64| {
            max_diff = max_diff.max((row[id as usize] - want as f32).abs());
            compared += 1;
        };
        for (id, want) in probe.iter().zip(pos["probe"].as_array().unwrap()) {
            check(*id, want.as_f64().unwrap());
        }
        for t in pos["top"].as_array().unwrap() {
            check(t[0].as_u64().unwrap() as u32, t[1].as_f64().unwrap());
        }
        if engine::sampler::argmax(row) as u64 != pos["argmax"].as_u64().unwrap() {
            assert!(
                pos["gap"].as_f64().unwrap() < 1e-3,
                "argmax differs at {p} with gap {}",
                pos["gap"]
            );
            argmax_flips += 1;
        }
    }
    LogitsCheck {
        max_diff,
        compared,
        argmax_flips,
    }
}

/// Perplexity of `e` over `tokens` in non-overlapping windows of `w` (every token after a
/// window's first scored), and the tokens scored.
pub fn perplexity(e: &Engine, tokens: &[u32], w: usize) -> (f64, usize) {
    let v = e.model.config().vocab_size;
    let (mut nll, mut n) = (0f64, 0usize);
    for win in tokens.chunks_exact(w) {
        let mut seq = e.new_sequence();
        let logits = e.prefill(&mut seq, win, LogitsWanted::All).unwrap();
        for i in 0..w - 1 {
            let ls = kernels::ops::log_softmax(&logits[i * v..(i + 1) * v]);
            nll -= ls[win[i + 1] as usize] as f64;
            n += 1;
        }
    }
    ((nll / n as f64).exp(), n)
}

/// `n` tokens greedily continued from `prompt`: prefill, then one token a decode step.
pub fn greedy(e: &Engine, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut seq = e.new_sequence();
    let mut tok =
        engine::sampler::argmax(&e.prefill(&mut seq, prompt, LogitsWanted::Last).unwrap());
    let mut out = vec![tok];
    while out.len() < n {
        tok = engine::sampler::argmax(&e.decode_step(&mut [(&mut seq, tok)]).unwrap()[0]);
        out.push(tok);
    }
    out
}
