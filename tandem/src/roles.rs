//! `tandem prefill`, `tandem decode`, `tandem scheduler`, `tandem kv-store`: one cluster
//! component per process.

use crate::args::{
    ClusterArgs, DecodeArgs, DiscoveryArgs, ExpertArgs, KvStoreArgs, PrefillArgs, SchedulerArgs,
};
use crate::process::{model_path, runtime, shutdown_signal};
use crate::status::{Phase, Status};
use anyhow::Context;
use engine::Engine;
use std::sync::Arc;
#[cfg(feature = "etcd")]
use std::time::Duration;

/// Binding and registering, as the flags say.
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

    /// Runs `serve`, registered in `etcd` (read from these flags by the caller, before it
    /// loads the model) under `role`, with the engine's fingerprint, for as long as it runs.
    async fn registered(
        &self,
        etcd: protocol::discovery::EtcdConfig,
        role: &str,
        entry: protocol::discovery::Entry,
        serve: impl std::future::Future<Output = anyhow::Result<()>>,
    ) -> anyhow::Result<()> {
        if etcd.endpoints.is_empty() {
            return serve.await;
        }
        #[cfg(feature = "etcd")]
        {
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let reg = tokio::spawn(protocol::discovery::register(
                etcd,
                role.to_string(),
                entry,
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
            let _ = (role, entry, serve);
            anyhow::bail!("this build has no etcd support (build with `--features etcd`)")
        }
    }
}

/// The cluster secret for a worker listening on `listens`: read from the file named, or
/// none — but a worker reachable beyond loopback without one exits with status 2 at once
/// (before fetching or loading a model), since anyone who reaches it could drive it.
fn worker_secret(
    cluster: &ClusterArgs,
    listens: &[&str],
) -> anyhow::Result<Option<protocol::auth::ClusterSecret>> {
    let secret = cluster.load()?;
    if secret.is_none()
        && let Some(open) = listens
            .iter()
            .find(|a| !protocol::auth::is_loopback_host(protocol::auth::host_of(a)))
    {
        eprintln!(
            "tandem: refusing to listen on {open} without a cluster secret: anyone who reaches \
             it could drive this worker. Give --cluster-secret-file (or {}) to every process of \
             the cluster, or listen on loopback only.",
            protocol::auth::SECRET_FILE_ENV
        );
        std::process::exit(2);
    }
    Ok(secret)
}

/// A decode worker's use of the store, as its flags say.
fn store_use(
    args: &crate::args::StoreUseArgs,
    secret: Option<protocol::auth::ClusterSecret>,
) -> anyhow::Result<Option<decode_worker::store::StoreUse>> {
    let Some(addr) = &args.kv_store_addr else {
        return Ok(None);
    };
    let client = kv_store::store::client::StoreClient::new(addr, secret)
        .map_err(|e| anyhow::anyhow!("--kv-store-addr: {e}"))?;
    Ok(Some(decode_worker::store::StoreUse {
        client,
        write_through: args.kv_store_write_through,
    }))
}

/// The worker's status, served on `listen` (if given) from now on: before the model loads.
fn status_server(
    rt: &tokio::runtime::Runtime,
    listen: Option<&str>,
    role: &'static str,
) -> anyhow::Result<Status> {
    let status = Status::new(role);
    if let Some(addr) = listen {
        rt.block_on(crate::status::spawn(addr, status.clone()))?;
    }
    Ok(status)
}

/// Resolves on the stop signal, having marked the worker draining (no longer ready).
async fn draining(status: Status) {
    shutdown_signal().await;
    status.set(Phase::Draining);
}

pub fn decode(args: DecodeArgs) -> anyhow::Result<()> {
    let kv_listen = args
        .kv_listen
        .clone()
        .unwrap_or_else(|| format!("{}:0", protocol::auth::host_of(&args.listen)));
    let secret = worker_secret(&args.cluster, &[&args.listen, &kv_listen])?;
    let etcd = args.discovery.etcd.config()?;
    args.compute.setup()?;
    let rt = runtime()?;
    let status = status_server(&rt, args.status_listen.as_deref(), "decode")?;
    let path = model_path(args.model.model.as_deref())?;
    let mut cfg = args.compute.engine_config(&args.model);
    if !args.no_shm {
        let dir = kv_store::shm::dir();
        let swept = kv_store::shm::sweep_stale(&dir);
        if swept > 0 {
            tracing::info!(files = swept, "removed KV pools left by dead workers");
        }
        cfg.kv_shared_path = Some(kv_store::shm::pool_path(&dir));
    }
    let mut engine =
        Engine::load(&path, &cfg).with_context(|| format!("loading {}", path.display()))?;
    args.experts
        .attach(&mut engine, &path, cfg.precision, secret.as_ref())?;
    let engine = Arc::new(engine);
    let worker = args.batch.worker_config();
    let advertise = args.discovery.host(&args.listen);
    let fingerprint = engine.frontend.fingerprint;
    rt.block_on(async {
        let (listener, addr) = args.discovery.bind(&args.listen).await?;
        status.set(Phase::Serving);
        let serve = async {
            decode_worker::service::serve(
                engine,
                worker,
                listener,
                &kv_listen,
                &advertise,
                decode_worker::service::ServiceConfig {
                    store: store_use(&args.store, secret.clone())?,
                    secret,
                    sharing: args.sharing.decode()?,
                    ..Default::default()
                },
                draining(status.clone()),
            )
            .await
            .context("decode worker")
        };
        let entry = protocol::discovery::Entry { addr, fingerprint };
        args.discovery
            .registered(etcd, "decode", entry, serve)
            .await
    })
}

pub fn expert(args: ExpertArgs) -> anyhow::Result<()> {
    let secret = worker_secret(&args.cluster, &[&args.listen])?;
    let held = crate::args::parse_experts(&args.experts)?;
    args.compute.setup()?;
    let rt = runtime()?;
    let status = status_server(&rt, args.status_listen.as_deref(), "expert")?;
    let path = model_path(args.model.model.as_deref())?;
    let g = engine::gguf::GgufFile::open(&path)?;
    let precision = args.model.precision;
    let shard = engine::moe::shard::ExpertShard::load(&g, precision, &held)
        .with_context(|| format!("loading experts {held:?} of {}", path.display()))?;
    let fingerprint = expert_worker::wire::fingerprint(&g, precision);
    drop(g);
    tracing::info!(experts = ?held, layers = shard.cfg.n_layers, weights_mib = shard.bytes() >> 20, "experts loaded");
    let server = expert_worker::ExpertServer::bind(
        &args.listen,
        shard,
        Some(path.clone()),
        fingerprint,
        secret,
    )
    .with_context(|| format!("listening on {}", args.listen))?;
    tracing::info!(addr = %server.local_addr(), "expert worker serving");
    status.set(Phase::Serving);
    rt.block_on(draining(status));
    server.stop();
    Ok(())
}

pub fn kv_store(args: KvStoreArgs) -> anyhow::Result<()> {
    let data_listen = args
        .data_listen
        .clone()
        .unwrap_or_else(|| format!("{}:0", protocol::auth::host_of(&args.listen)));
    let secret = worker_secret(&args.cluster, &[&args.listen, &data_listen])?;
    let rt = runtime()?;
    let status = status_server(&rt, args.status_listen.as_deref(), "kv-store")?;
    let limits = args.tiers.limits();
    let store = Arc::new(
        kv_store::store::Store::open(limits.clone()).context("opening the KV store's disk tier")?,
    );
    let discovery = DiscoveryArgs {
        etcd: Default::default(),
        etcd_ttl_secs: crate::args::DEFAULT_ETCD_TTL_SECS,
        advertise_host: args.advertise_host.clone(),
    };
    rt.block_on(async {
        let (listener, _) = discovery.bind(&args.listen).await?;
        status.set(Phase::Serving);
        kv_store::store::service::serve(
            store,
            limits,
            listener,
            &data_listen,
            &discovery.host(&args.listen),
            secret,
            draining(status.clone()),
        )
        .await
        .context("KV store")
    })
}

pub fn prefill(args: PrefillArgs) -> anyhow::Result<()> {
    let secret = worker_secret(&args.cluster, &[&args.listen])?;
    let etcd = args.discovery.etcd.config()?;
    if args.sharing.share_cores.is_some() {
        // Before any thread starts: they all inherit it (the compute pool above all).
        protocol::cores::yield_cores().context("lowering the prefill worker to idle priority")?;
    }
    args.compute.setup()?;
    let rt = runtime()?;
    let status = status_server(&rt, args.status_listen.as_deref(), "prefill")?;
    let path = model_path(args.model.model.as_deref())?;
    // A prefill worker's own pool: TCP transfers compute into it, and its prefix cache.
    let mut engine = Engine::load(&path, &args.compute.engine_config(&args.model))
        .with_context(|| format!("loading {}", path.display()))?;
    args.experts
        .attach(&mut engine, &path, args.model.precision, secret.as_ref())?;
    let engine = Arc::new(engine);
    let cfg = {
        let _on = rt.enter();
        args.prefill_config(secret)?
    };
    let fingerprint = engine.frontend.fingerprint;
    rt.block_on(async {
        let (listener, addr) = args.discovery.bind(&args.listen).await?;
        status.set(Phase::Serving);
        let serve = async {
            prefill_worker::service::serve(engine, cfg, listener, draining(status.clone()))
                .await
                .context("prefill worker")
        };
        let entry = protocol::discovery::Entry { addr, fingerprint };
        args.discovery
            .registered(etcd, "prefill", entry, serve)
            .await
    })
}

pub fn scheduler(args: SchedulerArgs) -> anyhow::Result<()> {
    let path = model_path(args.model.model.as_deref())?;
    let (id, numerics) = (args.model.model_id(), args.model.numerics());
    let frontend = Arc::new(
        if engine::bundle::is_bundle(&path) {
            let m = engine::bundle::Manifest::read(&path)?;
            engine::bundle::frontend(&path, &m, id.as_deref(), numerics)
        } else {
            engine::Frontend::load(&path, id.as_deref(), numerics).map_err(Into::into)
        }
        .with_context(|| format!("reading {}", path.display()))?,
    );
    let model_id = frontend.model_id.clone();
    let remote = scheduler::remote::RemoteConfig {
        prefill: args.prefill.clone(),
        decode: args.decode.clone(),
        etcd: args.etcd.config()?,
        secret: args.cluster.load()?,
        kv_store: args.kv_store_addr.clone(),
        ..args.routing.config()?
    };
    runtime()?.block_on(async {
        let cluster = Arc::new(scheduler::cluster::Cluster::remote(frontend, remote).map_err(|e| anyhow::anyhow!("{e}"))?);
        let addr = format!("{}:{}", args.http.host, args.http.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let url = format!("http://{}", listener.local_addr()?);
        eprintln!(
            "tandem: scheduler serving '{model_id}' on {url} (OpenAI API under {url}/v1); prefill {:?}, decode {:?}",
            args.prefill, args.decode
        );
        let state = scheduler::AppState::new(cluster).with_api_key(args.http.api_key.clone())
            .with_max_model_len(args.http.max_model_len);
        scheduler::serve(
            listener,
            state,
            args.http.max_body_bytes,
            args.http.max_connections,
            shutdown_signal(),
        )
        .await?;
        eprintln!("tandem: scheduler stopped");
        anyhow::Ok(())
    })
}
