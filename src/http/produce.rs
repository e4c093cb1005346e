//! `POST /v1/categories/{category}/lines` (and Chukcha's `/write`).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use chunkbus_client::ProduceResponse;
use chunkbus_client::names::validate_category;
use serde::Deserialize;

use super::params::{parse_bool, parse_duration, parse_u64};
use super::{ApiError, AppState, body, lines};
use crate::storage::producers::{
    INTERNAL_PRODUCER_PREFIX, KAFKA_PRODUCER_PREFIX, ProducerTag, validate_producer,
};
use tokio::sync::OwnedMutexGuard;

/// Longest `timeout=` accepted for a `min_replicas` wait.
const MAX_REPLICA_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

#[derive(Debug, Deserialize)]
pub(super) struct ProduceQuery {
    sync: Option<String>,
    min_replicas: Option<String>,
    timeout: Option<String>,
}

impl ProduceQuery {
    /// The durability these parameters ask for.
    pub(super) fn options(&self) -> Result<WriteOptions, ApiError> {
        Ok(WriteOptions {
            sync: self
                .sync
                .as_deref()
                .map(|v| parse_bool("sync", v))
                .transpose()?,
            min_replicas: self
                .min_replicas
                .as_deref()
                .map(|v| parse_u64("min_replicas", v))
                .transpose()?
                .unwrap_or(0),
            timeout: self
                .timeout
                .as_deref()
                .map(|t| parse_duration("timeout", t, MAX_REPLICA_TIMEOUT))
                .transpose()?
                .unwrap_or(DEFAULT_REPLICA_TIMEOUT),
        })
    }
}

/// `timeout=` of a `min_replicas` wait when the request does not say.
pub(super) const DEFAULT_REPLICA_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Durability asked for by a produce request.
#[derive(Debug, Clone, Copy)]
pub(super) struct WriteOptions {
    pub sync: Option<bool>,
    pub min_replicas: u64,
    pub timeout: std::time::Duration,
}

pub(super) async fn produce(
    State(st): State<Arc<AppState>>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<ProduceQuery>, QueryRejection>,
    // The request whole, not `HeaderMap` and `Body`: that extractor clones
    // every header.
    req: Request,
) -> Result<Produced, ApiError> {
    let (parts, body) = req.into_parts();
    let Path(category) = path?;
    let Query(q) = query?;
    let opts = q.options()?;
    ingest(&st, &category, &parts.headers, body, opts)
        .await
        .map(Produced)
}

/// Where the native produce route's category sits in a path it serves
/// before the router ([`super::App`]).
pub(super) const NATIVE_PREFIX: &str = "/v1/categories/";
pub(super) const NATIVE_SUFFIX: &str = "/lines";

/// The category of `POST /v1/categories/{category}/lines` when `path` is
/// that route's with a segment that needs no decoding: the router's
/// `Path` extractor would give the same name. Other paths (a segment with
/// `%`, none, or more than one) are left to the router.
pub(super) fn native_category(path: &str) -> Option<&str> {
    let category = path
        .strip_prefix(NATIVE_PREFIX)?
        .strip_suffix(NATIVE_SUFFIX)?;
    (!category.is_empty() && !category.contains(['/', '%'])).then_some(category)
}

/// The native produce route as [`super::App`] serves it, before the
/// router: the same as [`produce`] without its extractors (the router's
/// work, the route's parameters and the layers were about a fifth of a
/// one-line request's instructions; docs/benchmarks.md).
pub(super) async fn produce_native(st: &AppState, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let category = native_category(parts.uri.path()).unwrap_or_default();
    let answer = async {
        let Query(q) = Query::<ProduceQuery>::try_from_uri(&parts.uri)?;
        let opts = q.options()?;
        ingest(st, category, &parts.headers, body, opts).await
    };
    match answer.await {
        Ok(written) => Produced(written).into_response(),
        Err(e) => e.into_response(),
    }
}

/// A produce answer as JSON, written directly rather than through a
/// serializer: it is built for every request, and its fields are numbers
/// and a chunk name (the same bytes `serde_json` would give; see tests).
#[derive(Debug)]
pub(super) struct Produced(pub ProduceResponse);

