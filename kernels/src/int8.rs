//! W8A8 matmul: weights requantized at load to 8 bits per output channel (one f32 scale per
//! row), activations quantized per token to 8 bits with one f32 scale per group of
//! [`GROUP`] inputs (one scale per whole token costs SmolLM2 +5% perplexity: a few
//! outlier channels flatten the rest; per group of 128 it is within 1%).
//!
//! Arithmetic, identical at every level: within a group, eight integer lanes each sum the
//! products at positions `t` with `(t mod 32) / 4 = lane` — exact, so any SIMD width or
//! order gives the same integers; at the group's end each lane does
//! `acc[lane] = fma(isum[lane] as f32, sa[group], acc[lane])`; the result is a fixed tree over
//! the lanes times `sw[j]`. So every level is bit-identical to the scalar reference and a row
//! never depends on its batch.
//!
//! AVX2 has no signed×signed byte multiply; `maddubs` takes unsigned × signed, so each product
//! is formed as `|w| · (a·sign(w))` (both within ±127, so the pairwise 16-bit sums cannot
//! saturate: 2·127·127 < 32767), widened with `madd` against ones and added in 32 bits.

use crate::dispatch::{SimdLevel, level};

/// Activation inputs per quantization group (a multiple of 32; a row's last group may be shorter).
pub const GROUP: usize = 64;

/// Output channels interleaved in one packed panel.
pub const PANEL: usize = 4;

/// Weights `[n × k]` as 8-bit integers with a scale per output channel.
///
/// Stored packed: channels in panels of [`PANEL`] (the last padded with zero rows), each panel
/// laid out as 32-byte slices of its channels in turn (`c0[0..32] c1[0..32] c2 c3 c0[32..64]
/// …`), so a decode tile of four channels reads one sequential stream instead of four short
/// ones that the hardware prefetcher never locks onto. When `k` is not a multiple of 32 the
/// rows stay plain row-major (and the scalar kernel runs).
#[derive(Debug, Clone)]
pub struct I8Weights {
    q: Vec<i8>,
    pub scale: Vec<f32>,
    pub n: usize,
    pub k: usize,
}

/// Quantizes `x` symmetrically to ±127: returns the scale (0 when `x` is all zeros).
/// Rounds half away from zero (`f32::round`): measured, round-half-even on the activations
/// costs SmolLM2 0.8% more perplexity.
fn quantize_slice(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let s = amax / 127.0;
    let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
    for (o, v) in q.iter_mut().zip(x) {
        *o = crate::round_half_away((v * inv).clamp(-127.0, 127.0)) as i8;
    }
    s
}

impl I8Weights {
    /// Per-output-channel symmetric quantization of `w: [n × k]`.
    pub fn quantize(w: &[f32], n: usize, k: usize) -> I8Weights {
        assert_eq!(w.len(), n * k);
        let mut rows = vec![0i8; n * k];
        let scale = if k == 0 {
            vec![0.0; n]
        } else {
            w.chunks_exact(k)
                .zip(rows.chunks_exact_mut(k))
                .map(|(r, qr)| quantize_slice(r, qr))
                .collect()
        };
        let q = if Self::packed_k(k) {
            let mut q = vec![0i8; n.div_ceil(PANEL) * PANEL * k];
            for (j, r) in rows.chunks_exact(k).enumerate() {
                for t in (0..k).step_by(32) {
                    let at = Self::offset(k, j, t);
                    q[at..at + 32].copy_from_slice(&r[t..t + 32]);
                }
            }
            q
        } else {
            rows
        };
        I8Weights { q, scale, n, k }
    }

    fn packed_k(k: usize) -> bool {
        k > 0 && k.is_multiple_of(32)
    }

    /// Where channel `j`'s bytes `t..t+32` start (`t` a multiple of 32) in the packed layout.
    #[inline(always)]
    fn offset(k: usize, j: usize, t: usize) -> usize {
        (j / PANEL) * PANEL * k + (t / 32) * (PANEL * 32) + (j % PANEL) * 32
    }

