//! The edge profile: `tandem export-edge` sizes a model for a hard memory budget and writes a
//! bundle (`engine::bundle`: weights already packed, mapped at start); `tandem edge DIR`
//! serves it in one process, the KV pool preallocated inside the budget, prefill in
//! fixed-size chunks, a bounded queue (a full queue answers 503, never an out-of-memory kill).

use crate::args::HttpArgs;
use clap::Args;
use engine::bundle::{Manifest, Packed};
use engine::{Engine, EngineConfig, KvDtype, Precision};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;

/// Shortest context a bundle may be sized for (one sequence of it must fit).
pub const MIN_CONTEXT: usize = 512;
/// What the process needs besides the weights, the KV pool and the per-step scratch: the
/// binary's mapped code, the tokenizer and template, the HTTP server, the threads' stacks,
/// allocator slack. Measured on x86-64 (SmolLM2-135M): 15 MiB of the binary's pages plus
/// 17 MiB anonymous when idle, 22 MiB after a request — `scripts/check/edge.sh` samples the
/// peak under load against the budget; 40 MiB leaves a margin.
pub const RUNTIME_BASE_BYTES: usize = 40 << 20;
/// Requests waiting for a sequence slot at most (each holds only its prompt); beyond it, 503.
pub const MAX_QUEUE: usize = 64;

#[derive(Args, Debug)]
pub struct ExportEdgeArgs {
    /// The GGUF to export (default: the default model, fetched if needed).
    pub model: Option<PathBuf>,
    /// The bundle directory to write.
    #[arg(long)]
    pub out: PathBuf,
    /// The hard memory budget, MiB: weights (mapped), KV pool, runtime.
    #[arg(long)]
    pub budget_mib: usize,
    /// The CPU architecture the bundle is for (the weights' layout is the same on both; it
    /// sets the default threads).
    #[arg(long, value_parser = ["aarch64", "x86_64"], default_value = std::env::consts::ARCH)]
    pub target: String,
    /// Tokens per sequence (default: the longest that fits, up to the model's and 2,048); a
    /// shorter context leaves room for more concurrent sequences.
    #[arg(long)]
    pub context: Option<usize>,
    /// Concurrent sequences at most (fewer if the budget holds fewer).
    #[arg(long, default_value_t = 16)]
    pub max_num_seqs: usize,
    /// Prefill chunk, tokens: every forward step processes at most this many.
    #[arg(long, default_value_t = 64)]
    pub chunk: usize,
    /// Compute threads the device should run (default: 4 for aarch64, else this machine's cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Weight precision: w4a8 (the default) or int8.
    #[arg(long, default_value = "w4a8")]
    pub precision: Precision,
    /// KV cache storage: f16 (the default), int8 (least memory: about half of f16's) or f32.
    #[arg(long, default_value = "f16")]
    pub kv_cache_dtype: KvDtype,
}

#[derive(Args, Debug)]
pub struct EdgeArgs {
    /// A bundle directory written by `tandem export-edge`.
    pub bundle: PathBuf,
    #[command(flatten)]
    pub http: HttpArgs,
    /// Compute threads (default: the bundle's).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// What a bundle was sized for: the manifest's `serving` section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Sizing {
    pub target: String,
    pub budget_bytes: usize,
    pub weights_bytes: usize,
    pub runtime_bytes: usize,
    pub kv_bytes_per_token: usize,
    pub kv_block_tokens: usize,
    pub context: usize,
    pub max_num_seqs: usize,
    pub kv_bytes: usize,
    pub chunk: usize,
    pub threads: usize,
    pub max_queue: usize,
}

/// A budget that cannot hold the model: the arithmetic, and what would fit (exit status 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

fn mib(b: usize) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

/// Scratch of one forward step of `chunk` rows over `seqs` sequences: activations (the
/// forward pass's buffers, f32) and each sequence's logits with the sampler's copy.
fn scratch_bytes(cfg: &engine::config::LlamaConfig, chunk: usize, seqs: usize) -> usize {
    let (d, kvd, ff) = (cfg.d_model, cfg.kv_dim(), cfg.d_ff);
    let per_row = 7 * d + (d + 2 * kvd) + 2 * kvd + 3 * ff;
    // The quantized copies of the activations (one byte each, with scales) are below 1/3 more.
    chunk * per_row * 4 * 4 / 3 + seqs * cfg.vocab_size * 4 * 2
}

