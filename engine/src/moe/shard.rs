//! The experts one expert worker holds: a subset of every layer's, loaded from the model's GGUF
//! without its attention weights, embeddings or routers' callers.

use super::{ExpertBackend, Groups, Moe, run_expert};
use crate::config::LlamaConfig;
use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::linear::Precision;
use rayon::prelude::*;

/// Experts `held` of every layer.
pub struct ExpertShard {
    pub cfg: LlamaConfig,
    pub precision: Precision,
    /// The experts held, ascending.
    pub held: Vec<usize>,
    layers: Vec<Moe>,
}

impl ExpertShard {
    /// Loads experts `held` of every layer of the MoE model `g` at `precision`.
    pub fn load(g: &GgufFile, precision: Precision, held: &[usize]) -> Result<ExpertShard> {
        let cfg = LlamaConfig::from_metadata(g)?;
        let moe = cfg.moe.ok_or_else(|| {
            EngineError::Experts("the model is dense: it has no experts to serve".into())
        })?;
        let mut held = held.to_vec();
        held.sort_unstable();
        held.dedup();
        if let Some(e) = held.iter().find(|&&e| e >= moe.n_experts) {
            return Err(EngineError::Experts(format!(
                "expert {e} asked for; the model has {}",
                moe.n_experts
            )));
        }
        let layers = (0..cfg.n_layers)
            .into_par_iter()
            .map(|i| Moe::load_some(g, i, &cfg, moe, precision, &|e| held.contains(&e)))
            .collect::<Result<Vec<_>>>()?;
        Ok(ExpertShard {
            cfg,
            precision,
            held,
            layers,
        })
    }

    /// Holds `more` too, loaded from `g` (the same model): [`load_missing`](Self::load_missing)
    /// then [`merge`](Self::merge).
    pub fn add(&mut self, g: &GgufFile, more: &[usize]) -> Result<()> {
        let new = Self::load_missing(&self.cfg, self.precision, &self.held, g, more)?;
        self.merge(new);
        Ok(())
    }

    /// The experts of `more` not in `held`, loaded from `g` (a model of config `cfg`) at
    /// `precision` as a shard of their own: the slow part of taking on experts, done without
    /// holding the shard they join (a server keeps running its experts meanwhile), then
    /// [`merge`](Self::merge)d.
    pub fn load_missing(
        cfg: &LlamaConfig,
        precision: Precision,
        held: &[usize],
        g: &GgufFile,
        more: &[usize],
    ) -> Result<ExpertShard> {
        if LlamaConfig::from_metadata(g)? != *cfg {
            return Err(EngineError::Experts(
                "another model than this shard's".into(),
            ));
        }
        let new: Vec<usize> = more.iter().copied().filter(|e| !held.contains(e)).collect();
        ExpertShard::load(g, precision, &new)
    }

    /// Takes over the experts of `other` (of the same model and precision) it does not hold.
    pub fn merge(&mut self, mut other: ExpertShard) {
        for (layer, m) in self.layers.iter_mut().zip(&mut other.layers) {
            for &e in &other.held {
                if !self.held.contains(&e) {
                    layer.experts[e] = m.experts[e].take();
                }
            }
        }
        for e in other.held {
            if !self.held.contains(&e) {
                self.held.push(e);
            }
        }
        self.held.sort_unstable();
    }

    /// Bytes of expert weights held.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|m| m.experts.iter().flatten())
            .map(|f| f.bytes())
            .sum()
    }

    /// Layer `layer`'s expert `expert` over `m` rows of `x` (`[m × d]`): `[m × d]`.
    pub fn run(&self, layer: usize, expert: usize, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let d = self.cfg.d_model;
        let f = self
            .layers
            .get(layer)
            .and_then(|l| l.expert(expert))
            .ok_or_else(|| {
                EngineError::Experts(format!("layer {layer}'s expert {expert} is not held here"))
            })?;
        if x.len() != m * d {
            return Err(EngineError::Experts(format!(
                "{} values for {m} rows of {d}",
                x.len()
            )));
        }
        let mut y = vec![0f32; m * d];
        if m > 0 {
            f.forward(x, m, &mut y);
        }
        Ok(y)
    }
}

/// A shard as a backend in the same process (tests; one worker's view of its own experts).
impl ExpertBackend for ExpertShard {
    fn run(&self, layer: usize, h: &[f32], d: usize, groups: &Groups) -> Result<Vec<Vec<f32>>> {
        groups
            .rows
            .iter()
            .enumerate()
            .map(|(e, rows)| {
                if rows.is_empty() {
                    return Ok(Vec::new());
                }
                let f = self.layers[layer].expert(e).ok_or_else(|| {
                    EngineError::Experts(format!("layer {layer}'s expert {e} is not held here"))
                })?;
                Ok(run_expert(f, h, d, rows))
            })
            .collect()
    }
}
