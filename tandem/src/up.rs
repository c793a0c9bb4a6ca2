//! `tandem up`: a whole cluster on this machine. By default it launches and supervises
//! child processes — `tandem prefill` ×N, `tandem decode` ×M and a `tandem scheduler` in
//! front, with `--kv-store` a `tandem kv-store` and with `--experts N` N `tandem expert` — restarts any that dies, and stops them all on Ctrl-C / SIGTERM. `--colocated`
//! runs the scheduler and one continuous-batching worker in this process instead (how vLLM
//! runs), for comparison.

use crate::args::{
    ClusterArgs, ComputeArgs, DecodeArgs, DiscoveryArgs, ExpertArgs, ExpertUseArgs, KvStoreArgs,
    ModelArgs, PrefillArgs, RoutingArgs, SchedulerArgs, SharingArgs, StoreUseArgs, UpArgs,
};
use crate::process::{model_path, shutdown_signal};
use anyhow::Context;
use engine::Engine;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !(args.colocated && args.store.kv_store),
        "--kv-store serves decode worker processes; --colocated runs none"
    );
    anyhow::ensure!(
        !(args.colocated && args.experts.is_some()),
        "--experts serves prefill and decode worker processes; --colocated runs none"
    );
    // Every worker would fail the same way, and be restarted forever: say it once, now.
    engine::check_device(args.model.device)?;
    if args.colocated {
        colocated(args)
    } else {
        supervise(args)
    }
}

fn colocated(args: UpArgs) -> anyhow::Result<()> {
    let listener = bind_early(&args.http)?;
    let threads = args.compute.setup()?;
    let path = model_path(args.model.model.as_deref())?;
    let cfg = args.compute.engine_config(&args.model);
    eprintln!(
        "tandem: loading {} ({threads} threads, SIMD level {})",
        path.display(),
        kernels::dispatch::level().name()
    );
    let engine =
        Arc::new(Engine::load(&path, &cfg).with_context(|| format!("loading {}", path.display()))?);
    serve_colocated(
        engine,
        args.batch.worker_config(),
        listener,
        &args.http,
        "colocated",
    )
}

/// Binds `http`'s address before the model loads: a client that connects meanwhile waits in
/// the listen backlog and is answered once the model is up, rather than refused.
pub fn bind_early(http: &crate::args::HttpArgs) -> anyhow::Result<std::net::TcpListener> {
    let addr = format!("{}:{}", http.host, http.port);
    let listener = std::net::TcpListener::bind(&addr).with_context(|| format!("binding {addr}"))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serves the OpenAI API on `listener` (bound by [`bind_early`]) from one continuous-batching
/// worker over `engine`, in this process, until Ctrl-C / SIGTERM (`tandem up --colocated`,
/// `tandem edge`).
pub fn serve_colocated(
    engine: Arc<Engine>,
    worker: decode_worker::WorkerConfig,
    listener: std::net::TcpListener,
    http: &crate::args::HttpArgs,
    mode: &str,
) -> anyhow::Result<()> {
    let model_id = engine.frontend.model_id.clone();
    let cluster = Arc::new(decode_worker::colocated::cluster(engine, worker));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let url = format!("http://{}", listener.local_addr()?);
        eprintln!("tandem: serving '{model_id}' on {url} (OpenAI API under {url}/v1), {mode}");
        print_try(&url, &model_id);
        let state = scheduler::AppState::new(cluster.clone())
            .with_api_key(http.api_key.clone())
            .with_max_model_len(http.max_model_len);
        scheduler::serve(
            listener,
            state,
            http.max_body_bytes,
            http.max_connections,
            shutdown_signal(),
        )
        .await?;
        eprintln!("tandem: shutting down");
        anyhow::Ok(())
    })?;
    drop(rt);
    if let Ok(cluster) = Arc::try_unwrap(cluster) {
        cluster.shutdown();
    }
    Ok(())
}

fn print_try(url: &str, model_id: &str) {
    eprintln!(
        "tandem: try  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \
         -d '{{\"model\":\"{model_id}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}]}}'"
    );
}

