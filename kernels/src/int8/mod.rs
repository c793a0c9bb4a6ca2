//! W8A8 matmul: weights requantized at load to 8 bits per output channel (one f32 scale per
//! channel), activations quantized per token to 8 bits with one f32 scale per group of
//! [`GROUP`] inputs (one scale per whole token costs SmolLM2 +5% perplexity: a few outlier
//! channels flatten the rest).
//!
//! # Arithmetic, identical at every level
//! For output `(i, j)` and each activation group `g` in order, the integer sum
//! `isum_g = Σ_{t ∈ g} a[i][t]·w[j][t]` is exact; it is folded as
//! `acc = fma(isum_g as f32, sa[i][g], acc)`, and `y[i][j] = acc · sw[j]`. Integer sums are
//! exact in any order, so every level (any vector width, any split of the work) gives the
//! scalar reference's bits, and a row never depends on the rows it shares a call with.
//!
//! # Layout: channels across lanes
//! Weights live in panels of [`PANEL`] = 16 output channels. Within a panel, each quad of
//! inputs `t..t+4` is one 64-byte line holding channel `c`'s four weights at bytes `4c..4c+4`.
//! One line is exactly the operand of AVX-512 VNNI's `vpdpbusd` against four activation bytes
//! broadcast to every lane: each of the 16 lanes accumulates one output channel's exact sum,
//! so no horizontal reduction is ever needed, and a panel is one sequential stream for decode.
//! `vpdpbusd` multiplies unsigned by signed bytes, so weights are stored offset-binary
//! (`w + 128` as a byte) and activations stay signed; the `128·Σa` the offset adds is taken
//! off up front ([`I8Acts::corr`], exact, computed when the activations are quantized).
//! AVX2 (no VNNI) reads the same lines, undoes the offset and forms each product as
//! `|w|·(a·sign w)` with `maddubs`/`madd` (pair sums ≤ 2·127·127, no saturation).
//!
//! # Layout
//! - this file: the types, quantization, the scalar reference and the dispatch;
//! - [`avx512`] / [`avx2`]: the register-tiled x86 kernels; `neon`: AArch64's (`smmla`, `sdot` or
//!   `smull`), reading the same lines with the offset undone.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(test)]
mod tests;

use crate::actq::quantize_group;
use crate::dispatch::{SimdLevel, level};
pub use crate::panel::PANEL;
use crate::panel::{Line, Lines, Out, SharedBytes};

/// Activation inputs per quantization group (a multiple of 4; a row's last group may be shorter).
pub const GROUP: usize = 64;

/// Inputs per 64-byte line of a panel.
const QUAD: usize = 4;

/// Weights `[n × k]` as 8-bit integers with a scale per output channel, packed in panels
/// (see the module docs). Padding channels and inputs hold zero weights.
///
/// The SIMD bodies read the panels unchecked, so only [`quantize`](Self::quantize) sets the
/// shape; safe code cannot make one that reads out of bounds:
///
/// ```compile_fail
/// let mut w = kernels::int8::I8Weights::quantize(&[0.5; 8], 2, 4);
/// w.n = 1 << 20;
/// ```
#[derive(Clone)]
pub struct I8Weights {
    lines: Lines,
    /// Per output channel, padded with zeros to whole panels.
    pub(crate) scale: Vec<f32>,
    pub(crate) n: usize,
    pub(crate) k: usize,
}

impl std::fmt::Debug for I8Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8Weights")
            .field("n", &self.n)
            .field("k", &self.k)
            .finish_non_exhaustive()
    }
}

impl I8Weights {
    /// Per-output-channel symmetric quantization of `w: [n × k]`.
    pub fn quantize(w: &[f32], n: usize, k: usize) -> I8Weights {
        assert_eq!(w.len(), n * k);
        let quads = k.div_ceil(QUAD);
        let panels = n.div_ceil(PANEL);
        let mut lines = vec![Line([0x80; 64]); panels * quads];
        let mut scale = vec![0f32; panels * PANEL];
        let mut row = vec![0i8; k];
        for j in 0..n {
            scale[j] = crate::actq::quantize_scalar(&w[j * k..(j + 1) * k], &mut row).0;
            for (t, &q) in row.iter().enumerate() {
                lines[(j / PANEL) * quads + t / QUAD].0[(j % PANEL) * QUAD + t % QUAD] =
                    (q as u8) ^ 0x80;
            }
        }
        I8Weights {
            lines: Lines::Owned(lines),
            scale,
            n,
            k,
        }
    }

