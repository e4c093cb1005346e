//! What consumers do with their positions: read the next unacknowledged
//! lines, acknowledge, move every position to the start or the end, and
//! how far behind they are. The HTTP routes (`http::consumers`, Chukcha's
//! `/ack`) only parse requests and shape answers.

use std::time::Duration;

use bytes::Bytes;
use chunkbus_client::{ChunkName, ChunkPosition, ConsumerDetail};
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;

use super::{
    ConsumerEntry, Consumers, Position, chunks_by_owner, lag_bytes, next_unread, position_after,
};
use crate::storage::StorageError;

/// Why an acknowledgement was refused.
#[derive(Debug, thiserror::Error)]
pub enum AckError {
    /// The chunk (or its category) is not on this node.
    #[error(
        "chunk {chunk} of category {category:?} is not held by this node; ack where you read it, or once it has replicated"
    )]
    NotHeld {
        /// Category.
        category: String,
        /// Chunk.
        chunk: ChunkName,
    },
    /// The offset is not a line boundary of what this node holds.
    #[error(transparent)]
    NotABoundary(StorageError),
    /// Storing the new position failed.
    #[error(transparent)]
    Storage(StorageError),
}

/// How `next` reads.
#[derive(Debug, Clone)]
pub struct NextOptions {
    /// Most bytes returned (whole lines; at least one line).
    pub max_bytes: u64,
    /// Longest to wait for lines when there are none.
    pub wait: Duration,
    /// A consumer without a position starts at the end of what is held.
    pub start_latest: bool,
    /// Read as if this `(chunk, offset)` were acknowledged already (nothing
    /// is stored), so that a client can fetch ahead.
    pub after: Option<(ChunkName, u64)>,
}

/// Lines returned by `next`.
#[derive(Debug)]
pub struct NextLines {
    /// The chunk they come from.
    pub chunk: ChunkName,
    /// Where they start in it.
    pub offset: u64,
    /// Just past them: what to acknowledge.
    pub next_offset: u64,
    /// Whole lines.
    pub data: Bytes,
}

impl Consumers {
    /// The next unacknowledged lines of `consumer`, from the owner whose
    /// oldest unread chunk is oldest; `None` when there are none within
    /// `opts.wait` (or `stop` is cancelled). The same lines come back until
    /// they are acknowledged. `waiters` counts the time spent waiting.
    pub async fn next(
        &self,
        category: &str,
        consumer: &str,
        opts: &NextOptions,
        waiters: &Gauge,
        stop: &CancellationToken,
    ) -> Result<Option<NextLines>, StorageError> {
        let deadline = tokio::time::Instant::now() + opts.wait;
        let mut changes = self.storage.subscribe_feed();
        loop {
            changes.borrow_and_update();
            let mut entry = self.get(category, consumer).unwrap_or_default();
            if opts.start_latest && !entry.is_live() {
                entry = self.move_all(category, consumer, true, false).await?;
            }
            if let Some((chunk, offset)) = &opts.after
                && self.storage.chunk_meta(category, chunk).is_some()
            {
                entry.raise(
                    &chunk.owner,
                    position_after(entry.generation(), chunk, *offset),
                );
            }
            let pick = chunks_by_owner(&self.storage, category)
                .iter()
                .filter_map(|(owner, chunks)| next_unread(entry.positions.get(owner), chunks))
                .min_by_key(|(c, _)| (c.meta.created_ms, c.name.clone()));
            if let Some((chunk, offset)) = pick {
                let r = self
                    .storage
                    .read(
                        category,
                        &chunk.name,
                        offset,
                        opts.max_bytes,
                        Duration::ZERO,
                        stop,
                    )
                    .await?;
                return Ok(Some(NextLines {
                    chunk: chunk.name,
                    offset,
                    next_offset: r.next_offset,
                    data: r.data,
                }));
            }
            if tokio::time::Instant::now() >= deadline || stop.is_cancelled() {
                return Ok(None);
            }
            let _waiting = crate::metrics::GaugeHeld::new(waiters);
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep_until(deadline) => {}
                _ = stop.cancelled() => {}
            }
        }
    }

    /// Moves `consumer` past `chunk` up to `offset`, which must be a line
    /// boundary of data this node holds.
    pub async fn ack(
        &self,
        category: &str,
        consumer: &str,
        chunk: &ChunkName,
        offset: u64,
    ) -> Result<ConsumerEntry, AckError> {
        self.storage
            .check_boundary(category, chunk, offset)
            .await
            .map_err(|e| match e {
                StorageError::UnknownCategory(_) | StorageError::UnknownChunk { .. } => {
                    AckError::NotHeld {
                        category: category.to_owned(),
                        chunk: chunk.clone(),
                    }
                }
                StorageError::OffsetPastEnd { .. } | StorageError::NotLineBoundary { .. } => {
                    AckError::NotABoundary(e)
                }
                e => AckError::Storage(e),
            })?;
        self.update(category, consumer, |e| {
            e.raise(&chunk.owner, position_after(e.generation(), chunk, offset))
        })
        .await
        .map_err(AckError::Storage)
    }

    /// Sets every owner's position to the start (or, when `latest`, the
    /// end) of what this node holds, in a new generation when `rewind` (so
    /// that it may move backwards).
    pub async fn move_all(
        &self,
        category: &str,
        consumer: &str,
        latest: bool,
        rewind: bool,
    ) -> Result<ConsumerEntry, StorageError> {
        let by_owner = chunks_by_owner(&self.storage, category);
        self.update(category, consumer, |e| {
            let generation = if rewind {
                e.generation() + 1
            } else {
                e.generation()
            };
            let mut changed = false;
            for (owner, chunks) in &by_owner {
                let p = match (latest, chunks.first(), chunks.last()) {
                    (false, Some(first), _) => Position {
                        generation,
                        index: first.name.index,
                        offset: 0,
                    },
                    (true, _, Some(last)) => position_after(generation, &last.name, last.meta.size),
                    _ => continue,
                };
                changed |= e.raise(owner, p);
            }
            changed
        })
        .await
    }

    /// `entry`'s positions and how far behind it is, from this node's chunks.
    pub fn detail(&self, category: &str, entry: &ConsumerEntry) -> ConsumerDetail {
        let by_owner = chunks_by_owner(&self.storage, category);
        let lag = by_owner
            .iter()
            .map(|(owner, chunks)| lag_bytes(entry.positions.get(owner), chunks))
            .sum();
        ConsumerDetail {
            positions: entry
                .positions
                .iter()
                .map(|(owner, p)| {
                    (
                        owner.clone(),
                        ChunkPosition {
                            chunk: ChunkName::new(owner.clone(), p.index).to_string(),
                            offset: p.offset,
                        },
                    )
                })
                .collect(),
            lag_bytes: lag,
            generation: entry.generation(),
        }
    }
}
