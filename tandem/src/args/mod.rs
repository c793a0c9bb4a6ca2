//! Every flag of the `tandem` subcommands that run a cluster, in one place: clap structs
//! flattened into each subcommand, one constant per default (the library's own, where the
//! library has one), and the command lines `tandem up` gives its children generated from the
//! same structs ([`DecodeArgs::to_args`] and friends; a test parses each back to equal values).

use anyhow::Context;
use clap::Args;
use std::path::PathBuf;

mod cluster;
mod experts;
mod routing;
mod store;
mod telemetry;
pub use cluster::{ClusterArgs, DiscoveryArgs, EtcdArgs};
pub use experts::{ExpertArgs, ExpertServingArgs, ExpertUseArgs, parse_experts};
#[cfg(test)]
use routing::{KvTransportArg, RouterMode};
pub use routing::{RoutingArgs, SharingArgs};
#[cfg(test)]
use store::StoreTierArgs;
pub use store::{KvStoreArgs, StoreUseArgs, UpStoreArgs};
pub use telemetry::{LogFormat, TelemetryArgs};

/// Default KV cache budget per worker, in MiB.
pub const DEFAULT_KV_CACHE_MIB: usize = 512;
/// Default gRPC address of `tandem decode`.
pub const DEFAULT_DECODE_LISTEN: &str = "127.0.0.1:50061";
/// Default gRPC address of `tandem prefill`.
pub const DEFAULT_PREFILL_LISTEN: &str = "127.0.0.1:50051";
/// Default HTTP host and port of the API.
pub const DEFAULT_HOST: &str = "127.0.0.1";
pub const DEFAULT_PORT: u16 = 8000;
/// Default seconds an etcd registration lives without a keep-alive.
pub const DEFAULT_ETCD_TTL_SECS: u64 = 5;

/// Pushes `--flag value`.
fn flag(out: &mut Vec<String>, name: &str, value: impl ToString) {
    out.push(format!("--{name}"));
    out.push(value.to_string());
}

/// Pushes `--flag value` when there is a value.
fn opt(out: &mut Vec<String>, name: &str, value: Option<impl ToString>) {
    if let Some(v) = value {
        flag(out, name, v);
    }
}

/// Pushes `--flag a,b,c` when the list is not empty.
fn list<T: ToString>(out: &mut Vec<String>, name: &str, values: &[T]) {
    if !values.is_empty() {
        let v: Vec<String> = values.iter().map(ToString::to_string).collect();
        flag(out, name, v.join(","));
    }
}

/// Pushes `--flag` when set.
fn switch(out: &mut Vec<String>, name: &str, on: bool) {
    if on {
        out.push(format!("--{name}"));
    }
}

/// What every process that reads the model takes.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct ModelArgs {
    /// A GGUF file of the `llama` architecture (default: SmolLM2-135M-Instruct, fetched on first run).
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: Option<PathBuf>,
    /// The id clients use in `model` (default: the file's name).
    #[arg(long, env = "TANDEM_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Weight precision: w4a8 (the default: GGUF blocks as stored × 8-bit activations; other tensor types as int8), int8 (W8A8, every weight requantized to 8 bits per channel) or f32 (every weight dequantized; the exact reference).
    #[arg(long, env = "TANDEM_PRECISION", default_value_t = engine::Precision::default())]
    pub precision: engine::Precision,
    /// KV cache storage: f16 (the default), int8 (a scale per position and head; least memory) or f32 (exact), as vLLM's flag.
    #[arg(long, env = "TANDEM_KV_CACHE_DTYPE", default_value_t = engine::KvDtype::default())]
    pub kv_cache_dtype: engine::KvDtype,
    /// What computes: cpu (the default) or cuda (a binary built with `--features cuda`, on a
    /// machine with an NVIDIA GPU; its libraries are loaded at start).
    #[arg(long, env = "TANDEM_DEVICE", default_value_t = engine::Device::default())]
    pub device: engine::Device,
}

impl ModelArgs {
    /// The API name: the flag, else the default model's id when the default model is used.
    pub fn model_id(&self) -> Option<String> {
        self.served_model_name.clone().or_else(|| {
            self.model
                .is_none()
                .then(|| engine::fetch::DEFAULT_MODEL.id.to_string())
        })
    }

