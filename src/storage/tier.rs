//! The object-store tier as the storage sees it: which chunks are uploaded,
//! which local copies were evicted, and reading evicted chunks back.
//!
//! The storage never talks to S3 itself. The `upload` module uploads, then
//! records it here ([`Storage::mark_uploaded`]); it also provides the
//! [`RemoteChunks`] reader that serves evicted chunks. What is uploaded is
//! kept in an append-only log per category, `<data>/<category>/.uploads.log`:
//!
//! ```text
//! chunkbus-uploads 1
//! u eu1-chunk000000007 4096 1767225600000     uploaded: name, size, created (ms)
//! d eu1-chunk000000003                        no longer uploaded as held (retention
//!                                             deleted it, or a copy was reopened)
//! ```
//!
//! Records are idempotent, so replaying the log rebuilds the set; a torn last
//! line (a crash while appending) is ignored, and the upload it recorded is
//! simply done again. Each record is flushed (`fdatasync`) before it counts.
//! The log is compacted at start-up when most of it is dead (see
//! `record_log`).
//!
//! A chunk that is uploaded and whose file is gone is *evicted*: listed with
//! `local: false`, read through [`RemoteChunks`].

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use chunkbus_client::ChunkName;

use super::category::{Category, ChunkMeta, now_ms};
use super::numbering::LineRecord;
use super::record_log::RecordLog;
use super::{Reclaim, Storage, StorageError, fsync_dir, state};

/// File name of the upload log inside a category directory.
pub const UPLOAD_LOG: &str = ".uploads.log";
const HEADER: &str = "chunkbus-uploads 1";

/// Reads byte ranges of chunks that are only in the object store. Called on
/// blocking threads.
pub trait RemoteChunks: Send + Sync + std::fmt::Debug {
    /// Fills `buf` with the bytes of `chunk` starting at `offset`.
    /// `NotFound` means the object does not exist (any more).
    fn read_exact_at(
        &self,
        category: &str,
        chunk: &ChunkName,
        buf: &mut [u8],
        offset: u64,
    ) -> std::io::Result<()>;

    /// Exactly `len` bytes of `chunk` from `offset`, in a buffer of their
    /// own (a reader that receives them in one may hand it over as it is).
    fn read_bytes_at(
        &self,
        category: &str,
        chunk: &ChunkName,
        len: usize,
        offset: u64,
    ) -> std::io::Result<bytes::Bytes> {
        let mut buf = vec![0u8; len];
        self.read_exact_at(category, chunk, &mut buf, offset)?;
        Ok(buf.into())
    }

    /// The size of `chunk`'s object and the line numbers recorded with it,
    /// `None` when there is no such object. `PermissionDenied` when the
    /// store refuses this node (it will not answer however long one
    /// waits); other errors may pass. Readers that are not an object
    /// store answer `Unsupported`.
    fn lookup(
        &self,
        category: &str,
        chunk: &ChunkName,
    ) -> std::io::Result<Option<(u64, Option<LineRecord>)>> {
        let _ = (category, chunk);
        Err(std::io::ErrorKind::Unsupported.into())
    }

    /// The size of the object of each chunk of `owner` in `category`, from
    /// one listing (no line numbers: [`RemoteChunks::lookup`] says them).
    /// Errors as `lookup`'s.
    fn sizes(&self, category: &str, owner: &str) -> std::io::Result<BTreeMap<ChunkName, u64>> {
        let _ = (category, owner);
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

/// The bytes of an evicted chunk, as [`super::read::ReadAt`].
pub(super) struct RemoteFile<'a> {
    pub remote: &'a dyn RemoteChunks,
    pub category: &'a str,
    pub chunk: &'a ChunkName,
}

impl super::read::ReadAt for RemoteFile<'_> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.remote
            .read_exact_at(self.category, self.chunk, buf, offset)
    }

    fn read_bytes_at(&self, len: usize, offset: u64) -> std::io::Result<bytes::Bytes> {
        self.remote
            .read_bytes_at(self.category, self.chunk, len, offset)
    }
}

/// An uploaded chunk as recorded in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct UploadRecord {
    pub size: u64,
    pub created_ms: u64,
}

/// The upload log.
const LOG: RecordLog = RecordLog {
    file: UPLOAD_LOG,
    header: HEADER,
    what: "upload",
};

/// Replays the upload log of the category at `dir`; compacts it when most
/// records are dead. Absent log: nothing uploaded.
pub(super) fn load(dir: &Path) -> Result<BTreeMap<ChunkName, UploadRecord>, StorageError> {
    let mut map = BTreeMap::new();
    let records = LOG.replay(dir, |line| apply(&mut map, line))?;
    if RecordLog::mostly_dead(records, map.len()) {
        let text: String = map.iter().map(|(n, r)| record_line(n, Some(*r))).collect();
        LOG.rewrite(dir, &text)?;
    }
    Ok(map)
}

