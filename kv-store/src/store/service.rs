//! The store as a service (`tandem kv-store`): the control calls of `tandem.v2.KvStore` over
//! gRPC, and the data plane — the TCP receiver of the workers' frames, writing put slabs
//! straight into their staging ([`StoreSink`]) and answering fetch frames with a lease's
//! slabs ([`StoreSource`]).

use super::pool::{self, PoolError, PoolTarget, Pools};
use super::{Lease, Limits, Shape, Stats, Store, StoreError, Tier};
use crate::Checksum;
use crate::events::BlockFeed;
use crate::tcp::{ConnId, FrameWriter, KvReceiver, ReceiverLimits, SlabSink, SlabSource, Slot};
use frontend::block::BlockHash;
use protocol::LeaseId;
use protocol::auth::ClusterSecret;
use protocol::pb;
use protocol::pb::kv_store_server::{KvStore, KvStoreServer};
use std::io;
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// The data plane's writes into put staging.
pub struct StoreSink(pub Arc<Store>);

// SAFETY: every slot is `len` bytes of a put's staging (a boxed slice that does not move),
// bound to the connection asking: the store frees it only at that connection's end or abort
// (`Store::slot`'s contract), and lends no byte of it to anyone else.
unsafe impl SlabSink for StoreSink {
    fn slots(
        &self,
        conn: ConnId,
        lease: LeaseId,
        layer: u32,
        blocks: &[u32],
        len: usize,
        out: &mut Vec<Option<Slot>>,
    ) {
        self.0.slots(lease, conn, blocks, layer as usize, len, out);
    }

    fn end(&self, conn: ConnId, lease: LeaseId, _slabs: u32, checksum: u64) {
        match self.0.put_end(lease, Some(conn), checksum) {
            Ok(n) => {
                metrics::counter!("tandem_kv_store_blocks_stored_total").increment(n as u64);
            }
            Err(e) => tracing::warn!(put = %lease, error = %e, "put refused at its end"),
        }
    }

    fn abort(&self, conn: ConnId, lease: LeaseId) {
        self.0.put_abort(lease, Some(conn));
    }
}

/// The data plane's answers to fetch frames.
pub struct StoreSource(pub Arc<Store>);

impl SlabSource for StoreSource {
    /// Sends the lease's blocks that can be read (a damaged one ends the prefix there), layer
    /// by layer, then the end frame; the lease ends with the fetch.
    fn send(&self, _conn: ConnId, lease: LeaseId, out: &mut FrameWriter<'_>) -> io::Result<()> {
        let Some((blocks, shape)) = self.0.leased(lease) else {
            return out.end(lease, 0, Checksum::new().digest());
        };
        let mut payloads = Vec::with_capacity(blocks.len());
        for h in blocks {
            match self.0.read(lease, h) {
                Ok(p) => payloads.push(p),
                Err(e) => {
                    tracing::warn!(block = %h, error = %e, "store read failed; the fetch stops before it");
                    break;
                }
            }
        }
        out.blocks(lease, &payloads, shape.slab_bytes as usize)?;
        self.0.release(lease);
        metrics::counter!("tandem_kv_store_bytes_sent_total", "transport" => "tcp")
            .increment(payloads.len() as u64 * shape.bytes() as u64);
        Ok(())
    }
}

/// The gRPC side.
pub struct StoreService {
    store: Arc<Store>,
    /// What the store holds, as block events (KV-aware routing).
    feed: Arc<BlockFeed>,
    /// The data plane, as clients reach it.
    data_addr: String,
    limits: Limits,
    /// Shared pools of this host's workers, for fetches into them.
    pools: Arc<Pools>,
    host_id: String,
}

fn tier_pb(t: Tier) -> pb::StoreTier {
    match t {
        Tier::Ram => pb::StoreTier::Ram,
        Tier::Disk => pb::StoreTier::Disk,
    }
}

fn tier(t: Tier) -> i32 {
    tier_pb(t) as i32
}

/// The store's holdings as a block feed.
fn feed(store: &Arc<Store>) -> Arc<BlockFeed> {
    let s = store.clone();
    let (feed, tx) = BlockFeed::new(Box::new(move || {
        s.held().into_iter().map(|(h, t)| (h, tier_pb(t))).collect()
    }));
    store.watch(Box::new(move |h, t| {
        let _ = tx.send((h, t.map(tier_pb)));
    }));
    feed
}

