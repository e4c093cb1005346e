//! The chunk store: chunk files, rotation, recovery, group commit, waking
//! readers. It talks to the file system only and imports no other module of
//! the server but `metrics`.
//!
//! # On disk
//!
//! ```text
//! <data>/.lock                          flock held by the running node (pid inside)
//! <data>/.forgotten.json                owners this node treats as lost
//! <data>/.uploads.log                   chunks known to be in the object store
//! <data>/.multipart/<category>/<chunk>.json   progress of a multipart upload
//! <data>/<category>/                    one directory per category
//! <data>/<category>/<node>-chunk<9 digits>   raw newline-delimited bytes, as posted
//! <data>/<category>/.state.json         complete copies, next own index
//! <data>/<category>/.consumers.json     consumer positions
//! ```
//!
//! This module owns that layout: other modules ask it for an open chunk
//! file or for the path of their own file ([`Storage::consumers_file`],
//! [`Storage::upload_progress_file`]), never build paths into it.
//!
//! # Invariants
//!
//! - Only the owner (`<node>`) appends to its chunks, through one writer task
//!   per category; a request's lines land contiguously in one chunk.
//! - A chunk's readable size always ends at a `\n`.
//! - A complete chunk never receives another byte. Every chunk of this node
//!   found at start-up is complete; the next write starts a new chunk.
//! - Chunk files are created only for a write, never by a timer.
//!
//! # Durability
//!
//! With `sync` a request is answered after `fdatasync` of its chunk (and, for
//! a new chunk, of the directory); concurrent requests share one fdatasync
//! (see `syncer`). Without it, after `write(2)`: the bytes survive a process
//! crash but not a power loss. An open chunk taking many small synced groups
//! may hold zeros past its readable size, so that those fdatasyncs write
//! data only (see `runway`); they are cut off when it completes.
//!
//! # Crash
//!
//! A crash can leave a chunk with a torn last line; start-up cuts it back to
//! the last `\n`. Lines of a request that was not answered may survive (a
//! retry then duplicates them: delivery is at least once); lines of an
//! answered request are never lost.

mod category;
pub mod disk;
mod drop_behind;
mod elsewhere;
mod error;
pub mod lock;
mod mapped;
pub mod numbering;
pub mod producers;
mod read;
mod reclaim;
mod record_log;
pub(crate) mod recovery;
mod replica;
mod restore;
pub mod runway;
pub mod state;
mod syncer;
pub mod tier;
mod writer;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use bytes::Bytes;
use chunkbus_client::ChunkName;
use chunkbus_client::names::validate_category;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use category::{ChunkMeta, ChunkStatus, now_ms};
pub use disk::{DiskMonitor, DiskUsage};
pub use error::StorageError;
pub use reclaim::Reclaim;
pub use replica::OwnChange;
pub use tier::{RemoteChunks, TierOutcome};

use category::{Category, ChangeFeed};
use writer::{AppendRequest, Writer, WriterConfig, WriterMsg};

use crate::metrics::Metrics;

/// Bound of each category's write queue (requests, each bounded in bytes).
const WRITER_QUEUE_MESSAGES: usize = 4096;
/// Bound of the queue of completed copies to record.
const COMPLETION_QUEUE: usize = 1024;
/// A category's consumer positions, inside its directory.
pub const CONSUMERS_FILE: &str = ".consumers.json";
/// Progress files of multipart uploads, under the data directory.
pub const MULTIPART_DIR: &str = ".multipart";

/// Longest an append waits for writes to open before it is refused.
const WRITES_CLOSED_WAIT: Duration = Duration::from_secs(5);

/// When appended bytes reach stable storage by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPolicy {
    /// fdatasync before answering (group-committed).
    Always,
    /// Answer after `write(2)`; chunks are flushed when completed.
    Never,
    /// Answer after `write(2)`; flush open chunks at this interval.
    Interval(Duration),
}

/// Spelled as `--sync` takes it: `always`, `never`, or an interval (`100ms`).
impl std::fmt::Display for SyncPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SyncPolicy::Always => f.write_str("always"),
            SyncPolicy::Never => f.write_str("never"),
            SyncPolicy::Interval(every) => write!(f, "{}", humantime::format_duration(*every)),
        }
    }
}