    /// The packed lines as bytes: what [`from_packed`](Self::from_packed) takes back.
    pub fn packed_bytes(&self) -> &[u8] {
        self.lines.as_bytes()
    }

    /// Weights over packed lines that [`packed_bytes`](Self::packed_bytes) wrote, at `offset`
    /// of `bytes` (64-byte aligned in memory), used in place, with their per-channel `scale`
    /// (as [`scale`](Self::scale) gave it). `None` if the shapes do not match.
    pub fn from_packed(
        n: usize,
        k: usize,
        scale: Vec<f32>,
        bytes: SharedBytes,
        offset: usize,
    ) -> Option<I8Weights> {
        let panels = n.div_ceil(PANEL);
        if scale.len() != panels * PANEL {
            return None;
        }
        Some(I8Weights {
            lines: Lines::mapped(bytes, offset, panels.checked_mul(k.div_ceil(QUAD))?)?,
            scale,
            n,
            k,
        })
    }

    /// Output channels.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Inputs per channel.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Per output channel scales (padded with zeros to whole panels).
    pub fn scale(&self) -> &[f32] {
        &self.scale
    }

    /// Quads of inputs (lines per panel).
    pub fn quads(&self) -> usize {
        self.k.div_ceil(QUAD)
    }

    pub fn panels(&self) -> usize {
        self.n.div_ceil(PANEL)
    }

    /// Weight `(j, t)` as a signed integer.
    #[inline]
    fn at(&self, j: usize, t: usize) -> i8 {
        (self.lines[(j / PANEL) * self.quads() + t / QUAD].0[(j % PANEL) * QUAD + t % QUAD] ^ 0x80)
            as i8
    }

    /// Channel `j`'s quantized weights in order.
    pub fn row_q(&self, j: usize, out: &mut [i8]) {
        for (t, o) in out[..self.k].iter_mut().enumerate() {
            *o = self.at(j, t);
        }
    }

    /// Row `j`, dequantized.
    pub fn row_into(&self, j: usize, out: &mut [f32]) {
        let s = self.scale[j];
        for (t, o) in out[..self.k].iter_mut().enumerate() {
            *o = self.at(j, t) as f32 * s;
        }
    }

    pub fn bytes(&self) -> usize {
        self.lines.len() * 64 + self.scale.len() * 4
    }

    /// The first byte of panel `p`'s lines.
    #[inline(always)]
    pub(crate) fn panel_ptr(&self, p: usize) -> *const u8 {
        debug_assert!(p < self.panels());
        // SAFETY: p < panels, so the offset stays inside `lines`.
        unsafe { self.lines.as_ptr().add(p * self.quads()) as *const u8 }
    }
}

/// Activations `[m × k]` quantized per token, one scale per `group` inputs ([`GROUP`] unless a
/// benchmark asks otherwise). Built only by the quantizers (the fields are the crate's):
///
/// ```compile_fail
/// let mut a = kernels::int8::I8Acts::quantize(&[0.5; 8], 2, 4);
/// a.q.clear();
/// ```
#[derive(Debug, Clone, Default)]
pub struct I8Acts {
    /// `[m × stride()]`: each row zero-padded to a whole number of quads.
    pub(crate) q: Vec<i8>,
    /// `[m × groups()]`.
    pub(crate) scale: Vec<f32>,
    /// `[m × groups()]`: `−128 · Σ q` over the group, what the weights' offset adds.
    pub(crate) corr: Vec<i32>,
    pub(crate) m: usize,
    pub(crate) k: usize,
    /// Inputs per scale: a multiple of 4.
    pub(crate) group: usize,
}

// The fields are private to the crate: the SIMD bodies index them unchecked, so only the
// quantizers here may set them (each leaves them consistent; `gemm_at` checks them again).
impl I8Acts {
    /// Rows.
    pub fn m(&self) -> usize {
        self.m
    }

    /// Inputs per row.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Inputs per scale.
    pub fn group(&self) -> usize {
        self.group
    }

