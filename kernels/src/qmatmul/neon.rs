//! The AArch64 kernels: each 64-byte panel line is four registers of 4 channels × 4 inputs.
//! Q4 nibbles (0–15) are already valid signed bytes; Q8_0 bytes have their offset undone. The
//! exact block sums come from `sdot` (FEAT_DotProd) or `smull` + `sadalp` ([`GroupSums`]);
//! Q4_0's `−8·Σa` is added to each channel's sum, exactly, before the float steps, which then
//! follow the scalar definition (`fma(isum, d_w·d_a, acc)`, then Q4_1's `fma(m_w, s_a, acc)`).

#![allow(clippy::needless_range_loop)] // register tiles read clearest with explicit indices

use super::{QActs, QFormat, QK, QWeights};
use crate::panel::{Out, PANEL};
use crate::simd::GroupSums;
use std::arch::aarch64::*;

/// Panels `p0..p1` (their output columns), all rows, with `sdot`.
///
/// # Safety
/// FEAT_DotProd must be present; `p1 ≤ w.panels()`; no other thread writes these columns.
#[target_feature(enable = "dotprod")]
pub unsafe fn panels_dot(x: &QActs, w: &QWeights, p0: usize, p1: usize, out: Out) {
    // SAFETY: forwarded.
    unsafe { panels::<true>(x, w, p0, p1, out) }
}

/// Panels `p0..p1` with baseline NEON only.
///
/// # Safety
/// `p1 ≤ w.panels()`; no other thread writes these columns.
pub unsafe fn panels_neon(x: &QActs, w: &QWeights, p0: usize, p1: usize, out: Out) {
    // SAFETY: forwarded.
    unsafe { panels::<false>(x, w, p0, p1, out) }
}

#[inline(always)]
unsafe fn panels<const DOT: bool>(x: &QActs, w: &QWeights, p0: usize, p1: usize, out: Out) {
    // SAFETY (every tile call): rows and panels are in range.
    unsafe {
        for p in p0..p1 {
            let mut i = 0;
            while i + 2 <= x.m {
                tile::<DOT, 2>(x, w, i, p, out);
                i += 2;
            }
            if i < x.m {
                tile::<DOT, 1>(x, w, i, p, out);
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
                let mut isum = sums.finish::<DOT>(r);
                if f == QFormat::Q4_0 {
                    let bias = vdupq_n_s32(-8 * *x.sum.get_unchecked(ab));
                    isum = isum.map(|v| vaddq_s32(v, bias));
                }
                let da = vdupq_n_f32(*x.d.get_unchecked(ab));
                for q in 0..4 {
                    let s = vmulq_f32(dw[q], da);
                    facc[r][q] = vfmaq_f32(facc[r][q], vcvtq_f32_s32(isum[q]), s);
                }
                if f == QFormat::Q4_1 {
                    let sa = vdupq_n_f32(*x.s.get_unchecked(ab));
                    for q in 0..4 {
                        let mw =
                            vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(sp.add(PANEL + 4 * q))));
                        facc[r][q] = vfmaq_f32(facc[r][q], mw, sa);
                    }
                }
            }
        }
        let col = p * PANEL;
        let left = (out.n - col).min(PANEL);
        for r in 0..R {
            let mut v = [0f32; PANEL];
            for q in 0..4 {
                vst1q_f32(v.as_mut_ptr().add(4 * q), facc[r][q]);
            }
            std::ptr::copy_nonoverlapping(v.as_ptr(), out.ptr.add((i + r) * out.n + col), left);
        }
    }
}
