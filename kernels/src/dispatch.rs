//! Run-time CPU feature detection, done once and cached.
//!
//! Kernels are compiled for several levels with `#[target_feature]`; the binary itself is built
//! for the baseline of its architecture (x86-64; AArch64, whose baseline includes NEON), so it
//! runs on any CPU of it (and the scalar level anywhere). Each architecture has its own ladder:
//! x86-64 `scalar < avx2 < avx512`, AArch64 `scalar < neon < dotprod < i8mm`. `TANDEM_SIMD=<level>`
//! forces a level no higher than what the CPU has (a level of the other architecture, or one
//! this CPU lacks, falls to the highest this CPU has below it).
//!
//! A feature flag is never trusted alone: on AArch64 the flag comes from the kernel's HWCAP
//! (what the kernel enabled, not a raw ID register), and the `sdot` and `smmla` levels are
//! still used only after one such instruction has run here and given the right sums.

use std::sync::OnceLock;

/// The instruction-set level a kernel runs at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    /// Portable Rust; the reference every other level is tested against.
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 F/BW/VL + VNNI.
    Avx512,
    /// AArch64 Advanced SIMD (every AArch64 CPU): widening `smull` + pairwise adds.
    Neon,
    /// AArch64 with the dot-product extension (`sdot`: four 8-bit products per 32-bit lane).
    Dotprod,
    /// AArch64 with the dot-product and 8-bit matrix-multiply extensions (`smmla`: a 2×8 by
    /// 8×2 product per register, two rows at once; single rows use `sdot`).
    I8mm,
}

/// The ladder of this build's architecture, lowest first.
const LADDER: &[SimdLevel] = if cfg!(target_arch = "x86_64") {
    &[SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512]
} else if cfg!(target_arch = "aarch64") {
    &[
        SimdLevel::Scalar,
        SimdLevel::Neon,
        SimdLevel::Dotprod,
        SimdLevel::I8mm,
    ]
} else {
    &[SimdLevel::Scalar]
};

impl SimdLevel {
    /// The highest level this CPU supports.
    pub fn detect() -> SimdLevel {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("avx512vnni")
            {
                return SimdLevel::Avx512;
            }
            if std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
            {
                return SimdLevel::Avx2;
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("dotprod") && sdot_works() {
                if std::arch::is_aarch64_feature_detected!("i8mm") && smmla_works() {
                    return SimdLevel::I8mm;
                }
                return SimdLevel::Dotprod;
            }
            return SimdLevel::Neon;
        }
        #[allow(unreachable_code)]
        SimdLevel::Scalar
    }

    /// Every level this CPU can run, lowest first (tests run them all).
    pub fn available() -> Vec<SimdLevel> {
        let top = SimdLevel::detect();
        LADDER.iter().copied().filter(|l| *l <= top).collect()
    }

    /// `want` if this CPU has it, else the highest level it has below `want`.
    pub fn at_most(want: SimdLevel) -> SimdLevel {
        SimdLevel::available()
            .into_iter()
            .rfind(|l| *l <= want)
            .unwrap_or(SimdLevel::Scalar)
    }

    /// Parses `scalar`, `avx2` or `avx512`.
    pub fn parse(s: &str) -> Option<SimdLevel> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" => Some(SimdLevel::Scalar),
            "avx2" => Some(SimdLevel::Avx2),
            "avx512" | "avx512vnni" => Some(SimdLevel::Avx512),
            "neon" => Some(SimdLevel::Neon),
            "dotprod" | "sdot" => Some(SimdLevel::Dotprod),
            "i8mm" | "smmla" => Some(SimdLevel::I8mm),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Scalar => "scalar",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
            SimdLevel::Neon => "neon",
            SimdLevel::Dotprod => "dotprod",
            SimdLevel::I8mm => "i8mm",
        }
    }
}

