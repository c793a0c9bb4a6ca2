use super::*;
use crate::test_data as fill;

/// Dense f64 reference over contiguous `k, v: [n_ctx × kv_dim]` for one row.
fn dense(shape: AttnShape, q: &[f32], k: &[f32], v: &[f32], n_ctx: usize) -> Vec<f64> {
    let (hd, kvd) = (shape.head_dim, shape.kv_dim());
    let mut out = vec![0f64; shape.n_heads * hd];
    for h in 0..shape.n_heads {
        let kvh = h / shape.group();
        let s: Vec<f64> = (0..n_ctx)
            .map(|p| {
                (0..hd)
                    .map(|d| q[h * hd + d] as f64 * k[p * kvd + kvh * hd + d] as f64)
                    .sum::<f64>()
                    / (hd as f64).sqrt()
            })
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        for p in 0..n_ctx {
            for d in 0..hd {
                out[h * hd + d] += e[p] / z * v[p * kvd + kvh * hd + d] as f64;
            }
        }
    }
    out
}

/// Blocks in the pool's layout (K transposed) from dense `[positions × kv_dim]` values.
struct Store {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

fn store(shape: AttnShape, k: &[f32], v: &[f32], n_blocks: usize) -> Store {
    let (bs, kvd, hd) = (shape.block_size, shape.kv_dim(), shape.head_dim);
    let mut s = Store {
        k: vec![],
        v: vec![],
    };
    for b in 0..n_blocks {
        let mut kb = vec![0f32; bs * kvd];
        let mut vb = vec![0f32; bs * kvd];
        for p in 0..bs {
            for h in 0..shape.n_kv_heads {
                for d in 0..hd {
                    let src = (b * bs + p) * kvd + h * hd + d;
                    kb[shape.k_index(p, h, d)] = k[src];
                    vb[shape.v_index(p, h, d)] = v[src];
                }
            }
        }
        s.k.push(kb);
        s.v.push(vb);
    }
    s
}

/// 8-bit planes: per (position, head) scales in each plane's order, and the exact dequantized
/// values as f32 planes.
type I8Planes = (Vec<(Vec<i8>, Vec<f32>)>, Vec<(Vec<i8>, Vec<f32>)>, Store);

fn quantize(shape: AttnShape, st: &Store) -> I8Planes {
    let (bs, hd, nkv) = (shape.block_size, shape.head_dim, shape.n_kv_heads);
    let one = |plane: &[f32],
               idx: &dyn Fn(usize, usize, usize) -> usize,
               si: &dyn Fn(usize, usize) -> usize| {
        let mut q = vec![0i8; plane.len()];
        let mut sc = vec![0f32; bs * nkv];
        let mut deq = vec![0f32; plane.len()];
        for p in 0..bs {
            for h in 0..nkv {
                let amax = (0..hd).fold(0f32, |a, d| a.max(plane[idx(p, h, d)].abs()));
                let s = amax / 127.0;
                sc[si(p, h)] = s;
                for d in 0..hd {
                    let i = idx(p, h, d);
                    q[i] = (plane[i] / s).round() as i8;
                    deq[i] = q[i] as f32 * s;
                }
            }
        }
        (q, sc, deq)
    };
    let (mut ks, mut vs, mut deq) = (
        vec![],
        vec![],
        Store {
            k: vec![],
            v: vec![],
        },
    );
    for (kb, vb) in st.k.iter().zip(&st.v) {
        let (q, s, d) = one(kb, &|p, h, d| shape.k_index(p, h, d), &|p, h| {
            shape.k_scale_index(p, h)
        });
        ks.push((q, s));
        deq.k.push(d);
        let (q, s, d) = one(vb, &|p, h, d| shape.v_index(p, h, d), &|p, h| {
            shape.v_scale_index(p, h)
        });
        vs.push((q, s));
        deq.v.push(d);
    }
    (ks, vs, deq)
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Every row of `rows` alone and together, every head split, every level: one set of bits.
fn run_all(
    shape: AttnShape,
    q: &[f32],
    rows: usize,
    first: usize,
    blocks: &[KvBlockRef<'_>],
) -> Vec<f32> {
    let (nh, hd) = (shape.n_heads, shape.head_dim);
    let x = AttnRows {
        q,
        rows,
        first_ctx: first,
        blocks,
    };
    // The reference, head group by head group, into [rows × n_heads × hd].
    let full = |lvl: Option<SimdLevel>, x: AttnRows<'_>| {
        let mut o = vec![0f32; x.rows * nh * hd];
        for kvh in 0..shape.n_kv_heads {
            let hs = kvh * shape.group()..(kvh + 1) * shape.group();
            let mut part = vec![f32::NAN; x.rows * hs.len() * hd];
            match lvl {
                None => reference(shape, hs.clone(), x, &mut part),
                Some(l) => attend_rows_at(l, shape, hs.clone(), x, &mut part),
            }
            for r in 0..x.rows {
                o[(r * nh + hs.start) * hd..][..hs.len() * hd]
                    .copy_from_slice(&part[r * hs.len() * hd..][..hs.len() * hd]);
            }
        }
        o
    };
    let want = full(None, x);
    for lvl in SimdLevel::available() {
        assert_eq!(bits(&full(Some(lvl), x)), bits(&want), "{lvl:?}");
        // Each row alone.
        for r in 0..rows {
            let one = AttnRows {
                q: &q[r * nh * hd..][..nh * hd],
                rows: 1,
                first_ctx: first + r,
                blocks,
            };
            assert_eq!(
                bits(&full(Some(lvl), one)),
                bits(&want[r * nh * hd..][..nh * hd]),
                "{lvl:?} row {r}"
            );
        }
        // Single heads.
        for h in 0..nh {
            let mut o = vec![0f32; rows * hd];
            attend_rows_at(lvl, shape, h..h + 1, x, &mut o);
            for r in 0..rows {
                assert_eq!(
                    bits(&o[r * hd..][..hd]),
                    bits(&want[(r * nh + h) * hd..][..hd]),
                    "{lvl:?} head {h}"
                );
            }
        }
    }
    want
}

#[test]
fn every_level_and_tiling_equals_the_definition_and_a_dense_reference() {
    for &(n_heads, n_kv, hd, bs) in &[
        (9usize, 3usize, 64usize, 16usize),
        (4, 2, 32, 16),
        (3, 1, 16, 16),
        (4, 4, 16, 4),
        (2, 1, 17, 3),
    ] {
        let shape = AttnShape {
            n_heads,
            n_kv_heads: n_kv,
            head_dim: hd,
            block_size: bs,
        };
        for &(first, rows) in &[
            (1usize, 1usize),
            (1, 9),
            (bs - 1, 3),
            (bs, 1),
            (bs + 1, 8),
            (3 * bs + 2, 11),
            (40, 24),
        ] {
            let last = first + rows - 1;
            let kvd = shape.kv_dim();
            let n_blocks = last.div_ceil(bs);
            // Values exactly representable in f16, so every storage type holds the same numbers.
            let round = |x: Vec<f32>| -> Vec<f32> {
                x.into_iter().map(|v| f16::from_f32(v).to_f32()).collect()
            };
            let k = round(fill(n_blocks * bs * kvd, 1 + last as u64));
            let v = round(fill(n_blocks * bs * kvd, 7 + last as u64));
            let q: Vec<f32> = fill(rows * n_heads * hd, 3 + rows as u64)
                .iter()
                .map(|x| x * 3.0)
                .collect();
            let st = store(shape, &k, &v, n_blocks);
            let blocks: Vec<KvBlockRef> =
                st.k.iter()
                    .zip(&st.v)
                    .map(|(a, b)| (KvSlice::F32(a), KvSlice::F32(b)))
                    .collect();
            let want = run_all(shape, &q, rows, first, &blocks);
            for r in 0..rows {
                let d = dense(
                    shape,
                    &q[r * n_heads * hd..][..n_heads * hd],
                    &k,
                    &v,
                    first + r,
                );
                for (a, b) in want[r * n_heads * hd..][..n_heads * hd].iter().zip(&d) {
                    assert!(
                        (*a as f64 - b).abs() < 2e-6,
                        "{shape:?} ctx {}: {a} vs {b}",
                        first + r
                    );
                }
            }
            // f16 storage of the same values: the same bits.
            let h16 = |x: &Vec<f32>| -> Vec<f16> { x.iter().map(|&v| f16::from_f32(v)).collect() };
            let (k16, v16): (Vec<_>, Vec<_>) = (
                st.k.iter().map(h16).collect(),
                st.v.iter().map(h16).collect(),
            );
            let blocks16: Vec<KvBlockRef> = k16
                .iter()
                .zip(&v16)
                .map(|(a, b)| (KvSlice::F16(a), KvSlice::F16(b)))
                .collect();
            assert_eq!(
                bits(&run_all(shape, &q, rows, first, &blocks16)),
                bits(&want)
            );
            // 8-bit storage: the bits of f32 storage of its exact dequantized values.
            let (kq, vq, deq) = quantize(shape, &st);
            let blocks8: Vec<KvBlockRef> = kq
                .iter()
                .zip(&vq)
                .map(|((kq, ks), (vq, vs))| {
                    (
                        KvSlice::I8 { q: kq, scale: ks },
                        KvSlice::I8 { q: vq, scale: vs },
                    )
                })
                .collect();
            let blocks8f: Vec<KvBlockRef> = deq
                .k
                .iter()
                .zip(&deq.v)
                .map(|(a, b)| (KvSlice::F32(a), KvSlice::F32(b)))
                .collect();
            assert_eq!(
                bits(&run_all(shape, &q, rows, first, &blocks8)),
                bits(&run_all(shape, &q, rows, first, &blocks8f))
            );
        }
    }
}

#[test]
fn positions_past_the_context_are_never_read() {
    // Garbage (NaN, infinities) after the last position of the last block changes nothing.
    let shape = AttnShape {
        n_heads: 3,
        n_kv_heads: 1,
        head_dim: 16,
        block_size: 16,
    };
    let (first, rows) = (5usize, 4usize);
    let k = fill(16 * 16, 1);
    let v = fill(16 * 16, 2);
    let q = fill(rows * 3 * 16, 3);
    let st = store(shape, &k, &v, 1);
    let blocks: Vec<KvBlockRef> = vec![(KvSlice::F32(&st.k[0]), KvSlice::F32(&st.v[0]))];
    let want = run_all(shape, &q, rows, first, &blocks);
    let (mut kb, mut vb) = (st.k[0].clone(), st.v[0].clone());
    for p in first + rows - 1..16 {
        for d in 0..16 {
            kb[shape.k_index(p, 0, d)] = f32::NAN;
            vb[shape.v_index(p, 0, d)] = f32::INFINITY;
        }
    }
    let dirty: Vec<KvBlockRef> = vec![(KvSlice::F32(&kb), KvSlice::F32(&vb))];
    assert_eq!(bits(&run_all(shape, &q, rows, first, &dirty)), bits(&want));
}
