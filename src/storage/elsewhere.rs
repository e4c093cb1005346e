//! Chunks held elsewhere (`--replicas k`): another owner's chunks that this
//! node lists and serves but does not copy.
//!
//! With fewer copies than nodes, a node follows every owner's change feed
//! but copies only the (category, owner) pairs it holds. The others are
//! kept as metadata only (size, completeness, numbers; `local: false`,
//! `uploaded: false`), so that listings, consumer positions and Kafka
//! offsets stay whole on every node, and their bytes are read through the
//! [`RemoteChunks`] reader of chunks held elsewhere, which asks the
//! holders. Once such a chunk is uploaded it is an evicted chunk like any
//! other, read from S3.
//!
//! Nothing of it is durable: after a restart the owner's full listing (or
//! the bucket's) tells it again.
//!
//! A node that becomes a holder of a chunk it lists (a holder left, a node
//! joined) copies it beside its metadata ([`Storage::catch_up_write`]) and
//! adopts the copy once it holds everything listed
//! ([`Storage::adopt_copy`]): readers never see the chunk shrink.

use std::sync::Arc;

use bytes::Bytes;
use chunkbus_client::ChunkName;

use super::category::{ChunkMeta, now_ms};
use super::numbering::LineRecord;
use super::tier::RemoteChunks;
use super::{Storage, StorageError};

impl ChunkMeta {
    /// Listed here, its bytes held by other nodes only (neither on this
    /// node's disk nor in the object store).
    pub fn elsewhere(&self) -> bool {
        !self.local && !self.uploaded
    }
}

impl Storage {
    /// Installs the reader of chunks held elsewhere (once, at start-up).
    pub fn set_elsewhere_reader(&self, reader: Arc<dyn RemoteChunks>) {
        let _ = self.shared.elsewhere.set(reader);
    }

    pub(super) fn elsewhere_reader(&self) -> Option<&Arc<dyn RemoteChunks>> {
        self.shared.elsewhere.get()
    }

    /// Lists another owner's chunk whose bytes other nodes hold, as its
    /// owner lists it. A chunk held here (or uploaded) is left alone. An
    /// open listing never shrinks it (a listing older than the last one);
    /// a complete one is the owner's final word, and replaces it even when
    /// smaller (an owner that lost bytes and restored the chunk from a
    /// holder's copy). True when it changed.
    ///
    /// Its numbers are not recorded as this node's knowledge of the
    /// owner's numbering (`line_ends`): only a copy vouches for lines, so
    /// that an owner that lost its disk numbers on after what its holders
    /// hold, as with `--replicas all`.
    pub fn note_elsewhere(
        &self,
        category: &str,
        chunk: &ChunkName,
        size: u64,
        complete: bool,
        first_line: Option<u64>,
        numbers: Option<LineRecord>,
    ) -> Result<bool, StorageError> {
        self.check_replica(chunk)?;
        let cat = self.category_or_create(category)?;
        let old = cat.meta(chunk);
        let meta = match old {
            Some(m) if !m.elsewhere() => return Ok(false),
            Some(m) if (m.size > size && !complete) || (m.complete && m.size == size) => {
                return Ok(false);
            }
            Some(m) => m,
            None => ChunkMeta {
                local: false,
                ..ChunkMeta::local(0, false, now_ms())
            },
        };
        let numbers = numbers.filter(|r| r.size == size);
        let new = ChunkMeta {
            size,
            complete,
            first_line: first_line.or(meta.first_line),
            lines: numbers.map(|r| r.lines),
            ..meta
        };
        if old == Some(new) {
            return Ok(false);
        }
        cat.put_meta(chunk, new);
        Ok(true)
    }

