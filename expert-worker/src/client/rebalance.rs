//! EPLB at run time: every `interval` steps the load each expert took since the last plan is
//! placed anew ([`eplb::plan_costed`], with up to `redundant` replica slots, each replica
//! weighed with the fixed cost of running an expert that the workers' run times show); experts a worker lacks are
//! loaded on a thread of their own, over connections of their own, while steps go on with the
//! placement in force; the new placement takes effect at the first step after they are loaded.
//! No step waits for a plan or a load, and outputs do not change: a placement only moves where
//! the same rows meet the same experts.

use super::{EpStats, RemoteExperts, connect};
use crate::eplb::{self, Placement};
use engine::{EngineError, Result};
use std::thread::JoinHandle;
use std::time::Instant;

/// When to place experts anew, and how many replicas to place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EplbConfig {
    /// Forward steps (a decode step or a prefill chunk of the batch) between plans; each plans
    /// from the load of the steps since the one before.
    pub interval: u64,
    /// Expert slots beyond one per expert, over all workers: replicas of the busiest experts.
    pub redundant: usize,
}

/// A plan is applied only if it cuts the busiest worker's cost by this share at least.
const MIN_GAIN: f64 = 0.03;

/// The plan, and what each worker holds once its experts have loaded (`None`: unchanged).
type Loaded = Result<(Placement, Vec<Option<Vec<u32>>>)>;

pub(super) struct Rebalancer {
    cfg: EplbConfig,
    steps: u64,
    /// The expert plane's stats when the last plan was made.
    mark: EpStats,
    /// Experts being loaded for a plan.
    pending: Option<JoinHandle<Loaded>>,
}

impl Rebalancer {
    pub(super) fn new(cfg: EplbConfig) -> Rebalancer {
        Rebalancer {
            cfg,
            steps: 0,
            mark: EpStats::default(),
            pending: None,
        }
    }
}

impl RemoteExperts {
    /// Places experts anew every `cfg.interval` steps by the load since the last plan, with
    /// `cfg.redundant` replicas (see the module's documentation).
    pub fn enable_eplb(&mut self, cfg: EplbConfig) -> Result<()> {
        let (n, workers) = (self.n_experts(), self.peers.len());
        if cfg.interval == 0 {
            return Err(EngineError::Experts(
                "--eplb-interval 0: plan every 1 or more steps".into(),
            ));
        }
        if cfg.redundant > n * (workers - 1) {
            return Err(EngineError::Experts(format!(
                "--redundant-experts {}: {n} experts on {workers} workers take at most {} replicas (one per worker)",
                cfg.redundant,
                n * (workers - 1)
            )));
        }
        *self.eplb.get_mut().expect("eplb") = Some(Rebalancer::new(cfg));
        Ok(())
    }

    /// At the start of each step: applies a plan whose experts have loaded, or plans anew
    /// when `interval` steps have passed.
    pub(super) fn rebalance(&self) {
        let mut guard = self.eplb.lock().expect("eplb");
        let Some(rb) = guard.as_mut() else {
            return;
        };
        rb.steps += 1;
        if let Some(h) = rb.pending.take_if(|h| h.is_finished()) {
            match h.join() {
                Ok(Ok((plan, held))) => {
                    for (peer, held) in self.peers.iter().zip(held) {
                        if let Some(held) = held {
                            peer.lock().expect("peer").hello.held = held;
                        }
                    }
                    match self.apply(&plan) {
                        Ok(()) => {
                            metrics::counter!("tandem_eplb_rebalances_total").increment(1);
                            tracing::info!(placement = ?plan, "EPLB: new expert placement in force");
                        }
                        Err(e) => tracing::warn!(error = %e, "EPLB: plan not applied"),
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "EPLB: loading planned experts failed; placement kept")
                }
                Err(_) => tracing::warn!("EPLB: the loading thread panicked; placement kept"),
            }
            return;
        }
        if rb.pending.is_some() || rb.steps % rb.cfg.interval != 0 {
            return;
        }
        let all = self.stats.lock().expect("stats").clone();
        let window = all.since(&rb.mark);
        rb.mark = all;
        let layer_load = window.layer_load();
        // What running an expert costs beyond its rows, in rows, fitted on the window (or on
        // every run so far, if the window's runs did not vary enough); a replica pays it once
        // per step of the window in each layer it gets rows in.
        let per_run = if window.fit.solve().is_some() {
            window.fit.fixed_rows()
        } else {
            rb.mark.fit.fixed_rows()
        };
        let fixed = per_run * window.layers as f64 / layer_load.len().max(1) as f64;
        let load: Vec<f64> = window.expert_rows.iter().map(|&r| r as f64).collect();
        if load.len() != self.n_experts()
            || layer_load.iter().any(|l| l.len() != load.len())
            || load.iter().sum::<f64>() == 0.0
        {
            return;
        }
        let workers = self.peers.len();
        let now = self.current();
        let plan = eplb::plan_costed(
            &layer_load,
            workers,
            (load.len() + rb.cfg.redundant).div_ceil(workers),
            fixed,
        );
        let (before, after) = (
            eplb::imbalance(&eplb::loads(&load, &now)),
            eplb::imbalance(&eplb::loads(&load, &plan)),
        );
        metrics::gauge!("tandem_eplb_imbalance", "placement" => "in force").set(before);
        metrics::gauge!("tandem_eplb_imbalance", "placement" => "planned").set(after);
        let cost = |p: &Placement| eplb::step_cost(&layer_load, p, fixed);
        if plan == now || cost(&plan) > cost(&now) * (1.0 - MIN_GAIN) {
            return;
        }
        tracing::info!(before, after, fixed_rows_per_run = per_run, placement = ?plan, "EPLB: planned a placement");
        let lacking: Vec<Vec<u32>> = plan
            .iter()
            .zip(&self.peers)
            .map(|(experts, peer)| super::lacking(&peer.lock().expect("peer").hello.held, experts))
            .collect();
        if lacking.iter().all(Vec::is_empty) {
            if let Err(e) = self.apply(&plan) {
                tracing::warn!(error = %e, "EPLB: plan not applied");
            }
            return;
        }
        let addrs: Vec<String> = self
            .peers
            .iter()
            .map(|p| p.lock().expect("peer").addr.clone())
            .collect();
        let secret = self.secret.clone();
        let spawned =
            std::thread::Builder::new()
                .name("eplb-load".into())
                .spawn(move || -> Loaded {
                    let mut held = vec![None; addrs.len()];
                    for (w, experts) in lacking.iter().enumerate() {
                        if !experts.is_empty() {
                            let (mut conn, _) =
                                connect(&addrs[w], secret.as_ref(), Instant::now())?;
                            held[w] = Some(conn.load(&addrs[w], experts)?);
                        }
                    }
                    Ok((plan, held))
                });
        match spawned {
            Ok(h) => rb.pending = Some(h),
            Err(e) => tracing::warn!(error = %e, "EPLB: no thread to load experts on"),
        }
    }
}