/// Settings of the storage layer.
#[derive(Debug, Clone)]
pub struct StorageOptions {
    /// Data directory.
    pub data_dir: PathBuf,
    /// This node's name (owner of `<node>-chunk*`).
    pub node: String,
    /// Rotate a chunk before it would grow past this.
    pub max_chunk_bytes: u64,
    /// Complete a non-empty open chunk this long after its first write.
    pub rotate_after: Duration,
    /// Default durability of appends.
    pub sync: SyncPolicy,
    /// Shed writes above this disk usage (percent).
    pub disk_high_water_percent: u8,
    /// True when complete chunks go to an object store: acknowledged chunks
    /// are then evicted (once uploaded) rather than deleted, and uploaded
    /// chunks are evicted under disk pressure.
    pub tiered: bool,
    /// Open chunks that take many small synced writes may get zeros written
    /// ahead of their data, where the file system gains by it (see `runway`).
    pub zero_runway: bool,
    /// Written bytes of each category kept in the page cache behind its
    /// newest write; older ones are dropped once on disk. `None`: the
    /// kernel decides (see `drop_behind`).
    pub drop_behind: Option<u64>,
    /// Categories a write may create at most (copies of peers' categories
    /// are not refused: each peer holds its writers to the same bound).
    pub max_categories: usize,
    /// An open chunk not written for this long has its file closed (after
    /// a flush) until its next write, so that idle categories hold no file
    /// descriptor.
    pub idle_close_after: Duration,
}

/// Default of [`StorageOptions::idle_close_after`].
pub const IDLE_CLOSE_AFTER: Duration = Duration::from_secs(10);

/// Where an append landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// The chunk written to.
    pub chunk: ChunkName,
    /// Where the first line starts.
    pub offset: u64,
    /// Just past the last `\n`.
    pub next_offset: u64,
    /// Lines written.
    pub lines: u64,
    /// Number of the first line written in this node's numbering of the
    /// category's lines (see `numbering`).
    pub first_line: u64,
}

/// Lines read from a chunk.
#[derive(Debug, Clone)]
pub struct ReadResult {
    /// Whole lines.
    pub data: Bytes,
    /// Offset just past `data`.
    pub next_offset: u64,
    /// The chunk's state when it was read.
    pub meta: ChunkMeta,
}

/// Handle on the chunk store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Storage {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    opts: StorageOptions,
    categories: RwLock<BTreeMap<String, Arc<Category>>>,
    metrics: Arc<Metrics>,
    disk: Arc<DiskMonitor>,
    feed: Arc<ChangeFeed>,
    /// Reads evicted chunks from the object store (set when tiered).
    remote: OnceLock<Arc<dyn RemoteChunks>>,
    /// Reads chunks held by other nodes only (`--replicas k`; see
    /// `elsewhere`).
    elsewhere: OnceLock<Arc<dyn RemoteChunks>>,
    /// Held while an entry of this node's own chunks is decided from
    /// outside the writer: a chunk restored from a peer's copy, one found in
    /// the object store (so that neither decides on what the other is
    /// about to change).
    own_entries: tokio::sync::Mutex<()>,
    /// Why writes must wait, by gate (see [`Storage::close_writes`]);
    /// empty when they may go.
    writable: tokio::sync::watch::Sender<BTreeMap<&'static str, String>>,
    /// True when the data directory held no category at start-up.
    fresh: bool,
    /// This process's identity, new at every start (never 0).
    incarnation: u64,
    /// Owners this node treats as lost (see [`Storage::forget_owner`]);
    /// kept in `<data>/.forgotten.json`.
    forgotten: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Zero runways are asked for and help on this file system.
    zero_runway: bool,
    /// Queue of completed copies whose durable record is pending.
    completions: mpsc::Sender<replica::Completion>,
    /// What the copies of each (category, owner) wrote recently, to drop
    /// from the page cache in time.
    replica_cache: std::sync::Mutex<HashMap<(String, String), drop_behind::DropBehind>>,
    /// The group-commit threads of every category.
    syncers: syncer::SyncPool,
    /// Mappings of recently read complete chunks.
    mapped: Arc<mapped::MappedChunks>,
    tasks: TaskTracker,
    cancel: CancellationToken,
    _lock: lock::DirLock,
}

