//! The uploader: finds complete chunks this node must upload, uploads a few
//! at a time, records each upload with the storage, backs off when S3 fails.
//!
//! It wakes when a chunk completes (no polling), when an upload finishes,
//! and when a backoff or a lost owner's re-check is due. Chunks are taken
//! oldest first. A chunk up to one part is sent with one PUT; a larger one
//! with a multipart upload whose progress (upload id and the parts done) is
//! kept in `<data>/.multipart/<category>/<chunk>.json`, so that a restart
//! resumes it instead of starting over.
//!
//! A failure of the store (network, credentials, 5xx) pauses every upload
//! with a capped backoff. A failure of one chunk (its local copy cannot
//! be read, its key holds another object) backs off that chunk only, and
//! shows in the status as a failing chunk.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chunkbus_client::ChunkName;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::store::{Condition, S3ErrorKind, UploadedPart};
use super::{ObjectStore, Responsibility, S3Config, S3Error, Tiering};
use crate::storage::{StorageError, TierOutcome};

/// First retry delay after a failure.
const BACKOFF_INITIAL: Duration = Duration::from_millis(200);
/// Longest retry delay.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How soon a lost owner's chunk, left to another node, is looked up
/// again: first soon (that node uploads it as soon as this one would), then
/// less and less often.
const WATCH_FIRST: Duration = Duration::from_secs(1);
/// Longest time between two looks.
const WATCH_INTERVAL: Duration = Duration::from_secs(30);
/// Longest time between two scans: who uploads a lost owner's chunks
/// changes with which peers answer, which is no storage event.
const RESCAN_INTERVAL: Duration = Duration::from_secs(10);

/// Capped exponential backoff with jitter.
#[derive(Debug)]
pub(super) struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            next: BACKOFF_INITIAL,
        }
    }
}

impl Backoff {
    /// The delay to wait now (jittered in [0.5, 1.5)); doubles the next one.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        let r = std::collections::hash_map::RandomState::new().hash_one(std::time::Instant::now());
        d.mul_f64(0.5 + (r % 1000) as f64 / 1000.0)
    }

    fn reset(&mut self) {
        self.next = BACKOFF_INITIAL;
    }
}

type Key = (String, ChunkName);

/// A chunk to upload (or, for `Watch`, to look for).
#[derive(Debug, Clone)]
struct Job {
    category: String,
    chunk: ChunkName,
    size: u64,
    created_ms: u64,
    role: Responsibility,
    /// The chunk's line numbers, stored as object metadata.
    numbers: Option<crate::storage::numbering::LineRecord>,
}

/// How a job ended.
#[derive(Debug)]
enum Done {
    /// The object is in S3 now.
    Uploaded { bytes: u64 },
    /// Another node is to upload it and it is not there yet.
    NotYet,
    /// A lost owner's chunk whose copy here grew to a peer's longer copy:
    /// uploaded at its new size next.
    Grew,
}

