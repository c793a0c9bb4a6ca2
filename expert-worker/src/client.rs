//! The prefill and decode workers' side of expert parallelism: one connection per expert
//! worker, each expert placed on one of the workers holding it, and a layer's routed rows sent
//! to every worker that has some before any reply is read (the workers compute together).

use crate::eplb;
use crate::wire::{Group, Hello};
use engine::moe::{ExpertBackend, Groups};
use engine::{EngineError, Result};
use protocol::auth::ClusterSecret;
use std::sync::Mutex;
use std::time::{Duration, Instant};

mod conn;
mod rebalance;
mod recovery;
pub use conn::{CONNECT_TIMEOUT, REPLY_TIMEOUT};
use conn::{Conn, connect};
pub use rebalance::EplbConfig;

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

/// Where the time of the layers sent to expert workers went, since the start.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EpStats {
    /// Layers run on expert workers.
    pub layers: u64,
    /// Wall time of those layers' dispatch, expert compute and return, in seconds.
    pub wall_s: f64,
    /// Of it, the slowest worker's compute per layer, summed: the rest is dispatch and
    /// combine (gathering, the wire both ways, waiting).
    pub compute_s: f64,
    /// Activations sent and received.
    pub bytes: u64,
    /// Expert rows (token × expert) each worker computed, in `--expert-workers` order: its load.
    pub rows: Vec<u64>,
    /// Rows routed to each expert, over every layer.
    pub expert_rows: Vec<u64>,
    /// Rows routed to each expert of each layer (`[layer][expert]`): the load window EPLB
    /// places by.
    pub layer_rows: Vec<Vec<u64>>,
    /// The busiest worker's rows in each layer run, summed: what the steps waited for (over
    /// the rows' sum ÷ workers, the imbalance a step pays).
    pub busiest_rows: u64,
    /// The workers' compute time per run against its experts and rows: what running an
    /// expert costs beyond its rows (EPLB weighs replicas by it).
    pub fit: eplb::CostFit,
}

/// `f` of two counts lists, element by element (a missing element counts 0).
fn each(a: &[u64], b: &[u64], f: fn(u64, u64) -> u64) -> Vec<u64> {
    (0..a.len().max(b.len()))
        .map(|i| {
            f(
                a.get(i).copied().unwrap_or(0),
                b.get(i).copied().unwrap_or(0),
            )
        })
        .collect()
}

impl EpStats {
    /// What happened since `earlier` (a window).
    pub fn since(&self, earlier: &EpStats) -> EpStats {
        self.zip(earlier, true)
    }

    /// Both windows together.
    pub fn plus(&self, more: &EpStats) -> EpStats {
        self.zip(more, false)
    }

    /// `self − o` (`sub`) or `self + o`, field by field.
    fn zip(&self, o: &EpStats, sub: bool) -> EpStats {
        let n: fn(u64, u64) -> u64 = if sub {
            u64::saturating_sub
        } else {
            u64::saturating_add
        };
        let x = |a: f64, b: f64| if sub { a - b } else { a + b };
        let layers = self.layer_rows.len().max(o.layer_rows.len());
        let row = |s: &EpStats, l: usize| s.layer_rows.get(l).cloned().unwrap_or_default();
        EpStats {
            layers: n(self.layers, o.layers),
            wall_s: x(self.wall_s, o.wall_s),
            compute_s: x(self.compute_s, o.compute_s),
            bytes: n(self.bytes, o.bytes),
            busiest_rows: n(self.busiest_rows, o.busiest_rows),
            rows: each(&self.rows, &o.rows, n),
            expert_rows: each(&self.expert_rows, &o.expert_rows, n),
            layer_rows: (0..layers)
                .map(|l| each(&row(self, l), &row(o, l), n))
                .collect(),
            fit: if sub {
                self.fit.since(&o.fit)
            } else {
                self.fit.plus(&o.fit)
            },
        }
    }