impl Storage {
    /// Opens (creating if needed) the data directory, takes its lock,
    /// recovers every chunk and starts the writer tasks.
    pub async fn open(opts: StorageOptions, metrics: Arc<Metrics>) -> Result<Self, StorageError> {
        let dir = opts.data_dir.clone();
        let node = opts.node.clone();
        let disk = Arc::new(DiskMonitor::new(opts.disk_high_water_percent));
        let disk2 = disk.clone();
        let zero_runway = opts.zero_runway;
        let (lock, recovered, zero_runway, forgotten) = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir).map_err(|e| {
                StorageError::io(format!("cannot create data directory {}", dir.display()), e)
            })?;
            let lock = lock::DirLock::acquire(&dir)?;
            disk2.refresh(&dir).map_err(|e| {
                StorageError::io(format!("cannot read disk usage of {}", dir.display()), e)
            })?;
            let recovered = recovery::scan(&dir, &node)?;
            let forgotten = state::load_forgotten(&dir)?;
            let zero_runway = zero_runway && runway::supported(&dir);
            Ok::<_, StorageError>((lock, recovered, zero_runway, forgotten))
        })
        .await
        .map_err(|e| StorageError::io("start-up task failed", std::io::Error::other(e)))??;
        let (completions, completions_rx) = mpsc::channel(COMPLETION_QUEUE);
        let fresh = recovered.is_empty();
        let reclaimable: u64 = recovered
            .values()
            .flat_map(|r| r.chunks.values())
            .filter(|m| m.complete && m.local && m.uploaded)
            .map(|m| m.size)
            .sum();
        disk.add_reclaimable(reclaimable);
        let syncers = syncer::SyncPool::start(syncer::SYNC_THREADS, &metrics)
            .map_err(|e| StorageError::io("cannot start the group-commit threads", e))?;
        let storage = Storage {
            shared: Arc::new(Shared {
                opts,
                categories: RwLock::new(BTreeMap::new()),
                metrics,
                disk,
                feed: ChangeFeed::new(),
                remote: OnceLock::new(),
                elsewhere: OnceLock::new(),
                own_entries: tokio::sync::Mutex::new(()),
                writable: tokio::sync::watch::Sender::new(BTreeMap::new()),
                fresh,
                incarnation: new_incarnation(),
                forgotten: std::sync::Mutex::new(forgotten),
                zero_runway,
                completions,
                replica_cache: Default::default(),
                syncers,
                mapped: Arc::default(),
                tasks: TaskTracker::new(),
                cancel: CancellationToken::new(),
                _lock: lock,
            }),
        };
        let mut chunks = 0usize;
        {
            let mut cats = storage.shared.categories.write().unwrap();
            for (name, rec) in recovered {
                chunks += rec.chunks.len();
                let cat = storage.start_category(
                    name.clone(),
                    rec.chunks,
                    (rec.next_index, rec.next_line),
                    rec.state,
                );
                cat.note_line_ends(rec.line_ends.iter().map(|(o, e)| (o.as_str(), *e)));
                cats.insert(name, cat);
            }
            tracing::info!(
                data_dir = %storage.shared.opts.data_dir.display(),
                categories = cats.len(),
                chunks,
                zero_runway = storage.shared.zero_runway,
                "storage opened"
            );
        }
        storage.start_disk_monitor();
        let s = &storage.shared;
        s.tasks
            .spawn(replica::run_completions(completions_rx, s.cancel.clone()));
        Ok(storage)
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.shared.opts.node
    }

    /// This process's identity: a random number drawn at every start
    /// (never 0). Peers send it back with the change version they have
    /// seen, so that versions of an earlier process are never taken for
    /// versions of this one (the change counter starts again at 0).
    pub fn incarnation(&self) -> u64 {
        self.shared.incarnation
    }

    /// The storage settings.
    pub fn options(&self) -> &StorageOptions {
        &self.shared.opts
    }

    /// True when the data directory held no category at start-up (a new
    /// node, or one that lost its disk).
    pub fn fresh(&self) -> bool {
        self.shared.fresh
    }

    /// Makes appends wait (up to a few seconds, then 503 with `reason`)
    /// until [`Storage::open_writes`] opens `gate` and every other gate.
    pub fn close_writes(&self, gate: &'static str, reason: impl Into<String>) {
        let reason = reason.into();
        self.shared.writable.send_modify(|g| {
            g.insert(gate, reason);
        });
    }

    /// Opens `gate`; appends go through once no gate is closed.
    pub fn open_writes(&self, gate: &'static str) {
        self.shared
            .writable
            .send_if_modified(|g| g.remove(gate).is_some());
    }

    /// Why writes are held now, one reason per closed gate.
    pub fn writes_held(&self) -> Vec<String> {
        self.shared.writable.borrow().values().cloned().collect()
    }

    /// Wakes on every chunk that becomes complete here (own rotation,
    /// completed copy, chunk listed from the object store).
    pub fn subscribe_completed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.feed.subscribe_completed()
    }

    /// The disk monitor (usage and high-water state).
    pub fn disk(&self) -> &DiskMonitor {
        &self.shared.disk
    }

    fn start_category(
        &self,
        name: String,
        chunks: BTreeMap<ChunkName, ChunkMeta>,
        (next_index, next_line): (u32, u64),
        state: state::CategoryState,
    ) -> Arc<Category> {
        let s = &self.shared;
        let (tx, rx) = mpsc::channel(WRITER_QUEUE_MESSAGES);
        let dir = s.opts.data_dir.join(&name);
        let cat = Arc::new(Category::new(
            name.clone(),
            dir,
            chunks,
            tx,
            s.metrics.category(&name),
            s.feed.clone(),
            state,
        ));
        cat.reserve_line(next_line);
        let writer = Writer::new(
            cat.clone(),
            WriterConfig {
                node: s.opts.node.clone(),
                max_chunk_bytes: s.opts.max_chunk_bytes,
                rotate_after: s.opts.rotate_after,
                sync: s.opts.sync,
                data_dir: s.opts.data_dir.clone(),
                disk: s.disk.clone(),
                metrics: s.metrics.clone(),
                zero_runway: s.zero_runway,
                drop_behind: s.opts.drop_behind,
                idle_close_after: s.opts.idle_close_after,
            },
            next_index,
            s.syncers.assign(),
        );
        s.tasks.spawn(writer.run(rx, s.cancel.clone()));
        cat
    }

    fn start_disk_monitor(&self) {
        let s = self.shared.clone();
        let weak = Arc::downgrade(&self.shared);
        let cancel = s.cancel.clone();
        drop(s);
        self.shared.tasks.spawn(async move {
            let mut tick = tokio::time::interval(disk::DISK_CHECK_INTERVAL);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let Some(s) = weak.upgrade() else { return };
                let (disk, dir) = (s.disk.clone(), s.opts.data_dir.clone());
                let metrics = s.metrics.clone();
                let storage = Storage { shared: s };
                let usage = {
                    let (disk, dir) = (disk.clone(), dir.clone());
                    tokio::task::spawn_blocking(move || disk.refresh(&dir)).await
                };
                let usage = if storage.tiered() && disk.above_limit() && disk.reclaimable() > 0 {
                    // Uploaded chunks go before any write is refused.
                    storage.evict_for_space().await;
                    tokio::task::spawn_blocking(move || disk.refresh(&dir)).await
                } else {
                    usage
                };
                drop(storage);
                if let Ok(Ok(u)) = usage {
                    metrics.disk_used_bytes.set(u.used_bytes as i64);
                    metrics.disk_total_bytes.set(u.total_bytes as i64);
                }
            }
        });
    }

    /// Where the consumer positions of `category` are kept (the file may not
    /// exist yet).
    pub fn consumers_file(&self, category: &str) -> Result<PathBuf, StorageError> {
        validate_category(category)?;
        Ok(self
            .shared
            .opts
            .data_dir
            .join(category)
            .join(CONSUMERS_FILE))
    }

    /// Where the progress of a multipart upload of `chunk` is kept (the
    /// file may not exist yet).
    pub fn upload_progress_file(
        &self,
        category: &str,
        chunk: &ChunkName,
    ) -> Result<PathBuf, StorageError> {
        validate_category(category)?;
        Ok(self
            .shared
            .opts
            .data_dir
            .join(MULTIPART_DIR)
            .join(category)
            .join(format!("{chunk}.json")))
    }

    /// This node's copy of `chunk`, opened for reading (for uploads: the
    /// file stays readable while it is open, whatever happens to the chunk).
    pub async fn open_chunk_file(
        &self,
        category: &str,
        chunk: &ChunkName,
    ) -> Result<std::fs::File, StorageError> {
        let cat = self.category(category)?;
        if !cat.meta(chunk).is_some_and(|m| m.local) {
            return Err(StorageError::UnknownChunk {
                category: category.to_owned(),
                chunk: chunk.to_string(),
            });
        }
        let path = cat.chunk_path(chunk);
        let name = chunk.to_string();
        tokio::task::spawn_blocking(move || std::fs::File::open(path))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            .map_err(|e| StorageError::io(format!("cannot open the local copy of {name}"), e))
    }

    fn category(&self, name: &str) -> Result<Arc<Category>, StorageError> {
        validate_category(name)?;
        self.shared
            .categories
            .read()
            .unwrap()
            .get(name)
            .cloned()
            .ok_or_else(|| StorageError::UnknownCategory(name.to_owned()))
    }

    /// Every category, in no particular order (a snapshot).
    fn all_categories(&self) -> Vec<Arc<Category>> {
        self.shared
            .categories
            .read()
            .unwrap()
            .values()
            .cloned()
            .collect()
    }

    fn category_or_create(&self, name: &str) -> Result<Arc<Category>, StorageError> {
        match self.category(name) {
            Err(StorageError::UnknownCategory(_)) => {}
            other => return other,
        }
        let mut cats = self.shared.categories.write().unwrap();
        if let Some(cat) = cats.get(name) {
            return Ok(cat.clone());
        }
        if self.shared.cancel.is_cancelled() {
            return Err(StorageError::ShuttingDown);
        }
        // A rare, small blocking step (mkdir + fsync of the data dir) under
        // the lock, so that two first writes cannot race.
        let dir = self.shared.opts.data_dir.join(name);
        std::fs::create_dir(&dir)
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .and_then(|()| fsync_dir(&self.shared.opts.data_dir))
            .map_err(|e| StorageError::io(format!("cannot create category {name:?}"), e))?;
        tracing::info!(category = name, "category created");
        let cat = self.start_category(
            name.to_owned(),
            BTreeMap::new(),
            (0, 0),
            state::CategoryState::default(),
        );
        cats.insert(name.to_owned(), cat.clone());
        Ok(cat)
    }

    /// Appends `data` (whole lines, ending with `\n`, `lines` of them) to this
    /// node's open chunk of `category`, creating the category if needed.
    /// With `sync`, answers once the bytes are on stable storage.
    pub async fn append(
        &self,
        category: &str,
        data: Bytes,
        lines: u64,
        sync: bool,
    ) -> Result<Appended, StorageError> {
        self.append_parts(category, vec![data], lines, sync).await
    }

    /// [`Storage::append`] of lines held in several buffers, in order (a
    /// request body as it arrived), written without joining them.
    pub async fn append_parts(
        &self,
        category: &str,
        data: Vec<Bytes>,
        lines: u64,
        sync: bool,
    ) -> Result<Appended, StorageError> {
        self.append_tagged(category, data, lines, sync, None).await
    }

    /// [`Storage::append_parts`] of an idempotent request: with `producer`,
    /// the writer records (producer, sequence) with the lines, and the
    /// category's index remembers where they went (see `producers`).
    pub async fn append_tagged(
        &self,
        category: &str,
        data: Vec<Bytes>,
        lines: u64,
        sync: bool,
        producer: Option<producers::ProducerTag>,
    ) -> Result<Appended, StorageError> {
        debug_assert!(data.last().and_then(|d| d.last()) == Some(&b'\n'));
        self.wait_writable().await?;
        let disk = &self.shared.disk;
        if disk.over_high_water() {
            return Err(StorageError::HighWater {
                used_percent: disk.usage().used_percent,
                limit_percent: disk.limit_percent(),
            });
        }
        let cat = match self.category(category) {
            Err(StorageError::UnknownCategory(_)) => {
                let held = self.shared.categories.read().unwrap().len();
                if held >= self.shared.opts.max_categories {
                    return Err(StorageError::TooManyCategories {
                        category: category.to_owned(),
                        limit: self.shared.opts.max_categories,
                    });
                }
                self.category_or_create(category)?
            }
            other => other?,
        };
        let (reply, rx) = oneshot::channel();
        let msg = WriterMsg::Append(AppendRequest {
            data,
            lines,
            sync,
            reply,
            producer: producer.clone(),
        });
        cat.writer
            .send(msg)
            .await
            .map_err(|_| StorageError::ShuttingDown)?;
        let appended = rx.await.map_err(|_| StorageError::ShuttingDown)??;
        if let Some(tag) = producer {
            let mut index = cat.producers.lock().unwrap();
            // Not read yet: the log holds the record, read when needed.
            if index.loaded {
                index.insert(
                    &tag.producer,
                    producers::Recorded {
                        sequence: tag.sequence,
                        chunk: appended.chunk.clone(),
                        offset: appended.offset,
                        next_offset: appended.next_offset,
                        lines: appended.lines,
                        crc: tag.crc,
                        verified: true,
                    },
                );
            }
        }
        Ok(appended)
    }

    /// Stores again, durably, lines of `chunk` that only one place holds
    /// (an object of the name of this node's chunk, see
    /// `TierOutcome::Conflicting`; or this node's copy of a lost owner's
    /// chunk past the object another replica uploaded, see
    /// [`Storage::give_way_to_object`]), read `read` of those lines: new lines,
    /// numbered after every line this node numbered so far. Tagged as an
    /// idempotent request (the producer `chunkbus.rescue.<chunk>.<read>`,
    /// the sequence from the lines' length and checksum), so that a retry
    /// after a crash finds them stored instead of storing them twice.
    /// `data` ends a line. True when stored now (false: stored before).
    pub async fn rescue_lines(
        &self,
        category: &str,
        chunk: &ChunkName,
        read: u64,
        data: Bytes,
        lines: u64,
    ) -> Result<bool, StorageError> {
        let producer = format!(
            "{}rescue.{chunk}.{read}",
            producers::INTERNAL_PRODUCER_PREFIX
        );
        let crc = crc32c::crc32c(&data);
        let sequence = (u64::from(crc) << 32) | (data.len() as u64 & u64::from(u32::MAX));
        // A node name is at most 64 bytes of letters, digits, `_` and `-`.
        debug_assert!(producers::validate_producer(&producer).is_ok());
        if self
            .producer_lookup(category, &producer, sequence)
            .await?
            .is_some()
        {
            return Ok(false);
        }
        let tag = producers::ProducerTag {
            producer,
            sequence,
            crc,
        };
        self.append_tagged(category, vec![data], lines, true, Some(tag))
            .await?;
        Ok(true)
    }

    /// Where this node stored `sequence` of `producer` in `category`, if
    /// it remembers: `None` for a request to store. A record read back
    /// from the log is first checked against the bytes at its position
    /// (see `producers`); one that does not match is forgotten.
    pub async fn producer_lookup(
        &self,
        category: &str,
        producer: &str,
        sequence: u64,
    ) -> Result<Option<producers::Recorded>, StorageError> {
        let Ok(cat) = self.category(category) else {
            return Ok(None);
        };
        Self::load_producers(&cat).await?;
        let Some(r) = cat
            .producers
            .lock()
            .unwrap()
            .get(producer, sequence)
            .cloned()
        else {
            return Ok(None);
        };
        if r.verified {
            return Ok(Some(r));
        }
        let len = r.next_offset - r.offset;
        let read = self
            .read(
                category,
                &r.chunk,
                r.offset,
                len,
                Duration::ZERO,
                &CancellationToken::new(),
            )
            .await;
        let stored = match read {
            Ok(got) => got.data.len() as u64 == len && crc32c::crc32c(&got.data) == r.crc,
            Err(StorageError::UnknownChunk { .. }) => false,
            Err(e) => return Err(e),
        };
        let mut index = cat.producers.lock().unwrap();
        if stored {
            index.mark_verified(producer, sequence);
            Ok(Some(producers::Recorded {
                verified: true,
                ..r
            }))
        } else {
            index.remove(producer, sequence);
            Ok(None)
        }
    }

    /// The sequences of `producer` this node remembers in `category`,
    /// oldest first (each still to be checked by
    /// [`Storage::producer_lookup`]).
    pub async fn producer_sequences(
        &self,
        category: &str,
        producer: &str,
    ) -> Result<Vec<u64>, StorageError> {
        let Ok(cat) = self.category(category) else {
            return Ok(Vec::new());
        };
        Self::load_producers(&cat).await?;
        Ok(cat.producers.lock().unwrap().sequences(producer))
    }

    /// Reads the category's producer log into its index, once.
    async fn load_producers(cat: &Category) -> Result<(), StorageError> {
        if cat.producers.lock().unwrap().loaded {
            return Ok(());
        }
        let dir = cat.dir.clone();
        let index = tokio::task::spawn_blocking(move || producers::load(&dir))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            .map_err(|e| StorageError::io("cannot read the producer log", e))?;
        let mut held = cat.producers.lock().unwrap();
        if !held.loaded {
            *held = index;
        }
        Ok(())
    }

    /// Completes this node's open chunk of `category` now, if it holds data.
    pub async fn rotate(&self, category: &str) -> Result<(), StorageError> {
        let cat = self.category(category)?;
        let (done, rx) = oneshot::channel();
        cat.writer
            .send(WriterMsg::Rotate(done))
            .await
            .map_err(|_| StorageError::ShuttingDown)?;
        rx.await.map_err(|_| StorageError::ShuttingDown)
    }

    /// Category names, sorted.
    pub fn categories(&self) -> Vec<String> {
        self.shared
            .categories
            .read()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    }

    /// Wakes on every append and completion in `category`; `None` when the
    /// category does not exist (yet).
    pub fn watch(&self, category: &str) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.category(category).ok().map(|c| c.subscribe())
    }

    /// Chunks of `category`, sorted by owner then index.
    pub fn chunks(&self, category: &str) -> Result<Vec<ChunkStatus>, StorageError> {
        Ok(self.category(category)?.list())
    }

    /// Reads whole lines of `chunk` from `offset` (see `read::read_lines`).
    ///
    /// With a non-zero `wait`, when there is nothing past `offset` and the
    /// chunk is not complete, waits until an append or completion wakes it,
    /// `wait` passes, or `stop` is cancelled.
    pub async fn read(
        &self,
        category: &str,
        chunk: &ChunkName,
        offset: u64,
        max_bytes: u64,
        wait: Duration,
        stop: &CancellationToken,
    ) -> Result<ReadResult, StorageError> {
        let cat = self.category(category)?;
        let unknown = || StorageError::UnknownChunk {
            category: category.to_owned(),
            chunk: chunk.to_string(),
        };
        let mut changes = cat.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        let mut waited_out = wait.is_zero();
        let meta = loop {
            changes.borrow_and_update();
            let meta = cat.meta(chunk).ok_or_else(unknown)?;
            if offset != meta.size || meta.complete || waited_out {
                break meta;
            }
            let _waiting = crate::metrics::GaugeHeld::new(&self.shared.metrics.read_waiters);
            tokio::select! {
                r = changes.changed() => if r.is_err() { waited_out = true },
                _ = tokio::time::sleep_until(deadline) => waited_out = true,
                _ = stop.cancelled() => waited_out = true,
            }
        };
        let name = chunk.to_string();
        let (data, next_offset, lines) = self
            .with_bytes(&cat, chunk, &meta, move |file| {
                let (data, next) = read::read_lines(file, &name, offset, meta.size, max_bytes)?;
                let lines = file.count_lines(&data, offset);
                Ok((data, next, lines))
            })
            .await?;
        cat.metrics.bytes_out.inc_by(data.len() as u64);
        cat.metrics.lines_out.inc_by(lines);
        Ok(ReadResult {
            data,
            next_offset,
            meta,
        })
    }

    /// Deletes a complete chunk held here (its file and its entry). For this
    /// node's own chunks, the category state first records that the index
    /// must not be used again. Incomplete chunks are never deleted. Only
    /// through [`Storage::reclaim`].
    async fn delete_chunk(&self, category: &str, chunk: &ChunkName) -> Result<bool, StorageError> {
        let cat = self.category(category)?;
        if !cat.meta(chunk).is_some_and(|m| m.complete) {
            return Ok(false);
        }
        let own = chunk.owner == self.node();
        let path = cat.chunk_path(chunk);
        let (cat2, index) = (cat.clone(), chunk.index);
        tokio::task::spawn_blocking(move || {
            if own {
                let mut st = cat2.state.lock().unwrap();
                if st.next_own_index.is_none_or(|n| n <= index) {
                    st.next_own_index = Some(index + 1);
                    state::save(&cat2.dir, &st)?;
                }
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(StorageError::io(
                        format!("cannot delete {}", path.display()),
                        e,
                    ));
                }
            }
            fsync_dir(&cat2.dir)
                .map_err(|e| StorageError::io(format!("cannot flush {}", cat2.dir.display()), e))
        })
        .await
        .map_err(|e| StorageError::io("delete task failed", std::io::Error::other(e)))??;
        cat.remove(chunk);
        Ok(true)
    }

    /// Checks that `offset` is a line boundary of `chunk` as held here (0,
    /// the end, or just after a `\n`); returns what is held of the chunk.
    pub async fn check_boundary(
        &self,
        category: &str,
        chunk: &ChunkName,
        offset: u64,
    ) -> Result<ChunkMeta, StorageError> {
        let cat = self.category(category)?;
        let meta = cat.meta(chunk).ok_or_else(|| StorageError::UnknownChunk {
            category: category.to_owned(),
            chunk: chunk.to_string(),
        })?;
        if offset > meta.size {
            return Err(StorageError::OffsetPastEnd {
                chunk: chunk.to_string(),
                offset,
                size: meta.size,
            });
        }
        if offset == 0 || offset == meta.size {
            return Ok(meta);
        }
        let name = chunk.to_string();
        self.with_bytes(&cat, chunk, &meta, move |file| {
            let mut b = [0u8; 1];
            file.read_exact_at(&mut b, offset - 1)
                .map_err(|e| StorageError::io(format!("cannot read chunk {name}"), e))?;
            if b[0] == b'\n' {
                Ok(meta)
            } else {
                Err(StorageError::NotLineBoundary {
                    chunk: name.clone(),
                    offset,
                })
            }
        })
        .await
    }

    /// Runs `f` on a blocking thread over the chunk's bytes: the local file,
    /// or the object store when the local copy is evicted (or is evicted
    /// while this read starts), or the nodes that hold it
    /// (`elsewhere`).
    async fn with_bytes<T: Send + 'static>(
        &self,
        cat: &Arc<Category>,
        chunk: &ChunkName,
        meta: &ChunkMeta,
        f: impl Fn(&dyn read::ReadAt) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        self.with_bytes_from(cat, chunk, meta, true, f).await
    }

    /// [`Storage::with_bytes`]; `other_nodes`: false to read only this
    /// node's disk and the object store (what this node answers another
    /// node that reads through it: never forwarded, so reads cannot go
    /// round in circles).
    async fn with_bytes_from<T: Send + 'static>(
        &self,
        cat: &Arc<Category>,
        chunk: &ChunkName,
        meta: &ChunkMeta,
        other_nodes: bool,
        f: impl Fn(&dyn read::ReadAt) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let (local, complete, size) = (meta.local, meta.complete, meta.size);
        let mapped = self.shared.mapped.clone();
        let path = cat.chunk_path(chunk);
        // Bytes of a complete chunk read before and still in memory are
        // served here, without a hand-off to a blocking thread.
        if local
            && complete
            && size > 0
            && let Some(m) = mapped.cached(&path, size)
        {
            match f(&m) {
                Err(StorageError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::WouldBlock => {}
                done => return done,
            }
        }
        // Bytes not (or no longer) on this disk: an uploaded chunk's from
        // the object store (evicted, or evicted while this read starts),
        // another's from the nodes that hold it (held elsewhere, or its
        // copy here dropped while this read starts).
        let remote = if meta.uploaded {
            self.remote().cloned()
        } else if other_nodes {
            self.elsewhere_reader().cloned()
        } else {
            None
        };
        let (category, chunk) = (cat.name.clone(), chunk.clone());
        tokio::task::spawn_blocking(move || {
            if local {
                // A complete chunk never changes: read from its mapping.
                let opened: std::io::Result<Box<dyn read::ReadAt>> = if complete && size > 0 {
                    mapped.get(&path, size).map(|m| Box::new(m) as _)
                } else {
                    std::fs::File::open(&path).map(|file| Box::new(file) as _)
                };
                match opened {
                    Ok(file) => return f(&*file),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && remote.is_some() => {}
                    Err(e) => {
                        return Err(StorageError::io(format!("cannot read chunk {chunk}"), e));
                    }
                }
            }
            let Some(remote) = remote else {
                return Err(StorageError::UnknownChunk {
                    category,
                    chunk: chunk.to_string(),
                });
            };
            let file = tier::RemoteFile {
                remote: remote.as_ref(),
                category: &category,
                chunk: &chunk,
            };
            f(&file).map_err(|e| match e {
                StorageError::Io { source, .. }
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    StorageError::RemoteMissing {
                        category: category.clone(),
                        chunk: chunk.to_string(),
                    }
                }
                StorageError::Io { source, .. } => StorageError::Remote {
                    chunk: chunk.to_string(),
                    message: source.to_string(),
                },
                other => other,
            })
        })
        .await
        .map_err(|e| StorageError::io("read task failed", std::io::Error::other(e)))?
    }

    /// Waits (a few seconds at most) while writes are closed.
    async fn wait_writable(&self) -> Result<(), StorageError> {
        if self.shared.writable.borrow().is_empty() {
            return Ok(());
        }
        let mut rx = self.shared.writable.subscribe();
        let wait = rx.wait_for(BTreeMap::is_empty);
        match tokio::time::timeout(WRITES_CLOSED_WAIT, wait).await {
            Ok(_) => Ok(()),
            Err(_) => {
                let reasons: Vec<String> =
                    self.shared.writable.borrow().values().cloned().collect();
                Err(StorageError::NotReady(if reasons.is_empty() {
                    "the node is starting".to_owned()
                } else {
                    reasons.join("; ")
                }))
            }
        }
    }

    /// Stops the writer tasks after they have written and flushed every
    /// accepted request; waits for them.
    pub async fn shutdown(&self) {
        self.shared.cancel.cancel();
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
        tracing::info!("storage stopped; every accepted write is on disk");
    }
}

/// A random, non-zero process identity (see [`Storage::incarnation`]).
fn new_incarnation() -> u64 {
    use std::hash::BuildHasher;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    // RandomState is seeded from the OS's random source.
    std::collections::hash_map::RandomState::new().hash_one((nanos, std::process::id())) | 1
}

/// fsyncs a directory so that entries created or renamed in it survive a crash.
pub(crate) fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod replica_tests;
#[cfg(test)]
mod tests;
