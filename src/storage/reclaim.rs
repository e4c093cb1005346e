//! Reclaiming space: the one way a chunk's bytes leave this node.
//!
//! Policies decide *when* a chunk may go, each where its trigger is: the
//! consumers' release of acknowledged chunks (`consumers::release`, woken
//! by acks), the age sweep (`upload::sweep`: `--local-retention` and
//! `--retention`, on a timer), the disk monitor (above the high-water
//! mark), and replication (a pair this node no longer holds). This module decides *how*, in one place, from the reason alone:
//!
//! | reason | with S3 | without S3 |
//! |---|---|---|
//! | acknowledged by every consumer | local copy evicted once uploaded | chunk deleted |
//! | local copy older than `--local-retention` | evicted | — |
//! | disk above the high-water mark | evicted, oldest first | — |
//! | no longer held here (`--replicas k`) | evicted once uploaded | deleted once its holders hold it whole (it stays listed) |
//! | older than `--retention` | deleted with its upload record (its object first, by the uploader) | deleted |
//!
//! "Retention" means only the age limits (`--retention`,
//! `--local-retention`); chunks released because their readers are done
//! are "acknowledged".

use chunkbus_client::ChunkName;

use super::{Storage, StorageError, TierOutcome};

/// Why a chunk leaves this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reclaim {
    /// Every consumer of its category has acknowledged all of it.
    Acknowledged,
    /// Its local copy is older than `--local-retention` (S3 only).
    LocalAge,
    /// The disk is above the high-water mark (S3 only).
    DiskPressure,
    /// This node no longer holds its (category, owner) pair (`--replicas
    /// k`): with S3 once it is uploaded, without once its holders hold it.
    NotHolder,
    /// It is older than `--retention`.
    Expired,
}

impl Reclaim {
    fn as_str(self) -> &'static str {
        match self {
            Reclaim::Acknowledged => "every consumer acknowledged it",
            Reclaim::LocalAge => "local copy older than --local-retention",
            Reclaim::DiskPressure => "disk above the high-water mark",
            Reclaim::NotHolder => "other nodes hold it (--replicas)",
            Reclaim::Expired => "older than --retention",
        }
    }
}

impl Storage {
    /// Removes what `why` calls for of a complete chunk held here (see the
    /// module's table). An open chunk, or one not held, is never touched
    /// (`NotEligible`, `Unknown`); nor is a local copy evicted before it
    /// is uploaded.
    pub async fn reclaim(
        &self,
        category: &str,
        chunk: &ChunkName,
        why: Reclaim,
    ) -> Result<TierOutcome, StorageError> {
        let outcome = match why {
            Reclaim::Acknowledged if !self.tiered() => {
                match self.delete_chunk(category, chunk).await? {
                    true => TierOutcome::Done,
                    false => TierOutcome::NotEligible,
                }
            }
            Reclaim::NotHolder if !self.tiered() => self.drop_copy(category, chunk).await?,
            Reclaim::Acknowledged
            | Reclaim::LocalAge
            | Reclaim::DiskPressure
            | Reclaim::NotHolder => self.evict(category, chunk).await?,
            Reclaim::Expired => self.purge(category, chunk).await?,
        };
        if outcome == TierOutcome::Done {
            if let Ok(cat) = self.category(category) {
                self.shared.mapped.forget(&cat.chunk_path(chunk));
            }
            let how = match why {
                Reclaim::Expired => "deleted",
                Reclaim::NotHolder => "local copy dropped",
                _ if self.tiered() => "local copy evicted",
                _ => "deleted",
            };
            tracing::info!(category, chunk = %chunk, reason = why.as_str(), "chunk reclaimed: {how}");
        }
        Ok(outcome)
    }
}
