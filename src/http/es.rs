//! Elasticsearch's bulk API, so that agents whose stock output is
//! Elasticsearch (Filebeat, Logstash, Fluent Bit `es`, Vector
//! `elasticsearch`, syslog-ng `elasticsearch-http()`, rsyslog
//! `omelasticsearch`) write to chunkbus by changing a URL; and the calls
//! they make before they send: `GET /` and `HEAD /` (the version), `GET
//! /_license`, `GET /_cluster/health`, and index templates, ILM policies
//! and ingest pipelines (accepted, not kept: chunkbus has no mappings).
//!
//! `POST /_bulk` and `POST /{index}/_bulk`: every `index` or `create`
//! action stores its document as one line of JSON, without insignificant
//! whitespace, in the category named by the action's `_index` (or the
//! path's). The answer is Elasticsearch's: 200 with one item per action,
//! in order, each with its own status, so that an agent retries exactly
//! the items that failed for a reason that passes (429 and 5xx) and drops
//! the ones that never will (other 4xx). A body that is not a bulk request
//! at all (an action line that is not JSON, an action without its
//! document) is refused whole with 400 and nothing is stored.
//!
//! A `create` with an `_id` this node accepted before in the same category,
//! among the last [`KEPT_IDS`] it accepted, is answered 409 as
//! Elasticsearch does for an existing document (agents count it as
//! delivered): a retried batch with ids is not stored twice on one node.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chunkbus_client::names::validate_category;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::filter_path::{At, FilterPath, Member};
use super::lines::push_json_str;
use super::produce::{Batches, ProduceQuery, check_writable, count_shed, read_records};
use super::{ApiError, AppState, body};
use crate::auth::Principal;

/// The version `GET /` reports. Agents check it: Filebeat refuses a
/// cluster older than itself unless `allow_older_versions` is set, the
/// official clients want the same major version as theirs.
pub const ES_VERSION: &str = "9.1.0";

/// Created ids remembered per node for the 409 of a repeated `create`.
pub const KEPT_IDS: usize = 100_000;

/// Most actions in one bulk request (413 above, which agents answer by
/// splitting the batch). Each action's answer takes about 200 bytes and
/// an action as little as 14: the cap bounds the answer of a body of many
/// tiny actions (a few MiB), where the body limit alone would let one
/// request of 64 MiB ask for a gigabyte of answer.
pub const MAX_ACTIONS: usize = 100_000;

/// Memory counted for each action's answer in the in-flight budget.
const ANSWER_BYTES_PER_ACTION: u64 = 256;

/// Why a bulk body is refused whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BulkRefusal {
    /// Not a bulk request (400).
    Malformed(String),
    /// More than [`MAX_ACTIONS`] actions (413).
    TooManyActions,
}

impl BulkRefusal {
    fn into_response(self) -> Response {
        match self {
            BulkRefusal::Malformed(reason) => es_error(
                StatusCode::BAD_REQUEST,
                "illegal_argument_exception",
                &reason,
            ),
            BulkRefusal::TooManyActions => es_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "content_too_long_exception",
                &format!("more than {MAX_ACTIONS} actions in one bulk request: send fewer"),
            ),
        }
    }
}

const ELASTIC_PRODUCT: HeaderName = HeaderName::from_static("x-elastic-product");

/// An answer as Elasticsearch gives it: JSON, with the product header
/// the official clients check on every answer.
fn es_json(status: StatusCode, body: &Value) -> Response {
    es_bytes(status, body.to_string().into_bytes())
}

/// [`es_json`] of a successful answer, as the request's `filter_path`
/// keeps it.
fn es_filtered(body: &Value, filter: Result<Query<FilterQuery>, QueryRejection>) -> Response {
    match FilterQuery::filter(filter) {
        Ok(None) => es_json(StatusCode::OK, body),
        Ok(Some(f)) => es_json(StatusCode::OK, &f.answer(body)),
        Err(e) => es_api_error(e),
    }
}

/// [`es_json`] of JSON already written.
fn es_bytes(status: StatusCode, body: Vec<u8>) -> Response {
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(ELASTIC_PRODUCT, HeaderValue::from_static("Elasticsearch"));
    resp
}

/// An error answer in Elasticsearch's shape.
fn es_error(status: StatusCode, kind: &str, reason: &str) -> Response {
    es_json(
        status,
        &json!({
            "error": {
                "root_cause": [{"type": kind, "reason": reason}],
                "type": kind,
                "reason": reason,
            },
            "status": status.as_u16(),
        }),
    )
}

/// An [`ApiError`] in Elasticsearch's shape, with its status (and its
/// `Retry-After`, when it has one).
fn es_api_error(e: ApiError) -> Response {
    let status = e.status();
    let kind = match status.as_u16() {
        413 => "content_too_long_exception",
        429 | 503 => "es_rejected_execution_exception",
        400..=499 => "illegal_argument_exception",
        _ => "exception",
    };
    let resp = es_error(status, kind, &e.to_string());
    e.with_headers_on(resp)
}

/// `GET /` (and `HEAD /`): who this is, in the shape agents and clients
/// read the version from.
pub(super) async fn root(
    State(st): State<Arc<AppState>>,
    filter: Result<Query<FilterQuery>, QueryRejection>,
) -> Response {
    es_filtered(
        &json!({
            "name": st.storage.node(),
            "cluster_name": "chunkbus",
            "cluster_uuid": "chunkbus",
            "version": {
                "number": ES_VERSION,
                "build_flavor": "default",
                "build_type": "chunkbus",
                "build_hash": env!("CARGO_PKG_VERSION"),
                "build_date": "2026-01-01T00:00:00.000Z",
                "build_snapshot": false,
                "lucene_version": "9.12.0",
                "minimum_wire_compatibility_version": "7.17.0",
                "minimum_index_compatibility_version": "7.0.0",
            },
            "tagline": "You Know, for Search",
            "chunkbus": {
                "version": env!("CARGO_PKG_VERSION"),
                "note": "chunkbus answers the Elasticsearch bulk API only; see docs/ingest.md",
            },
        }),
        filter,
    )
}

/// `GET /_license`: a basic license, which is what agents check for.
pub(super) async fn license(filter: Result<Query<FilterQuery>, QueryRejection>) -> Response {
    es_filtered(
        &json!({"license": {"status": "active", "type": "basic", "uid": "chunkbus", "issued_to": "chunkbus", "issuer": "chunkbus"}}),
        filter,
    )
}

/// `GET /_cluster/health`: green while the node serves requests.
pub(super) async fn health(
    State(st): State<Arc<AppState>>,
    filter: Result<Query<FilterQuery>, QueryRejection>,
) -> Response {
    let nodes = 1 + st.replication.peer_count();
    es_filtered(
        &json!({
            "cluster_name": "chunkbus",
            "status": "green",
            "timed_out": false,
            "number_of_nodes": nodes,
            "number_of_data_nodes": nodes,
            "active_primary_shards": 0,
            "active_shards": 0,
            "relocating_shards": 0,
            "initializing_shards": 0,
            "unassigned_shards": 0,
        }),
        filter,
    )
}

/// `PUT` of an index template, ILM policy or ingest pipeline: accepted
/// and not kept (chunkbus stores documents as they come).
pub(super) async fn accepted(filter: Result<Query<FilterQuery>, QueryRejection>) -> Response {
    es_filtered(&json!({"acknowledged": true}), filter)
}

/// `GET` of an index template, ILM policy or ingest pipeline: there is
/// none. Agents that check before they install one then `PUT` it, which
/// is accepted.
pub(super) async fn none(req: Request) -> Response {
    let reason = format!("{} is not kept by chunkbus", req.uri().path());
    es_error(
        StatusCode::NOT_FOUND,
        "resource_not_found_exception",
        &reason,
    )
}

