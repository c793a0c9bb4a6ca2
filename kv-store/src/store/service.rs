//! The store as a service (`tandem kv-store`): the control calls of `tandem.v2.KvStore` over
//! gRPC, and the data plane — the TCP receiver of the workers' frames, writing put slabs
//! straight into their staging ([`StoreSink`]) and answering get frames ([`StoreSource`]).

use super::pool::Pools;
use super::{Limits, Shape, Stats, Store, StoreError, Tier};
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

/// The data plane's answers to get frames (`super::get`).
pub struct StoreSource {
    pub store: Arc<Store>,
    /// Shared pools of this host's workers, for gets into them.
    pub pools: Pools,
    pub host_id: String,
}

impl SlabSource for StoreSource {
    fn get(
        &self,
        _conn: ConnId,
        id: LeaseId,
        body: &[u8],
        out: &mut FrameWriter<'_>,
    ) -> io::Result<()> {
        super::get::serve(&self.store, &self.pools, &self.host_id, id, body, out)
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
        Ok(Response::new(pb::StoreStats {
            data_addr: self.data_addr.clone(),
            ..stats_pb(&self.store.stats(), &self.limits)
        }))
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
        data_addr: String::new(),
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
        Some(Arc::new(StoreSource {
            store: store.clone(),
            pools: Pools::default(),
            host_id: crate::shm::host_id(),
        })),
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
