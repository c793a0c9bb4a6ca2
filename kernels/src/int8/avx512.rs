//! The AVX-512 VNNI kernel: `vpdpbusd` of a 64-byte weight line (16 channels × 4 inputs,
//! offset-binary) against four activation bytes broadcast to every lane.

#![allow(clippy::needless_range_loop)] // register tiles read clearest with explicit indices

use super::{I8Acts, I8Weights, QUAD};
use crate::panel::{Out, PANEL};
use std::arch::x86_64::*;

/// Rows per register tile for prefill-sized calls: 6 rows × 2 panels = 12 integer and 12 f32
/// accumulators, 2 weight lines and a broadcast in the 32 registers.
const MR: usize = 6;

/// Panels `p0..p1` (their output columns), all rows.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI must be present; `p1 ≤ w.panels()`; no other thread writes these
/// columns of `out`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn panels(x: &I8Acts, w: &I8Weights, p0: usize, p1: usize, out: Out) {
    let m = x.m;
    // SAFETY (every tile call): rows i..i+R < m and panels p..p+C ≤ p1 exist.
    unsafe {
        if m < 4 {
            // One panel at a time: a single sequential stream per thread (as in w4a8's decode).
            for p in p0..p1 {
                rows_small::<1>(x, w, p, out);
            }
            return;
        }
        let mut p = p0;
        while p < p1 {
            let two = p + 2 <= p1;
            let mut i = 0;
            while i + MR <= m {
                if two {
                    tile::<MR, 2>(x, w, i, p, out);
                } else {
                    tile::<MR, 1>(x, w, i, p, out);
                }
                i += MR;
            }
            if i < m {
                if two {
                    tail::<2>(x, w, i, p, out);
                } else {
                    tail::<1>(x, w, i, p, out);
                }
            }
            p += if two { 2 } else { 1 };
        }
    }
}

/// The last `m − i < MR` rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tail<const NR: usize>(x: &I8Acts, w: &I8Weights, i: usize, p: usize, out: Out) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match x.m - i {
            1 => tile::<1, NR>(x, w, i, p, out),
            2 => tile::<2, NR>(x, w, i, p, out),
            3 => tile::<3, NR>(x, w, i, p, out),
            4 => tile::<4, NR>(x, w, i, p, out),
            5 => tile::<5, NR>(x, w, i, p, out),
            _ => unreachable!("fewer than MR rows"),
        }
    }
}

/// Decode-sized calls (`m < 4`): every row against `NR` panels.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn rows_small<const NR: usize>(x: &I8Acts, w: &I8Weights, p: usize, out: Out) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match x.m {
            1 => tile::<1, NR>(x, w, 0, p, out),
            2 => tile::<2, NR>(x, w, 0, p, out),
            3 => tile::<3, NR>(x, w, 0, p, out),
            _ => unreachable!("fewer than four rows"),
        }
    }
}

/// Rows `i..i+R` × panels `p..p+C`: per group, R·C integer accumulators start at the offset
/// correction, take one `vpdpbusd` per quad, and fold into f32 at the group's end.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn tile<const R: usize, const C: usize>(
    x: &I8Acts,
    w: &I8Weights,
    i: usize,
    p: usize,
    out: Out,
) {
    let quads = w.quads();
    let (ng, gq, stride) = (x.groups(), x.group / QUAD, x.stride());
    let ap = x.q.as_ptr();
    let wp: [*const u8; C] = std::array::from_fn(|c| w.panel_ptr(p + c));
    let mut facc = [[_mm512_setzero_ps(); C]; R];
    // SAFETY: rows i..i+R exist (stride bytes each, padded to whole quads), panels p..p+C hold
    // `quads` lines each, and group g's scale and correction exist for every row.
    unsafe {
        for g in 0..ng {
            let (t0, t1) = (g * gq, ((g + 1) * gq).min(quads));
            let mut acc = [[_mm512_setzero_si512(); C]; R];
            for r in 0..R {
                let c0 = _mm512_set1_epi32(*x.corr.get_unchecked((i + r) * ng + g));
                acc[r] = [c0; C];
            }
            for t in t0..t1 {
                let wv: [__m512i; C] =
                    std::array::from_fn(|c| _mm512_load_si512(wp[c].add(t * 64) as *const _));
                for r in 0..R {
                    let a = _mm512_set1_epi32(
                        (ap.add((i + r) * stride + t * QUAD) as *const i32).read_unaligned(),
                    );
                    for c in 0..C {
                        acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], wv[c], a);
                    }
                }
            }
            for r in 0..R {
                let s = _mm512_set1_ps(*x.scale.get_unchecked((i + r) * ng + g));
                for c in 0..C {
                    facc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][c]), s, facc[r][c]);
                }
            }
        }
        for c in 0..C {
            let col = (p + c) * PANEL;
            let sw = _mm512_loadu_ps(w.scale.as_ptr().add(col));
            let mask = out.mask(p + c);
            for r in 0..R {
                let y = _mm512_mul_ps(facc[r][c], sw);
                _mm512_mask_storeu_ps(out.ptr.add((i + r) * out.n + col), mask, y);
            }
        }
    }
}
