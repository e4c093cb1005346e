//! One category: its directory, the chunks this node holds, and the handles
//! of its writer task and waiters.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use chunkbus_client::ChunkName;
use tokio::sync::{mpsc, watch};

use super::state::CategoryState;
use super::writer::WriterMsg;
use crate::metrics::CategoryMetrics;

/// What this node knows of one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkMeta {
    /// Bytes readable here; always at the end of a whole line.
    pub size: u64,
    /// True once the owner will never append again.
    pub complete: bool,
    /// Value of the node's change counter at the last update (chunks found
    /// at start-up are stamped when loaded); the replication feed sends
    /// what changed since a version.
    pub version: u64,
    /// When this node first held the chunk, in milliseconds since the Unix
    /// epoch (for files found at start-up: their creation time). Consumers
    /// read the owner whose oldest unread chunk is oldest first.
    pub created_ms: u64,
}

/// Now, in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The node-wide change counter: every chunk update takes the next value
/// and wakes whoever waits for changes (replication feeds).
#[derive(Debug)]
pub struct ChangeFeed {
    counter: AtomicU64,
    notify: watch::Sender<u64>,
}

impl ChangeFeed {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            counter: AtomicU64::new(0),
            notify: watch::Sender::new(0),
        })
    }

    /// The last version handed out.
    pub fn current(&self) -> u64 {
        self.counter.load(Ordering::SeqCst)
    }

    /// Wakes on every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.notify.subscribe()
    }

    fn next(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn announce(&self, v: u64) {
        self.notify.send_modify(|cur| *cur = (*cur).max(v));
    }
}

/// A chunk as listed to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkStatus {
    /// Parsed name.
    pub name: ChunkName,
    /// Size and completeness.
    pub meta: ChunkMeta,
}

/// Shared state of one category.
#[derive(Debug)]
pub(crate) struct Category {
    /// Validated category name.
    pub name: String,
    /// `<data>/<name>`.
    pub dir: PathBuf,
    /// Chunks held here, ordered by owner then index. A std mutex: it is
    /// never held across an await, only to read or update a few numbers.
    chunks: Mutex<BTreeMap<ChunkName, ChunkMeta>>,
    /// Bumped on every append and completion; long-polling readers wait on it.
    changed: watch::Sender<u64>,
    /// Queue of the category's writer task (bounded).
    pub writer: mpsc::Sender<WriterMsg>,
    /// Counters of this category.
    pub metrics: CategoryMetrics,
    feed: Arc<ChangeFeed>,
    /// Durable state; a std mutex held while it is saved, on a blocking
    /// thread, so that saves of one category never interleave.
    pub state: Mutex<CategoryState>,
}

impl Category {
    pub fn new(
        name: String,
        dir: PathBuf,
        chunks: BTreeMap<ChunkName, ChunkMeta>,
        writer: mpsc::Sender<WriterMsg>,
        metrics: CategoryMetrics,
        feed: Arc<ChangeFeed>,
        state: CategoryState,
    ) -> Self {
        // Chunks found at start-up get versions too (in owner and index
        // order), so that a replica asking for everything receives them.
        let mut chunks = chunks;
        for meta in chunks.values_mut() {
            meta.version = feed.next();
        }
        Self {
            name,
            dir,
            chunks: Mutex::new(chunks),
            changed: watch::Sender::new(0),
            writer,
            metrics,
            feed,
            state: Mutex::new(state),
        }
    }

    /// Path of a chunk file. The name is a parsed [`ChunkName`], so it cannot
    /// contain a path separator.
    pub fn chunk_path(&self, chunk: &ChunkName) -> PathBuf {
        self.dir.join(chunk.to_string())
    }

    pub fn meta(&self, chunk: &ChunkName) -> Option<ChunkMeta> {
        self.chunks.lock().unwrap().get(chunk).copied()
    }

    pub fn list(&self) -> Vec<ChunkStatus> {
        self.chunks
            .lock()
            .unwrap()
            .iter()
            .map(|(name, meta)| ChunkStatus {
                name: name.clone(),
                meta: *meta,
            })
            .collect()
    }

    /// Records a chunk's new size and completeness, stamps it with the next
    /// change version, and wakes everyone waiting on this category or on the
    /// change feed. The version is taken under the lock, so a feed reader
    /// that saw version `v` as current also sees every update up to `v`.
    pub fn update(&self, chunk: &ChunkName, size: u64, complete: bool) {
        let version = {
            let mut chunks = self.chunks.lock().unwrap();
            let version = self.feed.next();
            let created_ms = chunks.get(chunk).map_or_else(now_ms, |m| m.created_ms);
            chunks.insert(
                chunk.clone(),
                ChunkMeta {
                    size,
                    complete,
                    version,
                    created_ms,
                },
            );
            version
        };
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
        self.feed.announce(version);
    }

    /// This node's chunks (owner `owner`) changed after version `since`, in
    /// index order. The owner's versions grow with the index (a chunk is
    /// completed before the next one is created), so the scan walks back
    /// from the newest chunk and stops at the first unchanged one.
    pub fn changed_since(&self, owner: &str, since: u64) -> Vec<ChunkStatus> {
        let chunks = self.chunks.lock().unwrap();
        let mut out: Vec<ChunkStatus> = chunks
            .range(ChunkName::new(owner, 0)..=ChunkName::new(owner, u32::MAX))
            .rev()
            .take_while(|(_, m)| m.version > since)
            .map(|(name, meta)| ChunkStatus {
                name: name.clone(),
                meta: *meta,
            })
            .collect();
        out.reverse();
        out
    }

    /// Forgets a chunk (its file is being deleted) and wakes readers.
    pub fn remove(&self, chunk: &ChunkName) -> Option<ChunkMeta> {
        let removed = self.chunks.lock().unwrap().remove(chunk);
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
        removed
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}