/// Runs until `cancel`. In-flight uploads are dropped at shutdown; a single
/// PUT is done again after the restart, a multipart upload resumes.
pub(super) async fn run(tier: Arc<Tiering>, cancel: CancellationToken) {
    let Some((cfg, store)) = tier.s3.clone() else {
        return;
    };
    let mut completed = tier.storage.subscribe_completed();
    let mut running: JoinSet<Result<Done, S3Error>> = JoinSet::new();
    let mut in_flight: HashMap<tokio::task::Id, Key> = HashMap::new();
    // When each watched chunk is looked up next, and the delay before.
    let mut watch_after: BTreeMap<Key, (Instant, Duration)> = BTreeMap::new();
    let mut backoff = Backoff::default();
    let mut paused_until: Option<Instant> = None;
    let mut failing: BTreeMap<Key, Failing> = BTreeMap::new();
    loop {
        completed.borrow_and_update();
        let jobs = pending(&tier);
        let (n, bytes) = jobs
            .iter()
            .filter(|j| j.role != Responsibility::Watch)
            .fold((0, 0), |(n, b), j| (n + 1, b + j.size));
        tier.set_backlog(n, bytes);
        let now = Instant::now();
        let wanted = |k: &Key| jobs.iter().any(|j| (&j.category, &j.chunk) == (&k.0, &k.1));
        watch_after.retain(|k, _| wanted(k));
        let before = failing.len();
        failing.retain(|k, _| wanted(k) || in_flight.values().any(|f| f == k));
        if failing.len() != before {
            tier.set_failing(failing_status(&failing));
        }
        if paused_until.is_none_or(|t| now >= t) {
            paused_until = None;
            for job in jobs {
                if running.len() >= cfg.concurrency {
                    break;
                }
                let key = (job.category.clone(), job.chunk.clone());
                let busy = in_flight.values().any(|k| *k == key);
                if busy
                    || watch_after.get(&key).is_some_and(|(t, _)| now < *t)
                    || failing.get(&key).is_some_and(|f| now < f.retry_at)
                {
                    continue;
                }
                let (tier, cfg, store) = (tier.clone(), cfg.clone(), store.clone());
                let task = running.spawn(async move { upload(&tier, &cfg, &store, &job).await });
                in_flight.insert(task.id(), key);
            }
        }
        let rescan = Instant::now() + RESCAN_INTERVAL;
        let next_timer = paused_until
            .or_else(|| {
                let retries = failing.values().map(|f| f.retry_at);
                watch_after.values().map(|(t, _)| *t).chain(retries).min()
            })
            .map_or(rescan, |t| t.min(rescan));
        tokio::select! {
            _ = cancel.cancelled() => return,
            Some(joined) = running.join_next_with_id(), if !running.is_empty() => {
                let (id, result) = match joined {
                    Ok((id, r)) => (id, r),
                    Err(e) => (e.id(), Err(S3Error {
                        message: format!("upload task failed: {e}"),
                        kind: S3ErrorKind::Other,
                    })),
                };
                let Some(key) = in_flight.remove(&id) else { continue };
                match result {
                    Ok(Done::Uploaded { bytes }) => {
                        backoff.reset();
                        if failing.remove(&key).is_some() {
                            tier.set_failing(failing_status(&failing));
                        }
                        record(&tier, &key, bytes).await;
                    }
                    Ok(Done::NotYet) => {
                        let delay = watch_after
                            .get(&key)
                            .map_or(WATCH_FIRST, |(_, d)| (*d * 2).min(WATCH_INTERVAL));
                        watch_after.insert(key, (Instant::now() + delay, delay));
                    }
                    Ok(Done::Grew) => {}
                    Err(e) if e.kind == S3ErrorKind::Chunk => {
                        tier.record_error(&e);
                        let f = failing.entry(key.clone()).or_insert_with(Failing::new);
                        let delay = f.failed(&e);
                        tracing::warn!(category = %key.0, chunk = %key.1, error = %e, attempts = f.attempts, retry_in = ?delay, "upload of this chunk failed; the others go on");
                        tier.set_failing(failing_status(&failing));
                    }
                    Err(e) => {
                        tier.record_error(&e);
                        if paused_until.is_none() {
                            let delay = backoff.next_delay();
                            tracing::warn!(category = %key.0, chunk = %key.1, error = %e, retry_in = ?delay, "upload failed; retrying");
                            paused_until = Some(Instant::now() + delay);
                        }
                    }
                }
            }
            _ = completed.changed() => {}
            _ = tokio::time::sleep_until(next_timer) => {}
        }
    }
}

/// A chunk whose upload failed for a reason of its own.
#[derive(Debug)]
struct Failing {
    retry_at: Instant,
    backoff: Backoff,
    error: String,
    attempts: u32,
    since: std::time::SystemTime,
}

impl Failing {
    fn new() -> Self {
        Self {
            retry_at: Instant::now(),
            backoff: Backoff::default(),
            error: String::new(),
            attempts: 0,
            since: std::time::SystemTime::now(),
        }
    }

    /// Records one more failure; returns the delay before the next attempt.
    fn failed(&mut self, e: &S3Error) -> Duration {
        let delay = self.backoff.next_delay();
        self.retry_at = Instant::now() + delay;
        self.error = e.message.clone();
        self.attempts += 1;
        delay
    }
}

fn failing_status(failing: &BTreeMap<Key, Failing>) -> Vec<chunkbus_client::FailingChunk> {
    failing
        .iter()
        .map(|((category, chunk), f)| chunkbus_client::FailingChunk {
            category: category.clone(),
            chunk: chunk.to_string(),
            error: f.error.clone(),
            attempts: f.attempts,
            since: humantime::format_rfc3339_seconds(f.since).to_string(),
        })
        .collect()
}

