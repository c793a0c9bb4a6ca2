//! Worker discovery through etcd (cargo feature `etcd`): a worker registers its gRPC address
//! under a lease it keeps alive; the scheduler lists and watches the prefix, so a worker that
//! starts joins the routing table and one whose lease expires (it died, or lost etcd) leaves it.
//!
//! Keys: `/tandem/v2/workers/{role}/{addr}` (role `prefill` or `decode`), value: the address.

use etcd_client::{Client, EventType, GetOptions, PutOptions, WatchOptions};
use std::future::Future;
use std::time::Duration;
use tokio::sync::mpsc;

/// Every worker key starts with this.
pub const PREFIX: &str = "/tandem/v2/workers/";

pub fn key(role: &str, addr: &str) -> String {
    format!("{PREFIX}{role}/{addr}")
}

/// A membership change the watcher saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Up { role: String, addr: String },
    Down { role: String, addr: String },
}

fn parse(key: &str) -> Option<(String, String)> {
    let (role, addr) = key.strip_prefix(PREFIX)?.split_once('/')?;
    Some((role.to_string(), addr.to_string()))
}

/// Keeps `role`/`addr` registered with a `ttl` lease until `stop` resolves, then revokes it.
/// Losing etcd is not fatal: it re-registers (with a fresh lease) once etcd answers again.
pub async fn register(
    endpoints: Vec<String>,
    role: String,
    addr: String,
    ttl: Duration,
    stop: impl Future<Output = ()>,
) {
    let k = key(&role, &addr);
    let ttl_s = ttl.as_secs().max(1) as i64;
    tokio::pin!(stop);
    let mut lease_of: Option<(Client, i64)> = None;
    let session = async {
        loop {
            let attempt = async {
                let mut c = Client::connect(&endpoints, None).await?;
                let lease = c.lease_grant(ttl_s, None).await?.id();
                c.put(
                    k.clone(),
                    addr.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )
                .await?;
                tracing::info!(key = %k, lease, "registered in etcd");
                lease_of = Some((c.clone(), lease));
                let (mut keeper, mut acks) = c.lease_keep_alive(lease).await?;
                loop {
                    keeper.keep_alive().await?;
                    match acks.message().await? {
                        Some(r) if r.ttl() > 0 => {}
                        _ => {
                            return Err(etcd_client::Error::LeaseKeepAliveError(
                                "lease lost".into(),
                            ));
                        }
                    }
                    tokio::time::sleep(ttl / 3).await;
                }
                #[allow(unreachable_code)]
                Ok::<(), etcd_client::Error>(())
            };
            if let Err(e) = attempt.await {
                tracing::warn!(error = %e, key = %k, "etcd registration lost; retrying");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    tokio::select! {
        _ = &mut stop => {}
        _ = session => {}
    }
    if let Some((mut c, lease)) = lease_of {
        let _ = c.lease_revoke(lease).await;
    }
}

/// Sends the current members as `Up`, then every change, until `changes` closes. Reconnects
/// when etcd goes away, reporting what changed meanwhile.
pub async fn watch(endpoints: Vec<String>, changes: mpsc::UnboundedSender<Change>) {
    let mut known: std::collections::BTreeSet<(String, String)> = Default::default();
    while !changes.is_closed() {
        let session = async {
            let mut c = Client::connect(&endpoints, None).await?;
            let now = c.get(PREFIX, Some(GetOptions::new().with_prefix())).await?;
            let rev = now.header().map(|h| h.revision()).unwrap_or(0);
            let current: std::collections::BTreeSet<(String, String)> = now
                .kvs()
                .iter()
                .filter_map(|kv| kv.key_str().ok().and_then(parse))
                .collect();
            for (role, addr) in known.difference(&current) {
                let _ = changes.send(Change::Down {
                    role: role.clone(),
                    addr: addr.clone(),
                });
            }
            for (role, addr) in current.difference(&known) {
                let _ = changes.send(Change::Up {
                    role: role.clone(),
                    addr: addr.clone(),
                });
            }
            known = current;
            let mut stream = c
                .watch(
                    PREFIX,
                    Some(
                        WatchOptions::new()
                            .with_prefix()
                            .with_start_revision(rev + 1),
                    ),
                )
                .await?;
            while let Some(resp) = stream.message().await? {
                for ev in resp.events() {
                    let Some((role, addr)) =
                        ev.kv().and_then(|kv| kv.key_str().ok()).and_then(parse)
                    else {
                        continue;
                    };
                    let change = match ev.event_type() {
                        EventType::Put => {
                            if !known.insert((role.clone(), addr.clone())) {
                                continue;
                            }
                            Change::Up { role, addr }
                        }
                        EventType::Delete => {
                            known.remove(&(role.clone(), addr.clone()));
                            Change::Down { role, addr }
                        }
                    };
                    if changes.send(change).is_err() {
                        return Ok(());
                    }
                }
            }
            Ok::<(), etcd_client::Error>(())
        };
        if let Err(e) = session.await {
            tracing::warn!(error = %e, "etcd watch lost; reconnecting");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let k = key("decode", "10.0.0.7:50061");
        assert_eq!(k, "/tandem/v2/workers/decode/10.0.0.7:50061");
        assert_eq!(parse(&k), Some(("decode".into(), "10.0.0.7:50061".into())));
        assert_eq!(parse("/other/decode/x"), None);
    }
}
