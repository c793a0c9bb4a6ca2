//! Tandem's model runtime, shared by the prefill and decode workers: the model's weights, the
//! forward pass and the paged KV pool. What describes a model without running it (GGUF,
//! tokenizer, chat template, request types) is the `frontend` crate, re-exported here.
//!
//! # Layout
//! - [`kv`]: the paged KV block pool and per-sequence block tables.
//! - [`backend`]: the seam to the device that runs a model (the CPU one is [`LlamaModel`]; the
//!   CUDA one, feature `cuda`, is `cuda::CudaModel`).
//! - [`model`]: weights and the batched forward pass; [`linear`]: a weight matrix at its
//!   precision; [`weights`]: a GGUF's tensors dequantized.
//! - [`sampler`]: choosing tokens; [`generation`]: a sequence's sampling state, shared by both
//!   phases.
//! - [`synthetic`]: tiny generated models for tests.
//! - re-exported from `frontend`: [`gguf`], [`config`], [`tokenizer`], [`chat`], [`request`],
//!   [`stop`], [`fetch`].
//!
//! The two entry points the cluster splits on are [`Engine::prefill`] (prompt → first-token
//! logits + filled KV blocks) and [`Engine::decode_step`] (a batch of sequences, one token each →
//! logits).

pub mod backend;
pub mod bundle;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod generation;
pub mod kv;
pub mod linear;
pub mod model;
pub mod moe;
pub mod sampler;
pub mod synthetic;
pub mod weights;

pub use frontend::{
    Device, Frontend, Numerics, chat, config, fetch, gguf, request, stop, tokenizer,
};

pub use backend::Backend;
pub use error::{EngineError, Result};
pub use kv::{KvDtype, KvPool, KvSequence};
pub use linear::Precision;
pub use model::{ForwardItem, LayerHook, LlamaModel, LogitsWanted};
pub use tokenizer::{TokenId, Tokenizer};

use error::ModelError;
use gguf::GgufFile;
use std::path::Path;
use std::sync::Arc;

/// Whether this binary and machine can run models on `device`: the CPU always; CUDA in a
/// build with the `cuda` feature on a machine whose driver, NVRTC and GPU answer. The error
/// says what is missing.
pub fn check_device(device: Device) -> Result<()> {
    match device {
        Device::Cpu => Ok(()),
        #[cfg(feature = "cuda")]
        Device::Cuda => cuda::available().map(|_| ()).map_err(EngineError::Device),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => Err(EngineError::Device(
            "this binary was built without CUDA (cargo build --release --features cuda)".into(),
        )),
    }
}

/// How to load an engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Bytes of KV cache to reserve (the pool never grows past it).
    pub kv_budget_bytes: usize,
    /// The id the API serves the model under; default: the file stem.
    pub model_id: Option<String>,
    /// Weight precision: w4a8 (the GGUF's blocks as stored; the default), int8, or f32 (exact reference).
    pub precision: Precision,
    /// KV cache storage: f16 (the default), int8 or f32 (exact).
    pub kv_dtype: KvDtype,
    /// Put the KV pool in a shared file here (under `/dev/shm`) so that prefill workers on
    /// this host can write prompts' KV straight into it; `None`: private memory.
    pub kv_shared_path: Option<std::path::PathBuf>,
    /// What runs the forward passes: the CPU (the default) or a CUDA GPU (a build with the
    /// `cuda` feature, on a machine with a GPU and its driver).
    pub device: Device,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            kv_budget_bytes: 512 << 20,
            model_id: None,
            precision: Precision::default(),
            kv_dtype: KvDtype::default(),
            kv_shared_path: None,
            device: Device::Cpu,
        }
    }
}

impl EngineConfig {
    /// The formats the fingerprint covers.
    pub fn numerics(&self) -> Numerics {
        Numerics {
            precision: self.precision,
            kv_dtype: self.kv_dtype,
            device: self.device,
        }
    }
}

/// A loaded model: its frontend (tokenizer, template, fingerprint), weights and KV pool.
pub struct Engine {
    /// What runs the forward steps (today the CPU: [`LlamaModel`]).
    pub model: Box<dyn Backend>,
    /// Tokenizer, chat template, API name, fingerprint.
    pub frontend: Arc<Frontend>,
    pub kv: Arc<KvPool>,
    /// How this engine was loaded.
    pub config: EngineConfig,
}

