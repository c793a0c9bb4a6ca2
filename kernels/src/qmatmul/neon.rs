//! The AArch64 kernels: each 64-byte panel line is four registers of 4 channels × 4 inputs.
//! Q4 nibbles (0–15) are already valid signed bytes; Q8_0 bytes have their offset undone. The
//! exact block sums come from `smmla` for row pairs (FEAT_I8MM, [`PairSums`]), `sdot`
//! (FEAT_DotProd) or `smull` + `sadalp` ([`GroupSums`]);
//! Q4_0's `−8·Σa` is added to each channel's sum, exactly, before the float steps, which then
//! follow the scalar definition (`fma(isum, d_w·d_a, acc)`, then Q4_1's `fma(m_w, s_a, acc)`).

#![allow(clippy::needless_range_loop)] // register tiles read clearest with explicit indices

use super::{QActs, QFormat, QK, QWeights};
use crate::panel::{Out, PANEL, row_pairs};
use crate::simd::{GroupSums, PairSums, row_pair, store_row};
use std::arch::aarch64::*;

/// Panels `p0..p1` (their output columns), all rows, with `sdot`.
///
/// # Safety
/// FEAT_DotProd must be present; `p1 ≤ w.panels()`; no other thread writes these columns.
#[target_feature(enable = "dotprod")]
pub unsafe fn panels_dot(x: &QActs, w: &QWeights, p0: usize, p1: usize, out: Out) {
    // SAFETY (every tile): rows and panels are in range; the caller's features.
    let (two, one) = (
        |i, p| unsafe { tile::<true, 2>(x, w, i, p, out) },
        |i, p| unsafe { tile::<true, 1>(x, w, i, p, out) },
    );
    row_pairs(x.m, p0, p1, two, one)
}

/// Panels `p0..p1` with `smmla` for each pair of rows (`sdot` for a last odd row).
///
/// # Safety
/// FEAT_DotProd and FEAT_I8MM must be present; `p1 ≤ w.panels()`; no other thread writes
/// these columns.
#[target_feature(enable = "dotprod,i8mm")]
pub unsafe fn panels_mmla(x: &QActs, w: &QWeights, p0: usize, p1: usize, out: Out) {
    // SAFETY: as above.
    let (two, one) = (
        |i, p| unsafe { tile_mmla(x, w, i, p, out) },
        |i, p| unsafe { tile::<true, 1>(x, w, i, p, out) },
    );
    row_pairs(x.m, p0, p1, two, one)
}

/// Panels `p0..p1` with baseline NEON only.
///
/// # Safety
/// `p1 ≤ w.panels()`; no other thread writes these columns.
pub unsafe fn panels_neon(x: &QActs, w: &QWeights, p0: usize, p1: usize, out: Out) {
    // SAFETY: as above (NEON is baseline).
    let (two, one) = (
        |i, p| unsafe { tile::<false, 2>(x, w, i, p, out) },
        |i, p| unsafe { tile::<false, 1>(x, w, i, p, out) },
    );
    row_pairs(x.m, p0, p1, two, one)
}

/// Folds one block's exact sums `isum` of row-block `ab` into the row's accumulators, as the
/// scalar definition does: Q4_0's `−8·Σa`, then `fma(isum, d_w·d_a, acc)`, then (Q4_1)
/// `fma(m_w, s_a, acc)`; `dw` the block's 16 channel scales, `sp` its scale line.
#[inline(always)]
unsafe fn fold_block(
    facc: &mut [float32x4_t; 4],
    mut isum: [int32x4_t; 4],
    x: &QActs,
    ab: usize,
    f: QFormat,
    dw: &[float32x4_t; 4],
    sp: *const u16,
) {
    // SAFETY: `ab` is a block of `x`; `sp` a scale line (16 d values, then 16 m values).
    unsafe {
        if f == QFormat::Q4_0 {
            let bias = vdupq_n_s32(-8 * *x.sum.get_unchecked(ab));
            isum = isum.map(|v| vaddq_s32(v, bias));
        }
        let da = vdupq_n_f32(*x.d.get_unchecked(ab));
        for q in 0..4 {
            facc[q] = vfmaq_f32(facc[q], vcvtq_f32_s32(isum[q]), vmulq_f32(dw[q], da));
        }
        if f == QFormat::Q4_1 {
            let sa = vdupq_n_f32(*x.s.get_unchecked(ab));
            for q in 0..4 {
                let mw = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(sp.add(PANEL + 4 * q))));
                facc[q] = vfmaq_f32(facc[q], mw, sa);
            }
        }
    }
}

