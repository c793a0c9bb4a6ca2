//! Deciding with the engine's measured costs: what each placement of a request costs
//! ([`cost`]), where each prompt is prefilled ([`placement`]), and how many workers of which
//! size a workload needs ([`capacity`], `tandem plan`: the [`workload`] replayed through each
//! [`layout`] on the cost model, [`simulate`]).

pub mod capacity;
pub mod cost;
pub mod layout;
pub mod placement;
pub mod simulate;
pub mod workload;

/// While a decode worker shares its cores with a computing prefill worker, it paces its steps
/// to this fraction of the TPOT bound (`--pace-ms` of `tandem decode`): the steps run at full
/// speed, the rest of each period goes to prefill, and the margin absorbs the noise of a
/// shared machine (the paced streams' p99 TPOT measured 3–5% over the period).
pub const PACE: f64 = 0.9;