/// Sizes a bundle: the context and concurrency the budget holds, or why it holds none.
pub fn size(
    a: &ExportEdgeArgs,
    cfg: &engine::config::LlamaConfig,
    weights_bytes: usize,
) -> Result<Sizing, Refused> {
    let layout = engine::kv::KvLayout::for_model(cfg, a.kv_cache_dtype);
    let bs = layout.block_size;
    let per_token = layout.block_bytes() / bs;
    let kv_for = |tokens: usize, seqs: usize| seqs * tokens.div_ceil(bs) * layout.block_bytes();
    let budget = a.budget_mib << 20;
    let chunk = a.chunk.clamp(1, 4096);
    let runtime = |seqs: usize| RUNTIME_BASE_BYTES + scratch_bytes(cfg, chunk, seqs);
    let min_ctx = MIN_CONTEXT.min(cfg.n_ctx);
    let needed = weights_bytes + runtime(1) + kv_for(min_ctx, 1);
    if needed > budget {
        return Err(Refused(format!(
            "a {} budget cannot hold this model: weights {} + runtime {} + KV of one {min_ctx}-token \
             sequence {} ({} per token, {}) = {}. It needs --budget-mib {} at least{}.",
            mib(budget),
            mib(weights_bytes),
            mib(runtime(1)),
            mib(kv_for(min_ctx, 1)),
            per_token,
            a.kv_cache_dtype,
            mib(needed),
            needed.div_ceil(1 << 20),
            if a.kv_cache_dtype != KvDtype::Int8 {
                " (--kv-cache-dtype int8 needs less)"
            } else {
                ""
            }
        )));
    }
    let free = |seqs: usize| budget.saturating_sub(weights_bytes + runtime(seqs));
    let context = match a.context {
        Some(c) => {
            let c = c.min(cfg.n_ctx);
            if c < min_ctx || kv_for(c, 1) > free(1) {
                let most = (free(1) / layout.block_bytes() * bs).min(cfg.n_ctx);
                return Err(Refused(format!(
                    "--context {c}: one sequence's KV is {}, the budget leaves {} after weights {} \
                     and runtime {}; at most --context {most} fits (at least {min_ctx} is required)",
                    mib(kv_for(c, 1)),
                    mib(free(1)),
                    mib(weights_bytes),
                    mib(runtime(1))
                )));
            }
            c
        }
        None => (free(1) / layout.block_bytes() * bs)
            .min(cfg.n_ctx)
            .min(2048),
    };
    let mut seqs = a.max_num_seqs.max(1);
    while seqs > 1 && kv_for(context, seqs) > free(seqs) {
        seqs -= 1;
    }
    let threads = a.threads.unwrap_or(if a.target == "aarch64" {
        4
    } else {
        crate::process::cores()
    });
    Ok(Sizing {
        target: a.target.clone(),
        budget_bytes: budget,
        weights_bytes,
        runtime_bytes: runtime(seqs),
        kv_bytes_per_token: per_token,
        kv_block_tokens: bs,
        context,
        max_num_seqs: seqs,
        kv_bytes: kv_for(context, seqs),
        chunk,
        threads,
        max_queue: MAX_QUEUE,
    })
}

pub fn export(a: &ExportEdgeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.precision != Precision::F32,
        "--precision f32 is the reference path, not an edge profile: use w4a8 or int8"
    );
    let source = crate::process::model_path(a.model.as_deref())?;
    let cfg = EngineConfig {
        kv_budget_bytes: 0,
        model_id: None,
        precision: a.precision,
        kv_dtype: a.kv_cache_dtype,
        kv_shared_path: None,
        device: Default::default(),
    };
    let packed = Packed::new(&source, &cfg)?;
    let model_cfg = packed.frontend().config.clone();
    let sizing = size(a, &model_cfg, packed.weight_bytes())?;
    let m = packed.write(&a.out, serde_json::to_value(&sizing)?)?;
    eprintln!(
        "tandem: wrote {} for {}: weights {} ({}), KV {} = {} sequences × {} tokens ({} KV, {} B/token), \
         runtime {}; total {} of {}; {} threads, prefill chunks of {}",
        a.out.display(),
        sizing.target,
        mib(sizing.weights_bytes),
        m.precision,
        mib(sizing.kv_bytes),
        sizing.max_num_seqs,
        sizing.context,
        m.kv_cache_dtype,
        sizing.kv_bytes_per_token,
        mib(sizing.runtime_bytes),
        mib(sizing.weights_bytes + sizing.kv_bytes + sizing.runtime_bytes),
        mib(sizing.budget_bytes),
        sizing.threads,
        sizing.chunk
    );
    println!("{}", a.out.display());
    Ok(())
}

