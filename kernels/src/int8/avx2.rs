//! The AVX2 kernel (no VNNI): half a panel line (8 channels × 4 inputs) per register; the
//! offset is undone and each product formed as `|w|·(a·sign w)` by `maddubs`, widened by `madd`.

#![allow(clippy::needless_range_loop)] // register tiles read clearest with explicit indices

use super::{I8Acts, I8Weights, QUAD};
use crate::panel::{Out, PANEL};
use std::arch::x86_64::*;

/// Channels per register.
const HALF: usize = PANEL / 2;

/// Panels `p0..p1` (their output columns), all rows.
///
/// # Safety
/// AVX2 must be present; `p1 ≤ w.panels()`; no other thread writes these columns of `out`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn panels(x: &I8Acts, w: &I8Weights, p0: usize, p1: usize, out: Out) {
    let m = x.m;
    // SAFETY (every tile call): rows and half-panels are in range.
    unsafe {
        for h in (2 * p0..2 * p1).step_by(2) {
            let mut i = 0;
            while i + 2 <= m {
                tile::<2, 2>(x, w, i, h, out);
                i += 2;
            }
            if i < m {
                tile::<1, 2>(x, w, i, h, out);
            }
        }
    }
}

/// Rows `i..i+R` × half-panels `h..h+C`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile<const R: usize, const C: usize>(
    x: &I8Acts,
    w: &I8Weights,
    i: usize,
    h: usize,
    out: Out,
) {
    let quads = w.quads();
    let (ng, gq, stride) = (x.groups(), x.group / QUAD, x.stride());
    let ap = x.q.as_ptr();
    let wp: [*const u8; C] =
        std::array::from_fn(|c| unsafe { w.panel_ptr((h + c) / 2).add((h + c) % 2 * 32) });
    let (ones, offset) = (_mm256_set1_epi16(1), _mm256_set1_epi8(0x80u8 as i8));
    let mut facc = [[_mm256_setzero_ps(); C]; R];
    // SAFETY: as in the AVX-512 kernel: rows, lines, scales in bounds.
    unsafe {
        for g in 0..ng {
            let (t0, t1) = (g * gq, ((g + 1) * gq).min(quads));
            let mut acc = [[_mm256_setzero_si256(); C]; R];
            for t in t0..t1 {
                let mut wv = [_mm256_setzero_si256(); C];
                let mut wa = [_mm256_setzero_si256(); C];
                for c in 0..C {
                    let raw = _mm256_load_si256(wp[c].add(t * 64) as *const __m256i);
                    wv[c] = _mm256_xor_si256(raw, offset);
                    wa[c] = _mm256_abs_epi8(wv[c]);
                }
                for r in 0..R {
                    let a = _mm256_set1_epi32(
                        (ap.add((i + r) * stride + t * QUAD) as *const i32).read_unaligned(),
                    );
                    for c in 0..C {
                        let prod = _mm256_maddubs_epi16(wa[c], _mm256_sign_epi8(a, wv[c]));
                        acc[r][c] = _mm256_add_epi32(acc[r][c], _mm256_madd_epi16(prod, ones));
                    }
                }
            }
            for r in 0..R {
                let s = _mm256_set1_ps(*x.scale.get_unchecked((i + r) * ng + g));
                for c in 0..C {
                    facc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][c]), s, facc[r][c]);
                }
            }
        }
        for c in 0..C {
            let col = (h + c) * HALF;
            if col >= out.n {
                continue;
            }
            let sw = _mm256_loadu_ps(w.scale.as_ptr().add(col));
            let left = (out.n - col).min(HALF);
            for r in 0..R {
                let mut v = [0f32; HALF];
                _mm256_storeu_ps(v.as_mut_ptr(), _mm256_mul_ps(facc[r][c], sw));
                let dst = out.ptr.add((i + r) * out.n + col);
                std::ptr::copy_nonoverlapping(v.as_ptr(), dst, left);
            }
        }
    }
}
