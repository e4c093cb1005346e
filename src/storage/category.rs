//! One category: its directory, the chunks this node holds, and the handles
//! of its writer task and waiters.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use chunkbus_client::ChunkName;
use tokio::sync::{mpsc, watch};

use super::writer::WriterMsg;
use crate::metrics::CategoryMetrics;

/// What this node knows of one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkMeta {
    /// Bytes readable here; always at the end of a whole line.
    pub size: u64,
    /// True once the owner will never append again.
    pub complete: bool,
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
}

impl Category {
    pub fn new(
        name: String,
        dir: PathBuf,
        chunks: BTreeMap<ChunkName, ChunkMeta>,
        writer: mpsc::Sender<WriterMsg>,
        metrics: CategoryMetrics,
    ) -> Self {
        Self {
            name,
            dir,
            chunks: Mutex::new(chunks),
            changed: watch::Sender::new(0),
            writer,
            metrics,
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

    /// Records a chunk's new state and wakes everyone waiting on this category.
    pub fn update(&self, chunk: &ChunkName, meta: ChunkMeta) {
        self.chunks.lock().unwrap().insert(chunk.clone(), meta);
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}