/// Rows `i..i+R` × panel `p`.
#[inline(always)]
unsafe fn tile<const DOT: bool, const R: usize>(
    x: &QActs,
    w: &QWeights,
    i: usize,
    p: usize,
    out: Out,
) {
    let (nb, f) = (w.blocks(), w.format);
    let qp = x.q.as_ptr();
    // SAFETY: rows, lines and scales in bounds (as in the x86 kernels).
    unsafe {
        let (nib, offset) = (vdupq_n_u8(0x0f), vdupq_n_u8(0x80));
        // Row r's activation bytes 4·quad..4·quad+4 of block b, in every lane.
        let act = |r: usize, b: usize, quad: usize| {
            vreinterpretq_s8_s32(vdupq_n_s32(
                (qp.add(((i + r) * nb + b) * QK + quad * 4) as *const i32).read_unaligned(),
            ))
        };
        let mut facc = [[vdupq_n_f32(0.0); 4]; R];
        for b in 0..nb {
            let lp = w.lines_at(p, b);
            let line = |t: usize| -> [uint8x16_t; 4] {
                std::array::from_fn(|q| vld1q_u8(lp.add(t * 64 + 16 * q)))
            };
            let mut sums = GroupSums::<R>::new();
            if f == QFormat::Q8_0 {
                for t in 0..8 {
                    let wv = line(t).map(|v| vreinterpretq_s8_u8(veorq_u8(v, offset)));
                    for r in 0..R {
                        sums.mac::<DOT>(r, &wv, act(r, b, t));
                    }
                }
            } else {
                for h in 0..4 {
                    let raw = line(h);
                    let lo = raw.map(|v| vreinterpretq_s8_u8(vandq_u8(v, nib)));
                    let hi = raw.map(|v| vreinterpretq_s8_u8(vshrq_n_u8::<4>(v)));
                    for r in 0..R {
                        sums.mac::<DOT>(r, &lo, act(r, b, h));
                        sums.mac::<DOT>(r, &hi, act(r, b, h + 4));
                    }
                }
            }
            let sp = w.scales_at(p, b);
            let dw: [float32x4_t; 4] = std::array::from_fn(|q| {
                vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(sp.add(4 * q))))
            });
            for r in 0..R {
                let ab = (i + r) * nb + b;
                fold_block(&mut facc[r], sums.finish::<DOT>(r), x, ab, f, &dw, sp);
            }
        }
        let col = p * PANEL;
        let left = (out.n - col).min(PANEL);
        for r in 0..R {
            store_row(&facc[r], None, out.ptr.add((i + r) * out.n + col), left);
        }
    }
}

/// Rows `i, i+1` × panel `p`, two lines (eight inputs) per `smmla`.
#[inline(always)]
unsafe fn tile_mmla(x: &QActs, w: &QWeights, i: usize, p: usize, out: Out) {
    let (nb, f) = (w.blocks(), w.format);
    let qp = x.q.as_ptr();
    // SAFETY: rows, lines and scales in bounds (as in `tile`).
    unsafe {
        let (nib, offset) = (vdupq_n_u8(0x0f), vdupq_n_u8(0x80));
        let mut facc = [[vdupq_n_f32(0.0); 4]; 2];
        for b in 0..nb {
            let lp = w.lines_at(p, b);
            let line = |t: usize| -> [uint8x16_t; 4] {
                std::array::from_fn(|q| vld1q_u8(lp.add(t * 64 + 16 * q)))
            };
            // Rows i and i+1's activation bytes 8j..8j+8 of block b.
            let acts = |j: usize| {
                row_pair(
                    qp.add((i * nb + b) * QK + 8 * j),
                    qp.add(((i + 1) * nb + b) * QK + 8 * j),
                    8,
                )
            };
            let mut sums = PairSums::new();
            if f == QFormat::Q8_0 {
                let signed = |t: usize| line(t).map(|v| vreinterpretq_s8_u8(veorq_u8(v, offset)));
                for j in 0..4 {
                    sums.mac(&signed(2 * j), &signed(2 * j + 1), acts(j));
                }
            } else {
                // Lines 2h', 2h'+1: inputs 8h'..8h'+8 in the low nibbles, 16 more in the high.
                for h in 0..2 {
                    let (r0, r1) = (line(2 * h), line(2 * h + 1));
                    let lo = |r: [uint8x16_t; 4]| r.map(|v| vreinterpretq_s8_u8(vandq_u8(v, nib)));
                    let hi =
                        |r: [uint8x16_t; 4]| r.map(|v| vreinterpretq_s8_u8(vshrq_n_u8::<4>(v)));
                    sums.mac(&lo(r0), &lo(r1), acts(h));
                    sums.mac(&hi(r0), &hi(r1), acts(h + 2));
                }
            }
            let sp = w.scales_at(p, b);
            let dw: [float32x4_t; 4] = std::array::from_fn(|q| {
                vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(sp.add(4 * q))))
            });
            let isums = sums.finish();
            for r in 0..2 {
                let ab = (i + r) * nb + b;
                fold_block(&mut facc[r], isums[r], x, ab, f, &dw, sp);
            }
        }
        let col = p * PANEL;
        let left = (out.n - col).min(PANEL);
        for r in 0..2 {
            store_row(&facc[r], None, out.ptr.add((i + r) * out.n + col), left);
        }
    }
}
