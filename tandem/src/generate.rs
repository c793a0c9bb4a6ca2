//! `tandem model generate`: one prompt through the engine alone (no server), greedy and
//! seeded, printed as JSON lines with the SIMD level, the tokens and a hash of every step's
//! logits. Two builds or levels that print the same lines computed the same bits — how the
//! AArch64 build is checked against the x86-64 one (`scripts/check/aarch64.sh`).

use clap::Args;
use engine::chat::ChatMessage;
use engine::generation::GenerationState;
use engine::request::GenerationParams;
use engine::sampler::SamplingParams;
use engine::{Engine, EngineConfig, LogitsWanted};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// GGUF file (default: the cached default model, fetched if needed).
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: Option<PathBuf>,
    /// The user message, rendered with the model's chat template.
    #[arg(long, default_value = "Name three uses of a paperclip.")]
    pub prompt: String,
    /// Tokens to generate per run.
    #[arg(long, default_value_t = 24)]
    pub max_tokens: usize,
    /// Temperature of the seeded run (the other run is greedy).
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// Seed of the seeded run.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Weight precision: w4a8 (the default), int8 (W8A8) or f32 (reference).
    #[arg(long, default_value = "w4a8")]
    pub precision: engine::Precision,
    /// KV cache storage: f16 (the default), int8 or f32.
    #[arg(long, default_value = "f16")]
    pub kv_cache_dtype: engine::KvDtype,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// FNV-1a over the bits of every logit, in order.
fn hash_logits(h: &mut u64, logits: &[f32]) {
    for v in logits {
        for b in v.to_bits().to_le_bytes() {
            *h = (*h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
}

pub fn run(args: &GenerateArgs, path: &std::path::Path) -> anyhow::Result<()> {
    let e = Engine::load(
        path,
        &EngineConfig {
            kv_budget_bytes: 64 << 20,
            model_id: None,
            precision: args.precision,
            kv_dtype: args.kv_cache_dtype,
            kv_shared_path: None,
            device: Default::default(),
        },
    )?;
    let rendered = e
        .frontend
        .template
        .render(&[ChatMessage::new("user", args.prompt.as_str())], true)?;
    let prompt = e.frontend.tokenizer.encode(&rendered, false)?;
    for (mode, temperature) in [("greedy", 0.0), ("seeded", args.temperature)] {
        let params = GenerationParams {
            sampling: SamplingParams {
                temperature,
                seed: args.seed,
                ..Default::default()
            },
            max_tokens: args.max_tokens,
            min_tokens: 0,
            ignore_eos: false,
            stop_token_ids: Vec::new(),
            logprobs: None,
            prompt_logprobs: None,
            logit_bias: Vec::new(),
            constraint: None,
        };
        let mut state = GenerationState::new(params, prompt.len());
        let mut seq = e.new_sequence();
        let mut logits = e.prefill(&mut seq, &prompt, LogitsWanted::Last)?;
        let (mut tokens, mut hash) = (Vec::new(), 0xcbf2_9ce4_8422_2325u64);
        loop {
            hash_logits(&mut hash, &logits);
            let ev = state.next(&e.frontend, &logits, e.max_context())?;
            tokens.push(ev.token);
            if ev.finish.is_some() {
                break;
            }
            logits = e
                .decode_step(&mut [(&mut seq, ev.token)])?
                .pop()
                .expect("one sequence, one row of logits");
        }
        let line = serde_json::json!({
            "mode": mode,
            "simd": kernels::dispatch::level().name(),
            "arch": std::env::consts::ARCH,
            "precision": args.precision.to_string(),
            "prompt_tokens": prompt.len(),
            "tokens": tokens,
            "logits_fnv": format!("{hash:016x}"),
            "text": e.frontend.tokenizer.decode(&tokens),
        });
        println!("{line}");
    }
    Ok(())
}
