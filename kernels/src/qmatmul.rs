//! Quantized matmul: GGML block weights (Q4_0, Q4_1, Q8_0, as stored in the GGUF) times
//! activations quantized per token to 8 bits in blocks of 32 (integer multiply-accumulate,
//! the way llama.cpp's CPU backend runs Q4 models).
//!
//! Arithmetic, identical at every level: per block of 32, eight integer lanes each sum four
//! adjacent products `w·a`; each lane is accumulated in f32 as `acc[l] = fma(isum[l], d_w·d_a, acc[l])`;
//! Q4_1's offset term accumulates separately as `acc_m = fma(m_w, s_a, acc_m)` with
//! `s_a = d_a·Σa`; the result is a fixed tree over the eight lanes plus `acc_m`. So the AVX2
//! kernel is bit-identical to its scalar twin, and a row's result never depends on the batch.

use crate::dispatch::{SimdLevel, level};
use half::f16;

pub const QK: usize = 32;

/// The block formats the kernel reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QFormat {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl QFormat {
    pub fn block_bytes(self) -> usize {
        match self {
            QFormat::Q4_0 => 18,
            QFormat::Q4_1 => 20,
            QFormat::Q8_0 => 34,
        }
    }
}

/// `n` rows of `k` weights each, in one block format.
#[derive(Debug, Clone, Copy)]
///
/// `packed`: rows grouped in panels of four, each panel stored block by block (row 0's block
/// b, row 1's, row 2's, row 3's, then block b + 1 …; the last panel padded with zero blocks),
/// so a decode tile of four rows reads one sequential stream ([`pack_panels`]). Otherwise
/// rows are stored one after another, as in the GGUF.
pub struct QWeights<'a> {
    pub format: QFormat,
    pub bytes: &'a [u8],
    pub n: usize,
    pub k: usize,
    pub packed: bool,
}

/// Rows per packed panel.
pub const PANEL: usize = 4;

/// Reorders row-major blocks (`n` rows of `k` weights) into panels of [`PANEL`] rows.
pub fn pack_panels(format: QFormat, rows: &[u8], n: usize, k: usize) -> Vec<u8> {
    let (bb, nb) = (format.block_bytes(), k / QK);
    assert_eq!(rows.len(), n * nb * bb);
    let mut out = vec![0u8; n.div_ceil(PANEL) * PANEL * nb * bb];
    for j in 0..n {
        for b in 0..nb {
            let src = (j * nb + b) * bb;
            let dst = panel_block(j, b, nb, bb);
            out[dst..dst + bb].copy_from_slice(&rows[src..src + bb]);
        }
    }
    out
}

#[inline(always)]
fn panel_block(j: usize, b: usize, nb: usize, bb: usize) -> usize {
    ((j / PANEL * nb + b) * PANEL + j % PANEL) * bb
}

impl QWeights<'_> {
    /// Row `j`'s blocks in order: borrowed when stored row-major, gathered into `buf` when packed.
    pub fn row<'s>(&'s self, j: usize, buf: &'s mut Vec<u8>) -> &'s [u8] {
        let (bb, nb) = (self.format.block_bytes(), self.k / QK);
        if !self.packed {
            return &self.bytes[j * nb * bb..(j + 1) * nb * bb];
        }
        buf.resize(nb * bb, 0);
        for b in 0..nb {
            let at = panel_block(j, b, nb, bb);
            buf[b * bb..(b + 1) * bb].copy_from_slice(&self.bytes[at..at + bb]);
        }
        buf
    }

    /// Where row `j`'s first block is, and how far apart its blocks are.
    fn row_stream(&self, j: usize) -> (usize, usize) {
        let (bb, nb) = (self.format.block_bytes(), self.k / QK);
        if self.packed {
            (panel_block(j, 0, nb, bb), PANEL * bb)
        } else {
            (j * nb * bb, bb)
        }
    }
}

/// Activations of `m` rows quantized in blocks of 32: values, per-block scale `d` and `s = d·Σq`.
#[derive(Debug, Clone, Default)]
pub struct QActs {
    pub q: Vec<i8>,
    pub d: Vec<f32>,
    pub s: Vec<f32>,
    pub m: usize,
    pub k: usize,
}

