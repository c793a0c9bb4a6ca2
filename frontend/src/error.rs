//! What can go wrong reading a model file, its tokenizer or template, or fetching it.

use std::path::PathBuf;

/// A model file that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a valid GGUF file: {0}")]
    Gguf(String),
    #[error("GGUF version {0} is not supported (Tandem reads versions 2 and 3)")]
    GgufVersion(u32),
    #[error("model architecture '{0}' is not supported (Tandem serves the 'llama' family)")]
    UnsupportedArchitecture(String),
    #[error(
        "tensor '{tensor}' has quantization type {ty}, which Tandem cannot read yet (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)"
    )]
    UnsupportedTensorType { tensor: String, ty: String },
    #[error("missing metadata key '{0}'")]
    MissingKey(String),
    #[error("metadata key '{key}' has the wrong type (expected {expected})")]
    WrongType { key: String, expected: &'static str },
    #[error("missing tensor '{0}'")]
    MissingTensor(String),
    #[error("tensor '{name}' has shape {got:?}, expected {want:?}")]
    TensorShape {
        name: String,
        got: Vec<u64>,
        want: Vec<u64>,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("model fetch failed: {0}")]
    Fetch(String),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
