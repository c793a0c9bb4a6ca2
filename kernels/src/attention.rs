//! Causal attention of one query row over a paged KV cache.
//!
//! The cache is a list of blocks, each holding `block_size` positions of K and of V laid out as
//! `[position][kv_head][head_dim]`. Grouped-query attention maps query head `h` to KV head
//! `h / (n_heads / n_kv_heads)`. Scores are reduced in position order, so the result depends
//! only on this sequence's cache, never on what else is in the batch.

use crate::dispatch::{SimdLevel, level};
use crate::dot::dot_at;

/// Shape of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
}

impl AttnShape {
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// One block's K and V, each `[block_size × kv_dim]`.
pub type KvBlockRef<'a> = (&'a [f32], &'a [f32]);

/// Attends `q: [n_heads × head_dim]` over the first `n_ctx` cached positions; writes
/// `out: [n_heads × head_dim]`. `scores` is scratch of at least `n_ctx` floats.
pub fn attend(
    shape: AttnShape,
    q: &[f32],
    blocks: &[KvBlockRef<'_>],
    n_ctx: usize,
    scores: &mut [f32],
    out: &mut [f32],
) {
    attend_at(level(), shape, q, blocks, n_ctx, scores, out)
}

/// [`attend`] at an explicit level. Every level runs the same arithmetic per output except the
/// score dot products, which are [`dot_at`] at that level.
pub fn attend_at(
    lvl: SimdLevel,
    shape: AttnShape,
    q: &[f32],
    blocks: &[KvBlockRef<'_>],
    n_ctx: usize,
    scores: &mut [f32],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if lvl >= SimdLevel::Avx2 {
        assert!(SimdLevel::detect() >= SimdLevel::Avx2);
        // SAFETY: AVX2 and FMA are present (checked above).
        unsafe { attend_avx2(shape, q, blocks, n_ctx, scores, out) };
        return;
    }
    attend_body(shape, q, blocks, n_ctx, scores, out, |a, b| {
        dot_at(lvl, a, b)
    });
}

/// The same body compiled with AVX2 enabled: the dot products inline and the weighted V sum
/// vectorizes (element by element, so its bits equal the scalar loop's).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(
    shape: AttnShape,
    q: &[f32],
    blocks: &[KvBlockRef<'_>],
    n_ctx: usize,
    scores: &mut [f32],
    out: &mut [f32],
) {
    attend_body(shape, q, blocks, n_ctx, scores, out, |a, b| {
        // SAFETY: this function only runs with AVX2 and FMA enabled.
        unsafe { crate::dot::x86::dot_avx2(a, b) }
    });
}

#[inline(always)]
fn attend_body(
    shape: AttnShape,
    q: &[f32],
    blocks: &[KvBlockRef<'_>],
    n_ctx: usize,
    scores: &mut [f32],
    out: &mut [f32],
    dot: impl Fn(&[f32], &[f32]) -> f32,
) {
    let AttnShape {
        n_heads,
        n_kv_heads,
        head_dim,
        block_size,
    } = shape;
    let kv_dim = shape.kv_dim();
    assert_eq!(q.len(), n_heads * head_dim);
    assert_eq!(out.len(), n_heads * head_dim);
    assert!(n_ctx >= 1 && n_ctx <= blocks.len() * block_size);
    assert!(n_heads % n_kv_heads == 0);
    assert!(
        blocks
            .iter()
            .all(|(k, v)| k.len() >= block_size * kv_dim && v.len() >= block_size * kv_dim)
    );
    let group = n_heads / n_kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let scores = &mut scores[..n_ctx];
    for h in 0..n_heads {
        let kvh = h / group;
        let qh = &q[h * head_dim..(h + 1) * head_dim];
        let mut max = f32::NEG_INFINITY;
        for (b, sc) in scores.chunks_mut(block_size).enumerate() {
            let (k, _) = blocks[b];
            for (p, s) in sc.iter_mut().enumerate() {
                let off = p * kv_dim + kvh * head_dim;
                *s = dot(qh, &k[off..off + head_dim]) * scale;
                max = max.max(*s);
            }
        }
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        let oh = &mut out[h * head_dim..(h + 1) * head_dim];
        oh.fill(0.0);
        for (b, sc) in scores.chunks(block_size).enumerate() {
            let (_, v) = blocks[b];
            for (p, s) in sc.iter().enumerate() {
                let off = p * kv_dim + kvh * head_dim;
                let pr = s * inv;
                for (o, vv) in oh.iter_mut().zip(&v[off..off + head_dim]) {
                    *o += pr * vv;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_data as fill;

    /// Dense reference: contiguous K/V of `n_ctx` positions, f64 softmax.
    fn reference(shape: AttnShape, q: &[f32], k: &[f32], v: &[f32], n_ctx: usize) -> Vec<f64> {
        let (hd, kvd) = (shape.head_dim, shape.kv_dim());
        let group = shape.n_heads / shape.n_kv_heads;
        let mut out = vec![0f64; shape.n_heads * hd];
        for h in 0..shape.n_heads {
            let kvh = h / group;
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

    #[test]
    fn paged_matches_dense_reference() {
        for &(n_heads, n_kv, hd, bs) in &[
            (9usize, 3usize, 64usize, 16usize),
            (4, 4, 16, 4),
            (2, 1, 17, 3),
        ] {
            let shape = AttnShape {
                n_heads,
                n_kv_heads: n_kv,
                head_dim: hd,
                block_size: bs,
            };
            for &n_ctx in &[1usize, 2, bs - 1, bs, bs + 1, 3 * bs + 2] {
                let n_ctx = n_ctx.max(1);
                let kvd = shape.kv_dim();
                let n_blocks = n_ctx.div_ceil(bs);
                let k = fill(n_blocks * bs * kvd, 1 + n_ctx as u64);
                let v = fill(n_blocks * bs * kvd, 7 + n_ctx as u64);
                let q = fill(n_heads * hd, 3);
                let blocks: Vec<KvBlockRef> = (0..n_blocks)
                    .map(|b| {
                        (
                            &k[b * bs * kvd..(b + 1) * bs * kvd],
                            &v[b * bs * kvd..(b + 1) * bs * kvd],
                        )
                    })
                    .collect();
                let want = reference(shape, &q, &k, &v, n_ctx);
                for lvl in SimdLevel::available() {
                    let mut out = vec![0f32; n_heads * hd];
                    let mut scratch = vec![0f32; n_ctx];
                    attend_at(lvl, shape, &q, &blocks, n_ctx, &mut scratch, &mut out);
                    for (a, b) in out.iter().zip(&want) {
                        assert!((*a as f64 - b).abs() < 1e-5, "{lvl:?} {n_ctx}: {a} vs {b}");
                    }
                }
            }
        }
    }
}
