//! The CUDA backend (cargo feature `cuda`, `--device cuda`): the Llama forward pass on an NVIDIA
//! GPU through cudarc, behind the same [`Backend`] seam as the CPU.
//!
//! - Libraries are loaded at run time (cudarc's `dynamic-loading`): a binary built with the
//!   feature starts anywhere, and asking for CUDA where there is none is an error, not a crash.
//! - Kernels are CUDA C ([`kernels.cu`](./kernels.cu)) compiled by NVRTC when the model loads,
//!   for the device's architecture and the model's head dimension.
//! - Weights are uploaded once, GGML blocks as stored ([`weights`]). The quantized matmul
//!   computes the CPU's scalar definition step for step, so its outputs are the CPU's bits;
//!   attention and SiLU use the device's `expf`, so logits differ from the CPU's in the last
//!   bits, and the fingerprint says so ([`crate::Device`]).
//! - Every output has one fixed reduction order, whatever the batch: batch-invariant.
//! - KV: the host [`crate::KvPool`] stays the one place blocks are allocated, cached, hashed
//!   and shipped; each pool gets a device copy of the same byte layout ([`pool`]). A forward
//!   uploads the blocks whose host generation moved (received, adopted, fetched from the
//!   store), writes new K/V on the device, and copies the new rows back into the host pool,
//!   so the prefix cache, the KV push (staged through host memory) and the pooled store work
//!   unchanged.

mod pool;
mod weights;

use crate::Backend;
use crate::config::LlamaConfig;
use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::kv::{KvDtype, KvLayout};
use crate::linear::Precision;
use crate::model::{ForwardItem, LayerHook, LogitsWanted};
use crate::weights::TensorsF32;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};
use pool::DevicePools;
use std::sync::{Arc, Mutex};
use weights::{DevActs, DevLinear, DevQActs};

const SOURCE: &str = include_str!("kernels.cu");

fn dev(e: impl std::fmt::Debug) -> EngineError {
    EngineError::Device(format!("{e:?}"))
}

/// Whether this machine can run the CUDA backend: the driver and NVRTC load and a device
/// answers. `Err` says what is missing.
pub fn available() -> std::result::Result<String, String> {
    // SAFETY: only tries to load the libraries.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("no CUDA driver (libcuda.so) on this machine".into());
    }
    // SAFETY: as above.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(
            "NVRTC (libnvrtc.so) not found: put CUDA's lib directory on LD_LIBRARY_PATH".into(),
        );
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => {
            let ctx = CudaContext::new(0).map_err(|e| format!("{e:?}"))?;
            ctx.name().map_err(|e| format!("{e:?}"))
        }
        Ok(_) => Err("the CUDA driver sees no device".into()),
        Err(e) => Err(format!("the CUDA driver fails: {e:?}")),
    }
}

/// The compiled kernels.
struct Kernels {
    rms_norm: CudaFunction,
    quantize: CudaFunction,
    mm_q: [CudaFunction; 3],
    mm_qw: [CudaFunction; 3],
    mm_f32: CudaFunction,
    embed: CudaFunction,
    rope_store: CudaFunction,
    attention: CudaFunction,
    silu_mul: CudaFunction,
    silu_mul_q: CudaFunction,
}

/// The device, its stream and kernels.
pub(crate) struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    k: Kernels,
}

impl Gpu {
    fn upload<T: cudarc::driver::DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(host).map_err(dev)
    }
    /// Uninitialized device memory, every element of which the caller's kernels write first.
    fn scratch<T: cudarc::driver::DeviceRepr>(&self, n: usize) -> Result<CudaSlice<T>> {
        // SAFETY: callers write before they read (each use says so).
        unsafe { self.stream.alloc::<T>(n.max(1)) }.map_err(dev)
    }
}

struct Layer {
    attn_norm: CudaSlice<f32>,
    wqkv: DevLinear,
    wo: DevLinear,
    ffn_norm: CudaSlice<f32>,
    w_gate_up: DevLinear,
    w_down: DevLinear,
}

