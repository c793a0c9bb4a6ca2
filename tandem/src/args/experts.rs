//! Expert parallelism's flags: the expert worker (`tandem expert`), and how prefill and decode
//! workers reach expert workers.

use super::{ClusterArgs, ComputeArgs, ModelArgs, TelemetryArgs, flag, list, opt, switch};
use anyhow::Context;
use clap::Args;

/// Default address of `tandem expert`.
pub const DEFAULT_EXPERT_LISTEN: &str = "127.0.0.1:50081";

/// How long a prefill or decode worker waits at start for its expert workers to listen.
pub const EXPERT_WORKERS_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

/// `tandem expert`.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct ExpertArgs {
    /// Address to listen on for prefill and decode workers' routed rows.
    #[arg(long, default_value = DEFAULT_EXPERT_LISTEN)]
    pub listen: String,
    /// The experts this worker holds, of every layer: ids and ranges, e.g. `0-3` or `0,2,4-6`.
    #[arg(long, required = true, value_delimiter = ',')]
    pub experts: Vec<String>,
    /// Serve /live, /health and /metrics over plain HTTP on this address (off by default).
    #[arg(long, env = "TANDEM_STATUS_LISTEN")]
    pub status_listen: Option<String>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub compute: ComputeArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// `0-3`, `5` and the like, as expert ids.
pub fn parse_experts(items: &[String]) -> anyhow::Result<Vec<usize>> {
    let mut out = Vec::new();
    for it in items {
        let num = |s: &str| -> anyhow::Result<usize> {
            s.trim()
                .parse()
                .with_context(|| format!("expert id {s:?} in --experts"))
        };
        match it.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                anyhow::ensure!(a <= b, "expert range {it:?} runs backwards");
                out.extend(a..=b);
            }
            None => out.push(num(it)?),
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

impl ExpertArgs {
    /// The command line that parses back to these values.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec!["expert".to_string()];
        flag(&mut a, "listen", &self.listen);
        list(&mut a, "experts", &self.experts);
        opt(&mut a, "status-listen", self.status_listen.as_ref());
        a.extend(self.cluster.to_args());
        a.extend(self.model.to_args());
        a.extend(self.compute.to_args());
        a.extend(self.telemetry.to_args());
        a
    }
}

/// How a prefill or decode worker reaches expert workers.
#[derive(Args, Debug, Clone, PartialEq, Default)]
pub struct ExpertUseArgs {
    /// Expert workers (`tandem expert`, comma-separated host:port) that compute this mixture-of-experts model's experts; each expert runs on the first listed that holds it. Default: every expert in this process.
    #[arg(long, env = "TANDEM_EXPERT_WORKERS", value_delimiter = ',')]
    pub expert_workers: Vec<String>,
    #[command(flatten)]
    pub serving: ExpertServingArgs,
}

/// How a worker uses its expert workers: load balancing (EPLB), microbatches.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct ExpertServingArgs {
    /// Run each batch of several sequences as this many microbatches in flight (1 or 2): one's attention computes while the other's experts run on the expert workers.
    #[arg(long, env = "TANDEM_MICROBATCHES", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub microbatches: u8,
    /// Place the experts anew every N forward steps by the load of the steps since the last plan (EPLB at run time): replicas for the busiest experts, loaded by the expert workers in the background, the new placement in force from the step after. Default: off.
    #[arg(long, env = "TANDEM_EPLB_INTERVAL")]
    pub eplb_interval: Option<u64>,
    /// Expert slots beyond one per expert, over all expert workers, that EPLB fills with replicas of the busiest experts (with --eplb-interval or an `expert_load` placement file).
    #[arg(long, env = "TANDEM_REDUNDANT_EXPERTS", default_value_t = 0)]
    pub redundant_experts: usize,
    /// A static placement at start, a JSON file: {"placement": [[expert ids of worker 0], ...]} in --expert-workers order (experts a worker lacks are loaded), or {"expert_load": [rows per expert]} (a saved load window, e.g. tandem_expert_rows_total from /metrics) placed by EPLB with --redundant-experts.
    #[arg(long, env = "TANDEM_EXPERT_PLACEMENT")]
    pub expert_placement: Option<std::path::PathBuf>,
    /// Send routed rows and outputs to expert workers on the socket even on one host (default: through a shared-memory mailbox per connection where the worker can map it, the socket elsewhere).
    #[arg(long, env = "TANDEM_NO_EXPERT_SHM")]
    pub no_expert_shm: bool,
}