pub fn serve(a: EdgeArgs) -> anyhow::Result<()> {
    let listener = crate::up::bind_early(&a.http)?;
    let m = Manifest::read(&a.bundle)?;
    let s: Sizing = serde_json::from_value(m.serving.clone()).map_err(|e| {
        anyhow::anyhow!(
            "{}: no sizing in the manifest ({e}); export it with tandem export-edge",
            a.bundle.display()
        )
    })?;
    let threads = crate::process::init_compute_threads(Some(a.threads.unwrap_or(s.threads)))?;
    let started = std::time::Instant::now();
    let engine = Engine::load(
        &a.bundle,
        &EngineConfig {
            kv_budget_bytes: s.kv_bytes,
            model_id: None,
            precision: m.precision,
            kv_dtype: m.kv_cache_dtype,
            kv_shared_path: None,
            device: Default::default(),
        },
    )?;
    eprintln!(
        "tandem: edge bundle {} loaded in {:.0} ms: {} threads (SIMD level {}), {} sequences × {} tokens, budget {}",
        a.bundle.display(),
        started.elapsed().as_secs_f64() * 1e3,
        threads,
        kernels::dispatch::level().name(),
        s.max_num_seqs,
        s.context,
        mib(s.budget_bytes)
    );
    let mut http = a.http;
    http.max_model_len = Some(http.max_model_len.map_or(s.context, |l| l.min(s.context)));
    crate::up::serve_colocated(
        Arc::new(engine),
        decode_worker::WorkerConfig {
            max_batch_tokens: s.chunk,
            max_running: s.max_num_seqs,
            max_waiting: s.max_queue,
        },
        listener,
        &http,
        "edge",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M's geometry.
    fn smollm2() -> engine::config::LlamaConfig {
        engine::config::LlamaConfig {
            n_layers: 30,
            d_model: 576,
            d_ff: 1536,
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
            vocab_size: 49152,
            n_ctx: 8192,
            rope_base: 100000.0,
            rms_eps: 1e-5,
            moe: None,
        }
    }

    fn args(budget_mib: usize, context: Option<usize>, kv: KvDtype) -> ExportEdgeArgs {
        ExportEdgeArgs {
            model: None,
            out: "unused".into(),
            budget_mib,
            target: "aarch64".into(),
            context,
            max_num_seqs: 16,
            chunk: 64,
            threads: None,
            precision: Precision::W4A8,
            kv_cache_dtype: kv,
        }
    }

    const WEIGHTS: usize = 98_346_240; // the default model's w4a8 bundle

    #[test]
    fn a_sizing_fits_its_budget_and_trades_context_for_sequences() {
        for budget in [160, 200, 256, 512, 1024] {
            for kv in [KvDtype::F16, KvDtype::Int8] {
                let s = size(&args(budget, None, kv), &smollm2(), WEIGHTS).unwrap();
                assert!(s.weights_bytes + s.kv_bytes + s.runtime_bytes <= budget << 20);
                assert!(s.context >= MIN_CONTEXT && s.max_num_seqs >= 1);
                let short =
                    size(&args(budget, Some(MIN_CONTEXT), kv), &smollm2(), WEIGHTS).unwrap();
                assert!(short.weights_bytes + short.kv_bytes + short.runtime_bytes <= budget << 20);
                assert!(short.max_num_seqs >= s.max_num_seqs, "{budget} {kv}");
                assert_eq!(s.threads, 4, "aarch64's default");
            }
        }
        let big = size(&args(1024, Some(1024), KvDtype::F16), &smollm2(), WEIGHTS).unwrap();
        assert_eq!(big.max_num_seqs, 16, "capped by --max-num-seqs");
    }

    /// The number written right after `phrase` in `msg`.
    fn figure_after(msg: &str, phrase: &str) -> usize {
        let rest = msg
            .split(phrase)
            .nth(1)
            .expect("the phrase is in the message");
        rest.split(' ').next().unwrap().parse().unwrap()
    }

    #[test]
    fn a_budget_too_small_is_refused_with_the_arithmetic() {
        let e = size(&args(100, None, KvDtype::F16), &smollm2(), WEIGHTS).unwrap_err();
        assert!(
            e.0.contains("weights 93.8 MiB") && e.0.contains("needs --budget-mib"),
            "{e}"
        );
        let need: usize = figure_after(&e.0, "needs --budget-mib ");
        // What it says would fit does fit, and one MiB less does not.
        assert!(size(&args(need, None, KvDtype::F16), &smollm2(), WEIGHTS).is_ok());
        assert!(size(&args(need - 1, None, KvDtype::F16), &smollm2(), WEIGHTS).is_err());
        // A context the budget cannot hold names the largest that fits.
        let e = size(&args(160, Some(8192), KvDtype::F16), &smollm2(), WEIGHTS).unwrap_err();
        let most: usize = figure_after(&e.0, "at most --context ");
        assert!(size(&args(160, Some(most), KvDtype::F16), &smollm2(), WEIGHTS).is_ok());
        assert!(
            size(
                &args(160, Some(most + 16), KvDtype::F16),
                &smollm2(),
                WEIGHTS
            )
            .is_err()
        );
    }
}
