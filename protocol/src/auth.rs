//! The internal plane's authentication: one cluster secret, and a mutual challenge–response
//! at the start of every TCP connection between Tandem processes (gRPC and the KV data plane
//! alike), before either side reads a byte of the protocol proper.
//!
//! ```text
//! client → server  hello  "TNDM" | version u16 | plane u8 | 0     | client nonce (32)
//! server → client  reply  "TNDM" | version u16 | plane u8 | status | server nonce (32) | server MAC (32)
//! client → server  proof  client MAC (32)
//! server → client  verdict u8 (0: accepted; anything else: refused, and the server closes)
//!
//! server MAC = HMAC-SHA256(secret, "tandem server" | version | plane | client nonce | server nonce)
//! client MAC = HMAC-SHA256(secret, "tandem client" | version | plane | client nonce | server nonce)
//! ```
//!
//! Each side proves it holds the secret without sending it, over fresh nonces from both, so a
//! recorded handshake replays nowhere; the version is checked in the same exchange (a peer of
//! another protocol version is told so, not misparsed). Why not mTLS: one secret file is the
//! whole of the key management (no CA, no certificates to issue, rotate or match to
//! addresses), both planes share one handshake, and the data plane keeps its zero-copy
//! scattered reads. What it does not give is confidentiality or integrity *after* the
//! handshake: across hosts that is the network's job (a private network, WireGuard or IPsec
//! between nodes; see SECURITY.md).
//!
//! With no secret configured (a cluster on one host's loopback) the same handshake runs with
//! an empty key: the version check still holds, authentication does not, and the workers
//! refuse to listen beyond loopback without a secret.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The version of the internal plane this build speaks: `tandem.v2` messages and `TKV3` frames.
pub const WIRE_VERSION: u16 = 2;
/// How long a peer has to finish the handshake before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Shortest secret accepted, in bytes (128 bits).
pub const MIN_SECRET_BYTES: usize = 16;
/// Environment variable naming the secret file (the flag `--cluster-secret-file`'s).
pub const SECRET_FILE_ENV: &str = "TANDEM_CLUSTER_SECRET_FILE";

const MAGIC: &[u8; 4] = b"TNDM";
const NONCE: usize = 32;
const MAC: usize = 32;
const HELLO: usize = 8 + NONCE;
const REPLY: usize = 8 + NONCE + MAC;

/// Which protocol follows the handshake: a connection for one is refused for the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Plane {
    /// gRPC (`tandem.v2`): the scheduler's calls to the workers.
    Grpc = 1,
    /// The TCP KV data plane (`kv_store::tcp`).
    KvData = 2,
    /// Expert parallelism: routed rows to an expert worker, its experts' outputs back
    /// (`expert_worker::wire`).
    Experts = 3,
}

/// The cluster's shared secret. Its bytes never leave this type but as MACs; `Debug` hides them.
#[derive(Clone)]
pub struct ClusterSecret(Arc<[u8]>);

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterSecret({} bytes)", self.0.len())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("reading the cluster secret {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("the cluster secret {path} holds {len} bytes; at least {MIN_SECRET_BYTES} are needed")]
    TooShort { path: String, len: usize },
}

impl ClusterSecret {
    /// A secret from its bytes (surrounding whitespace, such as a final newline, is not part of it).
    pub fn from_bytes(bytes: &[u8]) -> Option<ClusterSecret> {
        let b = bytes.trim_ascii();
        (b.len() >= MIN_SECRET_BYTES).then(|| ClusterSecret(b.into()))
    }

