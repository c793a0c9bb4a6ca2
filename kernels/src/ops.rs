//! Element-wise and row-wise ops of a Llama-family block, in f32.

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

/// Rotary position embedding in GGML's "normal" layout (adjacent pairs `(x[2i], x[2i+1])`),
/// which is how llama.cpp applies RoPE to GGUF `llama` weights (the converter permuted Q and K
/// so that this matches the reference model). `x` holds `n_heads` heads of `head_dim`.
pub fn rope_normal(x: &mut [f32], head_dim: usize, pos: usize, freq_base: f32) {
    assert_eq!(x.len() % head_dim, 0);
    let half = head_dim / 2;
    // theta_i = pos · base^(-2i/d), computed as llama.cpp does: repeated multiplication by
    // theta_scale = base^(-2/d), starting from theta = pos.
    let theta_scale = freq_base.powf(-2.0 / head_dim as f32);
    let mut cs = [(0f32, 0f32); 256];
    assert!(half <= cs.len());
    let mut theta = pos as f32;
    for c in cs.iter_mut().take(half) {
        *c = (theta.cos(), theta.sin());
        theta *= theta_scale;
    }
    for head in x.chunks_exact_mut(head_dim) {
        for (i, &(cos, sin)) in cs.iter().take(half).enumerate() {
            let (a, b) = (head[2 * i], head[2 * i + 1]);
            head[2 * i] = a * cos - b * sin;
            head[2 * i + 1] = a * sin + b * cos;
        }
    }
}

/// `gate[i] = silu(gate[i]) · up[i]`, in place.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// Softmax in place; returns nothing, leaves a probability vector.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
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
    let lse = x
        .iter()
        .map(|v| ((*v - max) as f64).exp())
        .sum::<f64>()
        .ln()
        + max as f64;
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
}