impl Default for ExpertServingArgs {
    fn default() -> Self {
        ExpertServingArgs {
            microbatches: 1,
            eplb_interval: None,
            redundant_experts: 0,
            expert_placement: None,
            no_expert_shm: false,
        }
    }
}

impl ExpertServingArgs {
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if self.microbatches != 1 {
            flag(&mut a, "microbatches", self.microbatches);
        }
        opt(&mut a, "eplb-interval", self.eplb_interval);
        if self.redundant_experts > 0 {
            flag(&mut a, "redundant-experts", self.redundant_experts);
        }
        opt(
            &mut a,
            "expert-placement",
            self.expert_placement.as_ref().map(|p| p.display()),
        );
        switch(&mut a, "no-expert-shm", self.no_expert_shm);
        a
    }

    /// Whether any is set (they need expert workers).
    pub fn any(&self) -> bool {
        *self != ExpertServingArgs::default()
    }

    /// The placement the file gives (planned by EPLB from its load, if it gives a load), for
    /// `n_experts` experts on `workers` workers.
    pub fn static_placement(
        &self,
        n_experts: usize,
        workers: usize,
    ) -> anyhow::Result<Option<expert_worker::eplb::Placement>> {
        let Some(path) = &self.expert_placement else {
            return Ok(None);
        };
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            placement: Option<expert_worker::eplb::Placement>,
            expert_load: Option<Vec<f64>>,
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--expert-placement {}", path.display()))?;
        let f: File = serde_json::from_str(&text)
            .with_context(|| format!("--expert-placement {}", path.display()))?;
        match (f.placement, f.expert_load) {
            (Some(p), None) => Ok(Some(p)),
            (None, Some(load)) => {
                anyhow::ensure!(
                    load.len() == n_experts && load.iter().all(|l| l.is_finite() && *l >= 0.0),
                    "--expert-placement {}: expert_load needs {n_experts} loads of 0 or more",
                    path.display()
                );
                anyhow::ensure!(
                    self.redundant_experts <= n_experts * (workers - 1),
                    "--redundant-experts {}: {n_experts} experts on {workers} workers take at most {} replicas",
                    self.redundant_experts,
                    n_experts * (workers - 1)
                );
                let slots = (n_experts + self.redundant_experts).div_ceil(workers);
                Ok(Some(expert_worker::eplb::plan(&load, workers, slots)))
            }
            _ => anyhow::bail!(
                "--expert-placement {}: give either \"placement\" or \"expert_load\"",
                path.display()
            ),
        }
    }
}

impl ExpertUseArgs {
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        list(&mut a, "expert-workers", &self.expert_workers);
        a.extend(self.serving.to_args());
        a
    }

    /// Connects `engine` (loaded from `path` at `precision`) to the expert workers, if any
    /// are given; its own experts are then dropped.
    pub fn attach(
        &self,
        engine: &mut engine::Engine,
        path: &std::path::Path,
        precision: engine::Precision,
        secret: Option<&protocol::auth::ClusterSecret>,
    ) -> anyhow::Result<()> {
        if self.expert_workers.is_empty() {
            anyhow::ensure!(
                !self.serving.any(),
                "--microbatches, --eplb-interval, --redundant-experts, --expert-placement and --no-expert-shm need --expert-workers"
            );
            return Ok(());
        }
        let cfg = engine.model.config().clone();
        let moe = cfg
            .moe
            .context("--expert-workers: the model is dense (it has no experts)")?;
        let g = engine::gguf::GgufFile::open(path)?;
        // Expert workers started beside this one may still be loading.
        let remote = expert_worker::RemoteExperts::connect_waiting(
            &self.expert_workers,
            secret,
            expert_worker::Expect {
                n_layers: cfg.n_layers,
                n_experts: moe.n_experts,
                d: cfg.d_model,
                fingerprint: expert_worker::wire::fingerprint(&g, precision),
            },
            EXPERT_WORKERS_WAIT,
        )?;
        let mut remote = remote;
        remote.set_shm(!self.serving.no_expert_shm);
        if let Some(p) = self
            .serving
            .static_placement(moe.n_experts, self.expert_workers.len())?
        {
            remote.place(&p).context("--expert-placement")?;
        }
        if let Some(interval) = self.serving.eplb_interval {
            remote.enable_eplb(expert_worker::EplbConfig {
                interval,
                redundant: self.serving.redundant_experts,
            })?;
        }
        tracing::info!(placement = ?remote.placement(), shm = !self.serving.no_expert_shm, "experts on expert workers");
        engine
            .model
            .set_expert_backend(std::sync::Arc::new(remote))?;
        engine
            .model
            .set_microbatches(self.serving.microbatches as usize)?;
        Ok(())
    }
}
