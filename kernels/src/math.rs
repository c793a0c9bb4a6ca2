//! The transcendental functions that reach a model's outputs — RoPE's angles, softmax,
//! log-probabilities, the sampler's weights — from one implementation in Rust.
//!
//! `f32::exp` and friends call the C library: glibc's and musl's `expf`, `sinf`, `powf`
//! round differently in the last bit, so a static musl `tandem` (the container image) and the
//! glibc build would give different log-probabilities and, after a few sampled tokens,
//! different text. Every such call goes through here instead: [`exp`] is our own (the sampler
//! and log-probabilities call it once per vocabulary entry, so it is written to vectorize over
//! a row), the rest come from the `libm` crate (a Rust port of musl's libm), called at most a
//! few times per token. The hot element-wise paths use the kernels' own vector `exp`
//! ([`crate::simd`]), which was already libc-free.

/// e^x, f32.
#[inline]
pub fn expf(x: f32) -> f32 {
    libm::expf(x)
}

/// e^x, f64, within a relative 2.5·2⁻⁵² of the C library's (the tests' bound, over the whole
/// range); 0 below −708 (where e^x would be subnormal), ∞ above 709 (where it nears the largest
/// f64; Tandem's callers pass x ≤ 0).
///
/// Cody–Waite reduction `x = k·ln2 + r` with |r| ≤ ln2/2, then the Taylor polynomial of e^r to
/// degree 12 (truncation error below 2⁻⁵²) by Horner, then `2^k` built in the exponent bits.
/// No branches but the final selects, no float→int conversion, plain `*` and `+` (never a
/// fused multiply-add, whose use would depend on the target): a loop over a slice vectorizes,
/// and every build computes the same bits.
#[inline]
pub fn exp(x: f64) -> f64 {
    // ln 2 split as fdlibm splits it: the high part's low 32 bits are zero, so k·LN2_HI is exact.
    const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
    // 1.5·2⁵²: adding it rounds to an integer held in the low mantissa bits.
    const SHIFT: f64 = 6_755_399_441_055_744.0;
    // 1/12!, 1/11!, …, 1/1!, 1/0!
    const C: [f64; 13] = [
        1.0 / 479_001_600.0,
        1.0 / 39_916_800.0,
        1.0 / 3_628_800.0,
        1.0 / 362_880.0,
        1.0 / 40_320.0,
        1.0 / 5_040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ];
    let xc = x.clamp(-708.0, 709.0);
    let t = xc * std::f64::consts::LOG2_E + SHIFT;
    let kf = t - SHIFT;
    let r = (xc - kf * LN2_HI) - kf * LN2_LO;
    let mut p = C[0];
    for c in &C[1..] {
        p = p * r + c;
    }
    // k in [−1022, 1023]: a normal power of two.
    let k = t.to_bits().wrapping_sub(SHIFT.to_bits());
    let y = p * f64::from_bits(k.wrapping_add(1023) << 52);
    if x < -708.0 {
        0.0
    } else if x > 709.0 {
        f64::INFINITY
    } else {
        y
    }
}

/// Natural logarithm, f64.
#[inline]
pub fn ln(x: f64) -> f64 {
    libm::log(x)
}

/// x^y, f32.
#[inline]
pub fn powf(x: f32, y: f32) -> f32 {
    libm::powf(x, y)
}

/// (cos x, sin x), f32.
#[inline]
pub fn cos_sin(x: f32) -> (f32, f32) {
    let (s, c) = libm::sincosf(x);
    (c, s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Within an ulp or two of the C library's (the two differ only in rounding).
    #[test]
    fn agree_with_std_to_rounding() {
        let mut x = -20.0f32;
        while x < 20.0 {
            let (c, s) = cos_sin(x);
            assert!((c - x.cos()).abs() <= 2.0 * f32::EPSILON, "cos {x}");
            assert!((s - x.sin()).abs() <= 2.0 * f32::EPSILON, "sin {x}");
            let e = expf(x);
            assert!(
                (e - x.exp()).abs() <= 2.0 * f32::EPSILON * x.exp(),
                "exp {x}"
            );
            let d = x as f64;
            if x > 0.0 {
                assert!((ln(d) - d.ln()).abs() <= 4.0 * f64::EPSILON * d.ln().abs().max(1.0));
                assert!((powf(x, -0.0625) - x.powf(-0.0625)).abs() <= 2.0 * f32::EPSILON);
            }
            x += 0.037;
        }
    }

    #[test]
    fn exp_is_within_a_few_ulp_everywhere_it_is_normal() {
        use proptest::prelude::*;
        let ulps = |x: f64| {
            let (a, b) = (exp(x), x.exp());
            ((a - b) / b).abs() / f64::EPSILON
        };
        let mut x = -708.0f64;
        while x <= 709.0 {
            assert!(ulps(x) <= 2.5, "exp({x}) = {}, want {}", exp(x), x.exp());
            x += 0.000_913_7;
        }
        proptest!(|(x in -708.0f64..709.0)| prop_assert!(ulps(x) <= 2.5));
        proptest!(|(x in -1.0f64..1.0)| prop_assert!(ulps(x) <= 2.5));
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-708.5), 0.0);
        assert_eq!(exp(-1e300), 0.0);
        assert_eq!(exp(710.0), f64::INFINITY);
        assert!(exp(709.0).is_finite());
    }
}
