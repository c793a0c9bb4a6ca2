//! Weight matrices in device memory and the matmul that reads them.
//!
//! A GGML block tensor (Q4_0, Q4_1, Q8_0) keeps its stored values, twice: block-major (`[b][n]`:
//! the quantized values, then the `d` scales, then the Q4_1 `m` minimums), read by the kernel
//! that gives each thread an output channel (many rows: consecutive threads read consecutive
//! bytes), and row-major (`[n][b]`, the same three parts), read by the kernel that gives each
//! warp a channel (few rows: its lanes read consecutive blocks). Both compute the CPU's bits, so
//! which one runs never changes an output. Anything else (or every tensor at f32) is
//! dequantized to f32, stored `[k][n]`.

use super::{Gpu, dev};
use crate::error::Result;
use crate::gguf::{GgmlType, GgufFile};
use crate::linear::Precision;
use crate::weights::TensorsF32;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};

/// Threads per block of the matmul kernels; rows per thread (the kernels' `RT`).
const MM_THREADS: u32 = 64;
const MM_ROWS: usize = 8;
/// Calls of up to this many rows run the warp-per-channel kernel.
const WARP_ROWS: usize = 64;

/// A weight matrix of `n` output channels by `k` inputs, on the device.
pub(super) enum DevLinear {
    /// `fmt`: 0 Q4_0, 1 Q4_1, 2 Q8_0 (the kernels' numbering).
    Quant {
        fmt: u8,
        n: usize,
        k: usize,
        /// Block-major.
        w: CudaSlice<u8>,
        /// Row-major.
        w_rows: CudaSlice<u8>,
    },
    F32 {
        n: usize,
        k: usize,
        w: CudaSlice<f32>,
    },
    /// Matrices of different formats stacked by output channel: each writes its columns.
    Parts(Vec<DevLinear>),
}

/// A block format's number in the kernels, and its stored bytes: (quantized values, block).
fn format_of(ty: GgmlType) -> Option<(u8, usize, usize)> {
    match ty {
        GgmlType::Q4_0 => Some((0, 16, 18)),
        GgmlType::Q4_1 => Some((1, 16, 20)),
        GgmlType::Q8_0 => Some((2, 32, 34)),
        _ => None,
    }
}

/// Row-major GGUF blocks (`n` rows of `k / 32` blocks) → the device layouts: block-major
/// (`[b][n]` entries) or row-major (`[n][b]`).
fn device_layout(fmt: u8, rows: &[u8], n: usize, k: usize, by_block: bool) -> Vec<u8> {
    let (qb, bb) = match fmt {
        0 => (16, 18),
        1 => (16, 20),
        _ => (32, 34),
    };
    let nb = k / 32;
    let mut out = vec![0u8; nb * n * (qb + 4)];
    let (qs, rest) = out.split_at_mut(nb * n * qb);
    let (ds, ms) = rest.split_at_mut(nb * n * 2);
    for j in 0..n {
        for b in 0..nb {
            let blk = &rows[(j * nb + b) * bb..][..bb];
            let at = if by_block { b * n + j } else { j * nb + b };
            ds[2 * at..2 * at + 2].copy_from_slice(&blk[..2]);
            if fmt == 1 {
                ms[2 * at..2 * at + 2].copy_from_slice(&blk[2..4]);
            }
            qs[at * qb..(at + 1) * qb].copy_from_slice(&blk[bb - qb..]);
        }
    }
    out
}

/// `[n × k]` row-major → `[k × n]`.
fn transpose(w: &[f32], n: usize, k: usize) -> Vec<f32> {
    let mut t = vec![0f32; w.len()];
    for j in 0..n {
        for i in 0..k {
            t[i * n + j] = w[j * k + i];
        }
    }
    t
}

impl DevLinear {
    /// Uploads `name` (GGML shape `[k, n]`): as stored at w4a8 when its format has a kernel,
    /// else dequantized.
    pub(super) fn load(
        gpu: &Gpu,
        g: &GgufFile,
        name: &str,
        shape: &[u64],
        precision: Precision,
    ) -> Result<DevLinear> {
        Self::load_stacked(gpu, g, &[(name, shape)], precision)
    }

