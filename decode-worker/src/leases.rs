//! The decode worker's lease table, shared by the gRPC handlers and the TCP data plane: which
//! blocks are lent to which prefill, who may write them, and how they come back — on commit,
//! release, cancel or expiry — without a late write landing in a reused block (a TCP writer's
//! connection is revoked first; an in-place writer is fenced through the pool's fence file,
//! [`kv_store::shm::fence`], and its blocks quarantined while it is inside).

use engine::{KvSequence, TokenId};
use kv_store::shm::fence::{Fence, lease_tag};
use kv_store::tcp::{ConnId, SlabSink, Slot};
use protocol::LeaseId;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tonic::Status;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transfer {
    /// No TCP bytes yet (shared memory, or not started).
    Idle,
    /// Slabs are arriving over TCP: the blocks must not be freed.
    Receiving,
    /// The sender's end frame came, with its checksum.
    Ended(u64),
    /// The connection broke mid-transfer.
    Aborted,
}

pub(crate) struct Lease {
    pub(crate) request: u64,
    /// The positions reserved for: a commit must continue exactly these (they key the
    /// prefix cache once committed).
    pub(crate) tokens: Vec<TokenId>,
    pub(crate) seq: KvSequence,
    /// Positions that came from this worker's prefix cache.
    pub(crate) cached: usize,
    pub(crate) expires: Instant,
    pub(crate) transfer: Transfer,
    /// The data-plane connection writing it: the first to send it a frame. Frames for the
    /// lease on any other connection are dropped.
    pub(crate) writer: Option<ConnId>,
    /// Dropped as soon as no transfer writes it.
    pub(crate) released: bool,
    /// The blocks lent through the pool's fence for writing in place (the ones past the
    /// cached prefix); taken back before the lease's blocks are reused or decoded from.
    pub(crate) lent: Vec<u32>,
}

impl Lease {
    /// Whether a frame on `conn` may write (or end) this lease: the first connection to
    /// send one owns it, and nothing lands after its end frame or an abort.
    fn writable_by(&self, conn: ConnId) -> bool {
        match self.transfer {
            Transfer::Idle => self.writer.is_none(),
            Transfer::Receiving => self.writer == Some(conn),
            Transfer::Ended(_) | Transfer::Aborted => false,
        }
    }
}

/// The state shared by the gRPC handlers and the data plane.
pub struct Leases {
    map: Mutex<HashMap<LeaseId, Lease>>,
    changed: Notify,
    /// The fence of the shared pool, when there is one: leases lend their blocks through it to
    /// prefill workers writing in place.
    fence: Option<Fence>,
    /// Leases ended while an in-place writer was still inside their blocks: held (blocks out
    /// of use) until it lets go or dies, retried by the reaper.
    quarantine: Mutex<Vec<Lease>>,
}

