use super::*;
use crate::test_data as fill;
use proptest::prelude::*;

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn levels_equal_the_scalar_reference_bitwise(
        m in prop::sample::select(vec![1usize, 2, 3, 4, 5, 6, 7, 13, 15, 16, 17, 63, 64, 65]),
        k in prop::sample::select(vec![1usize, 3, 4, 5, 15, 16, 17, 31, 32, 33, 63, 64, 65, 96, 128, 160, 576, 577, 1536]),
        n in prop::sample::select(vec![1usize, 2, 3, 15, 16, 17, 31, 32, 33, 48, 65, 129]),
        group in prop::sample::select(vec![4usize, 32, GROUP, 128, 4096]),
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
    // Every product at ±127·±127: the widest integer sums and 16-bit pair sums there are.
    for k in [4usize, 64, 256, 1536] {
        for (av, wv) in [(1.0f32, 1.0f32), (-1.0, 1.0), (1.0, -1.0), (-1.0, -1.0)] {
            let a = I8Acts::quantize(&vec![av; 7 * k], 7, k);
            let w = I8Weights::quantize(&vec![wv; 17 * k], 17, k);
            let mut want = vec![0f32; 7 * 17];
            gemm_scalar(&a, &w, &mut want);
            for lvl in SimdLevel::available() {
                let mut y = vec![0f32; 7 * 17];
                gemm_at(lvl, &a, &w, &mut y);
                assert_eq!(bits(&y), bits(&want), "{lvl:?} k={k}");
            }
            assert!(
                want.iter()
                    .all(|v| (v - av * wv * k as f32).abs() < 1e-2 * k as f32)
            );
        }
    }
}

#[test]
fn rows_round_trip_through_the_packed_layout() {
    let (n, k) = (19, 37);
    let wf = fill(n * k, 11);
    let w = I8Weights::quantize(&wf, n, k);
    let mut q = vec![0i8; k];
    let mut f = vec![0f32; k];
    for j in 0..n {
        let mut want = vec![0i8; k];
        let s = crate::actq::quantize_scalar(&wf[j * k..(j + 1) * k], &mut want).0;
        w.row_q(j, &mut q);
        assert_eq!(q, want);
        w.row_into(j, &mut f);
        assert!(f.iter().zip(&want).all(|(a, &b)| *a == b as f32 * s));
    }
}

#[test]
fn packed_weights_used_in_place_compute_the_same_bits() {
    let (m, n, k) = (2, 21, 70);
    let w = I8Weights::quantize(&crate::test_data(n * k, 3), n, k);
    let x = I8Acts::quantize(&crate::test_data(m * k, 4), m, k);
    let shared = crate::qmatmul::tests::shared_at(w.packed_bytes(), 64);
    let mapped = I8Weights::from_packed(n, k, w.scale().to_vec(), shared.clone(), 64).unwrap();
    for lvl in SimdLevel::available() {
        let (mut a, mut b) = (vec![0f32; m * n], vec![1f32; m * n]);
        gemm_at(lvl, &x, &w, &mut a);
        gemm_at(lvl, &x, &mapped, &mut b);
        assert_eq!(
            a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }
    assert!(I8Weights::from_packed(n, k, vec![1.0; 3], shared.clone(), 64).is_none());
    assert!(I8Weights::from_packed(n, k + 8, w.scale().to_vec(), shared, 64).is_none());
}
