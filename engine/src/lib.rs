//! Tandem's model runtime, shared by the prefill and decode workers.
//!
//! # Layout
//! - [`gguf`]: reading (and writing) GGUF files.
//! - [`config`]: a Llama-family model's hyper-parameters.
//! - [`tokenizer`]: byte-level BPE from the GGUF, streaming detokenization.
//! - [`chat`]: the GGUF's chat template.
//! - [`kv`]: the paged KV block pool and per-sequence block tables.
//! - [`backend`]: the seam to the device that runs a model (the CPU one is [`LlamaModel`]).
//! - [`model`]: weights and the batched forward pass; [`linear`]: a weight matrix at its precision.
//! - [`sampler`], [`stop`]: choosing tokens; stop strings.
//! - [`request`]: what workers are asked and what they stream back; [`generation`]: a
//!   sequence's sampling state, shared by both phases.
//! - [`fetch`]: downloading and caching the default model.
//! - [`synthetic`]: tiny generated models for tests.
//!
//! The two entry points the cluster splits on are [`Engine::prefill`] (prompt → first-token
//! logits + filled KV blocks) and [`Engine::decode_step`] (a batch of sequences, one token each →
//! logits).

pub mod backend;
pub mod chat;
pub mod config;
pub mod error;
pub mod fetch;
pub mod generation;
pub mod gguf;
pub mod kv;
pub mod linear;
pub mod model;
pub mod request;
pub mod sampler;
pub mod stop;
pub mod synthetic;
pub mod tokenizer;

pub use backend::Backend;
pub use error::{EngineError, Result};
pub use kv::{KvDtype, KvPool, KvSequence};
pub use linear::Precision;
pub use model::{ForwardItem, LayerHook, LlamaModel, LogitsWanted};
pub use tokenizer::{TokenId, Tokenizer};

use chat::ChatTemplate;
use gguf::{GgufFile, Metadata};
use std::path::Path;
use std::sync::Arc;

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
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            kv_budget_bytes: 512 << 20,
            model_id: None,
            precision: Precision::default(),
            kv_dtype: KvDtype::default(),
            kv_shared_path: None,
        }
    }
}

/// A loaded model with its tokenizer, chat template and KV pool.
pub struct Engine {
    /// What runs the forward steps (today the CPU: [`LlamaModel`]).
    pub model: Box<dyn Backend>,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub model_id: String,
    pub kv: Arc<KvPool>,
    /// Identifies the weights, their precision and the KV format: KV blocks move only between
    /// engines with equal fingerprints (xxh3 of the GGUF file's bytes, salted with both).
    pub fingerprint: u64,
    /// How this engine was loaded.
    pub config: EngineConfig,
}

impl Engine {
    pub fn load(path: impl AsRef<Path>, cfg: &EngineConfig) -> Result<Engine> {
        Self::load_with(path.as_ref(), cfg, true)
    }

    /// The model's tokenizer, chat template and hyper-parameters without its weights (a
    /// one-block KV pool, a backend whose forward refuses): what the scheduler process holds,
    /// with the same fingerprint the workers compute.
    pub fn load_frontend(path: impl AsRef<Path>, cfg: &EngineConfig) -> Result<Engine> {
        let cfg = EngineConfig {
            kv_budget_bytes: 0,
            kv_shared_path: None,
            ..cfg.clone()
        };
        Self::load_with(path.as_ref(), &cfg, false)
    }

    fn load_with(path: &Path, cfg: &EngineConfig, weights: bool) -> Result<Engine> {
        let g = GgufFile::open(path)?;
        let model: Box<dyn Backend> = if weights {
            Box::new(LlamaModel::load(&g, cfg.precision)?)
        } else {
            Box::new(backend::Weightless {
                cfg: config::LlamaConfig::from_metadata(&g)?,
            })
        };
        let tokenizer = Tokenizer::from_metadata(&g)?;
        if tokenizer.vocab_size() != model.config().vocab_size {
            return Err(EngineError::Tokenizer(format!(
                "tokenizer has {} tokens, model {}",
                tokenizer.vocab_size(),
                model.config().vocab_size
            )));
        }
        let source = g
            .str_opt("tokenizer.chat_template")?
            .unwrap_or(chat::CHATML);
        let template = ChatTemplate::new(
            source,
            tokenizer.raw_token(tokenizer.bos),
            tokenizer.raw_token(tokenizer.eos),
        )?;
        let model_id = cfg.model_id.clone().unwrap_or_else(|| {
            path.file_stem()
                .map(|s| {
                    s.to_string_lossy()
                        .split('.')
                        .next()
                        .unwrap_or_default()
                        .to_string()
                })
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "model".into())
        });
        let layout = model.kv_layout(cfg.kv_dtype);
        let kv = match &cfg.kv_shared_path {
            None => KvPool::with_budget(layout, cfg.kv_budget_bytes),
            Some(p) => {
                KvPool::new_shared(layout, KvPool::blocks_for(layout, cfg.kv_budget_bytes), p)
                    .map_err(|source| EngineError::Io {
                        path: p.clone(),
                        source,
                    })?
            }
        };
        let fingerprint = xxhash_rust::xxh3::xxh3_64_with_seed(
            g.bytes(),
            ((cfg.precision as u64) << 8) | cfg.kv_dtype as u64,
        );
        tracing::info!(
            model = %model_id,
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
            tokenizer,
            template,
            model_id,
            kv,
            fingerprint,
            config: cfg.clone(),
        })
    }

    /// An empty sequence on this engine's pool.
    pub fn new_sequence(&self) -> KvSequence {
        KvSequence::new(self.kv.clone())
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
