//! Causal attention of query rows over a paged KV cache (grouped-query: query head `h` reads
//! KV head `h / (n_heads / n_kv_heads)`).
//!
//! # Block layout
//! A block holds `block_size` positions. Its **K plane is transposed**, `[kv_head][dim][position]`,
//! so the keys of one block for one dimension are contiguous: with 16-position blocks one vector
//! load gives a dimension of 16 keys, and a score is a plain chain of fused multiply-adds over
//! the dimensions with a broadcast query value — no horizontal sums, and the loaded keys are
//! reused by every query row and head of a tile. The **V plane** is `[position][kv_head][dim]`
//! (a position's values are contiguous, the operand of the weighted sum). 8-bit planes carry one
//! f32 scale per position and KV head: `[kv_head][position]` for K, `[position][kv_head]` for V.
//!
//! # Arithmetic, identical at every level
//! For one row with context `n` and one head: `s[p] = (Σ_d q[d]·k[p][d]) · hd^-½`, the sum a
//! sequence of fused multiply-adds in dimension order; `m = max s`; `e[p] = exp(s[p] − m)`
//! ([`crate::simd::exp`]); `z` = the 16 lane sums `Σ_{p ≡ l mod 16} e[p]` (in position
//! order) reduced by a fixed tree; `o[d] = Σ_p e[p]·v[p][d]` as fused multiply-adds in
//! position order, times `1/z`. Stored values convert to f32 exactly (8-bit ones as `q·scale`),
//! so f16 or 8-bit storage gives the bits of f32 storage holding the same values. Nothing
//! depends on the batch, the tile, or the split of heads over threads.
//!
//! - [`reference`]: that definition, plainly, for any block size and head dimension;
//! - `tiled`: the same arithmetic over tiles of rows and heads, for 16-position blocks and head
//!   dimensions that are multiples of 16, at every SIMD level.

#[cfg(test)]
mod tests;
mod tiled;

use crate::dispatch::{SimdLevel, level};
use half::f16;

/// Shape of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
}

impl AttnShape {
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
    /// Query heads per KV head.
    pub fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }
    /// Index of K value `(position p, KV head h, dim d)` in a block's K plane.
    #[inline(always)]
    pub fn k_index(&self, p: usize, h: usize, d: usize) -> usize {
        (h * self.head_dim + d) * self.block_size + p
    }
    /// Index of V value `(p, h, d)` in a block's V plane.
    #[inline(always)]
    pub fn v_index(&self, p: usize, h: usize, d: usize) -> usize {
        p * self.kv_dim() + h * self.head_dim + d
    }
    /// Index of the scale of `(p, h)` in an 8-bit K plane's scales.
    #[inline(always)]
    pub fn k_scale_index(&self, p: usize, h: usize) -> usize {
        h * self.block_size + p
    }
    /// Index of the scale of `(p, h)` in an 8-bit V plane's scales.
    #[inline(always)]
    pub fn v_scale_index(&self, p: usize, h: usize) -> usize {
        p * self.n_kv_heads + h
    }
}

/// One block's K or V plane (`block_size × kv_dim` values) in the pool's storage type.
#[derive(Debug, Clone, Copy)]
pub enum KvSlice<'a> {
    F32(&'a [f32]),
    /// Half precision (the default KV format): half the memory and bytes to read of f32.
    F16(&'a [f16]),
    /// 8-bit values with one f32 scale per position and KV head (see the module docs for the
    /// scales' order): a quarter of f32's memory.
    I8 {
        q: &'a [i8],
        scale: &'a [f32],
    },
}

impl KvSlice<'_> {
    pub fn len(&self) -> usize {
        match self {
            KvSlice::F32(s) => s.len(),
            KvSlice::F16(s) => s.len(),
            KvSlice::I8 { q, .. } => q.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Value `i` as f32 (exact), its 8-bit scale at `scale_i`.
    #[inline]
    fn get(&self, i: usize, scale_i: usize) -> f32 {
        match self {
            KvSlice::F32(s) => s[i],
            KvSlice::F16(s) => s[i].to_f32(),
            KvSlice::I8 { q, scale } => q[i] as f32 * scale[scale_i],
        }
    }

    fn kind(&self) -> u8 {
        match self {
            KvSlice::F32(_) => 0,
            KvSlice::F16(_) => 1,
            KvSlice::I8 { .. } => 2,
        }
    }
}

/// One block's K and V.
pub type KvBlockRef<'a> = (KvSlice<'a>, KvSlice<'a>);

/// Query rows of one sequence at consecutive positions: row `r` sees `first_ctx + r` positions.
#[derive(Debug, Clone, Copy)]
pub struct AttnRows<'a> {
    /// `[rows × n_heads × head_dim]`.
    pub q: &'a [f32],
    pub rows: usize,
    pub first_ctx: usize,
    pub blocks: &'a [KvBlockRef<'a>],
}