    /// The file at `path` with the default numerics.
    pub fn default_for(path: PathBuf) -> ModelArgs {
        ModelArgs {
            model: Some(path),
            served_model_name: None,
            precision: engine::Precision::default(),
            kv_cache_dtype: engine::KvDtype::default(),
            device: engine::Device::default(),
        }
    }

    pub fn numerics(&self) -> engine::Numerics {
        engine::Numerics {
            precision: self.precision,
            kv_dtype: self.kv_cache_dtype,
            device: self.device,
        }
    }

    pub fn to_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        opt(&mut a, "model", self.model.as_ref().map(|p| p.display()));
        opt(&mut a, "served-model-name", self.served_model_name.as_ref());
        flag(&mut a, "precision", self.precision);
        flag(&mut a, "kv-cache-dtype", self.kv_cache_dtype);
        if self.device != engine::Device::Cpu {
            flag(&mut a, "device", self.device);
        }
        a
    }
}

/// What a process that computes takes: its cores, threads and KV memory.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct ComputeArgs {
    /// Compute threads (default: all cores, or the cores of --cpus).
    #[arg(long, env = "TANDEM_THREADS")]
    pub threads: Option<usize>,
    /// KV cache budget in MiB; the pool never grows past it.
    #[arg(long, env = "TANDEM_KV_CACHE_MIB", default_value_t = DEFAULT_KV_CACHE_MIB)]
    pub kv_cache_mib: usize,
    /// Pin this process to these cores (e.g. `0` or `0,1`).
    #[arg(long, value_delimiter = ',')]
    pub cpus: Vec<usize>,
}

impl ComputeArgs {
    /// Pins the process and sizes the compute pool; returns the thread count.
    pub fn setup(&self) -> anyhow::Result<usize> {
        if !self.cpus.is_empty() {
            crate::process::pin(&self.cpus)?;
        }
        crate::process::init_compute_threads(
            self.threads
                .or((!self.cpus.is_empty()).then_some(self.cpus.len())),
        )
    }

    /// How to load the engine of `model`.
    pub fn engine_config(&self, model: &ModelArgs) -> engine::EngineConfig {
        engine::EngineConfig {
            kv_budget_bytes: self.kv_cache_mib << 20,
            model_id: model.model_id(),
            precision: model.precision,
            kv_dtype: model.kv_cache_dtype,
            kv_shared_path: None,
            device: model.device,
        }
    }

    pub fn to_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        opt(&mut a, "threads", self.threads);
        flag(&mut a, "kv-cache-mib", self.kv_cache_mib);
        list(&mut a, "cpus", &self.cpus);
        a
    }
}

/// How a decode worker (or the colocated one) batches, as vLLM's flags.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct BatchArgs {
    /// Tokens per forward step (decode tokens first, prefill chunks fill the rest).
    #[arg(long, env = "TANDEM_MAX_NUM_BATCHED_TOKENS", default_value_t = decode_worker::DEFAULT_MAX_BATCH_TOKENS)]
    pub max_num_batched_tokens: usize,
    /// Sequences in the running batch at most.
    #[arg(long, env = "TANDEM_MAX_NUM_SEQS", default_value_t = decode_worker::DEFAULT_MAX_RUNNING)]
    pub max_num_seqs: usize,
    /// Requests that may wait to start on a worker before new ones are refused (503).
    #[arg(long, env = "TANDEM_MAX_QUEUE", default_value_t = decode_worker::DEFAULT_MAX_WAITING)]
    pub max_queue: usize,
}

impl BatchArgs {
    pub fn worker_config(&self) -> decode_worker::WorkerConfig {
        decode_worker::WorkerConfig {
            max_batch_tokens: self.max_num_batched_tokens.max(1),
            max_running: self.max_num_seqs.max(1),
            max_waiting: self.max_queue,
        }
    }

    pub fn to_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        flag(
            &mut a,
            "max-num-batched-tokens",
            self.max_num_batched_tokens,
        );
        flag(&mut a, "max-num-seqs", self.max_num_seqs);
        flag(&mut a, "max-queue", self.max_queue);
        a
    }
}

