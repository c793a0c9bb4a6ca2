//! Worker discovery through etcd (cargo feature `etcd`): a worker registers its gRPC address
//! and model fingerprint under a lease it keeps alive; the scheduler lists and watches the
//! prefix, so a worker of its model that starts joins the routing table, one of another model
//! is never dialled, and one whose lease expires (it died, or lost etcd) leaves it.
//!
//! Keys: `/tandem/v2/workers/{role}/{addr}` (role `prefill` or `decode`); value: an [`Entry`]
//! as JSON, `{"addr":"10.0.0.7:50061","fingerprint":"00c0ffee00c0ffee"}` (the fingerprint in
//! hex: JSON numbers lose integers past 2^53 in many readers).
//!
//! etcd itself can be locked down ([`EtcdConfig`]): a user and password (etcd's RBAC, with
//! `auth enable`), and TLS with a CA and optionally a client certificate (etcd's
//! `--client-cert-auth`). Whoever may write the prefix can list workers, so on a shared etcd
//! grant Tandem's user the prefix alone; the workers still prove the cluster secret on every
//! connection, so an entry written by someone else can only name an address the scheduler
//! then fails to authenticate.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Every worker key starts with this.
pub const PREFIX: &str = "/tandem/v2/workers/";

/// Environment variable naming the file that holds the etcd password.
pub const ETCD_PASSWORD_FILE_ENV: &str = "TANDEM_ETCD_PASSWORD_FILE";

pub fn key(role: &str, addr: &str) -> String {
    format!("{PREFIX}{role}/{addr}")
}

/// What a worker's registration says of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Its gRPC address, `host:port`.
    pub addr: String,
    /// Its engine's fingerprint (`Frontend::fingerprint`, hex).
    #[serde(with = "hex_u64")]
    pub fingerprint: u64,
}

impl Entry {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an entry serializes")
    }

    /// The entry an etcd value holds; `None` for anything else (a value written by an older
    /// Tandem, or by hand).
    pub fn parse(value: &[u8]) -> Option<Entry> {
        serde_json::from_slice(value).ok()
    }
}

mod hex_u64 {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:016x}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() != 16 {
            return Err(D::Error::custom("a fingerprint is 16 hex digits"));
        }
        u64::from_str_radix(&s, 16).map_err(D::Error::custom)
    }
}

/// How to reach etcd.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EtcdConfig {
    /// Client URLs (`http://host:2379`, or `https://…` with [`tls`](Self::tls)); empty: no
    /// discovery.
    pub endpoints: Vec<String>,
    /// User and password (etcd's RBAC).
    pub user: Option<(String, String)>,
    /// TLS to etcd.
    pub tls: Option<EtcdTls>,
}

/// TLS to etcd: the CA that signed its certificate, and a client certificate when etcd
/// requires one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EtcdTls {
    pub ca_file: PathBuf,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// A problem with the etcd settings, found before connecting.
#[derive(Debug, thiserror::Error)]
pub enum EtcdConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the etcd password file {0} is empty")]
    EmptyPassword(String),
    #[error("a client certificate needs its key, and a key its certificate")]
    HalfIdentity,
}

/// Reads the password file: its first line, without the line break.
pub fn read_password(path: &std::path::Path) -> Result<String, EtcdConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| EtcdConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let pw = text.lines().next().unwrap_or("").to_string();
    if pw.is_empty() {
        return Err(EtcdConfigError::EmptyPassword(path.display().to_string()));
    }
    Ok(pw)
}

/// A membership change the watcher saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Up { role: String, entry: Entry },
    Down { role: String, addr: String },
}

#[cfg(any(feature = "etcd", test))]
fn parse(key: &str) -> Option<(String, String)> {
    let (role, addr) = key.strip_prefix(PREFIX)?.split_once('/')?;
    Some((role.to_string(), addr.to_string()))
}

#[cfg(feature = "etcd")]
pub use client::{register, watch};
/// The etcd client library this module speaks through (for tools and tests that administer
/// etcd).
#[cfg(feature = "etcd")]
pub use etcd_client;

#[cfg(feature = "etcd")]
mod client {
    use super::*;
    use etcd_client::{Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions};
    use std::collections::BTreeMap;
    use std::future::Future;
    use std::time::Duration;
    use tokio::sync::mpsc;

    impl EtcdConfig {
        /// Connects with the configured credentials and TLS.
        pub(super) async fn connect(&self) -> Result<Client, etcd_client::Error> {
            let mut o = ConnectOptions::new().with_connect_timeout(Duration::from_secs(5));
            if let Some((user, pw)) = &self.user {
                o = o.with_user(user.clone(), pw.clone());
            }
            if let Some(t) = &self.tls {
                o = o.with_tls(
                    t.options()
                        .map_err(|e| etcd_client::Error::InvalidArgs(e.to_string()))?,
                );
            }
            Client::connect(&self.endpoints, Some(o)).await
        }
    }

