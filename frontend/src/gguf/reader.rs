//! Parsing a GGUF file into metadata and a tensor directory over a read-only memory map.

use super::{GgmlType, Metadata, TensorInfo, Value, corrupt};
use crate::error::{ModelError, Result};
use memmap2::Mmap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Nesting limit for arrays of arrays (real files use one level).
const MAX_DEPTH: usize = 4;

/// An opened GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    pub version: u32,
    metadata: HashMap<String, Value>,
    /// Keys in file order.
    keys: Vec<String>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    data_start: usize,
}

impl Metadata for GgufFile {
    fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| {
                corrupt(format!(
                    "file is truncated (needed {n} bytes at offset {}, file has {})",
                    self.pos,
                    self.buf.len()
                ))
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("length checked"))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    /// A count that must fit in what is left of the file at `min_each` bytes per item.
    fn count(&mut self, min_each: usize, what: &str) -> Result<usize> {
        let n = self.u64()?;
        if n > (self.remaining() / min_each.max(1)) as u64 {
            return Err(corrupt(format!(
                "{what} count {n} is larger than the file can hold"
            )));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String> {
        let n = self.count(1, "string length")?;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| corrupt("a string is not valid UTF-8"))
    }
    /// `n` strings into one [`Strings`]: two allocations, not `n`. The text is checked as
    /// UTF-8 once, with every string's end on a character boundary (so each string is valid).
    fn strings(&mut self, n: usize) -> Result<Value> {
        let mut text = Vec::new();
        let mut ends = Vec::with_capacity(n);
        for _ in 0..n {
            let len = self.count(1, "string length")?;
            text.extend_from_slice(self.take(len)?);
            ends.push(text.len());
        }
        let bad = || corrupt("a string is not valid UTF-8");
        // SIMD validation: a vocabulary is mostly multi-byte characters, where std's check
        // runs at ~1 GB/s.
        simdutf8::basic::from_utf8(&text).map_err(|_| bad())?;
        // SAFETY: validated just above.
        let text = unsafe { String::from_utf8_unchecked(text) };
        if !ends.iter().all(|&e| text.is_char_boundary(e)) {
            return Err(bad());
        }
        Ok(Value::Strings(super::Strings::from_parts(text, ends)))
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.arr::<1>()?[0]),
            1 => Value::I8(self.arr::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr()?)),
            3 => Value::I16(i16::from_le_bytes(self.arr()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.arr()?)),
            6 => Value::F32(f32::from_le_bytes(self.arr()?)),
            7 => Value::Bool(self.arr::<1>()?[0] != 0),
            8 => Value::String(self.string()?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(corrupt("arrays nested too deeply"));
                }
                let elem = self.u32()?;
                let min_each = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8..=12 => 8,
                    _ => return Err(corrupt(format!("unknown metadata value type {elem}"))),
                };
                let n = self.count(min_each, "array")?;
                if elem == 8 {
                    return self.strings(n);
                }
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(elem, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.arr()?)),
            12 => Value::F64(f64::from_le_bytes(self.arr()?)),
            other => return Err(corrupt(format!("unknown metadata value type {other}"))),
        })
    }
}

impl GgufFile {
    /// Opens and parses `path`; tensor data stays mapped, not read.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref().to_path_buf();
        let io = |source| ModelError::Io {
            path: path.clone(),
            source,
        };
        let file = std::fs::File::open(&path).map_err(io)?;
        // SAFETY: the map is read-only; a file changed underneath would be the operator's error,
        // and every access is bounds-checked against the map's length.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(path, mmap)
    }

    /// The whole file's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.mmap
    }

    fn parse(path: PathBuf, mmap: Mmap) -> Result<GgufFile> {
        let mut c = Cursor { buf: &mmap, pos: 0 };
        if c.take(4)
            .map_err(|_| corrupt("file is too short to be GGUF"))?
            != MAGIC
        {
            return Err(corrupt("missing the 'GGUF' magic bytes"));
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(ModelError::GgufVersion(version));
        }
        let n_tensors = c.count(8, "tensor")?;
        let n_kv = c.count(8, "metadata")?;
        let mut metadata = HashMap::with_capacity(n_kv);
        let mut keys = Vec::with_capacity(n_kv);
        for _ in 0..n_kv {
            let key = c.string()?;
            let ty = c.u32()?;
            let v = c.value(ty, 0)?;
            keys.push(key.clone());
            metadata.insert(key, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors);
        let mut by_name = HashMap::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string()?;
            let n_dims = c.u32()?;
            if n_dims == 0 || n_dims > 4 {
                return Err(corrupt(format!("tensor '{name}' has {n_dims} dimensions")));
            }
            let dims = (0..n_dims).map(|_| c.u64()).collect::<Result<Vec<_>>>()?;
            let ty = GgmlType::from_code(c.u32()?);
            let offset = c.u64()?;
            if by_name.insert(name.clone(), tensors.len()).is_some() {
                return Err(corrupt(format!("tensor '{name}' appears twice")));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
            });
        }
        let alignment = match metadata.get("general.alignment") {
            Some(v) => v
                .as_u64()
                .filter(|a| *a > 0 && a.is_power_of_two())
                .ok_or_else(|| corrupt("bad general.alignment"))?,
            None => DEFAULT_ALIGNMENT,
        };
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let data_len = (mmap.len() as u64).saturating_sub(data_start);
        for t in &tensors {
            let n = t
                .dims
                .iter()
                .try_fold(1u64, |a, d| a.checked_mul(*d))
                .ok_or_else(|| corrupt(format!("tensor '{}' is too large", t.name)))?;
            if let Some(bytes) = t.ty.bytes_for(n) {
                if t.offset.checked_add(bytes).is_none_or(|end| end > data_len) {
                    return Err(corrupt(format!(
                        "tensor '{}' ({} bytes at data offset {}) runs past the end of the file (truncated?)",
                        t.name, bytes, t.offset
                    )));
                }
            } else if t.ty.block_layout().is_some() {
                return Err(corrupt(format!(
                    "tensor '{}' is not a whole number of {} blocks",
                    t.name,
                    t.ty.name()
                )));
            }
        }
        Ok(GgufFile {
            path,
            mmap,
            version,
            metadata,
            keys,
            tensors,
            by_name,
            data_start: data_start as usize,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Metadata keys in file order.
    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor of a readable type.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> Result<&[u8]> {
        let bytes = info.ty.bytes_for(info.n_elements()).ok_or_else(|| {
            ModelError::UnsupportedTensorType {
                tensor: info.name.clone(),
                ty: info.ty.name(),
            }
        })?;
        let start = self.data_start + info.offset as usize;
        Ok(&self.mmap[start..start + bytes as usize])
    }

    /// The directory entry of a tensor that must have exactly `want` dims (GGML order).
    pub fn tensor_shaped(&self, name: &str, want: &[u64]) -> Result<&TensorInfo> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        // Trailing 1-dims are equivalent.
        let trim = |d: &[u64]| {
            let mut v = d.to_vec();
            while v.len() > 1 && v.last() == Some(&1) {
                v.pop();
            }
            v
        };
        if trim(&info.dims) != trim(want) {
            return Err(ModelError::TensorShape {
                name: name.into(),
                got: info.dims.clone(),
                want: want.to_vec(),
            });
        }
        Ok(info)
    }
}
