//! Tandem's compute kernels.
//!
//! Every kernel here has a plain scalar twin that tests compare it against, and every
//! reduction runs in an order that depends only on the reduced length, never on how many
//! rows share the call: a row's result is the same whether it is computed alone or in a
//! batch of 64 (batch invariance, which Tandem's determinism guarantees rest on).
//!
//! # Layout
//! - [`dispatch`]: the CPU feature level, detected once and cached (`TANDEM_SIMD` forces a lower one).
//! - [`quant`]: GGML block formats (Q4_0, Q4_1, Q8_0) and F16/BF16, dequantized exactly to f32.
//! - [`dot`]: the f32 dot product every matmul is built from, one implementation per level.
//! - [`matmul`]: `y = x · Wᵀ` over a thread pool, batch-invariant.
//! - [`int8`]: W8A8 — 8-bit weights per output channel × 8-bit activations per token, exact integer sums.
//! - [`qmatmul`]: the same with Q4_0/Q4_1/Q8_0 weights as stored and 8-bit activations.
//! - [`pool`]: the persistent compute threads every parallel kernel runs on.
//! - [`math`]: exp, ln, powf, sin, cos from one Rust implementation (not the C library's).
//! - [`ops`]: RMSNorm, RoPE, SiLU·mul, softmax.
//! - [`attention`]: causal attention of new query rows over a paged KV cache.
//!
//! - [`actq`]: activation quantization; [`panel`]: the 16-channel panel layout the int8
//!   kernels share; [`simd`]: a 16-lane f32 vector per level.
//!
//! Levels: x86-64 scalar/AVX2/AVX-512 VNNI, AArch64 scalar/NEON/`sdot`/`smmla` — every one gives the
//! scalar twin's bits (the f32 dot product excepted: its vector levels fuse, tested to a bound).
//! The CUDA backend lives in `engine::cuda`, behind `engine::Backend`.
//! The roofline measurements of these kernels live in the `bench` crate (`bench::measure`).

pub mod actq;
pub mod attention;
pub mod dispatch;
pub mod dot;
pub mod int8;
pub mod math;
pub mod matmul;
pub mod ops;
pub mod panel;
pub mod pool;
pub mod qmatmul;
pub mod quant;
pub(crate) mod simd;

pub use dispatch::SimdLevel;

/// Multiply-accumulates below which a matmul runs on the calling thread: forking onto the
/// pool costs more than it saves for decode-sized products (and idle workers' wake-ups show
/// up as scheduler time in profiles).
pub(crate) const SERIAL_MACS: usize = 1 << 15;

/// Runs `f` over `0..n`, on the compute pool only when the call carries enough work.
pub(crate) fn for_each_chunk(n: usize, macs: usize, f: impl Fn(usize) + Sync + Send) {
    if macs < SERIAL_MACS {
        (0..n).for_each(f)
    } else {
        pool::global().run(n, &f)
    }
}

/// `x.round()` (half away from zero) for |x| < 2²³, without the libm call that `f32::round`
/// becomes on baseline x86-64 (no SSE4.1): truncate, then add one when the dropped fraction is
/// at least a half. Bit-identical to `f32::round` in that range (tested); it vectorizes.
#[inline(always)]
pub fn round_half_away(x: f32) -> f32 {
    let a = x.abs();
    let t = a as i32 as f32; // truncation toward zero; exact for a < 2^23
    let r = t + if a - t >= 0.5 { 1.0 } else { 0.0 };
    r.copysign(x)
}

/// Seeded test data: uniform in (−1, 1), never exactly zero.
#[cfg(test)]
pub(crate) fn test_data(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0 + 1e-4
        })
        .collect()
}

#[cfg(test)]
mod round_tests {
    use super::round_half_away;

    #[test]
    fn equals_f32_round() {
        let mut xs: Vec<f32> = vec![
            0.0,
            -0.0,
            0.5,
            -0.5,
            1.5,
            -1.5,
            2.5,
            126.5,
            -126.5,
            127.0,
            0.49999997,
            -0.49999997,
            0.50000006,
            1e-30,
            8388607.5,
            -8388607.0,
        ];
        let mut s = 0x1234_5678_9abc_def0u64;
        for _ in 0..1_000_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            xs.push(f32::from_bits(s as u32 & 0x7fff_ffff) % 300.0 - 150.0);
            xs.push(((s >> 40) as f32 / 65536.0).copysign(if s & 1 == 0 { 1.0 } else { -1.0 }));
        }
        for x in xs {
            if x.is_finite() && x.abs() < 8388608.0 {
                assert_eq!(round_half_away(x).to_bits(), x.round().to_bits(), "{x}");
            }
        }
    }
}
