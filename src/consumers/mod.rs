//! Consumers: named readers whose positions the server keeps, per category
//! and per chunk owner, durably, moving only forward, on every node.
//!
//! Positions are a CRDT ([`position`]): each node applies acks locally and
//! replication carries every changed entry to the peers, which merge it.
//! This module owns the positions, their persistence ([`store`]) and what
//! consumers do with them (`next`, acks, moving every position, lag); the
//! routes in `http::consumers` only parse requests and shape answers.

pub mod position;
mod reading;
pub mod release;
pub mod store;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use chunkbus_client::ChunkName;
use tokio::sync::watch;

use crate::storage::{ChunkStatus, Storage, StorageError};
pub use position::{ConsumerEntry, Position};
pub use reading::{AckError, NextLines, NextOptions};

/// One consumer entry with the change version it was last changed at.
#[derive(Debug, Clone)]
struct Versioned {
    entry: ConsumerEntry,
    version: u64,
}

#[derive(Debug, Default)]
struct Table {
    entries: BTreeMap<String, Versioned>,
    /// Bumped on every change; the persister writes snapshots in order.
    seq: u64,
}

#[derive(Debug)]
struct CategoryConsumers {
    /// Where the positions are kept (see `Storage::consumers_file`).
    file: PathBuf,
    /// A std mutex: held only to read or change entries, never across an await.
    table: Mutex<Table>,
    /// The highest `seq` written to disk; held while writing, so that
    /// writes of one category never interleave.
    persisted: tokio::sync::Mutex<u64>,
}

/// A changed consumer, for replication.
#[derive(Debug, Clone)]
pub struct ConsumerChange {
    /// Category.
    pub category: String,
    /// Consumer name.
    pub consumer: String,
    /// Its state.
    pub entry: ConsumerEntry,
}

/// The positions of every consumer on this node. Shared as `Arc<Consumers>`.
#[derive(Debug)]
pub struct Consumers {
    storage: Storage,
    cats: Mutex<BTreeMap<String, Arc<CategoryConsumers>>>,
    counter: AtomicU64,
    notify: watch::Sender<u64>,
}

