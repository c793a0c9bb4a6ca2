//! The AArch64 level of [`V16`] (NEON, four 128-bit registers) and the integer building
//! blocks the AArch64 matmul kernels share: `sdot`, `smmla`, exact group sums, row stores.

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
    pub(crate) unsafe fn mac(&mut self, w0: &[int8x16_t; 4], w1: &[int8x16_t; 4], a: int8x16_t) {
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