    /// Channel `j`'s quantized weights in order.
    pub fn row_q(&self, j: usize, out: &mut [i8]) {
        let k = self.k;
        if Self::packed_k(k) {
            for t in (0..k).step_by(32) {
                let at = Self::offset(k, j, t);
                out[t..t + 32].copy_from_slice(&self.q[at..at + 32]);
            }
        } else {
            out.copy_from_slice(&self.q[j * k..(j + 1) * k]);
        }
    }

    /// Row `j`, dequantized.
    pub fn row_into(&self, j: usize, out: &mut [f32]) {
        let s = self.scale[j];
        let mut q = vec![0i8; self.k];
        self.row_q(j, &mut q);
        for (o, &v) in out.iter_mut().zip(&q) {
            *o = v as f32 * s;
        }
    }

    pub fn bytes(&self) -> usize {
        self.q.len() + self.scale.len() * 4
    }
}

/// Activations `[m × k]` quantized per token, one scale per `group` inputs ([`GROUP`] unless
/// a benchmark asks otherwise).
#[derive(Debug, Clone, Default)]
pub struct I8Acts {
    pub q: Vec<i8>,
    /// `[m × groups()]`.
    pub scale: Vec<f32>,
    pub m: usize,
    pub k: usize,
    /// Inputs per scale: a multiple of 32.
    pub group: usize,
}

impl I8Acts {
    /// Scales per row.
    pub fn groups(&self) -> usize {
        self.k.div_ceil(self.group)
    }

    pub fn quantize_into(&mut self, x: &[f32], m: usize, k: usize) {
        self.quantize_grouped_into(x, m, k, GROUP)
    }

    /// Per token, one scale per `group` inputs (a multiple of 32).
    pub fn quantize_grouped_into(&mut self, x: &[f32], m: usize, k: usize, group: usize) {
        assert_eq!(x.len(), m * k);
        assert!(group > 0 && group.is_multiple_of(32));
        self.group = group;
        self.m = m;
        self.k = k;
        let g = self.groups();
        self.q.resize(m * k, 0);
        self.scale.resize(m * g, 0.0);
        if k == 0 {
            return;
        }
        let scales = crate::pool::SendPtr(self.scale.as_mut_ptr());
        // Rows in parallel once there are enough of them to pay for it.
        let per_task = if m * k >= 1 << 16 { 16 } else { m };
        crate::pool::for_rows(&mut self.q, k, per_task, |i, qr| {
            // SAFETY: scale row i (g entries) belongs to the task that owns q row i.
            let sr = unsafe { std::slice::from_raw_parts_mut(scales.get().add(i * g), g) };
            let r = &x[i * k..(i + 1) * k];
            for ((xg, qg), s) in r.chunks(group).zip(qr.chunks_mut(group)).zip(sr) {
                *s = quantize_slice(xg, qg);
            }
        });
    }

    /// One scale for the whole matrix (whole rows as one group): the fastest arithmetic, but a
    /// row's values then depend on every other row of the call — not batch-invariant. Exists
    /// only to measure what invariance costs (`tandem kernels roofline`).
    pub fn quantize_per_tensor(x: &[f32], m: usize, k: usize) -> I8Acts {
        let group = k.max(1).next_multiple_of(32);
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let s = amax / 127.0;
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        I8Acts {
            q: x.iter()
                .map(|v| (v * inv).round().clamp(-127.0, 127.0) as i8)
                .collect(),
            scale: vec![s; m],
            m,
            k,
            group,
        }
    }

    pub fn quantize_grouped(x: &[f32], m: usize, k: usize, group: usize) -> I8Acts {
        let mut a = I8Acts::default();
        a.quantize_grouped_into(x, m, k, group);
        a
    }