/// What an action does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Stores its document.
    Index,
    /// Stores its document unless its `_id` was created before.
    Create,
    /// Answered with a per-item error: lines are not changed.
    Update,
    /// Answered with a per-item error: lines are not deleted.
    Delete,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Index => "index",
            Action::Create => "create",
            Action::Update => "update",
            Action::Delete => "delete",
        }
    }
}

/// Why one item is not stored: its status and Elasticsearch's error type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemError {
    /// Its HTTP status.
    pub status: u16,
    /// Elasticsearch's name for it.
    pub kind: &'static str,
    /// What went wrong.
    pub reason: String,
}

/// One action of a bulk request, as parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// What it asks.
    pub action: Action,
    /// The category: its `_index`, or the path's (shared by the items of
    /// the same action line).
    pub index: Option<Arc<str>>,
    /// Its `_id`, if it has one.
    pub id: Option<String>,
    /// `Ok` when its document was added to the batches, as one line
    /// (compact JSON, no newline) numbered by the item's position; or why
    /// it cannot be stored.
    pub doc: Result<(), ItemError>,
    /// The key `admit` gave it (a `create`'s id, taken).
    pub claimed: Option<u64>,
}

/// An action line: exactly one of these is set. Read in place (the names
/// borrowed from the body), once per distinct action line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionLine<'a> {
    #[serde(borrow)]
    index: Option<Meta<'a>>,
    #[serde(borrow)]
    create: Option<Meta<'a>>,
    #[serde(borrow)]
    update: Option<Meta<'a>>,
    #[serde(borrow)]
    delete: Option<Meta<'a>>,
}

#[derive(Deserialize)]
struct Meta<'a> {
    #[serde(rename = "_index", borrow)]
    index: Option<Cow<'a, str>>,
    #[serde(rename = "_id", borrow)]
    id: Option<Cow<'a, str>>,
}

fn item_error(status: u16, kind: &'static str, reason: impl Into<String>) -> ItemError {
    ItemError {
        status,
        kind,
        reason: reason.into(),
    }
}

/// An action line as read, kept to read the next one when it is the same
/// bytes (agents repeat one action line for every document).
struct Parsed<'b> {
    line: &'b [u8],
    action: Action,
    index: Option<Arc<str>>,
    id: Option<String>,
    /// Whether `index` names a category (checked once per action line).
    index_ok: Result<(), ItemError>,
}

/// Says whether a valid document may be stored: the token's access to its
/// category, a `create`'s `_id` not taken before. `Ok` with the key taken
/// for the id, if any; else the item's error.
pub type Admit<'a> = dyn FnMut(Action, &str, Option<&str>) -> Result<Option<u64>, ItemError> + 'a;

/// [`parse_bulk_into`] with every document admitted, into fresh batches
/// (tests, fuzzing).
pub fn parse_bulk(
    body: &[u8],
    path_index: Option<&str>,
    max_line: u64,
) -> Result<(Vec<Item>, Batches), BulkRefusal> {
    let mut batches = Batches::default();
    let items = parse_bulk_into(
        body,
        path_index,
        max_line,
        &mut |_, _, _| Ok(None),
        &mut batches,
    )?;
    Ok((items, batches))
}

/// Parses a bulk body: action lines, each `index`, `create` and `update`
/// followed by its document line. Each document that can be stored and
/// that `admit` admits is written into `batches` as one line, numbered by
/// its item's position. `Err` is the reason the whole request is refused
/// (the caller then stores nothing, and gives back what `admit` took); a
/// document that cannot be stored is an item's error. Blank lines between
/// actions are skipped.
pub fn parse_bulk_into(
    body: &[u8],
    path_index: Option<&str>,
    max_line: u64,
    admit: &mut Admit,
    batches: &mut Batches,
) -> Result<Vec<Item>, BulkRefusal> {
    // JSON is UTF-8; skipping a string's contents (`IgnoredAny`) does not
    // check them. One check of the whole body spares one per document.
    let all_utf8 = std::str::from_utf8(body).is_ok();
    let path_index: Option<Arc<str>> = path_index.map(Arc::from);
    // Lines found with `memchr` (a byte-at-a-time split is most of a
    // small body's parse).
    let mut at = 0;
    let mut lines = std::iter::from_fn(|| {
        let rest = body.get(at..)?;
        let end = memchr::memchr(b'\n', rest).unwrap_or(rest.len());
        at += end + 1;
        Some(&rest[..end])
    })
    .enumerate();
    let mut items = Vec::new();
    let mut last: Option<Parsed> = None;
    while let Some((n, line)) = lines.next() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if items.len() == MAX_ACTIONS {
            return Err(BulkRefusal::TooManyActions);
        }
        let parsed = match last.take() {
            Some(p) if p.line == line => p,
            _ => action_line(line, n, path_index.as_ref())?,
        };
        let action = parsed.action;
        let doc = if action == Action::Delete {
            None
        } else {
            match lines.next() {
                Some((_, doc)) if !doc.iter().all(u8::is_ascii_whitespace) => Some(doc),
                _ => {
                    return Err(BulkRefusal::Malformed(format!(
                        "the {} action on line [{}] is not followed by its document",
                        action.name(),
                        n + 1
                    )));
                }
            }
        };
        let number = items.len();
        let mut claimed = None;
        let doc = match (action, doc, &parsed.index) {
            (Action::Index | Action::Create, Some(doc), Some(index)) => {
                parsed.index_ok.clone().and_then(|()| {
                    let line = document(doc, all_utf8, max_line)?;
                    claimed = admit(action, index, parsed.id.as_deref())?;
                    match line {
                        Some(line) => batches.push(index, &line, number),
                        None => batches
                            .push_with(index, number, |buf| super::lines::minify_into(doc, buf)),
                    }
                    Ok(())
                })
            }
            (Action::Index | Action::Create, Some(_), None) => Err(item_error(
                400,
                "action_request_validation_exception",
                "Validation Failed: 1: index is missing;",
            )),
            _ => Err(item_error(
                400,
                "illegal_argument_exception",
                format!(
                    "chunkbus keeps lines as written: {} is not supported",
                    action.name()
                ),
            )),
        };
        items.push(Item {
            action,
            index: parsed.index.clone(),
            id: parsed.id.clone(),
            doc,
            claimed,
        });
        last = Some(parsed);
    }
    Ok(items)
}

/// Reads action line `n` (from 0).
fn action_line<'b>(
    line: &'b [u8],
    n: usize,
    path_index: Option<&Arc<str>>,
) -> Result<Parsed<'b>, BulkRefusal> {
    let malformed = |why: String| {
        BulkRefusal::Malformed(format!("Malformed action/metadata line [{}]: {why}", n + 1))
    };
    let parsed: ActionLine = serde_json::from_slice(line).map_err(|e| malformed(e.to_string()))?;
    let mut set = [
        (Action::Index, parsed.index),
        (Action::Create, parsed.create),
        (Action::Update, parsed.update),
        (Action::Delete, parsed.delete),
    ]
    .into_iter()
    .filter_map(|(action, meta)| Some((action, meta?)));
    let (action, meta) = match (set.next(), set.next()) {
        (Some(one), None) => one,
        _ => return Err(malformed("expected exactly one action".into())),
    };
    let index = match meta.index {
        Some(i) => Some(Arc::from(i.as_ref())),
        None => path_index.cloned(),
    };
    let index_ok = match &index {
        Some(i) => validate_category(i)
            .map_err(|e| item_error(400, "invalid_index_name_exception", e.to_string())),
        None => Ok(()),
    };
    Ok(Parsed {
        line,
        action,
        index,
        id: meta.id.map(Cow::into_owned),
        index_ok,
    })
}

