//! Quantized matmul: GGML block weights (Q4_0, Q4_1, Q8_0 — the values stored in the GGUF,
//! repacked) times activations quantized per token to 8 bits in blocks of 32 (integer
//! multiply-accumulate, the way llama.cpp's CPU backend runs Q4 models).
//!
//! # Arithmetic, identical at every level
//! For output `(i, j)` and each block `b` of 32 inputs in order: `isum = Σ w·a` over the block
//! (exact; `w` the block's integer weights: `q − 8` for Q4_0, `q` for Q4_1, the signed byte for
//! Q8_0), then `acc = fma(isum as f32, d_w·d_a, acc)` and, for Q4_1,
//! `acc = fma(m_w, s_a, acc)` with `s_a = d_a·Σa`. So every level gives the scalar
//! reference's bits and a row never depends on its batch.
//!
//! # Layout
//! Panels of 16 output channels (as in [`crate::int8`]), block by block. A Q4 panel-block is
//! four 64-byte lines: line `h` holds, for channel `c` at bytes `4c..4c+4`, inputs `4h..4h+4`
//! in the low nibbles and `16+4h..16+4h+4` in the high ones — one mask or shift gives the
//! `vpdpbusd` operand of 16 channels × 4 inputs. A Q8_0 panel-block is eight lines of
//! offset-binary bytes. One more line holds the 16 channels' f16 scales (and Q4_1
//! minimums), so each panel is a single sequential stream. `vpdpbusd` multiplies unsigned by signed bytes: weights are stored
//! unsigned (Q4 nibbles as they are, Q8_0 offset by 128), activations stay signed, and
//! `bias·Σa` (8 for Q4_0, 128 for Q8_0) is taken off up front, exactly.
//!
//! - this file: the formats, packing, activation quantization, the scalar reference, dispatch;
//! - [`avx512`] / [`avx2`]: the register-tiled x86 kernels; `neon`: AArch64's (`smmla`, `sdot` or
//!   `smull`).

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(test)]
pub(crate) mod tests;

use crate::actq::quantize_group;
use crate::dispatch::{SimdLevel, level};
use crate::panel::{Line, Lines, Out, PANEL, SharedBytes};
use half::f16;

pub const QK: usize = 32;

/// The block formats the kernel reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QFormat {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl QFormat {
    /// Bytes of one GGUF block.
    pub fn block_bytes(self) -> usize {
        match self {
            QFormat::Q4_0 => 18,
            QFormat::Q4_1 => 20,
            QFormat::Q8_0 => 34,
        }
    }
    /// Lines per panel-block.
    pub(crate) fn lines(self) -> usize {
        match self {
            QFormat::Q8_0 => 8,
            _ => 4,
        }
    }
    /// What the stored unsigned weight exceeds the real one by.
    pub(crate) fn bias(self) -> i32 {
        match self {
            QFormat::Q4_0 => 8,
            QFormat::Q4_1 => 0,
            QFormat::Q8_0 => 128,
        }
    }
}

/// `n` rows of `k` weights in one block format, packed in panels (module docs). Only
/// [`pack`](Self::pack) sets the shape, which the SIMD bodies trust:
///
/// ```compile_fail
/// use kernels::qmatmul::{QFormat, QWeights};
/// let mut w = QWeights::pack(QFormat::Q8_0, &[0u8; 34], 1, 32);
/// w.k = 1 << 20;
/// ```
#[derive(Clone)]
pub struct QWeights {
    pub(crate) format: QFormat,
    /// Per panel and block: the weight lines, then one line of scales — 16 `d` values, then
    /// (Q4_1) 16 `m` values, as f16 bits — so a panel is one sequential stream.
    lines: Lines,
    pub(crate) n: usize,
    pub(crate) k: usize,
}

impl std::fmt::Debug for QWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QWeights")
            .field("format", &self.format)
            .field("n", &self.n)
            .field("k", &self.k)
            .finish_non_exhaustive()
    }
}

