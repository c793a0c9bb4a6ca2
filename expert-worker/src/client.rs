//! The prefill and decode workers' side of expert parallelism: one connection per expert
//! worker, each expert placed on one of the workers holding it, and a layer's routed rows sent
//! to every worker that has some before any reply is read (the workers compute together).

use crate::wire::{self, Group, Hello};
use engine::moe::{ExpertBackend, Groups};
use engine::{EngineError, Result};
use protocol::auth::{self, ClusterSecret, Plane};
use std::io::{BufReader, BufWriter};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long connecting to an expert worker may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one layer's reply may take before the worker is taken for gone.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// An open connection to an expert worker.
struct Conn {
    r: BufReader<TcpStream>,
    w: BufWriter<TcpStream>,
}

struct Peer {
    addr: String,
    /// `None` after a failure: opened again at the next step that needs the worker.
    conn: Option<Conn>,
    /// What it said when first reached (a reconnection must say the same).
    hello: Hello,
}

/// What the model must be, as the prefill or decode worker loaded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expect {
    pub n_layers: usize,
    pub n_experts: usize,
    pub d: usize,
    pub fingerprint: u64,
}

/// Expert workers as an [`ExpertBackend`].
pub struct RemoteExperts {
    secret: Option<ClusterSecret>,
    peers: Vec<Mutex<Peer>>,
    /// The peer that computes each expert.
    owner: Vec<usize>,
}

fn err(addr: &str, what: impl std::fmt::Display) -> EngineError {
    EngineError::Experts(format!("expert worker {addr}: {what}"))
}

/// Connects to `addr`, trying again until `deadline` while nothing listens there yet (a
/// worker still loading); a handshake or hello that fails is an error at once.
fn connect(addr: &str, secret: Option<&ClusterSecret>, deadline: Instant) -> Result<(Conn, Hello)> {
    let mut last = err(addr, "no address");
    let addrs: Vec<_> = addr.to_socket_addrs().map_err(|e| err(addr, e))?.collect();
    let mut s = 'found: loop {
        for a in &addrs {
            match TcpStream::connect_timeout(a, CONNECT_TIMEOUT) {
                Ok(s) => break 'found s,
                Err(e) => last = err(addr, e),
            }
        }
        if std::time::Instant::now() >= deadline {
            return Err(last);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let setup = |s: &mut TcpStream| -> std::io::Result<Hello> {
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(auth::HANDSHAKE_TIMEOUT))?;
        s.set_write_timeout(Some(REPLY_TIMEOUT))?;
        auth::client(s, secret, Plane::Experts).map_err(std::io::Error::other)?;
        let hello = Hello::read(s)?;
        s.set_read_timeout(Some(REPLY_TIMEOUT))?;
        Ok(hello)
    };
    let hello = setup(&mut s).map_err(|e| err(addr, e))?;
    let conn = Conn {
        r: BufReader::with_capacity(1 << 16, s.try_clone().map_err(|e| err(addr, e))?),
        w: BufWriter::with_capacity(1 << 16, s),
    };
    Ok((conn, hello))
}

impl RemoteExperts {
    /// Connects to every expert worker in `addrs` and places each expert on the first that
    /// holds it; refuses workers serving another model or precision, and experts no worker
    /// holds.
    pub fn connect(
        addrs: &[String],
        secret: Option<&ClusterSecret>,
        expect: Expect,
    ) -> Result<RemoteExperts> {
        Self::connect_waiting(addrs, secret, expect, Duration::ZERO)
    }

    /// [`connect`](Self::connect), waiting up to `wait` for workers not listening yet.
    pub fn connect_waiting(
        addrs: &[String],
        secret: Option<&ClusterSecret>,
        expect: Expect,
        wait: Duration,
    ) -> Result<RemoteExperts> {
        let deadline = Instant::now() + wait;
        let mut peers = Vec::new();
        let mut owner: Vec<Option<usize>> = vec![None; expect.n_experts];
        for addr in addrs {
            let (conn, h) = connect(addr, secret, deadline)?;
            let got = (
                h.n_layers as usize,
                h.n_experts as usize,
                h.d as usize,
                h.fingerprint,
            );
            let want = (
                expect.n_layers,
                expect.n_experts,
                expect.d,
                expect.fingerprint,
            );
            if got != want {
                return Err(err(
                    addr,
                    format!(
                        "serves another model or precision ({} layers, {} experts, d {}, fingerprint {:016x}; this worker's: {} layers, {} experts, d {}, {:016x})",
                        got.0, got.1, got.2, got.3, want.0, want.1, want.2, want.3
                    ),
                ));
            }
            for &e in &h.held {
                if let Some(o) = owner.get_mut(e as usize) {
                    o.get_or_insert(peers.len());
                }
            }
            peers.push(Mutex::new(Peer {
                addr: addr.clone(),
                conn: Some(conn),
                hello: h,
            }));
        }
        let missing: Vec<usize> = (0..expect.n_experts)
            .filter(|&e| owner[e].is_none())
            .collect();
        if !missing.is_empty() {
            return Err(EngineError::Experts(format!(
                "experts {missing:?} are held by none of the expert workers {addrs:?}"
            )));
        }
        Ok(RemoteExperts {
            secret: secret.cloned(),
            peers,
            owner: owner.into_iter().map(|o| o.expect("checked")).collect(),
        })
    }

