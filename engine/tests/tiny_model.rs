//! The loader, tokenizer and forward pass on synthetic GGUF models.

use engine::gguf::{GgufFile, Metadata};
use engine::synthetic::{TinySpec, write};
use engine::{Engine, EngineConfig, EngineError, LogitsWanted, Precision};

fn tiny(spec: &TinySpec) -> (tempfile::TempDir, Engine) {
    tiny_at(spec, Precision::F32)
}

fn tiny_at(spec: &TinySpec, precision: Precision) -> (tempfile::TempDir, Engine) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write(spec, &path).unwrap();
    let e = Engine::load(
        &path,
        &EngineConfig {
            kv_budget_bytes: 4 << 20,
            model_id: None,
            precision,
            kv_dtype: Default::default(),
            kv_shared_path: None,
            device: Default::default(),
        },
    )
    .unwrap();
    (dir, e)
}

fn prompt(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 31 + salt * 7 + 3) % 262)
        .collect()
}

#[test]
fn loads_metadata_and_every_tensor_type() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write(
        &TinySpec {
            untied_output: true,
            ..Default::default()
        },
        &path,
    )
    .unwrap();
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.str_req("general.architecture").unwrap(), "llama");
    let types: std::collections::BTreeSet<String> =
        g.tensors().iter().map(|t| t.ty.name()).collect();
    for t in ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0"] {
        assert!(types.contains(t), "{t} missing from {types:?}");
    }
    let e = Engine::load(&path, &EngineConfig::default()).unwrap();
    assert_eq!(e.model.config().n_layers, 2);
    assert_eq!(e.frontend.model_id, "m");
}

#[test]
fn chunked_prefill_and_decode_steps_agree_bit_for_bit() {
    for spec in [TinySpec::default(), moe()] {
        for p in [Precision::F32, Precision::Int8, Precision::W4A8] {
            chunked_prefill_and_decode_steps_agree_at(&spec, p);
        }
    }
}

/// A mixture of 6 experts, 2 per token, in every layer.
fn moe() -> TinySpec {
    TinySpec {
        experts: Some((6, 2)),
        ..Default::default()
    }
}

fn chunked_prefill_and_decode_steps_agree_at(spec: &TinySpec, precision: Precision) {
    let (_d, e) = tiny_at(spec, precision);
    let toks = prompt(40, 1);
    // Whole prompt at once, logits at every position.
    let mut whole = e.new_sequence();
    let all = e.prefill(&mut whole, &toks, LogitsWanted::All).unwrap();
    let v = e.model.config().vocab_size;
    // Chunks of 7, then single-token decode steps.
    let mut seq = e.new_sequence();
    let mut at = 0;
    while at < 21 {
        let end = (at + 7).min(21);
        let l = e
            .prefill(&mut seq, &toks[at..end], LogitsWanted::Last)
            .unwrap();
        assert_eq!(
            bits(&l),
            bits(&all[(end - 1) * v..end * v]),
            "chunk ending at {end}"
        );
        at = end;
    }
    for (i, &t) in toks.iter().enumerate().skip(21) {
        let l = e.decode_step(&mut [(&mut seq, t)]).unwrap().pop().unwrap();
        assert_eq!(bits(&l), bits(&all[i * v..(i + 1) * v]), "decode at {i}");
    }
    assert_eq!(seq.len(), 40);
}

#[test]
fn decode_batch_is_invariant_to_its_company() {
    for spec in [TinySpec::default(), moe()] {
        for p in [Precision::F32, Precision::Int8, Precision::W4A8] {
            decode_batch_is_invariant_at(&spec, p);
        }
    }
}