    /// Writes `data` at `offset` of the copy being made of a chunk listed
    /// here as held elsewhere; the copy is not read until adopted. Offset 0
    /// starts the copy afresh.
    pub async fn catch_up_write(
        &self,
        category: &str,
        chunk: &ChunkName,
        offset: u64,
        data: Bytes,
    ) -> Result<(), StorageError> {
        self.check_replica(chunk)?;
        let cat = self.category(category)?;
        if !cat.meta(chunk).is_some_and(|m| m.elsewhere()) {
            return Err(StorageError::UnknownChunk {
                category: category.to_owned(),
                chunk: chunk.to_string(),
            });
        }
        let path = cat.chunk_path(chunk);
        let name = chunk.to_string();
        let len = data.len() as u64;
        let (cat2, chunk2) = (cat.clone(), chunk.clone());
        tokio::task::spawn_blocking(move || {
            super::replica::write_copy(&cat2, &chunk2, &path, offset, &data, offset == 0)
        })
        .await
        .map_err(|e| StorageError::io("copy task failed", std::io::Error::other(e)))?
        .map_err(|e| StorageError::io(format!("cannot write copy of chunk {name}"), e))?;
        cat.metrics.bytes_replicated.inc_by(len);
        Ok(())
    }

    /// Makes the copy written with [`Storage::catch_up_write`] (`size`
    /// bytes, `lines` lines) this node's copy of the chunk, once it holds
    /// what is listed (a complete chunk: exactly its size). False when it
    /// does not yet (the listing grew meanwhile) or the chunk is no longer
    /// listed as held elsewhere. A complete copy is recorded complete as
    /// any other, in the background.
    pub async fn adopt_copy(
        &self,
        category: &str,
        chunk: &ChunkName,
        size: u64,
        lines: u64,
    ) -> Result<bool, StorageError> {
        let cat = self.category(category)?;
        let Some(complete) = cat.adopt(chunk, size, lines) else {
            return Ok(false);
        };
        if complete {
            self.queue_completion(cat.clone(), chunk, size).await?;
        }
        Ok(true)
    }
}

impl Storage {
    /// Exactly `len` bytes of `chunk` from `offset`, from this node's copy
    /// or the object store, never from another node: what a node that
    /// lists the chunk as held elsewhere asks its holders for. `None` when
    /// this node does not hold that range.
    pub async fn read_held(
        &self,
        category: &str,
        chunk: &ChunkName,
        offset: u64,
        len: u64,
    ) -> Result<Option<Bytes>, StorageError> {
        let cat = self.category(category)?;
        let Some(meta) = cat.meta(chunk) else {
            return Ok(None);
        };
        let Some(end) = offset.checked_add(len) else {
            return Ok(None);
        };
        if meta.elsewhere() || end > meta.size {
            return Ok(None);
        }
        // The route bounds `len`.
        let len = len as usize;
        self.with_bytes_from(&cat, chunk, &meta, false, move |file| {
            file.read_bytes_at(len, offset)
                .map_err(|e| StorageError::io("cannot read a held chunk", e))
        })
        .await
        .map(Some)
    }
}

impl Storage {
    /// Deletes the local copy of another owner's complete chunk, which
    /// stays listed, held elsewhere: a pair this node no longer holds,
    /// once its holders hold the chunk whole (`--replicas k` without S3).
    /// Only through [`Storage::reclaim`].
    pub(super) async fn drop_copy(
        &self,
        category: &str,
        chunk: &ChunkName,
    ) -> Result<super::TierOutcome, StorageError> {
        self.check_replica(chunk)?;
        let cat = self.category(category)?;
        let Some(meta) = cat.meta(chunk) else {
            return Ok(super::TierOutcome::Unknown);
        };
        if !meta.complete || !meta.local || meta.uploaded {
            return Ok(super::TierOutcome::NotEligible);
        }
        // Listed as held elsewhere first: readers that find the file gone
        // go to the holders.
        if !cat.set_tier(chunk, None, Some(false)) {
            return Ok(super::TierOutcome::NotEligible);
        }
        super::tier::remove_file(&cat.chunk_path(chunk)).await?;
        tracing::debug!(category, chunk = %chunk, bytes = meta.size, "copy dropped: its holders hold it");
        Ok(super::TierOutcome::Done)
    }
}
