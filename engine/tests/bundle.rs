//! Edge bundles: weights packed once, mapped in place, computing the source model's bits.

use engine::bundle::{Packed, WEIGHTS};
use engine::synthetic::{TinySpec, write};
use engine::{Engine, EngineConfig, EngineError, KvDtype, LogitsWanted, Precision};

fn config(precision: Precision, kv_dtype: KvDtype) -> EngineConfig {
    EngineConfig {
        kv_budget_bytes: 4 << 20,
        model_id: None,
        precision,
        kv_dtype,
        kv_shared_path: None,
        device: Default::default(),
    }
}

/// Prefill logits (every position) then three greedy decode steps' logits, as bits.
fn run(e: &Engine) -> Vec<u32> {
    let prompt: Vec<u32> = (0..37u32).map(|i| (i * 31 + 5) % 262).collect();
    let mut seq = e.new_sequence();
    let mut out = e.prefill(&mut seq, &prompt, LogitsWanted::All).unwrap();
    let v = e.model.config().vocab_size;
    let mut tok = engine::sampler::argmax(&out[out.len() - v..]);
    for _ in 0..3 {
        let l = e
            .decode_step(&mut [(&mut seq, tok)])
            .unwrap()
            .pop()
            .unwrap();
        tok = engine::sampler::argmax(&l);
        out.extend(l);
    }
    out.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn a_bundle_computes_its_source_models_bits_at_every_precision() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    // Untied output and mixed tensor types: quantized, int8-requantized and stacked parts.
    write(
        &TinySpec {
            untied_output: true,
            ..Default::default()
        },
        &gguf,
    )
    .unwrap();
    for (precision, kv) in [
        (Precision::W4A8, KvDtype::F16),
        (Precision::Int8, KvDtype::Int8),
        (Precision::F32, KvDtype::F32),
    ] {
        let cfg = config(precision, kv);
        let source = Engine::load(&gguf, &cfg).unwrap();
        let out = dir.path().join(format!("bundle-{precision}"));
        let packed = Packed::new(&gguf, &cfg).unwrap();
        let m = packed
            .write(&out, serde_json::json!({"context": 512}))
            .unwrap();
        assert_eq!(m.weights.bytes as usize, packed.weight_bytes());
        let edge = Engine::load(&out, &cfg).unwrap();
        assert_eq!(edge.frontend.fingerprint, source.frontend.fingerprint);
        assert_eq!(edge.frontend.model_id, "tiny");
        assert_eq!(
            edge.frontend
                .template
                .render(&[engine::chat::ChatMessage::new("user", "hi")], true)
                .unwrap(),
            source
                .frontend
                .template
                .render(&[engine::chat::ChatMessage::new("user", "hi")], true)
                .unwrap()
        );
        assert_eq!(run(&edge), run(&source), "{precision}");
        // Asked at another precision: refused, not silently served.
        let other = config(
            if precision == Precision::F32 {
                Precision::W4A8
            } else {
                Precision::F32
            },
            kv,
        );
        assert!(matches!(
            Engine::load(&out, &other),
            Err(EngineError::Bundle(_))
        ));
    }
}

#[test]
fn a_damaged_bundle_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    write(&TinySpec::default(), &gguf).unwrap();
    let cfg = config(Precision::W4A8, KvDtype::F16);
    let out = dir.path().join("b");
    Packed::new(&gguf, &cfg)
        .unwrap()
        .write(&out, serde_json::Value::Null)
        .unwrap();
    // One flipped byte in the weights: the checksum refuses it.
    let w = out.join(WEIGHTS);
    let mut bytes = std::fs::read(&w).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&w, &bytes).unwrap();
    let err = Engine::load(&out, &cfg).err().expect("refused");
    assert!(err.to_string().contains("checksum"), "{err}");
    // Truncated: refused too.
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    assert!(Engine::load(&out, &cfg).is_err());
    // A manifest whose shapes overrun the weights (or overflow): refused, never read past.
    std::fs::write(&w, &{
        bytes[100] ^= 1;
        bytes
    })
    .unwrap();
    assert!(Engine::load(&out, &cfg).is_ok());
    let mpath = out.join(engine::bundle::MANIFEST);
    let original = std::fs::read_to_string(&mpath).unwrap();
    for n in [1u64 << 20, 1 << 62, u64::MAX / 3] {
        let mut m: serde_json::Value = serde_json::from_str(&original).unwrap();
        m["tensors"]["layers"][0]["wo"]["n"] = n.into();
        std::fs::write(&mpath, m.to_string()).unwrap();
        let err = Engine::load(&out, &cfg).err().expect("refused");
        assert!(err.to_string().contains("does not fit"), "{err}");
    }
    std::fs::write(&mpath, &original).unwrap();
    // Another format version: refused with the reason.
    let text = std::fs::read_to_string(&mpath).unwrap();
    std::fs::write(
        &mpath,
        text.replace(engine::bundle::FORMAT, "tandem-edge/9"),
    )
    .unwrap();
    let err = Engine::load(&out, &cfg).err().expect("refused");
    assert!(err.to_string().contains("tandem-edge/9"), "{err}");
    std::fs::write(&mpath, &original).unwrap();

    // Checked in small chunks (both load threads take some): a flipped byte in any one chunk
    // is found; a manifest whose chunk list does not cover the file is refused.
    let mut bytes = std::fs::read(&w).unwrap();
    let chunk = 4096;
    let mut m: serde_json::Value = serde_json::from_str(&original).unwrap();
    m["weights"]["chunk_bytes"] = chunk.into();
    m["weights"]["chunk_xxh3"] = bytes
        .chunks(chunk)
        .map(|c| format!("{:016x}", xxhash_rust::xxh3::xxh3_64(c)))
        .collect();
    let n_chunks = bytes.len().div_ceil(chunk);
    assert!(n_chunks >= 8, "{n_chunks} chunks");
    std::fs::write(&mpath, m.to_string()).unwrap();
    assert!(Engine::load(&out, &cfg).is_ok());
    for at in [0, n_chunks / 2 * chunk + 7, bytes.len() - 1] {
        bytes[at] ^= 0x40;
        std::fs::write(&w, &bytes).unwrap();
        let err = Engine::load(&out, &cfg).err().expect("refused");
        assert!(err.to_string().contains("checksum"), "byte {at}: {err}");
        bytes[at] ^= 0x40;
    }
    std::fs::write(&w, &bytes).unwrap();
    m["weights"]["chunk_xxh3"].as_array_mut().unwrap().pop();
    std::fs::write(&mpath, m.to_string()).unwrap();
    let err = Engine::load(&out, &cfg).err().expect("refused");
    assert!(err.to_string().contains("size"), "{err}");
}
