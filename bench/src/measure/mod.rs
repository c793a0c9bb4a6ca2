//! Measurements of Tandem's own parts, apart from the product (the binary's subcommands are
//! thin glue over these): each reads the model's geometry instead of assuming one.
//!
//! - [`device`]: `tandem model device-check`, a GPU backend against the CPU, and its speed.
//! - [`engine`]: `tandem model bench`, single-stream prefill and decode, like llama-bench.
//! - [`roofline`]: `tandem kernels roofline`, the kernels against the machine's peaks
//!   ([`peaks`]: the register-only peak loops and the read bandwidth).
//! - [`kv`]: `tandem kv bench`, KV transports against memcpy and a raw socket.
//! - [`store`]: `tandem kv store-bench`, the pooled store's reads against a raw socket and a
//!   sequential file read.
//! - [`moe`]: `tandem model ep-bench`, a mixture of experts in one process against its experts
//!   on expert worker processes.

pub mod device;
pub mod engine;
pub mod kv;
pub mod moe;
pub mod peaks;
pub mod roofline;
pub mod store;
