//! KV-aware routing: which decode worker a prompt goes to, given where its prefix already is —
//! in a worker's prefix cache, or in the pooled store's RAM or disk tier — and the workers'
//! load. A pure function of what the scheduler knows (the workers' and the store's block
//! events, their reported load), after Dynamo's KV router:
//!
//! `cost(w) = max(prefill_blocks(w) + request_blocks − credit(w), 0) + decode_blocks(w)`
//!
//! where `credit(w)` counts the request's leading blocks `w` caches at 1.0 each, and the
//! blocks past those that the store holds at [`KvRouting::credit_ram`] / `credit_disk` (what
//! fetching them costs against computing them); `prefill_blocks(w)` is the prompt work already
//! queued on `w`, `decode_blocks(w)` the KV blocks its running sequences hold. The cheapest
//! worker wins (ties: fewer requests, then first listed); with a temperature, a worker is
//! drawn with probability falling with its normalized cost. When no block of the prompt is
//! cached anywhere, the load rule decides ([`super::policy::pick_decode`]).

use super::policy::{DecodeLoad, pick_decode};

/// How the KV router weighs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvRouting {
    /// 0: always the cheapest; above: draw by softmax over normalized costs.
    pub temperature: f64,
    /// Credit for a block the worker would fetch from the store's RAM tier (1.0: as good as
    /// its own cache; 0: as costly as computing it).
    pub credit_ram: f64,
    /// … and from the store's disk tier.
    pub credit_disk: f64,
}

impl Default for KvRouting {
    fn default() -> Self {
        KvRouting {
            temperature: 0.0,
            credit_ram: 0.75,
            credit_disk: 0.25,
        }
    }
}

/// A decode worker as the KV router sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvCandidate {
    pub load: DecodeLoad,
    /// The request's leading blocks in its prefix cache.
    pub cached_blocks: usize,
    /// Prompt blocks queued to prefill on it.
    pub prefill_blocks: usize,
    /// KV blocks its sequences hold.
    pub decode_blocks: u64,
}

/// Where a leading block of the request lies in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreTier {
    Ram,
    Disk,
}

/// Why a worker was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteReason {
    /// The cheapest with the prompt's prefix in its own cache.
    CachedPrefix,
    /// The cheapest, the prefix coming from the store.
    StorePrefix,
    /// No block of the prompt cached anywhere: by load.
    Load,
}

impl RouteReason {
    pub fn name(self) -> &'static str {
        match self {
            RouteReason::CachedPrefix => "cached_prefix",
            RouteReason::StorePrefix => "store_prefix",
            RouteReason::Load => "load",
        }
    }
}

/// The credit `w` gets: its cached blocks, then the store's beyond them.
fn credit(r: &KvRouting, cached: usize, store: &[StoreTier]) -> f64 {
    let beyond: f64 = store
        .iter()
        .skip(cached)
        .map(|t| match t {
            StoreTier::Ram => r.credit_ram,
            StoreTier::Disk => r.credit_disk,
        })
        .sum();
    cached as f64 + beyond
}

/// The cost of each eligible worker (healthy, same model), by index.
pub fn costs(
    r: &KvRouting,
    workers: &[KvCandidate],
    request_blocks: usize,
    store: &[StoreTier],
) -> Vec<(usize, f64)> {
    workers
        .iter()
        .enumerate()
        .filter(|(_, w)| w.load.healthy && w.load.same_model)
        .map(|(i, w)| {
            let c = credit(r, w.cached_blocks.min(request_blocks), store);
            let prefill = (w.prefill_blocks + request_blocks) as f64 - c;
            (i, prefill.max(0.0) + w.decode_blocks as f64)
        })
        .collect()
}

/// The decode worker for a request of `request_blocks` full blocks, whose leading blocks the
/// store holds in `store`'s tiers; `draw` is a uniform number in [0, 1) (used only with a
/// temperature).
pub fn pick(
    r: &KvRouting,
    workers: &[KvCandidate],
    request_blocks: usize,
    store: &[StoreTier],
    draw: f64,
) -> Option<(usize, RouteReason)> {
    let anywhere = !store.is_empty() || workers.iter().any(|w| w.cached_blocks > 0);
    if request_blocks == 0 || !anywhere {
        let loads: Vec<DecodeLoad> = workers.iter().map(|w| w.load).collect();
        return pick_decode(&loads).map(|i| (i, RouteReason::Load));
    }
    let costs = costs(r, workers, request_blocks, store);
    let chosen = if r.temperature > 0.0 && costs.len() > 1 {
        draw_by_cost(&costs, r.temperature, draw)
    } else {
        costs
            .iter()
            .min_by(|a, b| {
                let (wa, wb) = (&workers[a.0].load, &workers[b.0].load);
                a.1.total_cmp(&b.1)
                    .then((wa.inflight + wa.waiting).cmp(&(wb.inflight + wb.waiting)))
                    .then(a.0.cmp(&b.0))
            })
            .map(|c| c.0)
    }?;
    let reason = if workers[chosen].cached_blocks > 0 {
        RouteReason::CachedPrefix
    } else if !store.is_empty() {
        RouteReason::StorePrefix
    } else {
        RouteReason::Load
    };
    Some((chosen, reason))
}

