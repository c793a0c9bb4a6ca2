//! The pooled KV store's flags: the store itself (`tandem kv-store`), and how workers use it.

use super::{ClusterArgs, TelemetryArgs, flag, opt, switch};
use clap::Args;
use std::path::PathBuf;

/// Default gRPC address of `tandem kv-store`.
pub const DEFAULT_STORE_LISTEN: &str = "127.0.0.1:50071";
/// Default RAM tier, in MiB.
pub const DEFAULT_STORE_RAM_MIB: usize = 1024;
/// Default disk tier, in GiB (used only with a directory).
pub const DEFAULT_STORE_DISK_GIB: f64 = 8.0;

/// `tandem kv-store`.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct KvStoreArgs {
    /// gRPC address to listen on.
    #[arg(long, default_value = DEFAULT_STORE_LISTEN)]
    pub listen: String,
    /// The KV data plane's address (port 0: any free port; default: the --listen host, any port).
    #[arg(long)]
    pub data_listen: Option<String>,
    #[command(flatten)]
    pub tiers: StoreTierArgs,
    /// Serve /live, /health and /metrics over plain HTTP on this address (off by default).
    #[arg(long, env = "TANDEM_STATUS_LISTEN")]
    pub status_listen: Option<String>,
    /// The host workers reach this store at, when it is not the --listen host (in a pod: its IP).
    #[arg(long, env = "TANDEM_ADVERTISE_HOST")]
    pub advertise_host: Option<String>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// The store's tiers (the same flags on `tandem kv-store` and, prefixed, on `tandem up`).
#[derive(Args, Debug, Clone, PartialEq)]
pub struct StoreTierArgs {
    /// RAM tier: MiB of KV blocks held in memory.
    #[arg(long, default_value_t = DEFAULT_STORE_RAM_MIB)]
    pub ram_mib: usize,
    /// Disk tier: a directory for blocks spilled from RAM (kept across restarts); none: RAM only.
    #[arg(long)]
    pub disk_dir: Option<PathBuf>,
    /// Disk tier: GiB of blocks it may hold.
    #[arg(long, default_value_t = DEFAULT_STORE_DISK_GIB)]
    pub disk_gib: f64,
}

impl StoreTierArgs {
    pub fn limits(&self) -> kv_store::store::Limits {
        kv_store::store::Limits {
            ram_bytes: self.ram_mib << 20,
            disk: self
                .disk_dir
                .clone()
                .map(|d| (d, (self.disk_gib * (1u64 << 30) as f64) as u64)),
            ..Default::default()
        }
    }

    fn to_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        flag(&mut a, "ram-mib", self.ram_mib);
        opt(
            &mut a,
            "disk-dir",
            self.disk_dir.as_ref().map(|d| d.display()),
        );
        flag(&mut a, "disk-gib", self.disk_gib);
        a
    }
}

impl KvStoreArgs {
    /// The command line that parses back to these values.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec!["kv-store".to_string()];
        flag(&mut a, "listen", &self.listen);
        opt(&mut a, "data-listen", self.data_listen.as_ref());
        a.extend(self.tiers.to_args());
        opt(&mut a, "status-listen", self.status_listen.as_ref());
        opt(&mut a, "advertise-host", self.advertise_host.as_ref());
        a.extend(self.cluster.to_args());
        a.extend(self.telemetry.to_args());
        a
    }
}

/// How a decode worker uses a store.
#[derive(Args, Debug, Clone, PartialEq, Default)]
pub struct StoreUseArgs {
    /// The pooled KV store's gRPC address (`tandem kv-store`): prompts' prefixes are fetched from it before prefilling, and blocks the prefix cache evicts are written back to it.
    #[arg(long, env = "TANDEM_KV_STORE_ADDR")]
    pub kv_store_addr: Option<String>,
    /// Also write every finished sequence's full blocks to the store (not only those evicted).
    #[arg(long)]
    pub kv_store_write_through: bool,
}

impl StoreUseArgs {
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        opt(&mut a, "kv-store-addr", self.kv_store_addr.as_ref());
        switch(
            &mut a,
            "kv-store-write-through",
            self.kv_store_write_through,
        );
        a
    }
}

/// `tandem up`'s store: one supervised `tandem kv-store` child.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct UpStoreArgs {
    /// Run a pooled KV store beside the workers (one `tandem kv-store` child): prefixes computed once are reused by every decode worker.
    #[arg(long)]
    pub kv_store: bool,
    /// The store's RAM tier, MiB.
    #[arg(long, default_value_t = DEFAULT_STORE_RAM_MIB)]
    pub kv_store_ram_mib: usize,
    /// The store's disk tier directory (none: RAM only).
    #[arg(long)]
    pub kv_store_disk_dir: Option<PathBuf>,
    /// The store's disk tier, GiB.
    #[arg(long, default_value_t = DEFAULT_STORE_DISK_GIB)]
    pub kv_store_disk_gib: f64,
    /// With --kv-store: decode workers write every finished sequence's full blocks, not only evicted ones.
    #[arg(long)]
    pub kv_store_write_through: bool,
}

impl UpStoreArgs {
    pub fn tiers(&self) -> StoreTierArgs {
        StoreTierArgs {
            ram_mib: self.kv_store_ram_mib,
            disk_dir: self.kv_store_disk_dir.clone(),
            disk_gib: self.kv_store_disk_gib,
        }
    }
}
