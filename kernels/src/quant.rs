//! GGML block formats, dequantized exactly to f32.
//!
//! | format | block | bytes | value |
//! |---|---|---|---|
//! | Q4_0 | 32 | 18: f16 `d`, 16 nibble bytes | `(q − 8)·d` |
//! | Q4_1 | 32 | 20: f16 `d`, f16 `m`, 16 nibble bytes | `q·d + m` |
//! | Q8_0 | 32 | 34: f16 `d`, 32 × i8 | `q·d` |
//!
//! Nibble layout (as ggml stores it): byte `j` holds element `j` in its low nibble and
//! element `j + 16` in its high nibble.

use half::{bf16, f16};

/// Elements per block of the 32-element formats.
pub const QK: usize = 32;

/// A block format's geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockFormat {
    /// Elements per block.
    pub block: usize,
    /// Bytes per block.
    pub bytes: usize,
}

pub const Q4_0: BlockFormat = BlockFormat {
    block: QK,
    bytes: 18,
};
pub const Q4_1: BlockFormat = BlockFormat {
    block: QK,
    bytes: 20,
};
pub const Q8_0: BlockFormat = BlockFormat {
    block: QK,
    bytes: 34,
};

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn check(src: &[u8], out: &[f32], fmt: BlockFormat) {
    assert_eq!(
        out.len() % fmt.block,
        0,
        "length is not a whole number of blocks"
    );
    assert_eq!(src.len(), out.len() / fmt.block * fmt.bytes, "source size");
}

pub fn dequantize_q4_0(src: &[u8], out: &mut [f32]) {
    check(src, out, Q4_0);
    for (b, o) in src.chunks_exact(Q4_0.bytes).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(b, 0);
        for j in 0..16 {
            let q = b[2 + j];
            o[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
            o[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
        }
    }
}

pub fn dequantize_q4_1(src: &[u8], out: &mut [f32]) {
    check(src, out, Q4_1);
    for (b, o) in src.chunks_exact(Q4_1.bytes).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(b, 0);
        let m = f16_at(b, 2);
        for j in 0..16 {
            let q = b[4 + j];
            o[j] = (q & 0x0f) as f32 * d + m;
            o[j + 16] = (q >> 4) as f32 * d + m;
        }
    }
}

pub fn dequantize_q8_0(src: &[u8], out: &mut [f32]) {
    check(src, out, Q8_0);
    for (b, o) in src.chunks_exact(Q8_0.bytes).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(b, 0);
        for j in 0..QK {
            o[j] = (b[2 + j] as i8) as f32 * d;
        }
    }
}

pub fn dequantize_f16(src: &[u8], out: &mut [f32]) {
    assert_eq!(src.len(), out.len() * 2);
    for (b, o) in src.chunks_exact(2).zip(out.iter_mut()) {
        *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
    }
}

pub fn dequantize_bf16(src: &[u8], out: &mut [f32]) {
    assert_eq!(src.len(), out.len() * 2);
    for (b, o) in src.chunks_exact(2).zip(out.iter_mut()) {
        *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
    }
}

