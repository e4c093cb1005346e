//! A node with a new data directory (a first start, or a node that lost
//! its disk) learns from its peers which of its chunks they hold before it
//! takes writes, and restores those chunks.
//!
//! Peers copy every chunk an owner writes, including its open chunk. An
//! owner that lost its disk and started numbering its chunks from the S3
//! listing alone would write new lines into a chunk name its peers already
//! hold with other bytes: acknowledged lines vanish, answers point at other
//! bytes, consumers stick on offsets that are no longer line starts. So:
//!
//! 1. Writes are held (503 with the reason) while the node asks every peer
//!    that is not forgotten `GET /v1/internal/copies/{node}`, retrying with
//!    backoff until each has answered; again at each start while the
//!    restore (3.) is unfinished. `--first-start` lets writes through
//!    at once (the cluster's first start, with a peer that is not coming).
//! 2. Per category, every index up to the highest one a peer holds, or one
//!    of its consumer positions names (the copies may be deleted since,
//!    every consumer having acked them), is reserved durably
//!    (`next_own_index`), and so is every line number up to the highest
//!    end the peers recorded (`next_own_line`); then writes go through.
//! 3. Each chunk a peer holds is restored from the peer with the largest
//!    copy, oldest first, and becomes this node's complete chunk; peers
//!    then complete their copies from it. A peer that answers without the
//!    copy it listed (it lost its disk too) makes the restore ask the peers
//!    again: the largest copy left is restored, or none (the lines on the
//!    two lost disks only are lost). With S3 on, a chunk is recorded as
//!    in S3 instead when a peer says it is uploaded, or when S3 holds an
//!    object of that name at least as long as the largest copy (this node
//!    uploaded it before it lost its disk, and the copies fell behind), at
//!    the object's size when that is longer than the peers' record (this
//!    node replaced the object they uploaded while it was forgotten): S3
//!    is asked before writes go through. `<data>/.restoring.json` marks the
//!    restore unfinished, so a crash resumes it at the next start.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chunkbus_client::names::validate_category;
use chunkbus_client::{ChunkName, Client};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use reqwest::StatusCode;
use tokio_util::sync::CancellationToken;

use super::protocol::CopiesResponse;
use super::{PeerLink, Replication};

/// The storage's write gate held while the peers have not all answered.
const WRITE_GATE: &str = "peers";
/// First retry delay of a peer that did not answer.
const BACKOFF_INITIAL: Duration = Duration::from_millis(200);
/// Longest retry delay.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a restore waits for S3 to say whether it holds this node's
/// chunks (as long as a new data directory waits for the bucket listing).
const S3_PATIENCE: Duration = crate::upload::FRESH_LISTING_PATIENCE;
/// Lookups in S3 in flight.
const S3_LOOKUPS: usize = 16;
/// Bytes asked for in one read while restoring.
const RESTORE_READ_BYTES: u64 = 16 << 20;

/// The best copy of one of this node's chunks among the peers.
#[derive(Debug, Clone)]
struct Best {
    size: u64,
    uploaded: bool,
    /// The copy's numbers, when the peer knows them.
    first_line: Option<u64>,
    lines: Option<u64>,
    /// The peer that holds it.
    peer: Arc<PeerLink>,
}

impl Best {
    /// The copy a peer's answer lists.
    fn of(c: &super::protocol::ChangedChunk, peer: Arc<PeerLink>) -> Self {
        Self {
            size: c.size,
            uploaded: c.uploaded,
            first_line: c.first_line,
            lines: c.lines,
            peer,
        }
    }

    fn line_record(&self) -> Option<crate::storage::numbering::LineRecord> {
        crate::storage::numbering::LineRecord::known(self.size, self.first_line, self.lines)
    }
}

/// Holds writes when the data directory is new, or a restore from the
/// peers is unfinished (called before the node serves anything, so no
/// write slips through before the gate). An unfinished restore holds them
/// too: the process that started it reserved the chunk names its peers
/// named (durably) but perhaps not the line numbers, and restored only
/// some chunks; writes taken before the peers are asked again would
/// number new lines after the last chunk restored, giving numbers that
/// chunks not restored yet hold (found by the chaos soak).
pub(super) fn hold_writes(repl: &Replication) {
    let storage = &repl.storage;
    if !(storage.fresh() || storage.restore_pending()) || repl.cfg.first_start {
        return;
    }
    if repl.members_read.borrow().is_none() {
        // Bucket membership: who the peers are is not known yet.
        storage.close_writes(
            WRITE_GATE,
            format!(
                "{}: it takes writes once it has read the nodes' records in the S3 bucket and every peer found there has said which of this node's chunks it holds, so that no chunk name or line number is used twice",
                why_held(storage)
            ),
        );
        return;
    }
    hold_for_peers(repl, &repl.links());
}