/// Softmax over `-(cost − min) / (max − min) / temperature`, sampled at `draw`.
fn draw_by_cost(costs: &[(usize, f64)], temperature: f64, draw: f64) -> Option<usize> {
    let lo = costs.iter().map(|c| c.1).fold(f64::INFINITY, f64::min);
    let hi = costs.iter().map(|c| c.1).fold(f64::NEG_INFINITY, f64::max);
    let span = (hi - lo).max(1e-9);
    let weights: Vec<f64> = costs
        .iter()
        .map(|c| (-(c.1 - lo) / span / temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut at = draw.clamp(0.0, 1.0 - f64::EPSILON) * total;
    for (c, w) in costs.iter().zip(&weights) {
        if at < *w {
            return Some(c.0);
        }
        at -= w;
    }
    costs.last().map(|c| c.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(cached: usize, prefill: usize, decode: u64) -> KvCandidate {
        KvCandidate {
            load: DecodeLoad {
                healthy: true,
                same_model: true,
                inflight: 0,
                waiting: 0,
                free_blocks: 1000,
            },
            cached_blocks: cached,
            prefill_blocks: prefill,
            decode_blocks: decode,
        }
    }

    #[test]
    fn the_worker_holding_the_prefix_wins_unless_it_is_far_busier() {
        let r = KvRouting::default();
        // 40-block prompt; worker 1 caches 30 of them.
        assert_eq!(
            pick(&r, &[w(0, 0, 100), w(30, 0, 100)], 40, &[], 0.0),
            Some((1, RouteReason::CachedPrefix))
        );
        // … but not when it holds 50 more blocks of running sequences than the other.
        assert_eq!(
            pick(&r, &[w(0, 0, 100), w(30, 0, 150)], 40, &[], 0.0)
                .unwrap()
                .0,
            0
        );
        // Prompt work queued counts like the prompt's own.
        assert_eq!(
            pick(&r, &[w(0, 0, 100), w(30, 35, 100)], 40, &[], 0.0)
                .unwrap()
                .0,
            0
        );
        // A worker that cannot serve is never chosen, whatever it caches.
        let mut down = w(40, 0, 0);
        down.load.healthy = false;
        assert_eq!(pick(&r, &[down, w(0, 0, 500)], 40, &[], 0.0).unwrap().0, 1);
    }

    #[test]
    fn store_blocks_count_less_than_cached_ones_and_by_tier() {
        let r = KvRouting::default();
        let ram = [StoreTier::Ram; 30];
        // Both can fetch the 30 blocks; worker 0 also caches 10 itself.
        let c = costs(&r, &[w(10, 0, 0), w(0, 0, 0)], 40, &ram);
        assert_eq!(c[0].1, 40.0 - (10.0 + 20.0 * 0.75));
        assert_eq!(c[1].1, 40.0 - 30.0 * 0.75);
        assert_eq!(
            pick(&r, &[w(0, 0, 0), w(0, 0, 1)], 40, &ram, 0.0),
            Some((0, RouteReason::StorePrefix))
        );
        let disk = [StoreTier::Disk; 30];
        assert_eq!(costs(&r, &[w(0, 0, 0)], 40, &disk)[0].1, 40.0 - 30.0 * 0.25);
    }

    #[test]
    fn with_nothing_cached_the_load_rule_decides() {
        let r = KvRouting::default();
        let mut busy = w(0, 0, 0);
        busy.load.inflight = 3;
        assert_eq!(
            pick(&r, &[busy, w(0, 0, 900)], 40, &[], 0.0),
            Some((1, RouteReason::Load))
        );
        assert_eq!(pick(&r, &[], 40, &[], 0.0), None);
    }

    #[test]
    fn a_temperature_spreads_choices_by_cost() {
        let r = KvRouting {
            temperature: 0.5,
            ..KvRouting::default()
        };
        let ws = [w(30, 0, 0), w(0, 0, 0), w(10, 0, 0)];
        let mut counts = [0usize; 3];
        for i in 0..1000 {
            let (k, _) = pick(&r, &ws, 40, &[], (i as f64 + 0.5) / 1000.0).unwrap();
            counts[k] += 1;
        }
        // Cheapest most often, the dearest least, none never.
        assert!(
            counts[0] > counts[2] && counts[2] > counts[1] && counts[1] > 0,
            "{counts:?}"
        );
    }
}