    pub fn quantize(x: &[f32], m: usize, k: usize) -> I8Acts {
        let mut a = I8Acts::default();
        a.quantize_into(x, m, k);
        a
    }
}

fn reduce8(v: [f32; 8]) -> f32 {
    let a = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
    let b = [a[0] + a[2], a[1] + a[3]];
    b[0] + b[1]
}

/// One output, the scalar definition every level must equal bit for bit.
pub fn dot_scalar(a: &[i8], sa: &[f32], group: usize, w: &[i8], sw: f32) -> f32 {
    let mut acc = [0f32; 8];
    for ((ag, wg), s) in a.chunks(group).zip(w.chunks(group)).zip(sa) {
        let mut isum = [0i32; 8];
        for (t, (&x, &y)) in ag.iter().zip(wg).enumerate() {
            isum[(t % 32) / 4] += x as i32 * y as i32;
        }
        for (l, v) in acc.iter_mut().enumerate() {
            *v = (isum[l] as f32).mul_add(*s, *v);
        }
    }
    reduce8(acc) * sw
}

/// The scalar reference of the whole product.
pub fn gemm_scalar(x: &I8Acts, w: &I8Weights, y: &mut [f32]) {
    let (m, n, k) = (x.m, w.n, w.k);
    let g = x.groups();
    let mut wr = vec![0i8; k];
    for j in 0..n {
        w.row_q(j, &mut wr);
        for i in 0..m {
            y[i * n + j] = dot_scalar(
                &x.q[i * k..(i + 1) * k],
                &x.scale[i * g..(i + 1) * g],
                x.group,
                &wr,
                w.scale[j],
            );
        }
    }
}

struct SharedOut(*mut f32);
// SAFETY: tasks write disjoint columns of the output.
unsafe impl Sync for SharedOut {}
unsafe impl Send for SharedOut {}

/// Activation rows kept hot while a chunk of weight rows is reused against them.
const M_BLOCK: usize = 64;

/// `y = x · Wᵀ` at the process's level.
pub fn gemm(x: &I8Acts, w: &I8Weights, y: &mut [f32]) {
    gemm_at(level(), x, w, y)
}

