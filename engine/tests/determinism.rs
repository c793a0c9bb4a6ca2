//! A request's tokens and log-probabilities are bit-identical whether it runs alone or among up
//! to 64 others, whatever the prefill chunking, and with or without a prefix-cache hit — for
//! greedy and sampled decoding, at every weight precision and KV storage type.

use engine::request::GenerationParams;
use engine::synthetic::testing::{
    Rng, Trace, generate_alone, generate_batched, mixed_params, mixed_prompts,
};
use engine::synthetic::{TinySpec, write};
use engine::{Engine, EngineConfig, KvDtype, Precision};

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
        device: Default::default(),
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
        let prompts = mixed_prompts(&mut rng, N_SEQ, vocab);
        let alone: Vec<Trace> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| generate_alone(&e, p, params(i)))
            .collect();
        drop(e);

        // All 64 together in a fresh engine: prefix hits for the shared prompt, prefill in random
        // chunks with several sequences per forward call, then batched decode steps.
        let (_d, e) = load(precision, kv);
        let (traces, hits) = generate_batched(&e, &prompts, params, &mut rng);
        assert!(hits > 0, "some sequences hit the prefix cache");
        for i in 0..N_SEQ {
            assert_eq!(
                traces[i], alone[i],
                "{precision:?}: sequence {i} differs from its solo run"
            );
        }
    }
}