/// Records an upload with the storage (durably) and in the status.
async fn record(tier: &Tiering, (category, chunk): &Key, bytes: u64) {
    match tier.storage.mark_uploaded(category, chunk).await {
        Ok(TierOutcome::Done) => {
            tier.record_upload(bytes);
            tracing::info!(category, chunk = %chunk, bytes, "chunk uploaded");
        }
        Ok(_) => {}
        Err(e) => {
            tracing::error!(category, chunk = %chunk, error = %e, "chunk uploaded but cannot record it; it will be uploaded again")
        }
    }
}

/// Complete, local, not yet uploaded chunks this node is to upload (or to
/// watch for), oldest first.
fn pending(tier: &Tiering) -> Vec<Job> {
    let mut jobs = Vec::new();
    for category in tier.storage.categories() {
        for c in tier.storage.chunks(&category).unwrap_or_default() {
            let m = c.meta;
            if !m.complete || m.uploaded || !m.local {
                continue;
            }
            let role = tier.uploads_for(&category, &c.name.owner);
            if role == Responsibility::None {
                continue;
            }
            jobs.push(Job {
                category: category.clone(),
                chunk: c.name,
                size: m.size,
                created_ms: m.created_ms,
                role,
                numbers: m.line_record(),
            });
        }
    }
    jobs.sort_by(|a, b| (a.created_ms, &a.chunk).cmp(&(b.created_ms, &b.chunk)));
    jobs
}

async fn upload(
    tier: &Tiering,
    cfg: &S3Config,
    store: &ObjectStore,
    job: &Job,
) -> Result<Done, S3Error> {
    let key = super::object_key(&cfg.prefix, &job.category, &job.chunk);
    if job.role != Responsibility::Owner {
        // The owner may have uploaded it before it was lost, or another
        // replica did: a copy as long is uploaded, a shorter one gives way
        // to it, a longer one is reported (`settle_existing`).
        match store.size(&key).await? {
            Some(size) if size == job.size => return Ok(Done::Uploaded { bytes: 0 }),
            Some(_) => return settle_existing(tier, cfg, store, &key, job).await,
            None if job.role == Responsibility::Watch => return Ok(Done::NotYet),
            None => {}
        }
        // The copies of a lost owner's chunk may differ in length: this
        // one is brought up to the longest first, then uploaded at its new
        // size (the next round, once it is complete again).
        let added = tier
            .cluster
            .catch_up_lost_copy(&job.category, &job.chunk)
            .await
            .map_err(|e| S3Error {
                message: format!(
                    "cannot ask the peers whether they hold more of {key} before uploading it: {e}"
                ),
                // This chunk's alone: the others go on.
                kind: S3ErrorKind::Chunk,
            })?;
        if added > 0 {
            return Ok(Done::Grew);
        }
    }
    match put(tier, cfg, store, &key, job, Condition::Absent).await {
        Err(e) if e.kind == S3ErrorKind::Exists => {
            settle_existing(tier, cfg, store, &key, job).await
        }
        other => other.map(|()| Done::Uploaded { bytes: job.size }),
    }
}

/// Writes the chunk of `job` as `key` if `condition` holds: never over an
/// object, unless it replaces the one it names.
async fn put(
    tier: &Tiering,
    cfg: &S3Config,
    store: &ObjectStore,
    key: &str,
    job: &Job,
    condition: Condition<'_>,
) -> Result<(), S3Error> {
    let chunk = LocalCopy::open(tier, job).await?;
    if job.size <= cfg.part_bytes {
        let data = chunk.read(0, job.size).await?;
        return store.put_if(key, data, job.numbers, condition).await;
    }
    let state_path = tier
        .storage
        .upload_progress_file(&job.category, &job.chunk)
        .map_err(|e| local_error("no place for the upload's progress".into(), e))?;
    let to = Destination {
        key,
        state_path: &state_path,
        condition,
    };
    multipart(store, &to, &chunk, job, cfg.part_bytes).await
}