/// Checks a document: `Ok(None)` when it is a JSON object whose compact
/// form fits the line limit without being written (it is never longer than
/// the document), `Ok(Some(line))` when it had to be written to know;
/// else why it cannot be stored. `utf8` when the document is known to be
/// UTF-8.
fn document(doc: &[u8], utf8: bool, max_line: u64) -> Result<Option<Vec<u8>>, ItemError> {
    let first = doc.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(item_error(
            400,
            "document_parsing_exception",
            "the document is not a JSON object",
        ));
    }
    if !utf8 {
        std::str::from_utf8(doc).map_err(|e| {
            item_error(
                400,
                "document_parsing_exception",
                format!("the document is not UTF-8: {e}"),
            )
        })?;
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(doc).map_err(|e| {
        item_error(
            400,
            "document_parsing_exception",
            format!("the document is not valid JSON: {e}"),
        )
    })?;
    if doc.len() as u64 <= max_line {
        return Ok(None);
    }
    let mut line = Vec::with_capacity(doc.len());
    super::lines::minify_into(doc, &mut line);
    if line.len() as u64 > max_line {
        return Err(item_error(
            413,
            "illegal_argument_exception",
            format!(
                "the document is {} bytes as a line, above --max-line-bytes ({max_line})",
                line.len()
            ),
        ));
    }
    Ok(Some(line))
}

/// The `_id`s of the last [`KEPT_IDS`] documents created on this node, by
/// a keyed hash of (category, id).
#[derive(Debug, Default)]
pub struct CreatedIds {
    hasher: RandomState,
    kept: Mutex<(HashSet<u64>, VecDeque<u64>)>,
}

impl CreatedIds {
    fn key(&self, category: &str, id: &str) -> u64 {
        self.hasher.hash_one((category, id))
    }

    /// Takes `key` for a document about to be stored; false when it was
    /// taken before.
    fn claim(&self, key: u64) -> bool {
        let mut kept = self.kept.lock().unwrap();
        let (set, order) = &mut *kept;
        if !set.insert(key) {
            return false;
        }
        order.push_back(key);
        while order.len() > KEPT_IDS {
            if let Some(old) = order.pop_front() {
                set.remove(&old);
            }
        }
        true
    }

    /// Gives back a key whose document was not stored after all.
    fn release(&self, key: u64) {
        self.kept.lock().unwrap().0.remove(&key);
    }
}

/// `POST /_bulk`.
pub(super) async fn bulk(
    State(st): State<Arc<AppState>>,
    query: Result<Query<ProduceQuery>, QueryRejection>,
    filter: Result<Query<FilterQuery>, QueryRejection>,
    req: Request,
) -> Response {
    bulk_into(st, None, query, filter, req).await
}

/// `POST /{index}/_bulk`.
pub(super) async fn bulk_index(
    State(st): State<Arc<AppState>>,
    Path(index): Path<String>,
    query: Result<Query<ProduceQuery>, QueryRejection>,
    filter: Result<Query<FilterQuery>, QueryRejection>,
    req: Request,
) -> Response {
    bulk_into(st, Some(index), query, filter, req).await
}

/// `filter_path=`: the parts of a successful answer the client wants
/// (see [`FilterPath`]).
#[derive(Debug, Deserialize)]
pub(super) struct FilterQuery {
    filter_path: Option<String>,
}

impl FilterQuery {
    /// The filter asked for, if any; 400 for one that cannot be.
    fn filter(
        query: Result<Query<FilterQuery>, QueryRejection>,
    ) -> Result<Option<FilterPath>, ApiError> {
        Self::read(query, FilterPath::parse)
    }

    /// The filter asked for as `parse` reads it.
    fn read<T>(
        query: Result<Query<FilterQuery>, QueryRejection>,
        parse: impl FnOnce(&str) -> Result<Option<T>, String>,
    ) -> Result<Option<T>, ApiError> {
        let Query(q) = query?;
        q.filter_path
            .as_deref()
            .map(parse)
            .transpose()
            .map(Option::flatten)
            .map_err(ApiError::BadRequest)
    }
}

async fn bulk_into(
    st: Arc<AppState>,
    path_index: Option<String>,
    query: Result<Query<ProduceQuery>, QueryRejection>,
    filter: Result<Query<FilterQuery>, QueryRejection>,
    req: Request,
) -> Response {
    let filter = match FilterQuery::read(filter, BulkPlans::of) {
        Ok(f) => f,
        Err(e) => return es_api_error(e),
    };
    match bulk_items(&st, path_index, query, filter, req).await {
        Ok(answer) => es_bytes(StatusCode::OK, answer),
        Err(e) => e,
    }
}

/// Where one stored line went.
struct Stored<'a> {
    /// Which append of the request.
    append: u32,
    chunk: &'a str,
    offset: u64,
    shards: (u64, u64),
}

/// The ids a bulk request took for its `create`s, given back when this is
/// dropped, except those [`TakenIds::stored`] says were stored. A request
/// refused whole, whose append fails, or that is dropped before its appends
/// start (its client left, even while the parse runs off the runtime) thus
/// keeps no id: a retry of its `create`s is stored, not answered 409 for
/// documents that never were. Once its appends start they all run, client
/// or not, so the ids of what they stored are kept.
struct TakenIds {
    st: Arc<AppState>,
    keys: HashSet<u64>,
}

impl TakenIds {
    /// Keeps the ids of `items`: they are stored.
    fn stored<'a>(&mut self, items: impl IntoIterator<Item = &'a Item>) {
        for key in items.into_iter().filter_map(|i| i.claimed) {
            self.keys.remove(&key);
        }
    }
}

impl Drop for TakenIds {
    fn drop(&mut self) {
        for &key in &self.keys {
            self.st.es_ids.release(key);
        }
    }
}

