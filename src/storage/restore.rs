//! The storage side of a node that lost its disk: reserving the chunk
//! names it used before, and restoring its own chunks from its peers'
//! copies.
//!
//! A node whose data directory is new cannot know which chunk names it
//! used before: its peers may hold copies of chunks it wrote (and
//! acknowledged) before its disk was wiped. Replication asks them (see
//! `replication::bootstrap`) and, through the methods here:
//!
//! - reserves, per category, every index up to the highest one a peer
//!   holds (`next_own_index` in the category state, saved before the writer
//!   may use it), so the node never names a new chunk like an old one;
//! - restores each of its chunks a peer holds: the bytes go to
//!   `<category>/.restore.<chunk>` (a dot-file, ignored by start-up), which
//!   is fsynced and renamed to the chunk's name only when whole. A restored
//!   chunk is complete, as every chunk of this node found at start-up is.
//!
//! While restoring is unfinished, `<data>/.restoring.json` says so, so that
//! a crash in the middle resumes it at the next start (the directory is no
//! longer new then). Partial `.restore.*` files are overwritten.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use bytes::Bytes;
use chunkbus_client::ChunkName;
use serde::{Deserialize, Serialize};

use super::category::ChunkStatus;
use super::{Storage, StorageError, fsync_dir, numbering, state};

/// Marks, in the data directory, a restore from peers not yet finished.
const RESTORING_FILE: &str = ".restoring.json";
/// Prefix of a chunk being restored, in its category directory.
const RESTORE_PREFIX: &str = ".restore.";

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Restoring {
    version: u32,
}

impl Storage {
    /// True while a restore from peers is unfinished (started by an earlier
    /// process that stopped before it was done).
    pub fn restore_pending(&self) -> bool {
        self.shared.opts.data_dir.join(RESTORING_FILE).exists()
    }