    /// The rows per expert of each layer, as EPLB plans from them.
    pub fn layer_load(&self) -> eplb::LayerLoad {
        self.layer_rows
            .iter()
            .map(|l| l.iter().map(|&r| r as f64).collect())
            .collect()
    }
}

/// Expert workers as an [`ExpertBackend`].
pub struct RemoteExperts {
    stats: Mutex<EpStats>,
    secret: Option<ClusterSecret>,
    peers: Vec<Mutex<Peer>>,
    /// The peers that compute each expert (several: its rows split over them in each layer
    /// of each step by `eplb::assign`, in order).
    owner: Mutex<Vec<Vec<usize>>>,
    /// Run-time EPLB, when enabled.
    eplb: Mutex<Option<rebalance::Rebalancer>>,
    /// Workers lost and the placement to go back to once they answer again.
    recovery: Mutex<Option<recovery::Recovery>>,
    /// Move rows and outputs through shared-memory mailboxes where a worker can map them.
    shm: bool,
}

fn err(addr: &str, what: impl std::fmt::Display) -> EngineError {
    EngineError::Experts(format!("expert worker {addr}: {what}"))
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
            stats: Mutex::default(),
            secret: secret.cloned(),
            peers,
            owner: Mutex::new(
                owner
                    .into_iter()
                    .map(|o| vec![o.expect("checked")])
                    .collect(),
            ),
            eplb: Mutex::new(None),
            recovery: Mutex::new(None),
            shm: true,
        })
    }

    /// Whether rows and outputs may go through shared memory to workers on this host (on by
    /// default; off: always the socket).
    pub fn set_shm(&mut self, on: bool) {
        self.shm = on;
    }

    /// Each worker's link, in `--expert-workers` order: `"shm"` (a mailbox), `"tcp"`, or
    /// `"down"` (not connected now).
    pub fn links(&self) -> Vec<&'static str> {
        self.peers
            .iter()
            .map(|p| match &p.lock().expect("peer").conn {
                Some(c) if c.over_shm() => "shm",
                Some(_) => "tcp",
                None => "down",
            })
            .collect()
    }

    /// Where the time went so far.
    pub fn stats(&self) -> EpStats {
        self.stats.lock().expect("stats").clone()
    }

    /// Which workers compute each expert.
    pub fn placement(&self) -> Vec<Vec<String>> {
        self.owner
            .lock()
            .expect("placement")
            .iter()
            .map(|ps| {
                ps.iter()
                    .map(|&p| self.peers[p].lock().expect("peer").addr.clone())
                    .collect()
            })
            .collect()
    }

    /// Computes each expert on the workers `placement` gives it (`placement[w]`: the experts
    /// worker `w` computes, in `--expert-workers` order; an expert on several workers has its
    /// rows split over them), from the next step. Each must hold what it is given, and every
    /// expert must be placed.
    pub fn set_placement(&mut self, placement: &eplb::Placement) -> Result<()> {
        self.apply(placement)
    }

    /// [`set_placement`](Self::set_placement), first asking each worker to load the experts
    /// it is given and lacks (from its model file): a static placement at start.
    pub fn place(&mut self, placement: &eplb::Placement) -> Result<()> {
        if placement.len() != self.peers.len() {
            return self.apply(placement); // refused there, with the reason
        }
        for (experts, peer) in placement.iter().zip(&self.peers) {
            let mut peer = peer.lock().expect("peer");
            let lacking = lacking(&peer.hello.held, experts);
            if lacking.is_empty() {
                continue;
            }
            let Peer { addr, conn, hello } = &mut *peer;
            let conn = conn.as_mut().ok_or_else(|| err(addr, "not connected"))?;
            hello.held = conn.load(addr, &lacking)?;
        }
        self.apply(placement)
    }

    /// The experts each worker computes now, in `--expert-workers` order.
    pub fn current(&self) -> eplb::Placement {
        recovery::placement_of(&self.owner.lock().expect("placement"), self.peers.len())
    }

    fn n_experts(&self) -> usize {
        self.owner.lock().expect("placement").len()
    }

    fn apply(&self, placement: &eplb::Placement) -> Result<()> {
        if placement.len() != self.peers.len() {
            return Err(EngineError::Experts(format!(
                "a placement for {} workers; there are {}",
                placement.len(),
                self.peers.len()
            )));
        }
        let mut owner = vec![Vec::new(); self.n_experts()];
        for (w, experts) in placement.iter().enumerate() {
            let peer = self.peers[w].lock().expect("peer");
            for &e in experts {
                if e >= owner.len() || !peer.hello.held.contains(&(e as u32)) {
                    return Err(err(&peer.addr, format!("does not hold expert {e}")));
                }
                if !owner[e].contains(&w) {
                    owner[e].push(w);
                }
            }
        }
        if let Some(e) = owner.iter().position(Vec::is_empty) {
            return Err(EngineError::Experts(format!(
                "expert {e} is not placed on any worker"
            )));
        }
        *self.owner.lock().expect("placement") = owner;
        Ok(())
    }
}

