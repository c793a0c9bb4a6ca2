//! A 16-lane f32 vector with one implementation per level, so a kernel written once over
//! [`V16`] runs the same arithmetic — bit for bit — as plain scalar code, on AVX2 (two 256-bit
//! halves) and on AVX-512 (one register).
//!
//! Every operation is exact or correctly rounded in the same way at every level: loads and
//! conversions from f16 and i8 are exact, `fma` is fused everywhere (the scalar level uses
//! `f32::mul_add`), and [`exp`] is built only from those operations.
//!
//! A kernel over `V16` is an `#[inline(always)]` generic function; each level calls it from a
//! `#[target_feature]` function, where it is compiled with that level's instructions.

#![allow(clippy::missing_safety_doc)] // every method: the level's CPU features must be present

/// The operations kernels use. Pointer arguments must be valid for 16 elements.
pub(crate) trait V16: Copy {
    unsafe fn zero() -> Self;
    unsafe fn splat(x: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    /// 16 IEEE half-precision values, converted exactly.
    unsafe fn load_f16(p: *const u16) -> Self;
    /// 16 signed bytes, converted exactly.
    unsafe fn load_i8(p: *const i8) -> Self;
    unsafe fn store(self, p: *mut f32);
    /// `a·b + c`, rounded once.
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self;
    unsafe fn mul(a: Self, b: Self) -> Self;
    unsafe fn add(a: Self, b: Self) -> Self;
    unsafe fn sub(a: Self, b: Self) -> Self;
    unsafe fn max(a: Self, b: Self) -> Self;
    /// x86's `minps`: `a` where `a < b`, else `b`.
    unsafe fn min(a: Self, b: Self) -> Self;
    unsafe fn div(a: Self, b: Self) -> Self;
    /// Lanes of `a` where `c` is negative (sign bit clear is not enough: `c < 0`), else `b`.
    unsafe fn select_neg(c: Self, a: Self, b: Self) -> Self;
    /// Lanes `0..n` of `self`, the rest `fill`.
    unsafe fn first(self, n: usize, fill: f32) -> Self;
    /// `self · 2ⁿ` for integral `n` in `[−126, 127]` held in the lanes of `n` (exact).
    unsafe fn ldexp(self, n: Self) -> Self;
    /// The largest lane (exact in any order).
    unsafe fn reduce_max(self) -> f32;
    unsafe fn to_array(self) -> [f32; 16] {
        let mut a = [0f32; 16];
        // SAFETY: `a` holds 16 floats.
        unsafe { self.store(a.as_mut_ptr()) };
        a
    }
}

/// `eˣ` for `x ≤ 0` (what softmax needs), to about 1 ulp: Cody–Waite range reduction by ln 2
/// and Cephes' `expf` polynomial, entirely in `V16` operations, so every level agrees. Inputs
/// below −87 give `e⁻⁸⁷` (there the exact value is below f32's normal range anyway).
#[inline(always)]
pub(crate) unsafe fn exp<V: V16>(x: V) -> V {
    const MAGIC: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer
    // SAFETY: forwarded from the caller.
    unsafe {
        let x = V::max(x, V::splat(-87.0));
        let t = V::fma(x, V::splat(std::f32::consts::LOG2_E), V::splat(MAGIC));
        let n = V::sub(t, V::splat(MAGIC));
        let r = V::fma(n, V::splat(-0.693_359_4), x);
        let r = V::fma(n, V::splat(2.121_944_4e-4), r);
        let mut p = V::splat(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            p = V::fma(p, r, V::splat(c));
        }
        let y = V::add(V::fma(p, V::mul(r, r), r), V::splat(1.0));
        y.ldexp(n)
    }
}

/// The scalar level: plain arrays.
#[derive(Clone, Copy)]
pub(crate) struct Scalar16([f32; 16]);

impl Scalar16 {
    #[inline(always)]
    fn map2(a: Self, b: Self, f: impl Fn(f32, f32) -> f32) -> Self {
        Scalar16(std::array::from_fn(|l| f(a.0[l], b.0[l])))
    }
}

impl V16 for Scalar16 {
    #[inline(always)]
    unsafe fn zero() -> Self {
        Scalar16([0.0; 16])
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        Scalar16([x; 16])
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: p is valid for 16 floats (trait contract).
        Scalar16(std::array::from_fn(|l| unsafe { *p.add(l) }))
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> Self {
        // SAFETY: as above.
        Scalar16(std::array::from_fn(|l| {
            half::f16::from_bits(unsafe { *p.add(l) }).to_f32()
        }))
    }
    #[inline(always)]
    unsafe fn load_i8(p: *const i8) -> Self {
        // SAFETY: as above.
        Scalar16(std::array::from_fn(|l| unsafe { *p.add(l) } as f32))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        for (l, v) in self.0.iter().enumerate() {
            // SAFETY: as above.
            unsafe { *p.add(l) = *v };
        }
    }
    #[inline(always)]
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
        Scalar16(std::array::from_fn(|l| a.0[l].mul_add(b.0[l], c.0[l])))
    }
    #[inline(always)]
    unsafe fn mul(a: Self, b: Self) -> Self {
        Self::map2(a, b, |x, y| x * y)
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        Self::map2(a, b, |x, y| x + y)
    }
    #[inline(always)]
    unsafe fn sub(a: Self, b: Self) -> Self {
        Self::map2(a, b, |x, y| x - y)
    }
    #[inline(always)]
    unsafe fn max(a: Self, b: Self) -> Self {
        // x86's maxps: the second operand when the first is not greater (NaN-free inputs).
        Self::map2(a, b, |x, y| if x > y { x } else { y })
    }
    #[inline(always)]
    unsafe fn min(a: Self, b: Self) -> Self {
        Self::map2(a, b, |x, y| if x < y { x } else { y })
    }
    #[inline(always)]
    unsafe fn div(a: Self, b: Self) -> Self {
        Self::map2(a, b, |x, y| x / y)
    }
    #[inline(always)]
    unsafe fn select_neg(c: Self, a: Self, b: Self) -> Self {
        Scalar16(std::array::from_fn(|l| {
            if c.0[l] < 0.0 { a.0[l] } else { b.0[l] }
        }))
    }
    #[inline(always)]
    unsafe fn first(self, n: usize, fill: f32) -> Self {
        Scalar16(std::array::from_fn(
            |l| if l < n { self.0[l] } else { fill },
        ))
    }
    #[inline(always)]
    unsafe fn ldexp(self, n: Self) -> Self {
        Scalar16(std::array::from_fn(|l| {
            self.0[l] * f32::from_bits(((n.0[l] as i32 + 127) << 23) as u32)
        }))
    }
    #[inline(always)]
    unsafe fn reduce_max(self) -> f32 {
        self.0
            .iter()
            .fold(f32::NEG_INFINITY, |a, &b| if a > b { a } else { b })
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2x2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::V16;
    use std::arch::x86_64::*;

    /// AVX2 + FMA + F16C: two 256-bit halves (lanes 0–7, 8–15).
    #[derive(Clone, Copy)]
    pub(crate) struct Avx2x2(__m256, __m256);

    /// AVX-512 F/BW/VL: one register.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx512(__m512);

    // SAFETY (every method below): callers guarantee the level's features and valid pointers.
    impl V16 for Avx2x2 {
        #[inline(always)]
        unsafe fn zero() -> Self {
            unsafe { Avx2x2(_mm256_setzero_ps(), _mm256_setzero_ps()) }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            unsafe { Avx2x2(_mm256_set1_ps(x), _mm256_set1_ps(x)) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { Avx2x2(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))) }
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const u16) -> Self {
            unsafe {
                Avx2x2(
                    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
                    _mm256_cvtph_ps(_mm_loadu_si128(p.add(8) as *const __m128i)),
                )
            }
        }
        #[inline(always)]
        unsafe fn load_i8(p: *const i8) -> Self {
            unsafe {
                let b = _mm_loadu_si128(p as *const __m128i);
                Avx2x2(
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)),
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(b))),
                )
            }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe {
                _mm256_storeu_ps(p, self.0);
                _mm256_storeu_ps(p.add(8), self.1);
            }
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            unsafe {
                Avx2x2(
                    _mm256_fmadd_ps(a.0, b.0, c.0),
                    _mm256_fmadd_ps(a.1, b.1, c.1),
                )
            }
        }
        #[inline(always)]
        unsafe fn mul(a: Self, b: Self) -> Self {
            unsafe { Avx2x2(_mm256_mul_ps(a.0, b.0), _mm256_mul_ps(a.1, b.1)) }
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            unsafe { Avx2x2(_mm256_add_ps(a.0, b.0), _mm256_add_ps(a.1, b.1)) }
        }
        #[inline(always)]
        unsafe fn sub(a: Self, b: Self) -> Self {
            unsafe { Avx2x2(_mm256_sub_ps(a.0, b.0), _mm256_sub_ps(a.1, b.1)) }
        }
        #[inline(always)]
        unsafe fn max(a: Self, b: Self) -> Self {
            unsafe { Avx2x2(_mm256_max_ps(a.0, b.0), _mm256_max_ps(a.1, b.1)) }
        }
        #[inline(always)]
        unsafe fn min(a: Self, b: Self) -> Self {
            unsafe { Avx2x2(_mm256_min_ps(a.0, b.0), _mm256_min_ps(a.1, b.1)) }
        }
        #[inline(always)]
        unsafe fn div(a: Self, b: Self) -> Self {
            unsafe { Avx2x2(_mm256_div_ps(a.0, b.0), _mm256_div_ps(a.1, b.1)) }
        }
        #[inline(always)]
        unsafe fn select_neg(c: Self, a: Self, b: Self) -> Self {
            unsafe {
                let z = _mm256_setzero_ps();
                Avx2x2(
                    _mm256_blendv_ps(b.0, a.0, _mm256_cmp_ps::<_CMP_LT_OQ>(c.0, z)),
                    _mm256_blendv_ps(b.1, a.1, _mm256_cmp_ps::<_CMP_LT_OQ>(c.1, z)),
                )
            }
        }
        #[inline(always)]
        unsafe fn first(self, n: usize, fill: f32) -> Self {
            unsafe {
                let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                let nn = _mm256_set1_epi32(n.min(16) as i32);
                let f = _mm256_set1_ps(fill);
                let lo = _mm256_castsi256_ps(_mm256_cmpgt_epi32(nn, idx));
                let hi = _mm256_castsi256_ps(_mm256_cmpgt_epi32(
                    nn,
                    _mm256_add_epi32(idx, _mm256_set1_epi32(8)),
                ));
                Avx2x2(
                    _mm256_blendv_ps(f, self.0, lo),
                    _mm256_blendv_ps(f, self.1, hi),
                )
            }
        }
        #[inline(always)]
        unsafe fn ldexp(self, n: Self) -> Self {
            unsafe {
                let e = |v: __m256| {
                    _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
                        _mm256_cvtps_epi32(v),
                        _mm256_set1_epi32(127),
                    )))
                };
                Avx2x2(_mm256_mul_ps(self.0, e(n.0)), _mm256_mul_ps(self.1, e(n.1)))
            }
        }
        #[inline(always)]
        unsafe fn reduce_max(self) -> f32 {
            unsafe { V16::reduce_max(super::Scalar16(self.to_array())) }
        }
    }

    impl V16 for Avx512 {
        #[inline(always)]
        unsafe fn zero() -> Self {
            unsafe { Avx512(_mm512_setzero_ps()) }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            unsafe { Avx512(_mm512_set1_ps(x)) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { Avx512(_mm512_loadu_ps(p)) }
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const u16) -> Self {
            unsafe { Avx512(_mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))) }
        }
        #[inline(always)]
        unsafe fn load_i8(p: *const i8) -> Self {
            unsafe {
                Avx512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                    p as *const __m128i,
                ))))
            }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm512_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            unsafe { Avx512(_mm512_fmadd_ps(a.0, b.0, c.0)) }
        }
        #[inline(always)]
        unsafe fn mul(a: Self, b: Self) -> Self {
            unsafe { Avx512(_mm512_mul_ps(a.0, b.0)) }
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            unsafe { Avx512(_mm512_add_ps(a.0, b.0)) }
        }
        #[inline(always)]
        unsafe fn sub(a: Self, b: Self) -> Self {
            unsafe { Avx512(_mm512_sub_ps(a.0, b.0)) }
        }
        #[inline(always)]
        unsafe fn max(a: Self, b: Self) -> Self {
            unsafe { Avx512(_mm512_max_ps(a.0, b.0)) }
        }
        #[inline(always)]
        unsafe fn min(a: Self, b: Self) -> Self {
            unsafe { Avx512(_mm512_min_ps(a.0, b.0)) }
        }
        #[inline(always)]
        unsafe fn div(a: Self, b: Self) -> Self {
            unsafe { Avx512(_mm512_div_ps(a.0, b.0)) }
        }
        #[inline(always)]
        unsafe fn select_neg(c: Self, a: Self, b: Self) -> Self {
            unsafe {
                let k = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(c.0, _mm512_setzero_ps());
                Avx512(_mm512_mask_mov_ps(b.0, k, a.0))
            }
        }
        #[inline(always)]
        unsafe fn first(self, n: usize, fill: f32) -> Self {
            let k: __mmask16 = if n >= 16 {
                0xffff
            } else {
                ((1u32 << n) - 1) as u16
            };
            unsafe { Avx512(_mm512_mask_mov_ps(_mm512_set1_ps(fill), k, self.0)) }
        }
        #[inline(always)]
        unsafe fn ldexp(self, n: Self) -> Self {
            unsafe {
                let e = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
                    _mm512_cvtps_epi32(n.0),
                    _mm512_set1_epi32(127),
                )));
                Avx512(_mm512_mul_ps(self.0, e))
            }
        }
        #[inline(always)]
        unsafe fn reduce_max(self) -> f32 {
            unsafe { _mm512_reduce_max_ps(self.0) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::SimdLevel;

    fn exp_at(lvl: SimdLevel, xs: &[f32; 16]) -> [f32; 16] {
        // SAFETY: each level runs only when the CPU has it.
        unsafe {
            match lvl {
                #[cfg(target_arch = "x86_64")]
                SimdLevel::Avx512 => exp512(xs),
                #[cfg(target_arch = "x86_64")]
                SimdLevel::Avx2 => exp256(xs),
                _ => exp(Scalar16::load(xs.as_ptr())).to_array(),
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn exp512(xs: &[f32; 16]) -> [f32; 16] {
        unsafe { exp(Avx512::load(xs.as_ptr())).to_array() }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn exp256(xs: &[f32; 16]) -> [f32; 16] {
        unsafe { exp(Avx2x2::load(xs.as_ptr())).to_array() }
    }

    #[test]
    fn exp_is_accurate_and_the_same_at_every_level() {
        let mut xs: Vec<f32> = (0..200_000).map(|i| -(i as f32) * 4.4e-4).collect();
        xs.extend([
            0.0,
            -0.0,
            -1e-30,
            -87.0,
            -86.99,
            -100.0,
            -0.346_573_6,
            -std::f32::consts::LN_2,
        ]);
        while !xs.len().is_multiple_of(16) {
            xs.push(-1.0);
        }
        for c in xs.chunks_exact(16) {
            let c: [f32; 16] = c.try_into().unwrap();
            let want = exp_at(SimdLevel::Scalar, &c);
            for (x, y) in c.iter().zip(&want) {
                let e = (x.max(-87.0) as f64).exp();
                assert!(
                    ((*y as f64 - e) / e).abs() < 2.5e-7,
                    "exp({x}) = {y}, want {e}"
                );
            }
            for lvl in SimdLevel::available() {
                let got = exp_at(lvl, &c);
                assert_eq!(got.map(f32::to_bits), want.map(f32::to_bits), "{lvl:?}");
            }
        }
    }
}