/// Applies one record; `None` when it is malformed.
fn apply(map: &mut BTreeMap<ChunkName, UploadRecord>, line: &str) -> Option<()> {
    let mut f = line.split(' ');
    match (f.next()?, ChunkName::parse(f.next()?).ok()?) {
        ("u", name) => {
            let size = f.next()?.parse().ok()?;
            let created_ms = f.next()?.parse().ok()?;
            map.insert(name, UploadRecord { size, created_ms });
        }
        ("d", name) => {
            map.remove(&name);
        }
        _ => return None,
    }
    Some(())
}

fn record_line(chunk: &ChunkName, rec: Option<UploadRecord>) -> String {
    match rec {
        Some(r) => format!("u {chunk} {} {}\n", r.size, r.created_ms),
        None => format!("d {chunk}\n"),
    }
}

/// Appends one record durably (with the category's state lock held).
fn append(dir: &Path, line: &str) -> Result<(), StorageError> {
    LOG.append(dir, line)
}

/// Bytes of an object read at a time while fetching one of this node's
/// chunks from it (`Storage::fetch_own`).
const FETCH_PIECE_BYTES: u64 = 8 << 20;

/// Removes `chunk`'s upload record durably (with the category's state lock
/// held): a copy reopened to copy the rest of its owner's chunk is no longer
/// what was uploaded.
pub(super) fn unrecord(dir: &Path, chunk: &ChunkName) -> Result<(), StorageError> {
    append(dir, &record_line(chunk, None))
}

/// Why a tier operation did nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TierOutcome {
    /// Done.
    Done,
    /// The chunk is not (or no longer) held here.
    Unknown,
    /// The chunk is not in a state that allows it (not complete, not
    /// uploaded, already evicted...).
    NotEligible,
    /// The object cannot become this node's chunk of its name, which is
    /// kept as it is: the object holds other bytes, or more bytes whose
    /// line numbers this node gave to later lines since (this node's
    /// previous process wrote it before this node lost its disk, and S3
    /// applied the upload late or could not be asked at the restore). Its
    /// bytes from `unique_from` on are lines that only it holds.
    Conflicting { unique_from: u64 },
}

impl Storage {
    /// True when an object store holds finished chunks (`--s3-bucket`).
    pub fn tiered(&self) -> bool {
        self.shared.opts.tiered
    }

    /// Installs the reader of evicted chunks (once, at start-up).
    pub fn set_remote(&self, remote: Arc<dyn RemoteChunks>) {
        let _ = self.shared.remote.set(remote);
    }

    pub(super) fn remote(&self) -> Option<&Arc<dyn RemoteChunks>> {
        self.shared.remote.get()
    }

    /// The size of `chunk`'s object in the store and the line numbers
    /// recorded with it; `None` when there is none. Errors as
    /// [`RemoteChunks::lookup`]'s (`Unsupported` when no store is set).
    pub async fn remote_lookup(
        &self,
        category: &str,
        chunk: &ChunkName,
    ) -> std::io::Result<Option<(u64, Option<LineRecord>)>> {
        let (category, chunk) = (category.to_owned(), chunk.clone());
        self.ask_remote(move |r| r.lookup(&category, &chunk)).await
    }

    /// The size of the object of each chunk of `owner` in `category` in the
    /// store. Errors as [`RemoteChunks::sizes`]'s (`Unsupported` when no
    /// store is set).
    pub async fn remote_sizes(
        &self,
        category: &str,
        owner: &str,
    ) -> std::io::Result<BTreeMap<ChunkName, u64>> {
        let (category, owner) = (category.to_owned(), owner.to_owned());
        self.ask_remote(move |r| r.sizes(&category, &owner)).await
    }

