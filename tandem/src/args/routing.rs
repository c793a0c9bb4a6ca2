//! The flags of placement: which transport KV takes, where each prompt is prefilled (the cost
//! model against an SLO, or fixed rules), and how a decode and a prefill worker share a host's
//! cores.

use super::{flag, opt};
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

/// Default of `--slo-ttft-ms`.
pub const DEFAULT_SLO_TTFT_MS: u64 = 1000;
/// Default of `--slo-tpot-ms`.
pub const DEFAULT_SLO_TPOT_MS: u64 = 100;

/// How KV moves from prefill to decode workers.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvTransportArg {
    /// Shared memory when both workers are on one host, else TCP.
    #[default]
    Auto,
    /// Shared memory (the prefill worker writes the decode worker's pool in place).
    Shm,
    /// The TCP data plane.
    Tcp,
}

impl KvTransportArg {
    pub fn resolve(self) -> Option<protocol::KvTransport> {
        match self {
            KvTransportArg::Auto => None,
            KvTransportArg::Shm => Some(protocol::KvTransport::Shm),
            KvTransportArg::Tcp => Some(protocol::KvTransport::Tcp),
        }
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            KvTransportArg::Auto => "auto",
            KvTransportArg::Shm => "shm",
            KvTransportArg::Tcp => "tcp",
        }
    }
}

/// How requests are spread over decode workers.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RouterMode {
    /// By where a prompt's prefix is cached (workers' prefix caches, the store's tiers) and load.
    #[default]
    Kv,
    /// By load alone.
    Load,
}

impl RouterMode {
    fn name(self) -> &'static str {
        match self {
            RouterMode::Kv => "kv",
            RouterMode::Load => "load",
        }
    }
}

/// How the scheduler routes between prefill and decode workers.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct RoutingArgs {
    /// Fixed rule instead of the cost model: prompts shorter than this many tokens are prefilled on the decode worker (default without a cost profile: 64).
    #[arg(long)]
    pub disagg_min_tokens: Option<usize>,
    /// Fixed rule instead of the cost model: prefill on the decode worker once the least busy prefill worker has this many prefills queued or running (0: never; the default without a cost profile).
    #[arg(long)]
    pub max_prefill_queue: Option<usize>,
    /// The engine's measured costs (`tandem plan profile`): each prompt is prefilled where the SLO is best kept (`tandem up` finds or measures this machine's).
    #[arg(long, env = "TANDEM_COST_PROFILE")]
    pub cost_profile: Option<PathBuf>,
    /// Time to first token the placement aims for, ms.
    #[arg(long, default_value_t = DEFAULT_SLO_TTFT_MS)]
    pub slo_ttft_ms: u64,
    /// Time per output token the placement aims for (and, sharing cores, what the decode worker paces to), ms.
    #[arg(long, default_value_t = DEFAULT_SLO_TPOT_MS)]
    pub slo_tpot_ms: u64,
    /// KV transport between prefill and decode workers.
    #[arg(long, value_enum, default_value_t = KvTransportArg::Auto)]
    pub kv_transport: KvTransportArg,
    /// Seconds a stream waits for a decode worker when none is available (after a failure).
    #[arg(long, default_value_t = scheduler::remote::DEFAULT_HOLD_SECS)]
    pub hold_secs: u64,
    /// Requests in flight at most (across every worker) before new ones get 503.
    #[arg(long, env = "TANDEM_MAX_INFLIGHT", default_value_t = scheduler::remote::DEFAULT_MAX_INFLIGHT)]
    pub max_inflight: usize,
    /// Seconds a prefill may take on a prefill worker before it is cancelled and retried elsewhere.
    #[arg(long, default_value_t = scheduler::remote::DEFAULT_PREFILL_TIMEOUT_SECS)]
    pub prefill_timeout_secs: u64,
    /// How requests are spread over decode workers.
    #[arg(long, value_enum, default_value_t = RouterMode::Kv)]
    pub router_mode: RouterMode,
    /// KV routing: 0 always picks the cheapest worker; above 0, workers are drawn with probability falling with their cost (spreads load).
    #[arg(long, default_value_t = 0.0)]
    pub router_temperature: f64,
    /// KV routing: what a block in the store's RAM tier is worth against one in a worker's own cache (1.0).
    #[arg(long, default_value_t = 0.75)]
    pub router_credit_ram: f64,
    /// KV routing: what a block in the store's disk tier is worth.
    #[arg(long, default_value_t = 0.25)]
    pub router_credit_disk: f64,
}

impl RoutingArgs {
    /// A fixed rule was asked for: it overrides the cost model.
    pub fn fixed_rules(&self) -> bool {
        self.disagg_min_tokens.is_some() || self.max_prefill_queue.is_some()
    }

    pub fn slo(&self) -> scheduler::plan::placement::Slo {
        scheduler::plan::placement::Slo {
            ttft_s: self.slo_ttft_ms as f64 / 1e3,
            tpot_s: self.slo_tpot_ms as f64 / 1e3,
        }
    }

