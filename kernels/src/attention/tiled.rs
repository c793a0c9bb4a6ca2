//! The attention definition (see the parent module) over tiles: the scores of up to 24 (row,
//! head) pairs share each loaded key vector, and the weighted V sums of up to 6 pairs share
//! each loaded value row. Written once over [`V16`] and compiled per level.

#![allow(clippy::needless_range_loop)] // register tiles read clearest with explicit indices

use super::{AttnRows, AttnShape, KvSlice};
use crate::dispatch::SimdLevel;
use crate::simd::{Scalar16, V16, exp};

/// Positions per block this kernel takes (one vector of keys per dimension).
pub(super) const LANES: usize = 16;

/// A storage element type of the KV planes.
trait Elem: Copy {
    /// 8-bit values carry a scale per position and KV head.
    const SCALED: bool;
    unsafe fn load<V: V16>(p: *const Self) -> V;
}
impl Elem for f32 {
    const SCALED: bool = false;
    #[inline(always)]
    unsafe fn load<V: V16>(p: *const f32) -> V {
        unsafe { V::load(p) }
    }
}
/// f16 bits.
impl Elem for u16 {
    const SCALED: bool = false;
    #[inline(always)]
    unsafe fn load<V: V16>(p: *const u16) -> V {
        unsafe { V::load_f16(p) }
    }
}
impl Elem for i8 {
    const SCALED: bool = true;
    #[inline(always)]
    unsafe fn load<V: V16>(p: *const i8) -> V {
        unsafe { V::load_i8(p) }
    }
}

/// Every block's planes as raw pointers of one element type.
struct Planes<T> {
    k: Vec<*const T>,
    v: Vec<*const T>,
    ks: Vec<*const f32>,
    vs: Vec<*const f32>,
    shape: AttnShape,
}

impl<T: Elem> Planes<T> {
    /// Dimension `d` of the 16 keys of block `b`, KV head `h`.
    #[inline(always)]
    unsafe fn key<V: V16>(&self, b: usize, h: usize, d: usize) -> V {
        // SAFETY: b < blocks and (h, d) inside the plane (checked by the caller's `check`).
        unsafe {
            let k = T::load::<V>(self.k[b].add(self.shape.k_index(0, h, d)));
            if T::SCALED {
                V::mul(k, V::load(self.ks[b].add(self.shape.k_scale_index(0, h))))
            } else {
                k
            }
        }
    }

    /// Values `16·c .. 16·c + 16` of position `p` of block `b`, KV head `h`.
    #[inline(always)]
    unsafe fn value<V: V16>(&self, b: usize, p: usize, h: usize, c: usize) -> V {
        // SAFETY: as above.
        unsafe {
            let v = T::load::<V>(self.v[b].add(self.shape.v_index(p, h, c * LANES)));
            if T::SCALED {
                V::mul(v, V::splat(*self.vs[b].add(self.shape.v_scale_index(p, h))))
            } else {
                v
            }
        }
    }
}

/// The tile being computed: row-head `j` is row `j / nh`, head `heads.start + j % nh`.
struct Tile<'a> {
    shape: AttnShape,
    h0: usize,
    nh: usize,
    kvh: usize,
    x: AttnRows<'a>,
    /// Scores, then exponentials: `[row-head][stride]`.
    s: Vec<f32>,
    stride: usize,
    inv: Vec<f32>,
}

impl Tile<'_> {
    #[inline(always)]
    fn ctx(&self, j: usize) -> usize {
        self.x.first_ctx + j / self.nh
    }
    #[inline(always)]
    fn q(&self, j: usize) -> *const f32 {
        let (r, hi) = (j / self.nh, j % self.nh);
        self.x.q[(r * self.shape.n_heads + self.h0 + hi) * self.shape.head_dim..].as_ptr()
    }
}

