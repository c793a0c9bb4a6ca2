//! The feed-forward block: a dense SwiGLU [`Ffn`], or a mixture of experts ([`Moe`]) whose
//! router sends each token to a few of several such FFNs.
//!
//! A mixture runs in three steps that expert parallelism splits across processes: [`Moe::route`]
//! (router logits in f32, softmax, top-k, weights renormalized: Mixtral's routing, llama.cpp's
//! `llama` architecture), each expert's rows through that expert ([`Routing::groups`],
//! [`Ffn::forward`]: one GEMM pair per expert per step over the rows it was given), and
//! [`combine`] (each row's experts summed in slot order, exactly affine). Every kernel is batch-invariant and
//! the combine order is fixed, so a row's output depends neither on what else is in the batch
//! nor on where its experts ran.

use crate::config::{LlamaConfig, MoeConfig};
use crate::error::{EngineError, Result};
use crate::gguf::{GgmlType, GgufFile};
use crate::linear::{Acts, Linear, Precision};
use crate::weights::{TensorsF32, dequantize};
use frontend::ModelError;
use kernels::int8::I8Weights;
use kernels::matmul::matmul;
use kernels::ops::silu_mul;
use kernels::pool::for_rows;

/// A SwiGLU FFN: `down(silu(gate·x) ⊙ up·x)`.
pub struct Ffn {
    /// Gate and up stacked: `[2·d_ff × d]`.
    pub(crate) w_gate_up: Linear,
    pub(crate) w_down: Linear,
}

/// Floats of an FFN's gate·up kept per thread between calls (2 MiB: 170 rows of SmolLM2's).
const KEEP: usize = 1 << 19;

thread_local! {
    /// An FFN's gate·up and gated outputs, kept per calling thread between calls.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const {
        std::cell::RefCell::new((Vec::new(), Vec::new()))
    };
}

/// The first `n` elements of `buf`, grown (with zeros) to hold them.
fn grown(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if buf.len() < n {
        buf.resize(n, 0.0);
    }
    &mut buf[..n]
}

impl Ffn {
    /// `out = ffn(x)` for `m` rows of `x: [m × d]`; `out: [m × d]`.
    pub fn forward(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let n2 = self.w_gate_up.dims().0;
        if m * n2 > KEEP {
            // Many rows (a prefill): fresh buffers, not kept (their cost is small per row).
            return self.forward_in(
                x,
                m,
                out,
                &mut vec![0f32; m * n2],
                &mut vec![0f32; m * n2 / 2],
            );
        }
        // Few rows (decode, an expert's share): buffers kept per calling thread — a fresh
        // zeroed one a call cost an expert run ~9% of its time in memset and page faults.
        SCRATCH.with_borrow_mut(|(gate_up, gate)| {
            self.forward_in(x, m, out, grown(gate_up, m * n2), grown(gate, m * n2 / 2))
        })
    }

    /// [`forward`](Self::forward) into `gate_up: [m × 2·ff]` and `gate: [m × ff]`, whose
    /// contents are written before they are read.
    fn forward_in(
        &self,
        x: &[f32],
        m: usize,
        out: &mut [f32],
        gate_up: &mut [f32],
        gate: &mut [f32],
    ) {
        let (n2, d) = self.w_gate_up.dims();
        let ff = n2 / 2;
        self.w_gate_up.forward(&mut Acts::new(x, m, d), gate_up);
        let gate_up = &*gate_up;
        for_rows(gate, ff, 16, |row, g| {
            let gu = &gate_up[row * n2..(row + 1) * n2];
            g.copy_from_slice(&gu[..ff]);
            silu_mul(g, &gu[ff..]);
        });
        self.w_down.forward(&mut Acts::new(gate, m, ff), out);
    }

    pub fn bytes(&self) -> usize {
        self.w_gate_up.bytes() + self.w_down.bytes()
    }