async fn bulk_items(
    st: &Arc<AppState>,
    path_index: Option<String>,
    query: Result<Query<ProduceQuery>, QueryRejection>,
    filter: Option<BulkPlans>,
    req: Request,
) -> Result<Vec<u8>, Response> {
    let started = Instant::now();
    let opts = query
        .map_err(ApiError::from)
        .and_then(|Query(q)| q.options())
        .map_err(es_api_error)?;
    check_writable(st, opts).map_err(es_api_error)?;
    let (parts, body) = req.into_parts();
    let principal = parts.extensions.get::<Principal>().cloned();
    let (raw, mut reservation) = read_records(st, &parts.headers, body)
        .await
        .map_err(es_api_error)?;
    let max_line = st.limits.max_line_bytes;
    let state = st.clone();
    let parsed = body::off_runtime_if_large(raw, "bulk parse", move |raw| {
        // Per document: may this token write there, was this id created
        // before (the key is taken now, given back if it is not stored).
        let mut taken = TakenIds {
            st: state.clone(),
            keys: HashSet::new(),
        };
        let mut admit = |action, index: &str, id: Option<&str>| {
            if let Some(p) = &principal
                && !p.may_see(index)
            {
                return Err(item_error(
                    403,
                    "security_exception",
                    format!("this token may not write to {index:?}"),
                ));
            }
            let (Action::Create, Some(id)) = (action, id) else {
                return Ok(None);
            };
            let key = state.es_ids.key(index, id);
            if !state.es_ids.claim(key) {
                return Err(item_error(
                    409,
                    "version_conflict_engine_exception",
                    format!("[{id}]: version conflict, document already exists"),
                ));
            }
            taken.keys.insert(key);
            Ok(Some(key))
        };
        let mut batches = Batches::default();
        let items = parse_bulk_into(
            raw,
            path_index.as_deref(),
            max_line,
            &mut admit,
            &mut batches,
        );
        items.map(|items| (items, batches, taken))
    })
    .await
    .map_err(es_api_error)?;
    let (items, batches, mut taken) = parsed.map_err(BulkRefusal::into_response)?;
    if let Err(e) = reservation.grow(items.len() as u64 * ANSWER_BYTES_PER_ACTION) {
        count_shed(st, &e);
        return Err(es_api_error(e));
    }

    // Once the appends start they all run, and the ids of what they stored
    // are kept, even when the client leaves meanwhile: its retry finds its
    // documents (409), and a `create` is never stored twice.
    let state = st.clone();
    let stored = tokio::spawn(async move {
        let st = &state;
        // One append per category, in the order the categories first appear;
        // each item's batch and offset in its chunk.
        let mut place: Vec<(u32, u64)> = vec![(NONE, 0); items.len()];
        let mut outcomes = Vec::new();
        for (b, batch) in batches.store(st, opts).await.into_iter().enumerate() {
            let want = opts.min_replicas;
            let (written, shards) = match batch.written {
                Ok(w) => (Ok(w), (1 + want, 1 + want)),
                // Stored here; fewer copies than asked within the timeout:
                // Elasticsearch's shard failure, not the item's.
                Err(ApiError::ReplicasTimeout { written, .. }) => {
                    let have = written.replicas.unwrap_or(0) as u64;
                    (Ok(written), (1 + want, 1 + have))
                }
                Err(e) => (Err(e), (0, 0)),
            };
            let outcome = match written {
                Ok(w) => {
                    taken.stored(batch.lines.iter().map(|&(i, _)| &items[i]));
                    Ok((w.chunk.unwrap_or_default(), shards))
                }
                Err(e) => {
                    let status = e.status().as_u16();
                    let kind = if matches!(status, 429 | 503) {
                        "es_rejected_execution_exception"
                    } else {
                        "exception"
                    };
                    Err(item_error(status, kind, e.to_string()))
                }
            };
            for (i, offset) in batch.lines {
                place[i] = (b as u32, offset);
            }
            outcomes.push(outcome);
        }
        // What was taken and not stored is given back now.
        drop(taken);
        (items, place, outcomes, reservation)
    })
    .await;
    let (items, place, outcomes, reservation) = stored.map_err(|e| {
        es_api_error(ApiError::Internal(format!(
            "the bulk append task failed: {e}"
        )))
    })?;

    let took = started.elapsed().as_millis() as u64;
    let answer = bulk_answer(&items, &place, &outcomes, filter.as_ref(), took)
        .map_err(|e| es_api_error(ApiError::Internal(format!("cannot write the answer: {e}"))))?;
    drop(reservation);
    Ok(answer)
}

/// Where each action of a bulk request went: its append (`NONE` when its
/// document was not stored) and its offset in that append's chunk.
const NONE: u32 = u32::MAX;

/// How an append ended: the chunk it went to and its shards (total,
/// successful), or the error each of its items is answered with.
type Outcome = Result<(String, (u64, u64)), ItemError>;

/// The answer of a bulk request, as `filter` keeps it: `{"items":[..],
/// "errors":..,"took":..}` with one item per action, in order.
fn bulk_answer(
    items: &[Item],
    place: &[(u32, u64)],
    outcomes: &[Outcome],
    filter: Option<&BulkPlans>,
    took: u64,
) -> Result<Vec<u8>, serde_json::Error> {
    let mut filter = filter.map(BulkFilter::new);
    let (keep_errors, keep_took) = filter
        .as_ref()
        .map_or((true, true), |f| (f.plans.errors, f.plans.took));
    let not_stored = item_error(500, "exception", "not stored");
    let mut answer = Vec::with_capacity(match &filter {
        None => items.len() * 200 + 64,
        Some(_) => items.len() * 32 + 64,
    });
    answer.extend_from_slice(b"{\"items\":[");
    let mut errors = false;
    let mut written = 0usize;
    // The answer of the last append's items without ids, by append and action.
    let mut created: Option<((u32, Action), Option<CreatedAnswer>)> = None;
    for (item, &(b, offset)) in items.iter().zip(place) {
        let result = match &item.doc {
            Err(e) => Err(e),
            Ok(()) if b == NONE => Err(&not_stored),
            Ok(()) => match &outcomes[b as usize] {
                Ok((chunk, shards)) => Ok(Stored {
                    append: b,
                    chunk,
                    offset,
                    shards: *shards,
                }),
                Err(e) => Err(e),
            },
        };
        errors |= result.is_err();
        let Some(f) = &mut filter else {
            if written > 0 {
                answer.push(b',');
            }
            written += 1;
            push_item(&mut answer, item, result, &mut created)?;
            continue;
        };
        let mark = answer.len();
        if written > 0 {
            answer.push(b',');
        }
        if f.push_item(&mut answer, item, result)? {
            written += 1;
        } else {
            answer.truncate(mark);
        }
    }
    if written > 0 || filter.is_none() {
        answer.extend_from_slice(b"]");
    } else {
        // An empty array is dropped by a filter.
        answer.truncate(1);
    }
    let field = |answer: &mut Vec<u8>, key: &str| {
        if answer.len() > 1 {
            answer.push(b',');
        }
        answer.push(b'"');
        answer.extend_from_slice(key.as_bytes());
        answer.extend_from_slice(b"\":");
    };
    if keep_errors {
        field(&mut answer, "errors");
        answer.extend_from_slice(if errors { b"true" } else { b"false" });
    }
    if keep_took {
        field(&mut answer, "took");
        answer.extend_from_slice(itoa::Buffer::new().format(took).as_bytes());
    }
    answer.push(b'}');
    Ok(answer)
}

/// Appends the whole answer of one item.
fn push_item(
    answer: &mut Vec<u8>,
    item: &Item,
    result: Result<Stored<'_>, &ItemError>,
    created: &mut Option<((u32, Action), Option<CreatedAnswer>)>,
) -> Result<(), serde_json::Error> {
    let index = item.index.as_deref().unwrap_or_default();
    let e = match &result {
        Ok(s) if item.id.is_none() => {
            let key = (s.append, item.action);
            if created.as_ref().is_none_or(|(k, _)| *k != key) {
                *created = Some((key, CreatedAnswer::new(item.action.name(), index, s)));
            }
            match created.as_ref().and_then(|(_, c)| c.as_ref()) {
                Some(c) => c.push(answer, s.offset),
                None => push_created(answer, item.action.name(), index, None, s),
            }
            return Ok(());
        }
        Ok(s) => {
            push_created(answer, item.action.name(), index, item.id.as_deref(), s);
            return Ok(());
        }
        Err(e) => e,
    };
    answer.extend_from_slice(b"{\"");
    answer.extend_from_slice(item.action.name().as_bytes());
    answer.extend_from_slice(b"\":");
    serde_json::to_writer(&mut *answer, &error_answer(index, item.id.as_deref(), e))?;
    answer.push(b'}');
    Ok(())
}

/// The answer of an item that was not stored.
fn error_answer<'a>(index: &'a str, id: Option<&'a str>, e: &'a ItemError) -> ItemAnswer<'a> {
    ItemAnswer {
        index,
        id,
        version: None,
        result: None,
        shards: None,
        seq_no: None,
        primary_term: None,
        status: e.status,
        error: Some(ErrorAnswer {
            kind: e.kind,
            reason: &e.reason,
        }),
    }
}

