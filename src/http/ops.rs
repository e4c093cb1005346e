//! Operations routes (`/healthz`, `/metrics`), request metrics and the
//! JSON fallbacks for unknown routes and methods.

use std::sync::{Arc, OnceLock, RwLock};
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use crate::metrics::{Metrics, RequestLabels, RouteLabels};

/// Largest body of the routes that take small JSON bodies (acks,
/// positions, the internal routes).
pub(super) const SMALL_BODY_BYTES: usize = 2 << 20;

/// Reads the body of a route that takes a small one whole, within
/// `--request-timeout` (408 past it, as for produce bodies) and
/// [`SMALL_BODY_BYTES`] (413), before the handler: a client that sends its
/// headers and then trickles or withholds its body cannot hold the request
/// open for good.
pub(super) async fn bounded_body(
    State(st): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let (parts, body) = req.into_parts();
    let read = axum::body::to_bytes(body, SMALL_BODY_BYTES);
    let bytes = match tokio::time::timeout(st.limits.request_timeout, read).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => {
            return ApiError::TooLarge(format!(
                "the body is larger than {SMALL_BODY_BYTES} bytes, or ended early"
            ))
            .into_response();
        }
        Err(_) => {
            return ApiError::RequestTimeout(format!(
                "the body did not arrive within {} (--request-timeout)",
                humantime::format_duration(st.limits.request_timeout)
            ))
            .into_response();
        }
    };
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

/// `GET /healthz`.
pub(super) async fn healthz() -> &'static str {
    "ok"
}

/// `GET /metrics`: OpenMetrics text, which Prometheus reads.
pub(super) async fn metrics(
    State(st): State<Arc<AppState>>,
    principal: Option<axum::Extension<crate::auth::Principal>>,
) -> Response {
    let mut text = st.metrics.encode();
    if let Some(axum::Extension(p)) = principal {
        text = visible_metrics(&text, &p);
    }
    let mut resp = text.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    resp
}

/// `text` without the samples of categories `principal` may not see (a
/// token limited to category patterns learns no other category's name).
fn visible_metrics(text: &str, principal: &crate::auth::Principal) -> String {
    const LABEL: &str = "category=\"";
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let hidden = line.find(LABEL).is_some_and(|at| {
            let rest = &line[at + LABEL.len()..];
            // Category names never hold a quote or a backslash.
            let name = rest.split('"').next().unwrap_or("");
            !principal.may_see(name)
        });
        if !hidden {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// One route's request metrics, resolved once per route and status rather
/// than looked up by their labels on every request.
#[derive(Debug)]
pub(super) struct RouteMetrics {
    metrics: Arc<Metrics>,
    method: &'static str,
    route: &'static str,
    /// Created with the route's first answer, so that /metrics lists the
    /// routes that were used.
    seconds: OnceLock<Histogram>,
    by_status: RwLock<Vec<(u16, Counter)>>,
}

impl RouteMetrics {
    pub(super) fn new(metrics: Arc<Metrics>, method: &'static str, route: &'static str) -> Self {
        Self {
            metrics,
            method,
            route,
            seconds: OnceLock::new(),
            by_status: RwLock::new(Vec::new()),
        }
    }

    fn observe(&self, seconds: f64, status: u16) {
        self.seconds
            .get_or_init(|| {
                self.metrics
                    .http_request_seconds
                    .get_or_create(&RouteLabels {
                        method: self.method.to_owned(),
                        route: self.route.to_owned(),
                    })
                    .clone()
            })
            .observe(seconds);
        let known = self
            .by_status
            .read()
            .unwrap()
            .iter()
            .find(|(s, _)| *s == status)
            .map(|(_, c)| c.clone());
        let counter = known.unwrap_or_else(|| {
            let counter = self
                .metrics
                .http_requests
                .get_or_create(&RequestLabels {
                    method: self.method.to_owned(),
                    route: self.route.to_owned(),
                    status,
                })
                .clone();
            let mut by_status = self.by_status.write().unwrap();
            if !by_status.iter().any(|(s, _)| *s == status) {
                by_status.push((status, counter.clone()));
                self.metrics.http_request_counters.lock().unwrap().push((
                    self.method,
                    self.route,
                    status,
                    counter.clone(),
                ));
            }
            counter
        });
        counter.inc();
    }
}

/// What stands in front of one route's handler.
#[derive(Debug)]
pub(super) struct RouteGuard {
    pub state: Arc<AppState>,
    pub access: super::access::Access,
    pub metrics: RouteMetrics,
}

/// The one layer in front of every route: checks the request's access
/// ([`super::access::authorize`]), then counts it by status and times it.
pub(super) async fn guard(
    State(route): State<Arc<RouteGuard>>,
    req: Request,
    next: Next,
) -> Response {
    guarded(&route, req, |req| next.run(req)).await
}

/// What [`guard`] does, around any handler (also around the routes
/// [`super::App`] serves before the router).
pub(super) async fn guarded<F>(
    route: &RouteGuard,
    req: Request,
    handler: impl FnOnce(Request) -> F,
) -> Response
where
    F: Future<Output = Response>,
{
    let started = Instant::now();
    let resp = super::access::authorize(
        &route.state,
        route.access,
        route.metrics.route,
        req,
        handler,
    )
    .await;
    route
        .metrics
        .observe(started.elapsed().as_secs_f64(), resp.status().as_u16());
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
