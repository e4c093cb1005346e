//! `/v1/status` and the administrative routes.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use chunkbus_client::names::validate_node;
use chunkbus_client::{DiskStatus, ForgetReport, NodeStatus};

use super::internal::own_node_check;
use super::{ApiError, AppState};

/// `GET /v1/status`.
pub(super) async fn status(State(st): State<Arc<AppState>>) -> Json<NodeStatus> {
    let disk = st.storage.disk();
    let usage = disk.usage();
    Json(NodeStatus {
        node: st.storage.node().to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_seconds: st.started.elapsed().as_secs(),
        writes_held: st.storage.writes_held(),
        tokens_reload_error: st.auth.reload_error(),
        peers: st.replication.status(),
        categories: st.storage.categories(),
        disk: DiskStatus {
            used_bytes: usage.used_bytes,
            total_bytes: usage.total_bytes,
            used_percent: usage.used_percent,
            high_water_percent: disk.limit_percent(),
        },
        s3: st.tiering.status(),
    })
}

/// `POST /v1/admin/forget-node/{node}`: a permanently lost node's open
/// chunks become complete here and on every reachable peer.
pub(super) async fn forget_node(
    State(st): State<Arc<AppState>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<ForgetReport>, ApiError> {
    let Path(node) = path?;
    validate_node(&node)?;
    own_node_check(&st, &node)?;
    Ok(Json(st.replication.forget_everywhere(&node).await?))
}