fn decode_batch_is_invariant_at(spec: &TinySpec, precision: Precision) {
    let (_d, e) = tiny_at(spec, precision);
    let mut alone = e.new_sequence();
    e.prefill(&mut alone, &prompt(19, 2), LogitsWanted::None)
        .unwrap();
    let solo = e
        .decode_step(&mut [(&mut alone, 5)])
        .unwrap()
        .pop()
        .unwrap();
    let mut seqs: Vec<_> = (0..9).map(|_| e.new_sequence()).collect();
    for (i, s) in seqs.iter_mut().enumerate() {
        let p = if i == 4 {
            prompt(19, 2)
        } else {
            prompt(3 + i * 5, 10 + i as u32)
        };
        e.prefill(s, &p, LogitsWanted::None).unwrap();
    }
    let mut batch: Vec<_> = seqs.iter_mut().map(|s| (s, 5u32)).collect();
    let out = e.decode_step(&mut batch).unwrap();
    assert_eq!(bits(&out[4]), bits(&solo));
}

#[test]
fn untied_output_and_gqa_shapes_run() {
    let (_d, e) = tiny(&TinySpec {
        untied_output: true,
        n_heads: 8,
        n_kv_heads: 1,
        d_model: 64,
        ..Default::default()
    });
    let mut s = e.new_sequence();
    let l = e
        .prefill(&mut s, &prompt(33, 3), LogitsWanted::Last)
        .unwrap();
    assert_eq!(l.len(), e.model.config().vocab_size);
    assert!(l.iter().all(|x| x.is_finite()));
    assert!(l.iter().any(|x| *x != l[0]));
}

#[test]
fn kv_budget_and_context_limits_are_errors() {
    let (_d, e) = tiny(&TinySpec {
        n_ctx: 64,
        ..Default::default()
    });
    let mut s = e.new_sequence();
    assert!(matches!(
        e.prefill(&mut s, &prompt(65, 0), LogitsWanted::Last),
        Err(EngineError::ContextOverflow { .. })
    ));
    assert!(matches!(
        e.prefill(&mut s, &[9999], LogitsWanted::Last),
        Err(EngineError::BadToken(9999))
    ));
    // A pool of 4 MiB holds a limited number of blocks; exhausting it is an error, not growth.
    let per_block = e.kv.layout().block_bytes();
    let n_blocks = e.kv.n_blocks();
    assert_eq!(n_blocks, (4 << 20) / per_block);
    let mut seqs = Vec::new();
    let mut failed = false;
    for _ in 0..n_blocks + 1 {
        let mut s = e.new_sequence();
        match e.prefill(&mut s, &prompt(60, 1), LogitsWanted::None) {
            Ok(_) => seqs.push(s),
            Err(EngineError::KvExhausted { .. }) => {
                failed = true;
                break;
            }
            Err(other) => panic!("{other}"),
        }
    }
    assert!(failed);
    drop(seqs);
    assert_eq!(e.kv.free_blocks(), n_blocks);
}

#[test]
fn tokenizer_round_trips_and_matches_specials() {
    let (_d, e) = tiny(&TinySpec::default());
    let t = &e.frontend.tokenizer;
    for text in [
        "the other",
        " the then",
        "héllo wörld 123 🎉",
        "a\n\n  b\t\tc",
        "",
    ] {
        let ids = t.encode(text, true).unwrap();
        assert_eq!(t.decode(&ids), text);
    }
    let ids = t.encode("<|im_start|>user the<|im_end|>", false).unwrap();
    assert_eq!(ids.first(), Some(&262));
    assert_eq!(ids.last(), Some(&263));
    assert!(ids.contains(&258), "'Ġthe' merge: {ids:?}");
    // digits are split one by one
    let ids = t.encode("2026", false).unwrap();
    assert_eq!(ids.len(), 4);
}

