//! Made MoEs: an upcycled model computes what its dense source does; a random one's router
//! takes the share of tokens asked for.

use super::*;
use crate::synthetic::{TinySpec, build};

fn dense(dir: &Path) -> GgufFile {
    let path = dir.join("dense.gguf");
    build(&TinySpec {
        n_layers: 3,
        block_formats_only: true,
        ..Default::default()
    })
    .write(&path)
    .unwrap();
    GgufFile::open(&path).unwrap()
}

fn logits(path: &Path, precision: Precision, tokens: &[u32]) -> Vec<f32> {
    let model = LlamaModel::load(&GgufFile::open(path).unwrap(), precision).unwrap();
    let layout = model.kv_layout(KvDtype::F32);
    let mut seq = KvSequence::new(KvPool::new(layout, 8));
    model
        .forward(&mut [ForwardItem {
            seq: &mut seq,
            tokens,
            logits: LogitsWanted::All,
        }])
        .unwrap()
        .pop()
        .unwrap()
}

#[test]
fn an_upcycled_model_computes_what_the_dense_one_does() {
    let dir = tempfile::tempdir().unwrap();
    let src = dense(dir.path());
    let out = dir.path().join("moe.gguf");
    let spec = MoeSpec {
        experts: 4,
        top_k: 2,
        kind: MoeKind::Upcycled { noise: 0.0 },
        seed: 1,
        layers: None,
    };
    let made = make_moe(&src, &spec, &out).unwrap();
    assert_eq!(made.busiest_share.len(), 3);
    let g = GgufFile::open(&out).unwrap();
    let cfg = LlamaConfig::from_metadata(&g).unwrap();
    assert_eq!(cfg.moe.map(|m| (m.n_experts, m.n_used)), Some((4, 2)));
    let tokens: Vec<u32> = (0..30).map(|i| (i * 37 + 5) % 262).collect();
    for precision in [Precision::F32, Precision::W4A8, Precision::Int8] {
        // Bit for bit: identical experts combine exactly.
        let bits = |x: Vec<f32>| x.into_iter().map(f32::to_bits).collect::<Vec<_>>();
        assert_eq!(
            bits(logits(&out, precision, &tokens)),
            bits(logits(src.path(), precision, &tokens)),
            "{precision}"
        );
    }
    // With noise the experts differ, and so do the logits.
    let noisy = dir.path().join("noisy.gguf");
    make_moe(
        &src,
        &MoeSpec {
            kind: MoeKind::Upcycled { noise: 0.5 },
            ..spec
        },
        &noisy,
    )
    .unwrap();
    assert_ne!(
        logits(&noisy, Precision::F32, &tokens),
        logits(&out, Precision::F32, &tokens)
    );
}

#[test]
fn a_random_router_takes_the_share_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let src = dense(dir.path());
    for skew in [0.35, 0.6, 0.9] {
        let out = dir.path().join(format!("random-{skew}.gguf"));
        let made = make_moe(
            &src,
            &MoeSpec {
                experts: 8,
                top_k: 2,
                kind: MoeKind::Random { skew, falloff: 1.0 },
                seed: 3,
                layers: Some(2),
            },
            &out,
        )
        .unwrap();
        assert_eq!(made.busiest_share.len(), 2);
        for s in &made.busiest_share {
            assert!((s - skew).abs() < 0.03, "asked {skew}, got {s}");
        }
    }
    let err = make_moe(
        &src,
        &MoeSpec {
            experts: 8,
            top_k: 2,
            kind: MoeKind::Random {
                skew: 0.1,
                falloff: 1.0,
            },
            seed: 3,
            layers: None,
        },
        &dir.path().join("x.gguf"),
    )
    .unwrap_err();
    assert!(err.to_string().contains("even"), "{err}");
}