    /// Reads a secret file (any bytes, at least [`MIN_SECRET_BYTES`] of them once trimmed);
    /// warns when other users may read it.
    pub fn load(path: &Path) -> Result<ClusterSecret, SecretError> {
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| SecretError::Read {
            path: shown.clone(),
            source,
        })?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            if let Ok(m) = std::fs::metadata(path)
                && m.mode() & 0o077 != 0
            {
                tracing::warn!(path = %shown, mode = format!("{:o}", m.mode() & 0o777),
                    "the cluster secret is readable by other users (chmod 600 it)");
            }
        }
        let len = bytes.trim_ascii().len();
        ClusterSecret::from_bytes(&bytes).ok_or(SecretError::TooShort { path: shown, len })
    }

    /// 256 fresh random bits, written as hex to a new file `path` of mode 0600 (refusing one
    /// that exists), for processes started later to [`load`](Self::load).
    pub fn generate_file(path: &Path) -> io::Result<ClusterSecret> {
        let mut raw = [0u8; 32];
        rand::fill(&mut raw);
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(path)?;
        f.write_all(hex.as_bytes())?;
        f.write_all(b"\n")?;
        Ok(ClusterSecret(hex.as_bytes().into()))
    }

    /// HMAC-SHA256 of the concatenated `parts` under this secret.
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        mac(&self.0, parts)
    }

    /// Whether `tag` is the MAC of `parts` (compared in constant time).
    pub fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        verify(&self.0, parts, tag)
    }
}

fn hmac_of(key: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
    }
    m
}

fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    hmac_of(key, parts).finalize().into_bytes().into()
}

fn verify(key: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
    hmac_of(key, parts).verify_slice(tag).is_ok()
}

fn key(secret: Option<&ClusterSecret>) -> &[u8] {
    secret.map(|s| &s.0[..]).unwrap_or(&[])
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("the peer is not a Tandem process of this kind (no handshake)")]
    NotTandem,
    #[error("the peer speaks internal protocol version {theirs}; this build speaks {WIRE_VERSION}")]
    Version { theirs: u16 },
    #[error("the peer serves another plane than asked")]
    Plane,
    #[error("the peer does not hold this cluster's secret")]
    PeerSecret,
    #[error("the peer refused this process's cluster secret")]
    Refused,
    #[error("handshake: {0}")]
    Io(#[from] io::Error),
}

impl From<HandshakeError> for io::Error {
    fn from(e: HandshakeError) -> io::Error {
        match e {
            HandshakeError::Io(e) => e,
            e => io::Error::new(io::ErrorKind::PermissionDenied, e),
        }
    }
}

fn header(plane: Plane, status: u8) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[..4].copy_from_slice(MAGIC);
    h[4..6].copy_from_slice(&WIRE_VERSION.to_le_bytes());
    h[6] = plane as u8;
    h[7] = status;
    h
}

fn transcript<'a>(role: &'a [u8], plane: &'a [u8; 1], cn: &'a [u8], sn: &'a [u8]) -> [&'a [u8]; 5] {
    const V: [u8; 2] = WIRE_VERSION.to_le_bytes();
    [role, &V, plane, cn, sn]
}

const STATUS_OK: u8 = 0;
const STATUS_VERSION: u8 = 1;
const STATUS_PLANE: u8 = 2;

/// The client's half, as pure steps over the bytes (the I/O wrappers below drive it).
struct Client {
    plane: Plane,
    nonce: [u8; NONCE],
}

impl Client {
    fn hello(plane: Plane) -> (Client, [u8; HELLO]) {
        let mut nonce = [0u8; NONCE];
        rand::fill(&mut nonce);
        let mut h = [0u8; HELLO];
        h[..8].copy_from_slice(&header(plane, 0));
        h[8..].copy_from_slice(&nonce);
        (Client { plane, nonce }, h)
    }

    /// Checks the server's reply; the proof to send back.
    fn proof(&self, k: &[u8], r: &[u8; REPLY]) -> Result<[u8; MAC], HandshakeError> {
        if &r[..4] != MAGIC {
            return Err(HandshakeError::NotTandem);
        }
        let theirs = u16::from_le_bytes([r[4], r[5]]);
        match r[7] {
            STATUS_OK if theirs == WIRE_VERSION => {}
            STATUS_PLANE => return Err(HandshakeError::Plane),
            _ => return Err(HandshakeError::Version { theirs }),
        }
        if r[6] != self.plane as u8 {
            return Err(HandshakeError::Plane);
        }
        let (sn, smac) = (&r[8..8 + NONCE], &r[8 + NONCE..]);
        let p = [self.plane as u8];
        if !verify(k, &transcript(b"tandem server", &p, &self.nonce, sn), smac) {
            return Err(HandshakeError::PeerSecret);
        }
        Ok(mac(k, &transcript(b"tandem client", &p, &self.nonce, sn)))
    }
}

