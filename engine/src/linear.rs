//! A weight matrix at the precision the engine runs: w4a8, the default (Q4_0/Q4_1/Q8_0
//! weights kept exactly as stored, activations quantized per block of 32, exact integer sums:
//! `kernels::qmatmul`; tensors of other types are requantized to int8), int8 (W8A8: every
//! weight requantized at load to 8 bits per output channel, activations to 8 bits per token
//! per group of 64: `kernels::int8`), or f32 (the reference path: every weight dequantized
//! exactly).

use crate::error::Result;
use crate::gguf::{GgmlType, GgufFile};
use crate::weights::{TensorsF32, dequantize};
use kernels::int8::{I8Acts, I8Weights, gemm};
use kernels::matmul::matmul;
use kernels::qmatmul::{QActs, QFormat, QWeights, qmatmul};

pub use frontend::precision::Precision;

/// An activation matrix `[m × k]`, quantized on first use by a quantized weight.
pub struct Acts<'a> {
    x: &'a [f32],
    m: usize,
    k: usize,
    q: Option<QActs>,
    q8: Option<I8Acts>,
}

impl<'a> Acts<'a> {
    pub fn new(x: &'a [f32], m: usize, k: usize) -> Acts<'a> {
        assert_eq!(x.len(), m * k);
        Acts {
            x,
            m,
            k,
            q: None,
            q8: None,
        }
    }

    fn quantized(&mut self) -> &QActs {
        let (x, m, k) = (self.x, self.m, self.k);
        self.q.get_or_insert_with(|| QActs::quantize(x, m, k))
    }

    fn per_token(&mut self) -> &I8Acts {
        let (x, m, k) = (self.x, self.m, self.k);
        self.q8.get_or_insert_with(|| I8Acts::quantize(x, m, k))
    }
}

/// A weight matrix of `n` output channels by `k` inputs.
pub enum Linear {
    F32 {
        w: Vec<f32>,
        n: usize,
        k: usize,
    },
    Quant(QWeights),
    Int8(I8Weights),
    /// Matrices that cannot be stacked exactly (GGUF blocks of different formats), run one
    /// after another into their columns.
    Parts(Vec<Linear>),
}

impl Linear {
    /// Loads `name`, which must have GGML shape `[k, n]`.
    pub fn load(g: &GgufFile, name: &str, shape: &[u64], precision: Precision) -> Result<Linear> {
        let info = g.tensor_shaped(name, shape)?;
        let k = shape[0] as usize;
        let n = shape.get(1).copied().unwrap_or(1) as usize;
        Ok(Linear::from_gguf_rows(
            info.ty,
            g.tensor_bytes(info)?,
            n,
            k,
            precision,
        ))
    }

    /// `n` rows of `k` elements, GGUF-encoded as `ty` (a tensor, or one expert's slice of a
    /// stacked one), at `precision`: w4a8 keeps Q4_0/Q4_1/Q8_0 blocks as stored and
    /// requantizes other types to int8; int8 requantizes everything; f32 dequantizes exactly.
    pub fn from_gguf_rows(
        ty: GgmlType,
        bytes: &[u8],
        n: usize,
        k: usize,
        precision: Precision,
    ) -> Linear {
        let format = match ty {
            GgmlType::Q4_0 => Some(QFormat::Q4_0),
            GgmlType::Q4_1 => Some(QFormat::Q4_1),
            GgmlType::Q8_0 => Some(QFormat::Q8_0),
            _ => None,
        };
        match format {
            Some(format)
                if precision == Precision::W4A8 && k.is_multiple_of(kernels::qmatmul::QK) =>
            {
                Linear::Quant(QWeights::pack(format, bytes, n, k))
            }
            _ if precision == Precision::F32 => Linear::F32 {
                w: dequantize(ty, bytes),
                n,
                k,
            },
            _ => Linear::Int8(I8Weights::quantize(&dequantize(ty, bytes), n, k)),
        }
    }

