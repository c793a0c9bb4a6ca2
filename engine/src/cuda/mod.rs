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

mod forward;
mod pool;
mod weights;

use crate::Backend;
use crate::config::LlamaConfig;
use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::kv::{KvDtype, KvLayout};
use crate::linear::Precision;
use crate::model::{ForwardItem, LayerHook};
use crate::weights::TensorsF32;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream};
use cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};
use pool::DevicePools;
use std::sync::{Arc, Mutex};
use weights::DevLinear;

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
        if cfg.moe.is_some() {
            return Err(EngineError::Device(
                "mixture-of-experts models run on the CPU only for now".into(),
            ));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a GPU (CI, laptops) asking for CUDA is an error that says why, not a crash.
    #[test]
    fn without_a_gpu_loading_is_an_error() {
        if available().is_ok() {
            return; // a machine with a GPU: `tandem model device-check` checks it
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        crate::synthetic::write(&crate::synthetic::TinySpec::default(), &path).unwrap();
        let cfg = crate::EngineConfig {
            device: crate::Device::Cuda,
            ..Default::default()
        };
        match crate::Engine::load(&path, &cfg) {
            Err(EngineError::Device(why)) => assert!(!why.is_empty()),
            Err(e) => panic!("not a device error: {e}"),
            Ok(_) => panic!("loaded on CUDA without a GPU"),
        }
        assert!(crate::check_device(crate::Device::Cuda).is_err());
    }

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