pub fn dequantize_f32(src: &[u8], out: &mut [f32]) {
    assert_eq!(src.len(), out.len() * 4);
    for (b, o) in src.chunks_exact(4).zip(out.iter_mut()) {
        *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

/// Quantizes to Q4_0 the way ggml's reference does (used by tests to write real GGUF files).
pub fn quantize_q4_0(x: &[f32]) -> Vec<u8> {
    assert_eq!(x.len() % QK, 0);
    let mut out = Vec::with_capacity(x.len() / QK * Q4_0.bytes);
    for blk in x.chunks_exact(QK) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in blk {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        for j in 0..16 {
            let q0 = ((blk[j] * id + 8.5) as i32).min(15) as u8;
            let q1 = ((blk[j + 16] * id + 8.5) as i32).min(15) as u8;
            out.push(q0 | (q1 << 4));
        }
    }
    out
}

/// Quantizes to Q4_1 (ggml's reference rounding).
pub fn quantize_q4_1(x: &[f32]) -> Vec<u8> {
    assert_eq!(x.len() % QK, 0);
    let mut out = Vec::with_capacity(x.len() / QK * Q4_1.bytes);
    for blk in x.chunks_exact(QK) {
        let min = blk.iter().copied().fold(f32::INFINITY, f32::min);
        let max = blk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
        for j in 0..16 {
            let q0 = (((blk[j] - min) * id + 0.5) as u8).min(15);
            let q1 = (((blk[j + 16] - min) * id + 0.5) as u8).min(15);
            out.push(q0 | (q1 << 4));
        }
    }
    out
}

/// Quantizes to Q8_0 (ggml's reference rounding).
pub fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    assert_eq!(x.len() % QK, 0);
    let mut out = Vec::with_capacity(x.len() / QK * Q8_0.bytes);
    for blk in x.chunks_exact(QK) {
        let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        for &v in blk {
            out.push(((v * id).round() as i8) as u8);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data() -> impl Strategy<Value = Vec<f32>> {
        (1usize..6).prop_flat_map(|nb| proptest::collection::vec(-3.0f32..3.0, nb * QK))
    }

    /// Decodes one element straight from the format's definition (the table above).
    fn element(fmt: &str, b: &[u8], j: usize) -> f32 {
        let d = f16_at(b, 0);
        match fmt {
            "q4_0" => {
                let q = if j < 16 {
                    b[2 + j] & 15
                } else {
                    b[2 + j - 16] >> 4
                };
                (q as f32 - 8.0) * d
            }
            "q4_1" => {
                let q = if j < 16 {
                    b[4 + j] & 15
                } else {
                    b[4 + j - 16] >> 4
                };
                q as f32 * d + f16_at(b, 2)
            }
            _ => (b[2 + j] as i8) as f32 * d,
        }
    }

    proptest! {
        #[test]
        fn roundtrip_within_half_step(x in data()) {
            for (name, q, fmt, deq) in [
                ("q4_0", quantize_q4_0(&x), Q4_0, dequantize_q4_0 as fn(&[u8], &mut [f32])),
                ("q4_1", quantize_q4_1(&x), Q4_1, dequantize_q4_1),
                ("q8_0", quantize_q8_0(&x), Q8_0, dequantize_q8_0),
            ] {
                let mut y = vec![0f32; x.len()];
                deq(&q, &mut y);
                for (bi, (blk, yb)) in x.chunks(QK).zip(y.chunks(QK)).enumerate() {
                    let raw = &q[bi * fmt.bytes..(bi + 1) * fmt.bytes];
                    let step = match name {
                        "q4_1" => f16_at(raw, 0).abs(),
                        _ => f16_at(raw, 0).abs(),
                    };
                    for j in 0..QK {
                        prop_assert_eq!(yb[j].to_bits(), element(name, raw, j).to_bits());
                        // within one quantization step (+ f16 rounding of the scales)
                        prop_assert!((yb[j] - blk[j]).abs() <= step * 1.01 + 2e-3 * blk[j].abs() + 1e-3, "{name}: {} vs {}", yb[j], blk[j]);
                    }
                }
            }
        }

        #[test]
        fn float_formats_roundtrip(x in proptest::collection::vec(-1e4f32..1e4, 1..100)) {
            let h: Vec<u8> = x.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect();
            let b: Vec<u8> = x.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect();
            let f: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
            let (mut yh, mut yb, mut yf) = (vec![0f32; x.len()], vec![0f32; x.len()], vec![0f32; x.len()]);
            dequantize_f16(&h, &mut yh);
            dequantize_bf16(&b, &mut yb);
            dequantize_f32(&f, &mut yf);
            for i in 0..x.len() {
                prop_assert_eq!(yf[i], x[i]);
                prop_assert!((yh[i] - x[i]).abs() <= x[i].abs() * 1e-3 + 1e-4);
                prop_assert!((yb[i] - x[i]).abs() <= x[i].abs() * 8e-3 + 1e-30);
            }
        }
    }
}
