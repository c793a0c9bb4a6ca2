//! `tandem up`: a whole cluster on this machine. By default it launches and supervises
//! child processes — `tandem prefill` ×N, `tandem decode` ×M and a `tandem scheduler` in
//! front — restarts any that dies, and stops them all on Ctrl-C / SIGTERM. `--colocated`
//! runs the scheduler and one continuous-batching worker in this process instead (how vLLM
//! runs), for comparison.

use crate::roles::ModelArgs;
use anyhow::Context;
use clap::Args;
use decode_worker::WorkerConfig;
use engine::Engine;
use scheduler::cluster::Cluster;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Address to listen on.
    #[arg(long, env = "TANDEM_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on.
    #[arg(long, env = "TANDEM_PORT", default_value_t = 8000)]
    pub port: u16,
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
    #[command(flatten)]
    pub routing: crate::roles::RoutingArgs,
    /// Requests that may wait to start (or be in flight, disaggregated) before new ones get 503.
    #[arg(long, env = "TANDEM_MAX_QUEUE", default_value_t = 256)]
    pub max_queue: usize,
    /// Tokens per forward step (decode tokens first, prefill chunks fill the rest), as vLLM's flag.
    #[arg(long, env = "TANDEM_MAX_NUM_BATCHED_TOKENS", default_value_t = 256)]
    pub max_num_batched_tokens: usize,
    /// Sequences in the running batch at most, as vLLM's flag.
    #[arg(long, env = "TANDEM_MAX_NUM_SEQS", default_value_t = 64)]
    pub max_num_seqs: usize,
    /// Largest request body, in bytes.
    #[arg(long, default_value_t = scheduler::DEFAULT_MAX_BODY)]
    pub max_body_bytes: usize,
    #[command(flatten)]
    pub model: ModelArgs,
}

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    if args.colocated {
        colocated(args)
    } else {
        supervise(args)
    }
}

fn colocated(args: UpArgs) -> anyhow::Result<()> {
    if !args.model.cpus.is_empty() {
        crate::roles::pin(&args.model.cpus)?;
    }
    let threads = crate::init_compute_threads(
        args.model
            .threads
            .or((!args.model.cpus.is_empty()).then_some(args.model.cpus.len())),
    )?;
    let path = crate::model_path(args.model.model.as_deref())?;
    let default_id = args
        .model
        .model
        .is_none()
        .then(|| engine::fetch::DEFAULT_MODEL.id.to_string());
    let cfg = engine::EngineConfig {
        kv_budget_bytes: args.model.kv_cache_mib << 20,
        model_id: args.model.served_model_name.clone().or(default_id),
        precision: args.model.precision,
        kv_dtype: args.model.kv_cache_dtype,
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
    let cluster = Arc::new(Cluster::colocated(
        engine,
        WorkerConfig {
            max_batch_tokens: args.max_num_batched_tokens.max(1),
            max_running: args.max_num_seqs.max(1),
            max_waiting: args.max_queue,
        },
    ));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let url = format!("http://{}", listener.local_addr()?);
        eprintln!("tandem: serving '{model_id}' on {url} (OpenAI API under {url}/v1), colocated");
        print_try(&url, &model_id);
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
    args.routing.config()?;
    // Fetch once here, so that the children do not race to download the model.
    let path = crate::model_path(args.model.model.as_deref())?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let m = &args.model;
    let mut common = vec![
        "--model".to_string(),
        path.display().to_string(),
        "--precision".into(),
        m.precision.to_string(),
        "--kv-cache-dtype".into(),
        m.kv_cache_dtype.to_string(),
        "--kv-cache-mib".into(),
        m.kv_cache_mib.to_string(),
    ];
    let served = m.served_model_name.clone().or_else(|| {
        m.model
            .is_none()
            .then(|| engine::fetch::DEFAULT_MODEL.id.to_string())
    });
    if let Some(n) = &served {
        common.extend(["--served-model-name".into(), n.clone()]);
    }
    if let Some(t) = m.threads {
        common.extend(["--threads".into(), t.to_string()]);
    }
    let mut members = Vec::new();
    let mut core = 0usize;
    let mut pin = |a: &mut Vec<String>| {
        if args.pin {
            a.extend(["--cpus".into(), (core % cores).to_string()]);
            core += 1;
        }
    };
    let mut decode_addrs = Vec::new();
    for i in 0..args.decode {
        let addr = format!("127.0.0.1:{}", free_port()?);
        let mut a = vec![
            "decode".to_string(),
            "--listen".into(),
            addr.clone(),
            "--kv-listen".into(),
            "127.0.0.1:0".into(),
            "--max-num-batched-tokens".into(),
            args.max_num_batched_tokens.to_string(),
            "--max-num-seqs".into(),
            args.max_num_seqs.to_string(),
            "--max-queue".into(),
            args.max_queue.to_string(),
        ];
        a.extend(common.iter().cloned());
        pin(&mut a);
        decode_addrs.push(addr);
        members.push(member(format!("decode-{i}"), a));
    }
    let mut prefill_addrs = Vec::new();
    for i in 0..args.prefill {
        let addr = format!("127.0.0.1:{}", free_port()?);
        let mut a = vec!["prefill".to_string(), "--listen".into(), addr.clone()];
        a.extend(common.iter().cloned());
        pin(&mut a);
        prefill_addrs.push(addr);
        members.push(member(format!("prefill-{i}"), a));
    }
    let mut s = vec![
        "scheduler".to_string(),
        "--host".into(),
        args.host.clone(),
        "--port".into(),
        args.port.to_string(),
        "--decode".into(),
        decode_addrs.join(","),
        "--max-queue".into(),
        args.max_queue.to_string(),
        "--max-body-bytes".into(),
        args.max_body_bytes.to_string(),
        "--model".into(),
        path.display().to_string(),
    ];
    s.extend(args.routing.to_args());
    if !prefill_addrs.is_empty() {
        s.extend(["--prefill".into(), prefill_addrs.join(",")]);
    }
    if let Some(n) = &served {
        s.extend(["--served-model-name".into(), n.clone()]);
    }
    members.push(member("scheduler".into(), s));
    eprintln!(
        "tandem: cluster of {} prefill + {} decode worker(s){}; scheduler on http://{}:{} (OpenAI API under /v1)",
        args.prefill,
        args.decode,
        if args.pin { ", pinned" } else { "" },
        args.host,
        args.port
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_members(members))
}

fn member(name: String, args: Vec<String>) -> Member {
    Member {
        name,
        args,
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

pub async fn shutdown_signal() {
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