#[test]
fn corrupt_and_truncated_files_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let good = engine::synthetic::build(&TinySpec::default()).to_bytes();
    let path = dir.path().join("bad.gguf");
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("magic", b"GGML\x03\x00\x00\x00".to_vec()),
        ("version", [&b"GGUF"[..], &9u32.to_le_bytes()].concat()),
    ];
    for cut in [10, 100, 3000, good.len() / 2, good.len() - 1] {
        cases.push(("truncated", good[..cut].to_vec()));
    }
    let mut huge = good.clone();
    huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes()); // tensor count
    cases.push(("huge count", huge));
    for (what, bytes) in cases {
        std::fs::write(&path, &bytes).unwrap();
        let r = Engine::load(&path, &EngineConfig::default());
        assert!(r.is_err(), "{what} loaded");
    }
    // Flip bytes all over the header: never a panic.
    for i in (0..4000.min(good.len())).step_by(97) {
        let mut b = good.clone();
        b[i] ^= 0x5a;
        std::fs::write(&path, &b).unwrap();
        let _ = std::panic::catch_unwind(|| Engine::load(&path, &EngineConfig::default()))
            .expect("no panic");
    }
    // Unsupported architecture and quant type.
    let mut w = engine::synthetic::build(&TinySpec::default());
    w.meta(
        "general.architecture",
        engine::gguf::Value::String("mamba".into()),
    );
    let bytes = w.to_bytes();
    std::fs::write(&path, bytes).unwrap();
    // The first key wins in our reader? No: duplicates replace. Either way 'mamba' is refused.
    let err = Engine::load(&path, &EngineConfig::default())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("mamba"), "{err}");
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn reads_gguf_version_2_too() {
    // v2 and v3 share the layout Tandem reads (64-bit counts, little-endian).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v2.gguf");
    let mut bytes = engine::synthetic::build(&TinySpec::default()).to_bytes();
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.version, 2);
    let e = Engine::load(&path, &EngineConfig::default()).unwrap();
    let mut s = e.new_sequence();
    assert_eq!(
        e.prefill(&mut s, &prompt(5, 0), LogitsWanted::Last)
            .unwrap()
            .len(),
        e.model.config().vocab_size
    );
}

#[test]
fn an_unsupported_quant_type_is_named_in_the_error() {
    // A one-layer model whose blk.0.attn_q is stored as Q4_K (GGML type 12).
    let spec = TinySpec {
        n_layers: 1,
        ..TinySpec::default()
    };
    let d = spec.d_model as u64;
    let dir = tempfile::tempdir().unwrap();
    let (src, path) = (dir.path().join("a.gguf"), dir.path().join("q4k.gguf"));
    engine::synthetic::write(&spec, &src).unwrap();
    let g = GgufFile::open(&src).unwrap();
    let mut w = engine::gguf::GgufWriter::new();
    for k in g.keys() {
        w.meta(k.clone(), g.get(k).unwrap().clone());
    }
    for t in g.tensors() {
        if t.name == "blk.0.attn_q.weight" {
            // Q4_K: 144 bytes per 256 weights.
            w.tensor(
                t.name.clone(),
                &[d, d],
                engine::gguf::GgmlType::Other(12),
                vec![7u8; (d * d / 256 * 144) as usize],
            );
        } else {
            w.tensor(
                t.name.clone(),
                &t.dims,
                t.ty,
                g.tensor_bytes(t).unwrap().to_vec(),
            );
        }
    }
    w.write(&path).unwrap();
    for precision in [Precision::F32, Precision::Int8, Precision::W4A8] {
        let err = Engine::load(
            &path,
            &EngineConfig {
                precision,
                kv_dtype: Default::default(),
                ..EngineConfig::default()
            },
        )
        .err()
        .expect("refused");
        let msg = err.to_string();
        assert!(
            msg.contains("Q4_K") && msg.contains("blk.0.attn_q.weight"),
            "{msg}"
        );
    }
}

