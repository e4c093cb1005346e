//! One category: its directory, the chunks this node holds, and the handles
//! of its writer task and waiters.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
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
    /// True when this node has the bytes on its local disk (false once the
    /// local copy of an uploaded chunk was evicted).
    pub local: bool,
    /// True once the chunk is in the object store.
    pub uploaded: bool,
    /// Number of the chunk's first line in its owner's numbering, when
    /// known (see `numbering`).
    pub first_line: Option<u64>,
    /// Lines in the `size` bytes held here, when known.
    pub lines: Option<u64>,
}

impl ChunkMeta {
    /// A chunk held on local disk, not uploaded.
    pub fn local(size: u64, complete: bool, created_ms: u64) -> Self {
        Self {
            size,
            complete,
            version: 0,
            created_ms,
            local: true,
            uploaded: false,
            first_line: None,
            lines: None,
        }
    }

    /// The numbers of the bytes held, when both are known.
    pub fn line_record(&self) -> Option<super::numbering::LineRecord> {
        super::numbering::LineRecord::known(self.size, self.first_line, self.lines)
    }
}

/// The chunks of a category and, by change version, which changed when.
#[derive(Debug, Default)]
struct Chunks {
    map: BTreeMap<ChunkName, ChunkMeta>,
    by_version: BTreeMap<u64, ChunkName>,
}

impl Chunks {
    /// Stores `meta` under the next version of `feed`; returns the version.
    fn put(&mut self, feed: &ChangeFeed, chunk: &ChunkName, mut meta: ChunkMeta) -> u64 {
        meta.version = feed.next();
        if let Some(old) = self.map.insert(chunk.clone(), meta) {
            self.by_version.remove(&old.version);
        }
        self.by_version.insert(meta.version, chunk.clone());
        meta.version
    }
}

/// Now, in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Changes the value of `tx` and wakes its receivers, when it has any: a
/// watch notification takes eight locks (one per shard of its waiters)
/// even when nobody waits, and every batch a writer appends sends two.
/// The count is read under the value's lock, so a receiver that subscribes,
/// then reads the value (`borrow_and_update`) and the state it waits on,
/// then waits, either is counted or sees the change.
fn wake(tx: &watch::Sender<u64>, change: impl FnOnce(&mut u64)) {
    tx.send_if_modified(|v| {
        change(v);
        tx.receiver_count() > 0
    });
}

/// The node-wide change counter: every chunk update takes the next value
/// and wakes whoever waits for changes (replication feeds).
#[derive(Debug)]
pub struct ChangeFeed {
    counter: AtomicU64,
    notify: watch::Sender<u64>,
    completed: watch::Sender<u64>,
}

impl ChangeFeed {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            counter: AtomicU64::new(0),
            notify: watch::Sender::new(0),
            completed: watch::Sender::new(0),
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

    /// Wakes on every chunk that becomes complete (or arrives complete).
    pub fn subscribe_completed(&self) -> watch::Receiver<u64> {
        self.completed.subscribe()
    }

    pub(super) fn completed(&self) {
        wake(&self.completed, |v| *v = v.wrapping_add(1));
    }

    fn announce(&self, v: u64) {
        wake(&self.notify, |cur| *cur = (*cur).max(v));
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
    chunks: Mutex<Chunks>,
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
    /// This node's lowest usable chunk index as reserved in `state` since
    /// start-up (read by the writer without taking the state's lock).
    reserved: AtomicU32,
    /// The lowest number the next own chunk's first line may take (see
    /// `numbering`): known at start-up, or learned from the peers.
    reserved_line: AtomicU64,
    /// Per owner, the highest end of the numbers recorded here (see
    /// `numbering`), deleted chunks included, or given by the owner's full
    /// listing.
    line_ends: Mutex<BTreeMap<String, u64>>,
    /// The tagged requests stored here (idempotent produce), read from
    /// the log when first needed.
    pub producers: Mutex<super::producers::ProducerIndex>,
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
        let mut all = Chunks::default();
        for (name, meta) in chunks {
            all.put(&feed, &name, meta);
        }
        Self {
            name,
            dir,
            chunks: Mutex::new(all),
            changed: watch::Sender::new(0),
            writer,
            metrics,
            feed,
            reserved: AtomicU32::new(state.next_own_index.unwrap_or(0)),
            reserved_line: AtomicU64::new(0),
            line_ends: Mutex::default(),
            producers: Mutex::default(),
            state: Mutex::new(state),
        }
    }

    /// The lowest index this node may use for a new chunk, as reserved.
    pub fn reserved_index(&self) -> u32 {
        self.reserved.load(Ordering::SeqCst)
    }

    /// Raises the reserved index (after the state recording it was saved).
    pub fn reserve_index(&self, next: u32) {
        self.reserved.fetch_max(next, Ordering::SeqCst);
    }

    /// The lowest number the next own chunk's first line may take.
    pub fn reserved_line(&self) -> u64 {
        self.reserved_line.load(Ordering::SeqCst)
    }

