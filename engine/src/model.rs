//! The Llama-family transformer: weights and the batched forward pass over paged KV.
//!
//! One [`LlamaModel::forward`] call runs any mix of sequences, each contributing a chunk of
//! new tokens (a whole prompt, a prefill chunk, or one decode token). All rows go through each
//! weight matrix together; attention runs per row over that row's own sequence. Every kernel
//! is batch-invariant, so a sequence's logits do not depend on what else is in the call.

use crate::config::LlamaConfig;
use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::kv::{KvDtype, KvLayout, KvSequence};
use crate::linear::{Acts, Linear, Precision};
use crate::moe::{ExpertBackend, Ffn, FfnBlock};
use crate::weights::TensorsF32;
use kernels::attention::{AttnRows, AttnShape, KvBlockRef, attend_rows};
use kernels::ops::{rms_norm, rope_angles, rope_apply};
use kernels::pool::for_rows;
use rayon::prelude::*;

/// One transformer block's weights (`[out × in]` row-major).
pub(crate) struct Layer {
    pub(crate) attn_norm: Vec<f32>,
    /// Q, K and V stacked: `[d + 2·kv_dim × d]`.
    pub(crate) wqkv: Linear,
    pub(crate) wo: Linear,
    pub(crate) ffn_norm: Vec<f32>,
    pub(crate) ffn: FfnBlock,
}

/// A loaded Llama-family model.
pub struct LlamaModel {
    pub cfg: LlamaConfig,
    pub precision: Precision,
    /// The embedding table; also the output projection when that is tied to it. At `int8` it
    /// keeps the GGUF's blocks as stored (computed by the w4a8 kernel): requantizing it would
    /// perturb every input token and was the largest part of int8's perplexity cost, and the
    /// stored Q8_0 blocks read as fast as int8 rows.
    pub(crate) token_embd: Linear,
    /// `None` when the output projection is tied to the embeddings.
    pub(crate) output: Option<Linear>,
    pub(crate) output_norm: Vec<f32>,
    pub(crate) layers: Vec<Layer>,
    /// Where a mixture's experts run when not here (expert parallelism); `None`: here.
    pub(crate) expert_backend: Option<std::sync::Arc<dyn ExpertBackend>>,
    /// With an expert backend: batches of several items run as this many microbatches at once
    /// (one's attention computing while another's experts run elsewhere).
    pub(crate) microbatches: usize,
}

/// What a forward pass calls after each layer: the layer, and the items (whose K/V of that
/// layer is complete and may be read).
pub type LayerHook<'h> = dyn FnMut(usize, &[ForwardItem<'_>]) + 'h;

/// Which logits a forward item wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    None,
    /// The last new position's (what sampling needs).
    Last,
    /// Every new position's (prompt log-probabilities, perplexity).
    All,
}

/// One sequence's share of a forward call.
pub struct ForwardItem<'a> {
    pub seq: &'a mut KvSequence,
    pub tokens: &'a [u32],
    pub logits: LogitsWanted,
}

