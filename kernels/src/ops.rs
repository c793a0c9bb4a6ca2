//! Element-wise and row-wise ops of a Llama-family block, in f32.

use crate::dispatch::{SimdLevel, level};
use crate::simd::{Scalar16, V16};

/// `out = x / sqrt(mean(x²) + eps) · weight`, one row (llama.cpp's order: scale, then weight).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    assert_eq!(x.len(), weight.len());
    assert_eq!(x.len(), out.len());
    let sum: f32 = crate::dot::dot_scalar(x, x);
    let scale = 1.0 / (sum / x.len() as f32 + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
        *o = (v * scale) * w;
    }
}

/// The rotation angles of one position: `(cos θᵢ, sin θᵢ)` for each of the `head_dim / 2`
/// pairs, computed as llama.cpp does: `θ₀ = pos`, then repeated multiplication by
/// `base^(−2/d)`. One table serves every head and every layer at that position.
pub fn rope_angles(head_dim: usize, pos: usize, freq_base: f32, out: &mut Vec<(f32, f32)>) {
    let theta_scale = crate::math::powf(freq_base, -2.0 / head_dim as f32);
    out.clear();
    let mut theta = pos as f32;
    for _ in 0..head_dim / 2 {
        out.push(crate::math::cos_sin(theta));
        theta *= theta_scale;
    }
}

/// Rotary position embedding in GGML's "normal" layout (adjacent pairs `(x[2i], x[2i+1])`),
/// which is how llama.cpp applies RoPE to GGUF `llama` weights (the converter permuted Q and K
/// so that this matches the reference model). `x` holds whole heads; `cs` is [`rope_angles`].
pub fn rope_apply(x: &mut [f32], head_dim: usize, cs: &[(f32, f32)]) {
    assert_eq!(x.len() % head_dim, 0);
    assert_eq!(cs.len(), head_dim / 2);
    for head in x.chunks_exact_mut(head_dim) {
        for (i, &(cos, sin)) in cs.iter().enumerate() {
            let (a, b) = (head[2 * i], head[2 * i + 1]);
            head[2 * i] = a * cos - b * sin;
            head[2 * i + 1] = a * sin + b * cos;
        }
    }
}

/// [`rope_apply`] at position `pos` (the tests' one-call form).
#[cfg(test)]
fn rope_normal(x: &mut [f32], head_dim: usize, pos: usize, freq_base: f32) {
    let mut cs = Vec::new();
    rope_angles(head_dim, pos, freq_base, &mut cs);
    rope_apply(x, head_dim, &cs);
}

/// `gate[i] = silu(gate[i]) · up[i]`, in place, at the process's level (every level gives the
/// same bits): `silu(g) = g·σ(g)` with `σ` from `e = exp(−|g|)` ([`crate::simd::exp`]):
/// `1/(1+e)` for `g ≥ 0`, `e/(1+e)` below.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    silu_mul_at(level(), gate, up)
}

