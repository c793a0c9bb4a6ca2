//! The x86-64 levels of [`V16`]: AVX2 (two 256-bit halves) and AVX-512 (one register).

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
