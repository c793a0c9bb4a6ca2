//! A request's tokens and log-probabilities are bit-identical whether it runs alone or among up
//! to 64 others, whatever the prefill chunking, and with or without a prefix-cache hit — for
//! greedy and sampled decoding, at every weight precision and KV storage type.

use engine::generation::GenerationState;
use engine::model::ForwardItem;
use engine::request::GenerationParams;
use engine::synthetic::testing::{Rng, Trace, generate_alone, mixed_params};
use engine::synthetic::{TinySpec, write};
use engine::{Engine, EngineConfig, KvDtype, KvSequence, LogitsWanted, Precision};

const N_SEQ: usize = 64;
const N_GEN: usize = 10;

fn load(precision: Precision, kv_dtype: KvDtype) -> (tempfile::TempDir, Engine) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write(&TinySpec::default(), &path).unwrap();
    let cfg = EngineConfig {
        kv_budget_bytes: 64 << 20,
        model_id: None,
        precision,
        kv_dtype,
        kv_shared_path: None,
    };
    let e = Engine::load(&path, &cfg).unwrap();
    (dir, e)
}

fn params(i: usize) -> GenerationParams {
    mixed_params(i, N_GEN, 1000)
}

#[test]
fn tokens_and_logprobs_do_not_depend_on_batch_chunking_or_prefix_hits() {
    for (precision, kv) in [
        (Precision::F32, KvDtype::F32),
        (Precision::Int8, KvDtype::F16),
        (Precision::W4A8, KvDtype::F16),
        (Precision::Int8, KvDtype::Int8),
    ] {
        let (_d, e) = load(precision, kv);
        let vocab = e.model.config().vocab_size as u64 - 2;
        let mut rng = Rng(0x9e37_79b9 ^ precision as u64);
        let shared: Vec<u32> = (0..40).map(|_| rng.next(vocab) as u32).collect();
        let prompts: Vec<Vec<u32>> = (0..N_SEQ)
            .map(|i| {
                let own: Vec<u32> = (0..1 + rng.next(60))
                    .map(|_| rng.next(vocab) as u32)
                    .collect();
                if i % 2 == 0 {
                    [shared.clone(), own].concat()
                } else {
                    own
                }
            })
            .collect();
        let alone: Vec<Trace> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| generate_alone(&e, p, params(i)))
            .collect();
        drop(e);

        // All 64 together in a fresh engine: prefix hits for the shared prompt, prefill in random
        // chunks with several sequences per forward call, then batched decode steps.
        let (_d, e) = load(precision, kv);
        let mut seqs: Vec<KvSequence> = (0..N_SEQ).map(|_| e.new_sequence()).collect();
        let mut done = vec![0usize; N_SEQ];
        let mut hits = 0;
        let mut last_logits: Vec<Option<Vec<f32>>> = vec![None; N_SEQ];
        // Sequence 0 (which holds the shared prompt) goes first and publishes its blocks.
        last_logits[0] = Some(
            e.prefill(&mut seqs[0], &prompts[0], LogitsWanted::Last)
                .unwrap(),
        );
        seqs[0].publish_prefix(&prompts[0]);
        done[0] = prompts[0].len();
        for (i, s) in seqs.iter_mut().enumerate().skip(1) {
            done[i] = s.attach_prefix(&prompts[i]);
            hits += done[i];
        }
        while done.iter().zip(&prompts).any(|(d, p)| d < &p.len()) {
            // A random group of unfinished sequences, each with a random chunk.
            let mut group: Vec<(usize, usize)> = Vec::new();
            for i in 0..N_SEQ {
                if done[i] < prompts[i].len() && rng.next(3) != 0 {
                    let n = (1 + rng.next(24) as usize).min(prompts[i].len() - done[i]);
                    group.push((i, n));
                }
            }
            let mut refs: Vec<(usize, &mut KvSequence)> = seqs
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| group.iter().any(|g| g.0 == *i))
                .collect();
            let mut items: Vec<ForwardItem> = refs
                .iter_mut()
                .map(|(i, s)| {
                    let n = group.iter().find(|g| g.0 == *i).unwrap().1;
                    ForwardItem {
                        seq: s,
                        tokens: &prompts[*i][done[*i]..done[*i] + n],
                        logits: LogitsWanted::Last,
                    }
                })
                .collect();
            let out = e.model.forward(&mut items).unwrap();
            drop(items);
            for ((i, n), l) in group.iter().zip(out) {
                done[*i] += n;
                if done[*i] == prompts[*i].len() {
                    last_logits[*i] = Some(l);
                    seqs[*i].publish_prefix(&prompts[*i]);
                }
            }
        }
        assert!(hits > 0, "some sequences hit the prefix cache");
        let mut states: Vec<GenerationState> = (0..N_SEQ)
            .map(|i| GenerationState::new(params(i), prompts[i].len()))
            .collect();
        let mut traces: Vec<Trace> = vec![(vec![], vec![]); N_SEQ];
        let mut last = vec![0u32; N_SEQ];
        for i in 0..N_SEQ {
            let ev = states[i].next(
                &e.frontend,
                last_logits[i].as_ref().unwrap(),
                e.max_context(),
            );
            let ev = ev.unwrap();
            last[i] = ev.token;
            traces[i].0.push(ev.token);
            traces[i].1.push(ev.logprobs.unwrap().logprob.to_bits());
        }
        for _ in 1..N_GEN {
            let mut batch: Vec<(&mut KvSequence, u32)> =
                seqs.iter_mut().zip(&last).map(|(s, t)| (s, *t)).collect();
            let out = e.decode_step(&mut batch).unwrap();
            for i in 0..N_SEQ {
                let ev = states[i]
                    .next(&e.frontend, &out[i], e.max_context())
                    .unwrap();
                last[i] = ev.token;
                traces[i].0.push(ev.token);
                traces[i].1.push(ev.logprobs.unwrap().logprob.to_bits());
            }
        }
        for i in 0..N_SEQ {
            assert_eq!(
                traces[i], alone[i],
                "{precision:?}: sequence {i} differs from its solo run"
            );
        }
    }
}
