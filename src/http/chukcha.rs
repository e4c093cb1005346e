//! Chukcha-compatible routes, for users moving from Chukcha and its Go
//! client: `/write`, `/read`, `/listChunks`, `/listCategories`.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use chunkbus_client::{ChukchaChunk, ChunkName, ProduceResponse};
use serde::Deserialize;

use super::params::parse_u64;
use super::produce::{WriteOptions, ingest};
use super::read::{chunk_response, list, parse_max_bytes, read as read_lines};
use super::{ApiError, AppState};

/// Chukcha waits this long for `min_sync_replicas`.
const CHUKCHA_REPLICA_TIMEOUT: Duration = Duration::from_secs(60);

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
    headers: HeaderMap,
    body: Body,
) -> Result<Json<ProduceResponse>, ApiError> {
    let Query(q) = query?;
    let category = required("category", &q.category)?;
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
    ingest(&st, category, &headers, body, opts).await.map(Json)
}

#[derive(Debug, Deserialize)]
pub(super) struct ReadQuery {
    category: Option<String>,
    chunk: Option<String>,
    off: Option<String>,
    max_size: Option<String>,
}

/// `GET /read?category=C&chunk=K&off=O&max_size=M`: whole lines, 404 for a
/// chunk this node does not hold (yet).
pub(super) async fn read(
    State(st): State<Arc<AppState>>,
    query: Result<Query<ReadQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query?;
    let category = required("category", &q.category)?;
    chunkbus_client::names::validate_category(category)?;
    let chunk = ChunkName::parse(required("chunk", &q.chunk)?)?;
    let off = q
        .off
        .as_deref()
        .map(|v| parse_u64("off", v))
        .transpose()?
        .unwrap_or(0);
    let max = parse_max_bytes("max_size", q.max_size.as_deref())?;
    let r = read_lines(&st, category, &chunk, off, max, Duration::ZERO).await?;
    Ok(chunk_response(r))
}

#[derive(Debug, Deserialize)]
pub(super) struct ListQuery {
    category: Option<String>,
    #[allow(dead_code)]
    from_replication: Option<String>,
}

/// `GET /listChunks?category=C` → `[{"name","complete","size"}]`.
pub(super) async fn list_chunks(
    State(st): State<Arc<AppState>>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Vec<ChukchaChunk>>, ApiError> {
    let Query(q) = query?;
    let category = required("category", &q.category)?;
    let out = list(&st, category)?
        .into_iter()
        .map(|c| ChukchaChunk {
            name: c.name.to_string(),
            complete: c.meta.complete,
            size: c.meta.size,
        })
        .collect();
    Ok(Json(out))
}
