//! `tandem prefill`, `tandem decode`, `tandem scheduler`: one cluster component per process.

use anyhow::Context;
use clap::Args;
use engine::{Engine, EngineConfig};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// What every worker loads.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
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
    /// Compute threads (default: all cores, or the cores of --cpus).
    #[arg(long, env = "TANDEM_THREADS")]
    pub threads: Option<usize>,
    /// KV cache budget in MiB; the pool never grows past it.
    #[arg(long, env = "TANDEM_KV_CACHE_MIB", default_value_t = 512)]
    pub kv_cache_mib: usize,
    /// Pin this process to these cores (e.g. `0` or `0,1`).
    #[arg(long, value_delimiter = ',')]
    pub cpus: Vec<usize>,
}

impl ModelArgs {
    /// Pins the process, sizes the compute pool, finds the model; returns the model path.
    fn setup(&self) -> anyhow::Result<PathBuf> {
        let threads = if self.cpus.is_empty() {
            self.threads
        } else {
            pin(&self.cpus)?;
            Some(self.threads.unwrap_or(self.cpus.len()))
        };
        crate::init_compute_threads(threads)?;
        crate::model_path(self.model.as_deref())
    }

    fn engine_config(&self) -> EngineConfig {
        let default_id = self
            .model
            .is_none()
            .then(|| engine::fetch::DEFAULT_MODEL.id.to_string());
        EngineConfig {
            kv_budget_bytes: self.kv_cache_mib << 20,
            model_id: self.served_model_name.clone().or(default_id),
            precision: self.precision,
            kv_dtype: self.kv_cache_dtype,
            kv_shared_path: None,
        }
    }
}