/// Why writes are held: a new data directory, or an unfinished restore.
fn why_held(storage: &crate::storage::Storage) -> &'static str {
    if storage.fresh() {
        "this node's data directory is new"
    } else {
        "this node's restore of its chunks from its peers is unfinished (the process that started it stopped)"
    }
}

/// Holds writes until `links` have answered (unless they need not be
/// waited for).
fn hold_for_peers(repl: &Replication, links: &[Arc<PeerLink>]) {
    if !links.is_empty() && !repl.skip_bootstrap_wait() {
        let names: Vec<&str> = links.iter().map(|l| l.name.as_str()).collect();
        repl.storage
            .close_writes(WRITE_GATE, gate_reason(&repl.storage, &names));
    }
}

/// Runs the bootstrap when the data directory is new or a restore is
/// unfinished; returns at once otherwise.
pub(super) async fn run(repl: Arc<Replication>, cancel: CancellationToken) {
    let storage = &repl.storage;
    let fresh = storage.fresh();
    if !(fresh || storage.restore_pending()) {
        return;
    }
    // With bucket membership the peers are known once the nodes' records
    // were read (at once otherwise).
    let mut known = repl.members_read.subscribe();
    tokio::select! {
        r = known.wait_for(Option::is_some) => if r.is_err() { return },
        _ = cancel.cancelled() => return,
    }
    let links = repl.links();
    if links.is_empty() || repl.name_is_new() {
        storage.open_writes(WRITE_GATE);
        repl.set_restoring(None);
        return;
    }
    // The gate's reason names the peers now known.
    hold_for_peers(&repl, &links);
    if fresh && let Err(e) = storage.set_restore_pending(true).await {
        tracing::error!(error = %e, "cannot record that this node restores its chunks from its peers");
    }
    let Some((mut held, mut highest, mut line_ends)) = ask_every_peer(&repl, &links, &cancel).await
    else {
        return;
    };
    if storage.tiered() && !look_up_in_s3(&repl, &mut held, &cancel).await {
        return;
    }
    // Reserve before writes go through: retried until it is durable.
    for (category, chunk) in held.keys() {
        let h = highest.entry(category.clone()).or_insert(0);
        *h = (*h).max(chunk.index);
    }
    // Lines are numbered on after the highest number the peers know.
    for ((category, _), b) in &held {
        if let Some(r) = b.line_record() {
            let e = line_ends.entry(category.clone()).or_insert(0);
            *e = (*e).max(r.end());
        }
    }
    for (category, end) in line_ends {
        let mut backoff = BACKOFF_INITIAL;
        while let Err(e) = storage.reserve_own_line(&category, end).await {
            tracing::error!(category = %category, error = %e, "cannot number this node's next lines after those its peers know; writes stay held");
            if sleep_or_cancel(&mut backoff, &cancel).await {
                return;
            }
        }
    }
    for (category, index) in highest {
        let mut backoff = BACKOFF_INITIAL;
        while let Err(e) = storage.reserve_own_index(&category, index + 1).await {
            tracing::error!(category = %category, error = %e, "cannot reserve the chunk names this node used before; writes stay held");
            if sleep_or_cancel(&mut backoff, &cancel).await {
                return;
            }
        }
    }
    storage.open_writes(WRITE_GATE);
    let total = held.len();
    repl.set_restoring(Some(total as u64));
    if total > 0 {
        tracing::info!(
            chunks = total,
            "restoring this node's chunks from its peers' copies"
        );
    }
    for (n, ((category, chunk), best)) in held.into_iter().enumerate() {
        if !restore(&repl, &category, &chunk, best, &cancel).await {
            return;
        }
        repl.set_restoring(Some((total - n - 1) as u64));
        if (n + 1) % 100 == 0 {
            tracing::info!(done = n + 1, of = total, "restoring chunks from peers");
        }
    }
    let ended = storage.set_restore_pending(false).await;
    repl.set_restoring(None);
    match ended {
        Ok(()) if total > 0 => {
            tracing::info!(
                chunks = total,
                "this node's chunks are restored from its peers"
            )
        }
        Ok(()) => {}
        Err(e) => tracing::error!(error = %e, "cannot record the end of the restore"),
    }
}