    /// Several matrices with the same input width stacked into one (their output channels in
    /// order), so one call computes them all: Q, K and V; gate and up. Each channel's weights
    /// and scale are exactly what it would have alone, so the outputs are too.
    pub fn load_stacked(
        g: &GgufFile,
        parts: &[(&str, &[u64])],
        precision: Precision,
    ) -> Result<Linear> {
        if precision == Precision::Int8 && parts.len() > 1 {
            // Quantization is per output channel, so stacking the source rows first gives each
            // channel the integers and scale it would have alone.
            let mut rows = Vec::new();
            let mut n = 0;
            for (name, shape) in parts {
                rows.extend(g.tensor_f32_shaped(name, shape)?);
                n += shape.get(1).copied().unwrap_or(1) as usize;
            }
            let k = parts[0].1[0] as usize;
            return Ok(Linear::Int8(I8Weights::quantize(&rows, n, k)));
        }
        let mut loaded = parts
            .iter()
            .map(|(name, shape)| Linear::load(g, name, shape, precision))
            .collect::<Result<Vec<_>>>()?;
        if loaded.len() == 1 {
            return Ok(loaded.pop().expect("one part"));
        }
        let k = loaded[0].dims().1;
        let n: usize = loaded.iter().map(|l| l.dims().0).sum();
        let same_format = |f: QFormat| {
            loaded
                .iter()
                .all(|l| matches!(l, Linear::Quant(w) if w.format() == f))
        };
        Ok(match &loaded[0] {
            Linear::Quant(w0) if same_format(w0.format()) => {
                // The GGUF rows of every part, stacked, then packed as one matrix.
                let mut rows = Vec::new();
                for l in &loaded {
                    if let Linear::Quant(w) = l {
                        for j in 0..w.n() {
                            rows.extend(w.gguf_row(j));
                        }
                    }
                }
                Linear::Quant(QWeights::pack(w0.format(), &rows, n, k))
            }
            Linear::F32 { .. } if loaded.iter().all(|l| matches!(l, Linear::F32 { .. })) => {
                let mut w = Vec::with_capacity(n * k);
                for l in &loaded {
                    if let Linear::F32 { w: part, .. } = l {
                        w.extend_from_slice(part);
                    }
                }
                Linear::F32 { w, n, k }
            }
            _ => Linear::Parts(loaded),
        })
    }

    pub fn dims(&self) -> (usize, usize) {
        match self {
            Linear::F32 { n, k, .. } => (*n, *k),
            Linear::Quant(w) => (w.n(), w.k()),
            Linear::Int8(w) => (w.n(), w.k()),
            Linear::Parts(ps) => (ps.iter().map(|p| p.dims().0).sum(), ps[0].dims().1),
        }
    }

    /// `y = x · Wᵀ`, `y: [m × n]`.
    pub fn forward(&self, x: &mut Acts<'_>, y: &mut [f32]) {
        match self {
            Linear::F32 { w, n, k } => matmul(x.x, w, y, x.m, *k, *n),
            Linear::Quant(w) => qmatmul(x.quantized(), w, y),
            Linear::Int8(w) => gemm(x.per_token(), w, y),
            Linear::Parts(_) if x.m == 0 => {}
            Linear::Parts(ps) => {
                let n = y.len() / x.m;
                let mut col = 0;
                for p in ps {
                    let n1 = p.dims().0;
                    let mut y1 = vec![0f32; x.m * n1];
                    p.forward(x, &mut y1);
                    for (dst, src) in y.chunks_exact_mut(n).zip(y1.chunks_exact(n1)) {
                        dst[col..col + n1].copy_from_slice(src);
                    }
                    col += n1;
                }
            }
        }
    }

    /// Row `j` (one output channel, e.g. a token's embedding), dequantized exactly.
    pub fn row_into(&self, j: usize, out: &mut [f32]) {
        match self {
            Linear::F32 { w, k, .. } => out.copy_from_slice(&w[j * k..(j + 1) * k]),
            Linear::Quant(w) => w.row_into(j, out),
            Linear::Int8(w) => w.row_into(j, out),
            Linear::Parts(ps) => {
                let mut j = j;
                for p in ps {
                    let n1 = p.dims().0;
                    if j < n1 {
                        return p.row_into(j, out);
                    }
                    j -= n1;
                }
                panic!("row out of range");
            }
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Linear::F32 { w, .. } => w.len() * 4,
            Linear::Quant(w) => w.bytes(),
            Linear::Int8(w) => w.bytes(),
            Linear::Parts(ps) => ps.iter().map(Linear::bytes).sum(),
        }
    }
}