/// One peer's share of a layer: the experts it computes, which replica of each it is, and
/// their row counts.
struct Sent {
    peer: usize,
    experts: Vec<(usize, usize)>,
    counts: Vec<usize>,
}

impl RemoteExperts {
    /// A peer's connection, opened again if an earlier step lost it: a restarted worker must
    /// serve the same model, and is asked to load the experts `placed` on it that it lacks.
    fn conn<'a>(&self, peer: &'a mut Peer, placed: &[usize]) -> Result<&'a mut Conn> {
        if peer.conn.is_none() {
            let (mut conn, hello) = connect(&peer.addr, self.secret.as_ref(), Instant::now())?;
            let same = |h: &Hello| (h.n_layers, h.n_experts, h.d, h.fingerprint);
            if same(&hello) != same(&peer.hello) {
                return Err(err(&peer.addr, "came back serving another model"));
            }
            let lacking = lacking(&hello.held, placed);
            let held = if lacking.is_empty() {
                hello.held
            } else {
                conn.load(&peer.addr, &lacking)?
            };
            tracing::info!(worker = %peer.addr, "expert worker reached again");
            peer.hello.held = held;
            peer.conn = Some(conn);
        }
        Ok(peer.conn.as_mut().expect("opened above"))
    }
}

/// Which of `experts` a worker holding `held` lacks.
fn lacking(held: &[u32], experts: &[usize]) -> Vec<u32> {
    experts
        .iter()
        .map(|&e| e as u32)
        .filter(|e| !held.contains(e))
        .collect()
}

/// Why a layer failed: a worker unreachable (its experts can move), or anything else.
enum Failure {
    Lost(usize, EngineError),
    Other(EngineError),
}