/// A child process of the cluster and how to start it again.
struct Member {
    name: String,
    args: Vec<String>,
    /// Set in its environment (secrets: never on a command line).
    env: Vec<(String, String)>,
    child: Option<Child>,
    started: Instant,
    /// Delay before the next restart (doubles while it keeps dying young).
    backoff: Duration,
    restart_at: Option<tokio::time::Instant>,
}

impl Member {
    fn spawn(&mut self) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("finding the tandem executable")?;
        let mut child = Command::new(exe)
            .args(&self.args)
            .envs(self.env.iter().cloned())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.name))?;
        // One merged log, each line marked with the member it came from.
        for out in [
            child
                .stdout
                .take()
                .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|e| Box::new(e) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            let name = self.name.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncBufReadExt;
                let mut lines = tokio::io::BufReader::new(out).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    eprintln!("{name:>9} | {l}");
                }
            });
        }
        eprintln!(
            "tandem: started {} (pid {}): tandem {}",
            self.name,
            child.id().unwrap_or(0),
            self.args.join(" ")
        );
        self.child = Some(child);
        self.started = Instant::now();
        self.restart_at = None;
        Ok(())
    }
}

/// A free loopback port (bound, read, released: the child binds it a moment later).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn supervise(args: UpArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.decode >= 1,
        "a cluster needs at least one decode worker"
    );
    // Fetch once here, so that the children do not race to download the model.
    let model = ModelArgs {
        model: Some(model_path(args.model.model.as_deref())?),
        served_model_name: args.model.model_id(),
        ..args.model.clone()
    };
    let cores = crate::process::cores();
    let mut next_core = 0usize;
    let mut compute = || {
        let cpus = if args.pin {
            next_core += 1;
            vec![(next_core - 1) % cores]
        } else {
            Vec::new()
        };
        ComputeArgs {
            cpus,
            ..args.compute.clone()
        }
    };
    // One secret per run, in a private directory that goes with the run: the workers listen on
    // loopback only, but every internal connection proves it all the same.
    let secret_dir = tempfile::Builder::new().prefix("tandem-up-").tempdir()?;
    let secret_file = secret_dir.path().join("cluster-secret");
    protocol::auth::ClusterSecret::generate_file(&secret_file)?;
    let cluster = ClusterArgs {
        cluster_secret_file: Some(secret_file),
    };
    let no_discovery = DiscoveryArgs {
        etcd: Default::default(),
        etcd_ttl_secs: crate::args::DEFAULT_ETCD_TTL_SECS,
        advertise_host: None,
    };
    let mut members = Vec::new();
    // The store first: decode workers reach it from their first request.
    let store = if args.store.kv_store {
        let k = KvStoreArgs {
            listen: format!("127.0.0.1:{}", free_port()?),
            data_listen: Some("127.0.0.1:0".into()),
            tiers: args.store.tiers(),
            status_listen: None,
            advertise_host: None,
            cluster: cluster.clone(),
            telemetry: args.telemetry.clone(),
        };
        members.push(member("kv-store".into(), k.to_args()));
        StoreUseArgs {
            kv_store_addr: Some(k.listen),
            kv_store_write_through: args.store.kv_store_write_through,
        }
    } else {
        anyhow::ensure!(
            !args.store.kv_store_write_through && args.store.kv_store_disk_dir.is_none(),
            "--kv-store-write-through and --kv-store-disk-dir need --kv-store"
        );
        StoreUseArgs::default()
    };
    // Expert workers before the workers that reach them (those wait for them at start).
    let experts = match args.experts {
        None => {
            anyhow::ensure!(
                !args.serving.any(),
                "--microbatches, --eplb-interval, --redundant-experts, --expert-placement and --no-expert-shm need --experts"
            );
            ExpertUseArgs::default()
        }
        Some(n) => {
            let path = model.model.as_deref().expect("fetched above");
            let g = engine::gguf::GgufFile::open(path)?;
            let moe = engine::config::LlamaConfig::from_metadata(&g)?
                .moe
                .context("--experts: the model is dense (it has no experts); serve a mixture-of-experts model, e.g. one `tandem model make-moe` writes")?;
            anyhow::ensure!(
                (1..=moe.n_experts).contains(&n),
                "--experts {n}: the model has {} experts (1 to {0} expert workers)",
                moe.n_experts
            );
            let mut addrs = Vec::new();
            for i in 0..n {
                let (a, b) = (i * moe.n_experts / n, (i + 1) * moe.n_experts / n);
                let x = ExpertArgs {
                    listen: format!("127.0.0.1:{}", free_port()?),
                    experts: vec![format!("{a}-{}", b - 1)],
                    status_listen: None,
                    cluster: cluster.clone(),
                    model: model.clone(),
                    compute: compute(),
                    telemetry: args.telemetry.clone(),
                };
                addrs.push(x.listen.clone());
                members.push(member(format!("expert-{i}"), x.to_args()));
            }
            ExpertUseArgs {
                expert_workers: addrs,
                serving: args.serving.clone(),
            }
        }
    };
    let routing = RoutingArgs {
        cost_profile: cost_profile(&args, &model, secret_dir.path())?,
        ..args.routing.clone()
    };
    // Unpinned, the workers share the cores, the decode steps first (`protocol::cores`), the
    // decode worker weighing its steps by the profile prompts are placed with.
    let sharing = |decode: bool| SharingArgs {
        share_cores: (!args.pin).then(|| secret_dir.path().join("cores")),
        pace_ms: (!args.pin && decode)
            .then_some(scheduler::plan::PACE * args.routing.slo_tpot_ms as f64),
        hold_ms: (!args.pin && decode).then_some(args.routing.slo_ttft_ms as f64),
        pace_profile: (!args.pin && decode)
            .then(|| routing.cost_profile.clone())
            .flatten(),
    };
    let mut decode_addrs = Vec::new();
    for i in 0..args.decode {
        let d = DecodeArgs {
            listen: format!("127.0.0.1:{}", free_port()?),
            kv_listen: Some("127.0.0.1:0".into()),
            no_shm: false,
            status_listen: None,
            cluster: cluster.clone(),
            discovery: no_discovery.clone(),
            batch: args.batch.clone(),
            sharing: sharing(true),
            store: store.clone(),
            experts: experts.clone(),
            model: model.clone(),
            compute: compute(),
            telemetry: args.telemetry.clone(),
        };
        decode_addrs.push(d.listen.clone());
        members.push(member(format!("decode-{i}"), d.to_args()));
    }
    let mut prefill_addrs = Vec::new();
    for i in 0..args.prefill {
        let p = PrefillArgs {
            listen: format!("127.0.0.1:{}", free_port()?),
            max_prefill_tokens: prefill_worker::DEFAULT_MAX_BATCH_TOKENS,
            max_prefill_waiting: prefill_worker::DEFAULT_MAX_WAITING,
            status_listen: None,
            kv_store_addr: store.kv_store_addr.clone(),
            cluster: cluster.clone(),
            discovery: no_discovery.clone(),
            sharing: sharing(false),
            experts: experts.clone(),
            model: model.clone(),
            compute: compute(),
            telemetry: args.telemetry.clone(),
        };
        prefill_addrs.push(p.listen.clone());
        members.push(member(format!("prefill-{i}"), p.to_args()));
    }
    let s = SchedulerArgs {
        http: args.http.clone(),
        prefill: prefill_addrs,
        decode: decode_addrs,
        etcd: Default::default(),
        cluster,
        routing,
        kv_store_addr: store.kv_store_addr.clone(),
        model,
        telemetry: args.telemetry.clone(),
    };
    let mut sched = member("scheduler".into(), s.to_args());
    sched.env = s.http.child_env();
    members.push(sched);
    eprintln!(
        "tandem: cluster of {} prefill + {} decode worker(s){}{}{}; scheduler on http://{}:{} (OpenAI API under /v1)",
        args.prefill,
        args.decode,
        match args.experts {
            Some(n) => format!(", {n} expert worker(s)"),
            None => String::new(),
        },
        if args.pin { ", pinned" } else { "" },
        if args.store.kv_store {
            ", a KV store"
        } else {
            ""
        },
        args.http.host,
        args.http.port
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let r = rt.block_on(run_members(members));
    drop(secret_dir);
    r
}

