//! MoE models made from a dense one (`tandem model make-moe`), in llama.cpp's GGUF layout (the
//! `llama` architecture with `llama.expert_count`), so that llama.cpp can be their oracle:
//!
//! - **upcycled**: every layer's FFN copied into each expert (as stored, or perturbed by
//!   `noise`), with a random router. Without noise each token's experts are identical and
//!   their weights sum to 1, so the model computes what the dense one does (up to rounding).
//! - **random**: the dense model's embeddings, attention and norms, with random experts (each
//!   weight uniform with the dense FFN's standard deviation, stored as the dense FFN is) and a
//!   router calibrated on real text so that the busiest expert (expert 0) takes a stated share
//!   of the tokens: each router row is random (less its component along the layer's mean FFN
//!   input, which would favour experts at random) plus a multiple of that mean, falling
//!   linearly from expert 0 to the last, found by bisection on what the layer's inputs
//!   actually route to.

use crate::config::LlamaConfig;
use crate::error::{EngineError, Result};
use crate::gguf::{GgufFile, GgufWriter, Metadata, Value};
use crate::kv::{KvDtype, KvPool, KvSequence};
use crate::linear::Precision;
use crate::model::{ForwardItem, LlamaModel, LogitsWanted};
use crate::moe::FfnBlock;
use crate::tokenizer::Tokenizer;
use crate::weights::{dequantize, encode};
use std::path::Path;

/// What to make.
#[derive(Debug, Clone, PartialEq)]
pub enum MoeKind {
    /// The dense FFN in every expert, each weight plus `noise` × (the FFN's standard deviation)
    /// × uniform noise of unit variance (0: copied as stored).
    Upcycled { noise: f32 },
    /// Random experts; the busiest expert takes `skew` of the tokens (`top_k / experts`: even).
    /// The router favours expert e by a bias ∝ (1 − e/(E−1))^`falloff`: 1 falls linearly from
    /// expert 0 to the last; below 1 the next experts (1, 2, …) keep a bias near expert 0's and
    /// take more of the remaining choices (the low-numbered experts take more of the load);
    /// above 1 their bias falls faster.
    Random { skew: f64, falloff: f32 },
}

/// How to make it.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeSpec {
    pub experts: usize,
    pub top_k: usize,
    pub kind: MoeKind,
    pub seed: u64,
    /// Keep only the first `layers` layers (smaller models for tests); `None`: all.
    pub layers: Option<usize>,
}

/// What was made: how each layer routes the calibration tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Made {
    /// The share of the tokens each layer's busiest expert took.
    pub busiest_share: Vec<f64>,
    /// The share of the tokens each layer routed to each expert (a layer's shares sum to
    /// top-k).
    pub expert_share: Vec<Vec<f64>>,
}

/// A text the random router is calibrated on (real prose and code, ~400 tokens).
pub const CALIBRATION_TEXT: &str = "The history of computing is a story of layers. Each \
generation of engineers built on the abstractions of the last, hiding the details of the \
machine behind simpler ideas: assembly over machine code, compilers over assembly, operating \
systems over hardware, and networks over isolated computers. Today a request to a language \
model crosses all of them. It arrives as text over HTTP, is split into tokens, and flows \
through attention and feed-forward layers on processors that may sit in different racks.\n\n\
def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    \
return a\n\nprint([fibonacci(i) for i in range(10)])\n\nIn the kitchen, bread begins with \
flour, water, salt and yeast. Mix them, knead the dough until it is smooth, let it rise in a \
warm place, shape it, and bake it until the crust sounds hollow when tapped. Patience matters \
more than technique. Rivers carve valleys over millions of years; glaciers grind mountains \
into sand. The weather tomorrow will be cloudy with a chance of rain in the afternoon, and \
the wind will come from the west. Questions: What is the capital of France? How many legs \
does a spider have? Why is the sky blue? Answers: Paris; eight; because air scatters short \
wavelengths of sunlight more than long ones.";

struct Rng(u64);
impl Rng {
    /// splitmix64.
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform with mean 0 and variance 1.
    fn unit(&mut self) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        (u * 2.0 - 1.0) * 3f32.sqrt()
    }
    fn fill(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.unit() * scale).collect()
    }
}

fn bad(msg: String) -> EngineError {
    EngineError::Model(frontend::ModelError::Gguf(msg))
}

