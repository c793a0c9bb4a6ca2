//! A worker's end of the store: the control calls over gRPC, the blocks over the data plane
//! (a pool of idle connections to the store's receiver). Every call is bounded in time, and
//! every failure is the caller's cue to compute the KV instead — never a request's error.

use super::get::{GetReply, GetRequest, GetStatus};
use super::pool::PoolTarget;
use super::{Shape, Tier};
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
    /// The store cannot reach this worker's shared pool: fetch over the data plane.
    #[error("the store cannot copy into this pool: {0}")]
    Unreachable(String),
}

/// A connection to one store.
#[derive(Clone)]
pub struct StoreClient {
    grpc: KvStoreClient<Channel>,
    secret: Option<ClusterSecret>,
    idle: Arc<Mutex<Vec<(String, KvSender)>>>,
    /// The store said it cannot map this host's pools (another host or `/dev/shm`).
    no_shm: Arc<AtomicBool>,
    /// The store's data plane, as its last answer gave it.
    data_addr: Arc<Mutex<Option<String>>>,
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

impl std::fmt::Debug for StoreClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreClient")
            .field("authenticated", &self.secret.is_some())
            .finish_non_exhaustive()
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
            data_addr: Arc::default(),
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

    /// Fetches the longest held prefix of `hashes` (blocks of `shape`) into `sink` with one
    /// get on the data plane: block index `i` of the frames is `hashes[i]`. Returns the
    /// blocks' tiers and CRC-32s (check what landed against them: [`crate::block_crcs`]).
    pub async fn fetch(
        &self,
        hashes: &[BlockHash],
        shape: Shape,
        sink: Arc<dyn SlabSink>,
    ) -> Result<(Vec<Tier>, Vec<u32>), ClientError> {
        let body = GetRequest {
            shape,
            hashes: hashes.to_vec(),
            into: None,
        }
        .encode();
        let (r, ended) = self.get(body, Some(sink)).await?;
        let (slabs, _) = ended.ok_or_else(|| ClientError::Protocol("no end frame".into()))?;
        let n = r.tiers.len();
        if r.status != GetStatus::Ok
            || n > hashes.len()
            || r.crcs.len() != n
            || slabs as u64 != n as u64 * shape.slabs as u64
        {
            return Err(ClientError::Protocol(format!(
                "{slabs} slabs and {} CRCs for {n} blocks of {shape:?} ({:?})",
                r.crcs.len(),
                r.status
            )));
        }
        Ok((r.tiers, r.crcs))
    }

    /// Whether fetches into a shared pool may work: the store has not said it cannot reach
    /// this worker's pools.
    pub fn shm_usable(&self) -> bool {
        !self.no_shm.load(Ordering::Relaxed)
    }

    /// Fetches the longest held prefix of `hashes` (blocks of `shape`) straight into a shared
    /// pool on the store's host: the store copies hash `i`'s bytes into pool block
    /// `to.blocks[i]`, which the caller lent through the pool's fence under `to.tag` and takes
    /// back after this returns. Returns the copied blocks' tiers and CRC-32s (check the copies
    /// against them: [`crate::block_crcs`]). A store that cannot map the pool says so
    /// ([`ClientError::Unreachable`]) and [`shm_usable`](Self::shm_usable) turns false: fetch
    /// over the data plane instead.
    pub async fn fetch_into(
        &self,
        hashes: &[BlockHash],
        shape: Shape,
        to: &PoolTarget,
    ) -> Result<(Vec<Tier>, Vec<u32>), ClientError> {
        let body = GetRequest {
            shape,
            hashes: hashes.to_vec(),
            into: Some((to.clone(), crate::shm::host_id())),
        }
        .encode();
        let (r, _) = self.get(body, None).await?;
        match r.status {
            GetStatus::Ok if r.tiers.len() <= hashes.len() && r.crcs.len() == r.tiers.len() => {
                Ok((r.tiers, r.crcs))
            }
            GetStatus::Ok => Err(ClientError::Protocol(format!(
                "{} blocks ({} CRCs) for {} asked",
                r.tiers.len(),
                r.crcs.len(),
                hashes.len()
            ))),
            GetStatus::Unreachable => {
                tracing::info!(reason = %r.message, "the store cannot reach this worker's shared pool; fetching over TCP");
                self.no_shm.store(true, Ordering::Relaxed);
                Err(ClientError::Unreachable(r.message))
            }
            GetStatus::Refused => Err(ClientError::Protocol(r.message)),
        }
    }

    /// One get on the data plane (its address asked once, and again after a failure).
    async fn get(
        &self,
        body: Vec<u8>,
        sink: Option<Arc<dyn SlabSink>>,
    ) -> Result<(GetReply, Option<(u32, u64)>), ClientError> {
        let known = self
            .data_addr
            .lock()
            .expect("store address poisoned")
            .clone();
        let addr = match known {
            Some(a) => a,
            None => {
                let a = self.stats().await?.data_addr;
                *self.data_addr.lock().expect("store address poisoned") = Some(a.clone());
                a
            }
        };
        let this = self.clone();
        let a = addr.clone();
        let get = move || {
            this.on_connection(&a, |conn| {
                conn.set_read_timeout(Some(FETCH_STALL))?;
                conn.get(protocol::LeaseId::random(), &body, sink.as_deref())
            })
        };
        // Blocking socket I/O: in place where the runtime can hand this thread's other tasks
        // on (no hop to another thread and back: ~0.1–0.2 ms a get on this machine), else on
        // the blocking pool.
        let got = match tokio::runtime::Handle::current().runtime_flavor() {
            tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(get),
            _ => tokio::task::spawn_blocking(get)
                .await
                .map_err(|e| ClientError::Protocol(e.to_string()))?,
        };
        let (reply, ended) = got.inspect_err(|_| {
            // The store may have restarted elsewhere: ask for its address next time.
            *self.data_addr.lock().expect("store address poisoned") = None;
        })?;
        let reply = GetReply::decode(&reply)?;
        Ok((reply, ended))
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
        *self.data_addr.lock().expect("store address poisoned") = Some(addr.clone());
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
