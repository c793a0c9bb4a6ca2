//! A weight matrix at the precision the engine runs: f32 (the reference path: every weight
//! dequantized exactly), int8 (W8A8: every weight requantized at load to 8 bits per output
//! channel, activations to 8 bits per token, exact integer sums: `kernels::int8`), or w4a8
//! (Q4_0/Q4_1/Q8_0 weights kept as stored, activations quantized per block of 32:
//! `kernels::qmatmul`; other tensor types run in f32).

use crate::error::Result;
use crate::gguf::{GgmlType, GgufFile};
use kernels::int8::{I8Acts, I8Weights, gemm};
use kernels::matmul::matmul;
use kernels::qmatmul::{QActs, QFormat, QWeights, qmatmul};

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
                    bytes: g.tensor_bytes(info)?.to_vec(),
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

    pub fn dims(&self) -> (usize, usize) {
        match self {
            Linear::F32 { n, k, .. } | Linear::Quant { n, k, .. } => (*n, *k),
            Linear::Int8(w) => (w.n, w.k),
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
            } => {
                let w = QWeights {
                    format: *format,
                    bytes,
                    n: *n,
                    k: *k,
                };
                qmatmul(x.quantized(), w, y)
            }
            Linear::Int8(w) => gemm(x.per_token(), w, y),
        }
    }

    /// Row `j` (one output channel, e.g. a token's embedding), dequantized exactly.
    pub fn row_into(&self, j: usize, out: &mut [f32]) {
        match self {
            Linear::F32 { w, k, .. } => out.copy_from_slice(&w[j * k..(j + 1) * k]),
            Linear::Quant {
                format, bytes, k, ..
            } => {
                let rb = k / kernels::qmatmul::QK * format.block_bytes();
                let src = &bytes[j * rb..(j + 1) * rb];
                match format {
                    QFormat::Q4_0 => kernels::quant::dequantize_q4_0(src, out),
                    QFormat::Q4_1 => kernels::quant::dequantize_q4_1(src, out),
                    QFormat::Q8_0 => kernels::quant::dequantize_q8_0(src, out),
                }
            }
            Linear::Int8(w) => w.row_into(j, out),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Linear::F32 { w, .. } => w.len() * 4,
            Linear::Quant { bytes, .. } => bytes.len(),
            Linear::Int8(w) => w.bytes(),
        }
    }
}
