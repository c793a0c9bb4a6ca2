//! Constrained decoding on a tiny synthetic model: every output matches its constraint (JSON
//! Schema, regex, choice, Lark grammar), greedy and sampled; greedy output equals the
//! unconstrained one up to the first token the constraint forbids; a sequence resumed from
//! its tokens (failover, re-prefill) continues exactly; a batch gives what each request gives
//! alone; `logit_bias` moves the choice.

use engine::generation::GenerationState;
use engine::request::GenerationParams;
use engine::sampler::SamplingParams;
use engine::synthetic::testing::{Trace, generate_alone};
use engine::synthetic::{TinySpec, write};
use engine::{Engine, EngineConfig, KvSequence, LogitsWanted};
use frontend::constraint::Constraint;

fn load() -> (tempfile::TempDir, Engine) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write(&TinySpec::default(), &path).unwrap();
    let cfg = EngineConfig {
        kv_budget_bytes: 64 << 20,
        ..Default::default()
    };
    (dir, Engine::load(&path, &cfg).unwrap())
}

fn params(sampling: SamplingParams, constraint: Option<Constraint>) -> GenerationParams {
    GenerationParams {
        sampling,
        max_tokens: 96,
        min_tokens: 0,
        ignore_eos: false,
        stop_token_ids: vec![],
        logprobs: Some(1),
        prompt_logprobs: None,
        logit_bias: Vec::new(),
        constraint,
    }
}

fn samplings() -> Vec<SamplingParams> {
    let mut v = vec![SamplingParams::greedy()];
    for seed in [1, 2, 3] {
        v.push(SamplingParams {
            temperature: 1.0,
            top_p: 0.95,
            seed,
            ..Default::default()
        });
    }
    v
}

const SCHEMA: &str = r#"{"type":"object","properties":{
  "n":{"type":"integer","minimum":0,"maximum":99},
  "tag":{"enum":["red","green"]},
  "xs":{"type":"array","items":{"type":"boolean"},"minItems":1,"maxItems":3}},
  "required":["n","tag","xs"],"additionalProperties":false}"#;

/// Whether `text` satisfies `c` (checked independently of llguidance).
fn satisfies(c: &Constraint, text: &str) -> bool {
    match c {
        Constraint::Regex(_) => {
            (3..=8).contains(&text.len()) && text.chars().all(|c| "ab".contains(c))
        }
        Constraint::Choice(cs) => cs.iter().any(|c| c == text),
        Constraint::JsonSchema(_) => {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
                return false;
            };
            let o = v.as_object().unwrap();
            let n = o["n"].as_i64().is_some_and(|n| (0..=99).contains(&n));
            let tag = ["red", "green"].contains(&o["tag"].as_str().unwrap_or(""));
            let xs = o["xs"]
                .as_array()
                .is_some_and(|a| (1..=3).contains(&a.len()) && a.iter().all(|x| x.is_boolean()));
            o.len() == 3 && n && tag && xs
        }
        Constraint::Grammar(_) => {
            let t = text.strip_prefix("say ").unwrap_or("");
            !t.is_empty() && t.split(',').all(|w| w == "hi" || w == "yo")
        }
        Constraint::JsonObject => {
            serde_json::from_str::<serde_json::Value>(text).is_ok_and(|v| v.is_object())
        }
    }
}

fn constraints() -> Vec<Constraint> {
    vec![
        Constraint::Regex("[ab]{3,8}".into()),
        Constraint::Choice(vec!["yes".into(), "no".into(), "a \"quoted\" (one)".into()]),
        Constraint::JsonSchema(SCHEMA.into()),
        Constraint::Grammar("start: \"say \" word (\",\" word)*\nword: \"hi\" | \"yo\"\n".into()),
    ]
}

fn text(e: &Engine, t: &Trace) -> String {
    let tok = &e.frontend.tokenizer;
    let ids: Vec<u32> = t.0.iter().copied().filter(|&i| !tok.is_eog(i)).collect();
    tok.decode(&ids)
}

#[test]
fn every_output_matches_its_constraint() {
    let (_d, e) = load();
    let prompt: Vec<u32> = (40..70).collect();
    for c in constraints() {
        for s in samplings() {
            let t = generate_alone(&e, &prompt, params(s.clone(), Some(c.clone())));
            let out = text(&e, &t);
            assert!(satisfies(&c, &out), "{c:?} {s:?}: {out:?}");
        }
    }
}

#[test]
fn greedy_follows_the_model_until_the_constraint_forbids_its_choice() {
    let (_d, e) = load();
    let prompt: Vec<u32> = (3..50).collect();
    let free = generate_alone(&e, &prompt, params(SamplingParams::greedy(), None));
    for c in constraints() {
        let bound = generate_alone(
            &e,
            &prompt,
            params(SamplingParams::greedy(), Some(c.clone())),
        );
        // Walk the unconstrained tokens through the constraint: up to the first it forbids,
        // the constrained output is the same.
        let mut m = e.frontend.grammars().unwrap().matcher(&c).unwrap();
        let mut same = 0;
        for &t in &free.0 {
            let mut row = vec![0.0f32; e.frontend.tokenizer.vocab_size()];
            m.mask(&mut row).unwrap();
            if !row[t as usize].is_finite() {
                break;
            }
            m.consume(t).unwrap();
            same += 1;
        }
        assert_eq!(bound.0[..same], free.0[..same], "{c:?}");
        assert!(same < bound.0.len() && bound.0[same] != *free.0.get(same).unwrap_or(&u32::MAX));
    }
}