/// The cost profile the scheduler places requests with: the one named, none when a fixed rule
/// is asked for, else this machine's cached profile — measured now (quickly) if there is none,
/// and kept in `run_dir` for this run alone when the cache cannot be written (a read-only
/// container).
fn cost_profile(
    args: &UpArgs,
    model: &ModelArgs,
    run_dir: &std::path::Path,
) -> anyhow::Result<Option<std::path::PathBuf>> {
    if args.routing.fixed_rules() || args.routing.cost_profile.is_some() {
        return Ok(args.routing.cost_profile.clone());
    }
    let path = model.model.clone().context("the model is fetched by now")?;
    let cached = crate::plan::cached_profile_path(&path, model)?;
    if !cached.exists() {
        eprintln!(
            "tandem: no cost profile of this model on this machine yet: measuring one (once; `tandem plan profile` measures a fuller one)"
        );
        let p = crate::plan::ProfileArgs {
            out: Some(cached.clone()),
            threads: Vec::new(),
            quick: true,
            model: model.clone(),
        };
        let m = crate::plan::profile(&path, &p, &|line| eprintln!("tandem: {line}"))?;
        if let Err(e) = crate::plan::save(&m, &cached) {
            let here = run_dir.join("cost-profile.json");
            eprintln!("tandem: cannot cache the cost profile ({e:#}); using it for this run only");
            crate::plan::save(&m, &here)?;
            return Ok(Some(here));
        }
    }
    eprintln!(
        "tandem: placing prompts with the cost profile {}",
        cached.display()
    );
    Ok(Some(cached))
}

