//! The storage side of replication: this node's change feed for its peers,
//! and writing copies of other owners' chunks.
//!
//! Copies are written only through these methods, and only for chunks of
//! other owners: a replica never writes into a chunk of its own name. One
//! puller per owner calls them, so appends to one replica chunk never race.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use bytes::Bytes;
use chunkbus_client::ChunkName;
use tokio::sync::watch;

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::category::Category;
use super::drop_behind::{self, DropBehind};
use super::{ChunkMeta, Storage, StorageError, fsync_dir, numbering, state, tier};

/// A copy is flushed in the background each time it grows past a multiple
/// of this many bytes.
const REPLICA_FLUSH_EVERY_BYTES: u64 = 16 << 20;

/// A completed copy whose durable record is still to be written.
#[derive(Debug)]
pub(super) struct Completion {
    pub(super) cat: Arc<Category>,
    pub(super) chunk: ChunkName,
    pub(super) path: PathBuf,
    /// The size it was completed at.
    pub(super) size: u64,
}

/// Writes completion records in order until `cancel`, then drains.
pub(super) async fn run_completions(mut rx: mpsc::Receiver<Completion>, cancel: CancellationToken) {
    loop {
        let job = tokio::select! {
            job = rx.recv() => job,
            _ = cancel.cancelled() => None,
        };
        let Some(job) = job else { break };
        persist(job).await;
    }
    rx.close();
    while let Some(job) = rx.recv().await {
        persist(job).await;
    }
}

async fn persist(job: Completion) {
    let name = job.chunk.to_string();
    match tokio::task::spawn_blocking(move || record_completion(&job)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::error!(chunk = %name, error = %e, "cannot record a completed copy; it will be completed again after a restart")
        }
        Err(e) => tracing::error!(chunk = %name, error = %e, "completion task failed"),
    }
}

/// Flushes a completed copy and records it complete, unless it changed
/// since it was queued: reopened for repair, or gone from this node (taken
/// over by its object, evicted, released: a copy not on disk is never
/// recorded complete). True when recorded. On a blocking thread.
pub(super) fn record_completion(job: &Completion) -> Result<bool, StorageError> {
    let Completion {
        cat,
        chunk,
        path,
        size,
    } = job;
    let flushed = std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .and_then(|()| fsync_dir(&cat.dir));
    match flushed {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::debug!(chunk = %chunk, "a completed copy left this node before its completion was recorded");
            return Ok(false);
        }
        Err(e) => {
            return Err(StorageError::io(
                format!("cannot flush copy {}", path.display()),
                e,
            ));
        }
    }
    // Under the state lock, as a reopening for repair is: a copy reopened
    // since it was queued is not recorded complete.
    let mut st = cat.state.lock().unwrap();
    let meta = cat
        .meta(chunk)
        .filter(|m| m.complete && m.local && m.size == *size);
    if let Some(numbers) = meta.and_then(|m| m.line_record()) {
        cat.record_numbers(&[(chunk.clone(), numbers)])?;
    }
    if meta.is_some() && st.mark_complete(&chunk.owner, chunk.index) {
        state::save(&cat.dir, &st)?;
    }
    Ok(meta.is_some())
}

/// Writes `data` at `offset` of the copy of `chunk` at `path` (offset 0
/// starts it afresh: whatever a crash left past the known size goes). On
/// a blocking thread. `creating`: the copy is about to exist, and a record
/// of its index as complete (its copy was deleted, or the owner was
/// forgotten before it was copied) is removed first, so that a crash never
/// finds a partial copy recorded complete.
pub(super) fn write_copy(
    cat: &Category,
    chunk: &ChunkName,
    path: &std::path::Path,
    offset: u64,
    data: &[u8],
    creating: bool,
) -> std::io::Result<()> {
    if creating {
        let mut st = cat.state.lock().unwrap();
        if st.unmark_complete(&chunk.owner, chunk.index) {
            state::save(&cat.dir, &st).map_err(std::io::Error::other)?;
        }
    }
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    if offset == 0 {
        file.set_len(0)?;
    }
    file.write_all_at(data, offset)
}

/// One of this node's chunks that changed, for the replication feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnChange {
    /// Category.
    pub category: String,
    /// The chunk (owned by this node).
    pub name: ChunkName,
    /// Its size and completeness now.
    pub meta: ChunkMeta,
}

impl Storage {
    /// The last change version handed out on this node.
    pub fn feed_version(&self) -> u64 {
        self.shared.feed.current()
    }

