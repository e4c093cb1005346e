//! Read routes: categories, chunk lists, chunk contents.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chunkbus_client::names::{validate_category, validate_node};
use chunkbus_client::raw::{
    HEADER_CHUNK_SIZE, HEADER_COMPLETE, HEADER_INCARNATION, HEADER_NEXT_OFFSET,
};
use chunkbus_client::{ChunkInfo, ChunkName};
use serde::Deserialize;

use super::params::{parse_duration, parse_u64};
use super::{ApiError, AppState};
use crate::storage::{ChunkStatus, ReadResult, StorageError};

/// `max_bytes` when the request does not say.
pub const DEFAULT_READ_MAX_BYTES: u64 = 1 << 20;
/// Largest `max_bytes` accepted.
pub const MAX_READ_MAX_BYTES: u64 = 16 << 20;
/// Longest `wait=` accepted.
pub const MAX_READ_WAIT: Duration = Duration::from_secs(300);

/// `GET /v1/categories` and `/listCategories`: sorted names.
pub(super) async fn categories(
    State(st): State<Arc<AppState>>,
    principal: Option<axum::Extension<crate::auth::Principal>>,
) -> Json<Vec<String>> {
    // A token limited to some categories sees only those.
    let mut names = st.storage.categories();
    if let Some(axum::Extension(p)) = principal {
        names.retain(|c| p.may_see(c));
    }
    Json(names)
}

/// The chunks of a category; an unknown category has none.
pub(super) fn list(st: &AppState, category: &str) -> Result<Vec<ChunkStatus>, ApiError> {
    validate_category(category)?;
    match st.storage.chunks(category) {
        Ok(list) => Ok(list),
        Err(StorageError::UnknownCategory(_)) => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct ChunksQuery {
    owner: Option<String>,
    after: Option<String>,
    limit: Option<String>,
}

/// `GET /v1/categories/{category}/chunks?owner=&after=&limit=`.
pub(super) async fn chunks(
    State(st): State<Arc<AppState>>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<ChunksQuery>, QueryRejection>,
) -> Result<Json<Vec<ChunkInfo>>, ApiError> {
    let Path(category) = path?;
    let Query(q) = query?;
    if let Some(owner) = &q.owner {
        validate_node(owner)?;
    }
    let after = q.after.as_deref().map(ChunkName::parse).transpose()?;
    let limit = q
        .limit
        .as_deref()
        .map(|v| parse_u64("limit", v))
        .transpose()?
        .unwrap_or(u64::MAX);
    let out = list(&st, &category)?
        .into_iter()
        .filter(|c| q.owner.as_ref().is_none_or(|o| *o == c.name.owner))
        .filter(|c| after.as_ref().is_none_or(|a| c.name > *a))
        .take(usize::try_from(limit).unwrap_or(usize::MAX))
        .map(|c| ChunkInfo {
            name: c.name.to_string(),
            owner: c.name.owner,
            index: c.name.index,
            size: c.meta.size,
            complete: c.meta.complete,
            local: c.meta.local,
            uploaded: c.meta.uploaded,
            first_line: c.meta.first_line,
            lines: c.meta.lines,
        })
        .collect();
    Ok(Json(out))
}

#[derive(Debug, Deserialize)]
pub(super) struct ReadQuery {
    offset: Option<String>,
    max_bytes: Option<String>,
    wait: Option<String>,
}

/// Parses `max_bytes` (named `name` in messages): 1 byte to 16 MiB.
pub(super) fn parse_max_bytes(name: &str, v: Option<&str>) -> Result<u64, ApiError> {
    let n = v
        .map(|v| parse_u64(name, v))
        .transpose()?
        .unwrap_or(DEFAULT_READ_MAX_BYTES);
    if n == 0 || n > MAX_READ_MAX_BYTES {
        return Err(ApiError::BadRequest(format!(
            "query parameter {name}={n} must be between 1 and {MAX_READ_MAX_BYTES} (16 MiB)"
        )));
    }
    Ok(n)
}

/// Parses a long poll's `wait` (none: do not wait), at most [`MAX_READ_WAIT`].
pub(super) fn parse_wait(v: Option<&str>) -> Result<Duration, ApiError> {
    v.map(|v| parse_duration("wait", v, MAX_READ_WAIT))
        .transpose()
        .map(|w| w.unwrap_or(Duration::ZERO))
}

/// `GET /v1/categories/{category}/chunks/{chunk}?offset=&max_bytes=&wait=`.
pub(super) async fn read_chunk(
    State(st): State<Arc<AppState>>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<ReadQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path((category, chunk)) = path?;
    let Query(q) = query?;
    validate_category(&category)?;
    let chunk = ChunkName::parse(&chunk)?;
    let offset = q
        .offset
        .as_deref()
        .map(|v| parse_u64("offset", v))
        .transpose()?
        .unwrap_or(0);
    let max_bytes = parse_max_bytes("max_bytes", q.max_bytes.as_deref())?;
    let wait = parse_wait(q.wait.as_deref())?;
    let r = read(&st, &category, &chunk, offset, max_bytes, wait).await?;
    Ok(chunk_response(r, st.storage.incarnation()))
}

/// Reads with 404 for a category this node does not hold.
pub(super) async fn read(
    st: &AppState,
    category: &str,
    chunk: &ChunkName,
    offset: u64,
    max_bytes: u64,
    wait: Duration,
) -> Result<ReadResult, ApiError> {
    st.storage
        .read(category, chunk, offset, max_bytes, wait, &st.shutdown)
        .await
        .map_err(|e| match e {
            StorageError::UnknownCategory(_) => ApiError::NotFound(format!(
                "chunk {chunk} of category {category:?} does not exist on this node"
            )),
            e => e.into(),
        })
}

/// 200 with the lines and the `Chunkbus-*` headers; `incarnation`: this
/// process's, which read them.
pub(super) fn chunk_response(r: ReadResult, incarnation: u64) -> Response {
    let mut resp = (StatusCode::OK, Body::from(r.data)).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    h.insert(HEADER_NEXT_OFFSET, HeaderValue::from(r.next_offset));
    h.insert(
        HEADER_COMPLETE,
        HeaderValue::from_static(if r.meta.complete { "true" } else { "false" }),
    );
    h.insert(HEADER_CHUNK_SIZE, HeaderValue::from(r.meta.size));
    h.insert(HEADER_INCARNATION, HeaderValue::from(incarnation));
    resp
}