/// The chunk's key holds an object already: this node uploaded it before a
/// crash kept it from recording that, or before it lost its disk (and what
/// it restored from its peers' copies may be shorter, or the name was used
/// again), or a node uploaded it for a lost owner. The storage settles it
/// (see `Storage::add_remote`): an object that is the chunk is its upload;
/// a longer one replaces the chunk here when the chunk is its beginning
/// and the numbers of its further lines are free. One of this node's
/// chunks that the object cannot become is kept, and the object replaced
/// ([`rescue`]); a lost owner's chunk is left failing, reported.
async fn settle_existing(
    tier: &Tiering,
    cfg: &S3Config,
    store: &ObjectStore,
    key: &str,
    job: &Job,
) -> Result<Done, S3Error> {
    let Some(object) = store.head(key).await? else {
        return Err(S3Error {
            message: format!("{key} was in S3 when it was uploaded, and is gone now; retrying"),
            kind: S3ErrorKind::Other,
        });
    };
    let (size, numbers) = (object.size, object.numbers);
    let own = job.role == Responsibility::Owner;
    if !own && size == job.size {
        return Ok(Done::Uploaded { bytes: 0 });
    }
    if own || size > job.size {
        let settled = tier
            .storage
            .add_remote(&job.category, &job.chunk, size, 0, numbers)
            .await
            .map_err(|e| local_error(format!("cannot record {key} as in S3"), e))?;
        match settled {
            TierOutcome::Done if size > job.size => {
                tracing::warn!(category = %job.category, chunk = %job.chunk, held = job.size, in_s3 = size, "S3 held this chunk whole and this node only its beginning (restored from a peer's copy after this node lost its disk?); it is read from S3 now");
                return Ok(Done::Uploaded { bytes: 0 });
            }
            TierOutcome::Done => return Ok(Done::Uploaded { bytes: 0 }),
            TierOutcome::Conflicting { unique_from } if own => {
                let found = Found {
                    size,
                    etag: object.etag.as_deref(),
                    unique_from,
                };
                return rescue(tier, cfg, store, key, job, found).await;
            }
            _ => {}
        }
    }
    if !own && size < job.size {
        return rescue_copy(tier, store, key, job, size, numbers).await;
    }
    Err(S3Error {
        message: format!(
            "{key} already exists in S3 with {size} bytes, and the local chunk of {} bytes is not its beginning; not overwriting it",
            job.size
        ),
        kind: S3ErrorKind::Chunk,
    })
}

/// Bytes asked for in one read of an object's lines to rescue; each read's
/// whole lines are stored as one request.
const RESCUE_READ_BYTES: u64 = 8 << 20;
/// Longest line rescued (held whole in memory): as long as the longest
/// body a node takes by default.
const RESCUE_MAX_LINE_BYTES: usize = 64 << 20;

