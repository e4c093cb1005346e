//! The puller of one peer: follow its change feed, copy its chunks.

use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chunkbus_client::names::{validate_category, validate_consumer};
use chunkbus_client::{ChunkName, Client, ClientError, ReadChunk};
use reqwest::StatusCode;
use tokio_util::sync::CancellationToken;

use super::protocol::{ChangesRequest, ChangesResponse, Progress};
use super::{PeerLink, Replication};
use crate::storage::StorageError;

/// First retry delay after a failure.
const BACKOFF_INITIAL: Duration = Duration::from_millis(100);
/// Longest retry delay.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Bytes asked for in one read while copying.
const COPY_READ_BYTES: u64 = 16 << 20;

/// What the owner holds of one chunk this node still has to copy.
#[derive(Debug, Clone, Copy)]
struct Target {
    size: u64,
    complete: bool,
    /// The owner's number of the chunk's first line, when it gave one.
    first_line: Option<u64>,
}

/// Why a round failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum PullError {
    #[error("{0}")]
    Peer(String),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The members that hold chunks changed (`--replicas k`) during the
    /// long poll: list again, at once.
    #[error("the holders changed")]
    Replan,
    /// Another process of the peer than the one whose listing is followed
    /// read a chunk's bytes: they are not taken, and the peer is asked for
    /// its full listing again (at once the first time; a new process also
    /// answers so to the old incarnation).
    #[error("the peer restarted since its listing")]
    Restarted,
}