    /// Wakes on every chunk update of this node.
    pub fn subscribe_feed(&self) -> watch::Receiver<u64> {
        self.shared.feed.subscribe()
    }

    /// This node's chunks that changed after version `since`, by category
    /// and index. Read `feed_version` before calling: every update up to
    /// that version is included (and possibly later ones).
    pub fn own_changes_since(&self, since: u64) -> Vec<OwnChange> {
        let cats = self.all_categories();
        let node = self.node();
        let mut out = Vec::new();
        for cat in cats {
            for c in cat.changed_since(node, since) {
                out.push(OwnChange {
                    category: cat.name.clone(),
                    name: c.name,
                    meta: c.meta,
                });
            }
        }
        out
    }

    /// What this node holds of a chunk, if anything.
    pub fn chunk_meta(&self, category: &str, chunk: &ChunkName) -> Option<ChunkMeta> {
        self.category(category).ok()?.meta(chunk)
    }

    pub(super) fn check_replica(&self, chunk: &ChunkName) -> Result<(), StorageError> {
        if chunk.owner == self.node() {
            return Err(StorageError::OwnChunk {
                chunk: chunk.to_string(),
            });
        }
        Ok(())
    }

    /// Appends `data` (whole lines copied from the owner) at `offset` of a
    /// copy of another owner's chunk. `offset` must be what this node holds.
    /// Returns the new size. Data for a chunk already complete here is
    /// ignored.
    pub async fn replica_append(
        &self,
        category: &str,
        chunk: &ChunkName,
        offset: u64,
        data: Bytes,
    ) -> Result<u64, StorageError> {
        self.check_replica(chunk)?;
        let cat = self.category_or_create(category)?;
        let held = cat.meta(chunk);
        if let Some(m) = held
            && m.complete
        {
            return Ok(m.size);
        }
        let size = held.map_or(0, |m| m.size);
        if offset != size {
            return Err(StorageError::ReplicaGap {
                chunk: chunk.to_string(),
                offset,
                size,
            });
        }
        if data.is_empty() && held.is_some() {
            return Ok(size);
        }
        let path = cat.chunk_path(chunk);
        let name = chunk.to_string();
        let len = data.len() as u64;
        let new_lines = memchr::memchr_iter(b'\n', &data).count() as u64;
        let creating = held.is_none();
        let (cat2, chunk2) = (cat.clone(), chunk.clone());
        tokio::task::spawn_blocking(move || {
            write_copy(&cat2, &chunk2, &path, offset, &data, creating)
        })
        .await
        .map_err(|e| StorageError::io("replica write task failed", std::io::Error::other(e)))?
        .map_err(|e| StorageError::io(format!("cannot write copy of chunk {name}"), e))?;
        let flush =
            offset / REPLICA_FLUSH_EVERY_BYTES != (offset + len) / REPLICA_FLUSH_EVERY_BYTES;
        let path = cat.chunk_path(chunk);
        let mut to_drop = Vec::new();
        if let Some(window) = self.shared.opts.drop_behind {
            let mut caches = self.shared.replica_cache.lock().unwrap();
            let cache = caches
                .entry((category.to_owned(), chunk.owner.clone()))
                .or_insert_with(|| DropBehind::new(Some(window)));
            cache.written(&path, offset, offset + len);
            if flush {
                to_drop = cache.take_due();
            }
        }
        if flush {
            // Flush as the copy grows, so that completing it has little left
            // to flush (tracked, so that shutdown waits for it); then drop
            // what fell behind the page-cache window.
            let metrics = self.shared.metrics.clone();
            self.shared.tasks.spawn_blocking(move || {
                match std::fs::File::open(&path).and_then(|f| f.sync_data()) {
                    Ok(()) => {
                        let dropped = drop_behind::drop_cached(&to_drop);
                        metrics.page_cache_dropped_bytes.inc_by(dropped);
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "background flush of a copy failed")
                    }
                }
            });
        }
        cat.metrics.bytes_replicated.inc_by(len);
        cat.metrics.lines_replicated.inc_by(new_lines);
        let lines = match held {
            Some(m) => m.lines,
            None => Some(0),
        }
        .map(|n| n + new_lines);
        cat.update(chunk, size + len, false, None, lines);
        Ok(size + len)
    }

    /// Sets the number of the first line of a copy as its owner lists it
    /// (see `numbering`), and records it with the lines held so far, so
    /// that the copy keeps it across a restart of this node (a node that
    /// lost its disk may restore the chunk from this copy while the owner
    /// cannot say).
    pub async fn learn_first_line(
        &self,
        category: &str,
        chunk: &ChunkName,
        first_line: u64,
    ) -> Result<(), StorageError> {
        let Ok(cat) = self.category(category) else {
            return Ok(());
        };
        if !cat.set_first_line(chunk, first_line) {
            return Ok(());
        }
        let Some(numbers) = cat.meta(chunk).and_then(|m| m.line_record()) else {
            return Ok(());
        };
        let chunk = chunk.clone();
        tokio::task::spawn_blocking(move || {
            let _serial = cat.state.lock().unwrap();
            cat.record_numbers(&[(chunk, numbers)])
        })
        .await
        .map_err(|e| StorageError::io("line log task failed", std::io::Error::other(e)))?
    }

    /// Sets the numbers of a complete chunk held or listed here whose size
    /// is `numbers.size`, and records them (see `numbering`). False when
    /// nothing changed.
    pub async fn learn_numbers(
        &self,
        category: &str,
        chunk: &ChunkName,
        numbers: numbering::LineRecord,
    ) -> Result<bool, StorageError> {
        let cat = self.category(category)?;
        if !cat.meta(chunk).is_some_and(|m| m.complete) || !cat.set_numbers(chunk, numbers) {
            return Ok(false);
        }
        if chunk.owner == self.node() {
            cat.reserve_line(numbers.end());
        }
        let chunk = chunk.clone();
        tokio::task::spawn_blocking(move || {
            let _serial = cat.state.lock().unwrap();
            cat.record_numbers(&[(chunk, numbers)])
        })
        .await
        .map_err(|e| StorageError::io("line log task failed", std::io::Error::other(e)))??;
        Ok(true)
    }

    /// Marks a copy complete at `size`, the owner's final size. Readers see
    /// it complete at once; the durable record (fsync of the copy, then the
    /// category state) is written in the background, in order, so that the
    /// puller does not stall on flushing a whole chunk. Until it is written,
    /// a restart finds the copy incomplete and the owner completes it again.
    /// A copy that holds more than the owner lists is never cut back
    /// ([`StorageError::CopyDisagrees`]): those bytes were served by the
    /// owner once and may be the only copy of acknowledged lines.
    pub async fn replica_complete(
        &self,
        category: &str,
        chunk: &ChunkName,
        size: u64,
    ) -> Result<(), StorageError> {
        self.check_replica(chunk)?;
        let cat = self.category_or_create(category)?;
        let held = cat.meta(chunk);
        if held.is_some_and(|m| m.complete) {
            return Ok(());
        }
        let have = held.map_or(0, |m| m.size);
        if have < size {
            return Err(StorageError::ReplicaGap {
                chunk: chunk.to_string(),
                offset: size,
                size: have,
            });
        }
        if have > size {
            return Err(StorageError::CopyDisagrees {
                chunk: chunk.to_string(),
                held: have,
                owner_size: size,
            });
        }
        let path = cat.chunk_path(chunk);
        if held.is_none() {
            // An empty chunk: its copy is an empty file.
            let (path, cat2, chunk2) = (path.clone(), cat.clone(), chunk.clone());
            tokio::task::spawn_blocking(move || {
                {
                    let mut st = cat2.state.lock().unwrap();
                    if st.unmark_complete(&chunk2.owner, chunk2.index) {
                        state::save(&cat2.dir, &st).map_err(std::io::Error::other)?;
                    }
                }
                OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&path)?;
                fsync_dir(&cat2.dir)
            })
            .await
            .map_err(|e| StorageError::io("replica task failed", std::io::Error::other(e)))?
            .map_err(|e| StorageError::io(format!("cannot create copy {chunk}"), e))?;
        }
        cat.update(chunk, size, true, None, held.is_none().then_some(0));
        self.queue_completion(cat, chunk, size).await
    }

    /// Queues the durable record of a copy completed at `size`.
    pub(super) async fn queue_completion(
        &self,
        cat: Arc<Category>,
        chunk: &ChunkName,
        size: u64,
    ) -> Result<(), StorageError> {
        let path = cat.chunk_path(chunk);
        self.shared
            .completions
            .send(Completion {
                cat,
                chunk: chunk.clone(),
                path,
                size,
            })
            .await
            .map_err(|_| StorageError::ShuttingDown)
    }

    /// Reopens a complete copy held here that is shorter than its owner's
    /// chunk (it missed its owner's restart, or the owner was forgotten and
    /// came back): its completion record is removed durably, then it is
    /// incomplete again, so the puller copies the rest and completes it at
    /// the owner's size. A copy uploaded at its short size (for its
    /// forgotten owner) loses its upload record first: until the owner's
    /// upload of the whole chunk is known, the copy is no upload's, so it
    /// is not evicted, and a restart keeps it open rather than taking it
    /// for a partial copy of the short object. Returns the bytes held.
    pub async fn replica_reopen(
        &self,
        category: &str,
        chunk: &ChunkName,
    ) -> Result<u64, StorageError> {
        self.check_replica(chunk)?;
        let cat = self.category(category)?;
        let (cat2, chunk2) = (cat.clone(), chunk.clone());
        let reopened = tokio::task::spawn_blocking(move || {
            // Under the state lock, as the completion records are written:
            // a pending record of the old completion sees the copy open.
            let mut st = cat2.state.lock().unwrap();
            let Some(m) = cat2.meta(&chunk2) else {
                return Ok(None);
            };
            if !m.complete || !m.local {
                return Ok(Some((m.size, false)));
            }
            // The upload record goes first: a crash never leaves the copy
            // open under it.
            if m.uploaded {
                tier::unrecord(&cat2.dir, &chunk2)?;
            }
            if st.unmark_complete(&chunk2.owner, chunk2.index) {
                state::save(&cat2.dir, &st)?;
            }
            cat2.set_tier(&chunk2, Some(false), None);
            cat2.update(&chunk2, m.size, false, None, None);
            Ok::<_, StorageError>(Some((m.size, m.uploaded)))
        })
        .await
        .map_err(|e| StorageError::io("reopen task failed", std::io::Error::other(e)))??;
        let Some((size, was_uploaded)) = reopened else {
            return Err(StorageError::UnknownChunk {
                category: category.to_owned(),
                chunk: chunk.to_string(),
            });
        };
        if was_uploaded {
            self.shared.disk.sub_reclaimable(size);
        }
        Ok(size)
    }

    /// Marks every incomplete chunk of `owner` complete, in every category,
    /// durably, so that readers can finish them. Returns how many changed.
    pub async fn forget_owner(&self, owner: &str) -> Result<usize, StorageError> {
        if owner == self.node() {
            return Err(StorageError::OwnChunk {
                chunk: format!("{owner}-chunk*"),
            });
        }
        let cats = self.all_categories();
        let mut changed = 0;
        for cat in cats {
            let open: Vec<_> = cat
                .list()
                .into_iter()
                .filter(|c| c.name.owner == owner && !c.meta.complete)
                .collect();
            if open.is_empty() {
                continue;
            }
            let cat2 = cat.clone();
            let owner2 = owner.to_owned();
            let indices: Vec<u32> = open.iter().map(|c| c.name.index).collect();
            tokio::task::spawn_blocking(move || {
                let mut st = cat2.state.lock().unwrap();
                let mut changed = false;
                for i in indices {
                    changed |= st.mark_complete(&owner2, i);
                }
                if changed {
                    state::save(&cat2.dir, &st)?;
                }
                Ok::<(), StorageError>(())
            })
            .await
            .map_err(|e| StorageError::io("forget task failed", std::io::Error::other(e)))??;
            for c in open {
                tracing::warn!(category = %cat.name, chunk = %c.name, size = c.meta.size, "owner forgotten: chunk completed here");
                cat.update(&c.name, c.meta.size, true, None, None);
                changed += 1;
            }
        }
        self.set_forgotten(owner, true).await?;
        // Its complete chunks may now be this node's to upload.
        self.shared.feed.completed();
        Ok(changed)
    }

    /// Owners recorded as lost by [`Storage::forget_owner`] and not heard
    /// from since (see [`Storage::owner_returned`]).
    pub fn forgotten_owners(&self) -> std::collections::BTreeSet<String> {
        self.shared.forgotten.lock().unwrap().clone()
    }

    /// `owner` answers again: it is no longer recorded as lost.
    pub async fn owner_returned(&self, owner: &str) -> Result<(), StorageError> {
        self.set_forgotten(owner, false).await
    }

    async fn set_forgotten(&self, owner: &str, lost: bool) -> Result<(), StorageError> {
        let shared = self.shared.clone();
        let owner = owner.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut set = shared.forgotten.lock().unwrap();
            // Memory changes only once the file did.
            let mut next = set.clone();
            let changed = match lost {
                true => next.insert(owner),
                false => next.remove(&owner),
            };
            if changed {
                state::save_forgotten(&shared.opts.data_dir, &next)?;
                *set = next;
            }
            Ok(())
        })
        .await
        .map_err(|e| StorageError::io("forget task failed", std::io::Error::other(e)))?
    }
}