impl IntoResponse for Produced {
    fn into_response(self) -> Response {
        let r = &self.0;
        let mut out = Vec::with_capacity(112);
        out.extend_from_slice(b"{\"chunk\":");
        // The one string, escaped as JSON wants when it needs it (a chunk
        // name never does, but the answer does not depend on that).
        match &r.chunk {
            Some(c) if !c.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) => {
                out.push(b'"');
                out.extend_from_slice(c.as_bytes());
                out.push(b'"');
            }
            chunk => {
                if serde_json::to_writer(&mut out, chunk).is_err() {
                    return ApiError::Internal("cannot write a produce answer".into())
                        .into_response();
                }
            }
        }
        let mut num = itoa::Buffer::new();
        for (key, value) in [
            (&b",\"offset\":"[..], r.offset),
            (b",\"next_offset\":", r.next_offset),
            (b",\"lines\":", r.lines),
        ] {
            out.extend_from_slice(key);
            out.extend_from_slice(num.format(value).as_bytes());
        }
        if let Some(n) = r.replicas {
            out.extend_from_slice(b",\"replicas\":");
            out.extend_from_slice(num.format(n).as_bytes());
        }
        out.push(b'}');
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            out,
        )
            .into_response()
    }
}

/// Validates, decodes and appends one request body.
pub(super) async fn ingest(
    st: &AppState,
    category: &str,
    headers: &HeaderMap,
    body: Body,
    opts: WriteOptions,
) -> Result<ProduceResponse, ApiError> {
    validate_category(category)?;
    check_writable(st, opts)?;
    let tag = producer_of(headers)?;
    let (mut data, mut reservation) = read_decoded(st, headers, body).await?;
    if lines::is_json_array(headers, data.bytes()) {
        // The lines are a second buffer of about the body's size: counted
        // in the in-flight budget too; large bodies are turned into lines
        // on the blocking pool, off the threads that serve requests.
        reservation
            .grow(data.len() as u64 + 1)
            .inspect_err(|e| count_shed(st, e))?;
        let json = data.into_contiguous();
        data = body::Frames::from_vec(
            body::off_runtime_if_large(json, "JSON array", lines::json_array_to_lines).await??,
        );
    }
    let count = lines::finish_lines(&mut data, st.limits.max_line_bytes)?;
    let Some((producer, sequence)) = tag else {
        return store(st, category, data, count, reservation, opts).await;
    };
    // One request of a producer at a time, once its body is here (a slow
    // sender holds nobody up): a retry waits for the request it repeats,
    // then finds it recorded.
    let serial = st
        .producer_lock(category, &producer)
        .clone()
        .lock_owned()
        .await;
    if let Some(r) = st
        .storage
        .producer_lookup(category, &producer, sequence)
        .await?
    {
        drop(serial);
        st.metrics.produce_repeats.inc();
        let written = ProduceResponse {
            chunk: Some(r.chunk.to_string()),
            offset: r.offset,
            next_offset: r.next_offset,
            lines: r.lines,
            replicas: None,
        };
        return wait_replicas(st, category, &r.chunk, written, opts).await;
    }
    let tag = ProducerTag {
        producer,
        sequence,
        crc: data.chunks().fold(0, crc32c::crc32c_append),
    };
    store_tagged(
        st,
        category,
        data,
        count,
        reservation,
        opts,
        Some((tag, serial)),
    )
    .await
}

/// `Chunkbus-Producer`, as a name made once: a lookup by `&str` parses the
/// name first (about a third of the lookup's cost, on every request).
const PRODUCER_HEADER: HeaderName = HeaderName::from_static("chunkbus-producer");
/// `Chunkbus-Sequence`.
const SEQUENCE_HEADER: HeaderName = HeaderName::from_static("chunkbus-sequence");

