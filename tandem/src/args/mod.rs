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
pub use experts::{ExpertArgs, ExpertUseArgs, parse_experts};
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
        Ok(prefill_worker::PrefillConfig {
            max_batch_tokens: self.max_prefill_tokens.max(1),
            max_waiting: self.max_prefill_waiting.max(1),
            secret,
            arbiter,
        })
    }

    /// The command line that parses back to these values.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec!["prefill".to_string()];
        flag(&mut a, "listen", &self.listen);
        flag(&mut a, "max-prefill-tokens", self.max_prefill_tokens);
        flag(&mut a, "max-prefill-waiting", self.max_prefill_waiting);
        opt(&mut a, "status-listen", self.status_listen.as_ref());
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
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    #[command(name = "tandem")]
    enum Role {
        Expert(ExpertArgs),
        Decode(DecodeArgs),
        Prefill(PrefillArgs),
        Scheduler(SchedulerArgs),
        KvStore(KvStoreArgs),
    }

    fn parse(args: Vec<String>) -> Role {
        Role::try_parse_from(std::iter::once("tandem".to_string()).chain(args))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn model() -> ModelArgs {
        ModelArgs {
            model: Some("/models/m.gguf".into()),
            served_model_name: Some("m".into()),
            precision: engine::Precision::Int8,
            kv_cache_dtype: engine::KvDtype::F32,
            device: engine::Device::Cuda,
        }
    }

    fn compute(cpus: Vec<usize>) -> ComputeArgs {
        ComputeArgs {
            threads: Some(3),
            kv_cache_mib: 77,
            cpus,
        }
    }

    /// What `tandem up` generates for its children parses back to the very values, with every
    /// field away from its default (so a flag dropped or misnamed fails here).
    #[test]
    fn child_command_lines_parse_back_to_their_values() {
        let d = DecodeArgs {
            listen: "127.0.0.1:1234".into(),
            kv_listen: Some("127.0.0.1:0".into()),
            no_shm: true,
            status_listen: Some("0.0.0.0:9090".into()),
            cluster: ClusterArgs {
                cluster_secret_file: Some("/run/secrets/tandem".into()),
            },
            discovery: DiscoveryArgs {
                etcd: EtcdArgs {
                    etcd: vec!["https://a:1".into(), "https://b:2".into()],
                    etcd_user: Some("tandem".into()),
                    etcd_password_file: Some("/run/secrets/etcd-pw".into()),
                    etcd_ca_file: Some("/etc/etcd/ca.pem".into()),
                    etcd_cert_file: Some("/etc/etcd/client.pem".into()),
                    etcd_key_file: Some("/etc/etcd/client-key.pem".into()),
                },
                etcd_ttl_secs: 9,
                advertise_host: Some("10.0.0.2".into()),
            },
            batch: BatchArgs {
                max_num_batched_tokens: 100,
                max_num_seqs: 7,
                max_queue: 5,
            },
            sharing: SharingArgs {
                share_cores: Some("/tmp/up/cores".into()),
                pace_ms: Some(12.5),
            },
            store: StoreUseArgs {
                kv_store_addr: Some("10.0.0.9:50071".into()),
                kv_store_write_through: true,
            },
            experts: ExpertUseArgs {
                expert_workers: vec!["127.0.0.1:5".into(), "10.0.0.3:6".into()],
            },
            model: model(),
            compute: compute(vec![1, 2]),
            telemetry: TelemetryArgs {
                otlp_endpoint: Some("http://collector:4317".into()),
                log_format: LogFormat::Json,
            },
        };
        match parse(d.to_args()) {
            Role::Decode(got) => assert_eq!(got, d),
            other => panic!("{other:?}"),
        }
        let p = PrefillArgs {
            listen: "127.0.0.1:99".into(),
            max_prefill_tokens: 300,
            max_prefill_waiting: 3,
            status_listen: Some("[::]:9091".into()),
            cluster: ClusterArgs {
                cluster_secret_file: Some("/s".into()),
            },
            discovery: DiscoveryArgs {
                etcd: EtcdArgs::default(),
                etcd_ttl_secs: 2,
                advertise_host: None,
            },
            sharing: SharingArgs {
                share_cores: Some("/tmp/up/cores".into()),
                pace_ms: None,
            },
            experts: ExpertUseArgs {
                expert_workers: vec!["127.0.0.1:7".into()],
            },
            model: model(),
            compute: compute(vec![0]),
            telemetry: TelemetryArgs::default(),
        };
        match parse(p.to_args()) {
            Role::Prefill(got) => assert_eq!(got, p),
            other => panic!("{other:?}"),
        }
        let s = SchedulerArgs {
            http: HttpArgs {
                host: "0.0.0.0".into(),
                port: 1,
                max_body_bytes: 12,
                max_connections: 17,
                api_key: None,
                max_model_len: Some(96),
            },
            prefill: vec!["a:1".into(), "b:2".into()],
            decode: vec!["c:3".into()],
            etcd: EtcdArgs {
                etcd: vec!["http://e:4".into()],
                etcd_user: Some("sched".into()),
                etcd_password_file: Some("/pw".into()),
                ..Default::default()
            },
            cluster: ClusterArgs {
                cluster_secret_file: Some("/t".into()),
            },
            routing: RoutingArgs {
                disagg_min_tokens: Some(5),
                max_prefill_queue: Some(2),
                cost_profile: Some("/p.json".into()),
                slo_ttft_ms: 3000,
                slo_tpot_ms: 25,
                kv_transport: KvTransportArg::Tcp,
                hold_secs: 4,
                max_inflight: 11,
                prefill_timeout_secs: 13,
                router_mode: RouterMode::Load,
                router_temperature: 0.25,
                router_credit_ram: 0.5,
                router_credit_disk: 0.125,
            },
            kv_store_addr: Some("10.0.0.9:50071".into()),
            model: model(),
            telemetry: TelemetryArgs {
                otlp_endpoint: Some("http://otel:4317".into()),
                log_format: LogFormat::Text,
            },
        };
        match parse(s.to_args()) {
            Role::Scheduler(got) => assert_eq!(got, s),
            other => panic!("{other:?}"),
        }
        let k = KvStoreArgs {
            listen: "0.0.0.0:7".into(),
            data_listen: Some("0.0.0.0:8".into()),
            tiers: StoreTierArgs {
                ram_mib: 5,
                disk_dir: Some("/var/lib/tandem/kv".into()),
                disk_gib: 0.5,
            },
            status_listen: Some("0.0.0.0:9".into()),
            advertise_host: Some("10.1.2.3".into()),
            cluster: ClusterArgs {
                cluster_secret_file: Some("/k".into()),
            },
            telemetry: TelemetryArgs::default(),
        };
        match parse(k.to_args()) {
            Role::KvStore(got) => assert_eq!(got, k),
            other => panic!("{other:?}"),
        }
        let x = ExpertArgs {
            listen: "127.0.0.1:11".into(),
            experts: vec!["0-3".into(), "6".into()],
            status_listen: Some("127.0.0.1:12".into()),
            cluster: ClusterArgs {
                cluster_secret_file: Some("/x".into()),
            },
            model: model(),
            compute: compute(vec![1]),
            telemetry: TelemetryArgs::default(),
        };
        match parse(x.to_args()) {
            Role::Expert(got) => assert_eq!(got, x),
            other => panic!("{other:?}"),
        }
        assert_eq!(parse_experts(&x.experts).unwrap(), [0, 1, 2, 3, 6]);
        assert!(parse_experts(&["3-1".into()]).is_err());
        assert!(parse_experts(&["x".into()]).is_err());
        // The API key never appears on a command line; it travels in the environment.
        let keyed = HttpArgs {
            api_key: Some("sk-secret".into()),
            ..s.http.clone()
        };
        assert!(!keyed.to_args().concat().contains("sk-secret"));
        assert_eq!(
            keyed.child_env(),
            [("TANDEM_API_KEY".to_string(), "sk-secret".to_string())]
        );
    }

    /// Flags left out take the libraries' defaults.
    #[test]
    fn defaults_are_the_libraries() {
        let Role::Decode(d) = parse(vec!["decode".into()]) else {
            unreachable!()
        };
        let w = d.batch.worker_config();
        let lib = decode_worker::WorkerConfig::default();
        assert_eq!(
            (w.max_batch_tokens, w.max_running, w.max_waiting),
            (lib.max_batch_tokens, lib.max_running, lib.max_waiting)
        );
        let Role::Scheduler(s) = parse(vec!["scheduler".into(), "--decode".into(), "x:1".into()])
        else {
            unreachable!()
        };
        let (got, lib) = (
            s.routing.config().unwrap(),
            scheduler::remote::RemoteConfig::default(),
        );
        assert_eq!(
            (
                got.disagg_min_tokens,
                got.hold,
                got.max_inflight,
                got.transport,
                got.placement.is_none()
            ),
            (
                lib.disagg_min_tokens,
                lib.hold,
                lib.max_inflight,
                lib.transport,
                true
            )
        );
    }
}