/// `key` holds an object that cannot become this node's chunk of that name
/// (`TierOutcome::Conflicting`): this node's previous process wrote it
/// before this node lost its disk, or a peer uploaded the beginning of the
/// chunk for this node while it was forgotten (nothing to store again
/// then: the object is replaced). Its lines from byte `unique_from` on
/// are acknowledged lines that only it holds: they are appended to the
/// category again, durably, as new lines (numbered after every line this
/// node numbered so far), read by read, each read's lines once (see
/// `Storage::rescue_lines`: a crash before the end does not store them
/// twice). Then the chunk as held here replaces the object, so that S3 and
/// every copy hold the same bytes and no line number is given twice: in
/// one conditional write (`If-Match` the object as looked at), so that the
/// key never stands empty (a crash there would leave the chunk's beginning
/// only here, when the other copies were evicted) and a write by anyone
/// else meanwhile is never overwritten. A store without conditional
/// overwrites has the object deleted and the chunk created instead. An
/// object that does not end a line is no chunk, and is left as it is.
async fn rescue(
    tier: &Tiering,
    cfg: &S3Config,
    store: &ObjectStore,
    key: &str,
    job: &Job,
    found: Found<'_>,
) -> Result<Done, S3Error> {
    let Found {
        size,
        etag,
        unique_from,
    } = found;
    let not_a_chunk = |why: &str| S3Error {
        message: format!(
            "{key} holds {size} bytes under the name of this node's chunk of {} bytes, and {why}: not a chunk, left as it is",
            job.size
        ),
        kind: S3ErrorKind::Chunk,
    };
    if unique_from < size && store.get_range(key, size - 1, 1).await?.as_ref() != b"\n" {
        return Err(not_a_chunk("does not end a line"));
    }
    let rescued = store_lines_again(tier, job, key, (unique_from, size), |at, len| {
        store.get_range(key, at, len)
    })
    .await
    .map_err(|e| match e {
        Rescue::LineTooLong => not_a_chunk("holds a line longer than 64 MiB"),
        Rescue::Failed(e) => e,
    })?;
    if unique_from == size && size < job.size {
        tracing::warn!(category = %job.category, chunk = %job.chunk, held = job.size, in_s3 = size, "S3 held the beginning of one of this node's chunks, uploaded for it by a peer while this node was forgotten; the chunk as held here replaces it (the peers' copies follow)");
    } else {
        tracing::warn!(category = %job.category, chunk = %job.chunk, held = job.size, in_s3 = size, rescued_lines = rescued, "S3 held, under the name of one of this node's chunks, what this node's previous process wrote before this node lost its disk; its lines that only it held are stored again as new lines, and the chunk as held here replaces it");
    }
    let replaced = match etag {
        Some(etag) => match put(tier, cfg, store, key, job, Condition::Matches(etag)).await {
            Err(e) if e.kind == S3ErrorKind::Unsupported => {
                tracing::warn!(key, error = %e, "the store does not replace an object conditionally (If-Match); deleting it and creating the chunk instead");
                None
            }
            other => Some(other),
        },
        None => None,
    };
    let replaced = match replaced {
        Some(done) => done,
        None => {
            store.delete(key).await?;
            put(tier, cfg, store, key, job, Condition::Absent).await
        }
    };
    match replaced {
        Ok(()) => Ok(Done::Uploaded { bytes: job.size }),
        Err(e) if e.kind == S3ErrorKind::Exists => Err(S3Error {
            message: format!("{key} was written again while it was replaced; retrying"),
            kind: S3ErrorKind::Other,
        }),
        Err(e) => Err(e),
    }
}

/// The object found under the name of one of this node's chunks that it
/// cannot become (see [`rescue`]).
struct Found<'a> {
    /// Its bytes.
    size: u64,
    /// Its entity tag, when the store gave one.
    etag: Option<&'a str>,
    /// Where the lines that only it holds start.
    unique_from: u64,
}

/// Why lines could not all be stored again.
enum Rescue {
    /// A line longer than [`RESCUE_MAX_LINE_BYTES`]: no chunk holds one.
    LineTooLong,
    Failed(S3Error),
}

impl From<S3Error> for Rescue {
    fn from(e: S3Error) -> Self {
        Self::Failed(e)
    }
}

/// Stores bytes `from..to` of `source` (read with `read(offset, len)`,
/// which ends a line at `to`) again as new lines of this node, in reads of
/// [`RESCUE_READ_BYTES`], each read's whole lines once (see
/// `Storage::rescue_lines`: numbered by read, so a retry after a crash
/// finds them stored). Returns the lines.
async fn store_lines_again<F, Fut>(
    tier: &Tiering,
    job: &Job,
    source: &str,
    (from, to): (u64, u64),
    read: F,
) -> Result<u64, Rescue>
where
    F: Fn(u64, u64) -> Fut,
    Fut: Future<Output = Result<Bytes, S3Error>>,
{
    let (mut at, mut reads, mut rescued) = (from, 0, 0);
    let mut partial = bytes::BytesMut::new();
    while at < to {
        let piece = read(at, RESCUE_READ_BYTES.min(to - at)).await?;
        if piece.is_empty() {
            return Err(Rescue::Failed(S3Error {
                message: format!("{source} ended at {at} of its {to} bytes while read"),
                kind: S3ErrorKind::Other,
            }));
        }
        at += piece.len() as u64;
        partial.extend_from_slice(&piece);
        let Some(last) = memchr::memrchr(b'\n', &partial) else {
            if partial.len() > RESCUE_MAX_LINE_BYTES {
                return Err(Rescue::LineTooLong);
            }
            continue;
        };
        let lines = partial.split_to(last + 1).freeze();
        let n = memchr::memchr_iter(b'\n', &lines).count() as u64;
        let stored = tier
            .storage
            .rescue_lines(&job.category, &job.chunk, reads, lines, n)
            .await
            .map_err(|e| local_error(format!("cannot store the lines only {source} holds"), e))?;
        if stored {
            tier.metrics.s3_rescued_lines.inc_by(n);
        }
        reads += 1;
        rescued += n;
    }
    Ok(rescued)
}