impl QWeights {
    /// Packs row-major GGUF blocks (`n` rows of `k / 32` blocks each); `k` a multiple of 32.
    pub fn pack(format: QFormat, rows: &[u8], n: usize, k: usize) -> QWeights {
        assert!(k.is_multiple_of(QK), "k must be whole blocks");
        let (bb, nb) = (format.block_bytes(), k / QK);
        assert_eq!(rows.len(), n * nb * bb, "row bytes");
        let panels = n.div_ceil(PANEL);
        let nl = format.lines();
        // Padding channels: zero weights (the stored value that means 0) and zero scales.
        let pad = match format {
            QFormat::Q4_0 => 0x88,
            QFormat::Q4_1 => 0,
            QFormat::Q8_0 => 0x80,
        };
        let mut lines = vec![Line([pad; 64]); panels * nb * (nl + 1)];
        for sl in lines.iter_mut().skip(nl).step_by(nl + 1) {
            sl.0 = [0; 64];
        }
        for j in 0..n {
            let (p, c) = (j / PANEL, j % PANEL);
            for b in 0..nb {
                let blk = &rows[(j * nb + b) * bb..][..bb];
                let lb = &mut lines[(p * nb + b) * (nl + 1)..][..nl + 1];
                lb[nl].0[2 * c..2 * c + 2].copy_from_slice(&blk[..2]);
                if format == QFormat::Q4_1 {
                    lb[nl].0[32 + 2 * c..32 + 2 * c + 2].copy_from_slice(&blk[2..4]);
                }
                match format {
                    QFormat::Q8_0 => {
                        for t in 0..QK {
                            lb[t / 4].0[4 * c + t % 4] = blk[2 + t] ^ 0x80;
                        }
                    }
                    _ => {
                        let nib = &blk[bb - 16..];
                        for h in 0..4 {
                            for e in 0..4 {
                                // Byte 4h+e holds inputs 4h+e (low) and 16+4h+e (high), as in ggml.
                                lb[h].0[4 * c + e] = nib[4 * h + e];
                            }
                        }
                    }
                }
            }
        }
        QWeights {
            format,
            lines: Lines::Owned(lines),
            n,
            k,
        }
    }

    /// The packed lines as bytes: what [`from_packed`](Self::from_packed) takes back.
    pub fn packed_bytes(&self) -> &[u8] {
        self.lines.as_bytes()
    }

    /// Weights over packed lines that [`packed_bytes`](Self::packed_bytes) wrote, at `offset`
    /// of `bytes` (64-byte aligned in memory), used in place. `None` if the range does not
    /// hold exactly this shape's lines or is misaligned.
    pub fn from_packed(
        format: QFormat,
        n: usize,
        k: usize,
        bytes: SharedBytes,
        offset: usize,
    ) -> Option<QWeights> {
        if !k.is_multiple_of(QK) {
            return None;
        }
        let count = n
            .div_ceil(PANEL)
            .checked_mul(k / QK)?
            .checked_mul(format.lines() + 1)?;
        Some(QWeights {
            format,
            lines: Lines::mapped(bytes, offset, count)?,
            n,
            k,
        })
    }

    /// The block format.
    pub fn format(&self) -> QFormat {
        self.format
    }

    /// Output channels (rows).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Inputs per row.
    pub fn k(&self) -> usize {
        self.k
    }

    pub fn panels(&self) -> usize {
        self.n.div_ceil(PANEL)
    }

    pub fn blocks(&self) -> usize {
        self.k / QK
    }

    pub fn bytes(&self) -> usize {
        self.lines.len() * 64
    }

    /// Row `j`'s block `b` as the GGUF stored it.
    pub fn gguf_block(&self, j: usize, b: usize) -> Vec<u8> {
        let (p, c, nb) = (j / PANEL, j % PANEL, self.blocks());
        let nl = self.format.lines();
        let lb = &self.lines[(p * nb + b) * (nl + 1)..][..nl + 1];
        let mut out = lb[nl].0[2 * c..2 * c + 2].to_vec();
        match self.format {
            QFormat::Q8_0 => out.extend((0..QK).map(|t| lb[t / 4].0[4 * c + t % 4] ^ 0x80)),
            f => {
                if f == QFormat::Q4_1 {
                    out.extend(&lb[nl].0[32 + 2 * c..32 + 2 * c + 2]);
                }
                out.extend((0..16).map(|i| lb[i / 4].0[4 * c + i % 4]));
            }
        }
        out
    }