/// Re-prefilled from the prompt and the first `k` tokens, as failover does, a constrained
/// sequence continues with exactly the tokens it gives uninterrupted.
#[test]
fn a_resumed_sequence_continues_exactly() {
    let (_d, e) = load();
    let prompt: Vec<u32> = (5..45).collect();
    for c in constraints() {
        for s in samplings().into_iter().skip(1) {
            let p = params(s, Some(c.clone()));
            let whole = generate_alone(&e, &prompt, p.clone());
            let k = whole.0.len() / 2;
            if k == 0 {
                continue;
            }
            let mut seq = e.new_sequence();
            let input = [&prompt[..], &whole.0[..k]].concat();
            let logits = e.prefill(&mut seq, &input, LogitsWanted::Last).unwrap();
            let mut st = GenerationState::resume(p, prompt.len(), &whole.0[..k]);
            let mut ev = st.next(&e.frontend, &logits, e.max_context()).unwrap();
            let mut got = whole.0[..k].to_vec();
            got.push(ev.token);
            while ev.finish.is_none() {
                let l = e
                    .decode_step(&mut [(&mut seq, ev.token)])
                    .unwrap()
                    .pop()
                    .unwrap();
                ev = st.next(&e.frontend, &l, e.max_context()).unwrap();
                got.push(ev.token);
            }
            assert_eq!(got, whole.0, "{c:?}");
        }
    }
}

/// Sixteen constrained and unconstrained requests stepped together give each what it gives
/// alone, token for token and log-probability for log-probability — with the masks computed
/// ahead (on a thread of their own while the forward pass runs, or over the compute pool
/// before it), as the decode worker does.
#[test]
fn a_batch_gives_what_each_request_gives_alone() {
    let (_d, e) = load();
    let cs = constraints();
    let reqs: Vec<(Vec<u32>, GenerationParams)> = (0..16)
        .map(|i| {
            let prompt: Vec<u32> = (0..8 + i as u32 * 3)
                .map(|j| 3 + (j * 7 + i as u32) % 250)
                .collect();
            let s = samplings()[i % 4].clone();
            let c = (i % 5 < 4).then(|| cs[i % 4].clone());
            (prompt, params(s, c))
        })
        .collect();
    let alone: Vec<Trace> = reqs
        .iter()
        .map(|(p, g)| generate_alone(&e, p, g.clone()))
        .collect();
    let mut seqs: Vec<KvSequence> = Vec::new();
    let mut states = Vec::new();
    let mut traces: Vec<Trace> = vec![(vec![], vec![]); reqs.len()];
    let mut last = Vec::new();
    let mut done = vec![false; reqs.len()];
    for (i, (p, g)) in reqs.iter().enumerate() {
        let mut s = e.new_sequence();
        let l = e.prefill(&mut s, p, LogitsWanted::Last).unwrap();
        let mut st = GenerationState::new(g.clone(), p.len());
        let ev = st.next(&e.frontend, &l, e.max_context()).unwrap();
        traces[i].0.push(ev.token);
        traces[i].1.push(ev.logprobs.unwrap().logprob.to_bits());
        done[i] = ev.finish.is_some();
        last.push(ev.token);
        seqs.push(s);
        states.push(st);
    }
    let mut step = 0;
    while done.iter().any(|d| !d) {
        let live: Vec<usize> = (0..reqs.len()).filter(|&i| !done[i]).collect();
        let mut batch: Vec<(&mut KvSequence, u32)> = seqs
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| !done[*i])
            .map(|(i, s)| (s, last[i]))
            .collect();
        // Both ways of computing the masks ahead, a step each.
        let ahead: Vec<&mut GenerationState> = states
            .iter_mut()
            .enumerate()
            .filter(|(i, st)| !done[*i] && st.is_constrained())
            .map(|(_, st)| st)
            .collect();
        step += 1;
        let own_thread = step % 2 == 0;
        let out = engine::generation::masks_ahead(&e.frontend, ahead, own_thread, || {
            e.decode_step(&mut batch).unwrap()
        });
        for (row, &i) in out.iter().zip(&live) {
            let ev = states[i].next(&e.frontend, row, e.max_context()).unwrap();
            traces[i].0.push(ev.token);
            traces[i].1.push(ev.logprobs.unwrap().logprob.to_bits());
            last[i] = ev.token;
            done[i] = ev.finish.is_some();
        }
    }
    assert_eq!(traces, alone);
}

#[test]
fn logit_bias_moves_the_choice() {
    let (_d, e) = load();
    let prompt: Vec<u32> = (3..30).collect();
    let mut p = params(SamplingParams::greedy(), None);
    p.max_tokens = 6;
    let free = generate_alone(&e, &prompt, p.clone());
    let q = b'q' as u32;
    let q = (0..e.frontend.tokenizer.vocab_size() as u32)
        .find(|&t| e.frontend.tokenizer.token_bytes(t, false) == b"q")
        .unwrap_or(q);
    p.logit_bias = vec![(q, 100.0), (free.0[0], -100.0)];
    let biased = generate_alone(&e, &prompt, p);
    assert!(biased.0.iter().all(|&t| t == q), "{:?}", biased.0);
    assert_ne!(biased.0[0], free.0[0]);
}
