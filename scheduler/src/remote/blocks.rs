//! Following where KV blocks are: each decode worker's prefix cache and the pooled store's
//! tiers, from their block event streams (`BlockEvents`), for KV-aware routing
//! ([`super::kv_route`]). A stream that breaks is reopened (a worker that restarted starts
//! with a snapshot); until then what it said is forgotten, so routing never counts on blocks
//! that may be gone.

use frontend::block::BlockHash;
use protocol::blocks::Holdings;
use protocol::pb;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio_stream::StreamExt;

/// How long to wait before reopening a broken stream.
const RETRY: Duration = Duration::from_secs(1);

/// What one holder holds, as its stream said last.
#[derive(Default)]
pub struct Followed(Mutex<Holdings>);

impl Followed {
    pub fn prefix(&self, hashes: &[BlockHash]) -> usize {
        self.0.lock().expect("holdings poisoned").prefix(hashes)
    }

    pub fn tiers(&self, hashes: &[BlockHash]) -> Vec<pb::StoreTier> {
        self.0.lock().expect("holdings poisoned").tiers(hashes)
    }

    fn apply(&self, m: &pb::BlockEvents) {
        self.0.lock().expect("holdings poisoned").apply(m);
    }

    fn forget(&self) {
        self.0.lock().expect("holdings poisoned").0.clear();
    }
}

/// Follows one holder for as long as `alive` holds (and `followed` exists): `open` opens its
/// stream.
pub fn follow<F, Fut, S>(followed: Weak<Followed>, what: String, open: F)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<tonic::Response<S>, tonic::Status>> + Send,
    S: tokio_stream::Stream<Item = Result<pb::BlockEvents, tonic::Status>> + Send + Unpin,
{
    tokio::spawn(async move {
        loop {
            if followed.upgrade().is_none() {
                return;
            }
            match open().await {
                Ok(stream) => {
                    let mut stream = stream.into_inner();
                    while let Some(m) = stream.next().await {
                        let Some(f) = followed.upgrade() else { return };
                        match m {
                            Ok(m) => f.apply(&m),
                            Err(_) => break,
                        }
                    }
                    tracing::debug!(holder = %what, "block events ended; reopening");
                }
                Err(e) => tracing::debug!(holder = %what, error = %e.message(), "block events"),
            }
            if let Some(f) = followed.upgrade() {
                f.forget();
            }
            tokio::time::sleep(RETRY).await;
        }
    });
}

/// Follows a decode worker's prefix cache.
pub fn follow_decode(
    followed: &Arc<Followed>,
    addr: &str,
    client: pb::decode_worker_client::DecodeWorkerClient<tonic::transport::Channel>,
) {
    follow(Arc::downgrade(followed), addr.to_string(), move || {
        let mut c = client.clone();
        async move { c.block_events(pb::Empty {}).await }
    });
}

/// Follows the store's tiers.
pub fn follow_store(
    followed: &Arc<Followed>,
    addr: &str,
    secret: Option<protocol::auth::ClusterSecret>,
) -> Result<(), String> {
    let client = pb::kv_store_client::KvStoreClient::new(protocol::net::channel(addr, secret)?);
    follow(Arc::downgrade(followed), addr.to_string(), move || {
        let mut c = client.clone();
        async move { c.block_events(pb::Empty {}).await }
    });
    Ok(())
}
