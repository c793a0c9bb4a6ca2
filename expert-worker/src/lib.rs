//! Expert parallelism: a mixture-of-experts model's experts spread over `tandem expert`
//! processes, reached by the prefill and decode workers once per layer per step.
//!
//! The prefill or decode worker runs attention and every layer's router; each layer's routed
//! rows go to the expert workers holding their experts ([`client::RemoteExperts`], an
//! `engine::moe::ExpertBackend`), which compute them ([`server::ExpertServer`] over an
//! `engine::moe::shard::ExpertShard`) and send the outputs back; the worker combines them in
//! slot order. The kernels are batch-invariant and the combine order fixed, so the tokens are
//! bit-identical to one process's, whatever the placement.
//!
//! # Layout
//! - [`wire`]: the expert plane's messages (after the cluster handshake).
//! - [`server`]: the expert worker.
//! - [`client`]: the prefill and decode workers' side.
//! - [`eplb`]: placing experts, with replicas, by their load.

pub mod client;
pub mod eplb;
pub mod server;
pub mod wire;

pub use client::{EpStats, EplbConfig, Expect, RemoteExperts};
pub use server::ExpertServer;