fn std_dev(x: &[f32]) -> f32 {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    (x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt() as f32
}

/// Makes the MoE of `spec` from the dense model `src` and writes it to `dst`.
pub fn make_moe(src: &GgufFile, spec: &MoeSpec, dst: &Path) -> Result<Made> {
    let cfg = LlamaConfig::from_metadata(src)?;
    if cfg.moe.is_some() {
        return Err(bad("the source is already a mixture of experts".into()));
    }
    if spec.experts < 2 || spec.top_k == 0 || spec.top_k > spec.experts {
        return Err(bad(format!(
            "{} experts, top {}: needs at least 2 experts and 1 ..= experts used",
            spec.experts, spec.top_k
        )));
    }
    let layers = spec.layers.unwrap_or(cfg.n_layers);
    if layers == 0 || layers > cfg.n_layers {
        return Err(bad(format!(
            "layers {layers}: the source has {}",
            cfg.n_layers
        )));
    }
    if let MoeKind::Random { skew, falloff } = spec.kind {
        let even = spec.top_k as f64 / spec.experts as f64;
        if !(even..1.0).contains(&skew) {
            return Err(bad(format!(
                "skew {skew}: the busiest expert's share of tokens, from {even} (even) to below 1"
            )));
        }
        if !(falloff.is_finite() && falloff > 0.0) {
            return Err(bad(format!("falloff {falloff}: must be above 0")));
        }
    }
    let mut w = writer(src, spec, layers)?;
    let d = cfg.d_model;
    let mut rng = Rng(spec.seed ^ 0x6d6f_655f_6d61_6b65);
    let ne = spec.experts as u64;
    for i in 0..layers {
        let name = |n: &str| format!("blk.{i}.{n}.weight");
        let router = rng.fill(spec.experts * d, 1.0 / (d as f32).sqrt());
        w.tensor_f32(name("ffn_gate_inp"), &[d as u64, ne], &router);
        for part in ["ffn_gate", "ffn_up", "ffn_down"] {
            let info = src
                .tensor_info(&name(part))
                .ok_or_else(|| bad(format!("{} missing", name(part))))?;
            let bytes = src.tensor_bytes(info)?;
            let mut stacked = Vec::with_capacity(bytes.len() * spec.experts);
            let dense = dequantize(info.ty, bytes);
            let sd = std_dev(&dense);
            for _ in 0..spec.experts {
                match spec.kind {
                    MoeKind::Upcycled { noise: 0.0 } => stacked.extend_from_slice(bytes),
                    MoeKind::Upcycled { noise } => {
                        let x: Vec<f32> =
                            dense.iter().map(|&v| v + rng.unit() * noise * sd).collect();
                        stacked.extend(encode(info.ty, &x));
                    }
                    MoeKind::Random { .. } => {
                        stacked.extend(encode(info.ty, &rng.fill(dense.len(), sd)))
                    }
                }
            }
            let dims = [info.dims[0], info.dims[1], ne];
            w.tensor(name(&format!("{part}_exps")), &dims, info.ty, stacked);
        }
    }
    w.write(dst)?;
    let made = match spec.kind {
        MoeKind::Random { skew, falloff } => calibrate(src, dst, spec, skew, falloff)?,
        MoeKind::Upcycled { .. } => measure(&load(dst)?, &calibration_tokens(src)?)?,
    };
    Ok(made)
}

/// The source's metadata and non-FFN tensors, with the MoE keys.
fn writer(src: &GgufFile, spec: &MoeSpec, layers: usize) -> Result<GgufWriter> {
    let mut w = GgufWriter::new();
    for k in src.keys() {
        if k == "general.alignment" {
            continue;
        }
        w.meta(k.clone(), src.get(k).expect("key listed").clone());
    }
    let kind = match spec.kind {
        MoeKind::Upcycled { .. } => "upcycled",
        MoeKind::Random { .. } => "random",
    };
    let base = src
        .get("general.name")
        .and_then(Value::as_str)
        .unwrap_or("model")
        .to_string();
    w.meta(
        "general.name",
        Value::String(format!(
            "{base} {kind} MoE {}x top-{}",
            spec.experts, spec.top_k
        )),
    )
    .meta("llama.block_count", Value::U32(layers as u32))
    .meta("llama.expert_count", Value::U32(spec.experts as u32))
    .meta("llama.expert_used_count", Value::U32(spec.top_k as u32));
    for t in src.tensors() {
        let layer = t
            .name
            .strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|n| n.parse::<usize>().ok());
        let ffn = ["ffn_gate.", "ffn_up.", "ffn_down."]
            .iter()
            .any(|p| t.name.contains(p));
        if layer.is_some_and(|l| l >= layers) || ffn {
            continue;
        }
        w.tensor(t.name.clone(), &t.dims, t.ty, src.tensor_bytes(t)?.to_vec());
    }
    Ok(w)
}

fn load(path: &Path) -> Result<LlamaModel> {
    LlamaModel::load(&GgufFile::open(path)?, Precision::W4A8)
}

/// The calibration text's tokens, as many as the model's context holds.
fn calibration_tokens(src: &GgufFile) -> Result<Vec<u32>> {
    let mut t = Tokenizer::from_metadata(src)?.encode(CALIBRATION_TEXT, false)?;
    t.truncate(LlamaConfig::from_metadata(src)?.n_ctx);
    Ok(t)
}

/// Each layer's FFN inputs for `tokens` (`[tokens × d]` per layer).
fn ffn_inputs(model: &LlamaModel, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
    let layout = model.kv_layout(KvDtype::F32);
    let pool = KvPool::new(layout, tokens.len().div_ceil(layout.block_size) + 1);
    let mut seq = KvSequence::new(pool);
    let mut inputs = vec![Vec::new(); model.cfg.n_layers];
    model.forward_tapped(
        &mut [ForwardItem {
            seq: &mut seq,
            tokens,
            logits: LogitsWanted::None,
        }],
        &mut |_, _| {},
        &mut |l, h| inputs[l] = h.to_vec(),
    )?;
    Ok(inputs)
}

