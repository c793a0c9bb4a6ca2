//! A GGUF file's tensors as f32: exact dequantization of every type Tandem reads (the
//! `kernels::quant` routines; the file format itself is `frontend::gguf`).

use crate::error::Result;
use crate::gguf::{GgmlType, GgufFile, GgufWriter, Metadata, Value};
use frontend::ModelError;
use std::path::Path;

/// Dequantizing reads of a [`GgufFile`]'s tensors.
pub trait TensorsF32 {
    /// A tensor dequantized exactly to f32, in GGML order.
    fn tensor_f32(&self, name: &str) -> Result<Vec<f32>>;
    /// A tensor that must have exactly `want` dims (GGML order), dequantized.
    fn tensor_f32_shaped(&self, name: &str, want: &[u64]) -> Result<Vec<f32>>;
}

impl TensorsF32 for GgufFile {
    fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        Ok(dequantize(info.ty, self.tensor_bytes(info)?))
    }

    fn tensor_f32_shaped(&self, name: &str, want: &[u64]) -> Result<Vec<f32>> {
        self.tensor_shaped(name, want)?;
        self.tensor_f32(name)
    }
}

/// GGUF-encoded elements of type `ty` (whole blocks), dequantized exactly.
pub fn dequantize(ty: GgmlType, src: &[u8]) -> Vec<f32> {
    let (blk, bytes) = ty.block_layout().expect("a readable type");
    let mut out = vec![0f32; src.len() / bytes * blk];
    use kernels::quant::*;
    match ty {
        GgmlType::F32 => dequantize_f32(src, &mut out),
        GgmlType::F16 => dequantize_f16(src, &mut out),
        GgmlType::Bf16 => dequantize_bf16(src, &mut out),
        GgmlType::Q4_0 => dequantize_q4_0(src, &mut out),
        GgmlType::Q4_1 => dequantize_q4_1(src, &mut out),
        GgmlType::Q8_0 => dequantize_q8_0(src, &mut out),
        GgmlType::Other(_) => unreachable!("block_layout rejects unreadable types"),
    }
    out
}

/// `data` GGUF-encoded as `ty` (the inverse of [`dequantize`], exact for the float types).
pub fn encode(ty: GgmlType, data: &[f32]) -> Vec<u8> {
    use half::{bf16, f16};
    use kernels::quant::{quantize_q4_0, quantize_q4_1, quantize_q8_0};
    match ty {
        GgmlType::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => data
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
        GgmlType::Bf16 => data
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect(),
        GgmlType::Q4_0 => quantize_q4_0(data),
        GgmlType::Q4_1 => quantize_q4_1(data),
        GgmlType::Q8_0 => quantize_q8_0(data),
        GgmlType::Other(_) => unreachable!("not a type Tandem writes"),
    }
}

/// Writes an exact F32 copy of `src`: every tensor dequantized, all metadata kept
/// (`general.file_type` set to 0, ALL_F32). llama.cpp then runs it without activation
/// quantization, which makes it an exact-arithmetic oracle for Tandem's f32 path.
pub fn export_f32(src: &GgufFile, dst: impl AsRef<Path>) -> Result<()> {
    let mut w = GgufWriter::new();
    for k in src.keys() {
        if k == "general.alignment" {
            continue;
        }
        let v = if k == "general.file_type" {
            Value::U32(0)
        } else {
            src.get(k).expect("key listed").clone()
        };
        w.meta(k.clone(), v);
    }
    for t in src.tensors() {
        let data = src.tensor_f32(&t.name)?;
        w.tensor_f32(t.name.clone(), &t.dims, &data);
    }
    Ok(w.write(dst)?)
}