/// Where the OpenAI API listens.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct HttpArgs {
    /// Address to listen on.
    #[arg(long, env = "TANDEM_HOST", default_value = DEFAULT_HOST)]
    pub host: String,
    /// Port to listen on.
    #[arg(long, env = "TANDEM_PORT", default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// Largest request body, in bytes.
    #[arg(long, default_value_t = scheduler::DEFAULT_MAX_BODY)]
    pub max_body_bytes: usize,
    /// Require `Authorization: Bearer KEY` on the API routes (`/v1/…`; not on `/health` or `/metrics`), as vLLM's flag. Prefer the environment variable: a command line is visible to every local user.
    #[arg(long, env = "TANDEM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// HTTP connections open at most; beyond, new ones are closed at accept.
    #[arg(long, default_value_t = scheduler::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Longest sequence (prompt + completion, in tokens) a request may ask for (default: the model's context length), as vLLM's flag; longer requests are refused with a 400.
    #[arg(long, env = "TANDEM_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,
}

impl HttpArgs {
    /// The flags but the API key, which reaches a child by its environment
    /// ([`child_env`](Self::child_env)), never its command line.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        flag(&mut a, "host", &self.host);
        flag(&mut a, "port", self.port);
        flag(&mut a, "max-body-bytes", self.max_body_bytes);
        flag(&mut a, "max-connections", self.max_connections);
        opt(&mut a, "max-model-len", self.max_model_len);
        a
    }

    /// What a child serving these flags needs in its environment.
    pub fn child_env(&self) -> Vec<(String, String)> {
        self.api_key
            .iter()
            .map(|k| ("TANDEM_API_KEY".to_string(), k.clone()))
            .collect()
    }
}

/// `tandem decode`.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct DecodeArgs {
    /// gRPC address to listen on.
    #[arg(long, default_value = DEFAULT_DECODE_LISTEN)]
    pub listen: String,
    /// The TCP KV data plane's address (port 0: any free port; default: the --listen host, any port).
    #[arg(long)]
    pub kv_listen: Option<String>,
    /// Keep the KV pool in private memory (prefill workers on this host then use TCP too).
    #[arg(long)]
    pub no_shm: bool,
    /// Serve /live, /health (ready) and /metrics over plain HTTP on this address (probes and Prometheus; off by default).
    #[arg(long, env = "TANDEM_STATUS_LISTEN")]
    pub status_listen: Option<String>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub discovery: DiscoveryArgs,
    #[command(flatten)]
    pub batch: BatchArgs,
    #[command(flatten)]
    pub sharing: SharingArgs,
    #[command(flatten)]
    pub store: StoreUseArgs,
    #[command(flatten)]
    pub experts: ExpertUseArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub compute: ComputeArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

impl DecodeArgs {
    /// The command line that parses back to these values.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec!["decode".to_string()];
        flag(&mut a, "listen", &self.listen);
        opt(&mut a, "kv-listen", self.kv_listen.as_ref());
        switch(&mut a, "no-shm", self.no_shm);
        opt(&mut a, "status-listen", self.status_listen.as_ref());
        a.extend(self.cluster.to_args());
        a.extend(self.discovery.to_args());
        a.extend(self.batch.to_args());
        a.extend(self.sharing.to_args());
        a.extend(self.store.to_args());
        a.extend(self.experts.to_args());
        a.extend(self.model.to_args());
        a.extend(self.compute.to_args());
        a.extend(self.telemetry.to_args());
        a
    }
}

/// `tandem prefill`.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct PrefillArgs {
    /// gRPC address to listen on.
    #[arg(long, default_value = DEFAULT_PREFILL_LISTEN)]
    pub listen: String,
    /// Prompt tokens per batched forward pass (a longer prompt runs alone).
    #[arg(long, default_value_t = prefill_worker::DEFAULT_MAX_BATCH_TOKENS)]
    pub max_prefill_tokens: usize,
    /// Prefills that may wait before new ones are refused.
    #[arg(long, default_value_t = prefill_worker::DEFAULT_MAX_WAITING)]
    pub max_prefill_waiting: usize,
    /// Serve /live, /health (ready) and /metrics over plain HTTP on this address (probes and Prometheus; off by default).
    #[arg(long, env = "TANDEM_STATUS_LISTEN")]
    pub status_listen: Option<String>,
    /// The pooled KV store's gRPC address (`tandem kv-store`): a prompt computed in this worker's own pool (its KV going to a decode worker on another host, over TCP) takes the prefix the store holds instead of computing it.
    #[arg(long, env = "TANDEM_KV_STORE_ADDR")]
    pub kv_store_addr: Option<String>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub discovery: DiscoveryArgs,
    #[command(flatten)]
    pub sharing: SharingArgs,
    #[command(flatten)]
    pub experts: ExpertUseArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub compute: ComputeArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