    /// Records durably that a restore from peers is (`true`) or is no
    /// longer (`false`) under way.
    pub async fn set_restore_pending(&self, pending: bool) -> Result<(), StorageError> {
        let dir = self.shared.opts.data_dir.clone();
        tokio::task::spawn_blocking(move || {
            let path = dir.join(RESTORING_FILE);
            if pending {
                state::write_atomic(&dir, RESTORING_FILE, &Restoring { version: 1 })
            } else {
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                    _ => fsync_dir(&dir),
                }
            }
            .map_err(|e| StorageError::io(format!("cannot write {}", path.display()), e))
        })
        .await
        .map_err(|e| StorageError::io("restore task failed", std::io::Error::other(e)))?
    }

    /// Every chunk of `owner` held here, by category (for a node that asks
    /// which of its chunks this node holds).
    pub fn chunks_of(&self, owner: &str) -> Vec<(String, ChunkStatus)> {
        let mut out = Vec::new();
        for cat in self.all_categories() {
            for c in cat.list() {
                // Chunks held elsewhere are the holders' to report.
                if c.name.owner == owner && !c.meta.elsewhere() {
                    out.push((cat.name.clone(), c));
                }
            }
        }
        out.sort_by(|a, b| (&a.0, &a.1.name).cmp(&(&b.0, &b.1.name)));
        out
    }

    /// Per category, the highest index of `owner`'s chunks listed here as
    /// held elsewhere (`--replicas k`).
    pub fn highest_elsewhere_of(&self, owner: &str) -> std::collections::BTreeMap<String, u32> {
        let mut out = std::collections::BTreeMap::new();
        for cat in self.all_categories() {
            if let Some(i) = cat
                .list()
                .iter()
                .filter(|c| c.name.owner == owner && c.meta.elsewhere())
                .map(|c| c.name.index)
                .max()
            {
                out.insert(cat.name.clone(), i);
            }
        }
        out
    }

    /// Makes this node number its next lines of `category` from `next` on
    /// at least (the end of its line numbers its peers know). Durable
    /// before it takes effect (`next_own_line` in the category state): a
    /// restart may find neither the chunks that held those numbers (not
    /// restored yet, or deleted) nor their records. Creates the category
    /// if needed.
    pub async fn reserve_own_line(&self, category: &str, next: u64) -> Result<(), StorageError> {
        let cat = self.category_or_create(category)?;
        tokio::task::spawn_blocking(move || cat.reserve_line_durably(next))
            .await
            .map_err(|e| StorageError::io("reserve task failed", std::io::Error::other(e)))?
    }

    /// Changes the state of `category` with `change` and saves it when
    /// `change` says it changed it. Creates the category if needed.
    async fn save_own_reservation(
        &self,
        category: &str,
        change: impl FnOnce(&mut state::CategoryState) -> bool + Send + 'static,
    ) -> Result<std::sync::Arc<super::category::Category>, StorageError> {
        let cat = self.category_or_create(category)?;
        let cat2 = cat.clone();
        tokio::task::spawn_blocking(move || {
            let mut st = cat2.state.lock().unwrap();
            if change(&mut st) {
                state::save(&cat2.dir, &st)?;
            }
            Ok::<(), StorageError>(())
        })
        .await
        .map_err(|e| StorageError::io("reserve task failed", std::io::Error::other(e)))??;
        Ok(cat)
    }

    /// Per category, the highest end of `owner`'s line numbers recorded
    /// here, chunks deleted since included (for a node that lost its disk
    /// and asks where its numbering stood).
    pub fn line_ends_of(&self, owner: &str) -> std::collections::BTreeMap<String, u64> {
        self.all_categories()
            .into_iter()
            .filter_map(|cat| Some((cat.name.clone(), self.line_end_in(&cat, owner)?)))
            .collect()
    }

    /// The highest end of `owner`'s line numbers of `category` recorded
    /// here, chunks deleted since included: the number of its next line,
    /// as far as this node knows.
    pub fn line_end_of(&self, category: &str, owner: &str) -> Option<u64> {
        self.line_end_in(&*self.category(category).ok()?, owner)
    }

    /// [`Storage::line_end_of`] in `cat`. For this node's own numbers, the
    /// number its next chunk's first line takes at least counts too: found
    /// at start-up where no record is left (a node that lost its disk and
    /// whose chunks were deleted since keeps only that), or learned from
    /// its peers after it lost its disk.
    fn line_end_in(&self, cat: &super::category::Category, owner: &str) -> Option<u64> {
        let recorded = cat.line_end_of(owner);
        if owner != self.node() {
            return recorded;
        }
        recorded.max(Some(cat.reserved_line()).filter(|&n| n > 0))
    }

    /// Raises the ends of `owner`'s line numbers known here to those its
    /// full listing gives, per category. Where the listing names none of
    /// the owner's chunks (`listed`: the categories where it does),
    /// nothing else will say it here: it is kept durably, creating the
    /// category if needed (one whose end cannot be kept is logged and
    /// skipped: replication goes on). Elsewhere the records of the copies
    /// will say it; meanwhile it is noted in memory, in a category held.
    pub async fn learn_line_ends(
        &self,
        owner: &str,
        ends: &std::collections::BTreeMap<String, u64>,
        listed: &std::collections::BTreeSet<&str>,
    ) {
        for (category, &end) in ends {
            if end == 0 || self.line_end_of(category, owner).is_some_and(|e| e >= end) {
                continue;
            }
            if listed.contains(category.as_str()) {
                if let Ok(cat) = self.category(category) {
                    cat.note_line_ends([(owner, end)]);
                }
                continue;
            }
            let learned = match self.category_or_create(category) {
                Ok(cat) => {
                    let owner = owner.to_owned();
                    tokio::task::spawn_blocking(move || cat.learn_line_end(&owner, end))
                        .await
                        .map_err(|e| {
                            StorageError::io("line end task failed", std::io::Error::other(e))
                        })
                        .and_then(|r| r)
                }
                Err(e) => Err(e),
            };
            match learned {
                Ok(()) => {}
                Err(StorageError::ShuttingDown) => return,
                Err(e) => {
                    tracing::warn!(category = %category, owner, error = %e, "cannot keep where an owner's line numbers stand; its Kafka offsets here follow the chunks copied")
                }
            }
        }
    }

    /// Reserves this node's chunk indices of `category` below `next`: the
    /// writer never names a new chunk with one of them. Durable before it
    /// takes effect. Creates the category if needed.
    pub async fn reserve_own_index(&self, category: &str, next: u32) -> Result<(), StorageError> {
        let cat = self
            .save_own_reservation(category, move |st| {
                let raise = st.next_own_index.is_none_or(|n| n < next);
                if raise {
                    st.next_own_index = Some(next);
                }
                raise
            })
            .await?;
        cat.reserve_index(next);
        Ok(())
    }

    pub(super) fn restore_path(&self, category: &str, chunk: &ChunkName) -> PathBuf {
        self.shared
            .opts
            .data_dir
            .join(category)
            .join(format!("{RESTORE_PREFIX}{chunk}"))
    }

    /// Writes `data` at `offset` of this node's own `chunk` being restored
    /// (offset 0 starts it afresh). Refused for a chunk held here already
    /// and for an index not reserved first.
    pub async fn restore_append(
        &self,
        category: &str,
        chunk: &ChunkName,
        offset: u64,
        data: Bytes,
    ) -> Result<(), StorageError> {
        let cat = self.restorable(category, chunk).await?;
        let path = self.restore_path(&cat.name, chunk);
        tokio::task::spawn_blocking(move || {
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(offset == 0)
                .open(&path)?;
            f.write_all_at(&data, offset)
        })
        .await
        .map_err(|e| StorageError::io("restore task failed", std::io::Error::other(e)))?
        .map_err(|e| StorageError::io(format!("cannot write restored chunk {chunk}"), e))
    }

    /// Removes what a restore of `chunk` wrote so far: no copy of it is
    /// left to restore.
    pub async fn restore_abandon(&self, category: &str, chunk: &ChunkName) {
        let path = self.restore_path(category, chunk);
        let removed = tokio::task::spawn_blocking(move || std::fs::remove_file(&path)).await;
        if let Ok(Err(e)) = removed
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(category, chunk = %chunk, error = %e, "cannot remove the partial file of a restore given up");
        }
    }

    /// Makes a restored chunk of `size` bytes this node's own, complete
    /// chunk: fsync, rename into place, fsync of the directory, listed.
    /// `first_line`: the number its first line had (from the peer's copy);
    /// its lines are counted, and the numbers recorded. Refused when the
    /// chunk became known meanwhile (found in the object store): the
    /// partial file is removed.
    pub async fn restore_finish(
        &self,
        category: &str,
        chunk: &ChunkName,
        size: u64,
        first_line: Option<u64>,
    ) -> Result<(), StorageError> {
        // Decided under the lock that recording an object of this name
        // takes, so that neither overwrites the other's entry.
        let _own = self.shared.own_entries.lock().await;
        let cat = self.restorable(category, chunk).await?;
        // A copy that does not know its numbers (it was open when its
        // holder restarted): numbered after this node's chunk before it, as
        // start-up numbers its own chunks; the first chunk ever from 0.
        let first_line = first_line.or_else(|| {
            let before = cat
                .list()
                .into_iter()
                .rfind(|c| c.name.owner == chunk.owner && c.name.index < chunk.index);
            match before {
                Some(c) => c.meta.line_record().map(|r| r.end()),
                None => (chunk.index == 0).then_some(0),
            }
        });
        let tmp = self.restore_path(&cat.name, chunk);
        let (path, dir) = (cat.chunk_path(chunk), cat.dir.clone());
        let name = chunk.to_string();
        let (cat2, chunk2) = (cat.clone(), chunk.clone());
        let lines = tokio::task::spawn_blocking(move || {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&tmp)?;
            let len = f.metadata()?.len();
            if len != size {
                return Err(std::io::Error::other(format!(
                    "holds {len} bytes, not {size}"
                )));
            }
            let lines = numbering::count_lines(&f, size)?;
            if let Some(first) = first_line {
                let rec = numbering::LineRecord { size, first, lines };
                let _serial = cat2.state.lock().unwrap();
                cat2.record_numbers(&[(chunk2, rec)])
                    .map_err(std::io::Error::other)?;
            }
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            fsync_dir(&dir)?;
            Ok(lines)
        })
        .await
        .map_err(|e| StorageError::io("restore task failed", std::io::Error::other(e)))?
        .map_err(|e| StorageError::io(format!("cannot restore chunk {name}"), e))?;
        cat.update(chunk, size, true, first_line, Some(lines));
        if let Some(first) = first_line {
            cat.reserve_line(first + lines);
        }
        Ok(())
    }

    /// [`Storage::check_restorable`]; a refused chunk's partial file is
    /// removed.
    async fn restorable(
        &self,
        category: &str,
        chunk: &ChunkName,
    ) -> Result<std::sync::Arc<super::category::Category>, StorageError> {
        let refused = match self.check_restorable(category, chunk) {
            Ok(cat) => return Ok(cat),
            Err(e) => e,
        };
        if matches!(refused, StorageError::NotRestorable { .. }) {
            let _ = super::tier::remove_file(&self.restore_path(category, chunk)).await;
        }
        Err(refused)
    }

    fn check_restorable(
        &self,
        category: &str,
        chunk: &ChunkName,
    ) -> Result<std::sync::Arc<super::category::Category>, StorageError> {
        let cat = self.category_or_create(category)?;
        if chunk.owner != self.node() || cat.meta(chunk).is_some() {
            return Err(StorageError::NotRestorable {
                chunk: chunk.to_string(),
            });
        }
        if chunk.index >= cat.reserved_index() {
            return Err(StorageError::NotRestorable {
                chunk: chunk.to_string(),
            });
        }
        Ok(cat)
    }
}