fn gate_reason(storage: &crate::storage::Storage, waiting: &[&str]) -> String {
    format!(
        "{}: it takes writes once every peer has said which of this node's chunks it holds, so that no chunk name or line number is used twice (waiting for {}; --first-start skips this on a cluster's first start)",
        why_held(storage),
        waiting.join(", ")
    )
}

/// The best copy of each of this node's chunks the peers hold, and per
/// category the highest index of this node their consumer positions name.
type Answers = (
    BTreeMap<(String, ChunkName), Best>,
    BTreeMap<String, u32>,
    BTreeMap<String, u64>,
);

/// Asks every peer that is not forgotten which of this node's chunks it
/// holds, until each answered (a peer forgotten meanwhile is not waited
/// for). `None` when cancelled.
async fn ask_every_peer(
    repl: &Arc<Replication>,
    links: &[Arc<PeerLink>],
    cancel: &CancellationToken,
) -> Option<Answers> {
    let mut waiting: BTreeSet<String> = links.iter().map(|l| l.name.clone()).collect();
    let mut asks: FuturesUnordered<_> = links
        .iter()
        .map(|l| ask_until_answered(repl, l.clone(), cancel))
        .collect();
    let mut best: BTreeMap<(String, ChunkName), Best> = BTreeMap::new();
    let mut named: BTreeMap<String, u32> = BTreeMap::new();
    let mut line_ends: BTreeMap<String, u64> = BTreeMap::new();
    while let Some((link, answer)) = asks.next().await {
        if cancel.is_cancelled() {
            return None;
        }
        waiting.remove(&link.name);
        let Some(answer) = answer else { continue };
        for (category, end) in answer.line_ends {
            let e = line_ends.entry(category).or_insert(0);
            *e = (*e).max(end);
        }
        for (category, index) in answer.positions {
            if validate_category(&category).is_ok() {
                let h = named.entry(category).or_insert(0);
                *h = (*h).max(index);
            }
        }
        for c in answer.chunks {
            let Ok(name) = ChunkName::parse(&c.chunk) else {
                continue;
            };
            if name.owner != repl.node() || validate_category(&c.category).is_err() {
                continue;
            }
            let this = Best::of(&c, link.clone());
            let entry = best.entry((c.category, name)).or_insert(this.clone());
            if c.size > entry.size || (c.size == entry.size && c.uploaded) {
                *entry = this;
            }
        }
        if !waiting.is_empty() && !repl.skip_bootstrap_wait() {
            let names: Vec<&str> = waiting.iter().map(String::as_str).collect();
            repl.storage
                .close_writes(WRITE_GATE, gate_reason(&repl.storage, &names));
        }
    }
    Some((best, named, line_ends))
}

