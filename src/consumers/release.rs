//! Releasing what readers are done with (Chukcha's behaviour): a complete
//! chunk that every consumer of its category has fully acknowledged is
//! reclaimed ([`Reclaim::Acknowledged`]: deleted, or with S3 its local copy
//! evicted once uploaded, the chunk staying listed and readable from S3). A
//! category without consumers keeps everything.
//!
//! The task wakes on position changes and on chunk changes (a chunk read to
//! its end becomes releasable when it completes), at most once per
//! [`RELEASE_MIN_INTERVAL`], and scans the categories that have consumers.

use std::sync::Arc;
use std::time::Duration;

use chunkbus_client::ChunkName;
use tokio_util::sync::CancellationToken;

use super::{Consumers, fully_read};
use crate::storage::{ChunkStatus, Reclaim, Storage};

/// Shortest time between two scans.
pub const RELEASE_MIN_INTERVAL: Duration = Duration::from_secs(1);

impl Consumers {
    /// True when the category has consumers and every one of them has
    /// passed all of `chunk`.
    pub fn passed_by_all(&self, category: &str, chunk: &ChunkStatus) -> bool {
        let consumers = self.list(category);
        !consumers.is_empty()
            && consumers
                .iter()
                .all(|(_, e)| fully_read(e.positions.get(&chunk.name.owner), chunk))
    }
}

/// The chunks of `category` held here (or listed as held elsewhere) that
/// every consumer is done with.
pub fn releasable(storage: &Storage, consumers: &Consumers, category: &str) -> Vec<ChunkName> {
    storage
        .chunks(category)
        .unwrap_or_default()
        .into_iter()
        .filter(|c| {
            c.meta.complete
                && (c.meta.local || c.meta.elsewhere())
                && consumers.passed_by_all(category, c)
        })
        .map(|c| c.name)
        .collect()
}

/// Releases fully acknowledged chunks until `cancel`.
pub async fn run(storage: Storage, consumers: Arc<Consumers>, cancel: CancellationToken) {
    let mut positions = consumers.subscribe();
    let mut chunks = storage.subscribe_feed();
    loop {
        for category in storage.categories() {
            for chunk in releasable(&storage, &consumers, &category) {
                let done = storage
                    .reclaim(&category, &chunk, Reclaim::Acknowledged)
                    .await;
                if let Err(e) = done {
                    tracing::warn!(category, chunk = %chunk, error = %e, "cannot release an acknowledged chunk");
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(RELEASE_MIN_INTERVAL) => {}
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = positions.changed() => {}
            _ = chunks.changed() => {}
        }
    }
}