/// This node's complete copy of a lost owner's chunk is longer than the
/// object of `size` bytes under its name: another replica uploaded its
/// shorter copy while it could not reach this node, and the lines past the
/// object's end are here alone (acknowledged with `min_replicas`, perhaps).
/// Once the object is found to be the copy's beginning, those lines are
/// stored again as new lines of this node (durably, once, even across a
/// crash; replicated and uploaded as any), and the copy gives way to the
/// object, so every node and S3 hold the same chunk.
async fn rescue_copy(
    tier: &Tiering,
    store: &ObjectStore,
    key: &str,
    job: &Job,
    size: u64,
    numbers: Option<crate::storage::numbering::LineRecord>,
) -> Result<Done, S3Error> {
    let kept = |why: &str| S3Error {
        message: format!(
            "{key} holds {size} bytes of a lost owner's chunk, and the copy here holds {} bytes, {why}; the copy is kept",
            job.size
        ),
        kind: S3ErrorKind::Chunk,
    };
    let copy = LocalCopy::open(tier, job).await?;
    if size > 0 && copy.read(size - 1, 1).await?.as_ref() != b"\n" {
        return Err(kept("whose end is not a line's end in the copy"));
    }
    let mut at = 0;
    while at < size {
        let len = RESCUE_READ_BYTES.min(size - at);
        if store.get_range(key, at, len).await? != copy.read(at, len).await? {
            return Err(kept("of other bytes than the copy's beginning"));
        }
        at += len;
    }
    let rescued = store_lines_again(
        tier,
        job,
        &format!("the copy of {key}"),
        (size, job.size),
        |at, len| copy.read(at, len),
    )
    .await
    .map_err(|e| match e {
        Rescue::LineTooLong => kept("past whose end the copy holds a line longer than 64 MiB"),
        Rescue::Failed(e) => e,
    })?;
    tier.storage
        .give_way_to_object(&job.category, &job.chunk, size, numbers)
        .await
        .map_err(|e| local_error(format!("cannot record {key} as in S3"), e))?;
    tracing::warn!(category = %job.category, chunk = %job.chunk, held = job.size, in_s3 = size, rescued_lines = rescued, "another replica uploaded a lost owner's chunk shorter than the copy here (it could not reach this node); the lines past the object's end are stored again as new lines of this node, and the copy gives way to the object");
    Ok(Done::Uploaded { bytes: 0 })
}

/// Durable progress of one multipart upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct MultipartState {
    version: u32,
    upload_id: String,
    size: u64,
    part_bytes: u64,
    parts: Vec<UploadedPart>,
    /// The entity tag of the object it replaces; none when it creates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    replaces: Option<String>,
}

/// Where a multipart upload goes: its key, the file of its progress, and
/// what it requires of the object there.
struct Destination<'a> {
    key: &'a str,
    state_path: &'a Path,
    condition: Condition<'a>,
}