fn hashes(h: &[u64]) -> Vec<BlockHash> {
    h.iter().map(|&h| BlockHash(h)).collect()
}

fn shape(s: Option<&pb::BlockShape>) -> Result<Shape, Status> {
    let s = s.ok_or_else(|| Status::invalid_argument("missing block shape"))?;
    let shape = Shape {
        slab_bytes: s.slab_bytes,
        slabs: s.slabs,
    };
    if shape.bytes() == 0 || s.slab_bytes as usize > crate::frame::MAX_SLAB {
        return Err(Status::invalid_argument(format!("block shape {shape:?}")));
    }
    Ok(shape)
}

/// Most blocks one call may name (a 1M-token prompt in 16-token blocks).
const MAX_BLOCKS: usize = 1 << 16;

fn check_len(n: usize) -> Result<(), Status> {
    if n > MAX_BLOCKS {
        return Err(Status::invalid_argument(format!(
            "{n} blocks in one call (most {MAX_BLOCKS})"
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl KvStore for StoreService {
    async fn lookup(
        &self,
        req: Request<pb::StoreLookupRequest>,
    ) -> Result<Response<pb::StoreLookupReply>, Status> {
        let r = req.into_inner();
        check_len(r.hashes.len())?;
        let tiers = self.store.lookup(&hashes(&r.hashes));
        Ok(Response::new(pb::StoreLookupReply {
            tiers: tiers.into_iter().map(tier).collect(),
        }))
    }

    async fn lease(
        &self,
        req: Request<pb::StoreLeaseRequest>,
    ) -> Result<Response<pb::StoreLeaseReply>, Status> {
        let r = req.into_inner();
        check_len(r.hashes.len())?;
        let shape = shape(r.shape.as_ref())?;
        let max = if r.max_blocks == 0 {
            usize::MAX
        } else {
            r.max_blocks as usize
        };
        let lease = self.store.lease(&hashes(&r.hashes), shape, max);
        let (lease_id, tiers) = match lease {
            Some(Lease { id, blocks, .. }) => {
                (id.wire(), blocks.into_iter().map(|b| tier(b.1)).collect())
            }
            None => (Vec::new(), Vec::new()),
        };
        Ok(Response::new(pb::StoreLeaseReply {
            lease_id,
            tiers,
            data_addr: self.data_addr.clone(),
            lease_ms: self.limits.lease_ttl.as_millis() as u64,
        }))
    }

    async fn release(
        &self,
        req: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let id = LeaseId::from_wire(&req.into_inner().lease_id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.store.release(id);
        Ok(Response::new(pb::Empty {}))
    }

    async fn fetch_into(
        &self,
        req: Request<pb::FetchIntoRequest>,
    ) -> Result<Response<pb::FetchIntoReply>, Status> {
        let r = req.into_inner();
        check_len(r.hashes.len())?;
        let shape = shape(r.shape.as_ref())?;
        if r.host_id != self.host_id {
            return Err(Status::failed_precondition(
                "the store runs on another host",
            ));
        }
        let to = PoolTarget {
            path: r.pool_path.into(),
            blocks: r.blocks,
            tag: r.tag,
        };
        let (store, pools, hashes) = (self.store.clone(), self.pools.clone(), hashes(&r.hashes));
        let copied = tokio::task::spawn_blocking(move || {
            pool::fetch_into(&store, &pools, &hashes, shape, &to)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        match copied {
            Ok(c) => Ok(Response::new(pb::FetchIntoReply {
                tiers: c.tiers.into_iter().map(tier).collect(),
                checksum: c.checksum,
            })),
            Err(e @ PoolError::Unreachable(..)) => Err(Status::failed_precondition(e.to_string())),
            Err(e @ PoolError::Fence(_)) => Err(Status::aborted(e.to_string())),
            Err(e) => Err(Status::invalid_argument(e.to_string())),
        }
    }

    async fn put_start(
        &self,
        req: Request<pb::PutStartRequest>,
    ) -> Result<Response<pb::PutStartReply>, Status> {
        let r = req.into_inner();
        check_len(r.hashes.len())?;
        let shape = shape(r.shape.as_ref())?;
        match self.store.put_start(&hashes(&r.hashes), shape) {
            Ok(p) => Ok(Response::new(pb::PutStartReply {
                put_id: p.id.wire(),
                want: p.want,
                data_addr: self.data_addr.clone(),
            })),
            Err(e @ StoreError::Full(_)) => Err(Status::resource_exhausted(e.to_string())),
            Err(e) => Err(Status::invalid_argument(e.to_string())),
        }
    }

    type BlockEventsStream = ReceiverStream<Result<pb::BlockEvents, Status>>;

    async fn block_events(
        &self,
        _: Request<pb::Empty>,
    ) -> Result<Response<Self::BlockEventsStream>, Status> {
        Ok(Response::new(self.feed.subscribe()))
    }

    async fn stats(&self, _: Request<pb::Empty>) -> Result<Response<pb::StoreStats>, Status> {
        Ok(Response::new(stats_pb(&self.store.stats(), &self.limits)))
    }
}

fn stats_pb(s: &Stats, l: &Limits) -> pb::StoreStats {
    pb::StoreStats {
        ram_blocks: s.ram_blocks,
        ram_bytes: s.ram_bytes,
        disk_blocks: s.disk_blocks,
        disk_bytes: s.disk_bytes,
        ram_capacity_bytes: l.ram_bytes as u64,
        disk_capacity_bytes: l.disk.as_ref().map_or(0, |d| d.1),
        hits_ram: s.hits_ram,
        hits_disk: s.hits_disk,
        misses: s.misses,
        stored: s.stored,
        put_refused: s.put_refused,
        spilled: s.spilled,
        evicted_disk: s.evicted_disk,
        dropped: s.dropped,
        corrupt: s.corrupt,
        leases: s.leases,
        puts_open: s.puts_open,
    }
}

/// Publishes the store's occupancy and counters as Prometheus gauges.
pub fn record_metrics(s: &Stats) {
    for (tier, blocks, bytes) in [
        ("ram", s.ram_blocks, s.ram_bytes),
        ("disk", s.disk_blocks, s.disk_bytes),
    ] {
        metrics::gauge!("tandem_kv_store_blocks", "tier" => tier).set(blocks as f64);
        metrics::gauge!("tandem_kv_store_bytes", "tier" => tier).set(bytes as f64);
    }
    for (name, v) in [
        ("hits_ram", s.hits_ram),
        ("hits_disk", s.hits_disk),
        ("misses", s.misses),
        ("spilled", s.spilled),
        ("evicted_disk", s.evicted_disk),
        ("dropped", s.dropped),
        ("corrupt", s.corrupt),
        ("put_refused", s.put_refused),
    ] {
        metrics::gauge!("tandem_kv_store_events", "event" => name).set(v as f64);
    }
}

/// Runs a store: the gRPC service on `listener`, the data plane on `data_bind` (advertised as
/// `advertise_host:port`), both behind the cluster handshake; until `shutdown` resolves.
pub async fn serve(
    store: Arc<Store>,
    limits: Limits,
    listener: tokio::net::TcpListener,
    data_bind: &str,
    advertise_host: &str,
    secret: Option<ClusterSecret>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let receiver = KvReceiver::bind_with_source(
        data_bind,
        Arc::new(StoreSink(store.clone())),
        Some(Arc::new(StoreSource(store.clone()))),
        secret.clone(),
        ReceiverLimits::default(),
    )?;
    let data_addr = format!("{advertise_host}:{}", receiver.local_addr().port());
    tracing::info!(grpc = %listener.local_addr()?, data = %data_addr,
        ram_mib = limits.ram_bytes >> 20, disk = ?limits.disk, "KV store serving");
    let metrics_store = store.clone();
    let recorder = tokio::spawn(async move {
        loop {
            record_metrics(&metrics_store.stats());
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    });
    let svc = StoreService {
        feed: feed(&store),
        store,
        data_addr,
        limits,
        pools: Arc::default(),
        host_id: crate::shm::host_id(),
    };
    // Draining waits for open streams: the schedulers' block event streams end first.
    let feed = svc.feed.clone();
    let shutdown = async move {
        shutdown.await;
        feed.close();
    };
    let r = tonic::transport::Server::builder()
        .add_service(KvStoreServer::new(svc))
        .serve_with_incoming_shutdown(
            protocol::net::incoming(listener, secret, protocol::net::DEFAULT_MAX_CONNECTIONS),
            shutdown,
        )
        .await;
    recorder.abort();
    drop(receiver);
    r.map_err(io::Error::other)
}