impl LlamaModel {
    /// Reads every weight at `precision`; checks shapes against the config.
    pub fn load(g: &GgufFile, precision: Precision) -> Result<LlamaModel> {
        let cfg = LlamaConfig::from_metadata(g)?;
        let (d, kvd, v) = (
            cfg.d_model as u64,
            cfg.kv_dim() as u64,
            cfg.vocab_size as u64,
        );
        let lin = |name: &str, shape: &[u64]| Linear::load(g, name, shape, precision);
        let embd_precision = match precision {
            Precision::Int8 => Precision::W4A8,
            p => p,
        };
        let token_embd = Linear::load(g, "token_embd.weight", &[d, v], embd_precision)?;
        let output = match g.tensor_info("output.weight") {
            Some(_) => Some(lin("output.weight", &[d, v])?),
            None => None,
        };
        let output_norm = g.tensor_f32_shaped("output_norm.weight", &[d])?;
        let layers = (0..cfg.n_layers)
            .into_par_iter()
            .map(|i| {
                let t = |n: &str, shape: &[u64]| lin(&format!("blk.{i}.{n}.weight"), shape);
                let name = |n: &str| format!("blk.{i}.{n}.weight");
                let stacked = |parts: &[(String, [u64; 2])]| {
                    let parts: Vec<(&str, &[u64])> =
                        parts.iter().map(|(n, s)| (n.as_str(), &s[..])).collect();
                    Linear::load_stacked(g, &parts, precision)
                };
                let norm = |n: &str| g.tensor_f32_shaped(&name(n), &[d]);
                Ok(Layer {
                    attn_norm: norm("attn_norm")?,
                    wqkv: stacked(&[
                        (name("attn_q"), [d, d]),
                        (name("attn_k"), [d, kvd]),
                        (name("attn_v"), [d, kvd]),
                    ])?,
                    wo: t("attn_output", &[d, d])?,
                    ffn_norm: norm("ffn_norm")?,
                    ffn: FfnBlock::load(g, i, &cfg, precision)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LlamaModel {
            cfg,
            precision,
            token_embd,
            output,
            output_norm,
            layers,
            expert_backend: None,
            microbatches: 1,
        })
    }

    /// Runs every mixture's experts on `backend` (expert workers) from now on, dropping the
    /// ones held here. A dense model refuses.
    pub fn set_expert_backend(&mut self, backend: std::sync::Arc<dyn ExpertBackend>) -> Result<()> {
        if self.cfg.moe.is_none() {
            return Err(EngineError::Experts(
                "the model is dense: it has no experts to run elsewhere".into(),
            ));
        }
        for l in &mut self.layers {
            if let FfnBlock::Moe(m) = &mut l.ffn {
                m.drop_experts();
            }
        }
        self.expert_backend = Some(backend);
        Ok(())
    }

    /// With an expert backend, runs a batch of several items as `n` microbatches (1 or 2) in
    /// flight together: while one waits for its experts on the expert workers, the other
    /// computes its attention. Each row's arithmetic is the same either way (the kernels are
    /// batch-invariant), so the outputs are too.
    pub fn set_microbatches(&mut self, n: usize) -> Result<()> {
        if !(1..=2).contains(&n) {
            return Err(EngineError::Experts(format!(
                "{n} microbatches: 1 or 2 are in flight"
            )));
        }
        self.microbatches = n;
        Ok(())
    }

    /// Checks every weight's shape against the config (for weights that did not come from a
    /// GGUF's shape-checked tensors: an edge bundle's).
    pub(crate) fn check_shapes(&self) -> Result<()> {
        let c = &self.cfg;
        let (d, kvd, ff, v) = (c.d_model, c.kv_dim(), c.d_ff, c.vocab_size);
        let mut want: Vec<Check> = vec![
            ("token_embd", self.token_embd.dims(), (v, d)),
            ("output_norm", (self.output_norm.len(), 1), (d, 1)),
        ];
        if let Some(o) = &self.output {
            want.push(("output", o.dims(), (v, d)));
        }
        for l in &self.layers {
            want.extend([
                ("attn_norm", (l.attn_norm.len(), 1), (d, 1)),
                ("ffn_norm", (l.ffn_norm.len(), 1), (d, 1)),
                ("wqkv", l.wqkv.dims(), (d + 2 * kvd, d)),
                ("wo", l.wo.dims(), (d, d)),
            ]);
            match &l.ffn {
                FfnBlock::Dense(f) => want.extend(ffn_dims(f, d, ff)),
                FfnBlock::Moe(m) => {
                    want.push(("router", (m.router.len() / d, d), (m.n_experts(), d)));
                    for f in m.experts.iter().flatten() {
                        want.extend(ffn_dims(f, d, ff));
                    }
                }
            }
        }
        match want.iter().find(|(_, got, want)| got != want) {
            None => Ok(()),
            Some((name, got, want)) => Err(EngineError::Bundle(format!(
                "{name} is {got:?} (n, k), the config needs {want:?}"
            ))),
        }
    }

    /// Layer `layer`'s mixture of experts, if the model has them.
    pub fn moe(&self, layer: usize) -> Option<&crate::moe::Moe> {
        match &self.layers.get(layer)?.ffn {
            FfnBlock::Moe(m) => Some(m),
            FfnBlock::Dense(_) => None,
        }
    }

    /// The KV block geometry this model needs.
    pub fn kv_layout(&self, dtype: KvDtype) -> KvLayout {
        KvLayout::for_model(&self.cfg, dtype)
    }

    /// Bytes of weights held in memory.
    pub fn weight_bytes(&self) -> usize {
        let l: usize = self
            .layers
            .iter()
            .map(|l| {
                (l.attn_norm.len() + l.ffn_norm.len()) * 4
                    + l.wqkv.bytes()
                    + l.wo.bytes()
                    + l.ffn.bytes()
            })
            .sum();
        l + self.token_embd.bytes()
            + self.output.as_ref().map_or(0, Linear::bytes)
            + self.output_norm.len() * 4
    }

    /// Runs new tokens of every item through the model, appending their K/V to each item's
    /// sequence; returns, per item, the logits it asked for (`n × vocab` for `All`).
    pub fn forward(&self, items: &mut [ForwardItem<'_>]) -> Result<Vec<Vec<f32>>> {
        if self.microbatches > 1 && self.expert_backend.is_some() && items.len() > 1 {
            return self.forward_split(items);
        }
        self.forward_with(items, &mut |_, _| {})
    }

    /// [`forward`](Self::forward) as two microbatches of about half the rows each, on two
    /// threads: their layers interleave on the expert backend (it runs one layer at a time),
    /// one microbatch's attention overlapping the other's experts.
    fn forward_split(&self, items: &mut [ForwardItem<'_>]) -> Result<Vec<Vec<f32>>> {
        let total: usize = items.iter().map(|it| it.tokens.len()).sum();
        let mut cut = 1;
        let mut rows = 0;
        for (i, it) in items.iter().enumerate() {
            rows += it.tokens.len();
            if 2 * rows >= total {
                cut = (i + 1).clamp(1, items.len() - 1);
                break;
            }
        }
        if let Some(backend) = &self.expert_backend {
            backend.new_step();
        }
        let (a, b) = items.split_at_mut(cut);
        let run = |items: &mut [ForwardItem<'_>]| {
            self.forward_layers(items, &mut |_, _| {}, &mut |_: usize, _: &[f32]| {})
        };
        let (first, second) = std::thread::scope(|s| {
            let second = s.spawn(|| run(b));
            let first = run(a);
            (first, second.join())
        });
        let second = second.unwrap_or_else(|p| std::panic::resume_unwind(p));
        let mut out = first?;
        out.extend(second?);
        Ok(out)
    }

    /// [`forward`](Self::forward), calling `layer_done(l, items)` as soon as every item's new
    /// K/V of layer `l` is in its blocks (while the later layers still compute): the hook a KV
    /// transfer checksums and pushes each layer from, so transfer overlaps compute.
    pub fn forward_with(
        &self,
        items: &mut [ForwardItem<'_>],
        layer_done: &mut LayerHook<'_>,
    ) -> Result<Vec<Vec<f32>>> {
        self.forward_tapped(items, layer_done, &mut |_, _| {})
    }

    /// [`forward_with`](Self::forward_with), showing `ffn_input(l, h)` every layer's FFN input
    /// (`h: [rows × d]`, normed) before the FFN runs: what router calibration and the golden
    /// tests' router checks read.
    pub fn forward_tapped(
        &self,
        items: &mut [ForwardItem<'_>],
        layer_done: &mut LayerHook<'_>,
        ffn_input: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<Vec<Vec<f32>>> {
        if let Some(b) = &self.expert_backend {
            b.new_step();
        }
        self.forward_layers(items, layer_done, ffn_input)
    }

    /// One forward pass of `items` (no step begins here: the callers say when one does).
    fn forward_layers(
        &self,
        items: &mut [ForwardItem<'_>],
        layer_done: &mut LayerHook<'_>,
        ffn_input: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<Vec<Vec<f32>>> {
        let c = &self.cfg;
        let (d, kvd, hd) = (c.d_model, c.kv_dim(), c.head_dim);
        validate_and_reserve(c, items)?;
        // Row r belongs to item row_item[r] at position row_pos[r].
        let mut row_item = Vec::new();
        let mut row_pos = Vec::new();
        for (i, it) in items.iter().enumerate() {
            let start = it.seq.len();
            for p in 0..it.tokens.len() {
                row_item.push(i);
                row_pos.push(start + p);
            }
        }
        let r = row_item.len();
        let mut x = vec![0f32; r * d];
        for (row, &tok) in x
            .chunks_exact_mut(d)
            .zip(items.iter().flat_map(|it| it.tokens.iter()))
        {
            self.token_embd.row_into(tok as usize, row);
        }
        let mut h = vec![0f32; r * d];
        let mut q = vec![0f32; r * d];
        let mut k = vec![0f32; r * kvd];
        let mut v = vec![0f32; r * kvd];
        let mut att = vec![0f32; r * d];
        let mut proj = vec![0f32; r * d];
        let qkv_w = d + 2 * kvd;
        let mut qkv = vec![0f32; r * qkv_w];
        let shape = AttnShape {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: hd,
            block_size: crate::kv::BLOCK_SIZE,
        };

        // Each row's rotation angles, shared by every layer and by Q and K.
        let angles: Vec<Vec<(f32, f32)>> = row_pos
            .iter()
            .map(|&pos| {
                let mut cs = Vec::new();
                rope_angles(hd, pos, c.rope_base, &mut cs);
                cs
            })
            .collect();
        for (li, l) in self.layers.iter().enumerate() {
            norm_rows(&x, &l.attn_norm, c.rms_eps, &mut h, d);
            l.wqkv.forward(&mut Acts::new(&h, r, d), &mut qkv);
            for (row, src) in qkv.chunks_exact(qkv_w).enumerate() {
                q[row * d..(row + 1) * d].copy_from_slice(&src[..d]);
                k[row * kvd..(row + 1) * kvd].copy_from_slice(&src[d..d + kvd]);
                v[row * kvd..(row + 1) * kvd].copy_from_slice(&src[d + kvd..]);
            }
            for (row, cs) in angles.iter().enumerate() {
                rope_apply(&mut q[row * d..(row + 1) * d], hd, cs);
                rope_apply(&mut k[row * kvd..(row + 1) * kvd], hd, cs);
            }
            for row in 0..r {
                let it = &mut items[row_item[row]];
                it.seq.write(
                    li,
                    row_pos[row],
                    &k[row * kvd..(row + 1) * kvd],
                    &v[row * kvd..(row + 1) * kvd],
                );
            }
            layer_done(li, items);
            {
                let blocks: Vec<_> = items.iter().map(|it| it.seq.layer_blocks(li)).collect();
                attention(shape, &q, &row_item, &row_pos, &blocks, &mut att);
            }
            l.wo.forward(&mut Acts::new(&att, r, d), &mut proj);
            add_in_place(&mut x, &proj);
            norm_rows(&x, &l.ffn_norm, c.rms_eps, &mut h, d);
            ffn_input(li, &h);
            l.ffn
                .forward(li, &h, r, &mut proj, self.expert_backend.as_deref())?;
            add_in_place(&mut x, &proj);
        }

        // Logits for the rows each item asked for, through the output projection in one call.
        let mut wanted = Vec::new();
        let mut row0 = 0;
        for it in items.iter_mut() {
            let n = it.tokens.len();
            wanted.push(match it.logits {
                LogitsWanted::None => 0..0,
                LogitsWanted::Last => row0 + n - 1..row0 + n,
                LogitsWanted::All => row0..row0 + n,
            });
            it.seq.advance(n);
            row0 += n;
        }
        let m: usize = wanted.iter().map(|r| r.len()).sum();
        let mut picked = Vec::with_capacity(m * d);
        for rows in &wanted {
            picked.extend_from_slice(&x[rows.start * d..rows.end * d]);
        }
        let mut normed = vec![0f32; m * d];
        norm_rows(&picked, &self.output_norm, c.rms_eps, &mut normed, d);
        let mut logits = vec![0f32; m * c.vocab_size];
        if m > 0 {
            let w_out = self.output.as_ref().unwrap_or(&self.token_embd);
            w_out.forward(&mut Acts::new(&normed, m, d), &mut logits);
        }
        if wanted.len() == 1 {
            return Ok(vec![logits]);
        }
        let mut out = Vec::with_capacity(items.len());
        let mut at = 0;
        for rows in &wanted {
            let len = rows.len() * c.vocab_size;
            out.push(logits[at..at + len].to_vec());
            at += len;
        }
        Ok(out)
    }
}

/// A weight's name, its `(n, k)` and the config's.
type Check<'a> = (&'a str, (usize, usize), (usize, usize));

/// An FFN's matrices' `(n, k)`, and what the config needs.
fn ffn_dims(f: &Ffn, d: usize, ff: usize) -> [Check<'static>; 2] {
    [
        ("w_gate_up", f.w_gate_up.dims(), (2 * ff, d)),
        ("w_down", f.w_down.dims(), (d, ff)),
    ]
}

/// Checks every item's tokens and context against the model and reserves its blocks, before a
/// forward pass (on any backend) computes anything.
pub(crate) fn validate_and_reserve(c: &LlamaConfig, items: &mut [ForwardItem<'_>]) -> Result<()> {
    for it in items.iter_mut() {
        if let Some(&t) = it.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(EngineError::BadToken(t));
        }
        let total = it.seq.len() + it.tokens.len();
        if total > c.n_ctx {
            return Err(EngineError::ContextOverflow {
                len: total,
                max: c.n_ctx,
            });
        }
        it.seq.reserve(total)?;
    }
    Ok(())
}

/// Query rows per attention task: with three query heads per KV head, 24 (row, head) scores
/// share each key vector the kernel loads.
const ATTN_TILE: usize = 8;

/// Attention of every row of the call over its own sequence (`blocks[item]`), into `att`.
///
/// A task is up to [`ATTN_TILE`] consecutive rows of one sequence × the query heads of one KV
/// head, longest contexts first so the pool's threads finish together. A batch with too few
/// tasks to keep every thread busy that way (a lone decode row) takes a task per head instead;
/// any split gives the same bits.
fn attention(
    shape: AttnShape,
    q: &[f32],
    row_item: &[usize],
    row_pos: &[usize],
    blocks: &[Vec<KvBlockRef<'_>>],
    att: &mut [f32],
) {
    let (hd, d) = (shape.head_dim, shape.n_heads * shape.head_dim);
    // (first row, rows) of each tile: rows of one item at consecutive positions.
    let mut tiles = Vec::new();
    let mut r = 0;
    while r < row_item.len() {
        let mut n = 1;
        while n < ATTN_TILE
            && r + n < row_item.len()
            && row_item[r + n] == row_item[r]
            && row_pos[r + n] == row_pos[r] + n
        {
            n += 1;
        }
        tiles.push((r, n));
        r += n;
    }
    tiles.sort_by_key(|&(r, n)| std::cmp::Reverse(row_pos[r] + n));
    let group = shape.group();
    let heads_per_task = if tiles.len() * shape.n_kv_heads >= 4 * kernels::pool::global().threads()
    {
        group
    } else {
        1
    };
    let tasks_per_tile = shape.n_heads / heads_per_task;
    let out = kernels::pool::SendPtr(att.as_mut_ptr());
    kernels::pool::global().run(tiles.len() * tasks_per_tile, &|task| {
        let (r0, rows) = tiles[task / tasks_per_tile];
        let h0 = task % tasks_per_tile * heads_per_task;
        let heads = h0..h0 + heads_per_task;
        let mut o = vec![0f32; rows * heads_per_task * hd];
        attend_rows(
            shape,
            heads,
            AttnRows {
                q: &q[r0 * d..(r0 + rows) * d],
                rows,
                first_ctx: row_pos[r0] + 1,
                blocks: &blocks[row_item[r0]],
            },
            &mut o,
        );
        for (r, src) in o.chunks_exact(heads_per_task * hd).enumerate() {
            // SAFETY: row r0 + r, heads h0.. of `att` belong to this task alone.
            unsafe {
                let dst = out.get().add((r0 + r) * d + h0 * hd);
                std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len());
            }
        }
    });
}

fn norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32], d: usize) {
    for_rows(out, d, 32, |row, o| {
        rms_norm(&x[row * d..(row + 1) * d], w, eps, o)
    });
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