impl Engine {
    pub fn load(path: impl AsRef<Path>, cfg: &EngineConfig) -> Result<Engine> {
        let path = path.as_ref();
        if bundle::is_bundle(path) {
            return Self::load_bundle(path, cfg);
        }
        let g = GgufFile::open(path)?;
        let frontend = Frontend::from_gguf(&g, path, cfg.model_id.as_deref(), cfg.numerics())?;
        let model: Box<dyn Backend> = match cfg.device {
            Device::Cpu => Box::new(LlamaModel::load(&g, cfg.precision)?),
            #[cfg(feature = "cuda")]
            Device::Cuda => Box::new(cuda::CudaModel::load(&g, cfg.precision, cfg.kv_dtype)?),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda => {
                check_device(Device::Cuda)?;
                unreachable!("check_device refuses CUDA in a build without it")
            }
        };
        Self::assemble(model, frontend, cfg)
    }

    /// An edge bundle (`tandem export-edge`): weights mapped in place, on the CPU, at the
    /// precision and KV dtype the bundle was exported with (`cfg` must agree).
    fn load_bundle(dir: &Path, cfg: &EngineConfig) -> Result<Engine> {
        let manifest = bundle::Manifest::read(dir)?;
        if (cfg.precision, cfg.kv_dtype, cfg.device)
            != (manifest.precision, manifest.kv_cache_dtype, Device::Cpu)
        {
            return Err(EngineError::Bundle(format!(
                "{} holds {} weights with {} KV for the CPU; asked for {} / {} / {}",
                dir.display(),
                manifest.precision,
                manifest.kv_cache_dtype,
                cfg.precision,
                cfg.kv_dtype,
                cfg.device
            )));
        }
        // The weights map and are checked on a second thread while the tokenizer builds on
        // this one, which then helps check what is left.
        let opened = std::sync::OnceLock::new();
        let frontend = std::thread::scope(|s| {
            let mapper = s.spawn(|| {
                if let Ok(w) = opened.get_or_init(|| bundle::Weights::open(dir, &manifest)) {
                    w.help();
                }
            });
            let frontend =
                bundle::frontend(dir, &manifest, cfg.model_id.as_deref(), cfg.numerics());
            if let Some(Ok(w)) = opened.get() {
                w.help();
            }
            mapper.join().expect("mapping the weights panicked");
            frontend
        })?;
        let weights = opened.into_inner().expect("set by the mapper")?.finish()?;
        let model = bundle::load_model(weights, &manifest, frontend.config.clone())?;
        Self::assemble(Box::new(model), frontend, cfg)
    }

    fn assemble(model: Box<dyn Backend>, frontend: Frontend, cfg: &EngineConfig) -> Result<Engine> {
        let layout = model.kv_layout(cfg.kv_dtype);
        let kv = match &cfg.kv_shared_path {
            None => KvPool::with_budget(layout, cfg.kv_budget_bytes),
            Some(p) => {
                KvPool::new_shared(layout, KvPool::blocks_for(layout, cfg.kv_budget_bytes), p)
                    .map_err(|source| ModelError::Io {
                        path: p.clone(),
                        source,
                    })?
            }
        };
        kv.set_hash_salt(frontend::block::salt(
            frontend.fingerprint,
            layout.block_size,
        ));
        tracing::info!(
            model = %frontend.model_id,
            backend = %model.name(),
            layers = model.config().n_layers,
            d_model = model.config().d_model,
            vocab = model.config().vocab_size,
            weights_mib = model.weight_bytes() >> 20,
            kv_blocks = kv.n_blocks(),
            "model loaded"
        );
        Ok(Engine {
            model,
            frontend: Arc::new(frontend),
            kv,
            config: cfg.clone(),
        })
    }

    /// An empty sequence on this engine's pool.
    pub fn new_sequence(&self) -> KvSequence {
        KvSequence::new(self.kv.clone())
    }

    /// Compute threads the kernels run on (the process's pool).
    pub fn threads(&self) -> usize {
        kernels::pool::global().threads()
    }

    /// Largest number of tokens a sequence may hold.
    pub fn max_context(&self) -> usize {
        self.model.config().n_ctx
    }

    /// Runs `tokens` into `seq` (which may already hold a prefix); returns the logits asked for.
    pub fn prefill(
        &self,
        seq: &mut KvSequence,
        tokens: &[TokenId],
        logits: LogitsWanted,
    ) -> Result<Vec<f32>> {
        let mut items = [ForwardItem {
            seq,
            tokens,
            logits,
        }];
        Ok(self.model.forward(&mut items)?.pop().expect("one item"))
    }

    /// One decode step for a batch: each sequence takes one token; returns each one's logits.
    pub fn decode_step(&self, batch: &mut [(&mut KvSequence, TokenId)]) -> Result<Vec<Vec<f32>>> {
        let toks: Vec<[TokenId; 1]> = batch.iter().map(|(_, t)| [*t]).collect();
        let mut items: Vec<ForwardItem<'_>> = batch
            .iter_mut()
            .zip(&toks)
            .map(|((seq, _), t)| ForwardItem {
                seq,
                tokens: t,
                logits: LogitsWanted::Last,
            })
            .collect();
        self.model.forward(&mut items)
    }
}
