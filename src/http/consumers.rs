//! Consumer routes: `next`, `acks`, `position`, list, detail, delete.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chunkbus_client::names::{validate_category, validate_consumer};
use chunkbus_client::raw::{HEADER_CHUNK, HEADER_NEXT_OFFSET, HEADER_OFFSET};
use chunkbus_client::{
    AckRequest, ChunkName, ChunkPosition, ConsumerDetail, ConsumerSummary, PositionRequest,
};
use serde::Deserialize;

use super::read::{parse_max_bytes, parse_wait};
use super::{ApiError, AppState};
use crate::consumers::{
    ConsumerEntry, Position, chunks_by_owner, lag_bytes, next_unread, position_after,
};
use crate::storage::StorageError;

type ConsumerPath = Result<Path<(String, String)>, PathRejection>;

fn names(path: ConsumerPath) -> Result<(String, String), ApiError> {
    let Path((category, consumer)) = path?;
    validate_category(&category)?;
    validate_consumer(&consumer)?;
    Ok((category, consumer))
}

/// The detail answer for `entry` as seen from this node's chunks.
pub(super) fn detail(st: &AppState, category: &str, entry: &ConsumerEntry) -> ConsumerDetail {
    let by_owner = chunks_by_owner(&st.storage, category);
    let lag = by_owner
        .iter()
        .map(|(owner, chunks)| lag_bytes(entry.positions.get(owner), chunks))
        .sum();
    ConsumerDetail {
        positions: entry
            .positions
            .iter()
            .map(|(owner, p)| {
                (
                    owner.clone(),
                    ChunkPosition {
                        chunk: ChunkName::new(owner.clone(), p.index).to_string(),
                        offset: p.offset,
                    },
                )
            })
            .collect(),
        lag_bytes: lag,
        generation: entry.generation(),
    }
}

fn unknown(category: &str, consumer: &str) -> ApiError {
    ApiError::NotFound(format!(
        "consumer {consumer:?} of category {category:?} has no position (it never acked, or was deleted)"
    ))
}