/// `Chunkbus-Producer` and `Chunkbus-Sequence`: both or neither.
fn producer_of(headers: &HeaderMap) -> Result<Option<(String, u64)>, ApiError> {
    let text = |name: &HeaderName| -> Result<Option<&str>, ApiError> {
        headers
            .get(name)
            .map(|v| {
                v.to_str()
                    .map_err(|_| ApiError::BadRequest(format!("{name} is not text")))
            })
            .transpose()
    };
    match (text(&PRODUCER_HEADER)?, text(&SEQUENCE_HEADER)?) {
        (None, None) => Ok(None),
        (Some(p), Some(s)) => {
            validate_producer(p)
                .map_err(|e| ApiError::BadRequest(format!("Chunkbus-Producer: {e}")))?;
            if p.starts_with(KAFKA_PRODUCER_PREFIX) {
                return Err(ApiError::BadRequest(format!(
                    "Chunkbus-Producer: ids starting with {KAFKA_PRODUCER_PREFIX:?} are the Kafka listener's idempotent producers"
                )));
            }
            if p.starts_with(INTERNAL_PRODUCER_PREFIX) {
                return Err(ApiError::BadRequest(format!(
                    "Chunkbus-Producer: ids starting with {INTERNAL_PRODUCER_PREFIX:?} are the node's own"
                )));
            }
            let seq = s.trim().parse().map_err(|_| {
                ApiError::BadRequest(format!(
                    "Chunkbus-Sequence {s:?} is not a number from 0 to 2^64-1"
                ))
            })?;
            Ok(Some((p.to_owned(), seq)))
        }
        _ => Err(ApiError::BadRequest(
            "Chunkbus-Producer and Chunkbus-Sequence go together".into(),
        )),
    }
}

/// Refuses a write before its body is read: `min_replicas` above the
/// peers, or the disk above its high-water mark.
pub(super) fn check_writable(st: &AppState, opts: WriteOptions) -> Result<(), ApiError> {
    let others = st.replication.other_holders();
    if opts.min_replicas > others {
        let peers = st.replication.peer_count();
        return Err(ApiError::BadRequest(if others < peers as u64 {
            format!(
                "min_replicas={} asks for more than the {others} other node(s) that hold a chunk (--replicas)",
                opts.min_replicas
            )
        } else {
            format!(
                "min_replicas={} asks for more nodes than this node's {peers} peers",
                opts.min_replicas
            )
        }));
    }
    let disk = st.storage.disk();
    if disk.over_high_water() {
        st.metrics.shed_requests.inc();
        return Err(ApiError::Overloaded(format!(
            "disk usage is {}%, above the high-water mark of {}% (--disk-high-water); retry later",
            disk.usage().used_percent,
            disk.limit_percent()
        )));
    }
    Ok(())
}

