//! The f32 dot product that every matmul, and so every logit, is built from.
//!
//! Each level sums in one fixed order that depends only on the length: 16 lanes of partial
//! sums over the full 16-element chunks, a fixed pairwise tree across the lanes, then the tail
//! in order. [`dot4`] computes four dot products against one shared row with exactly the
//! arithmetic of four [`dot`] calls, so tiling never changes a result.

use crate::dispatch::{SimdLevel, level};

const LANES: usize = 16;

/// `Σ a[i]·b[i]` at the process's [`level`].
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_at(level(), a, b)
}

/// `dot` at an explicit level (the level must be supported by this CPU).
pub fn dot_at(lvl: SimdLevel, a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    match lvl {
        SimdLevel::Scalar => dot_scalar(a, b),
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 | SimdLevel::Avx512 => {
            assert!(lvl <= SimdLevel::detect());
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            unsafe { x86::dot_avx2(a, b) }
        }
        #[cfg(target_arch = "aarch64")]
        SimdLevel::Neon | SimdLevel::Dotprod | SimdLevel::I8mm => arm::dot_neon(a, b),
        _ => dot_scalar(a, b),
    }
}

/// Four dot products of `w` with `x0..x3`; bit-identical to four [`dot_at`] calls.
pub fn dot4_at(lvl: SimdLevel, w: &[f32], xs: [&[f32]; 4]) -> [f32; 4] {
    for x in xs {
        assert_eq!(x.len(), w.len());
    }
    match lvl {
        SimdLevel::Scalar => xs.map(|x| dot_scalar(w, x)),
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 | SimdLevel::Avx512 => {
            assert!(lvl <= SimdLevel::detect());
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            unsafe { x86::dot4_avx2(w, xs) }
        }
        #[cfg(target_arch = "aarch64")]
        SimdLevel::Neon | SimdLevel::Dotprod | SimdLevel::I8mm => arm::dot4_neon(w, xs),
        _ => xs.map(|x| dot_scalar(w, x)),
    }
}

/// The scalar reference: 16 independent lanes, then a fixed tree, then the tail.
pub fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len();
    let full = n / LANES * LANES;
    let mut acc = [0f32; LANES];
    for (ca, cb) in a[..full]
        .chunks_exact(LANES)
        .zip(b[..full].chunks_exact(LANES))
    {
        for l in 0..LANES {
            acc[l] += ca[l] * cb[l];
        }
    }
    let mut s = reduce16(&acc);
    for i in full..n {
        s += a[i] * b[i];
    }
    s
}

/// Fixed pairwise reduction of 16 lanes: (0+8, 1+9, …), then halves again.
#[inline]
pub(crate) fn reduce16(acc: &[f32; LANES]) -> f32 {
    let mut v = *acc;
    let mut w = LANES / 2;
    while w >= 1 {
        for l in 0..w {
            v[l] += v[l + w];
        }
        w /= 2;
    }
    v[0]
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::{LANES, reduce16};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn lanes(lo: __m256, hi: __m256) -> [f32; LANES] {
        let mut out = [0f32; LANES];
        // SAFETY: `out` holds 16 f32s.
        unsafe {
            _mm256_storeu_ps(out.as_mut_ptr(), lo);
            _mm256_storeu_ps(out.as_mut_ptr().add(8), hi);
        }
        out
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let full = n / LANES * LANES;
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut lo = _mm256_setzero_ps();
        let mut hi = _mm256_setzero_ps();
        let mut i = 0;
        while i < full {
            // SAFETY: i + 16 <= full <= len of both slices.
            unsafe {
                lo = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), lo);
                hi = _mm256_fmadd_ps(
                    _mm256_loadu_ps(pa.add(i + 8)),
                    _mm256_loadu_ps(pb.add(i + 8)),
                    hi,
                );
            }
            i += LANES;
        }
        // SAFETY: AVX2 is enabled for this function.
        let mut s = reduce16(&unsafe { lanes(lo, hi) });
        for j in full..n {
            s = a[j].mul_add(b[j], s);
        }
        s
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub unsafe fn dot4_avx2(w: &[f32], xs: [&[f32]; 4]) -> [f32; 4] {
        let n = w.len();
        let full = n / LANES * LANES;
        let pw = w.as_ptr();
        let px = xs.map(|x| x.as_ptr());
        let mut lo = [_mm256_setzero_ps(); 4];
        let mut hi = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i < full {
            // SAFETY: i + 16 <= full <= len of every slice.
            unsafe {
                let wl = _mm256_loadu_ps(pw.add(i));
                let wh = _mm256_loadu_ps(pw.add(i + 8));
                for r in 0..4 {
                    lo[r] = _mm256_fmadd_ps(wl, _mm256_loadu_ps(px[r].add(i)), lo[r]);
                    hi[r] = _mm256_fmadd_ps(wh, _mm256_loadu_ps(px[r].add(i + 8)), hi[r]);
                }
            }
            i += LANES;
        }
        let mut out = [0f32; 4];
        for r in 0..4 {
            // SAFETY: AVX2 is enabled for this function.
            let mut s = reduce16(&unsafe { lanes(lo[r], hi[r]) });
            for j in full..n {
                s = w[j].mul_add(xs[r][j], s);
            }
            out[r] = s;
        }
        out
    }
}