/// The level kernels use in this process: detected once, lowered by `TANDEM_SIMD` if set.
pub fn level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let top = SimdLevel::detect();
        match std::env::var("TANDEM_SIMD")
            .ok()
            .and_then(|s| SimdLevel::parse(&s))
        {
            Some(forced) => SimdLevel::at_most(forced),
            None => top,
        }
    })
}

/// Runs one `sdot` on known operands and checks its sum (the feature flag alone is not proof).
#[cfg(target_arch = "aarch64")]
fn sdot_works() -> bool {
    use std::arch::aarch64::*;
    #[target_feature(enable = "dotprod")]
    unsafe fn probe() -> [i32; 4] {
        let a: [i8; 16] = std::array::from_fn(|i| i as i8 - 7);
        let b: [i8; 16] = std::array::from_fn(|i| 3 * i as i8 - 20);
        let mut out = [0i32; 4];
        // SAFETY: arrays of 16 bytes / 4 lanes; the caller checked the feature flag.
        unsafe {
            let acc = crate::simd::sdot(vdupq_n_s32(5), vld1q_s8(a.as_ptr()), vld1q_s8(b.as_ptr()));
            vst1q_s32(out.as_mut_ptr(), acc);
        }
        out
    }
    let want: [i32; 4] = std::array::from_fn(|l| {
        5 + (0..4)
            .map(|e| (4 * l + e) as i32 - 7)
            .zip((0..4).map(|e| 3 * (4 * l + e) as i32 - 20))
            .map(|(x, y)| x * y)
            .sum::<i32>()
    });
    // SAFETY: only reached when the kernel reports dotprod enabled (HWCAP); an emulator or CPU
    // that then computes wrong sums is caught here.
    unsafe { probe() == want }
}

/// Runs one `smmla` on known operands and checks its four sums.
#[cfg(target_arch = "aarch64")]
fn smmla_works() -> bool {
    use std::arch::aarch64::*;
    #[target_feature(enable = "i8mm")]
    unsafe fn probe(a: &[i8; 16], b: &[i8; 16]) -> [i32; 4] {
        let mut out = [0i32; 4];
        // SAFETY: arrays of 16 bytes / 4 lanes; the caller checked the feature flag.
        unsafe {
            let acc =
                crate::simd::smmla(vdupq_n_s32(-3), vld1q_s8(a.as_ptr()), vld1q_s8(b.as_ptr()));
            vst1q_s32(out.as_mut_ptr(), acc);
        }
        out
    }
    let a: [i8; 16] = std::array::from_fn(|i| 5 * i as i8 - 40);
    let b: [i8; 16] = std::array::from_fn(|i| 60 - 7 * i as i8);
    let want: [i32; 4] = std::array::from_fn(|l| {
        let (i, j) = (l / 2, l % 2);
        -3 + (0..8)
            .map(|k| a[8 * i + k] as i32 * b[8 * j + k] as i32)
            .sum::<i32>()
    });
    // SAFETY: only reached when the kernel reports i8mm enabled (HWCAP2).
    unsafe { probe(&a, &b) == want }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_ordered_and_parse() {
        assert!(SimdLevel::Scalar < SimdLevel::Avx2 && SimdLevel::Avx2 < SimdLevel::Avx512);
        assert!(SimdLevel::Scalar < SimdLevel::Neon && SimdLevel::Neon < SimdLevel::Dotprod);
        assert!(SimdLevel::Dotprod < SimdLevel::I8mm);
        assert!(LADDER.windows(2).all(|w| w[0] < w[1]));
        assert!(SimdLevel::available().iter().all(|l| LADDER.contains(l)));
        assert_eq!(SimdLevel::at_most(SimdLevel::detect()), SimdLevel::detect());
        assert_eq!(SimdLevel::at_most(SimdLevel::Scalar), SimdLevel::Scalar);
        for l in SimdLevel::available() {
            assert_eq!(SimdLevel::parse(l.name()), Some(l));
        }
        assert_eq!(SimdLevel::available()[0], SimdLevel::Scalar);
        assert!(level() <= SimdLevel::detect());
    }
}