/// With S3 on, asks the store what it holds under the names of this node's
/// chunks that the peers hold: one listing per category, then a lookup of
/// each object whose size no peer records as uploaded (its line numbers).
/// - A chunk whose best copy is not recorded as uploaded: this node may
///   have uploaded it, longer than any copy (a copy falls behind while its
///   holder is cut off or paused), before it lost its disk.
/// - A chunk the peers record as uploaded, of an object that is longer
///   now: this node replaced the object its peers uploaded for it while it
///   was forgotten (their copies frozen short), and lost its disk before
///   they heard of it. Their record is stale; trusted, it would number the
///   lines of the next chunk restored after its end, giving numbers that
///   the object's last lines hold (found by the chaos soak).
///
/// Either is restored from S3 (recorded at the object's size, with the
/// object's line numbers; those are reserved before writes go through, so
/// that new lines are numbered after them). Asked again while the store
/// does not answer, up to [`S3_PATIENCE`]; past it, or when the store
/// refuses this node, the copies are restored as they are, and the peers'
/// records kept (an object found later under the name of a shorter
/// restored chunk replaces it while no later line took the numbers of its
/// further lines, and is replaced by it otherwise, its lines stored again:
/// see `Storage::add_remote`). False when cancelled.
async fn look_up_in_s3(
    repl: &Arc<Replication>,
    held: &mut BTreeMap<(String, ChunkName), Best>,
    cancel: &CancellationToken,
) -> bool {
    let storage = &repl.storage;
    let deadline = tokio::time::Instant::now() + S3_PATIENCE;
    let logged = std::sync::atomic::AtomicBool::new(false);
    let categories: BTreeSet<String> = held.keys().map(|(c, _)| c.clone()).collect();
    let mut listings = futures_util::stream::iter(categories)
        .map(|category| async {
            let ask = || storage.remote_sizes(&category, repl.node());
            let sizes = ask_s3(ask, deadline, &logged, cancel).await;
            (category, sizes)
        })
        .buffer_unordered(S3_LOOKUPS);
    let mut listed = BTreeMap::new();
    while let Some((category, sizes)) = listings.next().await {
        if cancel.is_cancelled() {
            return false;
        }
        listed.insert(category, sizes);
    }
    drop(listings);
    let unknown: Vec<(String, ChunkName)> = held
        .iter()
        .filter(|((category, chunk), b)| match listed.get(category) {
            Some(Some(sizes)) => sizes
                .get(chunk)
                .is_some_and(|&size| !b.uploaded || size > b.size),
            // Not listed: each chunk not recorded as uploaded is looked up.
            _ => !b.uploaded,
        })
        .map(|(k, _)| k.clone())
        .collect();
    let mut lookups = futures_util::stream::iter(unknown)
        .map(|key| async {
            let ask = || storage.remote_lookup(&key.0, &key.1);
            let found = ask_s3(ask, deadline, &logged, cancel).await;
            (key, found)
        })
        .buffer_unordered(S3_LOOKUPS);
    let unlisted = listed.values().filter(|s| s.is_none()).count();
    let mut unanswered = 0;
    while let Some((key, found)) = lookups.next().await {
        if cancel.is_cancelled() {
            return false;
        }
        let Some(found) = found else {
            unanswered += 1;
            continue;
        };
        let (Some((size, numbers)), Some(best)) = (found, held.get_mut(&key)) else {
            continue;
        };
        if size < best.size {
            tracing::warn!(category = %key.0, chunk = %key.1, in_s3 = size, copy = best.size, "S3 holds fewer bytes under this chunk's name than a peer's copy; restoring the copy");
            continue;
        }
        if best.uploaded && size > best.size {
            tracing::warn!(category = %key.0, chunk = %key.1, in_s3 = size, recorded = best.size, "S3 holds more of this chunk than the peers record as uploaded (this node replaced the object they uploaded for it while it was forgotten, and lost its disk before they heard of it); restored as S3 holds it");
        }
        let numbers = numbers.filter(|r| r.size == size);
        best.size = size;
        best.uploaded = true;
        best.lines = numbers.map(|r| r.lines);
        best.first_line = numbers.map(|r| r.first).or(best.first_line);
    }
    if (unlisted > 0 || unanswered > 0) && !cancel.is_cancelled() {
        tracing::warn!(
            categories = unlisted,
            chunks = unanswered,
            "S3 did not say what it holds of this node's chunks in these categories, or under these chunks' names (it refuses this node, or did not answer in time); they are restored from the peers' copies and records, and settled with what S3 holds under their names when it answers"
        );
    }
    !cancel.is_cancelled()
}

/// Asks S3 (`ask`) again while it fails; `None` when it did not say (it
/// refuses this node, or did not answer by `deadline`: a store that hangs
/// is not waited for past it), or when cancelled. The first failure is
/// logged once for all (`logged`).
async fn ask_s3<T, F, Fut>(
    ask: F,
    deadline: tokio::time::Instant,
    logged: &std::sync::atomic::AtomicBool,
    cancel: &CancellationToken,
) -> Option<T>
where
    F: Fn() -> Fut,
    Fut: Future<Output = std::io::Result<T>>,
{
    let mut backoff = BACKOFF_INITIAL;
    loop {
        let e = match tokio::time::timeout_at(deadline, ask()).await {
            Ok(Ok(found)) => return Some(found),
            Ok(Err(e))
                if !matches!(
                    e.kind(),
                    std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::Unsupported
                ) =>
            {
                e
            }
            _ => return None,
        };
        if !logged.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(error = %e, "cannot ask S3 what it holds of this node's chunks, uploaded before it lost its disk; retrying");
        }
        if sleep_or_cancel(&mut backoff, cancel).await {
            return None;
        }
    }
}

