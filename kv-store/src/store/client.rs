//! A worker's end of the store: the control calls over gRPC, the blocks over the data plane
//! (a pool of idle connections to the store's receiver). Every call is bounded in time, and
//! every failure is the caller's cue to compute the KV instead — never a request's error.

use super::pool::PoolTarget;
use super::{Shape, Tier};
use crate::Checksum;
use crate::tcp::{KvSender, SlabSink};
use frontend::block::BlockHash;
use protocol::LeaseId;
use protocol::auth::ClusterSecret;
use protocol::pb;
use protocol::pb::kv_store_client::KvStoreClient;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::Channel;

/// How long a control call may take before the caller gives up on the store.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a fetch's slabs may stall.
pub const FETCH_STALL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("store call: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("store call timed out")]
    Timeout,
    #[error("store data plane: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Protocol(String),
}

/// What a fetch brought: `blocks` blocks (a prefix of those asked) written into the sink, and
/// the store's checksum over their slabs in `(layer, block)` order, for the caller to check
/// against what landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fetched {
    pub blocks: usize,
    pub checksum: u64,
}

/// A connection to one store.
#[derive(Clone)]
pub struct StoreClient {
    grpc: KvStoreClient<Channel>,
    secret: Option<ClusterSecret>,
    idle: Arc<Mutex<Vec<(String, KvSender)>>>,
    /// The store said it cannot map this host's pools (another host or `/dev/shm`).
    no_shm: Arc<AtomicBool>,
}

async fn timed<T>(
    f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, ClientError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(r) => Ok(r?.into_inner()),
        Err(_) => Err(ClientError::Timeout),
    }
}

fn shape_pb(s: Shape) -> Option<pb::BlockShape> {
    Some(pb::BlockShape {
        slab_bytes: s.slab_bytes,
        slabs: s.slabs,
    })
}

fn tier(t: i32) -> Option<Tier> {
    match pb::StoreTier::try_from(t) {
        Ok(pb::StoreTier::Ram) => Some(Tier::Ram),
        Ok(pb::StoreTier::Disk) => Some(Tier::Disk),
        _ => None,
    }
}

impl StoreClient {
    /// A client of the store whose gRPC service is at `addr` (connects lazily).
    pub fn new(addr: &str, secret: Option<ClusterSecret>) -> Result<StoreClient, String> {
        Ok(StoreClient {
            grpc: KvStoreClient::new(protocol::net::channel(addr, secret.clone())?),
            secret,
            idle: Arc::default(),
            no_shm: Arc::default(),
        })
    }

    /// Tiers of the longest prefix of `hashes` the store holds.
    pub async fn lookup(&self, hashes: &[BlockHash]) -> Result<Vec<Tier>, ClientError> {
        let r = timed(self.grpc.clone().lookup(pb::StoreLookupRequest {
            hashes: hashes.iter().map(|h| h.0).collect(),
        }))
        .await?;
        Ok(r.tiers.into_iter().filter_map(tier).collect())
    }

    /// Fetches the longest held prefix of `hashes` (blocks of `shape`) into `sink`: block
    /// index `i` of the frames is `hashes[i]`. Blocking I/O runs off the async threads.
    pub async fn fetch(
        &self,
        hashes: &[BlockHash],
        shape: Shape,
        sink: Arc<dyn SlabSink>,
    ) -> Result<(Fetched, Vec<Tier>), ClientError> {
        let r = timed(self.grpc.clone().lease(pb::StoreLeaseRequest {
            hashes: hashes.iter().map(|h| h.0).collect(),
            shape: shape_pb(shape),
            max_blocks: hashes.len() as u32,
        }))
        .await?;
        if r.lease_id.is_empty() {
            return Ok((
                Fetched {
                    blocks: 0,
                    checksum: Checksum::new().digest(),
                },
                Vec::new(),
            ));
        }
        let lease =
            LeaseId::from_wire(&r.lease_id).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let tiers: Vec<Tier> = r.tiers.into_iter().filter_map(tier).collect();
        let this = self.clone();
        let addr = r.data_addr;
        let got = tokio::task::spawn_blocking(move || {
            this.on_connection(&addr, |conn| {
                conn.set_read_timeout(Some(FETCH_STALL))?;
                conn.fetch(lease, &*sink)
            })
        })
        .await
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let (slabs, checksum) = match got {
            Ok(g) => g,
            Err(e) => {
                let _ = timed(self.grpc.clone().release(pb::ReleaseRequest {
                    lease_id: lease.wire(),
                }))
                .await;
                return Err(e);
            }
        };
        if shape.slabs == 0
            || slabs % shape.slabs != 0
            || (slabs / shape.slabs) as usize > tiers.len()
        {
            return Err(ClientError::Protocol(format!(
                "{slabs} slabs for blocks of {shape:?}"
            )));
        }
        let blocks = (slabs / shape.slabs) as usize;
        Ok((Fetched { blocks, checksum }, tiers[..blocks].to_vec()))
    }