    /// Several matrices with the same input width, stacked by output channel (Q, K and V;
    /// gate and up): one matrix when they share a format, else parts.
    pub(super) fn load_stacked(
        gpu: &Gpu,
        g: &GgufFile,
        parts: &[(&str, &[u64])],
        precision: Precision,
    ) -> Result<DevLinear> {
        let k = parts[0].1[0] as usize;
        let mut infos = Vec::new();
        for (name, shape) in parts {
            infos.push(g.tensor_shaped(name, shape)?);
        }
        let n: usize = parts
            .iter()
            .map(|(_, s)| s.get(1).copied().unwrap_or(1) as usize)
            .sum();
        let quant =
            |ty| format_of(ty).filter(|_| precision == Precision::W4A8 && k.is_multiple_of(32));
        if let Some((fmt, _, _)) = quant(infos[0].ty)
            && infos.iter().all(|i| i.ty == infos[0].ty)
        {
            let mut rows = Vec::new();
            for info in &infos {
                rows.extend_from_slice(g.tensor_bytes(info)?);
            }
            let w = gpu.upload(&device_layout(fmt, &rows, n, k, true))?;
            let w_rows = gpu.upload(&device_layout(fmt, &rows, n, k, false))?;
            return Ok(DevLinear::Quant {
                fmt,
                n,
                k,
                w,
                w_rows,
            });
        }
        if parts.len() > 1 && infos.iter().any(|i| quant(i.ty).is_some()) {
            return Ok(DevLinear::Parts(
                parts
                    .iter()
                    .map(|(name, shape)| Self::load(gpu, g, name, shape, precision))
                    .collect::<Result<_>>()?,
            ));
        }
        let mut w = Vec::with_capacity(n * k);
        for (name, _) in parts {
            w.extend(g.tensor_f32(name)?);
        }
        Ok(DevLinear::F32 {
            n,
            k,
            w: gpu.upload(&transpose(&w, n, k))?,
        })
    }

    pub(super) fn dims(&self) -> (usize, usize) {
        match self {
            DevLinear::Quant { n, k, .. } | DevLinear::F32 { n, k, .. } => (*n, *k),
            DevLinear::Parts(ps) => (ps.iter().map(|p| p.dims().0).sum(), ps[0].dims().1),
        }
    }

    pub(super) fn bytes(&self) -> usize {
        match self {
            DevLinear::Quant { w, w_rows, .. } => w.len() + w_rows.len(),
            DevLinear::F32 { w, .. } => w.len() * 4,
            DevLinear::Parts(ps) => ps.iter().map(DevLinear::bytes).sum(),
        }
    }

    /// Whether any part reads quantized activations (the producer may quantize as it writes).
    pub(super) fn wants_quantized(&self) -> bool {
        match self {
            DevLinear::Quant { .. } => true,
            DevLinear::F32 { .. } => false,
            DevLinear::Parts(ps) => ps.iter().any(DevLinear::wants_quantized),
        }
    }

    /// The embedding kernel's view: the format's number (3 for f32) and the block-major (or
    /// `[k][n]` f32) table's device address; `None` for stacked parts.
    pub(super) fn embed_args(&self, stream: &CudaStream) -> Option<(i32, u64)> {
        match self {
            DevLinear::Quant { fmt, w, .. } => Some((*fmt as i32, w.device_ptr(stream).0)),
            DevLinear::F32 { w, .. } => Some((3, w.device_ptr(stream).0)),
            DevLinear::Parts(_) => None,
        }
    }