/// Asks the peer of `link` until it answers, it is forgotten (`None`) or
/// `cancel`.
async fn ask_until_answered(
    repl: &Arc<Replication>,
    link: Arc<PeerLink>,
    cancel: &CancellationToken,
) -> (Arc<PeerLink>, Option<CopiesResponse>) {
    let mut backoff = BACKOFF_INITIAL;
    let mut logged = false;
    loop {
        if link.lost() {
            tracing::warn!(peer = %link.name, "not waiting for a forgotten peer to say which of this node's chunks it holds");
            return (link, None);
        }
        // Asked again each time: the address may follow its record.
        match ask(repl, &link).await {
            Ok(answer) => return (link, Some(answer)),
            Err(e) if !logged => {
                tracing::warn!(peer = %link.name, error = %e, "cannot ask a peer which of this node's chunks it holds; retrying");
                logged = true;
            }
            Err(_) => {}
        }
        if sleep_or_cancel(&mut backoff, cancel).await {
            return (link, None);
        }
    }
}

/// Asks the peer of `link` which of this node's chunks it holds.
async fn ask(repl: &Replication, link: &PeerLink) -> Result<CopiesResponse, String> {
    let url = format!(
        "{}/v1/internal/copies/{}",
        repl.peer_base(link),
        repl.node()
    );
    let resp = repl
        .http
        .get(&url)
        .timeout(repl.cfg.peer_timeout)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if resp.status() != StatusCode::OK {
        return Err(format!("answered {}", resp.status()));
    }
    let answer: CopiesResponse = resp.json().await.map_err(|e| e.to_string())?;
    if answer.node != link.name {
        return Err(format!(
            "the node at {} is {}, not {} (as --peers or its record in the bucket says)",
            link.addr(),
            answer.node,
            link.name
        ));
    }
    Ok(answer)
}

/// Restores one chunk (or records it as in S3); false when cancelled.
async fn restore(
    repl: &Replication,
    category: &str,
    chunk: &ChunkName,
    mut best: Best,
    cancel: &CancellationToken,
) -> bool {
    let storage = &repl.storage;
    let mut backoff = BACKOFF_INITIAL;
    loop {
        if cancel.is_cancelled() {
            return false;
        }
        if storage.chunk_meta(category, chunk).is_some() {
            // Listed from S3 meanwhile, or restored before a restart; the
            // peer's copy may know its numbers.
            if let Some(numbers) = best.line_record()
                && let Err(e) = storage.learn_numbers(category, chunk, numbers).await
            {
                tracing::warn!(category, chunk = %chunk, error = %e, "cannot record the line numbers of a restored chunk");
            }
            return true;
        }
        let result = if best.uploaded && storage.tiered() {
            storage
                .add_remote(category, chunk, best.size, 0, best.line_record())
                .await
                .map(|_| ())
                .map_err(|e| CopyFailed::here(e.to_string()))
        } else {
            copy_from(repl, category, chunk, &best).await
        };
        let peer_answered = match result {
            Ok(()) => return true,
            Err(e) => {
                tracing::warn!(category, chunk = %chunk, peer = %best.peer.name, error = %e.error, "cannot restore a chunk from its peer copy; retrying");
                e.peer_answered
            }
        };
        if sleep_or_cancel(&mut backoff, cancel).await {
            return false;
        }
        if !peer_answered {
            continue;
        }
        // The peer answered, but not with its copy: it may have lost it
        // since it was asked (its disk too). Without asking the peers
        // again, the restore would retry it until this process stops.
        match ask_again(repl, category, chunk, &best).await {
            Again::Keep => {}
            Again::Copy(other) => {
                tracing::warn!(category, chunk = %chunk, peer = %best.peer.name, bytes = best.size, other = %other.peer.name, other_bytes = other.size, "the peer with the largest copy of this chunk holds it no longer, or less of it (it lost its disk too); restoring the largest copy left (lines past it were held nowhere else)");
                best = other;
                backoff = BACKOFF_INITIAL;
            }
            Again::Gone => {
                storage.restore_abandon(category, chunk).await;
                tracing::warn!(category, chunk = %chunk, peer = %best.peer.name, bytes = best.size, "no peer holds a copy of this chunk any more (the one that did lost its disk too): its lines held nowhere else are lost; an object S3 holds under its name is recorded when listed");
                return true;
            }
        }
    }
}