/// `GET /v1/categories/{category}/consumers`.
pub(super) async fn list(
    State(st): State<Arc<AppState>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Vec<ConsumerSummary>>, ApiError> {
    let Path(category) = path?;
    validate_category(&category)?;
    let out = st
        .consumers
        .list(&category)
        .into_iter()
        .map(|(name, entry)| ConsumerSummary {
            lag_bytes: detail(&st, &category, &entry).lag_bytes,
            name,
        })
        .collect();
    Ok(Json(out))
}

/// `GET /v1/categories/{category}/consumers/{consumer}`.
pub(super) async fn get(
    State(st): State<Arc<AppState>>,
    path: ConsumerPath,
) -> Result<Json<ConsumerDetail>, ApiError> {
    let (category, consumer) = names(path)?;
    match st.consumers.get(&category, &consumer) {
        Some(e) if e.is_live() => Ok(Json(detail(&st, &category, &e))),
        _ => Err(unknown(&category, &consumer)),
    }
}

/// `DELETE /v1/categories/{category}/consumers/{consumer}`.
pub(super) async fn delete(
    State(st): State<Arc<AppState>>,
    path: ConsumerPath,
) -> Result<StatusCode, ApiError> {
    let (category, consumer) = names(path)?;
    if !st
        .consumers
        .get(&category, &consumer)
        .is_some_and(|e| e.is_live())
    {
        return Err(unknown(&category, &consumer));
    }
    st.consumers
        .update(&category, &consumer, ConsumerEntry::delete)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/categories/{category}/consumers/{consumer}/acks`.
pub(super) async fn ack(
    State(st): State<Arc<AppState>>,
    path: ConsumerPath,
    body: Result<Json<AckRequest>, JsonRejection>,
) -> Result<Json<ConsumerDetail>, ApiError> {
    let (category, consumer) = names(path)?;
    let Json(req) = body.map_err(|e| {
        ApiError::BadRequest(format!(
            "the ack must be JSON like {{\"chunk\": \"eu1-chunk000000042\", \"offset\": 4096}}: {}",
            e.body_text()
        ))
    })?;
    let chunk = ChunkName::parse(&req.chunk)?;
    let entry = ack_chunk(&st, &category, &consumer, &chunk, req.offset).await?;
    Ok(Json(detail(&st, &category, &entry)))
}

/// Moves `consumer` past `chunk` up to `offset`, which must be a line
/// boundary of data this node holds.
pub(super) async fn ack_chunk(
    st: &AppState,
    category: &str,
    consumer: &str,
    chunk: &ChunkName,
    offset: u64,
) -> Result<ConsumerEntry, ApiError> {
    let meta = st
        .storage
        .check_boundary(category, chunk, offset)
        .await
        .map_err(|e| match e {
            StorageError::UnknownCategory(_) | StorageError::UnknownChunk { .. } => ApiError::BadRequest(format!(
                "chunk {chunk} of category {category:?} is not held by this node; ack where you read it, or once it has replicated"
            )),
            StorageError::OffsetPastEnd { .. } => ApiError::BadRequest(e.to_string()),
            e => e.into(),
        })?;
    Ok(st
        .consumers
        .update(category, consumer, |e| {
            let p = position_after(e.generation(), chunk, offset, meta.size, meta.complete);
            e.raise(&chunk.owner, p)
        })
        .await?)
}

/// `PUT /v1/categories/{category}/consumers/{consumer}/position`:
/// `{"to": "earliest"}` rewinds, `{"to": "latest"}` skips to the end.
pub(super) async fn set_position(
    State(st): State<Arc<AppState>>,
    path: ConsumerPath,
    body: Result<Json<PositionRequest>, JsonRejection>,
) -> Result<Json<ConsumerDetail>, ApiError> {
    let (category, consumer) = names(path)?;
    let Json(req) = body.map_err(|e| {
        ApiError::BadRequest(format!(
            "the body must be {{\"to\": \"earliest\"}} or {{\"to\": \"latest\"}}: {}",
            e.body_text()
        ))
    })?;
    let latest = match req.to.as_str() {
        "earliest" => false,
        "latest" => true,
        other => {
            return Err(ApiError::BadRequest(format!(
                "\"to\": {other:?} must be \"earliest\" or \"latest\""
            )));
        }
    };
    let entry = move_all(&st, &category, &consumer, latest, true).await?;
    Ok(Json(detail(&st, &category, &entry)))
}

/// Sets every owner's position to the start (or the end) of what this node
/// holds, in a new generation when `rewind`.
async fn move_all(
    st: &AppState,
    category: &str,
    consumer: &str,
    latest: bool,
    rewind: bool,
) -> Result<ConsumerEntry, ApiError> {
    let by_owner = chunks_by_owner(&st.storage, category);
    Ok(st
        .consumers
        .update(category, consumer, |e| {
            let generation = if rewind {
                e.generation() + 1
            } else {
                e.generation()
            };
            let mut changed = false;
            for (owner, chunks) in &by_owner {
                let p = match (latest, chunks.first(), chunks.last()) {
                    (false, Some(first), _) => Position {
                        generation,
                        index: first.name.index,
                        offset: 0,
                    },
                    (true, _, Some(last)) => position_after(
                        generation,
                        &last.name,
                        last.meta.size,
                        last.meta.size,
                        last.meta.complete,
                    ),
                    _ => continue,
                };
                changed |= e.raise(owner, p);
            }
            changed
        })
        .await?)
}

#[derive(Debug, Deserialize)]
pub(super) struct NextQuery {
    max_bytes: Option<String>,
    wait: Option<String>,
    start: Option<String>,
    /// `<chunk>:<offset>`: read as if that were acked already (without
    /// storing it), so a client can fetch the next batch while it still
    /// processes the previous one.
    after: Option<String>,
}

/// `GET /v1/categories/{category}/consumers/{consumer}/next`: the next
/// unacknowledged lines, from the owner whose oldest unread chunk is oldest;
/// 204 when there is nothing within `wait`. The same lines come back until
/// they are acked.
pub(super) async fn next(
    State(st): State<Arc<AppState>>,
    path: ConsumerPath,
    query: Result<Query<NextQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let (category, consumer) = names(path)?;
    let Query(q) = query?;
    let max_bytes = parse_max_bytes("max_bytes", q.max_bytes.as_deref())?;
    let wait = parse_wait(q.wait.as_deref())?;
    let start_latest = match q.start.as_deref() {
        None | Some("earliest") => false,
        Some("latest") => true,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "query parameter start={other:?} must be earliest or latest"
            )));
        }
    };
    let after = q
        .after
        .as_deref()
        .map(|a| {
            let (chunk, offset) = a.rsplit_once(':').ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "query parameter after={a:?} must be <chunk>:<offset>"
                ))
            })?;
            let offset = offset.parse::<u64>().map_err(|_| {
                ApiError::BadRequest(format!(
                    "query parameter after={a:?}: the offset is not a number"
                ))
            })?;
            Ok::<_, ApiError>((ChunkName::parse(chunk)?, offset))
        })
        .transpose()?;
    let deadline = tokio::time::Instant::now() + wait;
    let mut changes = st.storage.subscribe_feed();
    loop {
        changes.borrow_and_update();
        let mut entry = st.consumers.get(&category, &consumer).unwrap_or_default();
        if start_latest && !entry.is_live() {
            entry = move_all(&st, &category, &consumer, true, false).await?;
        }
        if let Some((chunk, offset)) = &after
            && let Some(meta) = st.storage.chunk_meta(&category, chunk)
        {
            let p = position_after(entry.generation(), chunk, *offset, meta.size, meta.complete);
            entry.raise(&chunk.owner, p);
        }
        let pick = chunks_by_owner(&st.storage, &category)
            .iter()
            .filter_map(|(owner, chunks)| next_unread(entry.positions.get(owner), chunks))
            .min_by_key(|(c, _)| (c.meta.created_ms, c.name.clone()));
        if let Some((chunk, offset)) = pick {
            let r = st
                .storage
                .read(
                    &category,
                    &chunk.name,
                    offset,
                    max_bytes,
                    Duration::ZERO,
                    &st.shutdown,
                )
                .await?;
            let mut resp = (StatusCode::OK, Body::from(r.data)).into_response();
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/x-ndjson"),
            );
            h.insert(
                HEADER_CHUNK,
                HeaderValue::from_str(&chunk.name.to_string()).expect("chunk names are ASCII"),
            );
            h.insert(HEADER_OFFSET, HeaderValue::from(offset));
            h.insert(HEADER_NEXT_OFFSET, HeaderValue::from(r.next_offset));
            return Ok(resp);
        }
        if tokio::time::Instant::now() >= deadline || st.shutdown.is_cancelled() {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        st.metrics.read_waiters.inc();
        tokio::select! {
            _ = changes.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = st.shutdown.cancelled() => {}
        }
        st.metrics.read_waiters.dec();
    }
}