    /// `y[r, col0..col0 + n] (+)= x[r] · Wᵀ` for the `acts.rows` rows; `y` has `ldy` columns.
    pub(super) fn forward(
        &self,
        gpu: &Gpu,
        acts: &mut DevActs<'_>,
        y: &mut CudaSlice<f32>,
        ldy: usize,
        col0: usize,
        add: bool,
    ) -> Result<()> {
        let r = acts.rows;
        if r == 0 {
            return Ok(());
        }
        let (n, k) = self.dims();
        let cfg = LaunchConfig {
            grid_dim: (
                (n as u32).div_ceil(MM_THREADS),
                r.div_ceil(MM_ROWS) as u32,
                1,
            ),
            block_dim: (MM_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (ri, ni, ki, ldyi, c0, addi) = (
            r as i32,
            n as i32,
            k as i32,
            ldy as i32,
            col0 as i32,
            add as i32,
        );
        match self {
            DevLinear::Quant { fmt, w, w_rows, .. } => {
                let q = acts.quantized(gpu)?;
                let few = r <= WARP_ROWS;
                let (f, w, cfg) = if few {
                    // Four warps a block, a channel each.
                    let cfg = LaunchConfig {
                        grid_dim: ((n as u32).div_ceil(4), r.div_ceil(MM_ROWS) as u32, 1),
                        block_dim: (128, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    (&gpu.k.mm_qw[*fmt as usize], w_rows, cfg)
                } else {
                    (&gpu.k.mm_q[*fmt as usize], w, cfg)
                };
                let mut b = gpu.stream.launch_builder(f);
                b.arg(w).arg(&q.q).arg(&q.d).arg(&q.s).arg(&q.sum).arg(y);
                b.arg(&ri).arg(&ni).arg(&ki).arg(&ldyi).arg(&c0).arg(&addi);
                // SAFETY: the buffers hold the shapes the kernel indexes (rows × k acts, the
                // matrix's layout, y of r × ldy with col0 + n ≤ ldy).
                unsafe { b.launch(cfg) }.map_err(dev)?;
            }
            DevLinear::F32 { w, .. } => {
                let mut b = gpu.stream.launch_builder(&gpu.k.mm_f32);
                b.arg(w).arg(acts.x).arg(y);
                b.arg(&ri).arg(&ni).arg(&ki).arg(&ldyi).arg(&c0).arg(&addi);
                // SAFETY: as above.
                unsafe { b.launch(cfg) }.map_err(dev)?;
            }
            DevLinear::Parts(ps) => {
                let mut col = col0;
                for p in ps {
                    p.forward(gpu, acts, y, ldy, col, add)?;
                    col += p.dims().0;
                }
            }
        }
        Ok(())
    }
}

/// Activations quantized per block of 32 on the device (kernels::qmatmul's `QActs`).
pub(super) struct DevQActs {
    pub q: CudaSlice<i8>,
    pub d: CudaSlice<f32>,
    pub s: CudaSlice<f32>,
    pub sum: CudaSlice<i32>,
}

/// An activation matrix `[rows × k]` on the device, quantized on first use by a quantized
/// matrix.
pub(super) struct DevActs<'a> {
    pub x: &'a CudaSlice<f32>,
    pub rows: usize,
    pub k: usize,
    q: Option<DevQActs>,
}

impl DevQActs {
    /// Room for `rows × k` activations (`k` a multiple of 32), written by a quantizing kernel
    /// before any read.
    pub(super) fn alloc(gpu: &Gpu, rows: usize, k: usize) -> Result<DevQActs> {
        let blocks = rows * k / 32;
        Ok(DevQActs {
            q: gpu.scratch::<i8>(blocks * 32)?,
            d: gpu.scratch::<f32>(blocks)?,
            s: gpu.scratch::<f32>(blocks)?,
            sum: gpu.scratch::<i32>(blocks)?,
        })
    }
}

impl<'a> DevActs<'a> {
    pub(super) fn new(x: &'a CudaSlice<f32>, rows: usize, k: usize) -> DevActs<'a> {
        DevActs {
            x,
            rows,
            k,
            q: None,
        }
    }

    /// Activations whose kernel also quantized them into `q`.
    pub(super) fn quantized_by_producer(
        x: &'a CudaSlice<f32>,
        rows: usize,
        k: usize,
        q: Option<DevQActs>,
    ) -> DevActs<'a> {
        DevActs { x, rows, k, q }
    }

    fn quantized(&mut self, gpu: &Gpu) -> Result<&DevQActs> {
        if self.q.is_none() {
            let blocks = self.rows * self.k / 32;
            let mut qa = DevQActs::alloc(gpu, self.rows, self.k)?;
            let nb = blocks as i32;
            let mut b = gpu.stream.launch_builder(&gpu.k.quantize);
            b.arg(self.x)
                .arg(&mut qa.q)
                .arg(&mut qa.d)
                .arg(&mut qa.s)
                .arg(&mut qa.sum)
                .arg(&nb);
            // SAFETY: x holds blocks × 32 values; the outputs were sized above.
            unsafe { b.launch(LaunchConfig::for_num_elems(blocks as u32)) }.map_err(dev)?;
            self.q = Some(qa);
        }
        Ok(self.q.as_ref().expect("set above"))
    }
}