impl QActs {
    /// Quantizes `x: [m × k]` (k a multiple of 32), reusing this buffer.
    pub fn quantize_into(&mut self, x: &[f32], m: usize, k: usize) {
        assert!(k.is_multiple_of(QK) && x.len() == m * k);
        self.m = m;
        self.k = k;
        self.q.resize(m * k, 0);
        self.d.resize(m * k / QK, 0.0);
        self.s.resize(m * k / QK, 0.0);
        for (b, (xb, qb)) in x
            .chunks_exact(QK)
            .zip(self.q.chunks_exact_mut(QK))
            .enumerate()
        {
            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (q, v) in qb.iter_mut().zip(xb) {
                *q = crate::round_half_away(v * id) as i8;
                sum += *q as i32;
            }
            self.d[b] = d;
            self.s[b] = d * sum as f32;
        }
    }

    pub fn quantize(x: &[f32], m: usize, k: usize) -> QActs {
        let mut a = QActs::default();
        a.quantize_into(x, m, k);
        a
    }

    fn row(&self, i: usize) -> (&[i8], &[f32], &[f32]) {
        let nb = self.k / QK;
        (
            &self.q[i * self.k..(i + 1) * self.k],
            &self.d[i * nb..(i + 1) * nb],
            &self.s[i * nb..(i + 1) * nb],
        )
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// The 32 weights of a block as signed integers, and (d, m) — the scalar definition.
fn unpack(format: QFormat, blk: &[u8]) -> ([i32; QK], f32, f32) {
    let mut w = [0i32; QK];
    match format {
        QFormat::Q4_0 | QFormat::Q4_1 => {
            let off = if format == QFormat::Q4_0 { 2 } else { 4 };
            let bias = if format == QFormat::Q4_0 { 8 } else { 0 };
            for j in 0..16 {
                w[j] = (blk[off + j] & 15) as i32 - bias;
                w[j + 16] = (blk[off + j] >> 4) as i32 - bias;
            }
        }
        QFormat::Q8_0 => {
            for j in 0..QK {
                w[j] = blk[2 + j] as i8 as i32;
            }
        }
    }
    let m = if format == QFormat::Q4_1 {
        f16_at(blk, 2)
    } else {
        0.0
    };
    (w, f16_at(blk, 0), m)
}

fn reduce8(v: [f32; 8]) -> f32 {
    let a = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
    let b = [a[0] + a[2], a[1] + a[3]];
    b[0] + b[1]
}

/// The scalar reference of one weight row against one activation row.
pub fn dot_scalar(format: QFormat, wrow: &[u8], q: &[i8], d: &[f32], s: &[f32]) -> f32 {
    let bb = format.block_bytes();
    let mut acc = [0f32; 8];
    let mut acc_m = 0f32;
    for (b, blk) in wrow.chunks_exact(bb).enumerate() {
        let (w, dw, mw) = unpack(format, blk);
        let qa = &q[b * QK..(b + 1) * QK];
        let scale = dw * d[b];
        for (l, a) in acc.iter_mut().enumerate() {
            let isum: i32 = (4 * l..4 * l + 4).map(|j| w[j] * qa[j] as i32).sum();
            *a = (isum as f32).mul_add(scale, *a);
        }
        if format == QFormat::Q4_1 {
            acc_m = mw.mul_add(s[b], acc_m);
        }
    }
    reduce8(acc) + acc_m
}

struct SharedOut(*mut f32);
// SAFETY: tasks write disjoint columns of the output.
unsafe impl Sync for SharedOut {}
unsafe impl Send for SharedOut {}

const N_CHUNK: usize = 16;

/// `y[i·n + j] = Σ_t x[i][t]·w[j][t]` with quantized activations, at the process's level.
pub fn qmatmul(x: &QActs, w: QWeights<'_>, y: &mut [f32]) {
    qmatmul_at(level(), x, w, y)
}

pub fn qmatmul_at(lvl: SimdLevel, x: &QActs, w: QWeights<'_>, y: &mut [f32]) {
    let (m, n, k) = (x.m, w.n, w.k);
    assert_eq!(x.k, k);
    assert!(k.is_multiple_of(QK));
    let rows = if w.packed {
        n.div_ceil(PANEL) * PANEL
    } else {
        n
    };
    assert_eq!(w.bytes.len(), rows * k / QK * w.format.block_bytes());
    assert_eq!(y.len(), m * n);
    let out = SharedOut(y.as_mut_ptr());
    let out = &out;
    // Few activation rows (decode): tiles of four weight rows share each activation load.
    // Many rows (prefill): tiles of four activation rows share each weight unpack.
    let wide = m < 4 && lvl >= SimdLevel::Avx2;
    let chunk = if wide {
        (n / (4 * crate::pool::global().threads()))
            .next_multiple_of(4)
            .clamp(N_CHUNK, 256)
    } else {
        N_CHUNK
    };
    crate::for_each_chunk(n.div_ceil(chunk), m * n * k, |c| {
        let (j0, j1) = (c * chunk, ((c + 1) * chunk).min(n));
        let mut buf = Vec::new();
        if wide {
            let mut j = j0;
            while j + 4 <= j1 {
                let streams = [j, j + 1, j + 2, j + 3].map(|r| w.row_stream(r));
                for i in 0..m {
                    let mut r = [0f32; 4];
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: AVX2/FMA/F16C present (lvl >= Avx2 is only chosen when detected);
                    // each stream addresses k / 32 whole blocks inside `w.bytes`.
                    unsafe {
                        x86::dot_w4(w.format, w.bytes, streams, x, i, &mut r)
                    };
                    for (d, v) in r.iter().enumerate() {
                        // SAFETY: (i, j + d) is in bounds; these columns belong to this task only.
                        unsafe { *out.0.add(i * n + j + d) = *v };
                    }
                }
                j += 4;
            }
            for j in j..j1 {
                for i in 0..m {
                    let mut r = [0f32; 4];
                    dot_rows(lvl, w.format, w.row(j, &mut buf), x, i, 1, &mut r);
                    // SAFETY: as above.
                    unsafe { *out.0.add(i * n + j) = r[0] };
                }
            }
            return;
        }
        for j in j0..j1 {
            let wr = w.row(j, &mut buf);
            let mut i = 0;
            while i < m {
                let rows = (m - i).min(4);
                let mut r = [0f32; 4];
                dot_rows(lvl, w.format, wr, x, i, rows, &mut r);
                for (t, v) in r.iter().take(rows).enumerate() {
                    // SAFETY: (i + t, j) is in bounds; column j belongs to this task only.
                    unsafe { *out.0.add((i + t) * n + j) = *v };
                }
                i += rows;
            }
        }
    });
}

/// Up to four activation rows against one weight row (weights unpacked once per block).
fn dot_rows(
    lvl: SimdLevel,
    f: QFormat,
    wr: &[u8],
    x: &QActs,
    i0: usize,
    rows: usize,
    out: &mut [f32; 4],
) {
    #[cfg(target_arch = "x86_64")]
    if lvl >= SimdLevel::Avx2 {
        assert!(SimdLevel::detect() >= SimdLevel::Avx2);
        // SAFETY: AVX2 and FMA are present (checked above).
        unsafe { x86::dot_rows_avx2(f, wr, x, i0, rows, out) };
        return;
    }
    let _ = lvl;
    for (t, o) in out.iter_mut().enumerate().take(rows) {
        let (q, d, s) = x.row(i0 + t);
        *o = dot_scalar(f, wr, q, d, s);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{QActs, QFormat, QK, reduce8};
    use std::arch::x86_64::*;

    /// The block's 32 weights as bytes in element order, and whether they are signed.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn load_weights(f: QFormat, blk: *const u8) -> (__m256i, bool) {
        // SAFETY: the caller passes a whole block.
        unsafe {
            match f {
                QFormat::Q4_0 | QFormat::Q4_1 => {
                    let off = if f == QFormat::Q4_0 { 2 } else { 4 };
                    let raw = _mm_loadu_si128(blk.add(off) as *const __m128i);
                    let mask = _mm_set1_epi8(15);
                    let lo = _mm_and_si128(raw, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
                    let w = _mm256_set_m128i(hi, lo);
                    if f == QFormat::Q4_0 {
                        (_mm256_sub_epi8(w, _mm256_set1_epi8(8)), true)
                    } else {
                        (w, false)
                    }
                }
                QFormat::Q8_0 => (_mm256_loadu_si256(blk.add(2) as *const __m256i), true),
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_rows_avx2(
        f: QFormat,
        wr: &[u8],
        x: &QActs,
        i0: usize,
        rows: usize,
        out: &mut [f32; 4],
    ) {
        // SAFETY (all branches): AVX2/FMA/F16C are enabled; the row indices are in bounds.
        unsafe {
            match (f, rows) {
                (QFormat::Q4_0, 4) => dot_n::<4>(QFormat::Q4_0, wr, x, i0, out),
                (QFormat::Q4_1, 4) => dot_n::<4>(QFormat::Q4_1, wr, x, i0, out),
                (QFormat::Q8_0, 4) => dot_n::<4>(QFormat::Q8_0, wr, x, i0, out),
                (QFormat::Q4_0, 1) => dot_n::<1>(QFormat::Q4_0, wr, x, i0, out),
                (QFormat::Q4_1, 1) => dot_n::<1>(QFormat::Q4_1, wr, x, i0, out),
                (QFormat::Q8_0, 1) => dot_n::<1>(QFormat::Q8_0, wr, x, i0, out),
                _ => {
                    for (t, o) in out.iter_mut().enumerate().take(rows) {
                        let mut one = [0f32; 4];
                        dot_rows_avx2(f, wr, x, i0 + t, 1, &mut one);
                        *o = one[0];
                    }
                }
            }
        }
    }

    /// Four weight rows against one activation row: each activation block is loaded once.
    /// Per output, the same operations in the same order as `dot_n` (so the same bits).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_w4(
        f: QFormat,
        bytes: &[u8],
        streams: [(usize, usize); 4],
        x: &QActs,
        i: usize,
        out: &mut [f32; 4],
    ) {
        let bb = f.block_bytes();
        let nb = x.k / QK;
        assert!(
            streams
                .iter()
                .all(|&(at, stride)| nb == 0 || at + (nb - 1) * stride + bb <= bytes.len())
                && (i + 1) * x.k <= x.q.len()
        );
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut acc_m = [0f32; 4];
        for b in 0..nb {
            // SAFETY: b < nb; row i is in bounds (asserted above).
            unsafe {
                let ab = i * nb + b;
                let a = _mm256_loadu_si256(x.q.as_ptr().add(ab * QK) as *const __m256i);
                let (da, sa) = (*x.d.get_unchecked(ab), *x.s.get_unchecked(ab));
                for r in 0..4 {
                    let blk = bytes.as_ptr().add(streams[r].0 + b * streams[r].1);
                    let (w, signed) = load_weights(f, blk);
                    let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(u16::from_le_bytes([
                        *blk,
                        *blk.add(1),
                    ])
                        as i32)));
                    let (wu, av) = if signed {
                        (_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w))
                    } else {
                        (w, a)
                    };
                    let isum =
                        _mm256_madd_epi16(_mm256_maddubs_epi16(wu, av), _mm256_set1_epi16(1));
                    acc[r] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(dw * da), acc[r]);
                    if f == QFormat::Q4_1 {
                        let mw =
                            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(u16::from_le_bytes([
                                *blk.add(2),
                                *blk.add(3),
                            ])
                                as i32)));
                        acc_m[r] = mw.mul_add(sa, acc_m[r]);
                    }
                }
            }
        }
        for r in 0..4 {
            let mut v = [0f32; 8];
            // SAFETY: v holds eight f32s.
            unsafe { _mm256_storeu_ps(v.as_mut_ptr(), acc[r]) };
            out[r] = reduce8(v) + acc_m[r];
        }
    }

    /// `R` activation rows against one weight row; `R` is a constant so the accumulators stay
    /// in registers.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dot_n<const R: usize>(
        f: QFormat,
        wr: &[u8],
        x: &QActs,
        i0: usize,
        out: &mut [f32; 4],
    ) {
        let bb = f.block_bytes();
        let nb = x.k / QK;
        assert!(wr.len() == nb * bb && (i0 + R) * x.k <= x.q.len());
        let mut acc = [_mm256_setzero_ps(); R];
        let mut acc_m = [0f32; R];
        let (qp, dp, sp) = (x.q.as_ptr(), x.d.as_ptr(), x.s.as_ptr());
        for b in 0..nb {
            // SAFETY: b < nb and every row i0..i0+R is in bounds (asserted above).
            unsafe {
                let blk = wr.as_ptr().add(b * bb);
                let (w, signed) = load_weights(f, blk);
                let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(u16::from_le_bytes([
                    *blk,
                    *blk.add(1),
                ]) as i32)));
                let mw = if f == QFormat::Q4_1 {
                    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(u16::from_le_bytes([
                        *blk.add(2),
                        *blk.add(3),
                    ])
                        as i32)))
                } else {
                    0.0
                };
                let wu = if signed { _mm256_sign_epi8(w, w) } else { w };
                for t in 0..R {
                    let ab = (i0 + t) * nb + b;
                    let a = _mm256_loadu_si256(qp.add(ab * QK) as *const __m256i);
                    let av = if signed { _mm256_sign_epi8(a, w) } else { a };
                    let isum =
                        _mm256_madd_epi16(_mm256_maddubs_epi16(wu, av), _mm256_set1_epi16(1));
                    acc[t] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(isum),
                        _mm256_set1_ps(dw * *dp.add(ab)),
                        acc[t],
                    );
                    if f == QFormat::Q4_1 {
                        acc_m[t] = mw.mul_add(*sp.add(ab), acc_m[t]);
                    }
                }
            }
        }
        for t in 0..R {
            let mut v = [0f32; 8];
            // SAFETY: v holds eight f32s.
            unsafe { _mm256_storeu_ps(v.as_mut_ptr(), acc[t]) };
            out[t] = reduce8(v) + acc_m[t];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{quantize_q4_0, quantize_q4_1, quantize_q8_0};
    use proptest::prelude::*;

    use crate::test_data as fill;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn levels_agree_bitwise_and_track_f64(
            m in prop::sample::select(vec![1usize, 2, 3, 4, 5, 15, 16, 17]),
            kb in prop::sample::select(vec![1usize, 2, 3, 18]),
            n in prop::sample::select(vec![1usize, 15, 16, 17, 33]),
            seed in any::<u64>(),
        ) {
            let k = kb * QK;
            let x = fill(m * k, seed);
            let wf = fill(n * k, seed ^ 77);
            let acts = QActs::quantize(&x, m, k);
            for (format, bytes, deq) in [
                (QFormat::Q4_0, quantize_q4_0(&wf), crate::quant::dequantize_q4_0 as fn(&[u8], &mut [f32])),
                (QFormat::Q4_1, quantize_q4_1(&wf), crate::quant::dequantize_q4_1),
                (QFormat::Q8_0, quantize_q8_0(&wf), crate::quant::dequantize_q8_0),
            ] {
                let packed_bytes = pack_panels(format, &bytes, n, k);
                let w = QWeights { format, bytes: &bytes, n, k, packed: false };
                let wp = QWeights { format, bytes: &packed_bytes, n, k, packed: true };
                let mut wd = vec![0f32; n * k];
                deq(&bytes, &mut wd);
                let mut ys: Vec<Vec<f32>> = Vec::new();
                for lvl in SimdLevel::available() {
                    let mut y = vec![f32::NAN; m * n];
                    qmatmul_at(lvl, &acts, w, &mut y);
                    // The packed panel layout computes the same bits.
                    let mut yp = vec![f32::NAN; m * n];
                    qmatmul_at(lvl, &acts, wp, &mut yp);
                    prop_assert_eq!(bits(&yp), bits(&y), "{:?} {:?}: packed differs", format, lvl);
                    ys.push(y);
                }
                for y in &ys[1..] {
                    prop_assert_eq!(bits(y), bits(&ys[0]), "{:?}: levels differ", format);
                }
                // Against exact f64 products of the dequantized weights and the unquantized
                // activations: the error is the 8-bit activation rounding, ≤ ½ step per element.
                for i in 0..m {
                    for j in 0..n {
                        let exact: f64 = (0..k).map(|t| x[i * k + t] as f64 * wd[j * k + t] as f64).sum();
                        let bound: f64 = (0..k).map(|t| {
                            let step = acts.d[(i * k + t) / QK] as f64;
                            wd[j * k + t].abs() as f64 * step * 0.5
                        }).sum::<f64>() + 1e-4;
                        prop_assert!((ys[0][i * n + j] as f64 - exact).abs() <= bound, "{:?} ({i},{j})", format);
                    }
                }
                // Batch invariance: each row alone gives the same bits.
                for i in 0..m {
                    let one = QActs::quantize(&x[i * k..(i + 1) * k], 1, k);
                    let mut y1 = vec![0f32; n];
                    qmatmul(&one, w, &mut y1);
                    prop_assert_eq!(bits(&y1), bits(&ys[0][i * n..(i + 1) * n]));
                }
            }
        }
    }

    fn bits(x: &[f32]) -> Vec<u32> {
        x.iter().map(|v| v.to_bits()).collect()
    }
}