    /// Runs `ask` on the object store's reader, off the async threads (it
    /// blocks); `Unsupported` when no store is set.
    async fn ask_remote<T: Send + 'static>(
        &self,
        ask: impl FnOnce(&dyn RemoteChunks) -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        let Some(remote) = self.remote().cloned() else {
            return Err(std::io::ErrorKind::Unsupported.into());
        };
        tokio::task::spawn_blocking(move || ask(remote.as_ref()))
            .await
            .map_err(std::io::Error::other)?
    }

    /// Records durably that a complete chunk held here is in the object
    /// store. Its change version moves, so peers learn it through the
    /// replication feed.
    pub async fn mark_uploaded(
        &self,
        category: &str,
        chunk: &ChunkName,
    ) -> Result<TierOutcome, StorageError> {
        let (cat, meta) = match self.complete_chunk(category, chunk)? {
            Ok(held) => held,
            Err(outcome) => return Ok(outcome),
        };
        if meta.uploaded {
            return Ok(TierOutcome::Done);
        }
        let rec = UploadRecord {
            size: meta.size,
            created_ms: meta.created_ms,
        };
        self.write_record(&cat, chunk, Some(rec)).await?;
        if cat.set_tier(chunk, Some(true), None) && meta.local {
            self.shared.disk.add_reclaimable(meta.size);
        }
        Ok(TierOutcome::Done)
    }

    /// Records a chunk that is in the object store but not held here (found
    /// by listing the bucket, or uploaded by its owner before this node
    /// copied it). Bytes never change, so what is held here is at most a
    /// prefix of the object:
    ///
    /// - a complete copy of the object's size is marked uploaded;
    /// - a copy of another owner's chunk that is not complete yet but holds
    ///   every byte of the object is completed and marked uploaded;
    /// - a complete copy longer than the object is kept as it is, not
    ///   recorded as uploaded (logged: it cannot happen);
    /// - anything shorter (a partial copy; a complete copy that missed the
    ///   owner's last bytes; this node's own chunk restored from a peer's
    ///   copy that was shorter than what this node had uploaded before it
    ///   lost its disk) is dropped, and the object read instead. This
    ///   node's own complete chunk is dropped only once its bytes are found
    ///   to be the object's first ones: an object of another content under
    ///   its name (a name used again after a disk was lost while the bucket
    ///   could not be listed) leaves it held, and not recorded as uploaded.
    ///   So does a longer object whose line numbers past the chunk's end
    ///   this node gave to later lines since; else those numbers are
    ///   reserved before the chunk is dropped. Both are
    ///   [`TierOutcome::Conflicting`], and so is an object of the size of a
    ///   complete chunk held here but of other bytes;
    /// - another owner's object longer than what is held here, whose
    ///   numbers run into that owner's next chunk known here, is not taken
    ///   (its owner replaces it); a record here of another owner's object
    ///   (`local: false`, `uploaded: true`) follows the object (from the
    ///   bucket or the owner's listing) when it became shorter: the owner
    ///   replaced one that this node took before it knew the next chunk;
    /// - one of this node's chunks held only as a record (`local: false`)
    ///   of a shorter object than the one now under its name, whose further
    ///   lines' numbers this node gave to later lines since, is fetched
    ///   from the object's beginning to be held here again, and settled as
    ///   such a chunk held here ([`TierOutcome::Conflicting`]). This is a
    ///   wiped node whose restore could not ask S3, and trusted its peers'
    ///   record of an object it had replaced before it lost its disk.
    ///
    /// A chunk of this node held here and recorded as uploaded, that the
    /// object cannot become, is no longer recorded so: the uploader then
    /// settles it (stores the object's own lines again, and replaces it).
    ///
    /// Creates the category if needed. `numbers`: the chunk's line numbers,
    /// when the caller knows them (from the owner's listing or the object's
    /// metadata); recorded with it.
    pub async fn add_remote(
        &self,
        category: &str,
        chunk: &ChunkName,
        size: u64,
        created_ms: u64,
        numbers: Option<LineRecord>,
    ) -> Result<TierOutcome, StorageError> {
        let cat = self.category_or_create(category)?;
        let own = chunk.owner == self.node();
        let _own = if own {
            Some(self.shared.own_entries.lock().await)
        } else {
            None
        };
        let end = numbers.filter(|r| r.size == size).map(|r| r.end());
        if own
            && let Some(m) = cat
                .meta(chunk)
                .filter(|m| m.complete && !m.local && m.size < size)
            && end.is_some()
            && !self.reserve_lines_after(&cat, chunk, end, false).await?
        {
            tracing::warn!(category, chunk = %chunk, recorded = m.size, in_s3 = size, ends_at = end, "S3 holds more of one of this node's chunks than recorded here, and this node numbered later lines after the record (it restored the record from its peers while S3 could not be asked, after it had replaced their shorter object); fetching the recorded bytes from S3, to keep the chunk as recorded and store the object's further lines again");
            self.fetch_own(&cat, chunk, m.size).await?;
        }
        if own
            && let Some(m) = cat.meta(chunk).filter(|m| m.complete && m.local)
            && let Some(conflict) = self.against_own(&cat, chunk, m, size, end).await?
        {
            if m.uploaded {
                self.unrecord_own(&cat, chunk, m.size).await?;
            }
            return Ok(conflict);
        }
        // One of this node's chunks not held here (not restored yet): its
        // numbers are reserved, unless later lines took them since; then
        // it is settled once restored (as above).
        if own
            && cat.meta(chunk).is_none()
            && end.is_some()
            // The object's numbers are recorded durably next.
            && !self.reserve_lines_after(&cat, chunk, end, false).await?
        {
            tracing::warn!(category, chunk = %chunk, in_s3 = size, ends_at = end, "S3 holds one of this node's chunks, not held here, whose numbers this node gave to later lines since (S3 applied an upload of its previous process late, or could not be asked at the restore); not recorded: restored from a peer's copy, the chunk is settled with it then");
            return Ok(TierOutcome::NotEligible);
        }
        // Another owner's object longer than what is held here, whose
        // numbers run into the owner's next chunk known here: its owner's
        // previous process wrote it before the owner lost its disk, and
        // the owner replaces it (see `TierOutcome::Conflicting`).
        if !own
            && let Some(end) = end
            && cat.meta(chunk).is_none_or(|m| m.size < size)
            && let Some(next) = cat.next_of_owner(chunk)
            && next.meta.first_line.is_some_and(|first| first < end)
        {
            tracing::warn!(category, chunk = %chunk, in_s3 = size, ends_at = end, next = %next.name, next_starts_at = next.meta.first_line, "S3 holds more of another node's chunk than that node numbered before its next chunk (written by its process before it lost its disk, and applied late); not taken: that node replaces it");
            return Ok(TierOutcome::NotEligible);
        }
        let held = cat.meta(chunk);
        match held {
            Some(m) if m.complete && m.size == size => {
                let outcome = self.mark_uploaded(category, chunk).await?;
                if let Some(numbers) = numbers {
                    self.learn_numbers(category, chunk, numbers).await?;
                }
                return Ok(outcome);
            }
            Some(m) if !own && !m.complete && m.local && m.size == size => {
                self.replica_complete(category, chunk, size).await?;
                let outcome = self.mark_uploaded(category, chunk).await?;
                if let Some(numbers) = numbers {
                    self.learn_numbers(category, chunk, numbers).await?;
                }
                return Ok(outcome);
            }
            // A copy (bytes held here), one of this node's own chunks, or
            // another owner's chunk listed as held elsewhere (its owner's
            // word, not an object's).
            Some(m) if m.complete && m.size > size && (m.local || own || !m.uploaded) => {
                // Never cut back, never recorded at another size.
                tracing::error!(category, chunk = %chunk, held = m.size, in_s3 = size, "a complete copy holds more than the uploaded chunk; it is kept and not recorded as uploaded");
                return Ok(TierOutcome::NotEligible);
            }
            // This node's open chunk: the writer's.
            Some(m) if own && !m.complete => return Ok(TierOutcome::NotEligible),
            Some(m) => {
                if !m.local && m.uploaded && m.size > size {
                    // Only a record, of an object that was longer: its
                    // owner replaced it (its previous process's upload,
                    // applied late after the owner lost its disk, which
                    // this node took before it knew the owner's next
                    // chunk; see `TierOutcome::Conflicting`).
                    tracing::warn!(category, chunk = %chunk, recorded = m.size, in_s3 = size, "another node's chunk is now shorter in S3 than recorded here (its owner replaced an object that its previous process wrote before it lost its disk); recorded at the new size");
                } else if m.complete {
                    // Complete but short of what its owner uploaded (a copy
                    // that missed the owner's restart or was completed by a
                    // forget; this node's own chunk restored from a short
                    // copy): S3 holds the whole chunk.
                    tracing::warn!(category, chunk = %chunk, held = m.size, in_s3 = size, "a complete chunk is short of the uploaded one; reading it through S3 instead");
                }
            }
            None => {}
        }
        self.take_object(&cat, chunk, held, size, created_ms, numbers)
            .await
    }

    /// Fetches the first `size` bytes of the object of one of this node's
    /// chunks, held here only as a record of that size, into its chunk file,
    /// and records it as held here and not uploaded (the object is not the
    /// chunk: see `add_remote`). The file goes first: a crash before the
    /// upload record is removed leaves the chunk held and recorded as
    /// uploaded, which the next listing of the bucket settles as here.
    async fn fetch_own(
        &self,
        cat: &Arc<Category>,
        chunk: &ChunkName,
        size: u64,
    ) -> Result<(), StorageError> {
        let Some(remote) = self.remote().cloned() else {
            return Err(StorageError::io(
                "no object store to fetch a chunk from",
                std::io::ErrorKind::Unsupported.into(),
            ));
        };
        let (tmp, path) = (self.restore_path(&cat.name, chunk), cat.chunk_path(chunk));
        let (cat2, chunk2) = (cat.clone(), chunk.clone());
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            let f = std::fs::File::create(&tmp)?;
            let mut buf = vec![0u8; FETCH_PIECE_BYTES.min(size) as usize];
            let mut at = 0;
            while at < size {
                let piece = &mut buf[..FETCH_PIECE_BYTES.min(size - at) as usize];
                remote.read_exact_at(&cat2.name, &chunk2, piece, at)?;
                f.write_all_at(piece, at)?;
                at += piece.len() as u64;
            }
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            fsync_dir(&cat2.dir)
        })
        .await
        .map_err(|e| StorageError::io("fetch task failed", std::io::Error::other(e)))?
        .map_err(|e| StorageError::io(format!("cannot fetch chunk {chunk} from S3"), e))?;
        self.write_record(cat, chunk, None).await?;
        // Never evictable: held and uploaded at once.
        cat.set_tier(chunk, Some(false), Some(true));
        Ok(())
    }

    /// Removes the upload record of one of this node's chunks held here, of
    /// `size` bytes, that the object under its name is not: durably, so
    /// that the uploader settles it, also after a restart.
    async fn unrecord_own(
        &self,
        cat: &Arc<Category>,
        chunk: &ChunkName,
        size: u64,
    ) -> Result<(), StorageError> {
        self.write_record(cat, chunk, None).await?;
        if cat.set_tier(chunk, Some(false), None) {
            self.shared.disk.sub_reclaimable(size);
        }
        Ok(())
    }

    /// Records another owner's chunk that its owner lists as uploaded at
    /// `size` bytes (its word, from its listing), as [`Storage::add_remote`]
    /// does, except that a listing here of the chunk as held by other nodes
    /// (no bytes here) at more bytes follows it. The owner lost its disk
    /// and restored the chunk as its peers or S3 held it: the bytes past
    /// that were on no node that answered it. A copy held here is never
    /// cut back.
    pub async fn add_owners_upload(
        &self,
        category: &str,
        chunk: &ChunkName,
        size: u64,
        numbers: Option<LineRecord>,
    ) -> Result<TierOutcome, StorageError> {
        if let Some(m) = self.chunk_meta(category, chunk)
            && m.elsewhere()
            && m.size > size
        {
            tracing::warn!(category, chunk = %chunk, listed = m.size, uploaded = size, "another node lists one of its chunks, listed here before at more bytes as held by other nodes, as uploaded shorter (it lost its disk, and restored the chunk as its peers or S3 held it); following it");
            // Its numbers are recorded with its upload, next.
            self.note_elsewhere(category, chunk, size, true, None, None)?;
        }
        self.add_remote(category, chunk, size, 0, numbers).await
    }

    /// Replaces a complete copy of another owner's chunk by the shorter
    /// object of `size` bytes that S3 holds under its name (its beginning):
    /// a lost owner's chunk uploaded by another replica while this node
    /// could not be reached, once the lines of the copy past the object's
    /// end are stored again as this node's own (the uploader's
    /// `rescue_copy`). Never the only place of a line: only then. Readers
    /// of this node see the chunk end at the object's end; a consumer
    /// position past it counts as past the chunk.
    pub async fn give_way_to_object(
        &self,
        category: &str,
        chunk: &ChunkName,
        size: u64,
        numbers: Option<LineRecord>,
    ) -> Result<TierOutcome, StorageError> {
        self.check_replica(chunk)?;
        let cat = self.category(category)?;
        let held = cat.meta(chunk);
        if !held.is_some_and(|m| m.complete && m.local && !m.uploaded && m.size > size) {
            return Ok(TierOutcome::NotEligible);
        }
        self.take_object(&cat, chunk, held, size, 0, numbers).await
    }

    /// Drops what is held here of `chunk` (`held`: its entry, if any), and
    /// records the object of `size` bytes that S3 holds under its name in
    /// its place, with `numbers`.
    async fn take_object(
        &self,
        cat: &Arc<Category>,
        chunk: &ChunkName,
        held: Option<ChunkMeta>,
        size: u64,
        created_ms: u64,
        numbers: Option<LineRecord>,
    ) -> Result<TierOutcome, StorageError> {
        let (category, own) = (cat.name.as_str(), chunk.owner == self.node());
        if let Some(m) = held {
            // The record goes first: a crash never leaves the index
            // recorded complete over a missing or partial copy.
            let (cat2, chunk2) = (cat.clone(), chunk.clone());
            tokio::task::spawn_blocking(move || {
                let mut st = cat2.state.lock().unwrap();
                if st.unmark_complete(&chunk2.owner, chunk2.index) {
                    state::save(&cat2.dir, &st)?;
                }
                Ok::<(), StorageError>(())
            })
            .await
            .map_err(|e| StorageError::io("tier task failed", std::io::Error::other(e)))??;
            // Found without its file at start-up, an own chunk's name
            // stays used.
            self.forget_own_index(cat, chunk).await?;
            remove_file(&cat.chunk_path(chunk)).await?;
            if m.uploaded && m.local {
                self.shared.disk.sub_reclaimable(m.size);
            }
        }
        let rec = UploadRecord {
            size,
            created_ms: if created_ms == 0 {
                now_ms()
            } else {
                created_ms
            },
        };
        let numbers = numbers.filter(|r| r.size == size);
        if let Some(numbers) = numbers {
            let (cat2, chunk2) = (cat.clone(), chunk.clone());
            tokio::task::spawn_blocking(move || {
                let _serial = cat2.state.lock().unwrap();
                cat2.record_numbers(&[(chunk2, numbers)])
            })
            .await
            .map_err(|e| StorageError::io("line log task failed", std::io::Error::other(e)))??;
        }
        self.write_record(cat, chunk, Some(rec)).await?;
        cat.insert_remote(chunk, rec.size, rec.created_ms, numbers);
        if let Some(numbers) = numbers.filter(|_| own) {
            // A node that lost its disk numbers its next lines after these.
            cat.reserve_line(numbers.end());
            // Not expected (the writer reserved them above, where it could
            // still refuse): said, as no number may be given twice.
            if let Some(next) = cat.next_of_owner(chunk)
                && next.meta.first_line.is_some_and(|f| f < numbers.end())
            {
                tracing::error!(category, chunk = %chunk, next = %next.name, ends_at = numbers.end(), next_starts_at = next.meta.first_line, "the lines of a chunk found in S3 and of this node's next chunk share numbers");
            }
        }
        Ok(TierOutcome::Done)
    }

    /// Deletes the local copy of a complete, uploaded chunk; it stays listed
    /// (`local: false`) and readable from the object store. Only through
    /// [`Storage::reclaim`].
    pub(super) async fn evict(
        &self,
        category: &str,
        chunk: &ChunkName,
    ) -> Result<TierOutcome, StorageError> {
        let (cat, meta) = match self.complete_chunk(category, chunk)? {
            Ok(held) => held,
            Err(outcome) => return Ok(outcome),
        };
        if !(meta.uploaded && meta.local) {
            return Ok(TierOutcome::NotEligible);
        }
        // Readers that already decided to read the file go to the object
        // store when they find it gone. Two evictions of one chunk may
        // race; only the one that flips the flag counts it.
        self.forget_own_index(&cat, chunk).await?;
        remove_file(&cat.chunk_path(chunk)).await?;
        if !cat.set_tier(chunk, None, Some(false)) {
            return Ok(TierOutcome::NotEligible);
        }
        self.shared.disk.sub_reclaimable(meta.size);
        cat.metrics.chunks_evicted.inc();
        tracing::debug!(category, chunk = %chunk, bytes = meta.size, "local copy evicted");
        Ok(TierOutcome::Done)
    }

    /// Forgets a complete chunk here entirely: its file, its upload record,
    /// its entry (past `--retention`). Only through [`Storage::reclaim`].
    pub(super) async fn purge(
        &self,
        category: &str,
        chunk: &ChunkName,
    ) -> Result<TierOutcome, StorageError> {
        let (cat, meta) = match self.complete_chunk(category, chunk)? {
            Ok(held) => held,
            Err(outcome) => return Ok(outcome),
        };
        self.forget_own_index(&cat, chunk).await?;
        if meta.uploaded {
            self.write_record(&cat, chunk, None).await?;
        }
        if meta.local {
            remove_file(&cat.chunk_path(chunk)).await?;
            if meta.uploaded {
                self.shared.disk.sub_reclaimable(meta.size);
            }
        }
        cat.remove(chunk);
        Ok(TierOutcome::Done)
    }

    /// Uploaded chunks held locally, oldest first: what may go under disk
    /// pressure.
    pub fn evictable(&self) -> Vec<(String, ChunkName, ChunkMeta)> {
        let mut out: Vec<_> = self
            .all_categories()
            .into_iter()
            .flat_map(|cat| {
                cat.list()
                    .into_iter()
                    .filter(|c| c.meta.complete && c.meta.uploaded && c.meta.local)
                    .map(move |c| (cat.name.clone(), c.name, c.meta))
            })
            .collect();
        out.sort_by_key(|(_, name, meta)| (meta.created_ms, name.clone()));
        out
    }

    /// Evicts uploaded local copies, oldest first, until the disk is at or
    /// below the high-water mark. Returns the bytes freed.
    pub async fn evict_for_space(&self) -> u64 {
        let disk = &self.shared.disk;
        let usage = disk.usage();
        let limit = u64::from(disk.limit_percent());
        let target = usage.total_bytes * limit / 100;
        let mut excess = usage.used_bytes.saturating_sub(target);
        let mut freed = 0;
        for (category, chunk, meta) in self.evictable() {
            if excess == 0 {
                break;
            }
            match self.reclaim(&category, &chunk, Reclaim::DiskPressure).await {
                Ok(TierOutcome::Done) => {
                    freed += meta.size;
                    excess = excess.saturating_sub(meta.size);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(category, chunk = %chunk, error = %e, "cannot evict a chunk");
                    break;
                }
            }
        }
        freed
    }

    /// The category and what is held of `chunk`, or why a tier operation
    /// does not apply (not held, not complete).
    fn complete_chunk(
        &self,
        category: &str,
        chunk: &ChunkName,
    ) -> Result<Result<(Arc<Category>, ChunkMeta), TierOutcome>, StorageError> {
        let cat = self.category(category)?;
        Ok(match cat.meta(chunk) {
            None => Err(TierOutcome::Unknown),
            Some(m) if !m.complete => Err(TierOutcome::NotEligible),
            Some(m) => Ok((cat, m)),
        })
    }

    async fn write_record(
        &self,
        cat: &Arc<Category>,
        chunk: &ChunkName,
        rec: Option<UploadRecord>,
    ) -> Result<(), StorageError> {
        let line = record_line(chunk, rec);
        let cat = cat.clone();
        tokio::task::spawn_blocking(move || {
            let _serial = cat.state.lock().unwrap();
            append(&cat.dir, &line)
        })
        .await
        .map_err(|e| StorageError::io("upload log task failed", std::io::Error::other(e)))?
    }

    /// One of this node's complete chunks held here against an object of
    /// its name of `size` bytes, whose numbers end before `end` (when
    /// known): `None` when the object is the chunk, or starts with it and
    /// the numbers of its further lines are now reserved (free: no later
    /// chunk of this node took one); else [`TierOutcome::Conflicting`].
    /// Reads both up to the shorter's end.
    async fn against_own(
        &self,
        cat: &Arc<Category>,
        chunk: &ChunkName,
        held: ChunkMeta,
        size: u64,
        end: Option<u64>,
    ) -> Result<Option<TierOutcome>, StorageError> {
        let category = &cat.name;
        if !self
            .local_is_prefix_of_remote(cat, chunk, size.min(held.size))
            .await?
        {
            tracing::warn!(category, chunk = %chunk, held = held.size, in_s3 = size, "S3 holds other bytes under the name of one of this node's chunks (written by this node before it lost its disk, the name being used again since); the chunk here is kept");
            return Ok(Some(TierOutcome::Conflicting { unique_from: 0 }));
        }
        if size <= held.size {
            return Ok((size < held.size).then_some(TierOutcome::Conflicting { unique_from: size }));
        }
        // Durable first: the chunk here is deleted before the object's
        // numbers are recorded.
        if self.reserve_lines_after(cat, chunk, end, true).await? {
            return Ok(None);
        }
        tracing::warn!(category, chunk = %chunk, held = held.size, in_s3 = size, ends_at = ?end, "S3 holds more of one of this node's chunks than this node restored, and this node numbered later lines after what it restored (S3 applied an upload of its previous process late, or could not be asked at the restore); the chunk here is kept");
        Ok(Some(TierOutcome::Conflicting {
            unique_from: held.size,
        }))
    }

    /// Asks the category's writer to number this node's next lines from
    /// `end` on unless a chunk of this node after `chunk` took a number
    /// below it (see `WriterMsg::ReserveAfter`); true when reserved.
    async fn reserve_lines_after(
        &self,
        cat: &Category,
        chunk: &ChunkName,
        end: Option<u64>,
        durable: bool,
    ) -> Result<bool, StorageError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let ask = super::writer::WriterMsg::ReserveAfter {
            after: chunk.clone(),
            end,
            durable,
            reply,
        };
        cat.writer
            .send(ask)
            .await
            .map_err(|_| StorageError::ShuttingDown)?;
        answer.await.map_err(|_| StorageError::ShuttingDown)?
    }

    /// True when the first `len` bytes of `chunk`'s object in the store are
    /// the bytes of its file here (compared a piece at a time); false when
    /// no store is installed, an error when the object is gone.
    async fn local_is_prefix_of_remote(
        &self,
        cat: &Arc<Category>,
        chunk: &ChunkName,
        len: u64,
    ) -> Result<bool, StorageError> {
        const PIECE: u64 = 1 << 20;
        let Some(remote) = self.remote().cloned() else {
            return Ok(false);
        };
        let (path, category, chunk2) = (cat.chunk_path(chunk), cat.name.clone(), chunk.clone());
        tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&path)?;
            let piece = PIECE.min(len) as usize;
            let (mut here, mut there) = (vec![0u8; piece], vec![0u8; piece]);
            let mut at = 0;
            while at < len {
                let n = PIECE.min(len - at) as usize;
                std::os::unix::fs::FileExt::read_exact_at(&file, &mut here[..n], at)?;
                // Gone (deleted since it was listed): an error, not other
                // bytes.
                remote.read_exact_at(&category, &chunk2, &mut there[..n], at)?;
                if here[..n] != there[..n] {
                    return Ok(false);
                }
                at += n as u64;
            }
            Ok(true)
        })
        .await
        .map_err(|e| StorageError::io("tier task failed", std::io::Error::other(e)))?
        .map_err(|e| StorageError::io(format!("cannot compare {chunk} with its object"), e))
    }

    /// Before one of this node's own chunks leaves the disk, records that
    /// its index must not be used again.
    async fn forget_own_index(
        &self,
        cat: &Arc<Category>,
        chunk: &ChunkName,
    ) -> Result<(), StorageError> {
        if chunk.owner != self.node() {
            return Ok(());
        }
        let (cat, index) = (cat.clone(), chunk.index);
        tokio::task::spawn_blocking(move || {
            let mut st = cat.state.lock().unwrap();
            if st.next_own_index.is_none_or(|n| n <= index) {
                st.next_own_index = Some(index + 1);
                state::save(&cat.dir, &st)?;
            }
            Ok(())
        })
        .await
        .map_err(|e| StorageError::io("state task failed", std::io::Error::other(e)))?
    }
}