pub fn gemm_at(lvl: SimdLevel, x: &I8Acts, w: &I8Weights, y: &mut [f32]) {
    let (m, n, k) = (x.m, w.n, w.k);
    assert_eq!(x.k, k, "inner dimensions differ");
    assert_eq!(y.len(), m * n, "y shape");
    assert_eq!(x.scale.len(), m * x.groups(), "activation scales");
    let out = SharedOut(y.as_mut_ptr());
    let out = &out;
    if lvl < SimdLevel::Avx2 || !cfg!(target_arch = "x86_64") || !k.is_multiple_of(32) {
        let g = x.groups();
        crate::for_each_chunk(n.div_ceil(16), m * n * k, |c| {
            let mut wr = vec![0i8; k];
            for j in c * 16..((c + 1) * 16).min(n) {
                w.row_q(j, &mut wr);
                for i in 0..m {
                    let v = dot_scalar(
                        &x.q[i * k..(i + 1) * k],
                        &x.scale[i * g..(i + 1) * g],
                        x.group,
                        &wr,
                        w.scale[j],
                    );
                    // SAFETY: (i, j) in bounds; column j belongs to this task only.
                    unsafe { *out.0.add(i * n + j) = v };
                }
            }
        });
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        assert!(SimdLevel::detect() >= SimdLevel::Avx2);
        let threads = crate::pool::global().threads();
        // Decode-sized calls split the weights evenly over the threads (each weight byte is read
        // once); prefill-sized calls use small chunks so that every thread stays busy.
        let chunk = if m < 4 {
            (n / (4 * threads)).next_multiple_of(4).clamp(16, 256)
        } else {
            16
        };
        crate::for_each_chunk(n.div_ceil(chunk), m * n * k, |c| {
            let (j0, j1) = (c * chunk, ((c + 1) * chunk).min(n));
            // SAFETY: AVX2 present (asserted), k a multiple of 32 (checked above); the tiles
            // cover rows < m and columns in [j0, j1), which belong to this task only.
            unsafe { x86::block(x, w, j0, j1, out.0) };
        });
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // register tiles read clearest with explicit indices
mod x86 {
    use super::{I8Acts, I8Weights, M_BLOCK, reduce8};
    use std::arch::x86_64::*;

    /// Output columns `j0..j1`, all rows.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn block(x: &I8Acts, w: &I8Weights, j0: usize, j1: usize, y: *mut f32) {
        let (m, n) = (x.m, w.n);
        // SAFETY (every call below): rows and columns stay inside [0, m) × [j0, j1).
        unsafe {
            if m < 4 {
                for i in 0..m {
                    let mut j = j0;
                    while j + 4 <= j1 {
                        tile::<1, 4>(x, w, i, j, y, n);
                        j += 4;
                    }
                    while j < j1 {
                        tile::<1, 1>(x, w, i, j, y, n);
                        j += 1;
                    }
                }
                return;
            }
            for i0 in (0..m).step_by(M_BLOCK) {
                let i1 = (i0 + M_BLOCK).min(m);
                let mut j = j0;
                while j < j1 {
                    let two = j + 2 <= j1;
                    let mut i = i0;
                    while i + 4 <= i1 {
                        if two {
                            tile::<4, 2>(x, w, i, j, y, n);
                        } else {
                            tile::<4, 1>(x, w, i, j, y, n);
                        }
                        i += 4;
                    }
                    while i < i1 {
                        if two {
                            tile::<1, 2>(x, w, i, j, y, n);
                        } else {
                            tile::<1, 1>(x, w, i, j, y, n);
                        }
                        i += 1;
                    }
                    j += if two { 2 } else { 1 };
                }
            }
        }
    }

    /// Rows `i..i+MR` × columns `j..j+NR`: per group, MR·NR integer accumulators in registers,
    /// folded into f32 lanes at the group's end.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tile<const MR: usize, const NR: usize>(
        x: &I8Acts,
        w: &I8Weights,
        i: usize,
        j: usize,
        y: *mut f32,
        n: usize,
    ) {
        let k = x.k;
        let (ng, group) = (x.groups(), x.group);
        let ones = _mm256_set1_epi16(1);
        let mut accf = [[_mm256_setzero_ps(); NR]; MR];
        let ap = x.q.as_ptr();
        let wp = w.q.as_ptr();
        let sp = x.scale.as_ptr();
        // SAFETY: rows i..i+MR of x and j..j+NR of w exist (the caller's contract), k is a
        // multiple of 32, and every load reads 32 bytes at an offset t < k inside its row.
        unsafe {
            for g in 0..ng {
                let (t0, t1) = (g * group, ((g + 1) * group).min(k));
                let mut acc = [[_mm256_setzero_si256(); NR]; MR];
                let mut t = t0;
                while t < t1 {
                    let mut wv = [_mm256_setzero_si256(); NR];
                    let mut wa = [_mm256_setzero_si256(); NR];
                    for c in 0..NR {
                        wv[c] = _mm256_loadu_si256(
                            wp.add(I8Weights::offset(k, j + c, t)) as *const __m256i
                        );
                        wa[c] = _mm256_sign_epi8(wv[c], wv[c]);
                    }
                    for r in 0..MR {
                        let a = _mm256_loadu_si256(ap.add((i + r) * k + t) as *const __m256i);
                        for c in 0..NR {
                            let p = _mm256_maddubs_epi16(wa[c], _mm256_sign_epi8(a, wv[c]));
                            acc[r][c] = _mm256_add_epi32(acc[r][c], _mm256_madd_epi16(p, ones));
                        }
                    }
                    t += 32;
                }
                for r in 0..MR {
                    let s = _mm256_set1_ps(*sp.add((i + r) * ng + g));
                    for c in 0..NR {
                        accf[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][c]), s, accf[r][c]);
                    }
                }
            }
            for r in 0..MR {
                for c in 0..NR {
                    let mut v = [0f32; 8];
                    _mm256_storeu_ps(v.as_mut_ptr(), accf[r][c]);
                    *y.add((i + r) * n + j + c) = reduce8(v) * w.scale[j + c];
                }
            }
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data as fill;
    use proptest::prelude::*;

    fn bits(x: &[f32]) -> Vec<u32> {
        x.iter().map(|v| v.to_bits()).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn levels_equal_the_scalar_reference_bitwise(
            m in prop::sample::select(vec![1usize, 2, 3, 4, 5, 15, 16, 17, 63, 64, 65]),
            k in prop::sample::select(vec![1usize, 15, 16, 17, 31, 32, 33, 63, 64, 65, 96, 128, 160, 576, 577, 1536]),
            n in prop::sample::select(vec![1usize, 2, 3, 15, 16, 17, 33, 65]),
            group in prop::sample::select(vec![32usize, GROUP, 128, 4096]),
            seed in any::<u64>(),
        ) {
            let x = fill(m * k, seed);
            let wf = fill(n * k, seed ^ 0x5eed);
            let a = I8Acts::quantize_grouped(&x, m, k, group);
            let w = I8Weights::quantize(&wf, n, k);
            let mut want = vec![f32::NAN; m * n];
            gemm_scalar(&a, &w, &mut want);
            for lvl in SimdLevel::available() {
                let mut y = vec![f32::NAN; m * n];
                gemm_at(lvl, &a, &w, &mut y);
                prop_assert_eq!(bits(&y), bits(&want), "{:?}", lvl);
            }
            // Quantization error stays within the two half-steps per product.
            let g = a.groups();
            for i in 0..m {
                for j in 0..n {
                    let exact: f64 = (0..k).map(|t| x[i * k + t] as f64 * wf[j * k + t] as f64).sum();
                    let sw = w.scale[j] as f64;
                    let bound: f64 = (0..k).map(|t| {
                        let sa = a.scale[i * g + t / group] as f64;
                        let (xa, xw) = (x[i * k + t].abs() as f64, wf[j * k + t].abs() as f64);
                        xw * sa * 0.5 + xa * sw * 0.5 + sa * sw * 0.25
                    }).sum::<f64>() * 1.0001 + want[i * n + j].abs() as f64 * 1e-6 + 1e-5;
                    prop_assert!((want[i * n + j] as f64 - exact).abs() <= bound, "({i},{j})");
                }
            }
            // Batch invariance: a row alone gives the same bits.
            for i in [0, m / 2, m - 1] {
                let one = I8Acts::quantize_grouped(&x[i * k..(i + 1) * k], 1, k, group);
                let mut y1 = vec![0f32; n];
                gemm(&one, &w, &mut y1);
                prop_assert_eq!(bits(&y1), bits(&want[i * n..(i + 1) * n]));
            }
        }
    }

    #[test]
    fn extreme_values_do_not_saturate() {
        // Every product at ±127·±127: the 16-bit pair sums sit at their worst case.
        let k = 256;
        for (av, wv) in [(1.0f32, 1.0f32), (-1.0, 1.0), (1.0, -1.0), (-1.0, -1.0)] {
            let a = I8Acts::quantize(&vec![av; 4 * k], 4, k);
            let w = I8Weights::quantize(&vec![wv; 2 * k], 2, k);
            let mut want = vec![0f32; 8];
            gemm_scalar(&a, &w, &mut want);
            for lvl in SimdLevel::available() {
                let mut y = vec![0f32; 8];
                gemm_at(lvl, &a, &w, &mut y);
                assert_eq!(bits(&y), bits(&want));
            }
            assert!(want.iter().all(|v| (v - av * wv * k as f32).abs() < 1e-2));
        }
    }
}