async fn multipart(
    store: &ObjectStore,
    to: &Destination<'_>,
    chunk: &LocalCopy,
    job: &Job,
    part_bytes: u64,
) -> Result<(), S3Error> {
    let (key, state_path) = (to.key, to.state_path);
    let replaces = match to.condition {
        Condition::Absent => None,
        Condition::Matches(etag) => Some(etag.to_owned()),
    };
    let size = job.size;
    let mut state = match load_state(state_path).await {
        Some(st) if st.size == size && st.part_bytes == part_bytes && st.replaces == replaces => {
            tracing::info!(
                key,
                parts_done = st.parts.len(),
                "resuming a multipart upload"
            );
            st
        }
        other => {
            if let Some(old) = other {
                // Of another size, or of a replacement of another object (or
                // of none): its parts are not this upload's.
                let _ = store.abort_multipart(key, &old.upload_id).await;
                remove_state(state_path).await;
            }
            // The completion would be refused: no part is sent for nothing.
            if replaces.is_none() && store.size(key).await?.is_some() {
                return Err(S3Error {
                    message: format!("{key} exists in S3"),
                    kind: S3ErrorKind::Exists,
                });
            }
            let upload_id = store.start_multipart(key, job.numbers).await?;
            MultipartState {
                version: 1,
                upload_id,
                size,
                part_bytes,
                parts: Vec::new(),
                replaces,
            }
        }
    };
    save_state(state_path, &state).await?;
    let parts = size.div_ceil(part_bytes);
    for n in state.parts.len() as u64..parts {
        let offset = n * part_bytes;
        let data = chunk.read(offset, part_bytes.min(size - offset)).await?;
        let part = match store
            .put_part(key, &state.upload_id, n as i32 + 1, data)
            .await
        {
            Err(e) if e.kind == S3ErrorKind::NotFound => {
                // The store dropped the upload (expired or aborted): start over.
                remove_state(state_path).await;
                return Err(e);
            }
            other => other?,
        };
        state.parts.push(part);
        save_state(state_path, &state).await?;
    }
    match store
        .complete_multipart(key, &state.upload_id, &state.parts, to.condition)
        .await
    {
        Ok(()) => {
            remove_state(state_path).await;
            Ok(())
        }
        Err(e) => {
            if e.kind == S3ErrorKind::Exists {
                // Its parts are freed; the object is settled by the caller.
                let _ = store.abort_multipart(key, &state.upload_id).await;
            }
            if matches!(e.kind, S3ErrorKind::NotFound | S3ErrorKind::Exists) {
                remove_state(state_path).await;
            }
            Err(e)
        }
    }
}

fn local_error(what: String, e: impl std::fmt::Display) -> S3Error {
    S3Error {
        message: format!("{what}: {e}"),
        kind: S3ErrorKind::Other,
    }
}

/// This node's copy of the chunk being uploaded, open.
struct LocalCopy {
    file: Arc<std::fs::File>,
    name: String,
}

impl LocalCopy {
    /// The chunk file of `job`.
    async fn open(tier: &Tiering, job: &Job) -> Result<Self, S3Error> {
        let file = tier
            .storage
            .open_chunk_file(&job.category, &job.chunk)
            .await
            .map_err(|e| S3Error {
                message: e.to_string(),
                kind: S3ErrorKind::Chunk,
            })?;
        Ok(Self {
            file: Arc::new(file),
            name: job.chunk.to_string(),
        })
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, S3Error> {
        let (file, name) = (self.file.clone(), self.name.clone());
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            let mut buf = vec![0u8; len as usize];
            file.read_exact_at(&mut buf, offset)
                .map(|()| Bytes::from(buf))
                .map_err(|e| S3Error {
                    message: format!("cannot read the local copy of {name}: {e}"),
                    kind: S3ErrorKind::Chunk,
                })
        })
        .await
        .map_err(|e| local_error("read task failed".into(), e))?
    }
}

async fn load_state(path: &Path) -> Option<MultipartState> {
    let bytes = tokio::fs::read(path).await.ok()?;
    serde_json::from_slice(&bytes)
        .inspect_err(|e| tracing::warn!(path = %path.display(), error = %e, "ignoring a bad multipart progress file"))
        .ok()
}

async fn save_state(path: &Path, state: &MultipartState) -> Result<(), S3Error> {
    let (path, text) = (
        path.to_owned(),
        serde_json::to_vec(state).unwrap_or_default(),
    );
    tokio::task::spawn_blocking(move || {
        crate::durable::write_atomic(&path, &text)
            .map_err(|e| local_error(format!("cannot save {}", path.display()), e))
    })
    .await
    .map_err(|e| local_error("state task failed".into(), e))?
}

async fn remove_state(path: &Path) {
    if let Err(e) = tokio::fs::remove_file(path).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove a multipart progress file");
    }
}

impl From<StorageError> for S3Error {
    fn from(e: StorageError) -> Self {
        local_error("storage".into(), e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let mut b = Backoff::default();
        let mut last = Duration::ZERO;
        for _ in 0..20 {
            last = b.next_delay();
            assert!(last <= BACKOFF_MAX.mul_f64(1.5));
        }
        assert!(last >= BACKOFF_MAX / 2, "{last:?}");
        b.reset();
        assert!(b.next_delay() < BACKOFF_INITIAL * 2);
    }
}