    /// Gate and up from their GGUF rows (one expert's slices, or whole tensors), stacked
    /// exactly when their types agree.
    fn from_rows(
        gate: (GgmlType, &[u8]),
        up: (GgmlType, &[u8]),
        down: (GgmlType, &[u8]),
        (d, ff): (usize, usize),
        precision: Precision,
    ) -> Ffn {
        let w_gate_up = if gate.0 == up.0 {
            Linear::from_gguf_rows(gate.0, &[gate.1, up.1].concat(), 2 * ff, d, precision)
        } else if precision == Precision::W4A8 {
            // Each as stored (or requantized alone), run one after the other.
            Linear::Parts(vec![
                Linear::from_gguf_rows(gate.0, gate.1, ff, d, precision),
                Linear::from_gguf_rows(up.0, up.1, ff, d, precision),
            ])
        } else {
            // Per-channel quantization: stacking the exact rows first gives each channel what
            // it would have alone.
            let rows = [dequantize(gate.0, gate.1), dequantize(up.0, up.1)].concat();
            match precision {
                Precision::F32 => Linear::F32 {
                    w: rows,
                    n: 2 * ff,
                    k: d,
                },
                _ => Linear::Int8(I8Weights::quantize(&rows, 2 * ff, d)),
            }
        };
        Ffn {
            w_gate_up,
            w_down: Linear::from_gguf_rows(down.0, down.1, d, ff, precision),
        }
    }
}

/// A mixture of experts.
pub struct Moe {
    /// Router weights `[n_experts × d]`, f32 at every precision (llama.cpp keeps
    /// `ffn_gate_inp` unquantized too).
    pub(crate) router: Vec<f32>,
    /// The experts this process holds (`None`: computed elsewhere, by an [`ExpertBackend`]).
    pub(crate) experts: Vec<Option<Ffn>>,
    pub(crate) n_used: usize,
}

/// Where a mixture's experts run when not all in this process: expert workers
/// (`expert-worker`'s client), reached once per layer per step.
pub trait ExpertBackend: Send + Sync {
    /// Layer `layer`'s experts over the rows each was routed (`groups.rows[e]` of `h`, rows of
    /// `d`): per expert, its rows' outputs `[rows × d]` in that order (empty for none).
    fn run(&self, layer: usize, h: &[f32], d: usize, groups: &Groups) -> Result<Vec<Vec<f32>>>;

    /// Called once at the start of each forward pass (a step: a decode step or a prefill
    /// chunk of the batch, all its microbatches), before any of its layers.
    fn new_step(&self) {}
}

/// Which experts each row goes to, and with what weight: `n_used` slots per row, highest
/// router probability first.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub n_used: usize,
    /// `rows × n_used` experts.
    pub experts: Vec<u32>,
    /// Their weights (renormalized probabilities, summing to 1 per row).
    pub weights: Vec<f32>,
}

/// Rows gathered per expert.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Groups {
    /// `rows[e]`: the rows routed to expert `e`, ascending.
    pub rows: Vec<Vec<u32>>,
    /// For slot `s` of row `r` (`r * n_used + s`): where that row sits in its expert's list.
    pub at: Vec<u32>,
}

impl Routing {
    pub fn n_rows(&self) -> usize {
        self.experts.len() / self.n_used
    }

    /// The rows each of `n_experts` experts computes.
    pub fn groups(&self, n_experts: usize) -> Groups {
        let mut rows = vec![Vec::new(); n_experts];
        let mut at = Vec::with_capacity(self.experts.len());
        for (i, &e) in self.experts.iter().enumerate() {
            let list: &mut Vec<u32> = &mut rows[e as usize];
            at.push(list.len() as u32);
            list.push((i / self.n_used) as u32);
        }
        Groups { rows, at }
    }
}

impl Moe {
    /// Layer `i`'s router and experts: `blk.i.ffn_gate_inp` `[d, E]`, `ffn_gate_exps` and
    /// `ffn_up_exps` `[d, d_ff, E]`, `ffn_down_exps` `[d_ff, d, E]` (GGML order).
    pub(crate) fn load(
        g: &GgufFile,
        i: usize,
        cfg: &LlamaConfig,
        moe: MoeConfig,
        precision: Precision,
    ) -> Result<Moe> {
        Self::load_some(g, i, cfg, moe, precision, &|_| true)
    }

