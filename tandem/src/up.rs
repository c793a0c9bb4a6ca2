//! `tandem up`: one process running the scheduler and its workers (colocated by default: one
//! continuous-batching worker that prefills and decodes).

use anyhow::Context;
use clap::Args;
use decode_worker::WorkerConfig;
use engine::{Engine, EngineConfig};
use scheduler::cluster::{Cluster, ClusterConfig, Topology};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Address to listen on.
    #[arg(long, env = "TANDEM_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on.
    #[arg(long, env = "TANDEM_PORT", default_value_t = 8000)]
    pub port: u16,
    /// A GGUF file of the `llama` architecture (default: SmolLM2-135M-Instruct, fetched on first run).
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: Option<PathBuf>,
    /// The id clients use in `model` (default: the file's name).
    #[arg(long, env = "TANDEM_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Weight precision: w4a8 (the default: GGUF blocks as stored × 8-bit activations; other tensor types as int8), int8 (W8A8, every weight requantized to 8 bits per channel) or f32 (every weight dequantized; the exact reference).
    #[arg(long, env = "TANDEM_PRECISION", default_value = "w4a8")]
    pub precision: engine::Precision,
    /// KV cache storage: f16 (the default), int8 (a scale per position and head; least memory) or f32 (exact), as vLLM's flag.
    #[arg(long, env = "TANDEM_KV_CACHE_DTYPE", default_value = "f16")]
    pub kv_cache_dtype: engine::KvDtype,
    /// Compute threads (default: all cores).
    #[arg(long, env = "TANDEM_THREADS")]
    pub threads: Option<usize>,
    /// KV cache budget in MiB; the pool never grows past it.
    #[arg(long, env = "TANDEM_KV_CACHE_MIB", default_value_t = 512)]
    pub kv_cache_mib: usize,
    /// Requests that may wait to start before new ones get 503.
    #[arg(long, env = "TANDEM_MAX_QUEUE", default_value_t = 256)]
    pub max_queue: usize,
    /// Tokens per forward step (decode tokens first, prefill chunks fill the rest), as vLLM's flag.
    #[arg(long, env = "TANDEM_MAX_NUM_BATCHED_TOKENS", default_value_t = 256)]
    pub max_num_batched_tokens: usize,
    /// Sequences in the running batch at most, as vLLM's flag.
    #[arg(long, env = "TANDEM_MAX_NUM_SEQS", default_value_t = 64)]
    pub max_num_seqs: usize,
    /// Run a prefill thread feeding a decode thread instead of one colocated worker.
    #[arg(long)]
    pub split: bool,
    /// Largest request body, in bytes.
    #[arg(long, default_value_t = scheduler::DEFAULT_MAX_BODY)]
    pub max_body_bytes: usize,
}

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    let threads = crate::init_compute_threads(args.threads)?;
    let path = crate::model_path(args.model.as_deref())?;
    // The default model is served under its own name, not its file name.
    let default_id = args
        .model
        .is_none()
        .then(|| engine::fetch::DEFAULT_MODEL.id.to_string());
    let cfg = EngineConfig {
        kv_budget_bytes: args.kv_cache_mib << 20,
        model_id: args.served_model_name.clone().or(default_id),
        precision: args.precision,
        kv_dtype: args.kv_cache_dtype,
        kv_shared_path: None,
    };
    eprintln!(
        "tandem: loading {} ({threads} threads, SIMD level {})",
        path.display(),
        kernels::dispatch::level().name()
    );
    let engine =
        Arc::new(Engine::load(&path, &cfg).with_context(|| format!("loading {}", path.display()))?);
    let model_id = engine.model_id.clone();
    let cluster = Arc::new(Cluster::start_with(
        engine,
        ClusterConfig {
            topology: if args.split {
                Topology::Split
            } else {
                Topology::Colocated
            },
            worker: WorkerConfig {
                max_batch_tokens: args.max_num_batched_tokens.max(1),
                max_running: args.max_num_seqs.max(1),
                max_waiting: args.max_queue,
            },
        },
    ));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("binding {addr}"))?;
        let url = format!("http://{}", listener.local_addr()?);
        eprintln!("tandem: serving '{model_id}' on {url} (OpenAI API under {url}/v1)");
        eprintln!(
            "tandem: try  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \
             -d '{{\"model\":\"{model_id}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}]}}'"
        );
        let state = scheduler::AppState::new(cluster.clone());
        scheduler::serve(listener, state, args.max_body_bytes, shutdown_signal()).await?;
        eprintln!("tandem: shutting down");
        anyhow::Ok(())
    })?;
    drop(rt);
    if let Ok(cluster) = Arc::try_unwrap(cluster) {
        cluster.shutdown();
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
