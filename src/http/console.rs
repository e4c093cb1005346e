//! The operator's console: the page at `/ui` (built into the binary) and
//! the JSON it refreshes from (`GET /v1/console`,
//! `GET /v1/categories/{category}/console`), which `chunkbus top` reads too.

use std::sync::Arc;
use std::time::SystemTime;

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};
use chunkbus_client::console::{
    CategoryChunks, ChunkView, ClusterSummary, ConsoleView, NodeView, RequestCount,
};
use chunkbus_client::names::validate_category;

use super::{ApiError, AppState};
use crate::auth::Principal;

/// `GET /v1/console`: what the caller may see of this node and its peers.
pub(super) async fn view(
    State(st): State<Arc<AppState>>,
    principal: Option<axum::Extension<Principal>>,
) -> Json<ConsoleView> {
    let principal = principal.map(|p| p.0);
    let may_see = |c: &str| principal.as_ref().is_none_or(|p| p.may_see(c));
    let sees_all = principal
        .as_ref()
        .is_none_or(Principal::sees_every_category);
    let now = SystemTime::now();
    let categories: Vec<_> = st
        .console
        .categories()
        .iter()
        .filter(|c| may_see(&c.name))
        .cloned()
        .collect();
    let s3 = st.tiering.status().map(|mut s3| {
        s3.failing_chunks.retain(|f| may_see(&f.category));
        s3
    });
    let mut nodes = vec![NodeView {
        name: st.storage.node().to_owned(),
        address: None,
        this_node: true,
        up: true,
        forgotten: false,
        last_contact: None,
        last_contact_seconds: None,
        last_error: None,
        lag_bytes: 0,
        lag_seconds: 0.0,
        disk: Some(st.storage.disk().status()),
        version: Some(env!("CARGO_PKG_VERSION").to_owned()),
    }];
    for p in st.replication.status() {
        let last_contact_seconds = p
            .last_contact
            .as_deref()
            .and_then(|t| humantime::parse_rfc3339(t).ok())
            .map(|t| now.duration_since(t).unwrap_or_default().as_secs_f64());
        nodes.push(NodeView {
            lag_bytes: p
                .categories
                .iter()
                .filter(|(c, _)| may_see(c))
                .map(|(_, n)| n)
                .sum(),
            name: p.name,
            address: Some(p.address),
            this_node: false,
            up: p.connected,
            forgotten: p.forgotten,
            last_contact: p.last_contact,
            last_contact_seconds,
            last_error: p.last_error,
            lag_seconds: p.lag_seconds,
            disk: p.disk,
            version: p.version,
        });
    }
    let nodes_up = nodes.iter().filter(|n| n.up).count() as u32;
    let requests = st
        .metrics
        .http_request_counters
        .lock()
        .unwrap()
        .iter()
        .map(|(method, route, status, counter)| RequestCount {
            method: (*method).to_owned(),
            route: (*route).to_owned(),
            status: *status,
            count: counter.get(),
        })
        .collect();
    Json(ConsoleView {
        node: st.storage.node().to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_seconds: st.started.elapsed().as_secs(),
        taken_at: humantime::format_rfc3339_seconds(now).to_string(),
        sample_seconds: crate::console::SAMPLE.as_secs_f64(),
        stalled_after_seconds: crate::console::STALLED_AFTER.as_secs_f64(),
        cluster: ClusterSummary {
            nodes_up,
            nodes_down: nodes.len() as u32 - nodes_up,
            lines_per_second: categories.iter().map(|c| c.lines_per_second).sum(),
            bytes_per_second: categories.iter().map(|c| c.bytes_per_second).sum(),
            s3_backlog_chunks: s3.as_ref().map(|s| s.backlog_chunks),
            s3_backlog_bytes: s3.as_ref().map(|s| s.backlog_bytes),
            errors_last_5m: if sees_all {
                crate::console::events_last_5m(now)
            } else {
                0
            },
            replicas: st.replication.replicas_setting(),
            under_replicated_chunks: st.metrics.chunks_under_replicated.get().max(0) as u64,
        },
        nodes,
        categories,
        s3,
        errors: if sees_all {
            crate::console::recent_events()
        } else {
            Vec::new()
        },
        requests,
    })
}

/// `GET /v1/categories/{category}/console`: the category's newest chunks
/// with their state here.
pub(super) async fn category(
    State(st): State<Arc<AppState>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<CategoryChunks>, ApiError> {
    let Path(name) = path?;
    validate_category(&name)?;
    let me = st.storage.node();
    let now_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let all = st.storage.chunks(&name).unwrap_or_default();
    let left_out = all.len().saturating_sub(CategoryChunks::LIMIT);
    let mut newest: Vec<_> = all.into_iter().collect();
    // The newest chunks of every owner: by age, then back in listing order.
    newest.sort_by_key(|c| std::cmp::Reverse(c.meta.created_ms));
    newest.truncate(CategoryChunks::LIMIT);
    newest.sort_by(|a, b| a.name.cmp(&b.name));
    let chunks = newest
        .into_iter()
        .map(|c| ChunkView {
            replicas: (c.name.owner == me)
                .then(|| st.replication.progress.count(&name, &c.name, c.meta.size)),
            name: c.name.to_string(),
            owner: c.name.owner.clone(),
            size: c.meta.size,
            state: if c.meta.complete { "complete" } else { "open" }.to_owned(),
            local: c.meta.local,
            uploaded: c.meta.uploaded,
            lines: c.meta.lines,
            age_seconds: now_ms.saturating_sub(c.meta.created_ms) as f64 / 1000.0,
        })
        .collect();
    Ok(Json(CategoryChunks {
        name,
        replicas_wanted: st.replication.other_holders() as u32,
        chunks,
        left_out: left_out as u64,
    }))
}

/// The console's files, built into the binary.
const PAGE: &str = include_str!("ui/index.html");
const SCRIPT: &str = include_str!("ui/console.js");
const STYLE: &str = include_str!("ui/console.css");

/// `GET /ui`: the console page. It holds no data: the script fetches it
/// with the token the operator gives (kept for the browser session only).
pub(super) async fn page() -> Response {
    asset(PAGE, "text/html; charset=utf-8")
}

/// `GET /ui/console.js`.
pub(super) async fn script() -> Response {
    asset(SCRIPT, "text/javascript; charset=utf-8")
}

/// `GET /ui/console.css`.
pub(super) async fn style() -> Response {
    asset(STYLE, "text/css; charset=utf-8")
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Only its own files, never framed, no referrer to other sites.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

/// True when the request comes from a browser asking for a page (its
/// `Accept` names `text/html`), not from an API client.
pub(super) fn wants_page(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/html"))
        })
}

/// In front of `GET /`: a browser is sent to the console, before any token
/// is asked for (the page asks for it); API clients get the route's own
/// answer.
pub(super) async fn browser_to_console(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if wants_page(req.headers()) {
        return Redirect::to("/ui").into_response();
    }
    next.run(req).await
}

/// `GET /` when the Elasticsearch API is off: browsers go to the console,
/// anything else finds no route.
pub(super) async fn root(headers: HeaderMap) -> Response {
    if wants_page(&headers) {
        return Redirect::to("/ui").into_response();
    }
    ApiError::NotFound("no route for GET /; see docs/api.md".to_owned()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn browsers_are_told_from_api_clients() {
        let with = |accept: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT, HeaderValue::from_str(accept).unwrap());
            wants_page(&h)
        };
        assert!(with(
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
        ));
        assert!(with("TEXT/HTML"));
        assert!(!with("application/json"));
        assert!(!with("*/*"));
        assert!(!wants_page(&HeaderMap::new()));
    }
}