/// What each layer routed `tokens` to.
fn measure(model: &LlamaModel, tokens: &[u32]) -> Result<Made> {
    let inputs = ffn_inputs(model, tokens)?;
    let expert_share: Vec<Vec<f64>> = model
        .layers
        .iter()
        .zip(&inputs)
        .map(|(l, h)| match &l.ffn {
            FfnBlock::Moe(m) => shares(&m.route(h, tokens.len()), m.n_experts()),
            FfnBlock::Dense(_) => Vec::new(),
        })
        .collect();
    Ok(Made {
        busiest_share: expert_share
            .iter()
            .map(|s| s.iter().cloned().fold(0.0, f64::max))
            .collect(),
        expert_share,
    })
}

/// The share of the rows routed to each expert.
fn shares(r: &crate::moe::Routing, n_experts: usize) -> Vec<f64> {
    let mut count = vec![0usize; n_experts];
    for &e in &r.experts {
        count[e as usize] += 1;
    }
    count
        .iter()
        .map(|&c| c as f64 / r.n_rows().max(1) as f64)
        .collect()
}

fn busiest(r: &crate::moe::Routing, n_experts: usize) -> f64 {
    shares(r, n_experts).into_iter().fold(0.0, f64::max)
}

/// Sets every layer's router so that expert 0 takes `skew` of the calibration tokens, layer by
/// layer (a layer's inputs depend on the routers before it), and writes the result to `dst`.
fn calibrate(src: &GgufFile, dst: &Path, spec: &MoeSpec, skew: f64, falloff: f32) -> Result<Made> {
    let tokens = calibration_tokens(src)?;
    let mut model = load(dst)?;
    let (d, ne) = (model.cfg.d_model, spec.experts);
    for l in 0..model.layers.len() {
        let h = ffn_inputs(&model, &tokens)?.swap_remove(l);
        let mut mean = vec![0f32; d];
        for row in h.chunks_exact(d) {
            for (m, v) in mean.iter_mut().zip(row) {
                *m += v / tokens.len() as f32;
            }
        }
        let norm2: f32 = mean.iter().map(|v| v * v).sum();
        let FfnBlock::Moe(moe) = &mut model.layers[l].ffn else {
            unreachable!("made with experts")
        };
        // The random rows without their component along the mean input (which would favour
        // experts at random), then the bias below.
        let mut base = moe.router.clone();
        for row in base.chunks_exact_mut(d) {
            let along: f32 = row.iter().zip(&mean).map(|(r, m)| r * m).sum::<f32>()
                / norm2.max(f32::MIN_POSITIVE);
            for (r, m) in row.iter_mut().zip(&mean) {
                *r -= along * m;
            }
        }
        // Router row e gains b · (1 - e/(E-1))^falloff · mean/|mean|²: expert 0's logit rises
        // by b for the mean input, the last's not at all.
        let with_bias = |b: f32, router: &mut Vec<f32>| {
            router.clone_from(&base);
            for (e, row) in router.chunks_exact_mut(d).enumerate() {
                let share = (1.0 - e as f32 / (ne - 1) as f32).powf(falloff);
                let s = b * share / norm2.max(f32::MIN_POSITIVE);
                for (r, m) in row.iter_mut().zip(&mean) {
                    *r += s * m;
                }
            }
        };
        let (mut lo, mut hi) = (0f32, 64f32);
        for _ in 0..40 {
            let mid = 0.5 * (lo + hi);
            with_bias(mid, &mut moe.router);
            if busiest(&moe.route(&h, tokens.len()), ne) < skew {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        with_bias(hi, &mut moe.router);
    }
    // The routers into the file, the rest as written.
    let g = GgufFile::open(dst)?;
    let mut w = GgufWriter::new();
    for k in g.keys() {
        if k != "general.alignment" {
            w.meta(k.clone(), g.get(k).expect("key listed").clone());
        }
    }
    for t in g.tensors() {
        let layer = t
            .name
            .strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|n| n.parse::<usize>().ok());
        match (layer, &t.name) {
            (Some(l), n) if n.ends_with("ffn_gate_inp.weight") => {
                let FfnBlock::Moe(moe) = &model.layers[l].ffn else {
                    unreachable!("made with experts")
                };
                w.tensor_f32(t.name.clone(), &t.dims, &moe.router);
            }
            _ => {
                w.tensor(t.name.clone(), &t.dims, t.ty, g.tensor_bytes(t)?.to_vec());
            }
        }
    }
    drop(model);
    let tmp = dst.with_extension("calibrating");
    w.write(&tmp)?;
    drop(g);
    std::fs::rename(&tmp, dst).map_err(|source| frontend::ModelError::Io {
        path: dst.to_path_buf(),
        source,
    })?;
    measure(&load(dst)?, &tokens)
}

#[cfg(test)]
mod tests;