    /// Whether fetches into a shared pool may work: the store has not said it cannot reach
    /// this worker's pools.
    pub fn shm_usable(&self) -> bool {
        !self.no_shm.load(Ordering::Relaxed)
    }

    /// Fetches the longest held prefix of `hashes` (blocks of `shape`) straight into a shared
    /// pool on the store's host: the store copies hash `i`'s bytes into pool block
    /// `to.blocks[i]`, which the caller lent through the pool's fence under `to.tag` and takes
    /// back after this returns. A store that cannot map the pool says so once
    /// ([`shm_usable`](Self::shm_usable) turns false; fetch over the data plane instead).
    pub async fn fetch_into(
        &self,
        hashes: &[BlockHash],
        shape: Shape,
        to: &PoolTarget,
    ) -> Result<(Fetched, Vec<Tier>), ClientError> {
        let mut grpc = self.grpc.clone();
        let call = grpc.fetch_into(pb::FetchIntoRequest {
            hashes: hashes.iter().map(|h| h.0).collect(),
            shape: shape_pb(shape),
            pool_path: to.path.to_string_lossy().into_owned(),
            host_id: crate::shm::host_id(),
            blocks: to.blocks.clone(),
            tag: to.tag,
        });
        let r = match tokio::time::timeout(FETCH_STALL, call).await {
            Err(_) => return Err(ClientError::Timeout),
            Ok(Err(s)) => {
                if s.code() == tonic::Code::FailedPrecondition {
                    tracing::info!(
                        reason = s.message(),
                        "the store cannot reach this worker's shared pool; fetching over TCP"
                    );
                    self.no_shm.store(true, Ordering::Relaxed);
                }
                return Err(s.into());
            }
            Ok(Ok(r)) => r.into_inner(),
        };
        let tiers: Vec<Tier> = r.tiers.iter().filter_map(|&t| tier(t)).collect();
        if tiers.len() != r.tiers.len() || tiers.len() > hashes.len() {
            return Err(ClientError::Protocol(format!(
                "{} tiers for {} blocks asked",
                r.tiers.len(),
                hashes.len()
            )));
        }
        Ok((
            Fetched {
                blocks: tiers.len(),
                checksum: r.checksum,
            },
            tiers,
        ))
    }

    /// Puts blocks: `hashes[i]`'s payload is `payloads[i]` (layer-major slabs of `shape`). Only
    /// the blocks the store lacks travel. Returns how many were sent (the store publishes them
    /// once their end frame's checksum matches).
    pub async fn put(
        &self,
        hashes: &[BlockHash],
        shape: Shape,
        payloads: Vec<Arc<[u8]>>,
    ) -> Result<usize, ClientError> {
        assert_eq!(hashes.len(), payloads.len());
        let r = timed(self.grpc.clone().put_start(pb::PutStartRequest {
            hashes: hashes.iter().map(|h| h.0).collect(),
            shape: shape_pb(shape),
        }))
        .await?;
        let put =
            LeaseId::from_wire(&r.put_id).map_err(|e| ClientError::Protocol(e.to_string()))?;
        if r.want.len() != payloads.len() {
            return Err(ClientError::Protocol(
                "a put's answer of another length".into(),
            ));
        }
        let wanted: Vec<Arc<[u8]>> = payloads
            .into_iter()
            .zip(&r.want)
            .filter(|(_, w)| **w)
            .map(|(p, _)| p)
            .collect();
        let n = wanted.len();
        let this = self.clone();
        let addr = r.data_addr;
        tokio::task::spawn_blocking(move || {
            this.on_connection(&addr, |conn| {
                conn.blocks(put, &wanted, shape.slab_bytes as usize)
            })
        })
        .await
        .map_err(|e| ClientError::Protocol(e.to_string()))??;
        Ok(n)
    }

    pub async fn stats(&self) -> Result<pb::StoreStats, ClientError> {
        timed(self.grpc.clone().stats(pb::Empty {})).await
    }

    /// Runs `f` on an idle data-plane connection to `addr` — again on a new one when an idle
    /// one fails (the store may have restarted since) — and keeps the connection for reuse
    /// when `f` succeeds.
    fn on_connection<T>(
        &self,
        addr: &str,
        mut f: impl FnMut(&mut KvSender) -> std::io::Result<T>,
    ) -> Result<T, ClientError> {
        let idle = {
            let mut idle = self.idle.lock().expect("store connections poisoned");
            idle.iter()
                .position(|(a, _)| a == addr)
                .map(|i| idle.swap_remove(i).1)
        };
        if let Some(mut c) = idle
            && let Ok(v) = f(&mut c)
        {
            self.give_back(addr, c);
            return Ok(v);
        }
        let mut c = KvSender::connect(addr, self.secret.as_ref())?;
        let v = f(&mut c)?;
        self.give_back(addr, c);
        Ok(v)
    }

    fn give_back(&self, addr: &str, c: KvSender) {
        let mut idle = self.idle.lock().expect("store connections poisoned");
        if idle.len() < 8 {
            idle.push((addr.to_string(), c));
        }
    }
}