impl Leases {
    pub fn new(fence: Option<Fence>) -> Arc<Leases> {
        Arc::new(Leases {
            map: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            fence,
            quarantine: Mutex::default(),
        })
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<LeaseId, Lease>> {
        self.map.lock().expect("lease table poisoned")
    }

    /// Lends `blocks` of a new lease `id` through the fence (no-op without a shared pool).
    pub(crate) fn lend(&self, id: LeaseId, blocks: &[u32]) -> std::io::Result<Vec<u32>> {
        match &self.fence {
            Some(f) => {
                f.grant(blocks, lease_tag(&id.0))?;
                Ok(blocks.to_vec())
            }
            None => Ok(Vec::new()),
        }
    }

    /// Lends `blocks` through the fence to the store, which copies a fetch into them in place
    /// (`kv_store::store::pool`): the tag to name them by, or `None` without a shared pool.
    pub(crate) fn lend_to_store(&self, blocks: &[u32]) -> std::io::Result<Option<u64>> {
        let Some(f) = &self.fence else {
            return Ok(None);
        };
        let tag = lease_tag(&LeaseId::random().0);
        f.grant(blocks, tag)?;
        Ok(Some(tag))
    }

    /// Takes back blocks lent to the store for a fetch into `seq`: the sequence, or `None`
    /// when the store is still inside them (a fetch that timed out) — then the sequence is
    /// quarantined, its blocks out of use until the store lets go or dies.
    pub(crate) fn take_back_from_store(
        &self,
        seq: KvSequence,
        lent: Vec<u32>,
    ) -> Option<KvSequence> {
        let l = Lease {
            request: 0,
            tokens: Vec::new(),
            seq,
            cached: 0,
            expires: Instant::now(),
            transfer: Transfer::Idle,
            writer: None,
            released: true,
            lent,
        };
        if self.take_back(&l) {
            return Some(l.seq);
        }
        self.quarantine_add(l);
        None
    }

    /// Takes back what `l` lent for writing in place: `false` while a writer is inside.
    fn take_back(&self, l: &Lease) -> bool {
        let Some(f) = self.fence.as_ref().filter(|_| !l.lent.is_empty()) else {
            return true;
        };
        f.revoke(&l.lent).unwrap_or_else(|e| {
            tracing::error!(error = %e, "the KV fence failed; the lease's blocks stay out of use");
            false
        })
    }

    /// Frees a lease that ends without decoding — or quarantines it, while a writer is inside.
    fn discard(&self, l: Lease) {
        if !self.take_back(&l) {
            self.quarantine_add(l);
        }
    }

    fn quarantine_add(&self, l: Lease) {
        let mut q = self.quarantine.lock().expect("quarantine poisoned");
        tracing::warn!(
            request = l.request,
            blocks = l.lent.len(),
            "a writer (a prefill worker, the store) is still inside blocks taken back: they are held back"
        );
        q.push(l);
        metrics::gauge!("tandem_kv_leases_quarantined").set(q.len() as f64);
    }

    /// Frees the quarantined leases whose writers have let go; returns how many stay.
    pub fn retry_quarantine(&self) -> usize {
        let mut q = self.quarantine.lock().expect("quarantine poisoned");
        q.retain(|l| !self.take_back(l));
        metrics::gauge!("tandem_kv_leases_quarantined").set(q.len() as f64);
        q.len()
    }

    /// Drops a lease now, or once its transfer stops writing.
    pub(crate) fn release(&self, id: LeaseId) {
        let gone = {
            let mut m = self.lock();
            match m.get_mut(&id) {
                Some(l) if l.transfer == Transfer::Receiving => {
                    l.released = true;
                    None
                }
                Some(_) => m.remove(&id),
                None => None,
            }
        };
        if let Some(l) = gone {
            self.discard(l);
        }
    }

    /// Ends the leases past their expiry: frees those nobody writes (quarantining those an
    /// in-place writer is still inside), and marks released those still receiving over TCP,
    /// returning their writers' connections for the caller to revoke
    /// ([`Connections::revoke`]): the blocks come back once the connection's thread has
    /// stopped and reports the abort, so a late byte never lands in a reused block. Returns
    /// how many leases expired, and the connections to cut.
    pub fn expire(&self, now: Instant) -> (usize, Vec<ConnId>) {
        let (mut cut, mut gone) = (Vec::new(), Vec::new());
        {
            let mut m = self.lock();
            let ids: Vec<LeaseId> = m
                .iter()
                .filter(|(_, l)| l.expires <= now && !l.released)
                .map(|(&id, _)| id)
                .collect();
            for id in ids {
                let l = m.get_mut(&id).expect("listed");
                match (l.transfer, l.writer) {
                    (Transfer::Receiving, Some(w)) => {
                        l.released = true;
                        cut.push(w);
                    }
                    _ => gone.push(m.remove(&id).expect("listed")),
                }
            }
        }
        let n = cut.len() + gone.len();
        for l in gone {
            self.discard(l);
        }
        (n, cut)
    }

    /// Takes a lease for decoding, waiting (bounded) for a TCP transfer still arriving.
    pub(crate) async fn take(&self, id: LeaseId, wait: Duration) -> Result<Lease, Status> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            let taken = {
                let mut m = self.lock();
                match m.get(&id).map(|l| l.transfer) {
                    None => {
                        return Err(Status::not_found(format!(
                            "lease {id} is unknown or expired"
                        )));
                    }
                    Some(Transfer::Receiving) => None,
                    Some(t) => Some((t, m.remove(&id).expect("present"))),
                }
            };
            match taken {
                None => {}
                Some((Transfer::Aborted, l)) => {
                    self.discard(l);
                    return Err(Status::data_loss(format!(
                        "the KV transfer of lease {id} broke off"
                    )));
                }
                Some((_, l)) => {
                    // Nothing decodes from blocks an in-place writer may still change.
                    if !self.take_back(&l) {
                        self.quarantine_add(l);
                        return Err(Status::unavailable(format!(
                            "lease {id} is still being written in place"
                        )));
                    }
                    return Ok(l);
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                self.release(id);
                return Err(Status::deadline_exceeded(format!(
                    "the KV transfer of lease {id} did not finish in {wait:?}"
                )));
            }
        }
    }
}

unsafe impl SlabSink for Leases {
    fn slots(
        &self,
        conn: ConnId,
        lease: LeaseId,
        layer: u32,
        blocks: &[u32],
        len: usize,
        out: &mut Vec<Option<Slot>>,
    ) {
        let mut m = self.lock();
        let Some(l) = m.get_mut(&lease) else { return };
        let layout = l.seq.pool().layout();
        if !l.writable_by(conn)
            || l.released
            || l.expires <= Instant::now()
            || layer as usize >= layout.n_layers
            || len != l.seq.slab_bytes()
        {
            metrics::counter!("tandem_kv_frames_refused_total").increment(1);
            return;
        }
        l.writer = Some(conn);
        l.transfer = Transfer::Receiving;
        for &block in blocks {
            let b = block as usize;
            // Never over the cached prefix (shared with other sequences: the sequence refuses
            // it) nor past the lease.
            let slot = l.seq.slab_mut_ptr(b, layer as usize).ok();
            out.push(slot.map(|ptr| Slot { ptr, len }));
        }
    }

    fn end(&self, conn: ConnId, lease: LeaseId, _slabs: u32, checksum: u64) {
        self.finish_transfer(conn, lease, Transfer::Ended(checksum));
    }

    fn abort(&self, conn: ConnId, lease: LeaseId) {
        self.finish_transfer(conn, lease, Transfer::Aborted);
    }
}

impl Leases {
    /// The end or abort of `lease`'s transfer on `conn`: heard only from the writer's own
    /// connection, and only while it may still write (a bogus end from elsewhere changes
    /// nothing).
    fn finish_transfer(&self, conn: ConnId, lease: LeaseId, t: Transfer) {
        let mut gone = None;
        {
            let mut m = self.lock();
            if let Some(l) = m.get_mut(&lease) {
                if !l.writable_by(conn) {
                    metrics::counter!("tandem_kv_frames_refused_total").increment(1);
                    return;
                }
                if l.released {
                    gone = m.remove(&lease);
                } else {
                    l.transfer = t;
                }
            }
        }
        if let Some(l) = gone {
            self.discard(l);
        }
        self.changed.notify_waiters();
    }
}