/// What the peers hold of a chunk whose restore from the best copy failed.
enum Again {
    /// Go on with the same copy: its peer did not answer (it may come back
    /// with it), it still holds as much, or a peer that may hold more did
    /// not answer.
    Keep,
    /// The peer of the best copy answered without it (or with less): the
    /// largest copy the others hold now.
    Copy(Best),
    /// Every peer answered and none holds it.
    Gone,
}

/// Asks every peer that is not forgotten, once, which copy of `chunk` it
/// holds now (see [`Again`]).
async fn ask_again(repl: &Replication, category: &str, chunk: &ChunkName, best: &Best) -> Again {
    let links: Vec<Arc<PeerLink>> = repl.links().into_iter().filter(|l| !l.lost()).collect();
    let answers = futures_util::future::join_all(
        links
            .iter()
            .map(|link| async move { (link.clone(), ask(repl, link).await.ok()) }),
    )
    .await;
    let name = chunk.to_string();
    let mut found: Option<Best> = None;
    let mut unanswered = false;
    for (link, answer) in answers {
        let Some(answer) = answer else {
            if Arc::ptr_eq(&link, &best.peer) {
                return Again::Keep;
            }
            unanswered = true;
            continue;
        };
        let copy = answer
            .chunks
            .into_iter()
            .find(|c| c.category == category && c.chunk == name);
        let Some(c) = copy else { continue };
        if Arc::ptr_eq(&link, &best.peer) && c.size >= best.size {
            return Again::Keep;
        }
        if found
            .as_ref()
            .is_none_or(|f| c.size > f.size || (c.size == f.size && c.uploaded))
        {
            found = Some(Best::of(&c, link));
        }
    }
    match found {
        // As much elsewhere (or in S3 by a peer's record).
        Some(f) if f.size >= best.size => Again::Copy(f),
        // A peer that did not answer may hold more.
        _ if unanswered => Again::Keep,
        Some(f) => Again::Copy(f),
        None => Again::Gone,
    }
}

/// Why a restore of a chunk failed.
struct CopyFailed {
    error: String,
    /// The peer answered, but not with the copy it listed (an error status,
    /// or fewer bytes).
    peer_answered: bool,
}

impl CopyFailed {
    /// A failure on this node (its disk).
    fn here(error: String) -> Self {
        Self {
            error,
            peer_answered: false,
        }
    }
}

/// Copies `chunk` whole from the peer that holds the most of it.
async fn copy_from(
    repl: &Replication,
    category: &str,
    chunk: &ChunkName,
    best: &Best,
) -> Result<(), CopyFailed> {
    let link = &best.peer;
    let client = Client::with_http(&repl.peer_base(link), repl.http.clone())
        .map_err(|e| CopyFailed::here(e.to_string()))?;
    let name = chunk.to_string();
    let mut offset = 0;
    if best.size == 0 {
        repl.storage
            .restore_append(category, chunk, 0, bytes::Bytes::new())
            .await
            .map_err(|e| CopyFailed::here(e.to_string()))?;
    }
    while offset < best.size {
        let read = client
            .read_chunk(category, &name, offset, RESTORE_READ_BYTES)
            .await
            .map_err(|e| CopyFailed {
                peer_answered: matches!(e, chunkbus_client::ClientError::Status { .. }),
                error: e.to_string(),
            })?;
        if read.data.is_empty() || read.next_offset > best.size {
            return Err(CopyFailed {
                error: format!(
                    "the peer's copy ended at {offset} of the {} bytes it listed",
                    best.size
                ),
                peer_answered: true,
            });
        }
        repl.storage
            .restore_append(category, chunk, offset, read.data)
            .await
            .map_err(|e| CopyFailed::here(e.to_string()))?;
        offset = read.next_offset;
    }
    repl.storage
        .restore_finish(category, chunk, best.size, best.first_line)
        .await
        .map_err(|e| CopyFailed::here(e.to_string()))
}

/// Sleeps a jittered `backoff` (then doubles it, capped); true when
/// cancelled meanwhile.
async fn sleep_or_cancel(backoff: &mut Duration, cancel: &CancellationToken) -> bool {
    let delay = super::puller::jitter(*backoff);
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    tokio::select! {
        _ = cancel.cancelled() => true,
        _ = tokio::time::sleep(delay) => false,
    }
}