/// Why the server will not go on, and the reply that says so (none for a non-Tandem peer).
type Refusal = (HandshakeError, Option<[u8; REPLY]>);

/// The server's half.
struct Server {
    plane: Plane,
    client: [u8; NONCE],
    nonce: [u8; NONCE],
}

impl Server {
    /// The reply to a client's hello; `Err` carries a refusal to send before closing.
    fn reply(plane: Plane, k: &[u8], h: &[u8; HELLO]) -> Result<(Server, [u8; REPLY]), Refusal> {
        if &h[..4] != MAGIC {
            return Err((HandshakeError::NotTandem, None));
        }
        let theirs = u16::from_le_bytes([h[4], h[5]]);
        let refusal = |status| {
            let mut r = [0u8; REPLY];
            r[..8].copy_from_slice(&header(plane, status));
            Some(r)
        };
        if theirs != WIRE_VERSION {
            return Err((HandshakeError::Version { theirs }, refusal(STATUS_VERSION)));
        }
        if h[6] != plane as u8 {
            return Err((HandshakeError::Plane, refusal(STATUS_PLANE)));
        }
        let mut s = Server {
            plane,
            client: [0; NONCE],
            nonce: [0; NONCE],
        };
        s.client.copy_from_slice(&h[8..]);
        rand::fill(&mut s.nonce);
        let p = [plane as u8];
        let mut r = [0u8; REPLY];
        r[..8].copy_from_slice(&header(plane, STATUS_OK));
        r[8..8 + NONCE].copy_from_slice(&s.nonce);
        r[8 + NONCE..].copy_from_slice(&mac(
            k,
            &transcript(b"tandem server", &p, &s.client, &s.nonce),
        ));
        Ok((s, r))
    }

    fn check(&self, k: &[u8], proof: &[u8; MAC]) -> bool {
        let p = [self.plane as u8];
        verify(
            k,
            &transcript(b"tandem client", &p, &self.client, &self.nonce),
            proof,
        )
    }
}

/// The client's handshake on a blocking stream.
pub fn client(
    s: &mut (impl Read + Write),
    secret: Option<&ClusterSecret>,
    plane: Plane,
) -> Result<(), HandshakeError> {
    let (c, hello) = Client::hello(plane);
    s.write_all(&hello)?;
    let mut r = [0u8; REPLY];
    read_reply(s, &mut r)?;
    s.write_all(&c.proof(key(secret), &r)?)?;
    let mut v = [0u8; 1];
    s.read_exact(&mut v).map_err(|_| HandshakeError::Refused)?;
    if v[0] != STATUS_OK {
        return Err(HandshakeError::Refused);
    }
    Ok(())
}