    /// Row `j`'s GGUF blocks, in order.
    pub fn gguf_row(&self, j: usize) -> Vec<u8> {
        (0..self.blocks())
            .flat_map(|b| self.gguf_block(j, b))
            .collect()
    }

    /// Row `j`, dequantized exactly as the GGUF's values.
    pub fn row_into(&self, j: usize, out: &mut [f32]) {
        let src = self.gguf_row(j);
        match self.format {
            QFormat::Q4_0 => crate::quant::dequantize_q4_0(&src, out),
            QFormat::Q4_1 => crate::quant::dequantize_q4_1(&src, out),
            QFormat::Q8_0 => crate::quant::dequantize_q8_0(&src, out),
        }
    }

    /// The 32 integer weights of `(j, b)` with `d` and `m`: the scalar definition's inputs.
    fn block(&self, j: usize, b: usize) -> ([i32; QK], f32, f32) {
        let blk = self.gguf_block(j, b);
        let f = |i: usize| f16::from_le_bytes([blk[i], blk[i + 1]]).to_f32();
        let mut w = [0i32; QK];
        match self.format {
            QFormat::Q8_0 => {
                for (t, v) in w.iter_mut().enumerate() {
                    *v = blk[2 + t] as i8 as i32;
                }
            }
            fmt => {
                let nib = &blk[blk.len() - 16..];
                let bias = fmt.bias();
                for e in 0..16 {
                    w[e] = (nib[e] & 15) as i32 - bias;
                    w[e + 16] = (nib[e] >> 4) as i32 - bias;
                }
            }
        }
        let m = if self.format == QFormat::Q4_1 {
            f(2)
        } else {
            0.0
        };
        (w, f(0), m)
    }

    /// The first line of panel `p`, block `b`.
    #[inline(always)]
    pub(crate) fn lines_at(&self, p: usize, b: usize) -> *const u8 {
        debug_assert!(p < self.panels() && b < self.blocks());
        // SAFETY: in bounds (debug-asserted; callers pass panels and blocks that exist).
        unsafe {
            self.lines
                .as_ptr()
                .add((p * self.blocks() + b) * (self.format.lines() + 1)) as *const u8
        }
    }

    /// The 16 `d` values of panel `p`, block `b` (then, for Q4_1, the 16 `m` values).
    #[inline(always)]
    pub(crate) fn scales_at(&self, p: usize, b: usize) -> *const u16 {
        // SAFETY: the scale line follows the block's weight lines.
        unsafe { self.lines_at(p, b).add(self.format.lines() * 64) as *const u16 }
    }
}

/// Activations of `m` rows quantized in blocks of 32: values, per-block scale `d`,
/// `s = d·Σq`, and the integer `Σq`. Built only by the quantizers:
///
/// ```compile_fail
/// let mut a = kernels::qmatmul::QActs::quantize(&[0.5; 32], 1, 32);
/// a.m = 4;
/// ```
#[derive(Debug, Clone, Default)]
pub struct QActs {
    pub(crate) q: Vec<i8>,
    pub(crate) d: Vec<f32>,
    pub(crate) s: Vec<f32>,
    pub(crate) sum: Vec<i32>,
    pub(crate) m: usize,
    pub(crate) k: usize,
}

// The fields are private to the crate: the SIMD bodies index them unchecked, so only
// `quantize_into` may set them (`qmatmul_at` checks them again).
impl QActs {
    /// Rows.
    pub fn m(&self) -> usize {
        self.m
    }