/// A Llama-family model on a CUDA device.
pub struct CudaModel {
    cfg: LlamaConfig,
    gpu: Gpu,
    name: String,
    kv_dtype: KvDtype,
    token_embd: DevLinear,
    output: Option<DevLinear>,
    output_norm: CudaSlice<f32>,
    layers: Vec<Layer>,
    /// The device copies of the host pools this model computes in, and which blocks they hold.
    pools: Mutex<DevicePools>,
    /// Where forward calls' time went since [`Backend::profile`] last read it.
    phases: Mutex<Phases>,
}

/// Milliseconds of forward calls by phase.
#[derive(Default)]
struct Phases {
    calls: u64,
    /// Host: laying out rows, uploading stale blocks and the rows' arrays.
    prep: f64,
    /// Host: queueing the kernels.
    launch: f64,
    /// Device: from the first kernel to the logits (CUDA events).
    device: f64,
    /// Host: waiting for the device and the copies back.
    wait: f64,
    /// Host: the new K/V into the host pools, layer hooks.
    write_back: f64,
}

impl CudaModel {
    /// Uploads every weight at `precision` (w4a8: GGML blocks as stored; f32) and compiles the
    /// kernels for this model and `kv_dtype` (f16 or f32).
    pub fn load(g: &GgufFile, precision: Precision, kv_dtype: KvDtype) -> Result<CudaModel> {
        let device = available().map_err(EngineError::Device)?;
        if precision == Precision::Int8 {
            return Err(EngineError::Device(
                "int8 (W8A8) runs on the CPU only; on CUDA use w4a8 or f32".into(),
            ));
        }
        if kv_dtype == KvDtype::Int8 {
            return Err(EngineError::Device(
                "an int8 KV cache runs on the CPU only; on CUDA use f16 or f32".into(),
            ));
        }
        let cfg = LlamaConfig::from_metadata(g)?;
        if cfg.head_dim > 256 || cfg.head_dim % 2 != 0 {
            return Err(EngineError::Device(format!(
                "head dimension {} (the kernels take even ones up to 256)",
                cfg.head_dim
            )));
        }
        let ctx = CudaContext::new(0).map_err(dev)?;
        let stream = ctx.default_stream();
        let k = compile(&ctx, cfg.head_dim, kv_dtype)?;
        // Attention keeps a float per visible position and a block id per block in shared memory.
        let shared = (cfg.n_ctx * 4 + cfg.n_ctx.div_ceil(crate::kv::BLOCK_SIZE) * 4) as i32;
        if shared > 48 << 10 {
            k.attention
                .set_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    shared,
                )
                .map_err(|e| {
                    EngineError::Device(format!(
                        "a context of {} positions needs {shared} bytes of shared memory: {e:?}",
                        cfg.n_ctx
                    ))
                })?;
        }
        let gpu = Gpu { ctx, stream, k };
        let (d, kvd, ff, v) = (
            cfg.d_model as u64,
            cfg.kv_dim() as u64,
            cfg.d_ff as u64,
            cfg.vocab_size as u64,
        );
        let embd_precision = precision;
        let token_embd = DevLinear::load(&gpu, g, "token_embd.weight", &[d, v], embd_precision)?;
        let output = match g.tensor_info("output.weight") {
            Some(_) => Some(DevLinear::load(
                &gpu,
                g,
                "output.weight",
                &[d, v],
                precision,
            )?),
            None => None,
        };
        let norm = |name: &str| -> Result<CudaSlice<f32>> {
            gpu.upload(&g.tensor_f32_shaped(name, &[d])?)
        };
        let output_norm = norm("output_norm.weight")?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let name = |n: &str| format!("blk.{i}.{n}.weight");
            let (q, kk, vv) = (name("attn_q"), name("attn_k"), name("attn_v"));
            let (gate, up) = (name("ffn_gate"), name("ffn_up"));
            layers.push(Layer {
                attn_norm: norm(&name("attn_norm"))?,
                wqkv: DevLinear::load_stacked(
                    &gpu,
                    g,
                    &[(&q, &[d, d]), (&kk, &[d, kvd]), (&vv, &[d, kvd])],
                    precision,
                )?,
                wo: DevLinear::load(&gpu, g, &name("attn_output"), &[d, d], precision)?,
                ffn_norm: norm(&name("ffn_norm"))?,
                w_gate_up: DevLinear::load_stacked(
                    &gpu,
                    g,
                    &[(&gate, &[d, ff]), (&up, &[d, ff])],
                    precision,
                )?,
                w_down: DevLinear::load(&gpu, g, &name("ffn_down"), &[ff, d], precision)?,
            });
        }
        gpu.stream.synchronize().map_err(dev)?;
        Ok(CudaModel {
            cfg,
            name: format!("cuda-{}", device.replace(' ', "-").to_lowercase()),
            kv_dtype,
            token_embd,
            output,
            output_norm,
            layers,
            pools: Mutex::new(DevicePools::default()),
            phases: Mutex::new(Phases::default()),
            gpu,
        })
    }
}

