//! Expert parallelism's flags: the expert worker (`tandem expert`), and how prefill and decode
//! workers reach expert workers.

use super::{ClusterArgs, ComputeArgs, ModelArgs, TelemetryArgs, flag, list, opt};
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
}

impl ExpertUseArgs {
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        list(&mut a, "expert-workers", &self.expert_workers);
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
        tracing::info!(placement = ?remote.placement(), "experts on expert workers");
        engine
            .model
            .set_expert_backend(std::sync::Arc::new(remote))?;
        Ok(())
    }
}