pub(super) async fn remove_file(path: &Path) -> Result<(), StorageError> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let remove = || -> std::io::Result<()> {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            }
            match path.parent() {
                Some(dir) => fsync_dir(dir),
                None => Ok(()),
            }
        };
        remove().map_err(|e| StorageError::io(format!("cannot delete {}", path.display()), e))
    })
    .await
    .map_err(|e| StorageError::io("delete task failed", std::io::Error::other(e)))?
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::io::Write;

    use super::*;

    #[test]
    fn the_log_replays_and_ignores_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let a = ChunkName::parse("eu1-chunk000000001").unwrap();
        let b = ChunkName::parse("eu2-chunk000000000").unwrap();
        let rec = |size| UploadRecord {
            size,
            created_ms: 7,
        };
        append(dir.path(), &record_line(&a, Some(rec(10)))).unwrap();
        append(dir.path(), &record_line(&b, Some(rec(20)))).unwrap();
        append(dir.path(), &record_line(&a, None)).unwrap();
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(UPLOAD_LOG))
            .unwrap();
        f.write_all(b"u eu1-chunk0000000").unwrap();
        let map = load(dir.path()).unwrap();
        assert_eq!(map.into_iter().collect::<Vec<_>>(), [(b, rec(20))]);
    }

    #[test]
    fn bad_logs_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(UPLOAD_LOG), "chunkbus-uploads 9\n").unwrap();
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("unknown upload log format"), "{e}");
        std::fs::write(dir.path().join(UPLOAD_LOG), format!("{HEADER}\nu x 1 2\n")).unwrap();
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("bad upload record"), "{e}");
    }

    #[test]
    fn a_mostly_dead_log_is_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let keep = ChunkName::parse("eu1-chunk000000999").unwrap();
        for i in 0..100 {
            let c = ChunkName::new("eu1", i);
            let rec = UploadRecord {
                size: 1,
                created_ms: 1,
            };
            append(dir.path(), &record_line(&c, Some(rec))).unwrap();
            append(dir.path(), &record_line(&c, None)).unwrap();
        }
        let rec = UploadRecord {
            size: 5,
            created_ms: 6,
        };
        append(dir.path(), &record_line(&keep, Some(rec))).unwrap();
        let map = load(dir.path()).unwrap();
        assert_eq!(map.len(), 1);
        let text = std::fs::read_to_string(dir.path().join(UPLOAD_LOG)).unwrap();
        assert_eq!(text, format!("{HEADER}\nu eu1-chunk000000999 5 6\n"));
        assert_eq!(load(dir.path()).unwrap(), map);
    }
}
