//! Causal attention of one query row over a paged KV cache.
//!
//! The cache is a list of blocks, each holding `block_size` positions of K and of V laid out as
//! `[position][kv_head][head_dim]`. Grouped-query attention maps query head `h` to KV head
//! `h / (n_heads / n_kv_heads)`. Scores are reduced in position order, so the result depends
//! only on this sequence's cache, never on what else is in the batch.

use crate::dispatch::{SimdLevel, level};
use crate::dot::dot_at;
use half::f16;

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

/// One block's K or V plane, `[block_size × kv_dim]`, in the pool's storage type.
#[derive(Debug, Clone, Copy)]
pub enum KvSlice<'a> {
    F32(&'a [f32]),
    /// Half precision (the default KV format): half the memory and half the bytes to read;
    /// converted exactly to f32 a block at a time as attention reads it.
    F16(&'a [f16]),
    /// 8-bit values with one f32 scale per position and KV head (`scale[p·kv_heads + h]`): a
    /// quarter of f32's memory; dequantized as attention reads it.
    I8 {
        q: &'a [i8],
        scale: &'a [f32],
        kv_dim: usize,
        head_dim: usize,
    },
}

impl KvSlice<'_> {
    pub fn len(&self) -> usize {
        match self {
            KvSlice::F32(s) => s.len(),
            KvSlice::F16(s) => s.len(),
            KvSlice::I8 { q, .. } => q.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Value `i` as f32 (exact).
    #[inline]
    fn get(&self, i: usize) -> f32 {
        match self {
            KvSlice::F32(s) => s[i],
            KvSlice::F16(s) => s[i].to_f32(),
            KvSlice::I8 {
                q,
                scale,
                kv_dim,
                head_dim,
            } => q[i] as f32 * scale[i / kv_dim * (kv_dim / head_dim) + i % kv_dim / head_dim],
        }
    }
}

/// Dequantizes the `hd` values of one position and head of an 8-bit plane starting at `off`
/// (they share one scale) into `out`.
#[inline(always)]
fn i8_head(q: &[i8], scale: &[f32], kv_dim: usize, head_dim: usize, off: usize, out: &mut [f32]) {
    debug_assert!(off.is_multiple_of(head_dim) && out.len() == head_dim);
    let s = scale[off / kv_dim * (kv_dim / head_dim) + off % kv_dim / head_dim];
    let n = out.len();
    for (o, &v) in out.iter_mut().zip(&q[off..off + n]) {
        *o = v as f32 * s;
    }
}

/// `oh += Σ_p (sc[p]·inv)·v[p]` over an 8-bit plane: each value dequantized exactly as
/// [`KvSlice::get`] does, then the same multiply and add as the f32 loop.
#[inline(always)]
fn weighted_v_i8(oh: &mut [f32], sc: &[f32], inv: f32, v: &KvSlice<'_>, stride: usize, col: usize) {
    let KvSlice::I8 {
        q,
        scale,
        kv_dim,
        head_dim,
    } = *v
    else {
        unreachable!("an 8-bit plane")
    };
    if oh.len() != head_dim || !col.is_multiple_of(head_dim) {
        return weighted_v_scalar(oh, sc, inv, v, stride, col);
    }
    let mut row = [0f32; 256];
    let mut big = Vec::new();
    let row: &mut [f32] = if head_dim <= 256 {
        &mut row[..head_dim]
    } else {
        big.resize(head_dim, 0.0);
        &mut big
    };
    for (p, s) in sc.iter().enumerate() {
        i8_head(q, scale, kv_dim, head_dim, p * stride + col, row);
        let pr = s * inv;
        for (o, vv) in oh.iter_mut().zip(row.iter()) {
            *o += pr * vv;
        }
    }
}

/// One block's K and V.
pub type KvBlockRef<'a> = (KvSlice<'a>, KvSlice<'a>);

/// Attends `q: [n_heads × head_dim]` over the first `n_ctx` cached positions; writes
/// `out: [n_heads × head_dim]`. `scores` is scratch of at least `4 · n_ctx` floats (or
/// `heads · n_ctx` when fewer than four heads are asked for).
pub fn attend(
    shape: AttnShape,
    q: &[f32],
    blocks: &[KvBlockRef<'_>],
    n_ctx: usize,
    scores: &mut [f32],
    out: &mut [f32],
) {
    attend_heads(shape, 0..shape.n_heads, q, blocks, n_ctx, scores, out)
}

/// [`attend`] for the query heads in `heads` only (`out` holds just those heads), so one
/// row's heads can run on several threads; each head's result is the same either way.
pub fn attend_heads(
    shape: AttnShape,
    heads: std::ops::Range<usize>,
    q: &[f32],
    blocks: &[KvBlockRef<'_>],
    n_ctx: usize,
    scores: &mut [f32],
    out: &mut [f32],
) {
    attend_at(level(), shape, heads, q, blocks, n_ctx, scores, out)
}

/// [`attend`] at an explicit level. Every level runs the same arithmetic per output except the
/// score dot products, which are [`dot_at`] at that level.
#[allow(clippy::too_many_arguments)]
pub fn attend_at(
    lvl: SimdLevel,
    shape: AttnShape,
    heads: std::ops::Range<usize>,
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
        unsafe { attend_avx2(shape, heads, q, blocks, n_ctx, scores, out) };
        return;
    }
    attend_body(
        shape,
        heads,
        q,
        blocks,
        n_ctx,
        scores,
        out,
        |k, off, hd, qs| match k {
            KvSlice::F32(s) => qs.map(|qh| dot_at(lvl, qh, &s[off..off + hd])),
            KvSlice::F16(_) | KvSlice::I8 { .. } => {
                let key: Vec<f32> = (off..off + hd).map(|i| k.get(i)).collect();
                qs.map(|qh| dot_at(lvl, qh, &key))
            }
        },
        weighted_v_scalar,
    );
}

/// The same body compiled with AVX2 enabled: the score dot products of up to four query heads
/// that share a KV head run together (`dot4`, bit-identical to four `dot` calls), and the
/// weighted V sum keeps each output slice in registers across positions (element by element
/// the same operations as the scalar loop, so the same bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_avx2(
    shape: AttnShape,
    heads: std::ops::Range<usize>,
    q: &[f32],
    blocks: &[KvBlockRef<'_>],
    n_ctx: usize,
    scores: &mut [f32],
    out: &mut [f32],
) {
    attend_body(
        shape,
        heads,
        q,
        blocks,
        n_ctx,
        scores,
        out,
        // SAFETY (both closures): this function only runs with AVX2, FMA and F16C enabled.
        |k, off, hd, qs| match k {
            KvSlice::F32(s) => unsafe { crate::dot::x86::dot4_avx2(&s[off..off + hd], qs) },
            KvSlice::F16(s) => unsafe { x86::dot4_f16(&s[off..off + hd], qs) },
            KvSlice::I8 {
                q,
                scale,
                kv_dim,
                head_dim,
            } if hd == *head_dim && hd <= 256 => {
                let mut key = [0f32; 256];
                i8_head(q, scale, *kv_dim, *head_dim, off, &mut key[..hd]);
                unsafe { crate::dot::x86::dot4_avx2(&key[..hd], qs) }
            }
            KvSlice::I8 { .. } => {
                let key: Vec<f32> = (off..off + hd).map(|i| k.get(i)).collect();
                unsafe { crate::dot::x86::dot4_avx2(&key, qs) }
            }
        },
        |oh, sc, inv, v, stride, col| match v {
            KvSlice::F32(s) => unsafe { x86::weighted_v(oh, sc, inv, s, stride, col) },
            KvSlice::F16(s) => unsafe { x86::weighted_v_f16(oh, sc, inv, s, stride, col) },
            KvSlice::I8 { .. } => weighted_v_i8(oh, sc, inv, v, stride, col),
        },
    );
}

/// `oh += Σ_p (sc[p]·inv)·rows[p·stride + col ..][..len]`, in position order (one block).
#[inline(always)]
fn weighted_v_scalar(
    oh: &mut [f32],
    sc: &[f32],
    inv: f32,
    rows: &KvSlice<'_>,
    stride: usize,
    col: usize,
) {
    for (p, s) in sc.iter().enumerate() {
        let at = p * stride + col;
        let pr = s * inv;
        for (e, o) in oh.iter_mut().enumerate() {
            *o += pr * rows.get(at + e);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{KvSlice, weighted_v_scalar};
    use half::f16;
    use std::arch::x86_64::*;

    /// Four dot products of an f16 key with f32 queries: the arithmetic of `dot4_avx2` on the
    /// key converted exactly to f32 (so the same bits), reading half the bytes.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub unsafe fn dot4_f16(k: &[f16], qs: [&[f32]; 4]) -> [f32; 4] {
        const LANES: usize = 16;
        let n = k.len();
        assert!(qs.iter().all(|q| q.len() == n));
        let full = n / LANES * LANES;
        let pk = k.as_ptr() as *const u16;
        let px = qs.map(|x| x.as_ptr());
        let mut lo = [_mm256_setzero_ps(); 4];
        let mut hi = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i < full {
            // SAFETY: i + 16 <= full <= len of every slice.
            unsafe {
                let kl = _mm256_cvtph_ps(_mm_loadu_si128(pk.add(i) as *const __m128i));
                let kh = _mm256_cvtph_ps(_mm_loadu_si128(pk.add(i + 8) as *const __m128i));
                for r in 0..4 {
                    lo[r] = _mm256_fmadd_ps(kl, _mm256_loadu_ps(px[r].add(i)), lo[r]);
                    hi[r] = _mm256_fmadd_ps(kh, _mm256_loadu_ps(px[r].add(i + 8)), hi[r]);
                }
            }
            i += LANES;
        }
        let mut out = [0f32; 4];
        for r in 0..4 {
            let mut v = [0f32; LANES];
            // SAFETY: v holds 16 f32s.
            unsafe {
                _mm256_storeu_ps(v.as_mut_ptr(), lo[r]);
                _mm256_storeu_ps(v.as_mut_ptr().add(8), hi[r]);
            }
            let mut s = crate::dot::reduce16(&v);
            for j in full..n {
                s = k[j].to_f32().mul_add(qs[r][j], s);
            }
            out[r] = s;
        }
        out
    }

    /// `oh += Σ_p (sc[p]·inv)·v[p]` with 32-float slices of the output held in four registers;
    /// `$load` turns a pointer to 8 stored values into 8 f32s. Element by element the same
    /// multiply and add as [`weighted_v_scalar`] (no fusion), so the same bits.
    macro_rules! weighted_v_body {
        ($oh:ident, $sc:ident, $inv:ident, $rows:ident, $stride:ident, $col:ident, $slice:expr, $load:expr) => {{
            let hd = $oh.len();
            if !hd.is_multiple_of(32) || $sc.is_empty() {
                weighted_v_scalar($oh, $sc, $inv, &$slice, $stride, $col);
                return;
            }
            assert!(($sc.len() - 1) * $stride + $col + hd <= $rows.len());
            let base = $rows.as_ptr();
            for c in (0..hd).step_by(32) {
                // SAFETY: c + 32 ≤ hd = oh.len().
                let mut acc: [__m256; 4] = std::array::from_fn(|u| unsafe {
                    _mm256_loadu_ps($oh.as_ptr().add(c + 8 * u))
                });
                for (p, s) in $sc.iter().enumerate() {
                    let pr = _mm256_set1_ps(s * $inv);
                    // SAFETY: row p's columns col + c .. col + c + 32 are in bounds (asserted).
                    let vp = unsafe { base.add(p * $stride + $col + c) };
                    for (u, a) in acc.iter_mut().enumerate() {
                        let vv = unsafe { $load(vp.add(8 * u)) };
                        *a = _mm256_add_ps(*a, _mm256_mul_ps(pr, vv));
                    }
                }
                for (u, a) in acc.iter().enumerate() {
                    // SAFETY: c + 8u + 8 ≤ hd.
                    unsafe { _mm256_storeu_ps($oh.as_mut_ptr().add(c + 8 * u), *a) };
                }
            }
        }};
    }

    /// The weighted V sum over f16 values (converted exactly with F16C).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn weighted_v_f16(
        oh: &mut [f32],
        sc: &[f32],
        inv: f32,
        rows: &[f16],
        stride: usize,
        col: usize,
    ) {
        weighted_v_body!(
            oh,
            sc,
            inv,
            rows,
            stride,
            col,
            KvSlice::F16(rows),
            |p: *const f16| { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
        )
    }

    /// The weighted V sum over f32 values.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn weighted_v(
        oh: &mut [f32],
        sc: &[f32],
        inv: f32,
        rows: &[f32],
        stride: usize,
        col: usize,
    ) {
        weighted_v_body!(
            oh,
            sc,
            inv,
            rows,
            stride,
            col,
            KvSlice::F32(rows),
            |p: *const f32| { _mm256_loadu_ps(p) }
        )
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_body(
    shape: AttnShape,
    heads: std::ops::Range<usize>,
    q: &[f32],
    blocks: &[KvBlockRef<'_>],
    n_ctx: usize,
    scores: &mut [f32],
    out: &mut [f32],
    dot4: impl Fn(&KvSlice<'_>, usize, usize, [&[f32]; 4]) -> [f32; 4],
    weighted_v: impl Fn(&mut [f32], &[f32], f32, &KvSlice<'_>, usize, usize),
) {
    let AttnShape {
        n_heads,
        n_kv_heads,
        head_dim,
        block_size,
    } = shape;
    let kv_dim = shape.kv_dim();
    assert_eq!(q.len(), n_heads * head_dim);
    assert!(heads.end <= n_heads);
    assert_eq!(out.len(), heads.len() * head_dim);
    assert!(n_ctx >= 1 && n_ctx <= blocks.len() * block_size);
    assert!(n_heads % n_kv_heads == 0);
    assert!(
        blocks
            .iter()
            .all(|(k, v)| k.len() >= block_size * kv_dim && v.len() >= block_size * kv_dim)
    );
    assert!(scores.len() >= n_ctx * heads.len().min(4));
    let group = n_heads / n_kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    // Up to four heads at a time, all on the same KV head.
    let mut h0 = heads.start;
    while h0 < heads.end {
        let kvh = h0 / group;
        let h1 = heads.end.min((kvh + 1) * group).min(h0 + 4);
        let nh = h1 - h0;
        let qh = |i: usize| {
            let h = h0 + i.min(nh - 1);
            &q[h * head_dim..(h + 1) * head_dim]
        };
        let qs = [qh(0), qh(1), qh(2), qh(3)];
        let sc = &mut scores[..nh * n_ctx];
        let mut max = [f32::NEG_INFINITY; 4];
        for (b, (k, _)) in blocks.iter().enumerate().take(n_ctx.div_ceil(block_size)) {
            let np = block_size.min(n_ctx - b * block_size);
            for p in 0..np {
                let r = dot4(k, p * kv_dim + kvh * head_dim, head_dim, qs);
                let pos = b * block_size + p;
                for i in 0..nh {
                    let s = r[i] * scale;
                    sc[i * n_ctx + pos] = s;
                    max[i] = max[i].max(s);
                }
            }
        }
        for i in 0..nh {
            let sh = &mut sc[i * n_ctx..(i + 1) * n_ctx];
            let mut sum = 0f32;
            for s in sh.iter_mut() {
                *s = (*s - max[i]).exp();
                sum += *s;
            }
            let o0 = (h0 + i - heads.start) * head_dim;
            let oh = &mut out[o0..o0 + head_dim];
            oh.fill(0.0);
            let inv = 1.0 / sum;
            for (b, scb) in sh.chunks(block_size).enumerate() {
                let (_, v) = &blocks[b];
                weighted_v(oh, scb, inv, v, kv_dim, kvh * head_dim);
            }
        }
        h0 = h1;
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
                // Values exactly representable in f16, so both storage types hold the same numbers.
                let round = |x: Vec<f32>| -> Vec<f32> {
                    x.into_iter().map(|v| f16::from_f32(v).to_f32()).collect()
                };
                let k = round(fill(n_blocks * bs * kvd, 1 + n_ctx as u64));
                let v = round(fill(n_blocks * bs * kvd, 7 + n_ctx as u64));
                let (k16, v16): (Vec<f16>, Vec<f16>) = (
                    k.iter().map(|&x| f16::from_f32(x)).collect(),
                    v.iter().map(|&x| f16::from_f32(x)).collect(),
                );
                let q = fill(n_heads * hd, 3);
                let plane = |b: usize| b * bs * kvd..(b + 1) * bs * kvd;
                let blocks: Vec<KvBlockRef> = (0..n_blocks)
                    .map(|b| (KvSlice::F32(&k[plane(b)]), KvSlice::F32(&v[plane(b)])))
                    .collect();
                let blocks16: Vec<KvBlockRef> = (0..n_blocks)
                    .map(|b| (KvSlice::F16(&k16[plane(b)]), KvSlice::F16(&v16[plane(b)])))
                    .collect();
                // 8-bit storage: quantized per (position, head); compared against f32 storage
                // of its exact dequantized values.
                let quant = |x: &[f32]| -> (Vec<i8>, Vec<f32>) {
                    let mut q = vec![0i8; x.len()];
                    let mut sc = Vec::new();
                    for (c, qc) in x.chunks(hd).zip(q.chunks_mut(hd)) {
                        let s = c.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
                        for (o, v) in qc.iter_mut().zip(c) {
                            *o = (v / s).round() as i8;
                        }
                        sc.push(s);
                    }
                    (q, sc)
                };
                let ((kq, ks), (vq, vs)) = (quant(&k), quant(&v));
                let heads_kv = kvd / hd;
                let sp = |b: usize| b * bs * heads_kv..(b + 1) * bs * heads_kv;
                let i8s = |q: &'_ [i8], s: &'_ [f32]| -> Vec<f32> {
                    let sl = KvSlice::I8 {
                        q,
                        scale: s,
                        kv_dim: kvd,
                        head_dim: hd,
                    };
                    (0..q.len()).map(|i| sl.get(i)).collect()
                };
                let (kd, vd) = (i8s(&kq, &ks), i8s(&vq, &vs));
                let blocks8: Vec<KvBlockRef> = (0..n_blocks)
                    .map(|b| {
                        (
                            KvSlice::I8 {
                                q: &kq[plane(b)],
                                scale: &ks[sp(b)],
                                kv_dim: kvd,
                                head_dim: hd,
                            },
                            KvSlice::I8 {
                                q: &vq[plane(b)],
                                scale: &vs[sp(b)],
                                kv_dim: kvd,
                                head_dim: hd,
                            },
                        )
                    })
                    .collect();
                let blocks8f: Vec<KvBlockRef> = (0..n_blocks)
                    .map(|b| (KvSlice::F32(&kd[plane(b)]), KvSlice::F32(&vd[plane(b)])))
                    .collect();
                let want = reference(shape, &q, &k, &v, n_ctx);
                for lvl in SimdLevel::available() {
                    let mut out = vec![0f32; n_heads * hd];
                    let mut scratch = vec![0f32; 4 * n_ctx];
                    attend_at(
                        lvl,
                        shape,
                        0..n_heads,
                        &q,
                        &blocks,
                        n_ctx,
                        &mut scratch,
                        &mut out,
                    );
                    for (a, b) in out.iter().zip(&want) {
                        assert!((*a as f64 - b).abs() < 1e-5, "{lvl:?} {n_ctx}: {a} vs {b}");
                    }
                    let mut o8 = vec![0f32; n_heads * hd];
                    let mut o8f = vec![0f32; n_heads * hd];
                    attend_at(
                        lvl,
                        shape,
                        0..n_heads,
                        &q,
                        &blocks8,
                        n_ctx,
                        &mut scratch,
                        &mut o8,
                    );
                    attend_at(
                        lvl,
                        shape,
                        0..n_heads,
                        &q,
                        &blocks8f,
                        n_ctx,
                        &mut scratch,
                        &mut o8f,
                    );
                    assert_eq!(
                        o8.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        o8f.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                    );
                    // f16 storage of the same values gives the same bits.
                    let mut out16 = vec![0f32; n_heads * hd];
                    attend_at(
                        lvl,
                        shape,
                        0..n_heads,
                        &q,
                        &blocks16,
                        n_ctx,
                        &mut scratch,
                        &mut out16,
                    );
                    assert_eq!(
                        out16.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                    );
                    // Any split of the heads gives the same bits per head.
                    for split in 1..n_heads {
                        let mut parts = vec![0f32; n_heads * hd];
                        let (lo, hi) = parts.split_at_mut(split * hd);
                        attend_at(lvl, shape, 0..split, &q, &blocks, n_ctx, &mut scratch, lo);
                        attend_at(
                            lvl,
                            shape,
                            split..n_heads,
                            &q,
                            &blocks,
                            n_ctx,
                            &mut scratch,
                            hi,
                        );
                        assert_eq!(
                            parts.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                        );
                    }
                }
            }
        }
    }
}
