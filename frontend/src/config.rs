//! Hyper-parameters of a Llama-family model, read from GGUF metadata.

use crate::error::{ModelError, Result};
use crate::gguf::Metadata;

/// Shape and constants of a Llama-family transformer.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub n_layers: usize,
    pub d_model: usize,
    pub d_ff: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    /// Context length the model was trained for; requests may not exceed it.
    pub n_ctx: usize,
    pub rope_base: f32,
    pub rms_eps: f32,
    /// Mixture of experts in place of the dense FFN (`llama.expert_count` > 0): Mixtral's
    /// routing, llama.cpp's `llama` architecture.
    pub moe: Option<MoeConfig>,
}

/// A mixture-of-experts FFN: every token goes to the `n_used` experts (of `n_experts`) with the
/// highest router probability (softmax over the router's logits), weighted by those
/// probabilities renormalized to sum to 1. `d_ff` is each expert's width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeConfig {
    pub n_experts: usize,
    pub n_used: usize,
}

impl LlamaConfig {
    /// Reads the `llama.*` keys; any other `general.architecture` is refused.
    pub fn from_metadata(md: &impl Metadata) -> Result<LlamaConfig> {
        let arch = md.str_req("general.architecture")?;
        if arch != "llama" {
            return Err(ModelError::UnsupportedArchitecture(arch.to_string()));
        }
        let u = |k: &str| md.u64_req(&format!("llama.{k}")).map(|v| v as usize);
        let d_model = u("embedding_length")?;
        let n_heads = u("attention.head_count")?;
        let n_kv_heads = md
            .u64_opt("llama.attention.head_count_kv")?
            .map(|v| v as usize)
            .unwrap_or(n_heads);
        if n_heads == 0 || n_kv_heads == 0 || d_model % n_heads != 0 || n_heads % n_kv_heads != 0 {
            return Err(ModelError::Gguf(format!(
                "inconsistent attention shape: d_model {d_model}, {n_heads} heads, {n_kv_heads} KV heads"
            )));
        }
        let head_dim = d_model / n_heads;
        if let Some(rd) = md.u64_opt("llama.rope.dimension_count")?
            && rd as usize != head_dim
        {
            return Err(ModelError::Gguf(format!(
                "partial RoPE ({rd} of {head_dim} dims) is not supported"
            )));
        }
        let vocab_size = match md.u64_opt("llama.vocab_size")? {
            Some(v) => v as usize,
            None => md
                .strings_opt("tokenizer.ggml.tokens")?
                .map(|a| a.len())
                .ok_or_else(|| ModelError::MissingKey("tokenizer.ggml.tokens".into()))?,
        };
        let moe = match md.u64_opt("llama.expert_count")? {
            None | Some(0) => None,
            Some(n) => {
                let used = md.u64_req("llama.expert_used_count")?;
                if used == 0 || used > n {
                    return Err(ModelError::Gguf(format!(
                        "{used} experts used of {n}: needs 1 ..= expert_count"
                    )));
                }
                Some(MoeConfig {
                    n_experts: n as usize,
                    n_used: used as usize,
                })
            }
        };
        Ok(LlamaConfig {
            moe,
            n_layers: u("block_count")?,
            d_model,
            d_ff: u("feed_forward_length")?,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab_size,
            n_ctx: u("context_length")?,
            rope_base: md.f64_opt("llama.rope.freq_base")?.unwrap_or(10000.0) as f32,
            rms_eps: md
                .f64_opt("llama.attention.layer_norm_rms_epsilon")?
                .unwrap_or(1e-5) as f32,
        })
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Multiply-accumulates per token in the weight matrices (for throughput reports).
    pub fn macs_per_token(&self) -> usize {
        let d = self.d_model;
        let ffn = match self.moe {
            None => d * self.d_ff * 3,
            Some(m) => m.n_used * d * self.d_ff * 3 + m.n_experts * d,
        };
        self.n_layers * (d * d * 2 + d * self.kv_dim() * 2 + ffn) + d * self.vocab_size
    }
}
