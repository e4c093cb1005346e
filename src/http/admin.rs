//! `/v1/status` and the administrative routes.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use chunkbus_client::names::validate_node;
use chunkbus_client::{ForgetReport, NodeStatus};
use serde::Deserialize;

use super::{ApiError, AppState};

/// `GET /v1/status`. A token limited to category patterns sees only its
/// categories (in the list and in each peer's lag).
pub(super) async fn status(
    State(st): State<Arc<AppState>>,
    principal: Option<axum::Extension<crate::auth::Principal>>,
) -> Json<NodeStatus> {
    let may_see = |c: &str| principal.as_ref().is_none_or(|p| p.0.may_see(c));
    let mut status = NodeStatus {
        node: st.storage.node().to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_seconds: st.started.elapsed().as_secs(),
        membership: if st.replication.bucket_membership() {
            "bucket"
        } else {
            "peers"
        }
        .to_owned(),
        number: st.tiering.number(),
        writes_held: st.storage.writes_held(),
        tokens_reload_error: st.auth.reload_error(),
        peers: st.replication.status(),
        categories: st.storage.categories(),
        disk: st.storage.disk().status(),
        s3: st.tiering.status(),
        replicas: st.replication.replicas_setting(),
        under_replicated_chunks: st.metrics.chunks_under_replicated.get().max(0) as u64,
        restoring_chunks: st.replication.restoring_chunks(),
        holders: st.replication.pairs(),
    };
    status.categories.retain(|c| may_see(c));
    status.holders.retain(|h| may_see(&h.category));
    for peer in &mut status.peers {
        peer.categories.retain(|c, _| may_see(c));
        peer.lag_bytes = peer.categories.values().sum();
        peer.disagreeing_chunks.retain(|d| may_see(&d.category));
    }
    if let Some(s3) = &mut status.s3 {
        s3.failing_chunks.retain(|f| may_see(&f.category));
    }
    Json(status)
}

/// `?relayed=true`: asked by another node's `forget-node`; this node
/// forgets here only.
#[derive(Debug, Deserialize)]
pub(super) struct ForgetQuery {
    #[serde(default)]
    relayed: bool,
}

/// `POST /v1/admin/forget-node/{node}`: a permanently lost node's open
/// chunks become complete here and on every reachable peer. The peers are
/// asked with the caller's own credentials (their admin route checks
/// them), never with the cluster secret.
pub(super) async fn forget_node(
    State(st): State<Arc<AppState>>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<ForgetQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Json<ForgetReport>, ApiError> {
    let Path(node) = path?;
    let Query(q) = query?;
    validate_node(&node)?;
    own_node_check(&st, &node)?;
    if q.relayed {
        let chunks_completed = st.replication.forget_here(&node).await?;
        return Ok(Json(ForgetReport {
            node,
            chunks_completed,
            peers: Default::default(),
            bucket: None,
        }));
    }
    let caller = headers.get(axum::http::header::AUTHORIZATION).cloned();
    let mut report = st.replication.forget_everywhere(&node, caller).await?;
    report.bucket = st.tiering.mark_forgotten(&node).await;
    Ok(Json(report))
}

/// 400 when asked to forget this very node.
fn own_node_check(st: &AppState, node: &str) -> Result<(), ApiError> {
    if node == st.storage.node() {
        return Err(ApiError::BadRequest(format!(
            "{node} is this node; ask another node to forget it"
        )));
    }
    Ok(())
}
