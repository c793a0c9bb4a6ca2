//! The store's index as plain bookkeeping under its lock: LRU orders, lapsing leases and puts,
//! eviction from RAM to disk to nothing, and telling the watcher.

use super::{Entry, Index};
use frontend::block::BlockHash;
use protocol::LeaseId;
use std::time::Instant;

impl Index {
    /// Tells the watcher `h`'s tier now.
    pub(super) fn note(&self, h: BlockHash) {
        if let Some(w) = &self.watch {
            w(h, self.entries.get(&h).map(Entry::tier));
        }
    }

    pub(super) fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Moves `h` from `old` to `new` in the LRU orders it is in.
    pub(super) fn retick(&mut self, h: BlockHash, old: u64, new: u64, in_ram: bool, on_disk: bool) {
        if in_ram {
            self.ram_lru.remove(&(old, h));
            self.ram_lru.insert((new, h));
        }
        if on_disk {
            self.disk_lru.remove(&(old, h));
            self.disk_lru.insert((new, h));
        }
    }

    pub(super) fn unpin(&mut self, blocks: &[BlockHash]) {
        for h in blocks {
            if let Some(e) = self.entries.get_mut(h) {
                e.leased -= 1;
            }
        }
    }

    /// Lapsed read leases end; puts no transfer is writing expire.
    pub(super) fn expire(&mut self, now: Instant) {
        let lapsed: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in lapsed {
            let l = self.leases.remove(&id).expect("listed");
            self.unpin(&l.blocks);
        }
        let stale: Vec<LeaseId> = self
            .puts
            .iter()
            .filter(|(_, p)| p.writer.is_none() && p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            let p = self.puts.remove(&id).expect("listed");
            self.staged_bytes -= p.blocks.len() * p.shape.bytes();
        }
    }

    /// Evicts least recently used, unleased blocks until `incoming` more bytes fit in RAM:
    /// to disk when there is a disk tier (written once), else away; then trims the disk tier
    /// to its budget.
    pub(super) fn make_room(&mut self, incoming: usize) {
        let disk_budget = self.limits.disk.as_ref().map(|d| d.1).unwrap_or(0);
        let mut skipped = Vec::new();
        while self.ram_bytes + incoming > self.limits.ram_bytes {
            let Some((tick, h)) = self.ram_lru.pop_first() else {
                break;
            };
            let e = self.entries.get_mut(&h).expect("an LRU block is indexed");
            if e.leased > 0 {
                skipped.push((tick, h));
                continue;
            }
            let payload = e.ram.take().expect("a RAM-LRU block is in RAM").bytes;
            self.ram_bytes -= payload.len();
            if e.on_disk {
                self.note(h);
                continue;
            }
            let spilled = match &self.dir {
                Some(d) if (payload.len() as u64) <= disk_budget => {
                    match d.write(h, e.shape, &payload) {
                        Ok(()) => true,
                        Err(err) => {
                            tracing::warn!(block = %h, %err, "spilling to disk failed");
                            false
                        }
                    }
                }
                _ => false,
            };
            if spilled {
                e.on_disk = true;
                self.disk_bytes += payload.len() as u64;
                self.disk_lru.insert((tick, h));
                self.stats.spilled += 1;
            } else {
                self.entries.remove(&h);
                self.stats.dropped += 1;
            }
            self.note(h);
        }
        self.ram_lru.extend(skipped);
        let mut skipped = Vec::new();
        while self.disk_bytes > disk_budget {
            let Some((tick, h)) = self.disk_lru.pop_first() else {
                break;
            };
            let e = self.entries.get(&h).expect("an LRU block is indexed");
            if e.leased > 0 {
                skipped.push((tick, h));
                continue;
            }
            self.disk_lru.insert((tick, h));
            self.forget_disk(h);
            self.stats.evicted_disk += 1;
        }
        self.disk_lru.extend(skipped);
    }

    /// Removes `h`'s file (and the block, when it is not in RAM).
    pub(super) fn forget_disk(&mut self, h: BlockHash) {
        let Some(e) = self.entries.get_mut(&h) else {
            return;
        };
        if !e.on_disk {
            return;
        }
        e.on_disk = false;
        self.disk_lru.remove(&(e.tick, h));
        self.disk_bytes -= e.shape.bytes() as u64;
        if let Some(d) = &self.dir {
            d.remove(h);
        }
        if e.ram.is_none() {
            // Gone from every lease too (a damaged file is dropped even when leased), so a
            // later block of the same name is not unpinned by an old lease.
            if self.entries.remove(&h).is_some_and(|e| e.leased > 0) {
                for l in self.leases.values_mut() {
                    l.blocks.retain(|b| *b != h);
                }
            }
            self.note(h);
        }
    }
}