/// What a bulk answer's `filter_path` keeps: of the answer's top and of
/// an item of each action. The fields of an item depend only on its
/// action and on whether it was stored, so they are decided once per
/// filter, not per item (a request of 100,000 items costs 100,000 writes
/// of what is kept, whatever the filter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BulkPlans {
    /// `None`: `items` is kept whole or not at all (`whole`).
    plans: Option<[ItemPlan; 4]>,
    whole: bool,
    errors: bool,
    took: bool,
}

thread_local! {
    /// The plans of the last `filter_path` this thread read: an agent
    /// sends the same one with every request.
    static LAST_PLANS: RefCell<Option<(String, BulkPlans)>> = const { RefCell::new(None) };
}

impl BulkPlans {
    fn new(f: &FilterPath) -> Self {
        let root = f.root();
        let (plans, whole) = match f.member(&root, "items") {
            Member::Drop => (None, false),
            Member::Keep => (None, true),
            Member::Descend(at) => (
                Some(ACTIONS.map(|a| ItemPlan::new(f, f.member(&at, a.name())))),
                false,
            ),
        };
        BulkPlans {
            plans,
            whole,
            errors: f.keeps_scalar(&root, "errors"),
            took: f.keeps_scalar(&root, "took"),
        }
    }

    /// The plans of the filter `s`; `None` for one that filters nothing.
    fn of(s: &str) -> Result<Option<BulkPlans>, String> {
        let last = LAST_PLANS.with_borrow(|l| l.as_ref().filter(|(k, _)| k == s).map(|(_, p)| *p));
        if last.is_some() {
            return Ok(last);
        }
        let Some(f) = FilterPath::parse(s)? else {
            return Ok(None);
        };
        let plans = BulkPlans::new(&f);
        LAST_PLANS.with_borrow_mut(|l| *l = Some((s.to_owned(), plans)));
        Ok(Some(plans))
    }
}

/// The actions, in the order of their discriminants.
const ACTIONS: [Action; 4] = [
    Action::Index,
    Action::Create,
    Action::Update,
    Action::Delete,
];

/// A bulk answer being filtered: the plans and what is copied from item
/// to item.
struct BulkFilter {
    plans: BulkPlans,
    /// The last created item written when its answer is the same for
    /// every item of an append, action and index (no `_id`, no
    /// `_seq_no`): the key and the bytes, copied for the next.
    same: Option<(SameKey, Vec<u8>)>,
    /// For a filter that keeps items whole: as [`push_item`] keeps it.
    created: Option<((u32, Action), Option<CreatedAnswer>)>,
}

impl BulkFilter {
    fn new(plans: &BulkPlans) -> Self {
        BulkFilter {
            plans: *plans,
            same: None,
            created: None,
        }
    }

    /// Appends what the filter keeps of one item; false when it keeps
    /// nothing of it (the item leaves the array).
    fn push_item(
        &mut self,
        answer: &mut Vec<u8>,
        item: &Item,
        result: Result<Stored<'_>, &ItemError>,
    ) -> Result<bool, serde_json::Error> {
        let plan = match &self.plans.plans {
            None if self.plans.whole => {
                push_item(answer, item, result, &mut self.created)?;
                return Ok(true);
            }
            None => return Ok(false),
            Some(plans) => plans[item.action as usize],
        };
        let action = item.action.name();
        let index = item.index.as_deref().unwrap_or_default();
        let id = item.id.as_deref();
        match result {
            Ok(_) if plan.created_is_empty() => Ok(false),
            Ok(s) if !plan.id && !plan.seq_no => {
                match &self.same {
                    Some(((append, a, i), bytes))
                        if (*append, *a) == (s.append, item.action) && **i == *index =>
                    {
                        answer.extend_from_slice(bytes)
                    }
                    _ => {
                        let mark = answer.len();
                        plan.push_created(answer, action, index, id, &s);
                        let key = (s.append, item.action, index.into());
                        self.same = Some((key, answer[mark..].to_vec()));
                    }
                }
                Ok(true)
            }
            Ok(s) => {
                plan.push_created(answer, action, index, id, &s);
                Ok(true)
            }
            Err(_) if plan.error_is_empty() => Ok(false),
            Err(e) => {
                plan.push_error(answer, action, index, id, e);
                Ok(true)
            }
        }
    }
}

/// An append, an action and an index.
type SameKey = (u32, Action, Box<str>);

/// What a filter keeps of an item's answer: the fields of a created item
/// ([`push_created`]) and of one that was not stored ([`error_answer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ItemPlan {
    index: bool,
    id: bool,
    version: bool,
    result: bool,
    /// `total`, `successful`, `failed` of `_shards`.
    shards: [bool; 3],
    seq_no: bool,
    primary_term: bool,
    status: bool,
    /// `type` and `reason` of `error`.
    error: [bool; 2],
}

impl ItemPlan {
    /// For an item whose action member the filter answers `member` to.
    fn new(f: &FilterPath, member: Member) -> Self {
        let at = match member {
            Member::Drop => return ItemPlan::all(false),
            Member::Keep => return ItemPlan::all(true),
            Member::Descend(at) => at,
        };
        fn object<const N: usize>(
            f: &FilterPath,
            at: &At,
            key: &str,
            fields: [&str; N],
        ) -> [bool; N] {
            match f.member(at, key) {
                Member::Drop => [false; N],
                Member::Keep => [true; N],
                Member::Descend(below) => fields.map(|k| f.keeps_scalar(&below, k)),
            }
        }
        let keeps = |key| f.keeps_scalar(&at, key);
        ItemPlan {
            index: keeps("_index"),
            id: keeps("_id"),
            version: keeps("_version"),
            result: keeps("result"),
            shards: object(f, &at, "_shards", ["total", "successful", "failed"]),
            seq_no: keeps("_seq_no"),
            primary_term: keeps("_primary_term"),
            status: keeps("status"),
            error: object(f, &at, "error", ["type", "reason"]),
        }
    }

    fn all(keep: bool) -> Self {
        ItemPlan {
            index: keep,
            id: keep,
            version: keep,
            result: keep,
            shards: [keep; 3],
            seq_no: keep,
            primary_term: keep,
            status: keep,
            error: [keep; 2],
        }
    }

    fn created_is_empty(&self) -> bool {
        let kept = ItemPlan {
            error: [false; 2],
            ..*self
        };
        kept == ItemPlan::all(false)
    }

    fn error_is_empty(&self) -> bool {
        !(self.index || self.id || self.status || self.error.contains(&true))
    }

    /// Appends a created item's `{"<action>":{..}}` with the fields kept,
    /// in the order of [`push_created`].
    fn push_created(
        &self,
        out: &mut Vec<u8>,
        action: &str,
        index: &str,
        id: Option<&str>,
        s: &Stored<'_>,
    ) {
        let mut num = itoa::Buffer::new();
        let first = &mut true;
        push_action(out, action);
        if self.index {
            push_key(out, first, "_index");
            push_json_str(out, index);
        }
        if self.id {
            push_key(out, first, "_id");
            push_id(out, id, s);
        }
        if self.version {
            push_key(out, first, "_version");
            out.push(b'1');
        }
        if self.result {
            push_key(out, first, "result");
            out.extend_from_slice(b"\"created\"");
        }
        if self.shards.contains(&true) {
            push_key(out, first, "_shards");
            let (total, successful) = s.shards;
            let inner = &mut true;
            for ((name, value), kept) in [
                ("total", total),
                ("successful", successful),
                ("failed", total - successful),
            ]
            .into_iter()
            .zip(self.shards)
            {
                if kept {
                    push_key(out, inner, name);
                    out.extend_from_slice(num.format(value).as_bytes());
                }
            }
            out.push(b'}');
        }
        if self.seq_no {
            push_key(out, first, "_seq_no");
            out.extend_from_slice(num.format(s.offset).as_bytes());
        }
        if self.primary_term {
            push_key(out, first, "_primary_term");
            out.push(b'1');
        }
        if self.status {
            push_key(out, first, "status");
            out.extend_from_slice(b"201");
        }
        out.extend_from_slice(b"}}");
    }