/// Drops the connections of `peers` (each holds a reply not read, or is broken).
fn reset(peers: &mut [std::sync::MutexGuard<'_, Peer>], which: impl Iterator<Item = usize>) {
    for p in which {
        peers[p].conn = None;
    }
}

impl ExpertBackend for RemoteExperts {
    /// Runs the layer; a worker lost on the way has its experts moved (to replicas, else to
    /// survivors that load them) and the layer runs again: the same rows through the same
    /// experts, so the same bits.
    fn run(&self, layer: usize, h: &[f32], d: usize, groups: &Groups) -> Result<Vec<Vec<f32>>> {
        let mut lost = 0;
        loop {
            match self.try_run(layer, h, d, groups) {
                Ok(out) => return Ok(out),
                Err(Failure::Lost(p, e)) if lost < self.peers.len() => {
                    tracing::warn!(error = %e, "an expert worker failed a layer");
                    self.fail_over(p)?;
                    lost += 1;
                }
                Err(Failure::Lost(_, e) | Failure::Other(e)) => return Err(e),
            }
        }
    }

    /// Between steps: lost workers that answer again get their experts back, and EPLB at
    /// run time, when enabled, plans and applies placements.
    fn new_step(&self) {
        self.recover();
        self.rebalance();
    }
}

impl RemoteExperts {
    fn try_run(
        &self,
        layer: usize,
        h: &[f32],
        d: usize,
        groups: &Groups,
    ) -> Result<Vec<Vec<f32>>, Failure> {
        let owner = self.owner.lock().expect("placement").clone();
        let placed = |p: usize| -> Vec<usize> {
            (0..owner.len())
                .filter(|&e| owner[e].contains(&p))
                .collect()
        };
        let start = Instant::now();
        let (mut slowest, mut bytes) = (0u32, 0usize);
        let mut took = Vec::with_capacity(self.peers.len());
        // Each expert's replicas' outputs, in replica order.
        let mut parts: Vec<Vec<Vec<f32>>> =
            owner.iter().map(|o| vec![Vec::new(); o.len()]).collect();
        // Every peer's lock, in order, for the whole layer (one step at a time per peer).
        let mut peers: Vec<_> = self.peers.iter().map(|p| p.lock().expect("peer")).collect();
        let mut sent: Vec<Sent> = Vec::new();
        // This layer's rows per expert split over the replicas to level the workers.
        let counts: Vec<usize> = groups.rows.iter().map(Vec::len).collect();
        // What running an expert costs beyond its rows, in rows, as the workers' runs so far
        // show (0 until they determine it): how a replica's run is weighed.
        let fixed = self.stats.lock().expect("stats").fit.fixed_rows();
        let shares = eplb::assign(&counts, &owner, peers.len(), fixed).shares;
        for p in 0..peers.len() {
            // (expert, replica, its rows) this peer computes.
            let share: Vec<(usize, usize, &[u32])> = (0..groups.rows.len())
                .filter_map(|e| {
                    let i = owner[e].iter().position(|&o| o == p)?;
                    let rows = eplb::part(&groups.rows[e], &shares[e], i);
                    (!rows.is_empty()).then_some((e, i, rows))
                })
                .collect();
            if share.is_empty() {
                continue;
            }
            // The rows any of them needs, each once.
            let mut rows: Vec<u32> = share.iter().flat_map(|s| s.2.iter().copied()).collect();
            rows.sort_unstable();
            rows.dedup();
            let msg: Vec<Group> = share
                .iter()
                .map(|&(e, _, rs)| Group {
                    expert: e as u32,
                    rows: rs
                        .iter()
                        .map(|r| rows.binary_search(r).expect("a row of the union") as u32)
                        .collect(),
                })
                .collect();
            let addr = peers[p].addr.clone();
            let mine = placed(p);
            let written = self.conn(&mut peers[p], &mine).and_then(|c| {
                c.send(self.shm, layer as u32, &rows, h, d, &msg)
                    .map_err(|e| err(&addr, e))
            });
            if let Err(e) = written {
                // The connections written this layer hold replies not read: all start over.
                reset(&mut peers, sent.iter().map(|s| s.peer).chain([p]));
                return Err(Failure::Lost(p, e));
            }
            let counts: Vec<usize> = share.iter().map(|s| s.2.len()).collect();
            let experts = share.iter().map(|s| (s.0, s.1)).collect();
            bytes += (rows.len() + counts.iter().sum::<usize>()) * d * 4;
            sent.push(Sent {
                peer: p,
                experts,
                counts,
            });
        }
        // Waiting on the workers: this process's idle compute threads sleep rather than spin
        // on cores the workers may share.
        kernels::pool::rest();
        for (i, s) in sent.iter().enumerate() {
            let peer = &mut peers[s.peer];
            let conn = peer.conn.as_mut().expect("written this layer");
            let got = match conn.recv(&s.counts, d) {
                Ok(Ok((got, micros))) => {
                    slowest = slowest.max(micros);
                    took.push(micros);
                    got
                }
                Ok(Err(why)) => {
                    let e = err(&peer.addr, why);
                    reset(&mut peers, sent[i + 1..].iter().map(|s| s.peer));
                    return Err(Failure::Other(e));
                }
                Err(e) => {
                    let e = err(&peer.addr, e);
                    reset(&mut peers, sent[i..].iter().map(|s| s.peer));
                    return Err(Failure::Lost(s.peer, e));
                }
            };
            for (&(e, i), o) in s.experts.iter().zip(got) {
                parts[e][i] = o;
            }
        }
        let outputs: Vec<Vec<f32>> = parts.into_iter().map(|p| p.concat()).collect();
        // Prometheus (the worker's /metrics): load per expert and per worker, and this layer's
        // imbalance over its experts (busiest / mean), what EPLB evens out.
        let total: usize = groups.rows.iter().map(Vec::len).sum();
        let busiest = groups.rows.iter().map(Vec::len).max().unwrap_or(0);
        if total > 0 {
            for (e, r) in groups.rows.iter().enumerate() {
                metrics::counter!("tandem_expert_rows_total", "expert" => e.to_string())
                    .increment(r.len() as u64);
            }
            metrics::gauge!("tandem_expert_imbalance", "layer" => layer.to_string())
                .set(busiest as f64 * groups.rows.len() as f64 / total as f64);
        }
        let busiest_worker = sent
            .iter()
            .map(|s| s.counts.iter().sum::<usize>())
            .max()
            .unwrap_or(0);
        for s in &sent {
            let addr = peers[s.peer].addr.clone();
            metrics::counter!("tandem_expert_worker_rows_total", "worker" => addr)
                .increment(s.counts.iter().sum::<usize>() as u64);
        }
        if total > 0 {
            // The workers' imbalance this layer (busiest / mean rows): what the step waited for.
            metrics::gauge!("tandem_expert_worker_imbalance", "layer" => layer.to_string())
                .set(busiest_worker as f64 * self.peers.len() as f64 / total as f64);
        }
        let mut st = self.stats.lock().expect("stats");
        st.rows.resize(self.peers.len(), 0);
        st.expert_rows.resize(groups.rows.len(), 0);
        for (n, r) in st.expert_rows.iter_mut().zip(&groups.rows) {
            *n += r.len() as u64;
        }
        if st.layer_rows.len() <= layer {
            st.layer_rows.resize(layer + 1, Vec::new());
        }
        let per = &mut st.layer_rows[layer];
        per.resize(groups.rows.len(), 0);
        for (n, r) in per.iter_mut().zip(&groups.rows) {
            *n += r.len() as u64;
        }
        for (s, &micros) in sent.iter().zip(&took) {
            let rows = s.counts.iter().sum::<usize>();
            st.rows[s.peer] += rows as u64;
            st.fit.add(s.counts.len(), rows, micros as f64 * 1e-6);
        }
        st.layers += 1;
        st.busiest_rows += busiest_worker as u64;
        st.wall_s += start.elapsed().as_secs_f64();
        st.compute_s += slowest as f64 * 1e-6;
        st.bytes += bytes as u64;
        Ok(outputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_windows_add_and_take_back() {
        let mut a = EpStats {
            layers: 4,
            bytes: 100,
            rows: vec![3, 5],
            expert_rows: vec![1, 2, 5],
            layer_rows: vec![vec![1, 0, 2], vec![0, 2, 3]],
            ..EpStats::default()
        };
        a.fit.add(2, 8, 1e-3);
        let mut b = EpStats {
            layers: 2,
            rows: vec![1],
            expert_rows: vec![0, 1, 1],
            layer_rows: vec![vec![0, 1, 1]],
            ..EpStats::default()
        };
        b.fit.add(3, 5, 2e-3);
        let sum = a.plus(&b);
        assert_eq!((sum.layers, sum.rows.clone()), (6, vec![4, 5]));
        assert_eq!(sum.layer_rows, vec![vec![1, 1, 3], vec![0, 2, 3]]);
        let back = sum.since(&b);
        assert_eq!(back.layer_rows, a.layer_rows);
        assert_eq!(
            (back.layers, back.bytes, &back.rows, &back.expert_rows),
            (4, 100, &a.rows, &a.expert_rows)
        );
        assert_eq!(a.layer_load()[1], vec![0.0, 2.0, 3.0]);
    }
}