pub fn silu_mul_at(lvl: SimdLevel, gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    let full = gate.len() / 16 * 16;
    // SAFETY: each level runs only where the CPU has it; chunks are whole 16-lane vectors.
    unsafe {
        match lvl {
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 => silu_avx512(&mut gate[..full], &up[..full]),
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 => silu_avx2(&mut gate[..full], &up[..full]),
            #[cfg(target_arch = "aarch64")]
            SimdLevel::Neon | SimdLevel::Dotprod | SimdLevel::I8mm => {
                silu_v::<crate::simd::Neon16>(&mut gate[..full], &up[..full])
            }
            _ => silu_v::<Scalar16>(&mut gate[..full], &up[..full]),
        }
        // The tail, padded to one vector.
        if full < gate.len() {
            let n = gate.len() - full;
            let (mut g, mut u) = ([0f32; 16], [0f32; 16]);
            g[..n].copy_from_slice(&gate[full..]);
            u[..n].copy_from_slice(&up[full..]);
            silu_v::<Scalar16>(&mut g, &u);
            gate[full..].copy_from_slice(&g[..n]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
unsafe fn silu_avx512(gate: &mut [f32], up: &[f32]) {
    unsafe { silu_v::<crate::simd::Avx512>(gate, up) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn silu_avx2(gate: &mut [f32], up: &[f32]) {
    unsafe { silu_v::<crate::simd::Avx2x2>(gate, up) }
}

#[inline(always)]
unsafe fn silu_v<V: V16>(gate: &mut [f32], up: &[f32]) {
    // SAFETY: both slices hold whole 16-lane chunks (the caller's contract).
    unsafe {
        let one = V::splat(1.0);
        for (g, u) in gate.chunks_exact_mut(16).zip(up.chunks_exact(16)) {
            let x = V::load(g.as_ptr());
            let e = crate::simd::exp(V::min(x, V::sub(V::zero(), x)));
            let s = V::div(one, V::add(one, e));
            let sig = V::select_neg(x, V::mul(e, s), s);
            V::mul(V::mul(x, sig), V::load(u.as_ptr())).store(g.as_mut_ptr());
        }
    }
}

/// Softmax in place; returns nothing, leaves a probability vector.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = crate::math::expf(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `log_softmax` of a row, in f64 for accurate log-probabilities.
pub fn log_softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // The exponentials first (a loop that vectorizes), then the sum in order.
    let e: Vec<f64> = x
        .iter()
        .map(|v| crate::math::exp((*v - max) as f64))
        .collect();
    let sum = e.iter().sum::<f64>();
    let lse = crate::math::ln(sum) + max as f64;
    x.iter().map(|v| (*v as f64 - lse) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_unit_rms() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) * 0.37).collect();
        let w = vec![1.0; 64];
        let mut o = vec![0.0; 64];
        rms_norm(&x, &w, 0.0, &mut o);
        let rms = (o.iter().map(|v| v * v).sum::<f32>() / 64.0).sqrt();
        assert!((rms - 1.0).abs() < 1e-5);
    }

    #[test]
    fn rope_preserves_norm_and_is_identity_at_zero() {
        let x: Vec<f32> = (0..128).map(|i| (i as f32 * 0.7).sin() + 0.1).collect();
        let mut y = x.clone();
        rope_normal(&mut y, 64, 0, 10000.0);
        assert_eq!(x, y);
        rope_normal(&mut y, 64, 17, 10000.0);
        for (a, b) in x.chunks(2).zip(y.chunks(2)) {
            let (na, nb) = (a[0].hypot(a[1]), b[0].hypot(b[1]));
            assert!((na - nb).abs() < 1e-5);
        }
        // pair 0 rotates by exactly pos radians
        let ang = y[1].atan2(y[0]) - x[1].atan2(x[0]);
        let d = (ang - 17.0).rem_euclid(std::f32::consts::TAU);
        assert!(d < 1e-4 || (std::f32::consts::TAU - d) < 1e-4);
    }

    #[test]
    fn softmax_sums_to_one_and_log_softmax_agrees() {
        let mut x = vec![1.0f32, 2.0, -3.0, 0.5, 10.0];
        let ls = log_softmax(&x);
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        for (p, l) in x.iter().zip(ls) {
            assert!((p.ln() - l).abs() < 1e-5);
        }
    }

    #[test]
    fn silu_mul_matches_definition() {
        let mut g = vec![-2.0f32, -0.5, 0.0, 0.5, 3.0];
        let u = vec![1.5f32, 2.0, 3.0, -1.0, 0.25];
        let want: Vec<f32> = g
            .iter()
            .zip(&u)
            .map(|(g, u)| g * (1.0 / (1.0 + (-g).exp())) * u)
            .collect();
        silu_mul(&mut g, &u);
        for (a, b) in g.iter().zip(want) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn silu_levels_agree_bitwise_and_track_f64() {
        for len in [1usize, 15, 16, 17, 1536, 1537] {
            let g0: Vec<f32> = crate::test_data(len, len as u64)
                .iter()
                .map(|v| v * 12.0)
                .collect();
            let u = crate::test_data(len, 99);
            let mut want = g0.clone();
            silu_mul_at(SimdLevel::Scalar, &mut want, &u);
            for (i, w) in want.iter().enumerate() {
                let g = g0[i] as f64;
                let e = g / (1.0 + (-g).exp()) * u[i] as f64;
                assert!(
                    (*w as f64 - e).abs() <= 1e-6 * (1.0 + e.abs()),
                    "{g}: {w} vs {e}"
                );
            }
            for lvl in SimdLevel::available() {
                let mut got = g0.clone();
                silu_mul_at(lvl, &mut got, &u);
                assert_eq!(
                    got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{lvl:?} {len}"
                );
            }
        }
    }
}