    /// Appends the `{"<action>":{..}}` of an item that was not stored,
    /// with the fields kept, in the order of [`error_answer`].
    fn push_error(
        &self,
        out: &mut Vec<u8>,
        action: &str,
        index: &str,
        id: Option<&str>,
        e: &ItemError,
    ) {
        let first = &mut true;
        push_action(out, action);
        if self.index {
            push_key(out, first, "_index");
            push_json_str(out, index);
        }
        if self.id {
            push_key(out, first, "_id");
            match id {
                Some(id) => push_json_str(out, id),
                None => out.extend_from_slice(b"null"),
            }
        }
        if self.status {
            push_key(out, first, "status");
            out.extend_from_slice(itoa::Buffer::new().format(e.status).as_bytes());
        }
        if self.error.contains(&true) {
            push_key(out, first, "error");
            let inner = &mut true;
            if self.error[0] {
                push_key(out, inner, "type");
                push_json_str(out, e.kind);
            }
            if self.error[1] {
                push_key(out, inner, "reason");
                push_json_str(out, &e.reason);
            }
            out.push(b'}');
        }
        out.extend_from_slice(b"}}");
    }
}

/// `{"<action>":`
fn push_action(out: &mut Vec<u8>, action: &str) {
    out.extend_from_slice(b"{\"");
    out.extend_from_slice(action.as_bytes());
    out.extend_from_slice(b"\":");
}

/// `{"<key>":` for an object's first member, `,"<key>":` for the others.
fn push_key(out: &mut Vec<u8>, first: &mut bool, key: &str) {
    out.push(if *first { b'{' } else { b',' });
    *first = false;
    out.push(b'"');
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
}

/// Appends a stored item's answer, byte for byte what [`ItemAnswer`]
/// serializes to, without serde's escaping of every key (most of a bulk
/// answer's cost): only the index and the id are strings that vary.
fn push_created(out: &mut Vec<u8>, action: &str, index: &str, id: Option<&str>, s: &Stored<'_>) {
    push_created_head(out, action, index);
    push_id(out, id, s);
    push_created_shards(out, s.shards);
    push_created_end(out, s.offset);
}

/// A stored item's `_id`: its own, or `<chunk>@<offset>`.
fn push_id(out: &mut Vec<u8>, id: Option<&str>, s: &Stored<'_>) {
    match id {
        Some(id) => push_json_str(out, id),
        None if plain(s.chunk) => {
            out.push(b'"');
            out.extend_from_slice(s.chunk.as_bytes());
            out.push(b'@');
            out.extend_from_slice(itoa::Buffer::new().format(s.offset).as_bytes());
            out.push(b'"');
        }
        None => push_json_str(out, &format!("{}@{}", s.chunk, s.offset)),
    }
}

/// `{"<action>":{"_index":<index>,"_id":`
fn push_created_head(out: &mut Vec<u8>, action: &str, index: &str) {
    out.extend_from_slice(b"{\"");
    out.extend_from_slice(action.as_bytes());
    out.extend_from_slice(b"\":{\"_index\":");
    push_json_str(out, index);
    out.extend_from_slice(b",\"_id\":");
}

/// `,"_version":1,"result":"created","_shards":{..},"_seq_no":`
fn push_created_shards(out: &mut Vec<u8>, (total, successful): (u64, u64)) {
    let mut num = itoa::Buffer::new();
    out.extend_from_slice(b",\"_version\":1,\"result\":\"created\",\"_shards\":{\"total\":");
    out.extend_from_slice(num.format(total).as_bytes());
    out.extend_from_slice(b",\"successful\":");
    out.extend_from_slice(num.format(successful).as_bytes());
    out.extend_from_slice(b",\"failed\":");
    out.extend_from_slice(num.format(total - successful).as_bytes());
    out.extend_from_slice(b"},\"_seq_no\":");
}

/// `<offset>,"_primary_term":1,"status":201}}`
fn push_created_end(out: &mut Vec<u8>, offset: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(offset).as_bytes());
    out.extend_from_slice(b",\"_primary_term\":1,\"status\":201}}");
}

/// The answer of a created item without an `_id` of its own, but for its
/// offset (written twice): the same for every item of one append, so it
/// is written once per append and copied.
struct CreatedAnswer {
    /// Through `"_id":"<chunk>@`.
    head: Vec<u8>,
    /// From the closing quote of the id through `"_seq_no":`.
    mid: Vec<u8>,
}

impl CreatedAnswer {
    /// For the items of `action` stored in `s.chunk`; `None` when the
    /// chunk's name must be escaped ([`push_created`] does it).
    fn new(action: &str, index: &str, s: &Stored<'_>) -> Option<Self> {
        if !plain(s.chunk) {
            return None;
        }
        let mut head = Vec::with_capacity(64);
        push_created_head(&mut head, action, index);
        head.push(b'"');
        head.extend_from_slice(s.chunk.as_bytes());
        head.push(b'@');
        let mut mid = b"\"".to_vec();
        push_created_shards(&mut mid, s.shards);
        Some(CreatedAnswer { head, mid })
    }

    fn push(&self, out: &mut Vec<u8>, offset: u64) {
        let mut num = itoa::Buffer::new();
        let offset_text = num.format(offset).as_bytes();
        out.extend_from_slice(&self.head);
        out.extend_from_slice(offset_text);
        out.extend_from_slice(&self.mid);
        out.extend_from_slice(offset_text);
        out.extend_from_slice(b",\"_primary_term\":1,\"status\":201}}");
    }
}

/// True when JSON writes `s` as it is between quotes (serde_json escapes
/// only `"`, `\\` and control characters).
fn plain(s: &str) -> bool {
    !s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\')
}

/// One item of a bulk answer, as Elasticsearch writes it.
#[derive(Serialize)]
struct ItemAnswer<'a> {
    #[serde(rename = "_index")]
    index: &'a str,
    #[serde(rename = "_id")]
    id: Option<&'a str>,
    #[serde(rename = "_version", skip_serializing_if = "Option::is_none")]
    version: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'static str>,
    #[serde(rename = "_shards", skip_serializing_if = "Option::is_none")]
    shards: Option<Shards>,
    #[serde(rename = "_seq_no", skip_serializing_if = "Option::is_none")]
    seq_no: Option<u64>,
    #[serde(rename = "_primary_term", skip_serializing_if = "Option::is_none")]
    primary_term: Option<u64>,
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorAnswer<'a>>,
}

#[derive(Serialize)]
struct Shards {
    total: u64,
    successful: u64,
    failed: u64,
}

