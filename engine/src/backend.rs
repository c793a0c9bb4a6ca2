//! The seam between the engine and the device that runs a model.
//!
//! Everything above a forward step — block tables and the KV allocator, batching, sampling,
//! the workers and the scheduler — talks to a [`Backend`]; only the backend knows where the
//! weights live, how the step computes and in which kernels. The CPU backend is
//! [`LlamaModel`] (weights in host memory, the SIMD kernels of the `kernels` crate, KV blocks
//! in the host [`crate::KvPool`]).
//!
//! The CUDA backend (`engine::cuda`, cargo feature `cuda`) is the other implementation: the
//! weights uploaded once, a device copy of each KV pool's blocks — the allocator, block ids,
//! reference counts and prefix hashes staying the host [`crate::KvPool`]'s, so block tables,
//! the prefix cache and the KV transfer protocol do not change — and the CPU's batch-invariant
//! arithmetic per row.

use crate::config::LlamaConfig;
use crate::error::{EngineError, Result};
use crate::kv::{KvDtype, KvLayout};
use crate::model::{ForwardItem, LayerHook, LlamaModel};
use crate::moe::ExpertBackend;
use std::sync::Arc;

/// What a model runs on.
pub trait Backend: Send + Sync {
    /// For logs and metrics: `cpu-avx512`, `cpu-avx2`, `cpu-scalar`.
    fn name(&self) -> String;
    /// The model's hyper-parameters.
    fn config(&self) -> &LlamaConfig;
    /// The KV block geometry this backend's attention reads.
    fn kv_layout(&self, dtype: KvDtype) -> KvLayout;
    /// Bytes of weights held on the device.
    fn weight_bytes(&self) -> usize;
    /// Where the time of the forward calls since the last call went, for devices that can
    /// say (the CUDA backend: host preparation, kernel launches, device time, waiting,
    /// copy-back); `None` for the CPU.
    fn profile(&self) -> Option<String> {
        None
    }
    /// One forward step over any mix of sequences (prefill chunks, decode tokens): appends
    /// each item's new K/V to its sequence and returns the logits each asked for.
    fn forward(&self, items: &mut [ForwardItem<'_>]) -> Result<Vec<Vec<f32>>> {
        self.forward_with(items, &mut |_, _| {})
    }
    /// [`forward`](Self::forward), calling `layer_done(l, items)` once every item's new K/V of
    /// layer `l` is in its blocks: where a KV transfer checksums and pushes each layer while
    /// later ones compute.
    fn forward_with(
        &self,
        items: &mut [ForwardItem<'_>],
        layer_done: &mut LayerHook<'_>,
    ) -> Result<Vec<Vec<f32>>>;
    /// Runs a mixture's experts on `backend` (expert workers) instead of here.
    fn set_expert_backend(&mut self, backend: Arc<dyn ExpertBackend>) -> Result<()> {
        let _ = backend;
        Err(EngineError::Experts(format!(
            "the {} backend runs every expert itself",
            self.name()
        )))
    }
    /// With an expert backend: runs a batch as `n` microbatches in flight (1 or 2).
    fn set_microbatches(&mut self, n: usize) -> Result<()> {
        if n == 1 {
            return Ok(());
        }
        Err(EngineError::Experts(format!(
            "the {} backend runs one batch at a time",
            self.name()
        )))
    }
}

impl Backend for LlamaModel {
    fn name(&self) -> String {
        format!("cpu-{}", kernels::dispatch::level().name())
    }
    fn config(&self) -> &LlamaConfig {
        &self.cfg
    }
    fn kv_layout(&self, dtype: KvDtype) -> KvLayout {
        LlamaModel::kv_layout(self, dtype)
    }
    fn weight_bytes(&self) -> usize {
        LlamaModel::weight_bytes(self)
    }
    fn forward_with(
        &self,
        items: &mut [ForwardItem<'_>],
        layer_done: &mut LayerHook<'_>,
    ) -> Result<Vec<Vec<f32>>> {
        LlamaModel::forward_with(self, items, layer_done)
    }
    fn forward(&self, items: &mut [ForwardItem<'_>]) -> Result<Vec<Vec<f32>>> {
        LlamaModel::forward(self, items)
    }
    fn set_expert_backend(&mut self, backend: Arc<dyn ExpertBackend>) -> Result<()> {
        LlamaModel::set_expert_backend(self, backend)
    }
    fn set_microbatches(&mut self, n: usize) -> Result<()> {
        LlamaModel::set_microbatches(self, n)
    }
}
