//! The mixture-of-experts FFN against a naive f64 reference written from the definition.

use super::*;
use crate::gguf::GgufFile;
use crate::synthetic::{TinySpec, build};

struct Tiny {
    _dir: tempfile::TempDir,
    g: GgufFile,
    cfg: LlamaConfig,
}

fn tiny(experts: usize, used: usize, seed: u64) -> Tiny {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("moe.gguf");
    build(&TinySpec {
        experts: Some((experts, used)),
        seed,
        ..Default::default()
    })
    .write(&path)
    .unwrap();
    let g = GgufFile::open(&path).unwrap();
    let cfg = LlamaConfig::from_metadata(&g).unwrap();
    Tiny { _dir: dir, g, cfg }
}

/// Pseudo-random rows, never zero.
fn rows(r: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..r * d)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0 + 1e-3
        })
        .collect()
}

/// Layer `layer`'s MoE FFN for one row, from the dequantized tensors in f64: softmax over the
/// router's logits, the `k` largest (ties to the lower index), renormalized, each expert's
/// `down(silu(gate x) * up x)` weighted and summed. Also returns the experts chosen.
fn reference(t: &Tiny, layer: usize, x: &[f32]) -> (Vec<f64>, Vec<usize>) {
    let (d, ff) = (t.cfg.d_model, t.cfg.d_ff);
    let m = t.cfg.moe.unwrap();
    let f = |n: &str| {
        t.g.tensor_f32(&format!("blk.{layer}.{n}.weight"))
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect::<Vec<f64>>()
    };
    let (router, gate, up, down) = (
        f("ffn_gate_inp"),
        f("ffn_gate_exps"),
        f("ffn_up_exps"),
        f("ffn_down_exps"),
    );
    let dot = |w: &[f64], x: &[f64]| w.iter().zip(x).map(|(a, b)| a * b).sum::<f64>();
    let x: Vec<f64> = x.iter().map(|&v| v.into()).collect();
    let logits: Vec<f64> = (0..m.n_experts)
        .map(|e| dot(&router[e * d..(e + 1) * d], &x))
        .collect();
    let max = logits.iter().cloned().fold(f64::MIN, f64::max);
    let z: f64 = logits.iter().map(|l| (l - max).exp()).sum();
    let p: Vec<f64> = logits.iter().map(|l| (l - max).exp() / z).collect();
    let mut order: Vec<usize> = (0..m.n_experts).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    let chosen = order[..m.n_used].to_vec();
    let total: f64 = chosen.iter().map(|&e| p[e]).sum();
    let mut out = vec![0f64; d];
    for &e in &chosen {
        let g = &gate[e * ff * d..(e + 1) * ff * d];
        let u = &up[e * ff * d..(e + 1) * ff * d];
        let dn = &down[e * d * ff..(e + 1) * d * ff];
        let act: Vec<f64> = (0..ff)
            .map(|j| {
                let a = dot(&g[j * d..(j + 1) * d], &x);
                a / (1.0 + (-a).exp()) * dot(&u[j * d..(j + 1) * d], &x)
            })
            .collect();
        for (i, o) in out.iter_mut().enumerate() {
            *o += p[e] / total * dot(&dn[i * ff..(i + 1) * ff], &act);
        }
    }
    (out, chosen)
}

fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(&a, b)| (a as f64 - b).powi(2))
        .sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    (num / den).sqrt()
}

