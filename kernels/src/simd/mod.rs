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
mod x86;

#[cfg(target_arch = "aarch64")]
pub(crate) use arm::{GroupSums, Neon16, PairSums, row_pair, sdot, smmla, store_row};

#[cfg(target_arch = "aarch64")]
mod arm;

#[cfg(test)]
mod tests;