/// The kernels as PTX for `arch` (`compute_90`), a head dimension and KV storage.
fn ptx(arch: &str, head_dim: usize, kv: KvDtype) -> Result<cudarc::nvrtc::Ptx> {
    let opts = CompileOptions {
        fmad: Some(false),
        ftz: Some(false),
        prec_div: Some(true),
        prec_sqrt: Some(true),
        options: vec![
            format!("--gpu-architecture={arch}"),
            format!("-DHD={head_dim}"),
            format!("-DKV_F16={}", (kv == KvDtype::F16) as u8),
        ],
        ..Default::default()
    };
    compile_ptx_with_opts(SOURCE, opts)
        .map_err(|e| EngineError::Device(format!("compiling the kernels: {e:?}")))
}

/// Compiles the kernels for this device and model.
fn compile(ctx: &Arc<CudaContext>, head_dim: usize, kv: KvDtype) -> Result<Kernels> {
    let (major, minor) = ctx.compute_capability().map_err(dev)?;
    let m = ctx
        .load_module(ptx(&format!("compute_{major}{minor}"), head_dim, kv)?)
        .map_err(dev)?;
    let f = |n: &str| m.load_function(n).map_err(dev);
    Ok(Kernels {
        rms_norm: f("rms_norm")?,
        quantize: f("quantize")?,
        mm_q: [f("mm_q4_0")?, f("mm_q4_1")?, f("mm_q8_0")?],
        mm_qw: [f("mmw_q4_0")?, f("mmw_q4_1")?, f("mmw_q8_0")?],
        mm_f32: f("mm_f32")?,
        embed: f("embed")?,
        rope_store: f("rope_store")?,
        attention: f("attention")?,
        silu_mul: f("silu_mul")?,
        silu_mul_q: f("silu_mul_q")?,
    })
}

