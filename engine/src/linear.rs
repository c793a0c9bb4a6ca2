//! A weight matrix at the precision the engine runs: f32 (the reference path: every weight
//! dequantized exactly) or int8 (Q4_0/Q4_1/Q8_0 weights kept as stored, activations quantized
//! per token to 8 bits: `kernels::qmatmul`). Other tensor types always run in f32.

use crate::error::Result;
use crate::gguf::{GgmlType, GgufFile};
use kernels::matmul::matmul;
use kernels::qmatmul::{QActs, QFormat, QWeights, qmatmul};

/// How the weight matrices compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Every weight dequantized to f32: exact arithmetic, the golden-test reference, and
    /// today still the faster path for prefill and batched decode on AVX2 (see kernels/README.md).
    #[default]
    F32,
    /// Block-quantized weights as stored (5× less memory), 8-bit activations: faster
    /// single-stream decode.
    Int8,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "f32" => Ok(Precision::F32),
            "int8" => Ok(Precision::Int8),
            other => Err(format!("unknown precision '{other}' (f32 or int8)")),
        }
    }
}

/// An activation matrix `[m × k]`, quantized on first use by a quantized weight.
pub struct Acts<'a> {
    x: &'a [f32],
    m: usize,
    k: usize,
    q: Option<QActs>,
}

impl<'a> Acts<'a> {
    pub fn new(x: &'a [f32], m: usize, k: usize) -> Acts<'a> {
        assert_eq!(x.len(), m * k);
        Acts { x, m, k, q: None }
    }

    fn quantized(&mut self) -> &QActs {
        let (x, m, k) = (self.x, self.m, self.k);
        self.q.get_or_insert_with(|| QActs::quantize(x, m, k))
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
        match format {
            Some(format)
                if precision == Precision::Int8 && k.is_multiple_of(kernels::qmatmul::QK) =>
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
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Linear::F32 { w, .. } => w.len() * 4,
            Linear::Quant { bytes, .. } => bytes.len(),
        }
    }
}
