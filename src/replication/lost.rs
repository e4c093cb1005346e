//! A lost owner's complete chunks are uploaded by one replica (see
//! `upload`), from its own copy. The copies were completed where each
//! stood when the owner was forgotten, so they may differ in length, and
//! the lines past the shortest copy's end may be on one replica only (a
//! write acknowledged with `min_replicas` 1 of 2 peers). Uploaded from a
//! shorter copy, those lines would be in no object, and gone with that
//! replica's disk. So the replica chosen first brings its copy up to the
//! longest one a reachable peer holds; the others then give way to the
//! object, which is at least as long as their copies (one that could not
//! be reached and holds more stores its extra lines again first: the
//! uploader's `rescue_copy`).

use chunkbus_client::{ChunkName, Client, ClientError};

use super::Replication;

/// Bytes asked for in one read of a longer copy.
const READ_BYTES: u64 = 16 << 20;

impl Replication {
    /// Brings this node's complete copy of a lost owner's `chunk` up to
    /// the longest copy a reachable holder of the owner's chunks holds:
    /// each peer is asked for what it holds past this copy's end (copies
    /// of one owner's chunk are each a beginning of it). Returns the bytes
    /// added. An error (a peer that did not answer) leaves the copy
    /// reopened with what was added so far; the next call goes on from
    /// there, and a restart completes it (see `Replication::start`).
    pub async fn catch_up_lost_copy(
        &self,
        category: &str,
        chunk: &ChunkName,
    ) -> Result<u64, String> {
        let Some(held) = self.storage.chunk_meta(category, chunk) else {
            return Ok(0);
        };
        if !held.local || held.uploaded {
            return Ok(0);
        }
        let holders = self.copied_by(category, &chunk.owner);
        let peers: Vec<_> = self
            .links()
            .into_iter()
            .filter(|l| l.name != chunk.owner && l.state.lock().unwrap().connected)
            .filter(|l| holders.as_ref().is_none_or(|h| h.contains(&l.name)))
            .collect();
        let name = chunk.to_string();
        let mut have = held.size;
        let mut reopened = !held.complete;
        for link in peers {
            let client = Client::with_http(&self.peer_base(&link), self.http.clone())
                .map_err(|e| e.to_string())?;
            loop {
                let read = client.read_chunk(category, &name, have, READ_BYTES);
                let read = match tokio::time::timeout(self.cfg.peer_timeout, read).await {
                    Ok(Ok(r)) => r,
                    // Not held there, or shorter there (past its end).
                    Ok(Err(ClientError::Status { status, .. })) if status.is_client_error() => {
                        break;
                    }
                    Ok(Err(e)) => return Err(format!("peer {}: {e}", link.name)),
                    Err(_) => {
                        return Err(format!(
                            "peer {} did not answer a read of {name} within {:?}",
                            link.name, self.cfg.peer_timeout
                        ));
                    }
                };
                if read.data.is_empty() {
                    break;
                }
                if !reopened {
                    self.storage
                        .replica_reopen(category, chunk)
                        .await
                        .map_err(|e| e.to_string())?;
                    reopened = true;
                }
                have = self
                    .storage
                    .replica_append(category, chunk, have, read.data)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        if reopened {
            self.storage
                .replica_complete(category, chunk, have)
                .await
                .map_err(|e| e.to_string())?;
        }
        let added = have - held.size;
        if added > 0 {
            tracing::warn!(category, chunk = %chunk, held = held.size, now = have, "a peer held more of a lost owner's chunk than this node, which uploads it: copied the rest first");
        }
        Ok(added)
    }

    /// Completes again the open chunks of the owners still forgotten here:
    /// none is open but a copy that [`Replication::catch_up_lost_copy`]
    /// reopened when this node stopped (its owner does not complete it).
    pub(super) async fn complete_forgotten(self: std::sync::Arc<Self>) {
        for owner in self.storage.forgotten_owners() {
            match self.storage.forget_owner(&owner).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(
                        owner,
                        chunks = n,
                        "completed a forgotten owner's copies left open when this node stopped"
                    )
                }
                Err(e) => {
                    tracing::error!(owner, error = %e, "cannot complete a forgotten owner's open copies")
                }
            }
        }
    }
}