pub(super) fn attend(
    lvl: SimdLevel,
    shape: AttnShape,
    heads: std::ops::Range<usize>,
    x: AttnRows<'_>,
    out: &mut [f32],
) {
    let nh = heads.len();
    let last = x.first_ctx + x.rows - 1;
    let stride = last.next_multiple_of(LANES);
    let mut t = Tile {
        shape,
        h0: heads.start,
        nh,
        kvh: heads.start / shape.group(),
        x,
        s: vec![0f32; x.rows * nh * stride],
        stride,
        inv: vec![0f32; x.rows * nh],
    };
    let planes = |f: &dyn Fn(&KvSlice<'_>) -> (*const u8, *const f32)| {
        let mut p = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (k, v) in x.blocks {
            let ((kp, ks), (vp, vs)) = (f(k), f(v));
            p.0.push(kp);
            p.1.push(vp);
            p.2.push(ks);
            p.3.push(vs);
        }
        p
    };
    let ptrs = planes(&|s| match s {
        KvSlice::F32(v) => (v.as_ptr() as *const u8, std::ptr::null()),
        KvSlice::F16(v) => (v.as_ptr() as *const u8, std::ptr::null()),
        KvSlice::I8 { q, scale } => (q.as_ptr() as *const u8, scale.as_ptr()),
    });
    fn typed<T>(
        p: &(
            Vec<*const u8>,
            Vec<*const u8>,
            Vec<*const f32>,
            Vec<*const f32>,
        ),
        shape: AttnShape,
    ) -> Planes<T> {
        Planes {
            k: p.0.iter().map(|&q| q as *const T).collect(),
            v: p.1.iter().map(|&q| q as *const T).collect(),
            ks: p.2.clone(),
            vs: p.3.clone(),
            shape,
        }
    }
    macro_rules! go {
        ($t:ty) => {{
            let pl = typed::<$t>(&ptrs, shape);
            // SAFETY: each level runs only on a CPU that has it (dispatch guarantees
            // `lvl <= detect()`); shapes were checked by the caller.
            unsafe {
                match lvl {
                    #[cfg(target_arch = "x86_64")]
                    SimdLevel::Avx512 => run_avx512(&mut t, &pl, out),
                    #[cfg(target_arch = "x86_64")]
                    SimdLevel::Avx2 => run_avx2(&mut t, &pl, out),
                    #[cfg(target_arch = "aarch64")]
                    SimdLevel::Neon | SimdLevel::Dotprod | SimdLevel::I8mm => {
                        run::<crate::simd::Neon16, $t, 6, 2, 2>(&mut t, &pl, out)
                    }
                    _ => run::<Scalar16, $t, 24, 6, 4>(&mut t, &pl, out),
                }
            }
        }};
    }
    match x.blocks[0].0 {
        KvSlice::F32(_) => go!(f32),
        KvSlice::F16(_) => go!(u16),
        KvSlice::I8 { .. } => go!(i8),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
unsafe fn run_avx512<T: Elem>(t: &mut Tile<'_>, pl: &Planes<T>, out: &mut [f32]) {
    assert!(SimdLevel::detect() >= SimdLevel::Avx512);
    unsafe { run::<crate::simd::Avx512, T, 24, 6, 4>(t, pl, out) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run_avx2<T: Elem>(t: &mut Tile<'_>, pl: &Planes<T>, out: &mut [f32]) {
    assert!(SimdLevel::detect() >= SimdLevel::Avx2);
    unsafe { run::<crate::simd::Avx2x2, T, 6, 2, 2>(t, pl, out) }
}

/// The whole tile: scores in chunks of up to `SRH` row-heads, softmax, weighted sums in
/// chunks of `PRH` row-heads × `DV` vectors of dimensions.
#[inline(always)]
unsafe fn run<V: V16, T: Elem, const SRH: usize, const PRH: usize, const DV: usize>(
    t: &mut Tile<'_>,
    pl: &Planes<T>,
    out: &mut [f32],
) {
    let total = t.x.rows * t.nh;
    // SAFETY (all calls): chunks stay inside 0..total; see each function.
    unsafe {
        let mut j = 0;
        while j < total {
            let left = (total - j).min(SRH);
            j += match left {
                24.. => scores::<V, T, 24>(t, pl, j),
                12.. => scores::<V, T, 12>(t, pl, j),
                6.. => scores::<V, T, 6>(t, pl, j),
                3.. => scores::<V, T, 3>(t, pl, j),
                _ => scores::<V, T, 1>(t, pl, j),
            };
        }
        for j in 0..total {
            softmax::<V>(t, j);
        }
        let nv = t.shape.head_dim / LANES;
        let mut j = 0;
        while j < total {
            let n = match (total - j).min(PRH) {
                6.. => 6,
                3..=5 => 3,
                2 => 2,
                _ => 1,
            };
            let mut c = 0;
            while c < nv {
                c += if c + DV <= nv {
                    weighted_n::<V, T, DV>(t, pl, j, n, c, out)
                } else {
                    weighted_n::<V, T, 1>(t, pl, j, n, c, out)
                };
            }
            j += n;
        }
    }
}

/// Scores of row-heads `j0 .. j0 + N` over every block the last of them sees; returns `N`.
#[inline(always)]
unsafe fn scores<V: V16, T: Elem, const N: usize>(
    t: &mut Tile<'_>,
    pl: &Planes<T>,
    j0: usize,
) -> usize {
    let hd = t.shape.head_dim;
    let scale = 1.0 / (hd as f32).sqrt();
    let nb = t.ctx(j0 + N - 1).div_ceil(LANES);
    let qp: [*const f32; N] = std::array::from_fn(|j| t.q(j0 + j));
    let sp = t.s.as_mut_ptr();
    // SAFETY: q rows hold hd values; score rows hold stride ≥ nb·16 values.
    unsafe {
        for b in 0..nb {
            let mut acc = [V::zero(); N];
            for d in 0..hd {
                let k = pl.key::<V>(b, t.kvh, d);
                for j in 0..N {
                    acc[j] = V::fma(V::splat(*qp[j].add(d)), k, acc[j]);
                }
            }
            for (j, a) in acc.iter().enumerate() {
                V::mul(*a, V::splat(scale)).store(sp.add((j0 + j) * t.stride + b * LANES));
            }
        }
    }
    N
}

/// Row-head `j`'s scores become exponentials; its `1/z` goes to `t.inv[j]`.
#[inline(always)]
unsafe fn softmax<V: V16>(t: &mut Tile<'_>, j: usize) {
    let n = t.ctx(j);
    let row = t.s[j * t.stride..].as_mut_ptr();
    // SAFETY: the row holds stride ≥ n (rounded up to 16) values.
    unsafe {
        let mut mx = V::splat(f32::NEG_INFINITY);
        for c in (0..n).step_by(LANES) {
            mx = V::max(mx, V::load(row.add(c)).first(n - c, f32::NEG_INFINITY));
        }
        let m = V::splat(mx.reduce_max());
        let mut lanes = V::zero();
        for c in (0..n).step_by(LANES) {
            let e = exp(V::sub(V::load(row.add(c)), m)).first(n - c, 0.0);
            e.store(row.add(c));
            lanes = V::add(lanes, e);
        }
        t.inv[j] = 1.0 / crate::dot::reduce16(&lanes.to_array());
    }
}

/// [`weighted`] for `n` ∈ {1, 2, 3, 6} row-heads.
#[inline(always)]
unsafe fn weighted_n<V: V16, T: Elem, const D: usize>(
    t: &Tile<'_>,
    pl: &Planes<T>,
    j0: usize,
    n: usize,
    c: usize,
    out: &mut [f32],
) -> usize {
    // SAFETY: forwarded.
    unsafe {
        match n {
            6 => weighted::<V, T, 6, D>(t, pl, j0, c, out),
            3 => weighted::<V, T, 3, D>(t, pl, j0, c, out),
            2 => weighted::<V, T, 2, D>(t, pl, j0, c, out),
            _ => weighted::<V, T, 1, D>(t, pl, j0, c, out),
        }
    }
}

/// Dimensions `16·c .. 16·(c + D)` of the weighted V sums of row-heads `j0 .. j0 + N`;
/// returns `D`.
#[inline(always)]
unsafe fn weighted<V: V16, T: Elem, const N: usize, const D: usize>(
    t: &Tile<'_>,
    pl: &Planes<T>,
    j0: usize,
    c: usize,
    out: &mut [f32],
) -> usize {
    let hd = t.shape.head_dim;
    // SAFETY: the level's features are present (the caller's contract).
    let mut acc = [[unsafe { V::zero() }; D]; N];
    let ep: [*const f32; N] = std::array::from_fn(|j| t.s[(j0 + j) * t.stride..].as_ptr());
    let step = |acc: &mut [V; D], e: f32, p: usize| {
        let (b, pp) = (p / LANES, p % LANES);
        // SAFETY: p < this row-head's context ≤ blocks · 16.
        unsafe {
            let e = V::splat(e);
            for (dv, a) in acc.iter_mut().enumerate() {
                *a = V::fma(e, pl.value::<V>(b, pp, t.kvh, c + dv), *a);
            }
        }
    };
    // SAFETY: exponential rows hold each row-head's context; out rows hold hd values.
    unsafe {
        // Positions every row-head of the chunk sees, all together; then each one's own tail.
        let common = t.ctx(j0);
        for p in 0..common {
            let (b, pp) = (p / LANES, p % LANES);
            let vv: [V; D] = std::array::from_fn(|dv| pl.value::<V>(b, pp, t.kvh, c + dv));
            for j in 0..N {
                let e = V::splat(*ep[j].add(p));
                for dv in 0..D {
                    acc[j][dv] = V::fma(e, vv[dv], acc[j][dv]);
                }
            }
        }
        for j in 0..N {
            for p in common..t.ctx(j0 + j) {
                step(&mut acc[j], *ep[j].add(p), p);
            }
        }
        for j in 0..N {
            let inv = V::splat(t.inv[j0 + j]);
            for dv in 0..D {
                V::mul(acc[j][dv], inv)
                    .store(out.as_mut_ptr().add((j0 + j) * hd + (c + dv) * LANES));
            }
        }
    }
    D
}
