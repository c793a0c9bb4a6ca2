use super::*;
use crate::quant::{quantize_q4_0, quantize_q4_1, quantize_q8_0};
use crate::test_data as fill;
use proptest::prelude::*;

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

type Deq = fn(&[u8], &mut [f32]);

fn formats(wf: &[f32]) -> [(QFormat, Vec<u8>, Deq); 3] {
    [
        (
            QFormat::Q4_0,
            quantize_q4_0(wf),
            crate::quant::dequantize_q4_0 as Deq,
        ),
        (
            QFormat::Q4_1,
            quantize_q4_1(wf),
            crate::quant::dequantize_q4_1,
        ),
        (
            QFormat::Q8_0,
            quantize_q8_0(wf),
            crate::quant::dequantize_q8_0,
        ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]
    #[test]
    fn levels_agree_bitwise_and_track_f64(
        m in prop::sample::select(vec![1usize, 2, 3, 4, 5, 7, 15, 16, 17]),
        kb in prop::sample::select(vec![1usize, 2, 3, 18, 48]),
        n in prop::sample::select(vec![1usize, 15, 16, 17, 33, 64, 65]),
        seed in any::<u64>(),
    ) {
        let k = kb * QK;
        let x = fill(m * k, seed);
        let wf = fill(n * k, seed ^ 77);
        let acts = QActs::quantize(&x, m, k);
        for (format, bytes, deq) in formats(&wf) {
            let w = QWeights::pack(format, &bytes, n, k);
            let mut wd = vec![0f32; n * k];
            deq(&bytes, &mut wd);
            let mut want = vec![f32::NAN; m * n];
            qmatmul_scalar(&acts, &w, &mut want);
            for lvl in SimdLevel::available() {
                let mut y = vec![f32::NAN; m * n];
                qmatmul_at(lvl, &acts, &w, &mut y);
                prop_assert_eq!(bits(&y), bits(&want), "{:?} {:?}", format, lvl);
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
                    prop_assert!((want[i * n + j] as f64 - exact).abs() <= bound, "{:?} ({i},{j})", format);
                }
            }
            // Batch invariance: each row alone gives the same bits.
            for i in [0, m / 2, m - 1] {
                let one = QActs::quantize(&x[i * k..(i + 1) * k], 1, k);
                let mut y1 = vec![0f32; n];
                qmatmul(&one, &w, &mut y1);
                prop_assert_eq!(bits(&y1), bits(&want[i * n..(i + 1) * n]));
            }
        }
    }
}

#[test]
fn packing_keeps_every_stored_byte() {
    let (n, k) = (21, 96);
    let wf = fill(n * k, 5);
    for (format, bytes, deq) in formats(&wf) {
        let w = QWeights::pack(format, &bytes, n, k);
        let row = k / QK * format.block_bytes();
        let mut a = vec![0f32; k];
        let mut b = vec![0f32; k];
        for j in 0..n {
            assert_eq!(
                w.gguf_row(j),
                &bytes[j * row..(j + 1) * row],
                "{format:?} row {j}"
            );
            w.row_into(j, &mut a);
            deq(&bytes[j * row..(j + 1) * row], &mut b);
            assert_eq!(bits(&a), bits(&b));
        }
    }
}

#[test]
fn extreme_activations_and_weights_stay_exact() {
    // Full-scale activations against every weight at its extreme: the widest integer sums.
    let (m, n, k) = (5, 17, 1536);
    let x: Vec<f32> = (0..m * k)
        .map(|t| if t % 3 == 0 { -1.0 } else { 1.0 })
        .collect();
    let wf: Vec<f32> = (0..n * k)
        .map(|t| if t % 5 < 2 { -1.0 } else { 1.0 })
        .collect();
    let acts = QActs::quantize(&x, m, k);
    for (format, bytes, _) in formats(&wf) {
        let w = QWeights::pack(format, &bytes, n, k);
        let mut want = vec![0f32; m * n];
        qmatmul_scalar(&acts, &w, &mut want);
        for lvl in SimdLevel::available() {
            let mut y = vec![0f32; m * n];
            qmatmul_at(lvl, &acts, &w, &mut y);
            assert_eq!(bits(&y), bits(&want), "{format:?} {lvl:?}");
        }
    }
}

/// 64-byte-aligned bytes, as a mapped bundle file is (its pages are).
struct AlignedBytes(Vec<crate::panel::Line>, usize);
impl AsRef<[u8]> for AlignedBytes {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: Lines are plain bytes.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr() as *const u8, self.1) }
    }
}

/// `bytes` copied at `offset` into an aligned buffer.
pub(crate) fn shared_at(bytes: &[u8], offset: usize) -> crate::panel::SharedBytes {
    let len = offset + bytes.len();
    let mut lines = vec![crate::panel::Line([0; 64]); len.div_ceil(64)];
    // SAFETY: the buffer holds `len` bytes.
    let dst = unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut u8, len) };
    dst[offset..].copy_from_slice(bytes);
    std::sync::Arc::new(AlignedBytes(lines, len))
}

#[test]
fn packed_weights_used_in_place_compute_the_same_bits() {
    let (m, n, k) = (3, 37, 4 * QK);
    let x = fill(m * k, 5);
    let acts = QActs::quantize(&x, m, k);
    for (format, bytes, _) in formats(&fill(n * k, 9)) {
        let w = QWeights::pack(format, &bytes, n, k);
        let shared = shared_at(w.packed_bytes(), 128);
        let mapped = QWeights::from_packed(format, n, k, shared.clone(), 128).unwrap();
        for lvl in SimdLevel::available() {
            let (mut a, mut b) = (vec![0f32; m * n], vec![1f32; m * n]);
            qmatmul_at(lvl, &acts, &w, &mut a);
            qmatmul_at(lvl, &acts, &mapped, &mut b);
            assert_eq!(bits(&a), bits(&b), "{format:?} {lvl:?}");
        }
        // Misaligned, short, or the wrong shape: refused.
        assert!(QWeights::from_packed(format, n, k, shared_at(w.packed_bytes(), 8), 8).is_none());
        assert!(QWeights::from_packed(format, n + 16, k, shared.clone(), 128).is_none());
        assert!(QWeights::from_packed(format, n, k + 1, shared, 128).is_none());
    }
}