    /// Inputs per row.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Quantizes `x: [m × k]` (k a multiple of 32), reusing this buffer.
    pub fn quantize_into(&mut self, x: &[f32], m: usize, k: usize) {
        assert!(k.is_multiple_of(QK) && x.len() == m * k);
        (self.m, self.k) = (m, k);
        let nb = m * k / QK;
        self.q.resize(m * k, 0);
        self.d.resize(nb, 0.0);
        self.s.resize(nb, 0.0);
        self.sum.resize(nb, 0);
        if k == 0 {
            return;
        }
        let (dp, sp, up) = (
            crate::pool::SendPtr(self.d.as_mut_ptr()),
            crate::pool::SendPtr(self.s.as_mut_ptr()),
            crate::pool::SendPtr(self.sum.as_mut_ptr()),
        );
        let per_task = if m * k >= 1 << 16 { 16 } else { m };
        let rb = k / QK;
        crate::pool::for_rows(&mut self.q, k, per_task, |i, qr| {
            for (b, (xb, qb)) in x[i * k..(i + 1) * k]
                .chunks_exact(QK)
                .zip(qr.chunks_exact_mut(QK))
                .enumerate()
            {
                let (d, sum) = quantize_group(xb, qb);
                // SAFETY: block i·rb + b belongs to the task that owns row i.
                unsafe {
                    *dp.get().add(i * rb + b) = d;
                    *sp.get().add(i * rb + b) = d * sum as f32;
                    *up.get().add(i * rb + b) = sum;
                }
            }
        });
    }

    pub fn quantize(x: &[f32], m: usize, k: usize) -> QActs {
        let mut a = QActs::default();
        a.quantize_into(x, m, k);
        a
    }
}

/// One output, the scalar definition.
fn dot_scalar(w: &QWeights, j: usize, x: &QActs, i: usize) -> f32 {
    let nb = w.blocks();
    let mut acc = 0f32;
    for b in 0..nb {
        let (wq, dw, mw) = w.block(j, b);
        let ab = i * nb + b;
        let qa = &x.q[ab * QK..(ab + 1) * QK];
        let isum: i32 = wq.iter().zip(qa).map(|(&a, &b)| a * b as i32).sum();
        acc = (isum as f32).mul_add(dw * x.d[ab], acc);
        if w.format == QFormat::Q4_1 {
            acc = mw.mul_add(x.s[ab], acc);
        }
    }
    acc
}

/// The scalar reference of the whole product.
pub fn qmatmul_scalar(x: &QActs, w: &QWeights, y: &mut [f32]) {
    for i in 0..x.m {
        for j in 0..w.n {
            y[i * w.n + j] = dot_scalar(w, j, x, i);
        }
    }
}

/// `y[i·n + j] = Σ_t x[i][t]·w[j][t]` with quantized activations, at the process's level.
pub fn qmatmul(x: &QActs, w: &QWeights, y: &mut [f32]) {
    qmatmul_at(level(), x, w, y)
}

pub fn qmatmul_at(lvl: SimdLevel, x: &QActs, w: &QWeights, y: &mut [f32]) {
    let (m, n, k) = (x.m, w.n, w.k);
    assert_eq!(x.k, k, "inner dimensions differ");
    assert_eq!(y.len(), m * n, "y shape");
    let nb = m * k / QK;
    assert!(
        x.q.len() == m * k && x.d.len() == nb && x.s.len() == nb && x.sum.len() == nb,
        "activation buffers"
    );
    assert_eq!(
        w.lines.len(),
        w.panels() * w.blocks() * (w.format.lines() + 1),
        "weight lines"
    );
    if m == 0 || n == 0 || k == 0 {
        y.fill(0.0);
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
            // SAFETY: as above, with AVX2, FMA and F16C.
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
        _ => {
            for j in p0 * PANEL..(p1 * PANEL).min(n) {
                for i in 0..m {
                    // SAFETY: (i, j) in bounds; column j belongs to this task only.
                    unsafe { *out.ptr.add(i * n + j) = dot_scalar(w, j, x, i) };
                }
            }
        }
    });
}
