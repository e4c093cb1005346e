//! Operations routes (`/healthz`, `/metrics`), request metrics and the
//! JSON fallbacks for unknown routes and methods.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};
use crate::metrics::{RequestLabels, RouteLabels};

/// `GET /healthz`.
pub(super) async fn healthz() -> &'static str {
    "ok"
}

/// `GET /metrics`: OpenMetrics text, which Prometheus reads.
pub(super) async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let mut resp = st.metrics.encode().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    resp
}

/// Counts every routed request by route and status, and times it.
pub(super) async fn track(
    State(st): State<Arc<AppState>>,
    matched: Option<MatchedPath>,
    req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = req.method().as_str().to_owned();
    let route = matched.map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let resp = next.run(req).await;
    let m = &st.metrics;
    m.http_request_seconds
        .get_or_create(&RouteLabels {
            method: method.clone(),
            route: route.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    m.http_requests
        .get_or_create(&RequestLabels {
            method,
            route,
            status: resp.status().as_u16(),
        })
        .inc();
    resp
}

/// 404 for unknown routes.
pub(super) async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound(format!(
        "no route for {method} {}; see docs/api.md",
        uri.path()
    ))
}

/// 405 for known routes with another method.
pub(super) async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!(
        "{method} is not allowed on {}; see docs/api.md",
        uri.path()
    ))
}