/// Reads a reply, reporting a refusal (8 bytes then a close) as what it says.
fn read_reply(s: &mut impl Read, r: &mut [u8; REPLY]) -> Result<(), HandshakeError> {
    let mut got = 0;
    while got < REPLY {
        match s.read(&mut r[got..]) {
            Ok(0) if got >= 8 => break,
            Ok(0) => return Err(HandshakeError::NotTandem),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The server's handshake on a blocking stream.
pub fn server(
    s: &mut (impl Read + Write),
    secret: Option<&ClusterSecret>,
    plane: Plane,
) -> Result<(), HandshakeError> {
    let k = key(secret);
    let mut h = [0u8; HELLO];
    s.read_exact(&mut h)?;
    let (srv, reply) = match Server::reply(plane, k, &h) {
        Ok(x) => x,
        Err((e, refusal)) => {
            if let Some(r) = refusal {
                let _ = s.write_all(&r[..8]);
            }
            return Err(e);
        }
    };
    s.write_all(&reply)?;
    let mut proof = [0u8; MAC];
    s.read_exact(&mut proof)?;
    if !srv.check(k, &proof) {
        let _ = s.write_all(&[1]);
        return Err(HandshakeError::Refused);
    }
    s.write_all(&[STATUS_OK])?;
    Ok(())
}

/// The client's handshake on an async stream, within [`HANDSHAKE_TIMEOUT`].
pub async fn client_async<S>(
    s: &mut S,
    secret: Option<&ClusterSecret>,
    plane: Plane,
) -> Result<(), HandshakeError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let run = async {
        let (c, hello) = Client::hello(plane);
        s.write_all(&hello).await?;
        let mut r = [0u8; REPLY];
        let mut got = 0;
        while got < REPLY {
            match s.read(&mut r[got..]).await? {
                0 if got >= 8 => break,
                0 => return Err(HandshakeError::NotTandem),
                n => got += n,
            }
        }
        s.write_all(&c.proof(key(secret), &r)?).await?;
        let mut v = [0u8; 1];
        s.read_exact(&mut v)
            .await
            .map_err(|_| HandshakeError::Refused)?;
        if v[0] != STATUS_OK {
            return Err(HandshakeError::Refused);
        }
        Ok(())
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, run)
        .await
        .map_err(|_| HandshakeError::Io(io::ErrorKind::TimedOut.into()))?
}

/// The server's handshake on an async stream, within [`HANDSHAKE_TIMEOUT`].
pub async fn server_async<S>(
    s: &mut S,
    secret: Option<&ClusterSecret>,
    plane: Plane,
) -> Result<(), HandshakeError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let k = key(secret);
    let run = async {
        let mut h = [0u8; HELLO];
        s.read_exact(&mut h).await?;
        let (srv, reply) = match Server::reply(plane, k, &h) {
            Ok(x) => x,
            Err((e, refusal)) => {
                if let Some(r) = refusal {
                    let _ = s.write_all(&r[..8]).await;
                }
                return Err(e);
            }
        };
        s.write_all(&reply).await?;
        let mut proof = [0u8; MAC];
        s.read_exact(&mut proof).await?;
        if !srv.check(k, &proof) {
            let _ = s.write_all(&[1]).await;
            return Err(HandshakeError::Refused);
        }
        s.write_all(&[STATUS_OK]).await?;
        Ok(())
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, run)
        .await
        .map_err(|_| HandshakeError::Io(io::ErrorKind::TimedOut.into()))?
}

/// Whether `host` (an IP address or name, with or without brackets) is loopback only:
/// 127.0.0.0/8, ::1 or `localhost`. Listening anywhere else needs a cluster secret.
pub fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The host part of `host:port` (`[v6]:port` too).
pub fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn secret(s: &str) -> ClusterSecret {
        ClusterSecret::from_bytes(s.as_bytes()).unwrap()
    }

    /// Runs a server handshake on a fresh connection and a client one against it.
    fn pair(
        srv: Option<ClusterSecret>,
        srv_plane: Plane,
        cli: Option<ClusterSecret>,
        cli_plane: Plane,
    ) -> (Result<(), HandshakeError>, Result<(), HandshakeError>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            server(&mut c, srv.as_ref(), srv_plane)
        });
        let mut c = TcpStream::connect(addr).unwrap();
        let r = client(&mut c, cli.as_ref(), cli_plane);
        drop(c);
        (t.join().unwrap(), r)
    }

    #[test]
    fn equal_secrets_pass_and_any_difference_is_refused_on_both_sides() {
        let a = secret("0123456789abcdef-a");
        let b = secret("0123456789abcdef-b");
        let (s, c) = pair(Some(a.clone()), Plane::Grpc, Some(a.clone()), Plane::Grpc);
        assert!(s.is_ok() && c.is_ok(), "{s:?} {c:?}");
        let (s, c) = pair(None, Plane::KvData, None, Plane::KvData);
        assert!(
            s.is_ok() && c.is_ok(),
            "no secret on either side: {s:?} {c:?}"
        );
        // The client finds out first that the server's proof is wrong, and says so.
        let (s, c) = pair(Some(a.clone()), Plane::Grpc, Some(b.clone()), Plane::Grpc);
        assert!(matches!(c, Err(HandshakeError::PeerSecret)), "{c:?}");
        assert!(s.is_err());
        let (s, c) = pair(Some(a.clone()), Plane::Grpc, None, Plane::Grpc);
        assert!(c.is_err() && s.is_err(), "a client without the secret");
        let (s, c) = pair(None, Plane::Grpc, Some(a.clone()), Plane::Grpc);
        assert!(c.is_err() && s.is_err(), "a server without the secret");
        let (s, c) = pair(Some(a.clone()), Plane::KvData, Some(a), Plane::Grpc);
        assert!(matches!(c, Err(HandshakeError::Plane)), "{c:?}");
        assert!(matches!(s, Err(HandshakeError::Plane)), "{s:?}");
    }

    /// A client that replays a recorded proof fails: the server's nonce is new each time.
    #[test]
    fn a_recorded_proof_does_not_replay() {
        let k = secret("a-secret-of-enough-bytes");
        let (c, hello) = Client::hello(Plane::Grpc);
        let (srv1, r1) = Server::reply(Plane::Grpc, &k.0, &hello).ok().unwrap();
        let proof = c.proof(&k.0, &r1).unwrap();
        assert!(srv1.check(&k.0, &proof));
        let (srv2, _) = Server::reply(Plane::Grpc, &k.0, &hello).ok().unwrap();
        assert!(!srv2.check(&k.0, &proof));
    }

    #[test]
    fn another_version_is_named() {
        let (_, mut hello) = Client::hello(Plane::Grpc);
        hello[4..6].copy_from_slice(&1u16.to_le_bytes());
        let Err((e, Some(refusal))) = Server::reply(Plane::Grpc, b"", &hello) else {
            panic!("accepted version 1")
        };
        assert!(matches!(e, HandshakeError::Version { theirs: 1 }));
        let mut r = [0u8; REPLY];
        r[..8].copy_from_slice(&refusal[..8]);
        let (c, _) = Client::hello(Plane::Grpc);
        assert!(matches!(
            c.proof(b"", &r),
            Err(HandshakeError::Version {
                theirs: WIRE_VERSION
            })
        ));
        hello[..4].copy_from_slice(b"GET ");
        assert!(matches!(
            Server::reply(Plane::Grpc, b"", &hello),
            Err((HandshakeError::NotTandem, None))
        ));
    }

    #[test]
    fn secret_files_are_private_and_short_ones_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("secret");
        let s = ClusterSecret::generate_file(&p).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let back = ClusterSecret::load(&p).unwrap();
        assert_eq!(s.mac(&[b"x"]), back.mac(&[b"x"]));
        assert!(
            ClusterSecret::generate_file(&p).is_err(),
            "never overwrites"
        );
        std::fs::write(&p, "short\n").unwrap();
        assert!(matches!(
            ClusterSecret::load(&p),
            Err(SecretError::TooShort { len: 5, .. })
        ));
        assert!(!format!("{s:?}").contains(&String::from_utf8_lossy(&s.0)[..8]));
    }

    #[test]
    fn loopback_hosts() {
        for h in ["127.0.0.1", "127.3.4.5", "::1", "[::1]", "localhost"] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in ["0.0.0.0", "[::]", "10.0.0.1", "example.com", ""] {
            assert!(!is_loopback_host(h), "{h}");
        }
        assert_eq!(host_of("[::1]:50051"), "[::1]");
        assert_eq!(host_of("10.1.2.3:0"), "10.1.2.3");
    }
}
