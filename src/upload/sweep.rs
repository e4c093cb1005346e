//! Age-based housekeeping, on a timer (ages pass without events):
//!
//! - `--local-retention`: uploaded chunks whose local copy is older than this
//!   are evicted (they stay readable from S3).
//! - `--retention`: complete chunks older than this are deleted everywhere:
//!   the node that uploads a chunk deletes its object, every node deletes its
//!   copy and its record. Without S3 this is plain local retention.
//!
//! Both decide when; `Storage::reclaim` decides how (see `storage::reclaim`
//! for every reason a chunk leaves a node).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Responsibility, Tiering};
use crate::storage::Reclaim;
use crate::storage::now_ms;

/// Shortest and longest time between two sweeps.
const SWEEP_MIN: Duration = Duration::from_secs(1);
const SWEEP_MAX: Duration = Duration::from_secs(60);

/// Sweeps until `cancel`.
pub(super) async fn run(tier: Arc<Tiering>, cancel: CancellationToken) {
    let r = tier.retention;
    let shortest = r
        .retention
        .map_or(r.local_retention, |d| d.min(r.local_retention));
    let every = (shortest / 4).clamp(SWEEP_MIN, SWEEP_MAX);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        sweep(&tier).await;
    }
}

async fn sweep(tier: &Tiering) {
    let now = now_ms();
    let older_than =
        |created_ms: u64, age: Duration| now.saturating_sub(created_ms) >= age.as_millis() as u64;
    for category in tier.storage.categories() {
        for c in tier.storage.chunks(&category).unwrap_or_default() {
            let m = c.meta;
            if !m.complete {
                continue;
            }
            if let Some(age) = tier.retention.retention
                && older_than(m.created_ms, age)
            {
                expire(tier, &category, &c.name, m.uploaded).await;
                continue;
            }
            // A pair this node no longer holds (--replicas k) keeps no
            // uploaded copy here.
            let why = if older_than(m.created_ms, tier.retention.local_retention) {
                Some(Reclaim::LocalAge)
            } else if !tier.cluster.holds(&category, &c.name.owner) {
                Some(Reclaim::NotHolder)
            } else {
                None
            };
            if tier.s3.is_some()
                && m.uploaded
                && m.local
                && let Some(why) = why
            {
                match tier.storage.reclaim(&category, &c.name, why).await {
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(category, chunk = %c.name, error = %e, "cannot evict a chunk")
                    }
                }
            }
        }
    }
}

/// Deletes a chunk past `--retention`: its object (when this node uploads
/// its owner's chunks), then its copy here.
async fn expire(
    tier: &Tiering,
    category: &str,
    chunk: &chunkbus_client::ChunkName,
    uploaded: bool,
) {
    if let Some((_, store)) = &tier.s3
        && uploaded
        && matches!(
            tier.uploads_for(category, &chunk.owner),
            Responsibility::Owner | Responsibility::Chosen
        )
    {
        let key = tier.key(category, chunk).unwrap_or_default();
        if let Err(e) = store.delete(&key).await {
            tier.record_error(&e);
            tracing::warn!(category, chunk = %chunk, error = %e, "cannot delete an expired chunk from S3; retrying at the next sweep");
            return;
        }
    }
    match tier
        .storage
        .reclaim(category, chunk, Reclaim::Expired)
        .await
    {
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(category, chunk = %chunk, error = %e, "cannot delete an expired chunk")
        }
    }
}