    impl EtcdTls {
        fn options(&self) -> Result<etcd_client::TlsOptions, EtcdConfigError> {
            let read = |p: &PathBuf| {
                std::fs::read(p).map_err(|source| EtcdConfigError::Read {
                    path: p.display().to_string(),
                    source,
                })
            };
            let mut t = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read(&self.ca_file)?));
            match (&self.cert_file, &self.key_file) {
                (Some(c), Some(k)) => {
                    t = t.identity(etcd_client::Identity::from_pem(read(c)?, read(k)?));
                }
                (None, None) => {}
                _ => return Err(EtcdConfigError::HalfIdentity),
            }
            Ok(t)
        }
    }

    /// Keeps `role`/`entry` registered with a `ttl` lease until `stop` resolves, then revokes
    /// it. Losing etcd is not fatal: it re-registers (with a fresh lease) once etcd answers
    /// again.
    pub async fn register(
        etcd: EtcdConfig,
        role: String,
        entry: Entry,
        ttl: Duration,
        stop: impl Future<Output = ()>,
    ) {
        let k = key(&role, &entry.addr);
        let value = entry.to_json();
        let ttl_s = ttl.as_secs().max(1) as i64;
        tokio::pin!(stop);
        let mut lease_of: Option<(Client, i64)> = None;
        let session = async {
            loop {
                let attempt = async {
                    let mut c = etcd.connect().await?;
                    let lease = c.lease_grant(ttl_s, None).await?.id();
                    c.put(
                        k.clone(),
                        value.clone(),
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

    /// A registration as the watcher reads it: `None` when the value is not an [`Entry`] for
    /// the address its key names (logged, and never dialled).
    fn member(key: &str, value: &[u8]) -> Option<((String, String), Entry)> {
        let (role, addr) = parse(key)?;
        match Entry::parse(value) {
            Some(e) if e.addr == addr => Some(((role, addr), e)),
            _ => {
                tracing::warn!(key, "ignoring an etcd entry that is not a Tandem worker's");
                None
            }
        }
    }

    /// Sends the current members as `Up`, then every change, until `changes` closes.
    /// Reconnects when etcd goes away, reporting what changed meanwhile. An entry whose value
    /// changes (a worker restarted on the same address with another model) is sent as `Down`
    /// then `Up`.
    pub async fn watch(etcd: EtcdConfig, changes: mpsc::UnboundedSender<Change>) {
        type Members = BTreeMap<(String, String), Entry>;
        let mut known: Members = Default::default();
        // Moves `known` to `now`, sending what differs.
        let sync = |known: &mut Members, now: Members| {
            for ((role, addr), e) in known.iter() {
                if now.get(&(role.clone(), addr.clone())) != Some(e) {
                    let _ = changes.send(Change::Down {
                        role: role.clone(),
                        addr: addr.clone(),
                    });
                }
            }
            for ((role, addr), e) in &now {
                if known.get(&(role.clone(), addr.clone())) != Some(e) {
                    let _ = changes.send(Change::Up {
                        role: role.clone(),
                        entry: e.clone(),
                    });
                }
            }
            *known = now;
        };
        while !changes.is_closed() {
            let session = async {
                let mut c = etcd.connect().await?;
                let now = c.get(PREFIX, Some(GetOptions::new().with_prefix())).await?;
                let rev = now.header().map(|h| h.revision()).unwrap_or(0);
                let current: Members = now
                    .kvs()
                    .iter()
                    .filter_map(|kv| member(kv.key_str().ok()?, kv.value()))
                    .collect();
                sync(&mut known, current);
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
                        let Some(kv) = ev.kv() else { continue };
                        let Ok(k) = kv.key_str() else { continue };
                        let mut next = known.clone();
                        match ev.event_type() {
                            EventType::Put => match member(k, kv.value()) {
                                Some((id, e)) => {
                                    next.insert(id, e);
                                }
                                None => {
                                    if let Some(id) = parse(k) {
                                        next.remove(&id);
                                    }
                                }
                            },
                            EventType::Delete => {
                                if let Some(id) = parse(k) {
                                    next.remove(&id);
                                }
                            }
                        }
                        sync(&mut known, next);
                        if changes.is_closed() {
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

    #[test]
    fn entries_round_trip_with_the_whole_fingerprint() {
        for fingerprint in [0, 1, u64::MAX, 0x9e37_79b9_7f4a_7c15] {
            let e = Entry {
                addr: "10.0.0.7:50061".into(),
                fingerprint,
            };
            let json = e.to_json();
            assert_eq!(Entry::parse(json.as_bytes()), Some(e), "{json}");
        }
        assert_eq!(
            Entry {
                addr: "a:1".into(),
                fingerprint: 0xc0ffee
            }
            .to_json(),
            r#"{"addr":"a:1","fingerprint":"0000000000c0ffee"}"#
        );
        // What older registrations (a bare address) and other writers leave is not an entry.
        for bad in [
            &b"10.0.0.7:50061"[..],
            br#"{"addr":"a:1"}"#,
            br#"{"addr":"a:1","fingerprint":12648430}"#,
            br#"{"addr":"a:1","fingerprint":"c0ffee"}"#,
            br#"{"addr":"a:1","fingerprint":"zz00000000c0ffee"}"#,
        ] {
            assert_eq!(Entry::parse(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn password_files_give_their_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "s3cret\n").unwrap();
        assert_eq!(read_password(&p).unwrap(), "s3cret");
        std::fs::write(&p, "\n").unwrap();
        assert!(matches!(
            read_password(&p),
            Err(EtcdConfigError::EmptyPassword(_))
        ));
        assert!(matches!(
            read_password(&dir.path().join("none")),
            Err(EtcdConfigError::Read { .. })
        ));
    }
}