/// Reads the body whole and decodes its `Content-Encoding`, within
/// `--max-body-bytes`, `--request-timeout` and the in-flight budget (the
/// reservation holds the body's share of it).
pub(super) async fn read_decoded(
    st: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<(body::Frames, body::Reservation), ApiError> {
    let encoding = body::encoding(headers)?;
    let max = st.limits.max_body_bytes;
    let mut reservation = st.inflight.reservation();
    let raw = body::read_body(
        headers,
        body,
        max,
        st.limits.request_timeout,
        &mut reservation,
    )
    .await
    .inspect_err(|e| count_shed(st, e))?;
    let data = body::decode(encoding, raw, max, &mut reservation)
        .await
        .inspect_err(|e| count_shed(st, e))?;
    Ok((data, reservation))
}

/// [`read_decoded`] for a body of records that are parsed and turned into
/// lines of their own categories (Elasticsearch bulk, Splunk HEC): the
/// body as one buffer, with two more buffers of its size reserved (the
/// records parsed out of it, then the lines appended).
pub(super) async fn read_records(
    st: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<(bytes::Bytes, body::Reservation), ApiError> {
    let (data, mut reservation) = read_decoded(st, headers, body).await?;
    reservation
        .grow(2 * data.len() as u64)
        .inspect_err(|e| count_shed(st, e))?;
    Ok((data.into_contiguous(), reservation))
}

/// Appends `count` finished lines (each ending in `\n`) to `category`,
/// then releases their share of the in-flight budget (`reservation`) and
/// waits for `min_replicas` copies when asked.
pub(super) async fn store(
    st: &AppState,
    category: &str,
    data: body::Frames,
    count: u64,
    reservation: body::Reservation,
    opts: WriteOptions,
) -> Result<ProduceResponse, ApiError> {
    store_tagged(st, category, data, count, reservation, opts, None).await
}

/// [`store`] of an idempotent request (see `storage::producers`), holding
/// its producer's lock.
async fn store_tagged(
    st: &AppState,
    category: &str,
    data: body::Frames,
    count: u64,
    reservation: body::Reservation,
    opts: WriteOptions,
    tag: Option<(ProducerTag, OwnedMutexGuard<()>)>,
) -> Result<ProduceResponse, ApiError> {
    if count == 0 {
        return Ok(ProduceResponse {
            chunk: None,
            offset: 0,
            next_offset: 0,
            lines: 0,
            replicas: None,
        });
    }
    let sync = opts.sync.unwrap_or_else(|| st.default_sync());
    let appended = match tag {
        None => {
            st.storage
                .append_parts(category, data.into_parts(), count, sync)
                .await?
        }
        Some((tag, serial)) => {
            // Finished even when the client goes away while it is being
            // stored (a timeout, then a retry): the retry waits for the
            // producer's lock, then finds the request recorded.
            let storage = st.storage.clone();
            let category = category.to_owned();
            let parts = data.into_parts();
            tokio::spawn(async move {
                let stored = storage
                    .append_tagged(&category, parts, count, sync, Some(tag))
                    .await;
                drop(serial);
                stored
            })
            .await
            .map_err(|e| ApiError::Internal(format!("the append task failed: {e}")))??
        }
    };
    drop(reservation);
    let written = ProduceResponse {
        chunk: Some(appended.chunk.to_string()),
        offset: appended.offset,
        next_offset: appended.next_offset,
        lines: appended.lines,
        replicas: None,
    };
    wait_replicas(st, category, &appended.chunk, written, opts).await
}

/// Waits for the `min_replicas` copies of what `written` says was stored
/// in `chunk`, when asked.
async fn wait_replicas(
    st: &AppState,
    category: &str,
    chunk: &chunkbus_client::ChunkName,
    mut written: ProduceResponse,
    opts: WriteOptions,
) -> Result<ProduceResponse, ApiError> {
    if opts.min_replicas == 0 {
        return Ok(written);
    }
    let want = opts.min_replicas as u32;
    let have = st
        .replication
        .progress
        .wait(category, chunk, written.next_offset, want, opts.timeout)
        .await;
    written.replicas = Some(have);
    if have < want {
        return Err(ApiError::ReplicasTimeout {
            message: format!(
                "only {have} of the {want} replicas asked for (min_replicas) confirmed within {}; the lines are stored on this node and will still replicate",
                humantime::format_duration(opts.timeout)
            ),
            written,
        });
    }
    Ok(written)
}

/// Lines of one request for several categories (the Elasticsearch bulk
/// and Splunk HEC APIs name a category per record), appended with one
/// write per category, in the order the categories first appear.
#[derive(Debug, Default)]
pub struct Batches {
    groups: Vec<Batch>,
    /// Where each category's batch is in `groups` (a request may name as
    /// many categories as it has records).
    index: std::collections::HashMap<String, usize>,
    /// The group of the last line.
    last: Option<usize>,
}

#[derive(Debug)]
struct Batch {
    category: String,
    lines: Vec<u8>,
    /// The request's number for each line, and its length with its `\n`.
    members: Vec<(usize, u64)>,
}

/// What became of one category's lines.
#[derive(Debug)]
pub(super) struct BatchResult {
    /// Each line's request number and where it starts in `written.chunk`.
    pub lines: Vec<(usize, u64)>,
    /// The append: `ReplicasTimeout` when stored but fewer copies than
    /// asked were confirmed.
    pub written: Result<ProduceResponse, ApiError>,
}

impl Batches {
    /// Adds `line` (without its `\n`, which is added), request number `n`.
    pub fn push(&mut self, category: &str, line: &[u8], n: usize) {
        self.push_with(category, n, |buf| buf.extend_from_slice(line));
    }

    /// Adds the line `write` appends to its category's buffer (without
    /// its `\n`, which is added), request number `n`.
    pub fn push_with(&mut self, category: &str, n: usize, write: impl FnOnce(&mut Vec<u8>)) {
        let pushed = self.try_push_with(category, n, |buf| {
            write(buf);
            Ok::<_, std::convert::Infallible>(true)
        });
        debug_assert!(matches!(pushed, Ok(true)));
    }

    /// Like [`Batches::push_with`], but `write` may decline the line it
    /// wrote (`Ok(false)`) or fail: then nothing of it stays. `Ok(true)`
    /// when the line was added.
    pub fn try_push_with<E>(
        &mut self,
        category: &str,
        n: usize,
        write: impl FnOnce(&mut Vec<u8>) -> Result<bool, E>,
    ) -> Result<bool, E> {
        let g = match self.last {
            // Most requests name one category: no lookup for it.
            Some(g) if self.groups[g].category == category => g,
            _ => match self.index.get(category) {
                Some(&g) => g,
                None => {
                    self.groups.push(Batch {
                        category: category.to_owned(),
                        lines: Vec::new(),
                        members: Vec::new(),
                    });
                    self.index
                        .insert(category.to_owned(), self.groups.len() - 1);
                    self.groups.len() - 1
                }
            },
        };
        let batch = &mut self.groups[g];
        let start = batch.lines.len();
        let kept = write(&mut batch.lines);
        if !matches!(kept, Ok(true)) {
            batch.lines.truncate(start);
            if batch.members.is_empty() {
                // A category no line went to has no batch.
                let category = self.groups.pop().map(|b| b.category);
                debug_assert_eq!(self.groups.len(), g);
                if let Some(c) = category {
                    self.index.remove(&c);
                }
            }
            return kept;
        }
        self.last = Some(g);
        batch.lines.push(b'\n');
        batch.members.push((n, (batch.lines.len() - start) as u64));
        Ok(true)
    }

    /// Every line (without its `\n`) with its category, category by
    /// category.
    pub fn lines(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.numbered_lines().map(|(_, c, l)| (c, l))
    }

    /// [`Batches::lines`] with each line's request number.
    pub fn numbered_lines(&self) -> impl Iterator<Item = (usize, &str, &[u8])> {
        self.groups.iter().flat_map(|g| {
            let mut at = 0usize;
            g.members.iter().map(move |&(n, len)| {
                let line = &g.lines[at..at + len as usize - 1];
                at += len as usize;
                (n, g.category.as_str(), line)
            })
        })
    }

    /// Appends each category's lines; one result per category.
    pub(super) async fn store(self, st: &AppState, opts: WriteOptions) -> Vec<BatchResult> {
        let mut results = Vec::with_capacity(self.groups.len());
        for batch in self.groups {
            let count = batch.members.len() as u64;
            let frames = body::Frames::from_vec(batch.lines);
            let written = store(
                st,
                &batch.category,
                frames,
                count,
                st.inflight.reservation(),
                opts,
            )
            .await;
            if let Err(e) = &written {
                count_shed(st, e);
            }
            let mut offset = match &written {
                Ok(w) | Err(ApiError::ReplicasTimeout { written: w, .. }) => w.offset,
                Err(_) => 0,
            };
            let lines = batch
                .members
                .into_iter()
                .map(|(n, len)| {
                    let at = offset;
                    offset += len;
                    (n, at)
                })
                .collect();
            results.push(BatchResult { lines, written });
        }
        results
    }
}

/// The lines made from the records of one push request (OTLP, Loki), and
/// the records refused with the first reason.
#[derive(Debug, Default)]
pub struct Pushed {
    /// The lines by category, each with its record's number.
    pub batches: Batches,
    /// Records refused.
    pub refused: u64,
    /// Why the first of them was.
    pub reason: Option<String>,
}

/// Grows the reservation for a push's lines a megabyte at a time.
const PUSH_RESERVE_STEP: u64 = 1 << 20;

/// Turns the records of a push request into lines within its limits: a
/// line above `max_line` refuses its record, lines above `max_lines_bytes`
/// in all refuse the request (413), and their memory is asked of `reserve`
/// before it is taken (a line repeats what its record shares with others,
/// such as a resource's attributes or a stream's labels).
pub struct PushLines<'r> {
    max_line: u64,
    max_lines_bytes: u64,
    reserve: &'r mut dyn FnMut(u64) -> Result<(), ApiError>,
    out: Pushed,
    written: u64,
    reserved: u64,
    number: usize,
}

impl<'r> PushLines<'r> {
    /// A sink with these limits.
    pub fn new(
        max_line: u64,
        max_lines_bytes: u64,
        reserve: &'r mut dyn FnMut(u64) -> Result<(), ApiError>,
    ) -> Self {
        PushLines {
            max_line,
            max_lines_bytes,
            reserve,
            out: Pushed::default(),
            written: 0,
            reserved: 0,
            number: 0,
        }
    }

    /// Asks for `n` bytes of memory (the decoded request).
    pub fn reserve(&mut self, n: u64) -> Result<(), ApiError> {
        (self.reserve)(n)
    }

    /// Refuses the next `n` records, for `reason` unless one was given.
    pub fn refuse(&mut self, n: usize, reason: impl FnOnce() -> String) {
        if n == 0 {
            return;
        }
        if self.out.reason.is_none() {
            self.out.reason = Some(reason());
        }
        self.out.refused += n as u64;
        self.number += n;
    }

    /// Adds the next record's line to `category`, as `write` writes it
    /// (`what` names a record in the refusal of one too long).
    pub fn push(
        &mut self,
        category: &str,
        what: &str,
        write: impl FnOnce(&mut Vec<u8>) -> serde_json::Result<()>,
    ) -> Result<(), ApiError> {
        // Written straight into its category's batch; taken back when too
        // long.
        let max = self.max_line;
        let mut len = 0;
        let kept = self
            .out
            .batches
            .try_push_with(category, self.number, |buf| {
                let start = buf.len();
                write(buf)?;
                len = (buf.len() - start) as u64;
                Ok(len <= max)
            })
            .map_err(|e: serde_json::Error| {
                ApiError::Internal(format!("cannot write {what} as a line: {e}"))
            })?;
        if !kept {
            self.refuse(1, || {
                format!(
                    "{what} of {len} bytes as a line, above the limit of {max} (--max-line-bytes)"
                )
            });
            return Ok(());
        }
        self.written += len + 1;
        if self.written > self.max_lines_bytes {
            return Err(ApiError::TooLarge(format!(
                "the records of this request make more than {} of lines (--max-body-bytes): send fewer at a time",
                crate::config::ByteSize(self.max_lines_bytes)
            )));
        }
        if self.written > self.reserved {
            (self.reserve)(PUSH_RESERVE_STEP)?;
            self.reserved += PUSH_RESERVE_STEP;
        }
        self.number += 1;
        Ok(())
    }

    /// The lines and the refusals.
    pub fn finish(self) -> Pushed {
        self.out
    }
}

/// The decoder of a push API: the body, whether the request's token may
/// write a category, and where to ask for memory before taking it.
pub(super) type PushDecoder = dyn FnOnce(
        &[u8],
        &dyn Fn(&str) -> bool,
        &mut dyn FnMut(u64) -> Result<(), ApiError>,
    ) -> Result<Pushed, ApiError>
    + Send;

/// Reads a push request's body (OTLP, Loki), decodes it with `decode`
/// (off the request threads when large) within the in-flight budget, and
/// stores its lines; returns the refusals.
pub(super) async fn push_request(
    st: &AppState,
    req: Request,
    opts: WriteOptions,
    what: &'static str,
    decode: Box<PushDecoder>,
) -> Result<Pushed, ApiError> {
    check_writable(st, opts)?;
    let (parts, body) = req.into_parts();
    let principal = parts.extensions.get::<crate::auth::Principal>().cloned();
    let (data, mut reservation) = read_decoded(st, &parts.headers, body).await?;
    let budget = st.limits.max_inflight_bytes;
    let (mut pushed, reservation) =
        body::off_runtime_if_large(data.into_contiguous(), what, move |raw| {
            let may_write = |c: &str| principal.as_ref().is_none_or(|p| p.may_see(c));
            let mut reserve = |n: u64| reserve_or_refuse(&mut reservation, n, budget);
            decode(raw, &may_write, &mut reserve).map(|d| (d, reservation))
        })
        .await??;
    store_all(st, std::mem::take(&mut pushed.batches), opts).await?;
    drop(reservation);
    Ok(pushed)
}

/// Reserves `n` bytes of the in-flight budget: 503 (retried) when the
/// node is busy, 413 (not retried) when the request needs more than the
/// whole budget and would never fit.
pub(super) fn reserve_or_refuse(
    reservation: &mut body::Reservation,
    n: u64,
    budget: u64,
) -> Result<(), ApiError> {
    if reservation.bytes() + n > budget {
        return Err(ApiError::TooLarge(format!(
            "decoding this request would take {} of memory, more than --max-inflight-bytes ({}): send smaller requests",
            crate::config::ByteSize(reservation.bytes() + n),
            crate::config::ByteSize(budget)
        )));
    }
    reservation.grow(n)
}

/// Appends every batch; the first failure is the answer (a `min_replicas`
/// timeout included: the lines are stored, but not copied as asked).
pub(super) async fn store_all(
    st: &AppState,
    batches: Batches,
    opts: WriteOptions,
) -> Result<(), ApiError> {
    for result in batches.store(st, opts).await {
        result.written?;
    }
    Ok(())
}

pub(super) fn count_shed(st: &AppState, e: &ApiError) {
    if matches!(e, ApiError::Overloaded(_)) {
        st.metrics.shed_requests.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_keep_the_order_of_first_appearance_and_each_lines_number() {
        let mut b = Batches::default();
        for (i, (cat, line)) in [("a", "x"), ("b", "yy"), ("a", "zzz"), ("c", "")]
            .into_iter()
            .enumerate()
        {
            b.push(cat, line.as_bytes(), i);
        }
        let got: Vec<_> = b
            .groups
            .iter()
            .map(|g| (g.category.as_str(), g.lines.as_slice(), g.members.clone()))
            .collect();
        assert_eq!(
            got,
            [
                ("a", &b"x\nzzz\n"[..], vec![(0, 2), (2, 4)]),
                ("b", &b"yy\n"[..], vec![(1, 3)]),
                ("c", &b"\n"[..], vec![(3, 1)]),
            ]
        );
        // Many categories: one lookup each, not a scan of those before.
        let mut many = Batches::default();
        for i in 0..100_000 {
            many.push(&format!("c{i}"), b"l", i);
        }
        assert_eq!(many.groups.len(), 100_000);
        assert_eq!(many.index["c99999"], 99_999);
    }

    /// A push's line is written into its batch and taken back whole when
    /// too long or when writing it fails; a category that got no line has
    /// no batch; the limit and the refusals count as before.
    #[test]
    fn push_lines_take_back_what_they_refuse() {
        let mut reserved = 0;
        let mut reserve = |n| {
            reserved += n;
            Ok(())
        };
        let mut out = PushLines::new(4, 1 << 20, &mut reserve);
        let line = |text: &'static str| {
            move |buf: &mut Vec<u8>| {
                buf.extend_from_slice(text.as_bytes());
                Ok(())
            }
        };
        out.push("a", "r", line("ab")).unwrap();
        out.push("a", "r", line("toolong")).unwrap();
        out.push("b", "r", line("waytoolong")).unwrap();
        let failed = out.push("c", "r", |buf: &mut Vec<u8>| {
            buf.extend_from_slice(b"pa");
            Err(serde::ser::Error::custom("no"))
        });
        assert!(matches!(failed, Err(ApiError::Internal(_))));
        out.push("b", "r", line("cd")).unwrap();
        out.push("a", "r", line("efgh")).unwrap();
        let pushed = out.finish();
        assert_eq!(pushed.refused, 2);
        assert!(pushed.reason.unwrap().contains("7 bytes"));
        let got: Vec<_> = pushed.batches.numbered_lines().collect();
        assert_eq!(
            got,
            [
                (0, "a", &b"ab"[..]),
                (4, "a", &b"efgh"[..]),
                (3, "b", &b"cd"[..]),
            ]
        );
        assert_eq!(pushed.batches.groups.len(), 2);
        assert!(!pushed.batches.index.contains_key("c"));
        assert_eq!(reserved, PUSH_RESERVE_STEP);
    }

    #[tokio::test]
    async fn answers_are_the_json_serde_would_write() {
        let answers = [
            ProduceResponse {
                chunk: Some("eu-1.a_b-chunk000000042".into()),
                offset: 0,
                next_offset: u64::MAX,
                lines: 7,
                replicas: None,
            },
            ProduceResponse {
                chunk: None,
                offset: 0,
                next_offset: 0,
                lines: 0,
                replicas: Some(2),
            },
            ProduceResponse {
                chunk: Some("ünï-\u{1f}\u{7f}".into()),
                offset: 1,
                next_offset: 2,
                lines: 1,
                replicas: None,
            },
            ProduceResponse {
                chunk: Some("we\"ird\\".into()),
                offset: 12,
                next_offset: 34,
                lines: 1,
                replicas: Some(0),
            },
        ];
        for a in answers {
            let want = serde_json::to_vec(&a).unwrap();
            let resp = Produced(a.clone()).into_response();
            assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
            let body = axum::body::to_bytes(resp.into_body(), 1 << 10)
                .await
                .unwrap();
            assert_eq!(body, want, "{a:?}");
        }
    }
}