/// Follows the peer of `link` until `cancel`.
pub(super) async fn run(repl: Arc<Replication>, link: Arc<PeerLink>, cancel: CancellationToken) {
    let link = &*link;
    let mut base = repl.peer_base(link);
    let mut client =
        Client::with_http(&base, repl.http.clone()).expect("peer addresses are validated");
    // The peer's incarnation that `since` and `positions_since` belong to.
    let mut incarnation = 0u64;
    let mut since = 0u64;
    let mut positions_since = 0u64;
    let mut targets: BTreeMap<(String, ChunkName), Target> = BTreeMap::new();
    // Chunks this puller never copies into again: a new process of the peer
    // listed them open while a copy here already held bytes, so the peer
    // reused their names (see below).
    let mut refused: std::collections::BTreeSet<(String, ChunkName)> = Default::default();
    let mut progress: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut backoff = BACKOFF_INITIAL;
    // Rounds in a row whose reads another process of the peer answered.
    let mut stale_rounds = 0u32;
    let mut placement = repl.subscribe_placement();
    loop {
        if placement.has_changed().unwrap_or(false) {
            // Other chunks may be this node's to copy now: the full
            // listing says which.
            placement.borrow_and_update();
            since = 0;
            targets.clear();
        }
        // With bucket membership the address follows the peer's record.
        let now = repl.peer_base(link);
        if now != base {
            match Client::with_http(&now, repl.http.clone()) {
                Ok(c) => (base, client) = (now, c),
                Err(e) => {
                    tracing::warn!(peer = %link.name, addr = %now, error = %e, "a peer's new address is not usable; keeping the old one")
                }
            }
        }
        let (base, client) = (&base, &client);
        let round = async {
            let asked = changes(
                &repl,
                link,
                base,
                (incarnation, since, positions_since),
                &mut progress,
            );
            let mut resp = tokio::select! {
                r = asked => r?,
                _ = placement.changed() => return Err(PullError::Replan),
            };
            repl.set_connected(link, true, None).await;
            if resp.incarnation != incarnation {
                // A new process of the peer: it answered with its full
                // listing, which replaces what was known of the old one.
                if incarnation != 0 {
                    tracing::info!(peer = %link.name, "peer restarted; resynchronising from its full listing");
                    repl.metrics
                        .peer_restarts
                        .get_or_create(&crate::metrics::PeerLabels {
                            peer: link.name.clone(),
                        })
                        .inc();
                }
                targets.clear();
                let restarted = incarnation != 0;
                incarnation = resp.incarnation;
                if restarted {
                    // Every chunk of the old process is complete in the new
                    // one, which creates its open chunks itself: an open
                    // chunk that a copy here already holds bytes of was
                    // named again by a peer that lost its disk. Its bytes
                    // differ; the copy keeps the old ones.
                    for c in resp.chunks.iter().filter(|c| !c.complete) {
                        let Ok(name) = ChunkName::parse(&c.chunk) else {
                            continue;
                        };
                        if let Some(m) = repl.storage.chunk_meta(&c.category, &name)
                            && m.size > 0
                        {
                            tracing::error!(peer = %link.name, category = %c.category, chunk = %c.chunk, held = m.size, "a restarted peer lists as new a chunk whose copy here holds bytes (it lost its disk and reused the name); the copy is kept and not written again");
                            repl.set_disagreeing(
                                link,
                                &c.category,
                                &c.chunk,
                                Some((c.size, m.size)),
                            );
                            refused.insert((c.category.clone(), name));
                        }
                    }
                }
            }
            since = resp.version;
            positions_since = resp.positions_version;
            repl.note_kafka(link, resp.kafka_addr.clone(), resp.kafka_nodes.clone());
            repl.note_answer(link, resp.about.take());
            for category in resp.line_ends.keys() {
                validate_category(category).map_err(|e| PullError::Peer(e.to_string()))?;
            }
            let listed = resp.chunks.iter().map(|c| c.category.as_str()).collect();
            repl.storage
                .learn_line_ends(&link.name, &resp.line_ends, &listed)
                .await;
            for p in resp.positions {
                validate_category(&p.category).map_err(|e| PullError::Peer(e.to_string()))?;
                validate_consumer(&p.consumer).map_err(|e| PullError::Peer(e.to_string()))?;
                repl.consumers
                    .update(&p.category, &p.consumer, |mine| mine.merge(&p.entry))
                    .await?;
            }
            for c in resp.chunks {
                let name =
                    ChunkName::parse(&c.chunk).map_err(|e| PullError::Peer(e.to_string()))?;
                if name.owner != link.name {
                    return Err(PullError::Peer(format!(
                        "peer {} listed chunk {name}, which it does not own",
                        link.name
                    )));
                }
                if refused.contains(&(c.category.clone(), name.clone())) {
                    continue;
                }
                let holder = repl.holds(&c.category, &link.name);
                if c.uploaded && c.complete && repl.storage.tiered() {
                    // In S3 already: read through it rather than copy it.
                    let held = repl.storage.chunk_meta(&c.category, &name);
                    if !holder && held.is_some_and(|m| m.local && m.uploaded) {
                        // A copy made before this node stopped holding the
                        // pair (--replicas k): S3 has the chunk now.
                        repl.storage
                            .reclaim(&c.category, &name, crate::storage::Reclaim::NotHolder)
                            .await?;
                    }
                    // Held at another size: the owner's listing says
                    // what it uploaded (see `Storage::add_remote`).
                    match (held.filter(|m| m.size == c.size), c.line_record()) {
                        (Some(m), Some(numbers)) if m.uploaded => {
                            if m.line_record() != Some(numbers) {
                                repl.storage
                                    .learn_numbers(&c.category, &name, numbers)
                                    .await?;
                            }
                        }
                        (Some(m), None) if m.uploaded => {}
                        _ => {
                            repl.storage
                                .add_owners_upload(&c.category, &name, c.size, c.line_record())
                                .await?;
                            if repl
                                .storage
                                .chunk_meta(&c.category, &name)
                                .is_some_and(|m| m.uploaded && m.size == c.size)
                            {
                                // Settled as its owner uploaded it.
                                repl.set_disagreeing(link, &c.category, &c.chunk, None);
                            }
                        }
                    }
                    targets.remove(&(c.category, name));
                    continue;
                }
                let held = repl.storage.chunk_meta(&c.category, &name);
                if !holder && held.is_none_or(|m| m.elsewhere()) {
                    if held.is_none()
                        && c.complete
                        && !repl.storage.tiered()
                        && passed_by_all(
                            &repl,
                            &c.category,
                            &name,
                            Target {
                                size: c.size,
                                complete: true,
                                first_line: c.first_line,
                            },
                        )
                    {
                        // Every consumer is past it: released here already
                        // (or it would be).
                        continue;
                    }
                    // Other nodes hold it (--replicas k): listed here, read
                    // from them. A copy made before this node stopped
                    // holding the pair is kept up to date instead, until
                    // it is uploaded (or, without S3, its holders hold it
                    // whole).
                    repl.storage.note_elsewhere(
                        &c.category,
                        &name,
                        c.size,
                        c.complete,
                        c.first_line,
                        c.line_record(),
                    )?;
                    targets.remove(&(c.category, name));
                    continue;
                }
                targets.insert(
                    (c.category, name),
                    Target {
                        size: c.size,
                        complete: c.complete,
                        first_line: c.first_line,
                    },
                );
            }
            copy(
                &repl,
                link,
                incarnation,
                client,
                &mut targets,
                &mut progress,
                &cancel,
            )
            .await
        };
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = round => r,
        };
        match result {
            Ok(()) => (backoff, stale_rounds) = (BACKOFF_INITIAL, 0),
            Err(PullError::Replan) => {
                placement.borrow_and_update();
                since = 0;
                targets.clear();
            }
            Err(PullError::Restarted) => {
                // A full listing, whichever process answers.
                since = 0;
                targets.clear();
                stale_rounds += 1;
                if stale_rounds == 1 {
                    // Asked again at once.
                    tracing::debug!(peer = %link.name, "a chunk was read by another process of the peer than the one it was listed by; asking for its listing");
                } else {
                    // Not a restart, then (listings and reads answered by
                    // different processes, as behind a balancer): no spin.
                    tracing::warn!(peer = %link.name, "the peer's chunks are read by another process of it than the one that lists them, round after round; retrying with backoff");
                    let delay = jitter(backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
            Err(e) => {
                repl.set_connected(link, false, Some(e.to_string())).await;
                repl.maybe_declare_lost(link).await;
                since = 0;
                positions_since = 0;
                targets.clear();
                let delay = jitter(backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
        let lag = lag_by_category(&repl, &targets);
        repl.set_lag(link, lag);
    }
}

/// One changes request carrying the progress made since the last one.
async fn changes(
    repl: &Replication,
    link: &PeerLink,
    base: &str,
    (incarnation, since, positions_since): (u64, u64, u64),
    progress: &mut BTreeMap<(String, String), u64>,
) -> Result<ChangesResponse, PullError> {
    let req = ChangesRequest {
        node: repl.node().to_owned(),
        incarnation,
        node_incarnation: repl.storage.incarnation(),
        since,
        positions_since,
        wait_ms: repl.cfg.wait.as_millis() as u64,
        progress: recent_progress(progress),
    };
    let resp = repl
        .http
        .post(format!("{base}/v1/internal/changes"))
        .json(&req)
        .timeout(repl.cfg.wait + repl.cfg.peer_timeout)
        .send()
        .await
        .map_err(|e| PullError::Peer(format!("changes request failed: {e}")))?;
    if resp.status() != StatusCode::OK {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        return Err(PullError::Peer(format!(
            "changes request answered {status}: {body}"
        )));
    }
    let resp: ChangesResponse = resp
        .json()
        .await
        .map_err(|e| PullError::Peer(format!("bad changes answer: {e}")))?;
    if resp.node != link.name {
        return Err(PullError::Peer(format!(
            "the node at {} is {}, not {} (as --peers or its record in the bucket says)",
            link.addr(),
            resp.node,
            link.name
        )));
    }
    progress.clear();
    Ok(resp)
}

/// The progress to report: per category, the newest chunks only (the owner
/// keeps no more, see `progress`), so that the request stays small after a
/// full listing of an owner with many chunks (it is bounded like any JSON
/// body of the API).
fn recent_progress(progress: &BTreeMap<(String, String), u64>) -> Vec<Progress> {
    let mut by_category: BTreeMap<&str, Vec<(u32, &str, u64)>> = BTreeMap::new();
    for ((category, chunk), size) in progress {
        let index = ChunkName::parse(chunk).map_or(0, |c| c.index);
        by_category
            .entry(category)
            .or_default()
            .push((index, chunk, *size));
    }
    let mut out = Vec::new();
    for (category, mut chunks) in by_category {
        chunks.sort_unstable_by_key(|c| std::cmp::Reverse(c.0));
        chunks.truncate(super::progress::KEEP_CHUNKS_PER_CATEGORY as usize);
        out.extend(chunks.into_iter().map(|(_, chunk, size)| Progress {
            category: category.to_owned(),
            chunk: chunk.to_owned(),
            size,
        }));
    }
    out
}

/// The bytes of a read of the owner's chunk, when the process that read
/// them is the one whose listing the copy follows (`listed_by`); a server
/// that does not say is taken at its word.
fn from_listed_process(read: ReadChunk, listed_by: u64) -> Result<Bytes, PullError> {
    match read.incarnation {
        Some(i) if i != listed_by => Err(PullError::Restarted),
        _ => Ok(read.data),
    }
}

/// Copies what `targets` says is missing, in chunk order per category, from
/// the owner's process `listed_by` (its incarnation) that listed them.
async fn copy(
    repl: &Replication,
    link: &PeerLink,
    listed_by: u64,
    client: &Client,
    targets: &mut BTreeMap<(String, ChunkName), Target>,
    progress: &mut BTreeMap<(String, String), u64>,
    cancel: &CancellationToken,
) -> Result<(), PullError> {
    let storage = &repl.storage;
    let keys: Vec<_> = targets.keys().cloned().collect();
    for key in keys {
        let (category, chunk) = &key;
        let target = targets[&key];
        loop {
            if cancel.is_cancelled() {
                return Ok(());
            }
            let held = storage.chunk_meta(category, chunk);
            if held.is_some_and(|m| m.elsewhere()) {
                // Listed here as held elsewhere, this node's to hold now:
                // copied from the owner.
                let from_owner = |at: u64| async move {
                    match client
                        .read_chunk(category, &chunk.to_string(), at, COPY_READ_BYTES)
                        .await
                    {
                        Ok(r) => Ok(Some(from_listed_process(r, listed_by)?)),
                        Err(ClientError::Status { status, message })
                            if status == StatusCode::NOT_FOUND =>
                        {
                            tracing::warn!(category, chunk = %chunk, error = %message, "the owner no longer has a chunk it listed; not copying it");
                            Ok(None)
                        }
                        Err(e) => Err(e.into()),
                    }
                };
                match catch_up(repl, category, chunk, cancel, from_owner).await? {
                    CatchUp::Adopted => continue,
                    CatchUp::NotYet => break,
                    CatchUp::Gone => {
                        targets.remove(&key);
                        break;
                    }
                }
            }
            let have = held.map_or(0, |m| m.size);
            if let (Some(first), Some(m)) = (target.first_line, held)
                && m.first_line != Some(first)
            {
                // The owner numbers its lines; a copy takes its numbers.
                storage.learn_first_line(category, chunk, first).await?;
            }
            if held.is_none()
                && target.complete
                && !storage.tiered()
                && passed_by_all(repl, category, chunk, target)
            {
                // Every consumer is past it: it was (or would be) deleted
                // here. (With S3 on, it is copied, then evicted once uploaded.)
                targets.remove(&key);
                break;
            }
            if let Some(m) = held
                && m.complete
            {
                if m.local && m.size < target.size {
                    // Complete here but short of the owner's chunk: this
                    // copy missed the owner's restart (or the owner was
                    // forgotten and came back). Reopen it and copy the rest.
                    tracing::warn!(peer = %link.name, category, chunk = %chunk, held = m.size, owner_size = target.size, "a complete copy is short of its owner's chunk; reopening it to copy the rest");
                    repl.metrics
                        .copies_repaired
                        .get_or_create(&crate::metrics::PeerLabels {
                            peer: link.name.clone(),
                        })
                        .inc();
                    storage.replica_reopen(category, chunk).await?;
                    continue;
                }
                // Only a complete listing gives a final size; an open one
                // may be older than the bytes copied since.
                let longer = target.complete && m.size > target.size;
                if longer && !m.local && m.uploaded {
                    // Not a copy: a record of a longer object of the
                    // chunk, taken from the bucket. Its owner's previous
                    // process wrote it before the owner lost its disk; the
                    // owner replaces it with its chunk, and the record
                    // follows its upload (see `Storage::add_remote`).
                    tracing::warn!(peer = %link.name, category, chunk = %chunk, in_s3 = m.size, owner_size = target.size, "S3 holds more of a chunk than its owner (its process before it lost its disk wrote it); waiting for the owner to replace it");
                    targets.remove(&key);
                    break;
                }
                repl.set_disagreeing(
                    link,
                    category,
                    &chunk.to_string(),
                    longer.then_some((target.size, m.size)),
                );
                if !longer {
                    progress.insert((category.clone(), chunk.to_string()), have);
                }
                targets.remove(&key);
                break;
            }
            if have > target.size {
                if !target.complete {
                    // The listing is older than what was copied since (the
                    // read route serves up to the owner's current size):
                    // nothing to copy now.
                    progress.insert((category.clone(), chunk.to_string()), have);
                    break;
                }
                // The owner completed the chunk with fewer bytes than this
                // copy holds: it lost them, or reused the name after losing
                // its disk. Nothing is cut back or appended.
                repl.set_disagreeing(
                    link,
                    category,
                    &chunk.to_string(),
                    Some((target.size, have)),
                );
                targets.remove(&key);
                break;
            }
            repl.set_disagreeing(link, category, &chunk.to_string(), None);
            if have < target.size {
                let read = match client
                    .read_chunk(category, &chunk.to_string(), have, COPY_READ_BYTES)
                    .await
                {
                    Ok(r) => r,
                    Err(ClientError::Status { status, message })
                        if status == StatusCode::NOT_FOUND =>
                    {
                        tracing::warn!(peer = %link.name, category, chunk = %chunk, error = %message, "peer no longer has a chunk it listed; skipping it");
                        targets.remove(&key);
                        break;
                    }
                    Err(e) => return Err(e.into()),
                };
                let data = from_listed_process(read, listed_by)?;
                if data.is_empty() {
                    // The owner holds less than it listed (it lost unsynced
                    // bytes); its completion will say how much.
                    break;
                }
                let size = storage.replica_append(category, chunk, have, data).await?;
                progress.insert((category.clone(), chunk.to_string()), size);
                continue;
            }
            if target.complete {
                storage
                    .replica_complete(category, chunk, target.size)
                    .await?;
                progress.insert((category.clone(), chunk.to_string()), target.size);
                targets.remove(&key);
            } else if have > 0 || held.is_some() {
                progress.insert((category.clone(), chunk.to_string()), have);
            }
            break;
        }
    }
    Ok(())
}

/// How a catch-up ended.
pub(super) enum CatchUp {
    /// The copy is this node's now (or the chunk is no longer held
    /// elsewhere): go on as for any copy.
    Adopted,
    /// Not now (the source holds less than listed, or stopping).
    NotYet,
    /// The source no longer has the chunk.
    Gone,
}

/// Copies a chunk listed here as held elsewhere beside its listing, and
/// adopts the copy once it holds what is listed (readers never see the
/// chunk shrink). `read(offset)` gives the next bytes from `offset` (none
/// when the source holds no more; `None` when the chunk is gone). Errors
/// end the catch-up, and the next one starts the copy again.
pub(super) async fn catch_up<F, Fut>(
    repl: &Replication,
    category: &str,
    chunk: &ChunkName,
    cancel: &CancellationToken,
    read: F,
) -> Result<CatchUp, PullError>
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = Result<Option<Bytes>, PullError>>,
{
    let storage = &repl.storage;
    let (mut size, mut lines) = (0u64, 0u64);
    loop {
        let Some(listed) = storage
            .chunk_meta(category, chunk)
            .filter(|m| m.elsewhere())
        else {
            // Uploaded or reclaimed meanwhile: nothing to adopt.
            return Ok(CatchUp::Adopted);
        };
        if size >= listed.size {
            if size == 0 {
                // An empty chunk's copy is an empty file.
                storage
                    .catch_up_write(category, chunk, 0, Bytes::new())
                    .await?;
            }
            if storage.adopt_copy(category, chunk, size, lines).await? {
                tracing::debug!(category, chunk = %chunk, size, "a chunk held elsewhere is copied here now");
                return Ok(CatchUp::Adopted);
            }
        }
        if cancel.is_cancelled() || (listed.complete && size >= listed.size) {
            return Ok(CatchUp::NotYet);
        }
        let Some(data) = read(size).await? else {
            return Ok(CatchUp::Gone);
        };
        if data.is_empty() {
            return Ok(CatchUp::NotYet);
        }
        let len = data.len() as u64;
        lines += memchr::memchr_iter(b'\n', &data).count() as u64;
        storage.catch_up_write(category, chunk, size, data).await?;
        size += len;
    }
}

fn passed_by_all(repl: &Replication, category: &str, chunk: &ChunkName, t: Target) -> bool {
    let status = crate::storage::ChunkStatus {
        name: chunk.clone(),
        meta: crate::storage::ChunkMeta::local(t.size, t.complete, 0),
    };
    repl.consumers.passed_by_all(category, &status)
}

/// Bytes still to copy, per category.
fn lag_by_category(
    repl: &Replication,
    targets: &BTreeMap<(String, ChunkName), Target>,
) -> BTreeMap<String, u64> {
    let mut lag = BTreeMap::new();
    for ((category, chunk), t) in targets {
        let have = repl
            .storage
            .chunk_meta(category, chunk)
            .map_or(0, |m| m.size);
        let behind = t.size.saturating_sub(have);
        if behind > 0 {
            *lag.entry(category.clone()).or_insert(0) += behind;
        }
    }
    lag
}

/// `d` scaled by a random factor in [0.5, 1.5), so that peers do not retry in step.
pub(super) fn jitter(d: Duration) -> Duration {
    let r = std::collections::hash_map::RandomState::new().hash_one(std::time::Instant::now());
    d.mul_f64(0.5 + (r % 1000) as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After a full listing a replica may hold tens of thousands of an
    /// owner's chunks: only the newest of each category are reported.
    #[test]
    fn progress_reports_only_the_newest_chunks_of_each_category() {
        let mut progress = BTreeMap::new();
        for i in 0..40_000u32 {
            let chunk = ChunkName::new("eu2", i).to_string();
            progress.insert(("app".to_owned(), chunk), u64::from(i));
        }
        progress.insert(("web".to_owned(), ChunkName::new("eu2", 3).to_string()), 7);
        let sent = recent_progress(&progress);
        let app: Vec<u64> = sent
            .iter()
            .filter(|p| p.category == "app")
            .map(|p| p.size)
            .collect();
        assert_eq!(app.len(), 16);
        assert!(app.iter().all(|&s| s >= 40_000 - 16), "{app:?}");
        assert!(sent.iter().any(|p| p.category == "web" && p.size == 7));
        assert!(serde_json::to_vec(&sent).unwrap().len() < 4096);
    }
}
