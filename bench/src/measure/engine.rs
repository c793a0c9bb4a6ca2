//! `tandem model bench`: single-stream prefill and decode speed of the engine alone, measured
//! the way `llama-bench` measures pp and tg (prefill of N prompt tokens into an empty cache;
//! M tokens decoded one at a time), so the two can be compared in one run.

use clap::Args;
use engine::{Engine, EngineConfig, LogitsWanted};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// GGUF file (default: the cached default model, fetched if needed).
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: Option<PathBuf>,
    /// Prompt tokens to prefill (llama-bench's -p).
    #[arg(long, default_value_t = 512)]
    pub prompt: usize,
    /// Tokens to decode (llama-bench's -n).
    #[arg(long, default_value_t = 128)]
    pub decode: usize,
    /// Repetitions; the report gives mean and standard deviation.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Weight precision: w4a8 (the default: GGUF blocks as stored), int8 (W8A8) or f32 (reference).
    #[arg(long, default_value = "w4a8")]
    pub precision: engine::Precision,
    /// KV cache storage: f16 (the default), int8 (a scale per position and head; least memory) or f32 (exact), as vLLM's flag.
    #[arg(long, default_value = "f16")]
    pub kv_cache_dtype: engine::KvDtype,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

fn stats(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

/// Measures the model at `path` on the kernels' pool of `threads` (sized by the caller).
pub fn run(args: &BenchArgs, threads: usize, path: &std::path::Path) -> anyhow::Result<()> {
    let e = Engine::load(
        path,
        &EngineConfig {
            kv_budget_bytes: 256 << 20,
            model_id: None,
            precision: args.precision,
            kv_dtype: args.kv_cache_dtype,
            kv_shared_path: None,
            device: Default::default(),
        },
    )?;
    let vocab = e.model.config().vocab_size as u32;
    // Deterministic pseudo-random prompt tokens (like llama-bench's random batch).
    let prompt: Vec<u32> = (0..args.prompt as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 7) % vocab)
        .collect();
    // Warm-up (page in the weights).
    e.prefill(
        &mut e.new_sequence(),
        &prompt[..prompt.len().min(32)],
        LogitsWanted::Last,
    )?;
    let (mut pp, mut tg) = (Vec::new(), Vec::new());
    for _ in 0..args.reps {
        let mut seq = e.new_sequence();
        let t = Instant::now();
        e.prefill(&mut seq, &prompt, LogitsWanted::Last)?;
        pp.push(args.prompt as f64 / t.elapsed().as_secs_f64());
        let mut seq = e.new_sequence();
        let mut tok = 1u32;
        let t = Instant::now();
        for _ in 0..args.decode {
            let l = e.decode_step(&mut [(&mut seq, tok)])?;
            tok = engine::sampler::argmax(&l[0]);
        }
        tg.push(args.decode as f64 / t.elapsed().as_secs_f64());
    }
    let (pm, ps) = stats(&pp);
    let (tm, ts) = stats(&tg);
    println!("| engine | threads | test | t/s |");
    println!(
        "| tandem {:?} ({}) | {threads} | pp{} | {pm:.2} ± {ps:.2} |",
        args.precision,
        kernels::dispatch::level().name(),
        args.prompt
    );
    println!(
        "| tandem {:?} ({}) | {threads} | tg{} | {tm:.2} ± {ts:.2} |",
        args.precision,
        kernels::dispatch::level().name(),
        args.decode
    );
    println!(
        "{}",
        serde_json_line(&[
            ("pp_tokens_per_s", pm),
            ("pp_std", ps),
            ("tg_tokens_per_s", tm),
            ("tg_std", ts),
            ("threads", threads as f64)
        ])
    );
    Ok(())
}

fn serde_json_line(kv: &[(&str, f64)]) -> String {
    let body: Vec<String> = kv.iter().map(|(k, v)| format!("\"{k}\": {v:.3}")).collect();
    format!("{{{}}}", body.join(", "))
}
