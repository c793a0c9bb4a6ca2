//! The AVX2 kernel (no VNNI): half a panel line (8 channels × 4 inputs) per register. Q4
//! nibbles multiply activations directly with `maddubs` (pair sums ≤ 2·15·127); Q8_0 bytes are
//! made signed again and multiplied as `|w|·(a·sign w)`.

#![allow(clippy::needless_range_loop)] // register tiles read clearest with explicit indices

use super::{QActs, QFormat, QK, QWeights};
use crate::panel::{Out, PANEL};
use std::arch::x86_64::*;

/// Channels per register.
const HALF: usize = PANEL / 2;

/// Panels `p0..p1` (their output columns), all rows.
///
/// # Safety
/// AVX2, FMA and F16C must be present; `p1 ≤ w.panels()`; no other thread writes these
/// columns of `out`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn panels(x: &QActs, w: &QWeights, p0: usize, p1: usize, out: Out) {
    // SAFETY (every tile call): rows and half-panels are in range.
    unsafe {
        for h in (2 * p0..2 * p1).step_by(2) {
            let mut i = 0;
            while i + 2 <= x.m {
                tile::<2>(x, w, i, h, out);
                i += 2;
            }
            if i < x.m {
                tile::<1>(x, w, i, h, out);
            }
        }
    }
}

/// Rows `i..i+R` × half-panels `h, h+1` (one panel).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile<const R: usize>(x: &QActs, w: &QWeights, i: usize, h: usize, out: Out) {
    const C: usize = 2;
    let (nb, f) = (w.blocks(), w.format);
    let qp = x.q.as_ptr();
    let (ones, nib, offset) = (
        _mm256_set1_epi16(1),
        _mm256_set1_epi8(0x0f),
        _mm256_set1_epi8(0x80u8 as i8),
    );
    let p = h / 2;
    let mut facc = [[_mm256_setzero_ps(); C]; R];
    // SAFETY: as in the AVX-512 kernel: rows, lines and scales in bounds.
    unsafe {
        for b in 0..nb {
            let mut acc = [[_mm256_setzero_si256(); C]; R];
            if f == QFormat::Q4_0 {
                for r in 0..R {
                    acc[r] = [_mm256_set1_epi32(-8 * *x.sum.get_unchecked((i + r) * nb + b)); C];
                }
            }
            let act = |r: usize, quad: usize| {
                _mm256_set1_epi32(
                    (qp.add(((i + r) * nb + b) * QK + quad * 4) as *const i32).read_unaligned(),
                )
            };
            let lp = w.lines_at(p, b);
            let mut mac = |r: usize, c: usize, wu: __m256i, a: __m256i| {
                let prod = _mm256_madd_epi16(_mm256_maddubs_epi16(wu, a), ones);
                acc[r][c] = _mm256_add_epi32(acc[r][c], prod);
            };
            if f == QFormat::Q8_0 {
                for t in 0..8 {
                    for c in 0..C {
                        let raw = _mm256_load_si256(lp.add(t * 64 + c * 32) as *const __m256i);
                        let wv = _mm256_xor_si256(raw, offset);
                        let wa = _mm256_abs_epi8(wv);
                        for r in 0..R {
                            mac(r, c, wa, _mm256_sign_epi8(act(r, t), wv));
                        }
                    }
                }
            } else {
                for q in 0..4 {
                    for c in 0..C {
                        let raw = _mm256_load_si256(lp.add(q * 64 + c * 32) as *const __m256i);
                        let lo = _mm256_and_si256(raw, nib);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), nib);
                        for r in 0..R {
                            mac(r, c, lo, act(r, q));
                            mac(r, c, hi, act(r, q + 4));
                        }
                    }
                }
            }
            let sp = w.scales_at(p, b);
            for c in 0..C {
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(sp.add(c * HALF) as *const __m128i));
                for r in 0..R {
                    let s = _mm256_mul_ps(dw, _mm256_set1_ps(*x.d.get_unchecked((i + r) * nb + b)));
                    facc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][c]), s, facc[r][c]);
                }
                if f == QFormat::Q4_1 {
                    let mw = _mm256_cvtph_ps(_mm_loadu_si128(
                        sp.add(PANEL + c * HALF) as *const __m128i
                    ));
                    for r in 0..R {
                        let sa = _mm256_set1_ps(*x.s.get_unchecked((i + r) * nb + b));
                        facc[r][c] = _mm256_fmadd_ps(mw, sa, facc[r][c]);
                    }
                }
            }
        }
        for c in 0..C {
            let col = (h + c) * HALF;
            if col >= out.n {
                continue;
            }
            let left = (out.n - col).min(HALF);
            for r in 0..R {
                let mut v = [0f32; HALF];
                _mm256_storeu_ps(v.as_mut_ptr(), facc[r][c]);
                std::ptr::copy_nonoverlapping(v.as_ptr(), out.ptr.add((i + r) * out.n + col), left);
            }
        }
    }
}
