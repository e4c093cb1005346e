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

use super::{ChunkMeta, Storage, StorageError, fsync_dir, state};

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
        let cats: Vec<_> = self
            .shared
            .categories
            .read()
            .unwrap()
            .values()
            .cloned()
            .collect();
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

    fn check_replica(&self, chunk: &ChunkName) -> Result<(), StorageError> {
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
        let dir = cat.dir.clone();
        let name = chunk.to_string();
        let len = data.len() as u64;
        tokio::task::spawn_blocking(move || {
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)?;
            if offset == 0 {
                // Whatever a crash left past the known size goes.
                file.set_len(0)?;
                fsync_dir(&dir)?;
            }
            file.write_all_at(&data, offset)
        })
        .await
        .map_err(|e| StorageError::io("replica write task failed", std::io::Error::other(e)))?
        .map_err(|e| StorageError::io(format!("cannot write copy of chunk {name}"), e))?;
        cat.metrics.bytes_replicated.inc_by(len);
        cat.update(chunk, size + len, false);
        Ok(size + len)
    }

    /// Marks a copy complete at `size`, the owner's final size, and records
    /// it durably. A copy that holds more than the owner (the owner lost
    /// unsynced bytes in a power failure) is cut back to the owner's size.
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
            tracing::warn!(category, chunk = %chunk, have, owner_size = size, "copy holds more than its owner; cutting it back");
        }
        let path = cat.chunk_path(chunk);
        let truncate = have > size || held.is_none();
        let cat2 = cat.clone();
        let (owner, index) = (chunk.owner.clone(), chunk.index);
        tokio::task::spawn_blocking(move || {
            if truncate {
                let file = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
                    .and_then(|f| f.set_len(size).and_then(|()| f.sync_all()))
                    .map_err(|e| {
                        StorageError::io(format!("cannot cut back {}", path.display()), e)
                    });
                file?;
            }
            let mut st = cat2.state.lock().unwrap();
            if st.raise(&owner, index) {
                state::save(&cat2.dir, &st)?;
            }
            Ok::<(), StorageError>(())
        })
        .await
        .map_err(|e| StorageError::io("replica task failed", std::io::Error::other(e)))??;
        cat.update(chunk, size, true);
        Ok(())
    }

    /// Marks every incomplete chunk of `owner` complete, in every category,
    /// durably, so that readers can finish them. Returns how many changed.
    pub async fn forget_owner(&self, owner: &str) -> Result<usize, StorageError> {
        if owner == self.node() {
            return Err(StorageError::OwnChunk {
                chunk: format!("{owner}-chunk*"),
            });
        }
        let cats: Vec<_> = self
            .shared
            .categories
            .read()
            .unwrap()
            .values()
            .cloned()
            .collect();
        let mut changed = 0;
        for cat in cats {
            let open: Vec<_> = cat
                .list()
                .into_iter()
                .filter(|c| c.name.owner == owner && !c.meta.complete)
                .collect();
            let Some(last) = open.iter().map(|c| c.name.index).max() else {
                continue;
            };
            let cat2 = cat.clone();
            let owner2 = owner.to_owned();
            tokio::task::spawn_blocking(move || {
                let mut st = cat2.state.lock().unwrap();
                if st.raise(&owner2, last) {
                    state::save(&cat2.dir, &st)?;
                }
                Ok::<(), StorageError>(())
            })
            .await
            .map_err(|e| StorageError::io("forget task failed", std::io::Error::other(e)))??;
            for c in open {
                tracing::warn!(category = %cat.name, chunk = %c.name, size = c.meta.size, "owner forgotten: chunk completed here");
                cat.update(&c.name, c.meta.size, true);
                changed += 1;
            }
        }
        Ok(changed)
    }
}
