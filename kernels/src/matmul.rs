//! `y = x · Wᵀ` for row-major `x: [m × k]`, `W: [n × k]` (GGUF's layout: each output channel's
//! weights are contiguous), `y: [m × n]`.
//!
//! Work is split over output channels on the compute pool; each `y[i][j]` is one [`dot`] call
//! (or its bit-identical four-row tile), so results never depend on `m`, on the tiling, or on
//! the number of threads.
//!
//! [`dot`]: crate::dot::dot

use crate::dispatch::{SimdLevel, level};
use crate::dot::{dot_at, dot4_at};

/// Output channels per parallel task.
const N_CHUNK: usize = 32;
/// Rows of `x` kept hot while a chunk of `W` streams past.
const M_BLOCK: usize = 64;

/// `y[i*n + j] = Σ_k x[i*k + t]·w[j*k + t]` at the process's level.
pub fn matmul(x: &[f32], w: &[f32], y: &mut [f32], m: usize, k: usize, n: usize) {
    matmul_at(level(), x, w, y, m, k, n)
}

struct SharedOut(*mut f32);
// SAFETY: tasks write disjoint columns of `y` (see `matmul_at`).
unsafe impl Sync for SharedOut {}
unsafe impl Send for SharedOut {}

/// [`matmul`] at an explicit level.
pub fn matmul_at(
    lvl: SimdLevel,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
) {
    assert_eq!(x.len(), m * k, "x shape");
    assert_eq!(w.len(), n * k, "w shape");
    assert_eq!(y.len(), m * n, "y shape");
    let out = SharedOut(y.as_mut_ptr());
    let out = &out;
    crate::for_each_chunk(n.div_ceil(N_CHUNK), m * n * k, |chunk| {
        let j0 = chunk * N_CHUNK;
        let j1 = (j0 + N_CHUNK).min(n);
        for i0 in (0..m).step_by(M_BLOCK) {
            let i1 = (i0 + M_BLOCK).min(m);
            for j in j0..j1 {
                let wr = &w[j * k..(j + 1) * k];
                let mut i = i0;
                while i + 4 <= i1 {
                    let r = dot4_at(
                        lvl,
                        wr,
                        [0, 1, 2, 3].map(|d| &x[(i + d) * k..(i + d + 1) * k]),
                    );
                    for (d, v) in r.into_iter().enumerate() {
                        // SAFETY: (i+d, j) is in bounds and column j belongs to this task only.
                        unsafe { *out.0.add((i + d) * n + j) = v };
                    }
                    i += 4;
                }
                while i < i1 {
                    let v = dot_at(lvl, wr, &x[i * k..(i + 1) * k]);
                    // SAFETY: as above.
                    unsafe { *out.0.add(i * n + j) = v };
                    i += 1;
                }
            }
        }
    });
}

/// The naive triple loop (f64 accumulation) that tests compare against.
#[cfg(test)]
fn matmul_reference(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut y = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            y[i * n + j] = (0..k)
                .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                .sum();
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use crate::test_data as fill;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn matches_reference_and_is_batch_invariant(
            m in prop::sample::select(vec![1usize, 2, 3, 4, 5, 15, 16, 17, 65]),
            k in prop::sample::select(vec![1usize, 15, 16, 17, 63, 64, 65, 96]),
            n in prop::sample::select(vec![1usize, 7, 31, 32, 33, 100]),
            seed in any::<u64>(),
        ) {
            let x = fill(m * k, seed);
            let w = fill(n * k, seed ^ 0xdead_beef);
            let want = matmul_reference(&x, &w, m, k, n);
            for lvl in SimdLevel::available() {
                let mut y = vec![f32::NAN; m * n];
                matmul_at(lvl, &x, &w, &mut y, m, k, n);
                for idx in 0..m * n {
                    prop_assert!((y[idx] as f64 - want[idx]).abs() <= 1e-5 * k as f64, "{lvl:?} at {idx}");
                }
                // Each row alone gives the same bits as inside the batch.
                for i in 0..m {
                    let mut yi = vec![0f32; n];
                    matmul_at(lvl, &x[i * k..(i + 1) * k], &w, &mut yi, 1, k, n);
                    for j in 0..n {
                        prop_assert_eq!(yi[j].to_bits(), y[i * n + j].to_bits());
                    }
                }
            }
        }
    }
}