impl PrefillArgs {
    pub fn prefill_config(
        &self,
        secret: Option<protocol::auth::ClusterSecret>,
    ) -> anyhow::Result<prefill_worker::PrefillConfig> {
        let arbiter = match &self.sharing.share_cores {
            Some(p) => Some(std::sync::Arc::new(
                protocol::cores::CoreArbiter::open(p)
                    .with_context(|| format!("opening {}", p.display()))?,
            )),
            None => None,
        };
        // (Within a runtime: the store's channel is made on it.)
        let store = match &self.kv_store_addr {
            Some(addr) => Some(
                kv_store::store::client::StoreClient::new(addr, secret.clone())
                    .map_err(|e| anyhow::anyhow!("--kv-store-addr: {e}"))?,
            ),
            None => None,
        };
        Ok(prefill_worker::PrefillConfig {
            max_batch_tokens: self.max_prefill_tokens.max(1),
            max_waiting: self.max_prefill_waiting.max(1),
            secret,
            arbiter,
            store,
        })
    }

    /// The command line that parses back to these values.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec!["prefill".to_string()];
        flag(&mut a, "listen", &self.listen);
        flag(&mut a, "max-prefill-tokens", self.max_prefill_tokens);
        flag(&mut a, "max-prefill-waiting", self.max_prefill_waiting);
        opt(&mut a, "status-listen", self.status_listen.as_ref());
        opt(&mut a, "kv-store-addr", self.kv_store_addr.as_ref());
        a.extend(self.cluster.to_args());
        a.extend(self.discovery.to_args());
        a.extend(self.sharing.to_args());
        a.extend(self.experts.to_args());
        a.extend(self.model.to_args());
        a.extend(self.compute.to_args());
        a.extend(self.telemetry.to_args());
        a
    }
}

/// `tandem scheduler`.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct SchedulerArgs {
    #[command(flatten)]
    pub http: HttpArgs,
    /// Prefill workers' gRPC addresses (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub prefill: Vec<String>,
    /// Decode workers' gRPC addresses (comma-separated).
    #[arg(long, value_delimiter = ',', required_unless_present = "etcd")]
    pub decode: Vec<String>,
    /// Discover workers in etcd (--etcd endpoints; needs a build with `--features etcd`): workers of this model join the routing table when they register and leave it when their lease expires.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub routing: RoutingArgs,
    /// The pooled KV store (`tandem kv-store`) whose tiers KV-aware routing counts.
    #[arg(long, env = "TANDEM_KV_STORE_ADDR")]
    pub kv_store_addr: Option<String>,
    /// The model (the scheduler reads its tokenizer and chat template; no weights).
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

impl SchedulerArgs {
    /// The command line that parses back to these values.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec!["scheduler".to_string()];
        a.extend(self.http.to_args());
        list(&mut a, "prefill", &self.prefill);
        list(&mut a, "decode", &self.decode);
        a.extend(self.etcd.to_args());
        a.extend(self.cluster.to_args());
        a.extend(self.routing.to_args());
        opt(&mut a, "kv-store-addr", self.kv_store_addr.as_ref());
        a.extend(self.model.to_args());
        a.extend(self.telemetry.to_args());
        a
    }
}

/// `tandem up`.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct UpArgs {
    #[command(flatten)]
    pub http: HttpArgs,
    /// One worker in this process prefills and decodes (vLLM's way), instead of separate prefill and decode worker processes.
    #[arg(long)]
    pub colocated: bool,
    /// Prefill worker processes.
    #[arg(long, default_value_t = 1)]
    pub prefill: usize,
    /// Decode worker processes.
    #[arg(long, default_value_t = 1)]
    pub decode: usize,
    /// Pin each worker process to its own core (round robin over this machine's cores; one compute thread each).
    #[arg(long)]
    pub pin: bool,
    /// Expert worker processes (`tandem expert`) for a mixture-of-experts model: its experts split evenly over them, shared by every prefill and decode worker (expert parallelism). Default: none, each worker computes every expert.
    #[arg(long)]
    pub experts: Option<usize>,
    #[command(flatten)]
    pub serving: ExpertServingArgs,
    #[command(flatten)]
    pub routing: RoutingArgs,
    #[command(flatten)]
    pub store: UpStoreArgs,
    #[command(flatten)]
    pub batch: BatchArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub compute: ComputeArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

#[cfg(test)]
mod tests;