    /// Row `i`'s quantized values (without padding).
    pub fn row_q(&self, i: usize) -> &[i8] {
        self.row(i)
    }

    /// Row `i`'s scales, one per group.
    pub fn row_scales(&self, i: usize) -> &[f32] {
        let g = self.groups();
        &self.scale[i * g..(i + 1) * g]
    }

    /// Scales per row.
    pub fn groups(&self) -> usize {
        self.k.div_ceil(self.group)
    }

    /// Bytes between rows of `q`.
    pub fn stride(&self) -> usize {
        self.k.next_multiple_of(QUAD)
    }

    pub fn quantize_into(&mut self, x: &[f32], m: usize, k: usize) {
        self.quantize_grouped_into(x, m, k, GROUP)
    }

    /// Per token, one scale per `group` inputs (a multiple of 4).
    pub fn quantize_grouped_into(&mut self, x: &[f32], m: usize, k: usize, group: usize) {
        assert_eq!(x.len(), m * k);
        assert!(group > 0 && group.is_multiple_of(QUAD));
        (self.m, self.k, self.group) = (m, k, group);
        let (g, stride) = (self.groups(), self.stride());
        self.q.clear();
        self.q.resize(m * stride, 0);
        self.scale.resize(m * g, 0.0);
        self.corr.resize(m * g, 0);
        if k == 0 {
            return;
        }
        let scales = crate::pool::SendPtr(self.scale.as_mut_ptr());
        let corrs = crate::pool::SendPtr(self.corr.as_mut_ptr());
        // Rows in parallel once there are enough of them to pay for it.
        let per_task = if m * k >= 1 << 16 { 16 } else { m };
        crate::pool::for_rows(&mut self.q, stride, per_task, |i, qr| {
            // SAFETY: scale and corr row i (g entries each) belong to the task that owns q row i.
            let (sr, cr) = unsafe {
                (
                    std::slice::from_raw_parts_mut(scales.get().add(i * g), g),
                    std::slice::from_raw_parts_mut(corrs.get().add(i * g), g),
                )
            };
            let r = &x[i * k..(i + 1) * k];
            for (((xg, qg), s), c) in r
                .chunks(group)
                .zip(qr[..k].chunks_mut(group))
                .zip(sr)
                .zip(cr)
            {
                let (sc, sum) = quantize_group(xg, qg);
                (*s, *c) = (sc, -128 * sum);
            }
        });
    }

    /// One scale for the whole matrix (whole rows as one group): the fastest arithmetic, but a
    /// row's values then depend on every other row of the call — not batch-invariant. Exists
    /// only to measure what invariance costs (`tandem kernels roofline`).
    pub fn quantize_per_tensor(x: &[f32], m: usize, k: usize) -> I8Acts {
        let group = k.max(1).next_multiple_of(QUAD);
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let s = amax / 127.0;
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        let stride = k.next_multiple_of(QUAD);
        let mut q = vec![0i8; m * stride];
        let mut corr = vec![0i32; m];
        for i in 0..m {
            for t in 0..k {
                let v = crate::round_half_away((x[i * k + t] * inv).clamp(-127.0, 127.0)) as i8;
                q[i * stride + t] = v;
                corr[i] -= 128 * v as i32;
            }
        }
        I8Acts {
            q,
            scale: vec![s; m],
            corr,
            m,
            k,
            group,
        }
    }

    pub fn quantize_grouped(x: &[f32], m: usize, k: usize, group: usize) -> I8Acts {
        let mut a = I8Acts::default();
        a.quantize_grouped_into(x, m, k, group);
        a
    }

    pub fn quantize(x: &[f32], m: usize, k: usize) -> I8Acts {
        let mut a = I8Acts::default();
        a.quantize_into(x, m, k);
        a
    }

    fn row(&self, i: usize) -> &[i8] {
        &self.q[i * self.stride()..i * self.stride() + self.k]
    }
}

/// One output, the scalar definition every level must equal bit for bit.
pub fn dot_scalar(a: &[i8], sa: &[f32], group: usize, w: &[i8], sw: f32) -> f32 {
    let mut acc = 0f32;
    for ((ag, wg), s) in a.chunks(group).zip(w.chunks(group)).zip(sa) {
        let isum: i32 = ag.iter().zip(wg).map(|(&x, &y)| x as i32 * y as i32).sum();
        acc = (isum as f32).mul_add(*s, acc);
    }
    acc * sw
}

