//! Faults: a worker lost in a layer has its experts moved — to the replicas that hold them,
//! and those with none to survivors, which load them from the model file — and the layer runs
//! again (the same rows through the same experts: the same bits). The placement from before is
//! kept; the lost worker is probed every [`PROBE_EVERY`] between steps, and once it answers
//! again (restarted, as `tandem up`'s supervisor does) it loads what it lacks of that placement
//! on a thread of its own while steps go on, and the placement is back in force from the next
//! step after.

use super::{Peer, RemoteExperts, connect, err};
use crate::eplb::Placement;
use engine::Result;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often a lost worker is probed.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// What each lost worker holds once it answered and loaded its experts (`None`: not lost).
type Reached = Result<Vec<Option<Vec<u32>>>>;

pub(super) struct Recovery {
    /// The placement before the first loss.
    home: Placement,
    /// The workers lost since.
    lost: Vec<usize>,
    next_probe: Instant,
    /// A probe in flight.
    pending: Option<JoinHandle<Reached>>,
}

/// `owner` (each expert's workers) as each worker's experts.
pub(super) fn placement_of(owner: &[Vec<usize>], workers: usize) -> Placement {
    (0..workers)
        .map(|p| {
            (0..owner.len())
                .filter(|&e| owner[e].contains(&p))
                .collect()
        })
        .collect()
}

impl RemoteExperts {
    /// After peer `dead` failed: if it cannot be reached again, its experts go to the
    /// replicas that hold them, and those with none to the survivors, which load them; the
    /// placement before is kept to go back to once it answers again ([`recover`](Self::recover)).
    pub(super) fn fail_over(&self, dead: usize) -> Result<()> {
        let before = self.move_off(dead)?;
        if let Some(before) = before {
            let home = placement_of(&before, self.peers.len());
            let mut rc = self.recovery.lock().expect("recovery");
            let rc = rc.get_or_insert_with(|| Recovery {
                home,
                lost: Vec::new(),
                next_probe: Instant::now() + PROBE_EVERY,
                pending: None,
            });
            if !rc.lost.contains(&dead) {
                rc.lost.push(dead);
            }
        }
        Ok(())
    }

    /// Moves the experts of `dead` elsewhere unless it answers again; the placement before
    /// when they moved.
    fn move_off(&self, dead: usize) -> Result<Option<Vec<Vec<usize>>>> {
        let mut owner = self.owner.lock().expect("placement");
        let placed = |o: &[Vec<usize>], p: usize| -> Vec<usize> {
            (0..o.len()).filter(|&e| o[e].contains(&p)).collect()
        };
        {
            let mut peer = self.peers[dead].lock().expect("peer");
            let mine = placed(&owner, dead);
            if self.conn(&mut peer, &mine).is_ok() {
                return Ok(None); // back already (restarted, or a blip)
            }
        }
        let addr = self.peers[dead].lock().expect("peer").addr.clone();
        // The new placement, kept only if every expert finds a worker (else the lost one stays
        // placed, and is used again once restarted).
        let mut owner_new = owner.clone();
        for o in owner_new.iter_mut() {
            o.retain(|&p| p != dead);
        }
        let before = owner.clone();
        let kept = &mut *owner;
        let mut owner = owner_new;
        let orphans: Vec<usize> = (0..owner.len()).filter(|&e| owner[e].is_empty()).collect();
        tracing::warn!(worker = %addr, ?orphans, "expert worker lost; its experts move to the others");
        // Each orphan to the reachable survivor computing the fewest experts.
        let mut alive: Vec<usize> = (0..self.peers.len())
            .filter(|&p| p != dead && owner.iter().any(|o| o.contains(&p)))
            .collect();
        for e in orphans {
            loop {
                let Some(&p) = alive.iter().min_by_key(|&&p| (placed(&owner, p).len(), p)) else {
                    return Err(err(
                        &addr,
                        "lost, and no expert worker is left to take its experts",
                    ));
                };
                let mut peer = self.peers[p].lock().expect("peer");
                let mine = placed(&owner, p);
                if self.conn(&mut peer, &mine).is_err() {
                    alive.retain(|&q| q != p);
                    continue;
                }
                if !peer.hello.held.contains(&(e as u32)) {
                    let Peer { addr, conn, hello } = &mut *peer;
                    match conn.as_mut().expect("opened above").load(addr, &[e as u32]) {
                        Ok(held) => hello.held = held,
                        Err(_) => {
                            *conn = None;
                            alive.retain(|&q| q != p);
                            continue;
                        }
                    }
                }
                owner[e].push(p);
                break;
            }
        }
        *kept = owner;
        Ok(Some(before))
    }

    /// Between steps: puts back the placement from before a loss once every lost worker
    /// answers again and holds its experts; probes them (on a thread) every [`PROBE_EVERY`].
    pub(super) fn recover(&self) {
        let mut guard = self.recovery.lock().expect("recovery");
        let Some(rc) = guard.as_mut() else {
            return;
        };
        if let Some(h) = rc.pending.take_if(|h| h.is_finished()) {
            match h.join() {
                Ok(Ok(held)) => {
                    for (peer, held) in self.peers.iter().zip(held) {
                        if let Some(held) = held {
                            let mut peer = peer.lock().expect("peer");
                            peer.hello.held = held;
                            peer.conn = None; // reopened by the next step that needs it
                        }
                    }
                    match self.apply(&rc.home) {
                        Ok(()) => {
                            tracing::info!(placement = ?rc.home, "expert workers back: their experts are theirs again");
                            *guard = None;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "expert workers back, placement not restored");
                            *guard = None;
                        }
                    }
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "lost expert workers not back yet"),
                Err(_) => tracing::warn!("the probing thread panicked"),
            }
            return;
        }
        if rc.pending.is_some() || Instant::now() < rc.next_probe {
            return;
        }
        rc.next_probe = Instant::now() + PROBE_EVERY;
        let workers: Vec<(String, super::Hello)> = self
            .peers
            .iter()
            .map(|p| {
                let p = p.lock().expect("peer");
                (p.addr.clone(), p.hello.clone())
            })
            .collect();
        let (lost, home, secret) = (rc.lost.clone(), rc.home.clone(), self.secret.clone());
        let spawned = std::thread::Builder::new()
            .name("expert-probe".into())
            .spawn(move || -> Reached {
                let mut held = vec![None; workers.len()];
                for &p in &lost {
                    let (addr, was) = &workers[p];
                    let (mut conn, hello) = connect(addr, secret.as_ref(), Instant::now())?;
                    let same = |h: &super::Hello| (h.n_layers, h.n_experts, h.d, h.fingerprint);
                    if same(&hello) != same(was) {
                        return Err(err(addr, "came back serving another model"));
                    }
                    let lacking = super::lacking(&hello.held, &home[p]);
                    held[p] = Some(if lacking.is_empty() {
                        hello.held
                    } else {
                        conn.load(addr, &lacking)?
                    });
                }
                Ok(held)
            });
        match spawned {
            Ok(h) => rc.pending = Some(h),
            Err(e) => tracing::warn!(error = %e, "no thread to probe lost expert workers on"),
        }
    }
}
