//! Run-time CPU feature detection, done once and cached.
//!
//! Kernels are compiled for several levels with `#[target_feature]`; the binary itself is built
//! for baseline x86-64, so it runs on any x86-64 CPU (and the scalar level anywhere).
//! `TANDEM_SIMD=scalar|avx2|avx512` forces a level no higher than what the CPU has.

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
}

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
        SimdLevel::Scalar
    }

    /// Every level this CPU can run, lowest first (tests run them all).
    pub fn available() -> Vec<SimdLevel> {
        let top = SimdLevel::detect();
        [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512]
            .into_iter()
            .filter(|l| *l <= top)
            .collect()
    }

    /// Parses `scalar`, `avx2` or `avx512`.
    pub fn parse(s: &str) -> Option<SimdLevel> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" => Some(SimdLevel::Scalar),
            "avx2" => Some(SimdLevel::Avx2),
            "avx512" | "avx512vnni" => Some(SimdLevel::Avx512),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Scalar => "scalar",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
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
            Some(forced) => forced.min(top),
            None => top,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_ordered_and_parse() {
        assert!(SimdLevel::Scalar < SimdLevel::Avx2 && SimdLevel::Avx2 < SimdLevel::Avx512);
        for l in SimdLevel::available() {
            assert_eq!(SimdLevel::parse(l.name()), Some(l));
        }
        assert_eq!(SimdLevel::available()[0], SimdLevel::Scalar);
        assert!(level() <= SimdLevel::detect());
    }
}