/// Pins the calling thread (and every thread it starts later) to `cpus`.
pub fn pin(cpus: &[usize]) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            anyhow::ensure!(c < libc::CPU_SETSIZE as usize, "core {c} is out of range");
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            anyhow::bail!(
                "pinning to cores {cpus:?}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// Where a worker announces itself.
#[derive(Args, Debug, Clone)]
pub struct DiscoveryArgs {
    /// etcd endpoints to register in (comma-separated; needs a build with `--features etcd`).
    #[arg(long, value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Seconds the etcd lease lives without a keep-alive: how soon a dead worker leaves the routing table.
    #[arg(long, default_value_t = 5)]
    pub etcd_ttl_secs: u64,
    /// Host the scheduler (and prefill workers) reach this worker at (default: the --listen host).
    #[arg(long)]
    pub advertise_host: Option<String>,
}

impl DiscoveryArgs {
    /// Binds the gRPC listener; returns it with the `host:port` to announce.
    async fn bind(&self, listen: &str) -> anyhow::Result<(tokio::net::TcpListener, String)> {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        let addr = format!("{}:{}", self.host(listen), listener.local_addr()?.port());
        Ok((listener, addr))
    }

    fn host(&self, listen: &str) -> String {
        self.advertise_host.clone().unwrap_or_else(|| {
            let h = listen
                .rsplit_once(':')
                .map(|(h, _)| h)
                .unwrap_or("127.0.0.1");
            if h == "0.0.0.0" || h == "[::]" {
                "127.0.0.1"
            } else {
                h
            }
            .to_string()
        })
    }

    /// Runs `serve`, registered in etcd under `role` for as long as it runs.
    async fn registered(
        &self,
        role: &str,
        addr: String,
        serve: impl std::future::Future<Output = anyhow::Result<()>>,
    ) -> anyhow::Result<()> {
        if self.etcd.is_empty() {
            return serve.await;
        }
        #[cfg(feature = "etcd")]
        {
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let reg = tokio::spawn(protocol::discovery::register(
                self.etcd.clone(),
                role.to_string(),
                addr,
                Duration::from_secs(self.etcd_ttl_secs.max(1)),
                async {
                    let _ = stopped.await;
                },
            ));
            let r = serve.await;
            let _ = stop.send(());
            let _ = reg.await;
            r
        }
        #[cfg(not(feature = "etcd"))]
        {
            let _ = (role, addr, serve);
            anyhow::bail!("this build has no etcd support (build with `--features etcd`)")
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

#[derive(Args, Debug)]
pub struct DecodeArgs {
    /// gRPC address to listen on.
    #[arg(long, default_value = "127.0.0.1:50061")]
    pub listen: String,
    /// The TCP KV data plane's address (port 0: any free port).
    #[arg(long, default_value = "0.0.0.0:0")]
    pub kv_listen: String,
    #[command(flatten)]
    pub discovery: DiscoveryArgs,
    /// Keep the KV pool in private memory (prefill workers on this host then use TCP too).
    #[arg(long)]
    pub no_shm: bool,
    /// Tokens per forward step (decode tokens first, prefill chunks of short prompts fill the rest).
    #[arg(long, env = "TANDEM_MAX_NUM_BATCHED_TOKENS", default_value_t = 256)]
    pub max_num_batched_tokens: usize,
    /// Sequences in the running batch at most.
    #[arg(long, env = "TANDEM_MAX_NUM_SEQS", default_value_t = 64)]
    pub max_num_seqs: usize,
    /// Requests that may wait to start before new ones are refused.
    #[arg(long, env = "TANDEM_MAX_QUEUE", default_value_t = 256)]
    pub max_queue: usize,
    #[command(flatten)]
    pub model: ModelArgs,
}

pub fn decode(args: DecodeArgs) -> anyhow::Result<()> {
    let path = args.model.setup()?;
    let mut cfg = args.model.engine_config();
    if !args.no_shm {
        let dir = kv_store::shm::dir();
        let swept = kv_store::shm::sweep_stale(&dir);
        if swept > 0 {
            tracing::info!(files = swept, "removed KV pools left by dead workers");
        }
        cfg.kv_shared_path = Some(kv_store::shm::pool_path(&dir));
    }
    let engine =
        Arc::new(Engine::load(&path, &cfg).with_context(|| format!("loading {}", path.display()))?);
    let worker = decode_worker::WorkerConfig {
        max_batch_tokens: args.max_num_batched_tokens.max(1),
        max_running: args.max_num_seqs.max(1),
        max_waiting: args.max_queue,
    };
    let advertise = args.discovery.host(&args.listen);
    runtime()?.block_on(async {
        let (listener, addr) = args.discovery.bind(&args.listen).await?;
        let serve = async {
            decode_worker::service::serve(
                engine,
                worker,
                listener,
                &args.kv_listen,
                &advertise,
                crate::up::shutdown_signal(),
            )
            .await
            .context("decode worker")
        };
        args.discovery.registered("decode", addr, serve).await
    })
}

#[derive(Args, Debug)]
pub struct PrefillArgs {
    /// gRPC address to listen on.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// Prompt tokens per batched forward pass (a longer prompt runs alone).
    #[arg(long, default_value_t = 2048)]
    pub max_prefill_tokens: usize,
    /// Prefills that may wait before new ones are refused.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    #[command(flatten)]
    pub discovery: DiscoveryArgs,
    #[command(flatten)]
    pub model: ModelArgs,
}

pub fn prefill(args: PrefillArgs) -> anyhow::Result<()> {
    let path = args.model.setup()?;
    // A prefill worker's own pool: TCP transfers compute into it, and its prefix cache.
    let engine = Arc::new(
        Engine::load(&path, &args.model.engine_config())
            .with_context(|| format!("loading {}", path.display()))?,
    );
    let cfg = prefill_worker::PrefillConfig {
        max_batch_tokens: args.max_prefill_tokens.max(1),
        max_waiting: args.max_queue.max(1),
    };
    runtime()?.block_on(async {
        let (listener, addr) = args.discovery.bind(&args.listen).await?;
        let serve = async {
            prefill_worker::service::serve(engine, cfg, listener, crate::up::shutdown_signal())
                .await
                .context("prefill worker")
        };
        args.discovery.registered("prefill", addr, serve).await
    })
}

/// How the scheduler routes between prefill and decode workers.
#[derive(Args, Debug, Clone)]
pub struct RoutingArgs {
    /// Prompts shorter than this many tokens are prefilled on the decode worker (conditional disaggregation).
    #[arg(long, default_value_t = 64)]
    pub disagg_min_tokens: usize,
    /// Prefill on the decode worker instead once the least busy prefill worker has this many prefills queued or running (0: never).
    #[arg(long, default_value_t = 0)]
    pub max_prefill_queue: usize,
    /// KV transport between prefill and decode workers: auto (shared memory on one host, else TCP), shm or tcp.
    #[arg(long, default_value = "auto")]
    pub kv_transport: String,
    /// Seconds a stream waits for a decode worker when none is available (after a failure).
    #[arg(long, default_value_t = 60)]
    pub hold_secs: u64,
}

impl RoutingArgs {
    /// Checks the flags; the scheduler's view of them.
    pub fn config(&self) -> anyhow::Result<scheduler::remote::RemoteConfig> {
        let transport = prefill_worker::target::Transport::parse(&self.kv_transport)
            .map_err(anyhow::Error::msg)?;
        Ok(scheduler::remote::RemoteConfig {
            disagg_min_tokens: self.disagg_min_tokens,
            max_prefill_queue: self.max_prefill_queue,
            transport: transport.map(|t| t.name().to_string()).unwrap_or_default(),
            hold: Duration::from_secs(self.hold_secs),
            ..Default::default()
        })
    }

    /// The same flags for a `tandem scheduler` command line.
    pub fn to_args(&self) -> Vec<String> {
        vec![
            "--disagg-min-tokens".into(),
            self.disagg_min_tokens.to_string(),
            "--max-prefill-queue".into(),
            self.max_prefill_queue.to_string(),
            "--kv-transport".into(),
            self.kv_transport.clone(),
            "--hold-secs".into(),
            self.hold_secs.to_string(),
        ]
    }
}

#[derive(Args, Debug)]
pub struct SchedulerArgs {
    /// Address to listen on.
    #[arg(long, env = "TANDEM_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on.
    #[arg(long, env = "TANDEM_PORT", default_value_t = 8000)]
    pub port: u16,
    /// Prefill workers' gRPC addresses (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub prefill: Vec<String>,
    /// Decode workers' gRPC addresses (comma-separated).
    #[arg(long, value_delimiter = ',', required_unless_present = "etcd")]
    pub decode: Vec<String>,
    /// Discover workers in etcd (comma-separated endpoints; needs a build with `--features etcd`): they join the routing table when they register and leave it when their lease expires.
    #[arg(long, value_delimiter = ',')]
    pub etcd: Vec<String>,
    #[command(flatten)]
    pub routing: RoutingArgs,
    /// Requests in flight at most before new ones get 503.
    #[arg(long, env = "TANDEM_MAX_QUEUE", default_value_t = 256)]
    pub max_queue: usize,
    /// Largest request body, in bytes.
    #[arg(long, default_value_t = scheduler::DEFAULT_MAX_BODY)]
    pub max_body_bytes: usize,
    /// The GGUF (the scheduler reads its tokenizer and chat template; no weights).
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: Option<PathBuf>,
    /// The id clients use in `model` (default: the file's name).
    #[arg(long, env = "TANDEM_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
}

pub fn scheduler(args: SchedulerArgs) -> anyhow::Result<()> {
    let path = crate::model_path(args.model.as_deref())?;
    let routing = args.routing.config()?;
    let default_id = args
        .model
        .is_none()
        .then(|| engine::fetch::DEFAULT_MODEL.id.to_string());
    let cfg = EngineConfig {
        model_id: args.served_model_name.clone().or(default_id),
        ..EngineConfig::default()
    };
    let engine = Arc::new(
        Engine::load_frontend(&path, &cfg)
            .with_context(|| format!("reading {}", path.display()))?,
    );
    let model_id = engine.model_id.clone();
    let remote = scheduler::remote::RemoteConfig {
        prefill: args.prefill.clone(),
        decode: args.decode.clone(),
        max_inflight: args.max_queue.max(1),
        etcd: args.etcd.clone(),
        ..routing
    };
    runtime()?.block_on(async {
        let cluster = Arc::new(scheduler::cluster::Cluster::remote(engine, remote).map_err(|e| anyhow::anyhow!("{e}"))?);
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let url = format!("http://{}", listener.local_addr()?);
        eprintln!(
            "tandem: scheduler serving '{model_id}' on {url} (OpenAI API under {url}/v1); prefill {:?}, decode {:?}",
            args.prefill, args.decode
        );
        let state = scheduler::AppState::new(cluster);
        scheduler::serve(listener, state, args.max_body_bytes, crate::up::shutdown_signal()).await?;
        eprintln!("tandem: scheduler stopped");
        anyhow::Ok(())
    })
}