#[test]
fn moe_ffn_matches_the_reference_at_every_precision() {
    for (experts, used, seed) in [(6, 2, 3), (8, 2, 11), (4, 1, 5), (5, 3, 9)] {
        let t = tiny(experts, used, seed);
        let d = t.cfg.d_model;
        let r = 13;
        let h = rows(r, d, seed);
        for (precision, tol) in [
            (Precision::F32, 1e-5),
            (Precision::W4A8, 0.03),
            (Precision::Int8, 0.03),
        ] {
            for layer in 0..t.cfg.n_layers {
                let moe = Moe::load(&t.g, layer, &t.cfg, t.cfg.moe.unwrap(), precision).unwrap();
                let routing = moe.route(&h, r);
                let mut out = vec![0f32; r * d];
                moe.forward(0, &h, r, &mut out, None).unwrap();
                let mut used_experts = std::collections::BTreeSet::new();
                for row in 0..r {
                    let (want, chosen) = reference(&t, layer, &h[row * d..(row + 1) * d]);
                    let got: Vec<usize> = routing.experts[row * used..(row + 1) * used]
                        .iter()
                        .map(|&e| e as usize)
                        .collect();
                    assert_eq!(got, chosen, "{precision} layer {layer} row {row}");
                    let w = &routing.weights[row * used..(row + 1) * used];
                    assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-6);
                    let e = rel_err(&out[row * d..(row + 1) * d], &want);
                    assert!(
                        e < tol,
                        "{precision} {experts}x{used} layer {layer} row {row}: {e}"
                    );
                    used_experts.extend(chosen);
                }
                assert!(used_experts.len() > used, "the rows spread over experts");
            }
        }
    }
}

#[test]
fn a_rows_output_does_not_depend_on_its_batch() {
    let t = tiny(8, 2, 21);
    let d = t.cfg.d_model;
    let r = 17;
    let h = rows(r, d, 4);
    for precision in [Precision::F32, Precision::W4A8, Precision::Int8] {
        let moe = Moe::load(&t.g, 1, &t.cfg, t.cfg.moe.unwrap(), precision).unwrap();
        let mut all = vec![0f32; r * d];
        moe.forward(1, &h, r, &mut all, None).unwrap();
        for row in [0, 5, 16] {
            let mut one = vec![0f32; d];
            moe.forward(1, &h[row * d..(row + 1) * d], 1, &mut one, None)
                .unwrap();
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&one),
                bits(&all[row * d..(row + 1) * d]),
                "{precision} row {row}"
            );
        }
    }
}

#[test]
fn groups_list_each_experts_rows_and_where_each_slot_is() {
    let routing = Routing {
        n_used: 2,
        experts: vec![2, 0, 0, 1, 2, 1],
        weights: vec![0.6, 0.4, 0.7, 0.3, 0.5, 0.5],
    };
    let g = routing.groups(4);
    assert_eq!(g.rows, vec![vec![0, 1], vec![1, 2], vec![0, 2], vec![]]);
    assert_eq!(g.at, vec![0, 0, 1, 0, 1, 1]);
    // Outputs that name their (expert, row): combine must pick each row's own.
    let d = 2;
    let outputs: Vec<Vec<f32>> = g
        .rows
        .iter()
        .enumerate()
        .map(|(e, rows)| rows.iter().flat_map(|&r| [e as f32, r as f32]).collect())
        .collect();
    let mut out = vec![0f32; 3 * d];
    combine(&routing, &g, &outputs, d, &mut out);
    // y0 + w1 (y1 - y0), in f32.
    let f = |y0: f32, w1: f32, y1: f32| y0 + w1 * (y1 - y0);
    let want = [
        f(2.0, 0.4, 0.0),
        f(0.0, 0.4, 0.0),
        f(0.0, 0.3, 1.0),
        f(1.0, 0.3, 1.0),
        f(2.0, 0.5, 1.0),
        f(2.0, 0.5, 2.0),
    ];
    assert_eq!(out, want);
}

#[test]
fn ties_go_to_the_lower_expert() {
    let t = tiny(4, 2, 2);
    let mut moe = Moe::load(&t.g, 0, &t.cfg, t.cfg.moe.unwrap(), Precision::F32).unwrap();
    moe.router.iter_mut().for_each(|w| *w = 0.0);
    let r = moe.route(&rows(3, t.cfg.d_model, 1), 3);
    assert_eq!(r.experts, vec![0, 1, 0, 1, 0, 1]);
    assert!(r.weights.iter().all(|&w| w == 0.5));
}
