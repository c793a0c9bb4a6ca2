//! The AArch64 kernels: a panel line (16 channels × 4 inputs) is four 128-bit registers of
//! 4 channels each. The offset is undone (`eor 0x80`) so weights are signed bytes again; with
//! FEAT_DotProd each register takes one `sdot` against the row's four activation bytes
//! broadcast (each lane: one channel's four products), without it `smull` + `sadalp` keep
//! pair sums per lane and one `addp` per group folds them into channels; with FEAT_I8MM two
//! rows go together, two lines zipped per channel pair into one `smmla` operand
//! (`simd::PairSums`). Integer sums are exact every way, so all give the scalar reference's bits.

#![allow(clippy::needless_range_loop)] // register tiles read clearest with explicit indices

use super::{I8Acts, I8Weights, QUAD};
use crate::panel::{Out, PANEL, row_pairs};
use crate::simd::{GroupSums, PairSums, row_pair, store_row};
use std::arch::aarch64::*;

/// Panels `p0..p1` (their output columns), all rows, with `sdot`.
///
/// # Safety
/// FEAT_DotProd must be present; `p1 ≤ w.panels()`; no other thread writes these columns.
#[target_feature(enable = "dotprod")]
pub unsafe fn panels_dot(x: &I8Acts, w: &I8Weights, p0: usize, p1: usize, out: Out) {
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
pub unsafe fn panels_mmla(x: &I8Acts, w: &I8Weights, p0: usize, p1: usize, out: Out) {
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
pub unsafe fn panels_neon(x: &I8Acts, w: &I8Weights, p0: usize, p1: usize, out: Out) {
    // SAFETY: as above (NEON is baseline).
    let (two, one) = (
        |i, p| unsafe { tile::<false, 2>(x, w, i, p, out) },
        |i, p| unsafe { tile::<false, 1>(x, w, i, p, out) },
    );
    row_pairs(x.m, p0, p1, two, one)
}

/// Rows `i..i+R` × panel `p`.
#[inline(always)]
unsafe fn tile<const DOT: bool, const R: usize>(
    x: &I8Acts,
    w: &I8Weights,
    i: usize,
    p: usize,
    out: Out,
) {
    let quads = w.quads();
    let (ng, gq, stride) = (x.groups(), x.group / QUAD, x.stride());
    let ap = x.q.as_ptr();
    let wp = w.panel_ptr(p);
    // SAFETY: rows, lines and scales in bounds (as in the x86 kernels).
    unsafe {
        let offset = vdupq_n_u8(0x80);
        let mut facc = [[vdupq_n_f32(0.0); 4]; R];
        for g in 0..ng {
            let (t0, t1) = (g * gq, ((g + 1) * gq).min(quads));
            let mut sums = GroupSums::<R>::new();
            for t in t0..t1 {
                let wv: [int8x16_t; 4] = std::array::from_fn(|q| {
                    vreinterpretq_s8_u8(veorq_u8(vld1q_u8(wp.add(t * 64 + 16 * q)), offset))
                });
                for r in 0..R {
                    let a = vreinterpretq_s8_s32(vdupq_n_s32(
                        (ap.add((i + r) * stride + t * QUAD) as *const i32).read_unaligned(),
                    ));
                    sums.mac::<DOT>(r, &wv, a);
                }
            }
            for r in 0..R {
                let s = vdupq_n_f32(*x.scale.get_unchecked((i + r) * ng + g));
                let isum = sums.finish::<DOT>(r);
                for q in 0..4 {
                    facc[r][q] = vfmaq_f32(facc[r][q], vcvtq_f32_s32(isum[q]), s);
                }
            }
        }
        let col = p * PANEL;
        let left = (out.n - col).min(PANEL);
        for r in 0..R {
            let dst = out.ptr.add((i + r) * out.n + col);
            store_row(&facc[r], Some(w.scale.as_ptr().add(col)), dst, left);
        }
    }
}

/// Rows `i, i+1` × panel `p`, two lines (eight inputs) per `smmla`.
#[inline(always)]
unsafe fn tile_mmla(x: &I8Acts, w: &I8Weights, i: usize, p: usize, out: Out) {
    let quads = w.quads();
    let (ng, gq, stride) = (x.groups(), x.group / QUAD, x.stride());
    let ap = x.q.as_ptr();
    let wp = w.panel_ptr(p);
    // SAFETY: rows, lines and scales in bounds; a lone last quad reads 4 bytes per row only.
    unsafe {
        let offset = vdupq_n_u8(0x80);
        let zero = [vdupq_n_s8(0); 4];
        let line = |t: usize| -> [int8x16_t; 4] {
            std::array::from_fn(|q| {
                vreinterpretq_s8_u8(veorq_u8(vld1q_u8(wp.add(t * 64 + 16 * q)), offset))
            })
        };
        let mut facc = [[vdupq_n_f32(0.0); 4]; 2];
        for g in 0..ng {
            let (t0, t1) = (g * gq, ((g + 1) * gq).min(quads));
            let mut sums = PairSums::new();
            let mut t = t0;
            while t < t1 {
                let pair = t + 1 < t1;
                let a = row_pair(
                    ap.add(i * stride + t * QUAD),
                    ap.add((i + 1) * stride + t * QUAD),
                    if pair { 8 } else { 4 },
                );
                let next = if pair { line(t + 1) } else { zero };
                sums.mac(&line(t), &next, a);
                t += 2;
            }
            let isum = sums.finish();
            for r in 0..2 {
                let s = vdupq_n_f32(*x.scale.get_unchecked((i + r) * ng + g));
                for q in 0..4 {
                    facc[r][q] = vfmaq_f32(facc[r][q], vcvtq_f32_s32(isum[r][q]), s);
                }
            }
        }
        let col = p * PANEL;
        let left = (out.n - col).min(PANEL);
        for r in 0..2 {
            let dst = out.ptr.add((i + r) * out.n + col);
            store_row(&facc[r], Some(w.scale.as_ptr().add(col)), dst, left);
        }
    }
}