fn grid(n: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(threads).max(1), 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl Backend for CudaModel {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn config(&self) -> &LlamaConfig {
        &self.cfg
    }
    fn kv_layout(&self, dtype: KvDtype) -> KvLayout {
        KvLayout::for_model(&self.cfg, dtype)
    }
    fn weight_bytes(&self) -> usize {
        let l: usize = self
            .layers
            .iter()
            .map(|l| {
                (l.attn_norm.len() + l.ffn_norm.len()) * 4
                    + [&l.wqkv, &l.wo, &l.w_gate_up, &l.w_down]
                        .iter()
                        .map(|w| w.bytes())
                        .sum::<usize>()
            })
            .sum();
        l + self.token_embd.bytes()
            + self.output.as_ref().map_or(0, DevLinear::bytes)
            + self.output_norm.len() * 4
    }
    fn forward_with(
        &self,
        items: &mut [ForwardItem<'_>],
        layer_done: &mut LayerHook<'_>,
    ) -> Result<Vec<Vec<f32>>> {
        self.gpu.ctx.bind_to_thread().map_err(dev)?;
        let mut pools = self.pools.lock().expect("device pools poisoned");
        self.forward_locked(&mut pools, items, layer_done)
    }
    fn profile(&self) -> Option<String> {
        let p = std::mem::take(&mut *self.phases.lock().expect("phases poisoned"));
        let n = p.calls.max(1) as f64;
        Some(format!(
            "{} calls, ms per call: host prep {:.3}, kernel launches {:.3}, device {:.3}, wait {:.3}, copy-back {:.3}",
            p.calls,
            p.prep / n,
            p.launch / n,
            p.device / n,
            p.wait / n,
            p.write_back / n
        ))
    }
}

/// What a forward call's rows need on the device, built on the host.
struct Rows {
    /// Row r belongs to item `item[r]` at position `pos[r]`.
    item: Vec<usize>,
    pos: Vec<usize>,
    tokens: Vec<u32>,
    /// Per row: the pool slot (`block · block_size + offset`) its K/V goes to.
    slot: Vec<u32>,
    /// Per row: the device address of its pool, where its block table starts in `table`,
    /// and how many positions it sees.
    pool: Vec<u64>,
    tab: Vec<u32>,
    ctx: Vec<u32>,
    table: Vec<u32>,
    /// Per row: RoPE's (cos, sin) pairs, the CPU's own angles.
    cs: Vec<f32>,
}

impl CudaModel {
    fn forward_locked(
        &self,
        pools: &mut DevicePools,
        items: &mut [ForwardItem<'_>],
        layer_done: &mut LayerHook<'_>,
    ) -> Result<Vec<Vec<f32>>> {
        let c = &self.cfg;
        let (d, kvd, ff, hd) = (c.d_model, c.kv_dim(), c.d_ff, c.head_dim);
        let t0 = std::time::Instant::now();
        for it in items.iter_mut() {
            if let Some(&t) = it.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                return Err(EngineError::BadToken(t));
            }
            let total = it.seq.len() + it.tokens.len();
            if total > c.n_ctx {
                return Err(EngineError::ContextOverflow {
                    len: total,
                    max: c.n_ctx,
                });
            }
            it.seq.reserve(total)?;
        }
        let rows = self.rows(pools, items)?;
        let r = rows.item.len();
        if r == 0 {
            return Ok(items.iter().map(|_| Vec::new()).collect());
        }
        let gpu = &self.gpu;
        let layout = KvLayout::for_model(c, self.kv_dtype);
        let plane = (layout.plane_bytes() / self.kv_dtype.bytes()) as i32;
        let (bs, nl) = (layout.block_size as i32, c.n_layers as i32);

        let tokens = gpu.upload(&rows.tokens)?;
        let slot = gpu.upload(&rows.slot)?;
        let pool = gpu.upload(&rows.pool)?;
        let tab = gpu.upload(&rows.tab)?;
        let ctxs = gpu.upload(&rows.ctx)?;
        let table = gpu.upload(&rows.table)?;
        let cs = gpu.upload(&rows.cs)?;
        let t1 = std::time::Instant::now();
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let ev0 = gpu.stream.record_event(timing).map_err(dev)?;
        let qkv_w = d + 2 * kvd;
        // Every scratch buffer below is fully written by a kernel before it is read.
        let mut x = gpu.scratch::<f32>(r * d)?;
        let mut h = gpu.scratch::<f32>(r * d)?;
        let mut qkv = gpu.scratch::<f32>(r * qkv_w)?;
        let mut att = gpu.scratch::<f32>(r * d)?;
        let mut gu = gpu.scratch::<f32>(r * 2 * ff)?;
        let mut g = gpu.scratch::<f32>(r * ff)?;
        let esz = self.kv_dtype.bytes();
        let row_bytes = 2 * kvd * esz;
        let mut staged = gpu.scratch::<u8>(c.n_layers * r * row_bytes)?;

        let s = &gpu.stream;
        let launch = |b: &mut cudarc::driver::LaunchArgs<'_>, cfg: LaunchConfig| -> Result<()> {
            // SAFETY: each call site passes buffers of the shapes its kernel indexes.
            unsafe { b.launch(cfg) }.map(|_| ()).map_err(dev)
        };
        // Embeddings.
        {
            let (n, k) = self.token_embd.dims();
            let (ni, ki) = (n as i32, k as i32);
            let cfg = LaunchConfig {
                grid_dim: ((k as u32).div_ceil(128), r as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            match (&self.token_embd, self.token_embd.embed_args()) {
                (_, Some((fmt, w))) => {
                    let mut b = s.launch_builder(&gpu.k.embed);
                    b.arg(w)
                        .arg(&fmt)
                        .arg(&tokens)
                        .arg(&mut x)
                        .arg(&ni)
                        .arg(&ki);
                    launch(&mut b, cfg)?;
                }
                (DevLinear::F32 { w, .. }, None) => {
                    let fmt = 3i32;
                    let mut b = s.launch_builder(&gpu.k.embed);
                    b.arg(w)
                        .arg(&fmt)
                        .arg(&tokens)
                        .arg(&mut x)
                        .arg(&ni)
                        .arg(&ki);
                    launch(&mut b, cfg)?;
                }
                _ => {
                    return Err(EngineError::Device(
                        "token embeddings in mixed formats".into(),
                    ));
                }
            }
        }
        let (di, kvdi, ffi) = (d as i32, kvd as i32, ff as i32);
        let (nh, nkv) = (c.n_heads as i32, c.n_kv_heads as i32);
        let eps = c.rms_eps;
        let scale = 1.0 / (hd as f32).sqrt();
        let null = 0u64;
        let max_ctx = rows.ctx.iter().copied().max().unwrap_or(1) as usize;
        let max_ctx_i = max_ctx as i32;
        // The quantized copy of activations a matrix reads, made by the kernel that writes them.
        let quantized_for = |w: &DevLinear, rows: usize, k: usize| -> Result<Option<DevQActs>> {
            if w.wants_quantized() && k.is_multiple_of(32) {
                DevQActs::alloc(gpu, rows, k).map(Some)
            } else {
                Ok(None)
            }
        };
        // RMSNorm of `rows` rows (of `x`, or its rows `src`), quantizing into `q` when given.
        let norm = |x: &CudaSlice<f32>,
                    src: Option<&CudaSlice<u32>>,
                    w: &CudaSlice<f32>,
                    out: &mut CudaSlice<f32>,
                    rows: usize,
                    q: Option<&mut DevQActs>|
         -> Result<()> {
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = s.launch_builder(&gpu.k.rms_norm);
            b.arg(x);
            match src {
                Some(src) => b.arg(src),
                None => b.arg(&null),
            };
            b.arg(w).arg(out).arg(&di).arg(&eps);
            match q {
                Some(q) => b.arg(&mut q.q).arg(&mut q.d).arg(&mut q.s).arg(&mut q.sum),
                None => b.arg(&null).arg(&null).arg(&null).arg(&null),
            };
            launch(&mut b, cfg)
        };
        for (li, l) in self.layers.iter().enumerate() {
            let lii = li as i32;
            let mut hq = quantized_for(&l.wqkv, r, d)?;
            norm(&x, None, &l.attn_norm, &mut h, r, hq.as_mut())?;
            l.wqkv.forward(
                gpu,
                &mut DevActs::quantized_by_producer(&h, r, d, hq),
                &mut qkv,
                qkv_w,
                0,
                false,
            )?;
            {
                let mut st = staged.slice_mut(li * r * row_bytes..(li + 1) * r * row_bytes);
                let work = d / 2 + kvd / 2 + kvd;
                let cfg = LaunchConfig {
                    grid_dim: ((work as u32).div_ceil(128), r as u32, 1),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: 0,
                };
                let mut b = s.launch_builder(&gpu.k.rope_store);
                b.arg(&mut qkv).arg(&cs).arg(&pool).arg(&slot).arg(&mut st);
                b.arg(&di)
                    .arg(&kvdi)
                    .arg(&lii)
                    .arg(&nl)
                    .arg(&plane)
                    .arg(&bs);
                launch(&mut b, cfg)?;
            }
            {
                let cfg = LaunchConfig {
                    grid_dim: (r as u32, c.n_heads as u32, 1),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: (max_ctx * 4 + max_ctx.div_ceil(layout.block_size) * 4)
                        as u32,
                };
                let mut b = s.launch_builder(&gpu.k.attention);
                b.arg(&qkv)
                    .arg(&pool)
                    .arg(&table)
                    .arg(&tab)
                    .arg(&ctxs)
                    .arg(&mut att);
                b.arg(&nh)
                    .arg(&nkv)
                    .arg(&lii)
                    .arg(&nl)
                    .arg(&plane)
                    .arg(&bs)
                    .arg(&scale)
                    .arg(&max_ctx_i);
                launch(&mut b, cfg)?;
            }
            l.wo.forward(gpu, &mut DevActs::new(&att, r, d), &mut x, d, 0, true)?;
            let mut hq = quantized_for(&l.w_gate_up, r, d)?;
            norm(&x, None, &l.ffn_norm, &mut h, r, hq.as_mut())?;
            l.w_gate_up.forward(
                gpu,
                &mut DevActs::quantized_by_producer(&h, r, d, hq),
                &mut gu,
                2 * ff,
                0,
                false,
            )?;
            let mut gq = quantized_for(&l.w_down, r, ff)?;
            match gq.as_mut() {
                Some(q) => {
                    let blocks = (r * ff / 32) as i32;
                    let mut b = s.launch_builder(&gpu.k.silu_mul_q);
                    b.arg(&gu).arg(&mut g).arg(&ffi).arg(&blocks);
                    b.arg(&mut q.q).arg(&mut q.d).arg(&mut q.s).arg(&mut q.sum);
                    launch(&mut b, grid(r * ff / 32, 128))?;
                }
                None => {
                    let total = (r * ff) as i32;
                    let mut b = s.launch_builder(&gpu.k.silu_mul);
                    b.arg(&gu).arg(&mut g).arg(&ffi).arg(&total);
                    launch(&mut b, grid(r * ff, 256))?;
                }
            }
            l.w_down.forward(
                gpu,
                &mut DevActs::quantized_by_producer(&g, r, ff, gq),
                &mut x,
                d,
                0,
                true,
            )?;
        }

        // Logits of the rows each item asked for.
        let mut wanted = Vec::new();
        let mut picked: Vec<u32> = Vec::new();
        let mut row0 = 0;
        for it in items.iter() {
            let n = it.tokens.len();
            let rg = match it.logits {
                LogitsWanted::None => 0..0,
                LogitsWanted::Last => row0 + n - 1..row0 + n,
                LogitsWanted::All => row0..row0 + n,
            };
            picked.extend(rg.clone().map(|i| i as u32));
            wanted.push(rg);
            row0 += n;
        }
        let m = picked.len();
        let vocab = c.vocab_size;
        let mut logits = vec![0f32; m * vocab];
        let mut logits_dev = None;
        if m > 0 {
            let src = gpu.upload(&picked)?;
            let mut hn = gpu.scratch::<f32>(m * d)?;
            let w_out = self.output.as_ref().unwrap_or(&self.token_embd);
            let mut hq = quantized_for(w_out, m, d)?;
            norm(&x, Some(&src), &self.output_norm, &mut hn, m, hq.as_mut())?;
            let mut out = gpu.scratch::<f32>(m * vocab)?;
            w_out.forward(
                gpu,
                &mut DevActs::quantized_by_producer(&hn, m, d, hq),
                &mut out,
                vocab,
                0,
                false,
            )?;
            logits_dev = Some(out);
        }
        let ev1 = gpu.stream.record_event(timing).map_err(dev)?;
        let t2 = std::time::Instant::now();
        if let Some(out) = &logits_dev {
            s.memcpy_dtoh(out, &mut logits).map_err(dev)?;
        }
        let mut kv_rows = vec![0u8; c.n_layers * r * row_bytes];
        s.memcpy_dtoh(&staged, &mut kv_rows).map_err(dev)?;
        s.synchronize().map_err(dev)?;
        let t3 = std::time::Instant::now();

        // The new K/V, as stored, into the host pools, layer by layer (as the CPU forward
        // writes them): the prefix cache, KV transfers and the store read them there.
        for li in 0..c.n_layers {
            for row in 0..r {
                let kv = &kv_rows[(li * r + row) * row_bytes..][..row_bytes];
                let (k, v) = kv.split_at(row_bytes / 2);
                items[rows.item[row]].seq.write_raw(li, rows.pos[row], k, v);
            }
            layer_done(li, items);
        }
        for it in items.iter_mut() {
            let n = it.tokens.len();
            it.seq.advance(n);
        }
        {
            let ms = |a: std::time::Instant, b: std::time::Instant| (b - a).as_secs_f64() * 1e3;
            let mut p = self.phases.lock().expect("phases poisoned");
            p.calls += 1;
            p.prep += ms(t0, t1);
            p.launch += ms(t1, t2);
            p.device += ev0.elapsed_ms(&ev1).map_err(dev)? as f64;
            p.wait += ms(t2, t3);
            p.write_back += ms(t3, std::time::Instant::now());
        }
        if wanted.len() == 1 {
            return Ok(vec![logits]);
        }
        let mut out = Vec::with_capacity(items.len());
        let mut at = 0;
        for rg in &wanted {
            let len = rg.len() * vocab;
            out.push(logits[at..at + len].to_vec());
            at += len;
        }
        Ok(out)
    }

    /// Lays out the call's rows and brings every block they read up to date on the device.
    fn rows(&self, pools: &mut DevicePools, items: &[ForwardItem<'_>]) -> Result<Rows> {
        let c = &self.cfg;
        let hd = c.head_dim;
        let mut rows = Rows {
            item: Vec::new(),
            pos: Vec::new(),
            tokens: Vec::new(),
            slot: Vec::new(),
            pool: Vec::new(),
            tab: Vec::new(),
            ctx: Vec::new(),
            table: Vec::new(),
            cs: Vec::new(),
        };
        pools.forget_dropped();
        let mut angles = Vec::new();
        for (i, it) in items.iter().enumerate() {
            let seq = &*it.seq;
            let bs = seq.pool().layout().block_size;
            let addr = pools.sync(&self.gpu, seq, it.tokens.len())?;
            let tab = rows.table.len() as u32;
            rows.table.extend(seq.block_table().iter().map(|b| b.0));
            let start = seq.len();
            for (p, &tok) in it.tokens.iter().enumerate() {
                let pos = start + p;
                rows.item.push(i);
                rows.pos.push(pos);
                rows.tokens.push(tok);
                rows.slot
                    .push((seq.block_table()[pos / bs].0 as usize * bs + pos % bs) as u32);
                rows.pool.push(addr);
                rows.tab.push(tab);
                rows.ctx.push(pos as u32 + 1);
                kernels::ops::rope_angles(hd, pos, c.rope_base, &mut angles);
                rows.cs.extend(angles.iter().flat_map(|&(co, si)| [co, si]));
            }
        }
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels compile for Hopper at every KV storage and the head dimensions of the
    /// models we serve — wherever NVRTC is (CI installs it from PyPI; no GPU needed).
    #[test]
    fn kernels_compile_with_nvrtc() {
        // SAFETY: only tries to load the library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            assert!(
                std::env::var_os("TANDEM_REQUIRE_NVRTC").is_none(),
                "TANDEM_REQUIRE_NVRTC is set but NVRTC does not load"
            );
            eprintln!("NVRTC not found: kernels not compiled");
            return;
        }
        for kv in [KvDtype::F16, KvDtype::F32] {
            for hd in [16, 64, 128] {
                let p = ptx("compute_90", hd, kv).unwrap();
                let src = p.to_src();
                for k in [
                    "rms_norm",
                    "mm_q4_1",
                    "mm_q8_0",
                    "mm_f32",
                    "attention",
                    "rope_store",
                ] {
                    assert!(src.contains(k), "{k} missing from the PTX");
                }
            }
        }
    }
}