/// NEON: the AVX2 kernel's arithmetic (16 fused lanes, the same tree, a fused tail) in four
/// 128-bit registers, so an AArch64 build's f32 path gives the AVX2 build's bits.
#[cfg(target_arch = "aarch64")]
pub(crate) mod arm {
    use super::{LANES, reduce16};
    use std::arch::aarch64::*;

    #[inline(always)]
    fn lanes(acc: [float32x4_t; 4]) -> [f32; LANES] {
        let mut out = [0f32; LANES];
        for (q, v) in acc.into_iter().enumerate() {
            // SAFETY: `out` holds 16 f32s.
            unsafe { vst1q_f32(out.as_mut_ptr().add(4 * q), v) };
        }
        out
    }

    pub fn dot_neon(a: &[f32], b: &[f32]) -> f32 {
        dot4_like(a, [b])[0]
    }

    pub fn dot4_neon(w: &[f32], xs: [&[f32]; 4]) -> [f32; 4] {
        dot4_like(w, xs)
    }

    /// `R` dot products of `w` against `xs` (equal lengths, checked by the callers).
    #[inline(always)]
    fn dot4_like<const R: usize>(w: &[f32], xs: [&[f32]; R]) -> [f32; R] {
        let n = w.len();
        let full = n / LANES * LANES;
        let pw = w.as_ptr();
        let px = xs.map(|x| x.as_ptr());
        // SAFETY: NEON is baseline on AArch64.
        let mut acc = [[unsafe { vdupq_n_f32(0.0) }; 4]; R];
        let mut i = 0;
        while i < full {
            // SAFETY: i + 16 <= full <= len of every slice.
            unsafe {
                let wv: [float32x4_t; 4] = std::array::from_fn(|q| vld1q_f32(pw.add(i + 4 * q)));
                for r in 0..R {
                    for q in 0..4 {
                        acc[r][q] = vfmaq_f32(acc[r][q], wv[q], vld1q_f32(px[r].add(i + 4 * q)));
                    }
                }
            }
            i += LANES;
        }
        std::array::from_fn(|r| {
            let mut s = reduce16(&lanes(acc[r]));
            for j in full..n {
                s = w[j].mul_add(xs[r][j], s);
            }
            s
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    fn vecs(n: usize) -> impl Strategy<Value = (Vec<f32>, Vec<f32>)> {
        (
            proptest::collection::vec(-2.0f32..2.0, n),
            proptest::collection::vec(-2.0f32..2.0, n),
        )
    }

    proptest! {
        #[test]
        fn every_level_matches_f64_reference(n in prop::sample::select(vec![1usize, 15, 16, 17, 63, 64, 65, 127, 576, 1537]), seed in any::<u64>()) {
            let mut rng = seed;
            let mut next = || { rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); ((rng >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0 + 1e-3 };
            let a: Vec<f32> = (0..n).map(|_| next()).collect();
            let b: Vec<f32> = (0..n).map(|_| next()).collect();
            let want = naive(&a, &b);
            let mag: f64 = a.iter().zip(&b).map(|(x, y)| (*x as f64 * *y as f64).abs()).sum();
            for lvl in SimdLevel::available() {
                let got = dot_at(lvl, &a, &b) as f64;
                // f32 accumulation: relative to the sum of magnitudes, a few ulps per level of the tree.
                prop_assert!((got - want).abs() <= 1e-6 * mag + 1e-6, "{lvl:?} n={n} got {got} want {want}");
            }
        }

        #[test]
        fn dot4_is_bit_identical_to_dot((w, x) in vecs(97), shift in 0usize..5) {
            let xs: Vec<Vec<f32>> = (0..4).map(|r| x.iter().map(|v| v * (r + shift) as f32 + 0.25).collect()).collect();
            for lvl in SimdLevel::available() {
                let four = dot4_at(lvl, &w, [&xs[0], &xs[1], &xs[2], &xs[3]]);
                for r in 0..4 {
                    prop_assert_eq!(four[r].to_bits(), dot_at(lvl, &w, &xs[r]).to_bits());
                }
            }
        }
    }
}