/// `e^x` for `x ≤ 0` with the vector kernels' exact arithmetic.
#[inline]
pub fn exp_neg(x: f32) -> f32 {
    use crate::simd::{Scalar16, V16};
    // SAFETY: the scalar level needs no CPU features.
    unsafe { crate::simd::exp(Scalar16::splat(x)).to_array()[0] }
}

/// Attends `rows` for query heads `heads` (all on one KV head); writes
/// `out: [rows × heads.len() × head_dim]`.
pub fn attend_rows(
    shape: AttnShape,
    heads: std::ops::Range<usize>,
    x: AttnRows<'_>,
    out: &mut [f32],
) {
    attend_rows_at(level(), shape, heads, x, out)
}

pub fn attend_rows_at(
    lvl: SimdLevel,
    shape: AttnShape,
    heads: std::ops::Range<usize>,
    x: AttnRows<'_>,
    out: &mut [f32],
) {
    check(shape, &heads, &x, out);
    if shape.block_size == tiled::LANES && shape.head_dim.is_multiple_of(tiled::LANES) {
        tiled::attend(lvl, shape, heads, x, out);
    } else {
        reference(shape, heads, x, out);
    }
}

fn check(shape: AttnShape, heads: &std::ops::Range<usize>, x: &AttnRows<'_>, out: &[f32]) {
    let (hd, bs, kvd) = (shape.head_dim, shape.block_size, shape.kv_dim());
    assert!(shape.n_heads.is_multiple_of(shape.n_kv_heads));
    assert!(heads.start < heads.end && heads.end <= shape.n_heads);
    assert_eq!(
        heads.start / shape.group(),
        (heads.end - 1) / shape.group(),
        "one KV head"
    );
    assert_eq!(x.q.len(), x.rows * shape.n_heads * hd);
    assert_eq!(out.len(), x.rows * heads.len() * hd);
    assert!(x.rows > 0 && x.first_ctx >= 1);
    let last = x.first_ctx + x.rows - 1;
    assert!(last <= x.blocks.len() * bs, "context beyond the blocks");
    let kind = x.blocks[0].0.kind();
    for (k, v) in x.blocks {
        assert!(k.len() >= bs * kvd && v.len() >= bs * kvd);
        assert!(k.kind() == kind && v.kind() == kind, "one storage type");
        for s in [k, v] {
            if let KvSlice::I8 { scale, .. } = s {
                assert!(scale.len() >= bs * shape.n_kv_heads);
            }
        }
    }
}

/// The definition (module docs), one row and head at a time, for any block size and head dim.
pub fn reference(
    shape: AttnShape,
    heads: std::ops::Range<usize>,
    x: AttnRows<'_>,
    out: &mut [f32],
) {
    let (hd, bs) = (shape.head_dim, shape.block_size);
    let scale = 1.0 / (hd as f32).sqrt();
    let nh = heads.len();
    for r in 0..x.rows {
        let n = x.first_ctx + r;
        for (hi, h) in heads.clone().enumerate() {
            let kvh = h / shape.group();
            let q = &x.q[(r * shape.n_heads + h) * hd..][..hd];
            let s: Vec<f32> = (0..n)
                .map(|p| {
                    let (k, _) = &x.blocks[p / bs];
                    let pp = p % bs;
                    let ks = shape.k_scale_index(pp, kvh);
                    let dot = (0..hd).fold(0f32, |acc, d| {
                        q[d].mul_add(k.get(shape.k_index(pp, kvh, d), ks), acc)
                    });
                    dot * scale
                })
                .collect();
            let m = s
                .iter()
                .fold(f32::NEG_INFINITY, |a, &b| if a > b { a } else { b });
            let e: Vec<f32> = s.iter().map(|&v| exp_neg(v - m)).collect();
            let mut lanes = [0f32; 16];
            for (p, &v) in e.iter().enumerate() {
                lanes[p % 16] += v;
            }
            let inv = 1.0 / crate::dot::reduce16(&lanes);
            let o = &mut out[(r * nh + hi) * hd..][..hd];
            for (d, od) in o.iter_mut().enumerate() {
                let mut acc = 0f32;
                for (p, &ep) in e.iter().enumerate() {
                    let (_, v) = &x.blocks[p / bs];
                    let pp = p % bs;
                    acc = ep.mul_add(
                        v.get(shape.v_index(pp, kvh, d), shape.v_scale_index(pp, kvh)),
                        acc,
                    );
                }
                *od = acc * inv;
            }
        }
    }
}
