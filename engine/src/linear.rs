//! A weight matrix at the precision the engine runs: f32 (the reference path: every weight
//! dequantized exactly), int8 (W8A8: every weight requantized at load to 8 bits per output
//! channel, activations to 8 bits per token, exact integer sums: `kernels::int8`), or w4a8
//! (Q4_0/Q4_1/Q8_0 weights kept as stored, activations quantized per block of 32:
//! `kernels::qmatmul`; other tensor types run in f32).

use crate::error::Result;
use crate::gguf::{GgmlType, GgufFile};
use kernels::int8::{I8Acts, I8Weights, gemm};
use kernels::matmul::matmul;
use kernels::qmatmul::{QActs, QFormat, QWeights, pack_panels, qmatmul};

/// How the weight matrices compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Every weight dequantized to f32: exact arithmetic, the golden-test reference.
    F32,
    /// W8A8 with per-output-channel weight scales and per-token activation scales: the
    /// default, and the fastest path for prefill and batched decode.
    #[default]
    Int8,
    /// GGUF block weights as stored (Q4_1 is 5 bits a weight), activations 8-bit per block of
    /// 32: the least memory.
    W4A8,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "f32" => Ok(Precision::F32),
            "int8" => Ok(Precision::Int8),
            "w4a8" => Ok(Precision::W4A8),
            other => Err(format!("unknown precision '{other}' (int8, w4a8 or f32)")),
        }
    }
}

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

/// A view of `Linear::Quant`'s weights, which are always stored in packed panels.
fn packed(format: QFormat, bytes: &[u8], n: usize, k: usize) -> QWeights<'_> {
    QWeights {
        format,
        bytes,
        n,
        k,
        packed: true,
    }
}

/// A weight matrix of `n` output channels by `k` inputs.
pub enum Linear {
    F32 {
        w: Vec<f32>,
        n: usize,
        k: usize,
    },
    Quant {
        format: QFormat,
        bytes: Vec<u8>,
        n: usize,
        k: usize,
    },
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
        let format = match info.ty {
            GgmlType::Q4_0 => Some(QFormat::Q4_0),
            GgmlType::Q4_1 => Some(QFormat::Q4_1),
            GgmlType::Q8_0 => Some(QFormat::Q8_0),
            _ => None,
        };
        if precision == Precision::Int8 {
            return Ok(Linear::Int8(I8Weights::quantize(
                &g.tensor_f32(name)?,
                n,
                k,
            )));
        }
        match format {
            Some(format)
                if precision == Precision::W4A8 && k.is_multiple_of(kernels::qmatmul::QK) =>
            {
                Ok(Linear::Quant {
                    format,
                    bytes: pack_panels(format, g.tensor_bytes(info)?, n, k),
                    n,
                    k,
                })
            }
            _ => Ok(Linear::F32 {
                w: g.tensor_f32(name)?,
                n,
                k,
            }),
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
                .all(|l| matches!(l, Linear::Quant { format, .. } if *format == f))
        };
        Ok(match &loaded[0] {
            Linear::Quant { format, .. } if same_format(*format) => {
                // Back to row-major, stacked, then packed as one matrix.
                let format = *format;
                let mut rows = Vec::new();
                let mut buf = Vec::new();
                for l in &loaded {
                    if let Linear::Quant { bytes, n, k, .. } = l {
                        let w = packed(format, bytes, *n, *k);
                        for j in 0..*n {
                            rows.extend_from_slice(w.row(j, &mut buf));
                        }
                    }
                }
                Linear::Quant {
                    format,
                    bytes: pack_panels(format, &rows, n, k),
                    n,
                    k,
                }
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
            Linear::F32 { n, k, .. } | Linear::Quant { n, k, .. } => (*n, *k),
            Linear::Int8(w) => (w.n, w.k),
            Linear::Parts(ps) => (ps.iter().map(|p| p.dims().0).sum(), ps[0].dims().1),
        }
    }

    /// `y = x · Wᵀ`, `y: [m × n]`.
    pub fn forward(&self, x: &mut Acts<'_>, y: &mut [f32]) {
        match self {
            Linear::F32 { w, n, k } => matmul(x.x, w, y, x.m, *k, *n),
            Linear::Quant {
                format,
                bytes,
                n,
                k,
            } => qmatmul(x.quantized(), packed(*format, bytes, *n, *k), y),
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
            Linear::Quant {
                format,
                bytes,
                n,
                k,
            } => {
                let mut buf = Vec::new();
                let w = packed(*format, bytes, *n, *k);
                let src = w.row(j, &mut buf);
                match format {
                    QFormat::Q4_0 => kernels::quant::dequantize_q4_0(src, out),
                    QFormat::Q4_1 => kernels::quant::dequantize_q4_1(src, out),
                    QFormat::Q8_0 => kernels::quant::dequantize_q8_0(src, out),
                }
            }
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
            Linear::Quant { bytes, .. } => bytes.len(),
            Linear::Int8(w) => w.bytes(),
            Linear::Parts(ps) => ps.iter().map(Linear::bytes).sum(),
        }
    }
}