#[test]
fn prefix_cache_hits_are_bit_identical_to_cold_prefill_and_blocks_are_accounted() {
    for precision in [Precision::F32, Precision::Int8, Precision::W4A8] {
        let (_d, e) = tiny_at(&TinySpec::default(), precision);
        let (_d2, cold_engine) = tiny_at(&TinySpec::default(), precision);
        let total = e.kv.n_blocks();
        let system = prompt(50, 9);
        let mut a_prompt = system.clone();
        a_prompt.extend(prompt(7, 1));
        let mut b_prompt = system.clone();
        b_prompt.extend(prompt(11, 2));
        // A computes and publishes its prefix.
        let mut a = e.new_sequence();
        assert_eq!(a.attach_prefix(&a_prompt), 0);
        e.prefill(&mut a, &a_prompt, LogitsWanted::Last).unwrap();
        a.publish_prefix(&a_prompt);
        // B shares the three full blocks of the 50-token system prompt (48 tokens).
        let mut b = e.new_sequence();
        let hit = b.attach_prefix(&b_prompt);
        assert_eq!(hit, 48);
        assert_eq!(&b.block_table()[..3], &a.block_table()[..3]);
        let warm = e
            .prefill(&mut b, &b_prompt[hit..], LogitsWanted::Last)
            .unwrap();
        let mut cold_seq = cold_engine.new_sequence();
        let cold = cold_engine
            .prefill(&mut cold_seq, &b_prompt, LogitsWanted::Last)
            .unwrap();
        assert_eq!(
            bits(&warm),
            bits(&cold),
            "{precision:?}: a prefix hit changes nothing"
        );
        // Decoding on both sides stays identical.
        let w = e.decode_step(&mut [(&mut b, 3)]).unwrap().pop().unwrap();
        let c = cold_engine
            .decode_step(&mut [(&mut cold_seq, 3)])
            .unwrap()
            .pop()
            .unwrap();
        assert_eq!(bits(&w), bits(&c));
        // A prompt that is entirely cached still computes its last token.
        let mut again = e.new_sequence();
        assert_eq!(again.attach_prefix(&a_prompt[..48]), 32);
        drop(again);
        drop(a);
        drop(b);
        assert_eq!(
            e.kv.free_blocks(),
            total,
            "every block is free or evictable again"
        );
        assert!(e.kv.cached_blocks() >= 3);
        // Cached blocks are evicted when memory is needed, never leaked.
        let mut big = e.new_sequence();
        big.reserve(total * 16).unwrap();
        assert_eq!(e.kv.cached_blocks(), 0);
        drop(big);
        let mut c2 = e.new_sequence();
        assert_eq!(
            c2.attach_prefix(&b_prompt),
            0,
            "evicted blocks are no longer found"
        );
    }
}

#[test]
fn stacked_projections_equal_the_separate_ones_bit_for_bit() {
    use engine::linear::{Acts, Linear};
    let spec = TinySpec::default();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write(&spec, &path).unwrap();
    let g = GgufFile::open(&path).unwrap();
    let (d, kvd) = (
        spec.d_model as u64,
        (spec.d_model / spec.n_heads * spec.n_kv_heads) as u64,
    );
    let parts: [(&str, &[u64]); 3] = [
        ("blk.1.attn_q.weight", &[d, d]),
        ("blk.1.attn_k.weight", &[d, kvd]),
        ("blk.1.attn_v.weight", &[d, kvd]),
    ];
    let m = 5;
    let x: Vec<f32> = (0..m * d as usize)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 37.0 + 0.01)
        .collect();
    for p in [Precision::F32, Precision::Int8, Precision::W4A8] {
        let stacked = Linear::load_stacked(&g, &parts, p).unwrap();
        let (n, _) = stacked.dims();
        let mut ys = vec![0f32; m * n];
        stacked.forward(&mut Acts::new(&x, m, d as usize), &mut ys);
        let mut col = 0;
        for (name, shape) in parts {
            let one = Linear::load(&g, name, shape, p).unwrap();
            let (n1, _) = one.dims();
            let mut y1 = vec![0f32; m * n1];
            one.forward(&mut Acts::new(&x, m, d as usize), &mut y1);
            for i in 0..m {
                for j in 0..n1 {
                    assert_eq!(
                        y1[i * n1 + j].to_bits(),
                        ys[i * n + col + j].to_bits(),
                        "{p:?} {name} ({i},{j})"
                    );
                }
            }
            col += n1;
        }
        assert_eq!(col, n);
    }
}

/// A build without the `cuda` feature refuses `--device cuda` with a reason.
#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_in_a_build_without_it_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    engine::synthetic::write(&engine::synthetic::TinySpec::default(), &path).unwrap();
    let cfg = engine::EngineConfig {
        device: engine::Device::Cuda,
        ..Default::default()
    };
    let err = engine::Engine::load(&path, &cfg).err().expect("refused");
    assert!(err.to_string().contains("without CUDA"), "{err}");
}