    /// [`load`](Self::load), holding only the experts `held` says.
    pub(crate) fn load_some(
        g: &GgufFile,
        i: usize,
        cfg: &LlamaConfig,
        moe: MoeConfig,
        precision: Precision,
        held: &dyn Fn(usize) -> bool,
    ) -> Result<Moe> {
        let (d, ff, ne) = (cfg.d_model as u64, cfg.d_ff as u64, moe.n_experts as u64);
        let name = |n: &str| format!("blk.{i}.{n}.weight");
        let router = g.tensor_f32_shaped(&name("ffn_gate_inp"), &[d, ne])?;
        let stacked = |n: &str, shape: [u64; 3]| -> Result<(GgmlType, &[u8], usize)> {
            let info = g.tensor_shaped(&name(n), &shape)?;
            let per = info.ty.bytes_for(shape[0] * shape[1]).ok_or_else(|| {
                ModelError::Gguf(format!(
                    "{}: an expert's rows are not whole {} blocks",
                    info.name,
                    info.ty.name()
                ))
            })?;
            Ok((info.ty, g.tensor_bytes(info)?, per as usize))
        };
        let gate = stacked("ffn_gate_exps", [d, ff, ne])?;
        let up = stacked("ffn_up_exps", [d, ff, ne])?;
        let down = stacked("ffn_down_exps", [ff, d, ne])?;
        fn slice((ty, bytes, per): (GgmlType, &[u8], usize), e: usize) -> (GgmlType, &[u8]) {
            (ty, &bytes[e * per..(e + 1) * per])
        }
        let experts = (0..moe.n_experts)
            .map(|e| {
                held(e).then(|| {
                    Ffn::from_rows(
                        slice(gate, e),
                        slice(up, e),
                        slice(down, e),
                        (cfg.d_model, cfg.d_ff),
                        precision,
                    )
                })
            })
            .collect();
        Ok(Moe {
            router,
            experts,
            n_used: moe.n_used,
        })
    }

    pub fn n_experts(&self) -> usize {
        self.experts.len()
    }

    pub fn bytes(&self) -> usize {
        self.router.len() * 4 + self.experts.iter().flatten().map(Ffn::bytes).sum::<usize>()
    }

    /// The router's probabilities for `r` rows of `h: [r × d]`: logits in f32, softmax over
    /// every expert (`[r × n_experts]`).
    pub fn probabilities(&self, h: &[f32], r: usize) -> Vec<f32> {
        let ne = self.experts.len();
        let d = self.router.len() / ne;
        let mut p = vec![0f32; r * ne];
        matmul(h, &self.router, &mut p, r, d, ne);
        for row in p.chunks_exact_mut(ne) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for v in row.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            for v in row.iter_mut() {
                *v /= sum;
            }
        }
        p
    }

    /// Routes `r` rows of `h: [r × d]`: the `n_used` most probable experts of each
    /// ([`probabilities`](Self::probabilities); ties to the lower expert), their
    /// probabilities renormalized.
    pub fn route(&self, h: &[f32], r: usize) -> Routing {
        let ne = self.experts.len();
        let probs = self.probabilities(h, r);
        let k = self.n_used;
        let mut experts = Vec::with_capacity(r * k);
        let mut weights = Vec::with_capacity(r * k);
        let mut order: Vec<u32> = Vec::with_capacity(ne);
        for row in probs.chunks_exact(ne) {
            order.clear();
            order.extend(0..ne as u32);
            order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
            let picked = &order[..k];
            let total: f32 = picked.iter().map(|&e| row[e as usize]).sum();
            experts.extend_from_slice(picked);
            weights.extend(picked.iter().map(|&e| row[e as usize] / total));
        }
        Routing {
            n_used: k,
            experts,
            weights,
        }
    }

    /// Expert `e`, if this process holds it.
    pub fn expert(&self, e: usize) -> Option<&Ffn> {
        self.experts.get(e)?.as_ref()
    }

    /// The mixture for `r` rows of `h`, into `out: [r × d]`: routed here, the experts run
    /// here or by `remote` (layer `layer`'s), combined here.
    pub fn forward(
        &self,
        layer: usize,
        h: &[f32],
        r: usize,
        out: &mut [f32],
        remote: Option<&dyn ExpertBackend>,
    ) -> Result<()> {
        let d = h.len() / r.max(1);
        let routing = self.route(h, r);
        let groups = routing.groups(self.experts.len());
        let outputs = match remote {
            Some(b) => b.run(layer, h, d, &groups)?,
            None => groups
                .rows
                .iter()
                .enumerate()
                .map(|(e, rows)| match (rows.is_empty(), self.expert(e)) {
                    (true, _) => Ok(Vec::new()),
                    (false, Some(f)) => Ok(run_expert(f, h, d, rows)),
                    (false, None) => Err(EngineError::Experts(format!(
                        "layer {layer}'s expert {e} is not held here and no expert workers are set"
                    ))),
                })
                .collect::<Result<Vec<_>>>()?,
        };
        if let Some((e, o)) = outputs
            .iter()
            .zip(&groups.rows)
            .enumerate()
            .find(|(_, (o, rows))| o.len() != rows.len() * d)
            .map(|(e, (o, _))| (e, o.len()))
        {
            return Err(EngineError::Experts(format!(
                "layer {layer}'s expert {e} returned {o} values for {} rows of {d}",
                groups.rows[e].len()
            )));
        }
        combine(&routing, &groups, &outputs, d, out);
        Ok(())
    }

    /// Drops the experts this process holds (an [`ExpertBackend`] computes them instead).
    pub(crate) fn drop_experts(&mut self) {
        self.experts.iter_mut().for_each(|e| *e = None);
    }
}

