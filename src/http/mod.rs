//! The HTTP API: `/v1` routes, Chukcha-compatible routes, operations.
//!
//! Handlers are thin: they validate names and parameters (400 before
//! anything touches the file system), call the storage layer and turn its
//! answers into JSON. Every error goes through [`ApiError`], which owns the
//! choice of status code. The contract is `docs/api.md`.

mod access;
mod admin;
pub(crate) mod body;
mod chukcha;
mod consumers;
mod error;
mod internal;
pub(crate) mod lines;
mod ops;
mod params;
mod produce;
mod read;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::routing::{get, post, put};
use tokio_util::sync::CancellationToken;

pub use body::Inflight;
pub use error::ApiError;

use crate::auth::Auth;
use crate::consumers::Consumers;
use crate::metrics::Metrics;
use crate::replication::Replication;
use crate::storage::{Storage, SyncPolicy};
use crate::upload::Tiering;

/// Limits applied to requests.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest line, without its newline.
    pub max_line_bytes: u64,
    /// Largest body after decoding.
    pub max_body_bytes: u64,
    /// In-flight body bytes across all requests.
    pub max_inflight_bytes: u64,
    /// Longest time a request body may take to arrive.
    pub request_timeout: std::time::Duration,
}

/// Everything a handler needs. Shared as `Arc<AppState>`; the node's parts
/// ([`Services`]) are reached through it (`st.storage`, `st.auth`...).
#[derive(Debug)]
pub struct AppState {
    /// The node's parts.
    pub services: Services,
    /// Request limits.
    pub limits: Limits,
    /// Memory budget of request bodies.
    pub inflight: Inflight,
    /// Cancelled when the node starts to stop; ends long polls early.
    pub shutdown: CancellationToken,
    /// When the node started.
    pub started: Instant,
}

impl std::ops::Deref for AppState {
    type Target = Services;
    fn deref(&self) -> &Services {
        &self.services
    }
}

/// The node's parts the HTTP layer uses.
#[derive(Debug)]
pub struct Services {
    /// The chunk store.
    pub storage: Storage,
    /// The node's metrics.
    pub metrics: Arc<Metrics>,
    /// Replication.
    pub replication: Arc<Replication>,
    /// Consumer positions.
    pub consumers: Arc<Consumers>,
    /// The S3 tier.
    pub tiering: Arc<Tiering>,
    /// Tokens and the cluster secret.
    pub auth: Arc<Auth>,
}

impl AppState {
    /// Builds the state from its parts.
    pub fn new(services: Services, limits: Limits, shutdown: CancellationToken) -> Arc<Self> {
        let inflight = Inflight::new(
            limits.max_inflight_bytes,
            services.metrics.inflight_bytes.clone(),
        );
        Arc::new(Self {
            services,
            limits,
            inflight,
            shutdown,
            started: Instant::now(),
        })
    }

    /// The server's default for `sync=`.
    pub fn default_sync(&self) -> bool {
        self.storage.options().sync == SyncPolicy::Always
    }
}

/// Every route of a node.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/categories", get(read::categories))
        .route("/v1/categories/{category}/lines", post(produce::produce))
        .route("/v1/categories/{category}/chunks", get(read::chunks))
        .route(
            "/v1/categories/{category}/chunks/{chunk}",
            get(read::read_chunk),
        )
        .route("/v1/categories/{category}/consumers", get(consumers::list))
        .route(
            "/v1/categories/{category}/consumers/{consumer}",
            get(consumers::get).delete(consumers::delete),
        )
        .route(
            "/v1/categories/{category}/consumers/{consumer}/next",
            get(consumers::next),
        )
        .route(
            "/v1/categories/{category}/consumers/{consumer}/acks",
            post(consumers::ack),
        )
        .route(
            "/v1/categories/{category}/consumers/{consumer}/position",
            put(consumers::set_position),
        )
        .route("/write", post(chukcha::write))
        .route("/ack", get(chukcha::ack))
        .route("/read", get(chukcha::read))
        .route("/listChunks", get(chukcha::list_chunks))
        .route("/listCategories", get(read::categories))
        .route("/v1/status", get(admin::status))
        .route("/v1/admin/forget-node/{node}", post(admin::forget_node))
        .route("/v1/internal/changes", post(internal::changes))
        .route("/v1/internal/forget/{node}", post(internal::forget))
        .route("/v1/internal/copies/{node}", get(internal::copies))
        .route("/healthz", get(ops::healthz))
        .route("/metrics", get(ops::metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            access::authorize,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            ops::track,
        ))
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .with_state(state)
}
