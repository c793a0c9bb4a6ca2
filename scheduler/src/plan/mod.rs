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

/// A decode worker sharing its cores with a prefill worker paces its steps to this fraction of
/// the TPOT bound (`--pace-ms` of `tandem decode`): with streams decoding, a step carries only
/// the prompt chunks that keep it within the period, and while the prefill worker computes it
/// leaves it the rest of each period; the margin absorbs the noise of a shared machine (the
/// paced streams' p99 TPOT measured 3–5% over the period).
pub const PACE: f64 = 0.9;