/// `rows` of `h` gathered and run through `expert`: `[rows.len() × d]`.
pub fn run_expert(expert: &Ffn, h: &[f32], d: usize, rows: &[u32]) -> Vec<f32> {
    if rows.is_empty() {
        return Vec::new();
    }
    let mut x = Vec::with_capacity(rows.len() * d);
    for &r in rows {
        x.extend_from_slice(&h[r as usize * d..(r as usize + 1) * d]);
    }
    let mut y = vec![0f32; rows.len() * d];
    expert.forward(&x, rows.len(), &mut y);
    y
}

/// Each row's experts' outputs (`outputs[e]`: expert `e`'s rows, in [`Groups`] order) combined
/// into `out: [rows × d]`, in slot order whatever computed them: `y₀ + Σⱼ wⱼ·(yⱼ − y₀)` for
/// `j ≥ 1`, which is `Σⱼ wⱼ·yⱼ` for weights summing to 1, but affine exactly (renormalized
/// weights sum to 1 only up to rounding): experts that agree give their common output bit for
/// bit, so an upcycled model computes exactly what its dense source does.
pub fn combine(
    routing: &Routing,
    groups: &Groups,
    outputs: &[Vec<f32>],
    d: usize,
    out: &mut [f32],
) {
    let k = routing.n_used;
    let y = |i: usize| {
        let (e, at) = (routing.experts[i] as usize, groups.at[i] as usize);
        &outputs[e][at * d..(at + 1) * d]
    };
    for (row, o) in out.chunks_exact_mut(d).enumerate() {
        let y0 = y(row * k);
        o.copy_from_slice(y0);
        for s in 1..k {
            let i = row * k + s;
            let w = routing.weights[i];
            for ((a, b), c) in o.iter_mut().zip(y(i)).zip(y0) {
                *a += w * (b - c);
            }
        }
    }
}

/// A layer's feed-forward block.
pub enum FfnBlock {
    Dense(Ffn),
    Moe(Moe),
}

impl FfnBlock {
    /// Layer `i`'s FFN, dense or mixture as `cfg` says.
    pub(crate) fn load(
        g: &GgufFile,
        i: usize,
        cfg: &LlamaConfig,
        precision: Precision,
    ) -> Result<FfnBlock> {
        if let Some(moe) = cfg.moe {
            return Ok(FfnBlock::Moe(Moe::load(g, i, cfg, moe, precision)?));
        }
        let (d, ff) = (cfg.d_model as u64, cfg.d_ff as u64);
        let name = |n: &str| format!("blk.{i}.{n}.weight");
        let rows = |n: &str, shape: [u64; 2]| -> Result<(GgmlType, &[u8])> {
            let info = g.tensor_shaped(&name(n), &shape)?;
            Ok((info.ty, g.tensor_bytes(info)?))
        };
        Ok(FfnBlock::Dense(Ffn::from_rows(
            rows("ffn_gate", [d, ff])?,
            rows("ffn_up", [d, ff])?,
            rows("ffn_down", [ff, d])?,
            (cfg.d_model, cfg.d_ff),
            precision,
        )))
    }

    /// `out = ffn(h)` for `r` rows of layer `layer` (a mixture's experts by `remote` if set).
    pub fn forward(
        &self,
        layer: usize,
        h: &[f32],
        r: usize,
        out: &mut [f32],
        remote: Option<&dyn ExpertBackend>,
    ) -> Result<()> {
        match self {
            FfnBlock::Dense(f) => {
                f.forward(h, r, out);
                Ok(())
            }
            FfnBlock::Moe(m) => m.forward(layer, h, r, out, remote),
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            FfnBlock::Dense(f) => f.bytes(),
            FfnBlock::Moe(m) => m.bytes(),
        }
    }
}

pub mod make;
pub mod shard;

#[cfg(test)]
mod tests;