fn member(name: String, args: Vec<String>) -> Member {
    Member {
        name,
        args,
        env: Vec::new(),
        child: None,
        started: Instant::now(),
        backoff: Duration::from_millis(500),
        restart_at: None,
    }
}

async fn run_members(mut members: Vec<Member>) -> anyhow::Result<()> {
    for m in &mut members {
        m.spawn()?;
    }
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        let now = tokio::time::Instant::now();
        for m in &mut members {
            if let Some(c) = &mut m.child
                && let Ok(Some(status)) = c.try_wait()
            {
                m.child = None;
                // Dying young means something is wrong: back off, up to 10 s.
                m.backoff = if m.started.elapsed() < Duration::from_secs(10) {
                    (m.backoff * 2).min(Duration::from_secs(10))
                } else {
                    Duration::from_millis(500)
                };
                eprintln!(
                    "tandem: {} exited ({status}); restarting in {:?}",
                    m.name, m.backoff
                );
                m.restart_at = Some(now + m.backoff);
            }
            if m.child.is_none()
                && m.restart_at.is_some_and(|t| t <= now)
                && let Err(e) = m.spawn()
            {
                eprintln!("tandem: {e:#}");
                m.restart_at = Some(now + m.backoff);
            }
        }
    }
    eprintln!("tandem: shutting down the cluster");
    // The scheduler first (it drains its streams), then the workers.
    let (sched, workers): (Vec<_>, Vec<_>) =
        members.iter_mut().partition(|m| m.name == "scheduler");
    for group in [sched, workers] {
        for m in &group {
            if let Some(pid) = m.child.as_ref().and_then(|c| c.id()) {
                // SAFETY: signalling our own child by its pid.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGTERM);
                }
            }
        }
        for m in group {
            if let Some(mut c) = m.child.take() {
                match tokio::time::timeout(Duration::from_secs(15), c.wait()).await {
                    Ok(_) => {}
                    Err(_) => {
                        eprintln!("tandem: {} did not stop in 15 s; killing it", m.name);
                        let _ = c.kill().await;
                    }
                }
            }
        }
    }
    eprintln!("tandem: cluster stopped");
    Ok(())
}
