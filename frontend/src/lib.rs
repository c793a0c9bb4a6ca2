//! What a process needs to talk about a model without running it: the scheduler's view of a
//! model (tokenizer, chat template, hyper-parameters, fingerprint) and the request vocabulary
//! every Tandem process shares. Nothing here computes a forward pass, so the scheduler links
//! no kernels; the runtime (`engine`) builds on this crate and re-exports it.
//!
//! # Layout
//! - [`gguf`]: reading (and writing) GGUF files.
//! - [`config`]: a Llama-family model's hyper-parameters; [`precision`]: weight precision and
//!   KV cache storage.
//! - [`tokenizer`]: byte-level BPE from the GGUF, streaming detokenization; [`bpe`]: its
//!   merges over flat tables.
//! - [`chat`]: the GGUF's chat template.
//! - [`block`]: KV blocks' names (`BlockHash`), chained over tokens and salted with the model.
//! - [`request`]: what workers are asked and what they stream back; [`sampling`]: sampling
//!   settings and reported log-probabilities; [`stop`]: stop strings.
//! - [`fetch`]: downloading and caching the default model.
//! - [`Frontend`]: the above, loaded for one model file.
//!
//! ```
//! let t = frontend::request::CancellationToken::default();
//! assert!(!t.is_cancelled());
//! ```

pub mod block;
pub mod bpe;
pub mod chat;
pub mod config;
pub mod constraint;
pub mod error;
pub mod fetch;
pub mod gguf;
pub mod precision;
pub mod request;
pub mod sampling;
pub mod stop;
pub mod tokenizer;

pub use error::{ModelError, Result};
pub use precision::{Device, KvDtype, Precision};
pub use tokenizer::{TokenId, Tokenizer};

use chat::ChatTemplate;
use config::LlamaConfig;
use gguf::{GgufFile, Metadata};
use std::path::Path;

/// How a model is served: what its fingerprint and API name depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Numerics {
    /// Weight precision.
    pub precision: Precision,
    /// KV cache storage.
    pub kv_dtype: KvDtype,
    /// What computes (only a GPU changes the fingerprint).
    pub device: Device,
}

/// A model's tokenizer, chat template and hyper-parameters, without its weights.
pub struct Frontend {
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    /// The id the API serves the model under.
    pub model_id: String,
    pub config: LlamaConfig,
    /// Identifies the weights, their precision and the KV format: KV blocks move only between
    /// engines with equal fingerprints (xxh3 of the GGUF file's bytes, salted with both).
    pub fingerprint: u64,
    pub numerics: Numerics,
    /// Constrained decoding over the tokenizer's vocabulary, built on first use.
    grammars: std::sync::OnceLock<Result<constraint::Grammars, constraint::ConstraintError>>,
}

impl Frontend {
    /// Reads `path`'s metadata; `model_id` defaults to the file stem.
    pub fn load(
        path: impl AsRef<Path>,
        model_id: Option<&str>,
        numerics: Numerics,
    ) -> Result<Frontend> {
        let path = path.as_ref();
        Self::from_gguf(&GgufFile::open(path)?, path, model_id, numerics)
    }

    /// [`load`](Self::load) from a file already open.
    pub fn from_gguf(
        g: &GgufFile,
        path: &Path,
        model_id: Option<&str>,
        numerics: Numerics,
    ) -> Result<Frontend> {
        let model_id = model_id.map(str::to_string).unwrap_or_else(|| {
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
        let fingerprint = xxhash_rust::xxh3::xxh3_64_with_seed(
            g.bytes(),
            ((numerics.device as u64) << 16)
                | ((numerics.precision as u64) << 8)
                | numerics.kv_dtype as u64,
        );
        Self::from_metadata(g, model_id, numerics, fingerprint)
    }

    /// From `g`'s metadata alone, with a fingerprint computed elsewhere (an edge bundle keeps
    /// its source GGUF's, which its tensor-less metadata file cannot reproduce).
    pub fn from_metadata(
        g: &GgufFile,
        model_id: String,
        numerics: Numerics,
        fingerprint: u64,
    ) -> Result<Frontend> {
        let config = LlamaConfig::from_metadata(g)?;
        let tokenizer = Tokenizer::from_metadata(g)?;
        if tokenizer.vocab_size() != config.vocab_size {
            return Err(ModelError::Tokenizer(format!(
                "tokenizer has {} tokens, model {}",
                tokenizer.vocab_size(),
                config.vocab_size
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
        Ok(Frontend {
            tokenizer,
            template,
            model_id,
            config,
            fingerprint,
            numerics,
            grammars: std::sync::OnceLock::new(),
        })
    }

    /// Constrained decoding over this model's vocabulary (its token trie is built on the
    /// first call, then shared).
    pub fn grammars(
        &self,
    ) -> std::result::Result<&constraint::Grammars, constraint::ConstraintError> {
        self.grammars
            .get_or_init(|| constraint::Grammars::new(&self.tokenizer))
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Largest number of tokens a sequence may hold.
    pub fn max_context(&self) -> usize {
        self.config.n_ctx
    }
}