impl Consumers {
    /// Loads the positions of every category held by `storage`.
    pub async fn open(storage: Storage) -> Result<Arc<Self>, StorageError> {
        let files = storage
            .categories()
            .into_iter()
            .map(|n| storage.consumers_file(&n).map(|f| (n, f)))
            .collect::<Result<Vec<_>, _>>()?;
        let loaded = tokio::task::spawn_blocking(move || {
            files
                .into_iter()
                .map(|(n, f)| store::load(&f).map(|c| (n, c)))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| StorageError::io("loading consumers failed", std::io::Error::other(e)))??;
        let me = Arc::new(Self {
            storage,
            cats: Mutex::new(BTreeMap::new()),
            counter: AtomicU64::new(0),
            notify: watch::Sender::new(0),
        });
        for (cat, consumers) in loaded {
            let c = me.category(&cat)?;
            let mut t = c.table.lock().unwrap();
            for (name, entry) in consumers {
                let version = me.next_version();
                t.entries.insert(name, Versioned { entry, version });
            }
        }
        Ok(me)
    }

    fn next_version(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn category(&self, category: &str) -> Result<Arc<CategoryConsumers>, StorageError> {
        let mut cats = self.cats.lock().unwrap();
        if let Some(c) = cats.get(category) {
            return Ok(c.clone());
        }
        let c = Arc::new(CategoryConsumers {
            file: self.storage.consumers_file(category)?,
            table: Mutex::new(Table::default()),
            persisted: tokio::sync::Mutex::new(0),
        });
        cats.insert(category.to_owned(), c.clone());
        Ok(c)
    }

    /// The last change version of positions on this node.
    pub fn version(&self) -> u64 {
        self.counter.load(Ordering::SeqCst)
    }

    /// Wakes on every change of a position.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.notify.subscribe()
    }

    /// Every category's consumers (a snapshot, taken without holding the
    /// map's lock afterwards).
    fn snapshot(&self) -> Vec<(String, Arc<CategoryConsumers>)> {
        let cats = self.cats.lock().unwrap();
        cats.iter().map(|(n, c)| (n.clone(), c.clone())).collect()
    }

    /// The consumers of `category`, if any ever existed here. Reads never
    /// create state for a category: a client asking for arbitrary names
    /// must not grow the node's memory.
    fn existing(&self, category: &str) -> Option<Arc<CategoryConsumers>> {
        self.cats.lock().unwrap().get(category).cloned()
    }

    /// The state of `consumer` in `category`, if it ever existed here.
    pub fn get(&self, category: &str, consumer: &str) -> Option<ConsumerEntry> {
        let c = self.existing(category)?;
        let t = c.table.lock().unwrap();
        t.entries.get(consumer).map(|v| v.entry.clone())
    }

    /// Per category, the highest chunk index of `owner` that a consumer
    /// position held here names (a node that lost its disk must not use
    /// those names again, even when every copy of them was deleted).
    pub fn highest_index_of(&self, owner: &str) -> BTreeMap<String, u32> {
        let mut out = BTreeMap::new();
        for (name, c) in self.snapshot() {
            let t = c.table.lock().unwrap();
            let highest = t
                .entries
                .values()
                .filter_map(|v| v.entry.positions.get(owner))
                .map(|p| p.index)
                .max();
            if let Some(h) = highest {
                out.insert(name, h);
            }
        }
        out
    }

    /// Live consumers of `category`, sorted by name.
    pub fn list(&self, category: &str) -> Vec<(String, ConsumerEntry)> {
        let Some(c) = self.existing(category) else {
            return Vec::new();
        };
        let t = c.table.lock().unwrap();
        t.entries
            .iter()
            .filter(|(_, v)| v.entry.is_live())
            .map(|(n, v)| (n.clone(), v.entry.clone()))
            .collect()
    }

    /// Consumers changed after version `since`, for replication. Read
    /// [`Consumers::version`] first: every change up to it is included.
    pub fn changes_since(&self, since: u64) -> Vec<ConsumerChange> {
        let mut out = Vec::new();
        for (category, c) in self.snapshot() {
            let t = c.table.lock().unwrap();
            for (consumer, v) in &t.entries {
                if v.version > since {
                    out.push(ConsumerChange {
                        category: category.clone(),
                        consumer: consumer.clone(),
                        entry: v.entry.clone(),
                    });
                }
            }
        }
        out
    }

    /// Applies `change` to `consumer` of `category`; when it changed
    /// something, stamps a new version, wakes replication and writes the
    /// category's positions durably before returning. Returns the new state.
    pub async fn update(
        &self,
        category: &str,
        consumer: &str,
        change: impl Fn(&mut ConsumerEntry) -> bool,
    ) -> Result<ConsumerEntry, StorageError> {
        if self.existing(category).is_none() {
            // A change that changes nothing (a position move in a category
            // with no chunks) creates no state either.
            let mut probe = ConsumerEntry::default();
            if !change(&mut probe) {
                return Ok(probe);
            }
        }
        let c = self.category(category)?;
        let (entry, seq) = {
            let mut t = c.table.lock().unwrap();
            let mut v = t.entries.get(consumer).cloned().unwrap_or(Versioned {
                entry: ConsumerEntry::default(),
                version: 0,
            });
            if !change(&mut v.entry) {
                return Ok(v.entry);
            }
            // The version is taken under the lock (see `changes_since`).
            v.version = self.next_version();
            let entry = v.entry.clone();
            t.entries.insert(consumer.to_owned(), v);
            t.seq += 1;
            (entry, t.seq)
        };
        self.notify.send_modify(|v| *v = v.wrapping_add(1));
        self.persist(&c, seq).await?;
        Ok(entry)
    }

    /// Writes the category's positions if `seq` is not on disk yet. One
    /// write covers every change made before it started.
    async fn persist(&self, c: &Arc<CategoryConsumers>, seq: u64) -> Result<(), StorageError> {
        let mut persisted = c.persisted.lock().await;
        if *persisted >= seq {
            return Ok(());
        }
        let (snapshot, snap_seq) = {
            let t = c.table.lock().unwrap();
            let snapshot: BTreeMap<String, ConsumerEntry> = t
                .entries
                .iter()
                .map(|(n, v)| (n.clone(), v.entry.clone()))
                .collect();
            (snapshot, t.seq)
        };
        let file = c.file.clone();
        tokio::task::spawn_blocking(move || store::save(&file, &snapshot))
            .await
            .map_err(|e| {
                StorageError::io("writing positions failed", std::io::Error::other(e))
            })??;
        *persisted = snap_seq;
        Ok(())
    }
}

/// The chunks of a category held here, per owner, in index order.
pub fn chunks_by_owner(storage: &Storage, category: &str) -> BTreeMap<String, Vec<ChunkStatus>> {
    let mut out: BTreeMap<String, Vec<ChunkStatus>> = BTreeMap::new();
    for c in storage.chunks(category).unwrap_or_default() {
        out.entry(c.name.owner.clone()).or_default().push(c);
    }
    out
}

/// Where a consumer stands in one owner's chunks: the chunk holding its
/// next unread byte and the offset in it, or `None` when everything held
/// here is read. Without a position, reading starts at the owner's first
/// chunk held here.
pub fn next_unread(pos: Option<&Position>, chunks: &[ChunkStatus]) -> Option<(ChunkStatus, u64)> {
    let (index, offset) = pos.map_or((0, 0), |p| (p.index, p.offset));
    for c in chunks.iter().filter(|c| c.name.index >= index) {
        let start = if c.name.index == index { offset } else { 0 };
        if start < c.meta.size {
            return Some((c.clone(), start));
        }
        if !c.meta.complete {
            return None;
        }
    }
    None
}

/// Bytes of one owner's chunks held here that the position has not passed.
pub fn lag_bytes(pos: Option<&Position>, chunks: &[ChunkStatus]) -> u64 {
    let (index, offset) = pos.map_or((0, 0), |p| (p.index, p.offset));
    chunks
        .iter()
        .filter(|c| c.name.index >= index)
        .map(|c| {
            let start = if c.name.index == index { offset } else { 0 };
            c.meta.size.saturating_sub(start)
        })
        .sum()
}

/// The position just past `chunk` up to `offset`. At the end of a
/// complete chunk too, it stays in that chunk (which [`fully_read`] and
/// [`next_unread`] then pass): a complete copy can still grow, when its
/// owner comes back after a forget froze it short (the copy is repaired,
/// or follows the owner's longer upload), and the lines it gains are then
/// still ahead of every position that reached its old end. (Positions
/// written by earlier versions hold the next chunk's start, which passes
/// the chunk too.)
pub fn position_after(generation: u64, chunk: &ChunkName, offset: u64) -> Position {
    Position {
        generation,
        index: chunk.index,
        offset,
    }
}

/// True when `pos` has passed all of `chunk`.
pub fn fully_read(pos: Option<&Position>, c: &ChunkStatus) -> bool {
    pos.is_some_and(|p| {
        p.index > c.name.index
            || (p.index == c.name.index && c.meta.complete && p.offset >= c.meta.size)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lookups of categories that do not exist (any name a client sends)
    /// leave nothing behind: 200,000 of them once grew a node by 46 MiB.
    #[tokio::test]
    async fn lookups_of_unknown_categories_create_no_state() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(
            crate::storage::StorageOptions {
                data_dir: dir.path().to_owned(),
                node: "n1".into(),
                max_chunk_bytes: 1 << 20,
                rotate_after: std::time::Duration::from_secs(3600),
                sync: crate::storage::SyncPolicy::Never,
                disk_high_water_percent: 100,
                tiered: false,
                zero_runway: false,
                drop_behind: None,
                max_categories: 10_000,
                idle_close_after: crate::storage::IDLE_CLOSE_AFTER,
            },
            crate::metrics::Metrics::new(),
        )
        .await
        .unwrap();
        let consumers = Consumers::open(storage.clone()).await.unwrap();
        for i in 0..1000 {
            let cat = format!("r{i}");
            assert!(consumers.get(&cat, "c").is_none());
            assert!(consumers.list(&cat).is_empty());
            let unchanged = consumers.update(&cat, "c", |_| false).await.unwrap();
            assert_eq!(unchanged, ConsumerEntry::default());
        }
        assert!(consumers.cats.lock().unwrap().is_empty());
        // A real change still creates the consumer.
        let p = Position {
            generation: 0,
            index: 0,
            offset: 5,
        };
        consumers
            .update("app", "c", |e| e.raise("n2", p))
            .await
            .unwrap();
        assert_eq!(consumers.get("app", "c").unwrap().positions["n2"], p);
        storage.shutdown().await;
    }
}
