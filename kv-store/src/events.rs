//! Which blocks a holder has, as a stream of block events (`tandem.v2.BlockEvents`) for the
//! scheduler's KV-aware routing: a decode worker's prefix cache and the pooled store publish
//! this way (Dynamo's KV events). A subscriber gets a snapshot (`cleared`), then every change,
//! in order; one that falls behind gets a new snapshot.

use frontend::block::BlockHash;
use protocol::pb;
use std::sync::Arc;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

/// A block's new state at its holder: held (in a store tier; a worker's own pool is
/// [`pb::StoreTier::None`]), or gone.
pub type Change = (BlockHash, Option<pb::StoreTier>);

/// Changes buffered per subscriber before it is treated as fallen behind.
const BACKLOG: usize = 4096;
/// Events per message at most.
const BATCH: usize = 512;

/// Everything the holder holds now.
pub type Snapshot = Box<dyn Fn() -> Vec<(BlockHash, pb::StoreTier)> + Send + Sync>;

/// A holder's changes, fanned out to subscribers.
pub struct BlockFeed {
    snapshot: Snapshot,
    tx: broadcast::Sender<Change>,
    /// Set when the holder shuts down: every subscriber's stream ends (a server draining
    /// for shutdown waits for its open streams).
    closed: tokio::sync::watch::Sender<bool>,
}

impl BlockFeed {
    /// A feed whose holder reports through the returned sender (changes made while nobody
    /// listens are dropped: a subscriber starts from `snapshot`).
    pub fn new(snapshot: Snapshot) -> (Arc<BlockFeed>, broadcast::Sender<Change>) {
        let (tx, _) = broadcast::channel(BACKLOG);
        (
            Arc::new(BlockFeed {
                snapshot,
                tx: tx.clone(),
                closed: tokio::sync::watch::Sender::new(false),
            }),
            tx,
        )
    }

    /// Ends every subscriber's stream, now and from now on.
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// A subscriber's stream: the snapshot, then the changes as they come, each message one
    /// run of the same kind and tier, so that applying the messages in order is exact.
    pub fn subscribe(self: &Arc<Self>) -> ReceiverStream<Result<pb::BlockEvents, Status>> {
        let (out, stream) = mpsc::channel(16);
        let me = self.clone();
        let mut closed = self.closed.subscribe();
        tokio::spawn(async move {
            // Subscribed before the snapshot is taken: no change after it is missed.
            let mut rx = me.tx.subscribe();
            if *closed.borrow() || !me.send_snapshot(&out).await {
                return;
            }
            loop {
                let next = tokio::select! {
                    r = rx.recv() => r,
                    _ = closed.wait_for(|c| *c) => return,
                };
                let first = match next {
                    Ok(c) => c,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        rx = me.tx.subscribe();
                        if !me.send_snapshot(&out).await {
                            return;
                        }
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let mut run = vec![first];
                while run.len() < BATCH {
                    match rx.try_recv() {
                        Ok(c) if c.1 == run[0].1 => run.push(c),
                        Ok(c) => {
                            if out.send(Ok(message(&run, false))).await.is_err() {
                                return;
                            }
                            run = vec![c];
                        }
                        Err(_) => break,
                    }
                }
                if out.send(Ok(message(&run, false))).await.is_err() {
                    return;
                }
            }
        });
        ReceiverStream::new(stream)
    }

    /// The snapshot: a `cleared` message, then one message per tier.
    async fn send_snapshot(&self, out: &mpsc::Sender<Result<pb::BlockEvents, Status>>) -> bool {
        let all = (self.snapshot)();
        let mut first = true;
        for tier in [pb::StoreTier::None, pb::StoreTier::Ram, pb::StoreTier::Disk] {
            let run: Vec<Change> = all
                .iter()
                .filter(|b| b.1 == tier)
                .map(|b| (b.0, Some(tier)))
                .collect();
            if run.is_empty() && !(first && tier == pb::StoreTier::Disk) {
                continue;
            }
            if out.send(Ok(message(&run, first))).await.is_err() {
                return false;
            }
            first = false;
        }
        true
    }
}

fn message(run: &[Change], cleared: bool) -> pb::BlockEvents {
    let mut m = pb::BlockEvents {
        cleared,
        ..Default::default()
    };
    for (h, state) in run {
        match state {
            Some(tier) => {
                m.stored.push(h.0);
                m.tier = *tier as i32;
            }
            None => m.removed.push(h.0),
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::blocks::Holdings;
    use tokio_stream::StreamExt;

    /// A subscriber that applies the stream knows the holder's contents, whatever happened
    /// between its snapshot and its changes.
    #[tokio::test]
    async fn a_subscriber_tracks_the_holder_exactly() {
        let held = Arc::new(std::sync::Mutex::new(Holdings::default()));
        let h = held.clone();
        let (feed, tx) = BlockFeed::new(Box::new(move || {
            h.lock().unwrap().0.iter().map(|(k, v)| (*k, *v)).collect()
        }));
        let change = |c: Change| {
            let mut m = held.lock().unwrap();
            match c.1 {
                Some(t) => m.0.insert(c.0, t),
                None => m.0.remove(&c.0),
            };
            let _ = tx.send(c);
        };
        change((BlockHash(1), Some(pb::StoreTier::Ram)));
        change((BlockHash(2), Some(pb::StoreTier::Disk)));
        let mut s = feed.subscribe();
        let mut mine = Holdings::default();
        // The snapshot: cleared, then RAM, then disk.
        for _ in 0..2 {
            mine.apply(&s.next().await.unwrap().unwrap());
        }
        change((BlockHash(3), Some(pb::StoreTier::Ram)));
        change((BlockHash(3), None));
        change((BlockHash(3), Some(pb::StoreTier::Disk)));
        change((BlockHash(1), Some(pb::StoreTier::Disk)));
        change((BlockHash(2), None));
        while mine.0 != held.lock().unwrap().0 {
            let m = tokio::time::timeout(std::time::Duration::from_secs(5), s.next())
                .await
                .expect("the stream caught up")
                .unwrap()
                .unwrap();
            mine.apply(&m);
        }
        let want: std::collections::HashMap<_, _> = [
            (BlockHash(1), pb::StoreTier::Disk),
            (BlockHash(3), pb::StoreTier::Disk),
        ]
        .into();
        assert_eq!(mine.0, want);
        // Closed (the holder shuts down): the stream ends.
        feed.close();
        let end = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while s.next().await.is_some() {}
        });
        end.await.expect("the stream ends when the feed closes");
    }
}
