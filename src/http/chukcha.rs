//! Chukcha-compatible routes, for users moving from Chukcha and its Go
//! client: `/write`, `/read`, `/listChunks`, `/listCategories`.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::Response;
use chunkbus_client::{ChukchaChunk, ChunkName};
use serde::Deserialize;

use super::params::parse_u64;
use super::produce::{WriteOptions, ingest};
use super::read::{chunk_response, list, parse_max_bytes, read as read_lines};
use super::{ApiError, AppState};
use crate::storage::ReadResult;

/// Chukcha waits this long for `min_sync_replicas`.
const CHUKCHA_REPLICA_TIMEOUT: Duration = Duration::from_secs(60);

/// The `category` parameter, present and valid.
fn category(v: &Option<String>) -> Result<&str, ApiError> {
    let category = required("category", v)?;
    chunkbus_client::names::validate_category(category)?;
    Ok(category)
}

fn required<'a>(name: &str, v: &'a Option<String>) -> Result<&'a str, ApiError> {
    v.as_deref()
        .ok_or_else(|| ApiError::BadRequest(format!("query parameter {name} is required")))
}

#[derive(Debug, Deserialize)]
pub(super) struct WriteQuery {
    category: Option<String>,
    min_sync_replicas: Option<String>,
}

/// `POST /write?category=C[&min_sync_replicas=N]`.
pub(super) async fn write(
    State(st): State<Arc<AppState>>,
    query: Result<Query<WriteQuery>, QueryRejection>,
    req: axum::extract::Request,
) -> Result<super::produce::Produced, ApiError> {
    let (parts, body) = req.into_parts();
    let Query(q) = query?;
    let category = category(&q.category)?;
    let min_replicas = q
        .min_sync_replicas
        .as_deref()
        .map(|v| parse_u64("min_sync_replicas", v))
        .transpose()?
        .unwrap_or(0);
    let opts = WriteOptions {
        sync: None,
        min_replicas,
        timeout: CHUKCHA_REPLICA_TIMEOUT,
    };
    ingest(&st, category, &parts.headers, body, opts)
        .await
        .map(super::produce::Produced)
}

#[derive(Debug, Deserialize)]
pub(super) struct ReadQuery {
    category: Option<String>,
    chunk: Option<String>,
    off: Option<String>,
    max_size: Option<String>,
}

/// `GET /read?category=C&chunk=K&off=O&max_size=M`: whole lines, 404 for a
/// chunk this node does not hold (yet), 200 and nothing for an offset past
/// this node's copy of a chunk that is not complete here.
pub(super) async fn read(
    State(st): State<Arc<AppState>>,
    query: Result<Query<ReadQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query?;
    let category = category(&q.category)?;
    let chunk = ChunkName::parse(required("chunk", &q.chunk)?)?;
    let off = q
        .off
        .as_deref()
        .map(|v| parse_u64("off", v))
        .transpose()?
        .unwrap_or(0);
    let max = parse_max_bytes("max_size", q.max_size.as_deref())?;
    // Chukcha's client reads from a random node each time: one whose copy
    // of a chunk still lags the node it read from before is asked for an
    // offset past its copy. Chukcha answers that with nothing new yet, and
    // its client treats any error as fatal; so does this route while the
    // chunk is incomplete here (the copy is still arriving).
    if let Some(meta) = st.storage.chunk_meta(category, &chunk)
        && !meta.complete
        && off > meta.size
    {
        return Ok(chunk_response(
            ReadResult {
                data: bytes::Bytes::new(),
                next_offset: off,
                meta,
            },
            st.storage.incarnation(),
        ));
    }
    let r = read_lines(&st, category, &chunk, off, max, Duration::ZERO).await?;
    Ok(chunk_response(r, st.storage.incarnation()))
}

#[derive(Debug, Deserialize)]
pub(super) struct ListQuery {
    category: Option<String>,
    #[allow(dead_code)]
    from_replication: Option<String>,
}

/// The consumer Chukcha's `/ack` acknowledges for.
const CHUKCHA_CONSUMER: &str = "default";

#[derive(Debug, Deserialize)]
pub(super) struct AckQuery {
    category: Option<String>,
    chunk: Option<String>,
    size: Option<String>,
}

/// `GET /ack?category=C&chunk=K&size=S`: as in Chukcha, only a complete
/// chunk read to its end (`size` ≥ its size) can be acknowledged; the
/// consumer `default` moves past it.
pub(super) async fn ack(
    State(st): State<Arc<AppState>>,
    query: Result<Query<AckQuery>, QueryRejection>,
) -> Result<Json<chunkbus_client::ConsumerDetail>, ApiError> {
    let Query(q) = query?;
    let category = category(&q.category)?;
    let chunk = ChunkName::parse(required("chunk", &q.chunk)?)?;
    let size = parse_u64("size", required("size", &q.size)?)?;
    let meta = st.storage.chunk_meta(category, &chunk).ok_or_else(|| {
        ApiError::NotFound(format!(
            "chunk {chunk} of category {category:?} does not exist on this node"
        ))
    })?;
    if !meta.complete {
        return Err(ApiError::BadRequest(format!(
            "chunk {chunk} is not complete yet; only complete chunks can be acknowledged"
        )));
    }
    if size < meta.size {
        return Err(ApiError::BadRequest(format!(
            "chunk {chunk} was not fully processed: size {size} is below its size {}",
            meta.size
        )));
    }
    let entry = st
        .consumers
        .ack(category, CHUKCHA_CONSUMER, &chunk, meta.size)
        .await?;
    Ok(Json(st.consumers.detail(category, &entry)))
}

/// `GET /listChunks?category=C` → `[{"name","complete","size"}]`, without
/// the chunks the consumer `default` has fully acknowledged.
pub(super) async fn list_chunks(
    State(st): State<Arc<AppState>>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Vec<ChukchaChunk>>, ApiError> {
    let Query(q) = query?;
    let category = category(&q.category)?;
    let acked = st
        .consumers
        .get(category, CHUKCHA_CONSUMER)
        .unwrap_or_default();
    let out = list(&st, category)?
        .into_iter()
        .filter(|c| !crate::consumers::fully_read(acked.positions.get(&c.name.owner), c))
        .map(|c| ChukchaChunk {
            name: c.name.to_string(),
            complete: c.meta.complete,
            size: c.meta.size,
        })
        .collect();
    Ok(Json(out))
}