/// The scalar reference of the whole product.
pub fn gemm_scalar(x: &I8Acts, w: &I8Weights, y: &mut [f32]) {
    let (m, n, k, g) = (x.m, w.n, w.k, x.groups());
    let mut wr = vec![0i8; k];
    for j in 0..n {
        w.row_q(j, &mut wr);
        for i in 0..m {
            y[i * n + j] = dot_scalar(
                x.row(i),
                &x.scale[i * g..(i + 1) * g],
                x.group,
                &wr,
                w.scale[j],
            );
        }
    }
}

/// `y = x · Wᵀ` at the process's level.
pub fn gemm(x: &I8Acts, w: &I8Weights, y: &mut [f32]) {
    gemm_at(level(), x, w, y)
}

pub fn gemm_at(lvl: SimdLevel, x: &I8Acts, w: &I8Weights, y: &mut [f32]) {
    let (m, n, k) = (x.m, w.n, w.k);
    assert_eq!(x.k, k, "inner dimensions differ");
    assert_eq!(y.len(), m * n, "y shape");
    assert_eq!(x.scale.len(), m * x.groups(), "activation scales");
    assert_eq!(x.q.len(), m * x.stride(), "activation rows");
    assert_eq!(x.corr.len(), m * x.groups(), "activation corrections");
    assert!(
        x.group > 0 && x.group.is_multiple_of(QUAD),
        "activation group"
    );
    assert!(w.scale.len() >= w.panels() * PANEL, "weight scales");
    assert_eq!(w.lines.len(), w.panels() * w.quads(), "weight lines");
    if m == 0 || n == 0 {
        return;
    }
    let out = Out {
        ptr: y.as_mut_ptr(),
        n,
    };
    crate::panel::for_panels(m, w.panels(), m * n * k, |p0, p1| match lvl {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => {
            assert!(SimdLevel::detect() >= SimdLevel::Avx512);
            // SAFETY: AVX-512 VNNI present (asserted); panels p0..p1 exist and their columns
            // belong to this task only.
            unsafe { avx512::panels(x, w, p0, p1, out) }
        }
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => {
            assert!(SimdLevel::detect() >= SimdLevel::Avx2);
            // SAFETY: as above, with AVX2.
            unsafe { avx2::panels(x, w, p0, p1, out) }
        }
        #[cfg(target_arch = "aarch64")]
        SimdLevel::I8mm => {
            assert!(SimdLevel::detect() >= SimdLevel::I8mm);
            // SAFETY: as above, with FEAT_DotProd and FEAT_I8MM.
            unsafe { neon::panels_mmla(x, w, p0, p1, out) }
        }
        #[cfg(target_arch = "aarch64")]
        SimdLevel::Dotprod => {
            assert!(SimdLevel::detect() >= SimdLevel::Dotprod);
            // SAFETY: as above, with FEAT_DotProd.
            unsafe { neon::panels_dot(x, w, p0, p1, out) }
        }
        #[cfg(target_arch = "aarch64")]
        SimdLevel::Neon => {
            // SAFETY: as above (NEON is baseline on AArch64).
            unsafe { neon::panels_neon(x, w, p0, p1, out) }
        }
        _ => scalar_panels(x, w, p0, p1, out),
    });
}

/// The scalar reference over panels `p0..p1` (what a task computes on a CPU without SIMD).
fn scalar_panels(x: &I8Acts, w: &I8Weights, p0: usize, p1: usize, out: Out) {
    let (m, k, g) = (x.m, w.k, x.groups());
    let mut wr = vec![0i8; k];
    for j in p0 * PANEL..(p1 * PANEL).min(w.n) {
        w.row_q(j, &mut wr);
        for i in 0..m {
            let v = dot_scalar(
                x.row(i),
                &x.scale[i * g..(i + 1) * g],
                x.group,
                &wr,
                w.scale[j],
            );
            // SAFETY: (i, j) in bounds; column j belongs to this task only.
            unsafe { *out.ptr.add(i * out.n + j) = v };
        }
    }
}
