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
use std::time::Duration;

/// How long connecting to an expert worker may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one layer's reply may take before the worker is taken for gone.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

struct Peer {
    addr: String,
    r: BufReader<TcpStream>,
    w: BufWriter<TcpStream>,
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
    peers: Vec<Mutex<Peer>>,
    /// The peer that computes each expert.
    owner: Vec<usize>,
}

fn err(addr: &str, what: impl std::fmt::Display) -> EngineError {
    EngineError::Experts(format!("expert worker {addr}: {what}"))
}

/// Connects to `addr`, trying again until `deadline` while nothing listens there yet (a
/// worker still loading); a handshake or hello that fails is an error at once.
fn connect(
    addr: &str,
    secret: Option<&ClusterSecret>,
    deadline: std::time::Instant,
) -> Result<(Peer, Hello)> {
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
    let peer = Peer {
        addr: addr.to_string(),
        r: BufReader::with_capacity(1 << 16, s.try_clone().map_err(|e| err(addr, e))?),
        w: BufWriter::with_capacity(1 << 16, s),
    };
    Ok((peer, hello))
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
        let deadline = std::time::Instant::now() + wait;
        let mut peers = Vec::new();
        let mut owner: Vec<Option<usize>> = vec![None; expect.n_experts];
        for addr in addrs {
            let (peer, h) = connect(addr, secret, deadline)?;
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
            peers.push(Mutex::new(peer));
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

impl ExpertBackend for RemoteExperts {
    fn run(&self, layer: usize, h: &[f32], d: usize, groups: &Groups) -> Result<Vec<Vec<f32>>> {
        let mut outputs = vec![Vec::new(); groups.rows.len()];
        // Every peer's lock, in order, for the whole layer (one step at a time per peer).
        let mut peers: Vec<_> = self.peers.iter().map(|p| p.lock().expect("peer")).collect();
        let mut sent = Vec::new();
        for (p, peer) in peers.iter_mut().enumerate() {
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
            wire::write_run(&mut peer.w, layer as u32, &x, d, &msg)
                .map_err(|e| err(&peer.addr, e))?;
            let counts = experts.iter().map(|&e| groups.rows[e].len()).collect();
            sent.push(Sent {
                peer: p,
                experts,
                counts,
            });
        }
        for s in sent {
            let peer = &mut peers[s.peer];
            let got = wire::read_result(&mut peer.r, &s.counts, d)
                .map_err(|e| err(&peer.addr, e))?
                .map_err(|why| err(&peer.addr, why))?;
            for (e, o) in s.experts.into_iter().zip(got) {
                outputs[e] = o;
            }
        }
        Ok(outputs)
    }
}
