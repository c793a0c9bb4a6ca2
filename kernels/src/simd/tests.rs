use super::*;
use crate::dispatch::SimdLevel;

fn exp_at(lvl: SimdLevel, xs: &[f32; 16]) -> [f32; 16] {
    // SAFETY: each level runs only when the CPU has it.
    unsafe {
        match lvl {
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 => exp512(xs),
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 => exp256(xs),
            #[cfg(target_arch = "aarch64")]
            SimdLevel::Neon | SimdLevel::Dotprod | SimdLevel::I8mm => {
                exp(Neon16::load(xs.as_ptr())).to_array()
            }
            _ => exp(Scalar16::load(xs.as_ptr())).to_array(),
        }
    }
}
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn exp512(xs: &[f32; 16]) -> [f32; 16] {
    unsafe { exp(Avx512::load(xs.as_ptr())).to_array() }
}
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn exp256(xs: &[f32; 16]) -> [f32; 16] {
    unsafe { exp(Avx2x2::load(xs.as_ptr())).to_array() }
}

#[test]
fn exp_is_accurate_and_the_same_at_every_level() {
    let mut xs: Vec<f32> = (0..200_000).map(|i| -(i as f32) * 4.4e-4).collect();
    xs.extend([
        0.0,
        -0.0,
        -1e-30,
        -87.0,
        -86.99,
        -100.0,
        -0.346_573_6,
        -std::f32::consts::LN_2,
    ]);
    while !xs.len().is_multiple_of(16) {
        xs.push(-1.0);
    }
    for c in xs.chunks_exact(16) {
        let c: [f32; 16] = c.try_into().unwrap();
        let want = exp_at(SimdLevel::Scalar, &c);
        for (x, y) in c.iter().zip(&want) {
            let e = (x.max(-87.0) as f64).exp();
            assert!(
                ((*y as f64 - e) / e).abs() < 2.5e-7,
                "exp({x}) = {y}, want {e}"
            );
        }
        for lvl in SimdLevel::available() {
            let got = exp_at(lvl, &c);
            assert_eq!(got.map(f32::to_bits), want.map(f32::to_bits), "{lvl:?}");
        }
    }
}

/// Every operation of a level on one set of inputs, as bits (f16 and i8 loads included).
#[inline(always)]
unsafe fn ops<V: V16>(a: &[f32; 16], b: &[f32; 16], h: &[u16; 16], q: &[i8; 16]) -> Vec<[u32; 16]> {
    // SAFETY: every array holds 16 elements; the caller runs this at a level the CPU has.
    unsafe {
        let (x, y) = (V::load(a.as_ptr()), V::load(b.as_ptr()));
        let n = V::load(
            [
                -3f32, 0., 5., -126., 127., 1., -1., 2., 0., 3., -2., 7., -7., 4., 9., -9.,
            ]
            .as_ptr(),
        );
        [
            V::add(x, y),
            V::sub(x, y),
            V::mul(x, y),
            V::div(x, y),
            V::fma(x, y, V::splat(0.375)),
            V::max(x, y),
            V::min(x, y),
            V::select_neg(x, y, V::splat(2.0)),
            x.first(5, -1.5),
            x.first(16, 0.0),
            V::splat(1.25).ldexp(n),
            V::load_f16(h.as_ptr()),
            V::load_i8(q.as_ptr()),
            V::splat(V::reduce_max(x)),
            V::zero(),
        ]
        .map(|v| v.to_array().map(f32::to_bits))
        .to_vec()
    }
}
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn ops512(a: &[f32; 16], b: &[f32; 16], h: &[u16; 16], q: &[i8; 16]) -> Vec<[u32; 16]> {
    unsafe { ops::<Avx512>(a, b, h, q) }
}
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ops256(a: &[f32; 16], b: &[f32; 16], h: &[u16; 16], q: &[i8; 16]) -> Vec<[u32; 16]> {
    unsafe { ops::<Avx2x2>(a, b, h, q) }
}

#[test]
fn every_operation_gives_the_scalar_bits_at_every_level() {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    for round in 0..2000 {
        let mut a: [f32; 16] = std::array::from_fn(|_| (next() >> 40) as f32 / 65536.0 - 128.0);
        let mut b: [f32; 16] = std::array::from_fn(|_| (next() >> 40) as f32 / 65536.0 - 128.0);
        if round % 3 == 0 {
            // Ties the operand order decides: ±0 against ±0, equal values.
            (a[0], b[0], a[1], b[1], a[2], b[2]) = (0.0, -0.0, -0.0, 0.0, 1.5, 1.5);
        }
        b.iter_mut().filter(|v| **v == 0.0).for_each(|v| *v = 0.5);
        b[0] = if round % 3 == 0 { -0.0 } else { b[0] };
        // Every f16: normals, subnormals, zeros (not NaN/inf: kernels never load them).
        let h: [u16; 16] = std::array::from_fn(|_| {
            let v = next() as u16;
            if v & 0x7c00 == 0x7c00 { v & 0x83ff } else { v }
        });
        let q: [i8; 16] = std::array::from_fn(|_| next() as i8);
        // SAFETY: each level runs only when the CPU has it.
        let want = unsafe { ops::<Scalar16>(&a, &b, &h, &q) };
        for lvl in SimdLevel::available() {
            let got = unsafe {
                match lvl {
                    #[cfg(target_arch = "x86_64")]
                    SimdLevel::Avx512 => ops512(&a, &b, &h, &q),
                    #[cfg(target_arch = "x86_64")]
                    SimdLevel::Avx2 => ops256(&a, &b, &h, &q),
                    #[cfg(target_arch = "aarch64")]
                    SimdLevel::Neon | SimdLevel::Dotprod | SimdLevel::I8mm => {
                        ops::<Neon16>(&a, &b, &h, &q)
                    }
                    _ => ops::<Scalar16>(&a, &b, &h, &q),
                }
            };
            for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g, w, "{lvl:?}: operation {k} on {a:?}, {b:?}");
            }
        }
    }
}