    /// Which worker computes each expert.
    pub fn placement(&self) -> Vec<String> {
        self.owner
            .iter()
            .map(|&p| self.peers[p].lock().expect("peer").addr.clone())
            .collect()
    }
}

/// One peer's share of a layer: the experts it computes and their row counts.
struct Sent {
    peer: usize,
    experts: Vec<usize>,
    counts: Vec<usize>,
}

impl RemoteExperts {
    /// Peer `p`'s connection, opened again if an earlier step lost it (a restarted worker
    /// must say what it said at first).
    fn conn<'a>(&self, peer: &'a mut Peer) -> Result<&'a mut Conn> {
        if peer.conn.is_none() {
            let (conn, hello) = connect(&peer.addr, self.secret.as_ref(), Instant::now())?;
            if hello != peer.hello {
                return Err(err(&peer.addr, "came back serving something else"));
            }
            tracing::info!(worker = %peer.addr, "expert worker reached again");
            peer.conn = Some(conn);
        }
        Ok(peer.conn.as_mut().expect("opened above"))
    }
}

/// Drops the connections of `peers` (each holds a reply not read, or is broken).
fn reset(peers: &mut [std::sync::MutexGuard<'_, Peer>], which: impl Iterator<Item = usize>) {
    for p in which {
        peers[p].conn = None;
    }
}

impl ExpertBackend for RemoteExperts {
    fn run(&self, layer: usize, h: &[f32], d: usize, groups: &Groups) -> Result<Vec<Vec<f32>>> {
        let mut outputs = vec![Vec::new(); groups.rows.len()];
        // Every peer's lock, in order, for the whole layer (one step at a time per peer).
        let mut peers: Vec<_> = self.peers.iter().map(|p| p.lock().expect("peer")).collect();
        let mut sent: Vec<Sent> = Vec::new();
        for p in 0..peers.len() {
            let experts: Vec<usize> = (0..groups.rows.len())
                .filter(|&e| self.owner[e] == p && !groups.rows[e].is_empty())
                .collect();
            if experts.is_empty() {
                continue;
            }
            // The rows any of them needs, each once.
            let mut rows: Vec<u32> = experts
                .iter()
                .flat_map(|&e| groups.rows[e].iter().copied())
                .collect();
            rows.sort_unstable();
            rows.dedup();
            let mut x = Vec::with_capacity(rows.len() * d);
            for &r in &rows {
                x.extend_from_slice(&h[r as usize * d..(r as usize + 1) * d]);
            }
            let msg: Vec<Group> = experts
                .iter()
                .map(|&e| Group {
                    expert: e as u32,
                    rows: groups.rows[e]
                        .iter()
                        .map(|r| rows.binary_search(r).expect("a row of the union") as u32)
                        .collect(),
                })
                .collect();
            let addr = peers[p].addr.clone();
            let written = self.conn(&mut peers[p]).and_then(|c| {
                wire::write_run(&mut c.w, layer as u32, &x, d, &msg).map_err(|e| err(&addr, e))
            });
            if let Err(e) = written {
                // The connections written this layer hold replies not read: all start over.
                reset(&mut peers, sent.iter().map(|s| s.peer).chain([p]));
                return Err(e);
            }
            let counts = experts.iter().map(|&e| groups.rows[e].len()).collect();
            sent.push(Sent {
                peer: p,
                experts,
                counts,
            });
        }
        for (i, s) in sent.iter().enumerate() {
            let peer = &mut peers[s.peer];
            let conn = peer.conn.as_mut().expect("written this layer");
            let got = match wire::read_result(&mut conn.r, &s.counts, d) {
                Ok(Ok(got)) => got,
                Ok(Err(why)) => {
                    let e = err(&peer.addr, why);
                    reset(&mut peers, sent[i + 1..].iter().map(|s| s.peer));
                    return Err(e);
                }
                Err(e) => {
                    let e = err(&peer.addr, e);
                    reset(&mut peers, sent[i..].iter().map(|s| s.peer));
                    return Err(e);
                }
            };
            for (&e, o) in s.experts.iter().zip(got) {
                outputs[e] = o;
            }
        }
        Ok(outputs)
    }
}