#[derive(Serialize)]
struct ErrorAnswer<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    reason: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_items_are_written_as_serde_writes_them() {
        let stored = Stored {
            append: 0,
            chunk: "eu1-chunk000000042",
            offset: 123_456,
            shards: (3, 2),
        };
        for id in [
            None,
            Some("plain-id"),
            Some("quote\" back\\slash\nnewline\u{1} é ✓"),
            Some(""),
        ] {
            for index in ["app", "web.logs-2026"] {
                let mut mine = Vec::new();
                push_created(&mut mine, "create", index, id, &stored);
                if id.is_none() {
                    let mut copied = Vec::new();
                    let template = CreatedAnswer::new("create", index, &stored).unwrap();
                    template.push(&mut copied, stored.offset);
                    assert_eq!(copied, mine);
                }
                let generated = format!("{}@{}", stored.chunk, stored.offset);
                let body = ItemAnswer {
                    index,
                    id: Some(id.unwrap_or(&generated)),
                    version: Some(1),
                    result: Some("created"),
                    shards: Some(Shards {
                        total: 3,
                        successful: 2,
                        failed: 1,
                    }),
                    seq_no: Some(123_456),
                    primary_term: Some(1),
                    status: 201,
                    error: None,
                };
                let mut want = b"{\"create\":".to_vec();
                serde_json::to_writer(&mut want, &body).unwrap();
                want.push(b'}');
                assert_eq!(
                    String::from_utf8(mine).unwrap(),
                    String::from_utf8(want).unwrap()
                );
            }
        }
    }

    /// A request of every kind of item: stored with and without ids in
    /// two appends, refused by the parse, in an append that failed, not
    /// stored, and an action that stores nothing.
    fn answered_items() -> (Vec<Item>, Vec<(u32, u64)>, Vec<Outcome>) {
        let item = |action, index: &str, id: Option<&str>, doc| Item {
            action,
            index: Some(index.into()),
            id: id.map(str::to_owned),
            doc,
            claimed: None,
        };
        let bad = item_error(400, "mapper_parsing_exception", "not JSON: \"x\"");
        let items = vec![
            item(Action::Index, "app", None, Ok(())),
            item(Action::Index, "app", None, Ok(())),
            item(Action::Create, "app", Some("id-1"), Ok(())),
            item(Action::Create, "web", None, Ok(())),
            item(Action::Index, "app", None, Err(bad)),
            item(Action::Index, "gone", None, Ok(())),
            item(Action::Index, "app", None, Ok(())),
            item(
                Action::Delete,
                "app",
                Some("7"),
                Err(item_error(400, "action_request_validation_exception", "no")),
            ),
        ];
        let place = vec![
            (0, 10),
            (0, 72),
            (0, 134),
            (1, 0),
            (NONE, 0),
            (2, 0),
            (NONE, 0),
            (NONE, 0),
        ];
        let outcomes = vec![
            Ok(("n1-chunk000000001".to_owned(), (2, 2))),
            Ok(("n1-chunk000000002".to_owned(), (2, 1))),
            Err(item_error(429, "es_rejected_execution_exception", "busy")),
        ];
        (items, place, outcomes)
    }

    #[test]
    fn a_filtered_answer_is_the_answer_with_the_filter_applied() {
        let (items, place, outcomes) = answered_items();
        let whole = bulk_answer(&items, &place, &outcomes, None, 5).unwrap();
        let whole: Value = serde_json::from_slice(&whole).unwrap();
        assert_eq!(whole["items"].as_array().unwrap().len(), items.len());
        for filter in [
            "errors,items.*.error,items.*.status",
            "errors,items.*.error,items.*.status,items.*.failure_store",
            "items.*._index,items.*.status,items.*.failure_store,items.*.error.type,items.*.error.reason",
            "errors,took,items.*.error,items.*.status,items.*._index,items.*._id",
            "items.*.error",
            "items.create",
            "items.index._shards.failed,items.*._seq_no",
            "items.*._shards",
            "-items.*._index,-took",
            "items.**,-items.*.error.reason,-items.*._shards.total",
            "**.status",
            "**.type",
            "errors",
            "took",
            "items",
            "*",
            "nothing",
            "items.*.status.deeper",
        ] {
            let f = FilterPath::parse(filter).unwrap().unwrap();
            let got = bulk_answer(&items, &place, &outcomes, Some(&BulkPlans::new(&f)), 5).unwrap();
            let got: Value =
                serde_json::from_slice(&got).unwrap_or_else(|e| panic!("{filter}: not JSON ({e})"));
            assert_eq!(got, f.answer(&whole), "{filter}");
        }
    }

    #[test]
    fn the_plans_of_the_last_filter_are_kept_for_the_next_request() {
        let filebeat = "errors,items.*.error,items.*.status";
        let otel = "items.*._index,items.*.status,items.*.error.type,items.*.error.reason";
        for s in [filebeat, otel, otel, filebeat, "", filebeat] {
            let want = FilterPath::parse(s).unwrap().map(|f| BulkPlans::new(&f));
            assert_eq!(BulkPlans::of(s).unwrap(), want, "{s:?}");
        }
        assert!(BulkPlans::of(&vec!["a"; 33].join(",")).is_err());
        assert!(BulkPlans::of(filebeat).unwrap().is_some());
    }

    #[test]
    fn agents_filters_leave_one_status_per_item() {
        let (items, place, outcomes) = answered_items();
        let f = FilterPath::parse("errors,items.*.error,items.*.status")
            .unwrap()
            .unwrap();
        let got = bulk_answer(&items, &place, &outcomes, Some(&BulkPlans::new(&f)), 5).unwrap();
        let got: Value = serde_json::from_slice(&got).unwrap();
        let statuses: Vec<_> = got["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                let (_, body) = i.as_object().unwrap().iter().next().unwrap();
                assert_eq!(body.get("error").is_some(), body["status"] != 201, "{i}");
                body["status"].as_u64().unwrap()
            })
            .collect();
        assert_eq!(statuses, [201, 201, 201, 201, 400, 429, 500, 400]);
        assert_eq!(got["errors"], json!(true));
    }

    /// Each item's stored line, or its error.
    fn ok((items, batches): &(Vec<Item>, Batches)) -> Vec<String> {
        let mut lines: std::collections::HashMap<usize, String> = batches
            .numbered_lines()
            .map(|(n, category, line)| {
                assert_eq!(items[n].index.as_deref(), Some(category));
                (n, String::from_utf8(line.to_vec()).unwrap())
            })
            .collect();
        let answers = items
            .iter()
            .enumerate()
            .map(|(n, i)| match &i.doc {
                Ok(()) => lines.remove(&n).expect("a stored item has its line"),
                Err(e) => format!("{} {}", e.status, e.kind),
            })
            .collect();
        assert!(lines.is_empty(), "lines of items with errors: {lines:?}");
        answers
    }

    #[test]
    fn parses_actions_and_documents_as_compact_lines() {
        let body = b"{\"index\":{\"_index\":\"app\"}}\n{ \"msg\" : \"a b\\\" \\\\\" , \"n\": 1.50 }\r\n\n{\"create\":{\"_id\":\"x1\"}}\n{\"k\":[1, 2, {\"y\" :null}]}\n{\"delete\":{\"_index\":\"app\",\"_id\":\"1\"}}\n{\"update\":{\"_id\":\"1\"}}\n{\"doc\":{}}\n{\"index\":{}}\n[1]\n";
        let parsed = parse_bulk(body, Some("dflt"), 1 << 20).unwrap();
        let items = &parsed.0;
        assert_eq!(
            ok(&parsed),
            [
                r#"{"msg":"a b\" \\","n":1.50}"#,
                r#"{"k":[1,2,{"y":null}]}"#,
                "400 illegal_argument_exception",
                "400 illegal_argument_exception",
                "400 document_parsing_exception",
            ]
        );
        assert_eq!(items[0].index.as_deref(), Some("app"));
        assert_eq!(items[1].index.as_deref(), Some("dflt"));
        assert_eq!(items[1].id.as_deref(), Some("x1"));
        assert_eq!(
            items.iter().map(|i| i.action).collect::<Vec<_>>(),
            [
                Action::Index,
                Action::Create,
                Action::Delete,
                Action::Update,
                Action::Index
            ]
        );
        // A document over two lines leaves its second line to be read as
        // an action, which is malformed.
        let body = b"{\"index\":{}}\n{\"a\":\n1}\n";
        assert!(parse_bulk(body, Some("dflt"), 1 << 20).is_err());
    }

    #[test]
    fn refuses_what_is_not_a_bulk_request_whole() {
        for (body, why) in [
            (&b"{\"index\":{}}\n"[..], "not followed by its document"),
            (b"{\"index\":{}}\n\n", "not followed by its document"),
            (b"not json\n{}\n", "Malformed action/metadata line [1]"),
            (b"{\"upsert\":{}}\n{}\n", "unknown field `upsert`"),
            (b"{\"index\":{},\"create\":{}}\n{}\n", "exactly one action"),
            (b"{}\n", "exactly one action"),
            (b"{\"index\":{\"_index\":5}}\n{}\n", "Malformed"),
        ] {
            let Err(BulkRefusal::Malformed(err)) = parse_bulk(body, Some("a"), 1 << 20) else {
                panic!("{:?} is not refused", String::from_utf8_lossy(body));
            };
            assert!(
                err.contains(why),
                "{err:?} for {:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn a_body_of_too_many_actions_is_refused_whole() {
        let body = "{\"delete\":{}}\n".repeat(MAX_ACTIONS);
        assert_eq!(
            parse_bulk(body.as_bytes(), Some("a"), 10).unwrap().0.len(),
            MAX_ACTIONS
        );
        let more = body + "\n{\"delete\":{}}\n";
        assert_eq!(
            parse_bulk(more.as_bytes(), Some("a"), 10).err(),
            Some(BulkRefusal::TooManyActions)
        );
    }

    #[test]
    fn a_document_that_is_not_utf8_is_not_stored() {
        let body = b"{\"index\":{\"_index\":\"a\"}}\n{\"k\":\"\xff\xfe\"}\n{\"index\":{\"_index\":\"a\"}}\n{\"k\":\"\xc3\xa9\"}\n";
        let parsed = parse_bulk(body, None, 1 << 20).unwrap();
        assert_eq!(
            ok(&parsed),
            ["400 document_parsing_exception", "{\"k\":\"\u{e9}\"}"]
        );
    }

    #[test]
    fn item_errors_name_their_cause() {
        let body = b"{\"index\":{}}\n{\"a\":1}\n{\"index\":{\"_index\":\"Bad Name\"}}\n{\"a\":1}\n{\"index\":{\"_index\":\"ok\"}}\n{\"a\":\"0123456789\"}\n{\"index\":{\"_index\":\"ok\"}}\n{\"a\":1\n";
        let parsed = parse_bulk(body, None, 12).unwrap();
        assert_eq!(
            ok(&parsed),
            [
                "400 action_request_validation_exception",
                "400 invalid_index_name_exception",
                "413 illegal_argument_exception",
                "400 document_parsing_exception",
            ]
        );
    }

    #[test]
    fn a_repeated_action_line_is_read_once_and_means_the_same() {
        let body = concat!(
            "{\"index\":{\"_index\":\"a\"}}\n{\"n\":1}\n",
            "{\"index\":{\"_index\":\"a\"}}\n{\"n\":2}\n",
            "{\"index\":{\"_index\":\"Bad Name\"}}\n{\"n\":3}\n",
            "{\"index\":{\"_index\":\"Bad Name\"}}\n{\"n\":4}\n",
            "{\"create\":{\"_index\":\"b\",\"_id\":\"7\"}}\n{\"n\":5}\n",
            "{\"create\":{\"_index\":\"b\",\"_id\":\"7\"}}\n{\"n\":6}\n",
            "{\"index\":{\"_index\":\"a\"}}\n{\"n\":7}\n",
            "{\"index\":{}}\n{\"n\":8}\n",
        );
        let parsed = parse_bulk(body.as_bytes(), Some("p"), 1 << 20).unwrap();
        assert_eq!(
            ok(&parsed),
            [
                r#"{"n":1}"#,
                r#"{"n":2}"#,
                "400 invalid_index_name_exception",
                "400 invalid_index_name_exception",
                r#"{"n":5}"#,
                r#"{"n":6}"#,
                r#"{"n":7}"#,
                r#"{"n":8}"#,
            ]
        );
        let of = |i: &Item| {
            (
                i.action,
                i.index.as_deref().map(str::to_owned),
                i.id.clone(),
            )
        };
        let items: Vec<_> = parsed.0.iter().map(of).collect();
        let s = |v: &str| Some(v.to_owned());
        assert_eq!(
            items,
            [
                (Action::Index, s("a"), None),
                (Action::Index, s("a"), None),
                (Action::Index, s("Bad Name"), None),
                (Action::Index, s("Bad Name"), None),
                (Action::Create, s("b"), s("7")),
                (Action::Create, s("b"), s("7")),
                (Action::Index, s("a"), None),
                (Action::Index, s("p"), None),
            ]
        );
    }

    #[test]
    fn only_admitted_documents_are_written() {
        let body = concat!(
            "{\"index\":{\"_index\":\"open\"}}\n{\"n\":1}\n",
            "{\"index\":{\"_index\":\"closed\"}}\n{\"n\":2}\n",
            "{\"create\":{\"_index\":\"open\",\"_id\":\"x\"}}\n{\"n\":3}\n",
            "{\"create\":{\"_index\":\"open\",\"_id\":\"x\"}}\n{\"n\":4}\n",
            "{\"create\":{\"_index\":\"open\",\"_id\":\"y\"}}\nnot json\n",
        );
        let ids = CreatedIds::default();
        let mut asked = Vec::new();
        let mut admit = |action: Action, index: &str, id: Option<&str>| {
            asked.push((action, index.to_owned(), id.map(str::to_owned)));
            if index == "closed" {
                return Err(item_error(403, "security_exception", "no"));
            }
            let Some(id) = id else { return Ok(None) };
            let key = ids.key(index, id);
            if ids.claim(key) {
                Ok(Some(key))
            } else {
                Err(item_error(
                    409,
                    "version_conflict_engine_exception",
                    "again",
                ))
            }
        };
        let mut batches = Batches::default();
        let items =
            parse_bulk_into(body.as_bytes(), None, 1 << 20, &mut admit, &mut batches).unwrap();
        // Asked only for valid documents, in order.
        assert_eq!(asked.len(), 4);
        assert_eq!(
            ok(&(items.clone(), batches)),
            [
                r#"{"n":1}"#,
                "403 security_exception",
                r#"{"n":3}"#,
                "409 version_conflict_engine_exception",
                "400 document_parsing_exception",
            ]
        );
        assert_eq!(items[2].claimed, Some(ids.key("open", "x")));
        assert!(
            items
                .iter()
                .enumerate()
                .all(|(n, i)| (n == 2) == i.claimed.is_some())
        );
    }

    #[test]
    fn created_ids_are_kept_up_to_the_bound() {
        let ids = CreatedIds::default();
        let a = ids.key("c", "1");
        assert_ne!(a, ids.key("d", "1"), "per category");
        assert!(ids.claim(a));
        assert!(!ids.claim(a));
        ids.release(a);
        assert!(ids.claim(a), "released when not stored");
        for i in 0..KEPT_IDS {
            assert!(ids.claim(ids.key("c", &format!("n{i}"))));
        }
        assert!(ids.claim(a), "the oldest is forgotten past the bound");
        assert_eq!(ids.kept.lock().unwrap().0.len(), KEPT_IDS);
    }
}
