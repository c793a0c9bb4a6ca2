//! GGUF files (versions 2 and 3): metadata, tensor directory, memory-mapped tensor data.
//!
//! The reader validates every length and offset against the file size, so a truncated or
//! corrupt file is an [`ModelError::Gguf`], never a panic or a huge allocation.

mod reader;
mod writer;

pub use reader::GgufFile;
pub use writer::GgufWriter;

use crate::error::{ModelError, Result};

/// GGML tensor element types (the numeric codes are GGUF's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    Bf16,
    /// A type this loader knows by number only; reading it is an error.
    Other(u32),
}

impl GgmlType {
    pub fn from_code(c: u32) -> GgmlType {
        match c {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::Bf16,
            other => GgmlType::Other(other),
        }
    }

    pub fn code(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::Bf16 => 30,
            GgmlType::Other(c) => c,
        }
    }

    /// GGML's name for the type.
    pub fn name(self) -> String {
        let known = [
            "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K",
            "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S",
            "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M",
            "BF16",
        ];
        known
            .get(self.code() as usize)
            .map(|s| s.to_string())
            .unwrap_or_else(|| format!("type #{}", self.code()))
    }

    /// (elements per block, bytes per block) for the types Tandem reads.
    pub fn block_layout(self) -> Option<(usize, usize)> {
        match self {
            GgmlType::F32 => Some((1, 4)),
            GgmlType::F16 | GgmlType::Bf16 => Some((1, 2)),
            GgmlType::Q4_0 => Some((32, 18)),
            GgmlType::Q4_1 => Some((32, 20)),
            GgmlType::Q8_0 => Some((32, 34)),
            GgmlType::Other(_) => None,
        }
    }

    /// Bytes that `n` elements take, if the type is readable and `n` is whole blocks.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let (blk, bytes) = self.block_layout()?;
        n.is_multiple_of(blk as u64)
            .then(|| n / blk as u64 * bytes as u64)
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    /// An array of strings (what the reader makes of every one).
    Strings(Strings),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
    pub fn as_strings(&self) -> Option<&Strings> {
        match self {
            Value::Strings(a) => Some(a),
            _ => None,
        }
    }
}

/// An array of strings held as one text and where each ends: a vocabulary's ~50,000 tokens
/// and merges parse without an allocation each.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Strings {
    text: String,
    ends: Vec<usize>,
}

impl Strings {
    pub(crate) fn from_parts(text: String, ends: Vec<usize>) -> Strings {
        debug_assert!(ends.windows(2).all(|w| w[0] <= w[1]) && ends.last() <= Some(&text.len()));
        Strings { text, ends }
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn get(&self, i: usize) -> Option<&str> {
        let end = *self.ends.get(i)?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        Some(&self.text[start..end])
    }

    pub fn push(&mut self, s: &str) {
        self.text.push_str(s);
        self.ends.push(self.text.len());
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        (0..self.len()).map(|i| self.get(i).expect("in range"))
    }
}

impl<S: AsRef<str>> FromIterator<S> for Strings {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        let mut out = Strings::default();
        for s in iter {
            out.push(s.as_ref());
        }
        out
    }
}

/// One entry of the tensor directory.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// GGML order: `dims[0]` is the contiguous (innermost) dimension.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

pub(crate) fn corrupt(msg: impl Into<String>) -> ModelError {
    ModelError::Gguf(msg.into())
}

/// Typed metadata look-ups shared by the reader's users.
pub trait Metadata {
    fn get(&self, key: &str) -> Option<&Value>;

    fn req(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| ModelError::MissingKey(key.to_string()))
    }
    fn u64_req(&self, key: &str) -> Result<u64> {
        self.req(key)?.as_u64().ok_or(ModelError::WrongType {
            key: key.into(),
            expected: "integer",
        })
    }
    fn u64_opt(&self, key: &str) -> Result<Option<u64>> {
        self.get(key)
            .map(|v| {
                v.as_u64().ok_or(ModelError::WrongType {
                    key: key.into(),
                    expected: "integer",
                })
            })
            .transpose()
    }
    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| {
                v.as_f64().ok_or(ModelError::WrongType {
                    key: key.into(),
                    expected: "number",
                })
            })
            .transpose()
    }
    fn str_req(&self, key: &str) -> Result<&str> {
        self.req(key)?.as_str().ok_or(ModelError::WrongType {
            key: key.into(),
            expected: "string",
        })
    }
    fn str_opt(&self, key: &str) -> Result<Option<&str>> {
        self.get(key)
            .map(|v| {
                v.as_str().ok_or(ModelError::WrongType {
                    key: key.into(),
                    expected: "string",
                })
            })
            .transpose()
    }
    fn strings_opt(&self, key: &str) -> Result<Option<&Strings>> {
        self.get(key)
            .map(|v| {
                v.as_strings().ok_or(ModelError::WrongType {
                    key: key.into(),
                    expected: "array of strings",
                })
            })
            .transpose()
    }
    fn array_opt(&self, key: &str) -> Result<Option<&[Value]>> {
        self.get(key)
            .map(|v| {
                v.as_array().ok_or(ModelError::WrongType {
                    key: key.into(),
                    expected: "array",
                })
            })
            .transpose()
    }
}
