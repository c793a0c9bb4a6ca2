//! The engine's error type.

pub use frontend::ModelError;

/// Everything that can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model file, its tokenizer or template.
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("bad KV block table: {0}")]
    BadBlocks(String),
    #[error("KV cache is full: {needed} blocks needed, {free} free")]
    KvExhausted { needed: usize, free: usize },
    #[error("sequence of {len} tokens exceeds the model's context of {max}")]
    ContextOverflow { len: usize, max: usize },
    #[error("token id {0} is outside the vocabulary")]
    BadToken(u32),
    /// An edge bundle that cannot be used (unreadable, mismatched, from another version).
    #[error("edge bundle: {0}")]
    Bundle(String),
    /// The device cannot run this model (no GPU, no driver, an unsupported format) or failed.
    #[error("device: {0}")]
    Device(String),
    /// A mixture's experts could not be computed (an expert worker unreachable or refusing).
    #[error("experts: {0}")]
    Experts(String),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
