//! The owner's view of its replicas' progress, for `min_replicas`.
//!
//! Replicas report, with every changes request, how much of each of this
//! node's chunks they hold. A write with `min_replicas=N` waits, woken by
//! those reports (no polling), until N replicas hold its last byte.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use chunkbus_client::ChunkName;
use tokio::sync::watch;

/// Chunks kept per category: reports for older chunks are dropped.
pub(super) const KEEP_CHUNKS_PER_CATEGORY: u32 = 16;

/// Replica positions of this node's chunks.
#[derive(Debug)]
pub struct ProgressStore {
    /// (category, chunk) → replica → bytes held. A std mutex: held only to
    /// read or update a few entries, never across an await.
    held: Mutex<BTreeMap<(String, ChunkName), HashMap<String, u64>>>,
    /// The incarnation each replica last reported. A std mutex, as above.
    incarnations: Mutex<HashMap<String, u64>>,
    changed: watch::Sender<u64>,
}

impl Default for ProgressStore {
    fn default() -> Self {
        Self {
            held: Mutex::new(BTreeMap::new()),
            incarnations: Mutex::new(HashMap::new()),
            changed: watch::Sender::new(0),
        }
    }
}

impl ProgressStore {
    /// Records that `replica` holds `size` bytes of `chunk`.
    pub fn record(&self, replica: &str, category: &str, chunk: ChunkName, size: u64) {
        {
            let mut held = self.held.lock().unwrap();
            let floor = chunk.index.saturating_sub(KEEP_CHUNKS_PER_CATEGORY);
            let stale: Vec<_> = held
                .range((category.to_owned(), ChunkName::new(chunk.owner.clone(), 0))..)
                .take_while(|((c, n), _)| {
                    c == category && n.owner == chunk.owner && n.index < floor
                })
                .map(|(k, _)| k.clone())
                .collect();
            for k in stale {
                held.remove(&k);
            }
            let entry = held
                .entry((category.to_owned(), chunk))
                .or_default()
                .entry(replica.to_owned())
                .or_insert(0);
            *entry = (*entry).max(size);
        }
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Notes the incarnation `replica` reports; when it changed (the
    /// replica restarted, perhaps with an empty disk), everything it
    /// reported before is forgotten: it reports again what it holds.
    pub fn replica_incarnation(&self, replica: &str, incarnation: u64) {
        let mut known = self.incarnations.lock().unwrap();
        match known.insert(replica.to_owned(), incarnation) {
            Some(old) if old != incarnation => {
                drop(known);
                let mut held = self.held.lock().unwrap();
                for by_replica in held.values_mut() {
                    by_replica.remove(replica);
                }
            }
            _ => {}
        }
    }

    /// How many replicas hold `chunk` at least up to `end`.
    pub fn count(&self, category: &str, chunk: &ChunkName, end: u64) -> u32 {
        let held = self.held.lock().unwrap();
        held.get(&(category.to_owned(), chunk.clone()))
            .map_or(0, |m| m.values().filter(|&&s| s >= end).count() as u32)
    }

    /// How many replicas hold all `size` bytes of `chunk`: those that
    /// reported it at that size, and those that reported a later chunk of
    /// its owner in that category (copies are made in chunk order; reports
    /// of older chunks are not kept). Only replicas `counts` accepts count.
    pub fn copies(
        &self,
        category: &str,
        chunk: &ChunkName,
        size: u64,
        counts: impl Fn(&str) -> bool,
    ) -> u32 {
        let held = self.held.lock().unwrap();
        let mut replicas = std::collections::HashSet::new();
        let from = (category.to_owned(), chunk.clone());
        for ((c, n), by_replica) in held.range(from..) {
            if c != category || n.owner != chunk.owner {
                break;
            }
            for (replica, &s) in by_replica {
                if (n.index > chunk.index || s >= size) && counts(replica) {
                    replicas.insert(replica.as_str());
                }
            }
        }
        replicas.len() as u32
    }

    /// Waits until `n` replicas hold `chunk` up to `end`, or `timeout`.
    /// Returns how many did.
    pub async fn wait(
        &self,
        category: &str,
        chunk: &ChunkName,
        end: u64,
        n: u32,
        timeout: Duration,
    ) -> u32 {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            rx.borrow_and_update();
            let have = self.count(category, chunk, end);
            if have >= n {
                return have;
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return have },
                _ = tokio::time::sleep_until(deadline) => return self.count(category, chunk, end),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_count_replicas_past_a_chunk_and_only_those_that_count() {
        let store = ProgressStore::default();
        let c = |i| ChunkName::new("eu1", i);
        store.record("eu2", "app", c(3), 100);
        store.record("eu3", "app", c(3), 40);
        assert_eq!(store.copies("app", &c(3), 100, |_| true), 1);
        // A later chunk reported: the earlier one was copied first.
        store.record("eu3", "app", c(4), 10);
        assert_eq!(store.copies("app", &c(3), 100, |_| true), 2);
        assert_eq!(store.copies("app", &c(4), 10, |_| true), 1);
        // Nothing of another category or owner counts.
        store.record("eu4", "web", c(9), 10);
        store.record("eu4", "app", ChunkName::new("eu9", 9), 10);
        assert_eq!(store.copies("app", &c(3), 100, |_| true), 2);
        // A lost replica's copy does not count.
        assert_eq!(store.copies("app", &c(3), 100, |r| r != "eu3"), 1);
        // Old chunks (reports no longer kept) count the replicas past them.
        assert_eq!(store.copies("app", &c(0), 5, |_| true), 2);
    }

    #[tokio::test]
    async fn waits_for_enough_replicas() {
        let store = std::sync::Arc::new(ProgressStore::default());
        let c = ChunkName::new("eu1", 3);
        store.record("eu2", "app", c.clone(), 100);
        assert_eq!(store.count("app", &c, 100), 1);
        assert_eq!(store.count("app", &c, 101), 0);
        let waiter = {
            let store = store.clone();
            let c = c.clone();
            tokio::spawn(
                async move { store.wait("app", &c, 100, 2, Duration::from_secs(30)).await },
            )
        };
        store.record("eu3", "app", c.clone(), 150);
        assert_eq!(waiter.await.unwrap(), 2);
        let timed_out = store
            .wait("app", &c, 200, 1, Duration::from_millis(10))
            .await;
        assert_eq!(timed_out, 0);
        // A replica that restarted is counted only for what it reports again.
        store.replica_incarnation("eu3", 7);
        assert_eq!(store.count("app", &c, 100), 2);
        store.replica_incarnation("eu3", 8);
        assert_eq!(store.count("app", &c, 100), 1);
        // Old chunks are dropped as new ones are reported.
        store.record("eu2", "app", ChunkName::new("eu1", 100), 1);
        assert_eq!(store.count("app", &c, 1), 0);
    }
}
