//! A 16-lane f32 vector with one implementation per level, so a kernel written once over
//! [`V16`] runs the same arithmetic — bit for bit — as plain scalar code, on AVX2 (two 256-bit
//! halves), on AVX-512 (one register) and on AArch64 NEON (four 128-bit registers).
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

#[cfg(target_arch = "aarch64")]
pub(crate) use arm::{GroupSums, Neon16, PairSums, row_pair, sdot, smmla, store_row};

#[cfg(target_arch = "aarch64")]
mod arm {
    use super::V16;
    use std::arch::aarch64::*;

    /// `acc + Σ` of each lane's four byte products (`sdot`, FEAT_DotProd), through inline
    /// assembly: the intrinsic is not stable Rust.
    ///
    /// # Safety
    /// The CPU must have FEAT_DotProd.
    #[inline(always)]
    pub(crate) unsafe fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        let mut acc = acc;
        // SAFETY: a register-only instruction; the caller guarantees the feature.
        unsafe {
            std::arch::asm!(
                ".arch_extension dotprod",
                "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
                acc = inout(vreg) acc,
                a = in(vreg) a,
                b = in(vreg) b,
                options(pure, nomem, nostack, preserves_flags)
            );
        }
        acc
    }

    /// `acc + A·Bᵀ` for `A`, `B` two rows of 8 signed bytes each (`smmla`, FEAT_I8MM): lanes
    /// `[a0·b0, a0·b1, a1·b0, a1·b1]`, through inline assembly (the intrinsic is not stable).
    ///
    /// # Safety
    /// The CPU must have FEAT_I8MM.
    #[inline(always)]
    pub(crate) unsafe fn smmla(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        let mut acc = acc;
        // SAFETY: a register-only instruction; the caller guarantees the feature.
        unsafe {
            std::arch::asm!(
                ".arch_extension i8mm",
                "smmla {acc:v}.4s, {a:v}.16b, {b:v}.16b",
                acc = inout(vreg) acc,
                a = in(vreg) a,
                b = in(vreg) b,
                options(pure, nomem, nostack, preserves_flags)
            );
        }
        acc
    }

    /// The exact integer sums of two rows over one panel's 16 channels with `smmla`, eight
    /// inputs at a time: two consecutive panel lines (inputs `t..t+4`, `t+4..t+8`) zipped per
    /// channel pair are the 2×8 weight operand, the rows' eight activation bytes the other.
    pub(crate) struct PairSums {
        /// `[q][0]`: channels `4q, 4q+1` × rows; `[q][1]`: channels `4q+2, 4q+3` × rows.
        acc: [[int32x4_t; 2]; 4],
    }

    impl PairSums {
        #[inline(always)]
        pub(crate) unsafe fn new() -> Self {
            // SAFETY: NEON is baseline.
            PairSums {
                acc: [[unsafe { vdupq_n_s32(0) }; 2]; 4],
            }
        }

        /// Adds the products of lines `w0`, `w1` (4 registers of signed weights each; `w1`
        /// zeros for a lone last quad) with `a`: row 0's eight activation bytes, then row 1's.
        #[inline(always)]
        #[allow(clippy::needless_range_loop)] // four registers, indexed alike
        pub(crate) unsafe fn mac(
            &mut self,
            w0: &[int8x16_t; 4],
            w1: &[int8x16_t; 4],
            a: int8x16_t,
        ) {
            // SAFETY: the caller runs under FEAT_I8MM.
            unsafe {
                for q in 0..4 {
                    let (x, y) = (vreinterpretq_s32_s8(w0[q]), vreinterpretq_s32_s8(w1[q]));
                    let lo = vreinterpretq_s8_s32(vzip1q_s32(x, y));
                    let hi = vreinterpretq_s8_s32(vzip2q_s32(x, y));
                    self.acc[q][0] = smmla(self.acc[q][0], lo, a);
                    self.acc[q][1] = smmla(self.acc[q][1], hi, a);
                }
            }
        }

        /// Each row's channel sums, four per register.
        #[inline(always)]
        pub(crate) unsafe fn finish(&self) -> [[int32x4_t; 4]; 2] {
            // SAFETY: baseline NEON.
            unsafe {
                [
                    std::array::from_fn(|q| vuzp1q_s32(self.acc[q][0], self.acc[q][1])),
                    std::array::from_fn(|q| vuzp2q_s32(self.acc[q][0], self.acc[q][1])),
                ]
            }
        }
    }

    /// A panel row's 16 outputs (times the 16 `scale`s when given) into the first `left` of `dst`.
    ///
    /// # Safety
    /// `dst` valid for `left ≤ 16` floats; `scale`, when given, for 16.
    #[inline(always)]
    pub(crate) unsafe fn store_row(
        v: &[float32x4_t; 4],
        scale: Option<*const f32>,
        dst: *mut f32,
        left: usize,
    ) {
        let mut out = [0f32; 16];
        // SAFETY: the caller's contract; `out` holds 16 floats.
        unsafe {
            for (q, &vq) in v.iter().enumerate() {
                let r = match scale {
                    Some(s) => vmulq_f32(vq, vld1q_f32(s.add(4 * q))),
                    None => vq,
                };
                vst1q_f32(out.as_mut_ptr().add(4 * q), r);
            }
            std::ptr::copy_nonoverlapping(out.as_ptr(), dst, left);
        }
    }

    /// Rows `p0`, `p1`'s `n` (4 or 8) activation bytes at each pointer as one `smmla` operand,
    /// zero-padded to 8.
    ///
    /// # Safety
    /// Both pointers must be valid for `n` bytes.
    #[inline(always)]
    pub(crate) unsafe fn row_pair(p0: *const i8, p1: *const i8, n: usize) -> int8x16_t {
        // SAFETY: the caller's contract.
        unsafe {
            if n == 8 {
                vcombine_s8(vld1_s8(p0), vld1_s8(p1))
            } else {
                let (a, b) = (
                    (p0 as *const i32).read_unaligned(),
                    (p1 as *const i32).read_unaligned(),
                );
                vreinterpretq_s8_s32(vld1q_s32([a, 0, b, 0].as_ptr()))
            }
        }
    }

    /// The exact integer sums of one group, four channels per register, for `R` rows.
    pub(crate) struct GroupSums<const R: usize> {
        /// With `sdot`: the channel sums. Without: pair sums, channels `4q, 4q+1` (`lo`) and
        /// `4q+2, 4q+3` (`hi`), folded by [`GroupSums::finish`].
        lo: [[int32x4_t; 4]; R],
        hi: [[int32x4_t; 4]; R],
    }

    impl<const R: usize> GroupSums<R> {
        #[inline(always)]
        pub(crate) unsafe fn new() -> Self {
            // SAFETY: NEON is baseline.
            let z = unsafe { vdupq_n_s32(0) };
            GroupSums {
                lo: [[z; 4]; R],
                hi: [[z; 4]; R],
            }
        }

        /// Adds row `r`'s products of one line (`wv`: 4 registers of signed weights) with the
        /// four activation bytes `a` (broadcast to every lane).
        #[inline(always)]
        #[allow(clippy::needless_range_loop)] // four registers, indexed alike
        pub(crate) unsafe fn mac<const DOT: bool>(
            &mut self,
            r: usize,
            wv: &[int8x16_t; 4],
            a: int8x16_t,
        ) {
            // SAFETY: with DOT the caller runs under FEAT_DotProd; the rest is baseline.
            unsafe {
                for q in 0..4 {
                    if DOT {
                        self.lo[r][q] = sdot(self.lo[r][q], wv[q], a);
                    } else {
                        let l = vmull_s8(vget_low_s8(wv[q]), vget_low_s8(a));
                        let h = vmull_high_s8(wv[q], a);
                        self.lo[r][q] = vpadalq_s16(self.lo[r][q], l);
                        self.hi[r][q] = vpadalq_s16(self.hi[r][q], h);
                    }
                }
            }
        }

        /// Row `r`'s channel sums, four per register.
        #[inline(always)]
        pub(crate) unsafe fn finish<const DOT: bool>(&self, r: usize) -> [int32x4_t; 4] {
            // SAFETY: baseline NEON.
            std::array::from_fn(|q| {
                if DOT {
                    self.lo[r][q]
                } else {
                    unsafe { vpaddq_s32(self.lo[r][q], self.hi[r][q]) }
                }
            })
        }
    }

    /// NEON: four 128-bit registers (lanes 0–3, 4–7, 8–11, 12–15). `max`/`min`/`select` are
    /// built from compares and bit selects so that they pick the same operand as x86's
    /// `maxps`/`minps` (and the scalar level) on ties of ±0, where `fmax` would not.
    #[derive(Clone, Copy)]
    pub(crate) struct Neon16([float32x4_t; 4]);

    impl Neon16 {
        #[inline(always)]
        fn map2(a: Self, b: Self, f: impl Fn(float32x4_t, float32x4_t) -> float32x4_t) -> Self {
            Neon16(std::array::from_fn(|q| f(a.0[q], b.0[q])))
        }
    }

    // SAFETY (every method below): NEON is part of the AArch64 baseline; callers guarantee
    // valid pointers.
    impl V16 for Neon16 {
        #[inline(always)]
        unsafe fn zero() -> Self {
            unsafe { Neon16([vdupq_n_f32(0.0); 4]) }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            unsafe { Neon16([vdupq_n_f32(x); 4]) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Neon16(std::array::from_fn(|q| unsafe { vld1q_f32(p.add(4 * q)) }))
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const u16) -> Self {
            // fcvtl: every half is exactly a single (subnormals included).
            Neon16(std::array::from_fn(|q| unsafe {
                vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p.add(4 * q))))
            }))
        }
        #[inline(always)]
        unsafe fn load_i8(p: *const i8) -> Self {
            unsafe {
                let b = vld1q_s8(p);
                let (lo, hi) = (vmovl_s8(vget_low_s8(b)), vmovl_s8(vget_high_s8(b)));
                Neon16([
                    vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))),
                    vcvtq_f32_s32(vmovl_s16(vget_high_s16(lo))),
                    vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))),
                    vcvtq_f32_s32(vmovl_s16(vget_high_s16(hi))),
                ])
            }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            for q in 0..4 {
                unsafe { vst1q_f32(p.add(4 * q), self.0[q]) };
            }
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            Neon16(std::array::from_fn(|q| unsafe {
                vfmaq_f32(c.0[q], a.0[q], b.0[q])
            }))
        }
        #[inline(always)]
        unsafe fn mul(a: Self, b: Self) -> Self {
            Self::map2(a, b, |x, y| unsafe { vmulq_f32(x, y) })
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            Self::map2(a, b, |x, y| unsafe { vaddq_f32(x, y) })
        }
        #[inline(always)]
        unsafe fn sub(a: Self, b: Self) -> Self {
            Self::map2(a, b, |x, y| unsafe { vsubq_f32(x, y) })
        }
        #[inline(always)]
        unsafe fn max(a: Self, b: Self) -> Self {
            Self::map2(a, b, |x, y| unsafe { vbslq_f32(vcgtq_f32(x, y), x, y) })
        }
        #[inline(always)]
        unsafe fn min(a: Self, b: Self) -> Self {
            Self::map2(a, b, |x, y| unsafe { vbslq_f32(vcltq_f32(x, y), x, y) })
        }
        #[inline(always)]
        unsafe fn div(a: Self, b: Self) -> Self {
            Self::map2(a, b, |x, y| unsafe { vdivq_f32(x, y) })
        }
        #[inline(always)]
        unsafe fn select_neg(c: Self, a: Self, b: Self) -> Self {
            Neon16(std::array::from_fn(|q| unsafe {
                vbslq_f32(vcltq_f32(c.0[q], vdupq_n_f32(0.0)), a.0[q], b.0[q])
            }))
        }
        #[inline(always)]
        unsafe fn first(self, n: usize, fill: f32) -> Self {
            let n = n.min(16) as u32;
            Neon16(std::array::from_fn(|q| unsafe {
                let idx = vaddq_u32(
                    vld1q_u32([0u32, 1, 2, 3].as_ptr()),
                    vdupq_n_u32(4 * q as u32),
                );
                vbslq_f32(vcltq_u32(idx, vdupq_n_u32(n)), self.0[q], vdupq_n_f32(fill))
            }))
        }
        #[inline(always)]
        unsafe fn ldexp(self, n: Self) -> Self {
            Neon16(std::array::from_fn(|q| unsafe {
                let e = vshlq_n_s32::<23>(vaddq_s32(vcvtq_s32_f32(n.0[q]), vdupq_n_s32(127)));
                vmulq_f32(self.0[q], vreinterpretq_f32_s32(e))
            }))
        }
        #[inline(always)]
        unsafe fn reduce_max(self) -> f32 {
            unsafe { V16::reduce_max(super::Scalar16(self.to_array())) }
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
                #[cfg(target_arch = "aarch64")]
                SimdLevel::Neon | SimdLevel::Dotprod | SimdLevel::I8mm => {
                    exp(Neon16::load(xs.as_ptr())).to_array()
                }
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

    /// Every operation of a level on one set of inputs, as bits (f16 and i8 loads included).
    #[inline(always)]
    unsafe fn ops<V: V16>(
        a: &[f32; 16],
        b: &[f32; 16],
        h: &[u16; 16],
        q: &[i8; 16],
    ) -> Vec<[u32; 16]> {
        // SAFETY: every array holds 16 elements; the caller runs this at a level the CPU has.
        unsafe {
            let (x, y) = (V::load(a.as_ptr()), V::load(b.as_ptr()));
            let n = V::load(
                [
                    -3f32, 0., 5., -126., 127., 1., -1., 2., 0., 3., -2., 7., -7., 4., 9., -9.,
                ]
                .as_ptr(),
            );
            [
                V::add(x, y),
                V::sub(x, y),
                V::mul(x, y),
                V::div(x, y),
                V::fma(x, y, V::splat(0.375)),
                V::max(x, y),
                V::min(x, y),
                V::select_neg(x, y, V::splat(2.0)),
                x.first(5, -1.5),
                x.first(16, 0.0),
                V::splat(1.25).ldexp(n),
                V::load_f16(h.as_ptr()),
                V::load_i8(q.as_ptr()),
                V::splat(V::reduce_max(x)),
                V::zero(),
            ]
            .map(|v| v.to_array().map(f32::to_bits))
            .to_vec()
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn ops512(a: &[f32; 16], b: &[f32; 16], h: &[u16; 16], q: &[i8; 16]) -> Vec<[u32; 16]> {
        unsafe { ops::<Avx512>(a, b, h, q) }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn ops256(a: &[f32; 16], b: &[f32; 16], h: &[u16; 16], q: &[i8; 16]) -> Vec<[u32; 16]> {
        unsafe { ops::<Avx2x2>(a, b, h, q) }
    }

    #[test]
    fn every_operation_gives_the_scalar_bits_at_every_level() {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for round in 0..2000 {
            let mut a: [f32; 16] = std::array::from_fn(|_| (next() >> 40) as f32 / 65536.0 - 128.0);
            let mut b: [f32; 16] = std::array::from_fn(|_| (next() >> 40) as f32 / 65536.0 - 128.0);
            if round % 3 == 0 {
                // Ties the operand order decides: ±0 against ±0, equal values.
                (a[0], b[0], a[1], b[1], a[2], b[2]) = (0.0, -0.0, -0.0, 0.0, 1.5, 1.5);
            }
            b.iter_mut().filter(|v| **v == 0.0).for_each(|v| *v = 0.5);
            b[0] = if round % 3 == 0 { -0.0 } else { b[0] };
            // Every f16: normals, subnormals, zeros (not NaN/inf: kernels never load them).
            let h: [u16; 16] = std::array::from_fn(|_| {
                let v = next() as u16;
                if v & 0x7c00 == 0x7c00 { v & 0x83ff } else { v }
            });
            let q: [i8; 16] = std::array::from_fn(|_| next() as i8);
            // SAFETY: each level runs only when the CPU has it.
            let want = unsafe { ops::<Scalar16>(&a, &b, &h, &q) };
            for lvl in SimdLevel::available() {
                let got = unsafe {
                    match lvl {
                        #[cfg(target_arch = "x86_64")]
                        SimdLevel::Avx512 => ops512(&a, &b, &h, &q),
                        #[cfg(target_arch = "x86_64")]
                        SimdLevel::Avx2 => ops256(&a, &b, &h, &q),
                        #[cfg(target_arch = "aarch64")]
                        SimdLevel::Neon | SimdLevel::Dotprod | SimdLevel::I8mm => {
                            ops::<Neon16>(&a, &b, &h, &q)
                        }
                        _ => ops::<Scalar16>(&a, &b, &h, &q),
                    }
                };
                for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(g, w, "{lvl:?}: operation {k} on {a:?}, {b:?}");
                }
            }
        }
    }
}