    /// Raises the number the next own chunk's first line takes at least.
    pub fn reserve_line(&self, next: u64) {
        self.reserved_line.fetch_max(next, Ordering::SeqCst);
    }

    /// [`Category::reserve_line`], saved in the state first (`next_own_line`)
    /// when it raises it; blocking.
    pub fn reserve_line_durably(&self, next: u64) -> Result<(), super::StorageError> {
        {
            let mut st = self.state.lock().unwrap();
            if st.next_own_line.is_none_or(|n| n < next) {
                st.next_own_line = Some(next);
                super::state::save(&self.dir, &st)?;
            }
        }
        self.reserve_line(next);
        Ok(())
    }

    /// Appends line records to the category's line log, durably; called
    /// with the state lock held (records never interleave).
    pub fn record_numbers(
        &self,
        records: &[(ChunkName, super::numbering::LineRecord)],
    ) -> Result<(), super::StorageError> {
        super::numbering::append(&self.dir, records)?;
        self.note_line_ends(records.iter().map(|(c, r)| (c.owner.as_str(), r.end())));
        Ok(())
    }

    /// Raises the highest recorded end of each owner's numbers.
    pub fn note_line_ends<'a>(&self, ends: impl IntoIterator<Item = (&'a str, u64)>) {
        let mut known = self.line_ends.lock().unwrap();
        for (owner, end) in ends {
            match known.get_mut(owner) {
                Some(e) => *e = (*e).max(end),
                None => {
                    known.insert(owner.to_owned(), end);
                }
            }
        }
    }

    /// Raises the end of `owner`'s numbers to `end`, as its full listing
    /// gives it: durable (`.line_ends.json`) before it counts; blocking.
    pub fn learn_line_end(&self, owner: &str, end: u64) -> Result<(), super::StorageError> {
        {
            // One writer of the file at a time.
            let _serial = self.state.lock().unwrap();
            let mut ends = super::state::load_line_ends(&self.dir)?;
            if ends.get(owner).is_none_or(|&e| e < end) {
                ends.insert(owner.to_owned(), end);
                super::state::save_line_ends(&self.dir, &ends)?;
            }
        }
        self.note_line_ends([(owner, end)]);
        Ok(())
    }

    /// The highest end of `owner`'s numbers recorded here.
    pub fn line_end_of(&self, owner: &str) -> Option<u64> {
        self.line_ends.lock().unwrap().get(owner).copied()
    }

    /// Path of a chunk file. The name is a parsed [`ChunkName`], so it cannot
    /// contain a path separator.
    pub fn chunk_path(&self, chunk: &ChunkName) -> PathBuf {
        self.dir.join(chunk.to_string())
    }

    pub fn meta(&self, chunk: &ChunkName) -> Option<ChunkMeta> {
        self.chunks.lock().unwrap().map.get(chunk).copied()
    }

    /// The chunk of `chunk`'s owner held here right after it, if any.
    pub fn next_of_owner(&self, chunk: &ChunkName) -> Option<ChunkStatus> {
        use std::ops::Bound::{Excluded, Unbounded};
        let chunks = self.chunks.lock().unwrap();
        let (name, meta) = chunks.map.range((Excluded(chunk), Unbounded)).next()?;
        (name.owner == chunk.owner).then(|| ChunkStatus {
            name: name.clone(),
            meta: *meta,
        })
    }

    pub fn list(&self) -> Vec<ChunkStatus> {
        self.chunks
            .lock()
            .unwrap()
            .map
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
    ///
    /// `first_line` is set when given; `lines` counts the lines in `size`
    /// bytes; when not given, the count is kept if the size is, and unknown
    /// otherwise.
    pub fn update(
        &self,
        chunk: &ChunkName,
        size: u64,
        complete: bool,
        first_line: Option<u64>,
        lines: Option<u64>,
    ) {
        let version = {
            let mut chunks = self.chunks.lock().unwrap();
            let meta = match chunks.map.get(chunk) {
                Some(m) => ChunkMeta {
                    size,
                    complete,
                    first_line: first_line.or(m.first_line),
                    lines: lines.or(m.lines.filter(|_| m.size == size)),
                    ..*m
                },
                None => ChunkMeta {
                    first_line,
                    lines,
                    ..ChunkMeta::local(size, complete, now_ms())
                },
            };
            chunks.put(&self.feed, chunk, meta)
        };
        if complete {
            self.feed.completed();
        }
        wake(&self.changed, |v| *v = v.wrapping_add(1));
        self.feed.announce(version);
    }

    /// Records `meta` for `chunk` under the next change version and wakes
    /// its readers (a chunk held elsewhere, as its owner lists it).
    pub fn put_meta(&self, chunk: &ChunkName, meta: ChunkMeta) {
        let version = self.chunks.lock().unwrap().put(&self.feed, chunk, meta);
        if meta.complete {
            self.feed.completed();
        }
        wake(&self.changed, |v| *v = v.wrapping_add(1));
        self.feed.announce(version);
    }

    /// Makes the copy of a chunk held elsewhere (`size` bytes, `lines`
    /// lines) the local one, when it holds what is listed (a complete
    /// chunk: exactly its size). `Some(complete)` when adopted.
    pub fn adopt(&self, chunk: &ChunkName, size: u64, lines: u64) -> Option<bool> {
        let version = {
            let mut chunks = self.chunks.lock().unwrap();
            let m = *chunks.map.get(chunk)?;
            let fits = if m.complete {
                size == m.size
            } else {
                size >= m.size
            };
            if !m.elsewhere() || !fits {
                return None;
            }
            let meta = ChunkMeta {
                size,
                local: true,
                lines: Some(lines),
                ..m
            };
            chunks.put(&self.feed, chunk, meta)
        };
        wake(&self.changed, |v| *v = v.wrapping_add(1));
        self.feed.announce(version);
        Some(self.meta(chunk).is_some_and(|m| m.complete))
    }

    /// Sets the number of a chunk's first line, without a new version (it
    /// comes from the owner's listing). False when unknown or unchanged.
    pub fn set_first_line(&self, chunk: &ChunkName, first_line: u64) -> bool {
        let mut chunks = self.chunks.lock().unwrap();
        match chunks.map.get_mut(chunk) {
            Some(m) if m.first_line != Some(first_line) => {
                m.first_line = Some(first_line);
                true
            }
            _ => false,
        }
    }

    /// Sets the numbers of a chunk whose size is `rec.size` (learned from
    /// its owner or its peers, or from the object store), without a new
    /// version. False when the chunk is unknown, of another size, or
    /// already numbered so.
    pub fn set_numbers(&self, chunk: &ChunkName, rec: super::numbering::LineRecord) -> bool {
        let mut chunks = self.chunks.lock().unwrap();
        match chunks.map.get_mut(chunk) {
            Some(m) if m.size == rec.size && m.line_record() != Some(rec) => {
                m.first_line = Some(rec.first);
                m.lines = Some(rec.lines);
                true
            }
            _ => false,
        }
    }

    /// Sets a chunk's `uploaded` and `local` flags; returns false when the
    /// chunk is unknown or nothing changed. A change of `uploaded` takes a
    /// new version, so that the replication feed carries it.
    pub fn set_tier(&self, chunk: &ChunkName, uploaded: Option<bool>, local: Option<bool>) -> bool {
        let version = {
            let mut chunks = self.chunks.lock().unwrap();
            let Some(m) = chunks.map.get_mut(chunk) else {
                return false;
            };
            let new = ChunkMeta {
                uploaded: uploaded.unwrap_or(m.uploaded),
                local: local.unwrap_or(m.local),
                ..*m
            };
            if new == *m {
                return false;
            }
            if new.uploaded == m.uploaded {
                *m = new;
                None
            } else {
                Some(chunks.put(&self.feed, chunk, new))
            }
        };
        if let Some(v) = version {
            self.feed.announce(v);
        }
        wake(&self.changed, |v| *v = v.wrapping_add(1));
        true
    }

    /// Records a complete chunk that is only in the object store.
    pub fn insert_remote(
        &self,
        chunk: &ChunkName,
        size: u64,
        created_ms: u64,
        numbers: Option<super::numbering::LineRecord>,
    ) {
        let numbers = numbers.filter(|r| r.size == size);
        let version = self.chunks.lock().unwrap().put(
            &self.feed,
            chunk,
            ChunkMeta {
                size,
                complete: true,
                version: 0,
                created_ms,
                local: false,
                uploaded: true,
                first_line: numbers.map(|r| r.first),
                lines: numbers.map(|r| r.lines),
            },
        );
        self.feed.completed();
        wake(&self.changed, |v| *v = v.wrapping_add(1));
        self.feed.announce(version);
    }

    /// Chunks of `owner` changed after version `since`, in index order
    /// (the version index makes this cost what changed, not what is held).
    pub fn changed_since(&self, owner: &str, since: u64) -> Vec<ChunkStatus> {
        let chunks = self.chunks.lock().unwrap();
        let mut out: Vec<ChunkStatus> = chunks
            .by_version
            .range(since.saturating_add(1)..)
            .filter(|(_, name)| name.owner == owner)
            .map(|(_, name)| ChunkStatus {
                name: name.clone(),
                meta: chunks.map[name],
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Forgets a chunk (its file is being deleted) and wakes readers.
    pub fn remove(&self, chunk: &ChunkName) -> Option<ChunkMeta> {
        let removed = {
            let mut chunks = self.chunks.lock().unwrap();
            let removed = chunks.map.remove(chunk);
            if let Some(m) = removed {
                chunks.by_version.remove(&m.version);
            }
            removed
        };
        wake(&self.changed, |v| *v = v.wrapping_add(1));
        removed
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}
