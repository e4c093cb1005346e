//! The node-to-node routes (`/v1/internal/...`); see
//! `crate::replication::protocol` and `docs/architecture.md`.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use chunkbus_client::ChunkName;
use chunkbus_client::names::{validate_category, validate_node};

use super::{ApiError, AppState};
use crate::replication::protocol::{
    ChangedChunk, ChangedConsumer, ChangesRequest, ChangesResponse, CopiesResponse,
};

/// Longest wait a replica may ask for.
const MAX_CHANGES_WAIT: Duration = Duration::from_secs(300);

/// `POST /v1/internal/changes`: records the replica's progress, then answers
/// with this node's chunks changed after `since`, as soon as there are any
/// (at once for `since = 0`), or empty after `wait_ms`.
pub(super) async fn changes(
    State(st): State<Arc<AppState>>,
    body: Result<Json<ChangesRequest>, JsonRejection>,
) -> Result<Json<ChangesResponse>, ApiError> {
    let Json(req) = body
        .map_err(|e| ApiError::BadRequest(format!("invalid changes request: {}", e.body_text())))?;
    validate_node(&req.node)?;
    let incarnation = st.storage.incarnation();
    // Versions of another process of this node mean nothing here: answer
    // as for a replica that has seen nothing.
    let (since, positions_since) = if req.incarnation == incarnation {
        (req.since, req.positions_since)
    } else {
        (0, 0)
    };
    st.replication
        .progress
        .replica_incarnation(&req.node, req.node_incarnation);
    for p in &req.progress {
        validate_category(&p.category)?;
        let chunk = ChunkName::parse(&p.chunk)?;
        if chunk.owner == st.storage.node() {
            st.replication
                .progress
                .record(&req.node, &p.category, chunk, p.size);
        }
    }
    let wait = Duration::from_millis(req.wait_ms).min(MAX_CHANGES_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    let mut feed = st.storage.subscribe_feed();
    let mut positions_feed = st.consumers.subscribe();
    loop {
        feed.borrow_and_update();
        positions_feed.borrow_and_update();
        let version = st.storage.feed_version();
        let positions_version = st.consumers.version();
        let changed = st.storage.own_changes_since(since);
        let positions: Vec<ChangedConsumer> = st
            .consumers
            .changes_since(positions_since)
            .into_iter()
            .map(|c| ChangedConsumer {
                category: c.category,
                consumer: c.consumer,
                entry: c.entry,
            })
            .collect();
        let waited_out = tokio::time::Instant::now() >= deadline || st.shutdown.is_cancelled();
        if !changed.is_empty() || !positions.is_empty() || since == 0 || waited_out {
            let chunks = changed
                .into_iter()
                .map(|c| {
                    let status = crate::storage::ChunkStatus {
                        name: c.name,
                        meta: c.meta,
                    };
                    ChangedChunk::new(c.category, &status)
                })
                .collect();
            return Ok(Json(ChangesResponse {
                node: st.storage.node().to_owned(),
                incarnation,
                version,
                chunks,
                positions_version,
                positions,
                kafka_addr: st.kafka_advertised.clone(),
                kafka_nodes: st.kafka_nodes.as_ref().map(|o| o.get().to_vec()),
                about: Some(crate::replication::protocol::NodeAbout {
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    disk: st.storage.disk().status(),
                }),
                line_ends: if since == 0 {
                    st.storage.line_ends_of(st.storage.node())
                } else {
                    Default::default()
                },
            }));
        }
        tokio::select! {
            _ = feed.changed() => {}
            _ = positions_feed.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = st.shutdown.cancelled() => {}
        }
    }
}

/// `GET /v1/internal/copies/{node}`: every chunk of `node` held here, and
/// the highest index of `node` each category's consumer positions name.
pub(super) async fn copies(
    State(st): State<Arc<AppState>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<CopiesResponse>, ApiError> {
    let Path(node) = path?;
    validate_node(&node)?;
    let chunks = st
        .storage
        .chunks_of(&node)
        .into_iter()
        .map(|(category, c)| ChangedChunk::new(category, &c))
        .collect();
    // Names listed here but held elsewhere are not copies to restore
    // from, but were used.
    let mut positions = st.consumers.highest_index_of(&node);
    for (category, index) in st.storage.highest_elsewhere_of(&node) {
        let h = positions.entry(category).or_insert(0);
        *h = (*h).max(index);
    }
    Ok(Json(CopiesResponse {
        node: st.storage.node().to_owned(),
        incarnation: st.storage.incarnation(),
        chunks,
        positions,
        line_ends: st.storage.line_ends_of(&node),
    }))
}

/// Query of [`held`].
#[derive(Debug, serde::Deserialize)]
pub(super) struct HeldQuery {
    offset: u64,
    len: u64,
}

/// `GET /v1/internal/held/{category}/{chunk}?offset=&len=`: exactly `len`
/// bytes of a chunk from `offset`, from this node's copy or S3, never
/// from another node: what a node that lists the chunk as held elsewhere
/// (`--replicas k`) reads. 404 when this node does not hold that range.
pub(super) async fn held(
    State(st): State<Arc<AppState>>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<axum::extract::Query<HeldQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::response::Response, ApiError> {
    let Path((category, chunk)) = path?;
    let axum::extract::Query(q) =
        query.map_err(|e| ApiError::BadRequest(format!("invalid query: {}", e.body_text())))?;
    validate_category(&category)?;
    let chunk = ChunkName::parse(&chunk)?;
    let most = crate::replication::MAX_HELD_READ_BYTES;
    if q.len > most {
        return Err(ApiError::BadRequest(format!(
            "len={} is above the {most} bytes one read may ask for",
            q.len
        )));
    }
    match st
        .storage
        .read_held(&category, &chunk, q.offset, q.len)
        .await
    {
        Ok(Some(bytes)) => Ok(axum::response::IntoResponse::into_response(bytes)),
        Ok(None) | Err(crate::storage::StorageError::UnknownCategory(_)) => Err(
            ApiError::NotFound(format!("{chunk}: this node does not hold that range")),
        ),
        Err(e) => Err(e.into()),
    }
}