    /// The scheduler's view of the flags, the cost profile read.
    pub fn config(&self) -> anyhow::Result<scheduler::remote::RemoteConfig> {
        let placement = match (&self.cost_profile, self.fixed_rules()) {
            (Some(p), false) => Some(scheduler::remote::CostPlacement {
                cost: std::sync::Arc::new(
                    scheduler::plan::cost::CostModel::load(p).map_err(anyhow::Error::msg)?,
                ),
                slo: self.slo(),
            }),
            _ => None,
        };
        Ok(scheduler::remote::RemoteConfig {
            disagg_min_tokens: self
                .disagg_min_tokens
                .unwrap_or(scheduler::remote::DEFAULT_DISAGG_MIN_TOKENS),
            max_prefill_queue: self.max_prefill_queue.unwrap_or(0),
            placement,
            transport: self.kv_transport.resolve(),
            hold: Duration::from_secs(self.hold_secs),
            max_inflight: self.max_inflight.max(1),
            prefill_timeout: Duration::from_secs(self.prefill_timeout_secs.max(1)),
            kv_routing: (self.router_mode == RouterMode::Kv).then_some(
                scheduler::remote::kv_route::KvRouting {
                    temperature: self.router_temperature.max(0.0),
                    credit_ram: self.router_credit_ram,
                    credit_disk: self.router_credit_disk,
                },
            ),
            ..Default::default()
        })
    }

    pub fn to_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        opt(&mut a, "disagg-min-tokens", self.disagg_min_tokens);
        opt(&mut a, "max-prefill-queue", self.max_prefill_queue);
        opt(
            &mut a,
            "cost-profile",
            self.cost_profile.as_ref().map(|p| p.display()),
        );
        flag(&mut a, "slo-ttft-ms", self.slo_ttft_ms);
        flag(&mut a, "slo-tpot-ms", self.slo_tpot_ms);
        flag(&mut a, "kv-transport", self.kv_transport.name());
        flag(&mut a, "hold-secs", self.hold_secs);
        flag(&mut a, "max-inflight", self.max_inflight);
        flag(&mut a, "prefill-timeout-secs", self.prefill_timeout_secs);
        flag(&mut a, "router-mode", self.router_mode.name());
        flag(&mut a, "router-temperature", self.router_temperature);
        flag(&mut a, "router-credit-ram", self.router_credit_ram);
        flag(&mut a, "router-credit-disk", self.router_credit_disk);
        a
    }
}

/// Sharing this host's cores with the other kind of worker (`protocol::cores`).
#[derive(Args, Debug, Clone, PartialEq, Default)]
pub struct SharingArgs {
    /// The page (a file on this host) through which this worker and a prefill or decode worker on the same cores coordinate: the prefill worker runs at idle priority and says when it computes; the decode worker then paces its steps to --pace-ms and leaves it the rest.
    #[arg(long)]
    pub share_cores: Option<PathBuf>,
    /// Decode workers sharing cores: the step period, ms — paced to with rests while a prefill worker computes, held to with the streams' credit otherwise (default: 0.9 × --slo-tpot-ms of `tandem up`, 90).
    #[arg(long, requires = "share_cores")]
    pub pace_ms: Option<f64>,
    /// Decode workers sharing cores: the first-token bound their queued prompts are held to, ms — steps keep to the pace only where that makes fewer requests miss than whole steps (default: --slo-ttft-ms of `tandem up`, 1000).
    #[arg(long, requires = "share_cores")]
    pub hold_ms: Option<f64>,
    /// Decode workers sharing cores: the cost profile (`tandem plan profile`) whose costs of attention against a token's weigh each step's work, so that steps deep into long prompts keep the pace (default: tokens alone; `tandem up` passes the profile it places prompts with).
    #[arg(long, requires = "share_cores")]
    pub pace_profile: Option<PathBuf>,
}

impl SharingArgs {
    /// A decode worker's share.
    pub fn decode(&self) -> anyhow::Result<Option<protocol::cores::Sharing>> {
        let Some(path) = self.share_cores.as_ref() else {
            return Ok(None);
        };
        let cost = match &self.pace_profile {
            Some(p) => {
                let m = scheduler::plan::cost::CostModel::load(p).map_err(anyhow::Error::msg)?;
                // The fit of the most threads measured: a worker sharing the cores uses them all.
                m.forward(usize::MAX).step_cost()
            }
            None => protocol::cores::StepCost::default(),
        };
        Ok(Some(protocol::cores::Sharing {
            path: path.clone(),
            period: Duration::from_secs_f64(
                self.pace_ms
                    .unwrap_or(scheduler::plan::PACE * DEFAULT_SLO_TPOT_MS as f64)
                    / 1e3,
            ),
            hold: Duration::from_secs_f64(self.hold_ms.unwrap_or(DEFAULT_SLO_TTFT_MS as f64) / 1e3),
            cost,
        }))
    }

    pub fn to_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        opt(
            &mut a,
            "share-cores",
            self.share_cores.as_ref().map(|p| p.display()),
        );
        opt(&mut a, "pace-ms", self.pace_ms);
        opt(&mut a, "hold-ms", self.hold_ms);
        opt(
            &mut a,
            "pace-profile",
            self.pace_profile.as_ref().map(|p| p.display()),
        );
        a
    }
}
