//! Consumer routes: `next`, `acks`, `position`, list, detail, delete.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chunkbus_client::names::{validate_category, validate_consumer};
use chunkbus_client::raw::{HEADER_CHUNK, HEADER_NEXT_OFFSET, HEADER_OFFSET};
use chunkbus_client::{AckRequest, ChunkName, ConsumerDetail, ConsumerSummary, PositionRequest};
use serde::Deserialize;

use super::read::{parse_max_bytes, parse_wait};
use super::{ApiError, AppState};
use crate::consumers::{ConsumerEntry, NextOptions};

type ConsumerPath = Result<Path<(String, String)>, PathRejection>;

fn names(path: ConsumerPath) -> Result<(String, String), ApiError> {
    let Path((category, consumer)) = path?;
    validate_category(&category)?;
    validate_consumer(&consumer)?;
    Ok((category, consumer))
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
            lag_bytes: st.consumers.detail(&category, &entry).lag_bytes,
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
        Some(e) if e.is_live() => Ok(Json(st.consumers.detail(&category, &e))),
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
    let entry = st
        .consumers
        .ack(&category, &consumer, &chunk, req.offset)
        .await?;
    Ok(Json(st.consumers.detail(&category, &entry)))
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
    let entry = st
        .consumers
        .move_all(&category, &consumer, latest, true)
        .await?;
    Ok(Json(st.consumers.detail(&category, &entry)))
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
    let opts = NextOptions {
        max_bytes,
        wait,
        start_latest,
        after,
    };
    let Some(lines) = st
        .consumers
        .next(
            &category,
            &consumer,
            &opts,
            &st.metrics.read_waiters,
            &st.shutdown,
        )
        .await?
    else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let mut resp = (StatusCode::OK, Body::from(lines.data)).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    h.insert(
        HEADER_CHUNK,
        HeaderValue::from_str(&lines.chunk.to_string()).expect("chunk names are ASCII"),
    );
    h.insert(HEADER_OFFSET, HeaderValue::from(lines.offset));
    h.insert(HEADER_NEXT_OFFSET, HeaderValue::from(lines.next_offset));
    Ok(resp)
}
