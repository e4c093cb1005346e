//! Authentication and authorization of every routed request, in one place:
//! which role each route needs, on which category (see [`crate::auth`]).

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};
use crate::auth::{Need, Role};

/// What `route` (the matched pattern) needs, for `category` if it names one.
pub(super) fn need_for<'a>(route: &str, category: Option<&'a str>) -> Need<'a> {
    match route {
        "/healthz" => Need::Nothing,
        "/metrics" | "/v1/status" => Need::Anyone,
        "/v1/categories/{category}/lines" | "/write" => Need::Role(Role::Produce, category),
        "/v1/categories" | "/listCategories" => Need::Role(Role::Consume, None),
        r if r.starts_with("/v1/internal/") => Need::Peer,
        r if r.starts_with("/v1/admin/") => Need::Role(Role::Admin, None),
        // Reads, consumer positions and acks (GET, POST acks, PUT
        // position, DELETE consumer), Chukcha's /read, /ack, /listChunks.
        _ => Need::Role(Role::Consume, category),
    }
}

/// The category a request names: the `{category}` path segment, or
/// Chukcha's `category` query parameter. Percent-decoded, not validated
/// (the handler does that, after this check).
fn category_of(route: &str, req: &Request) -> Option<String> {
    if route.starts_with("/v1/categories/{category}") {
        let raw = req.uri().path().split('/').nth(3)?;
        return Some(
            percent_encoding::percent_decode_str(raw)
                .decode_utf8_lossy()
                .into_owned(),
        );
    }
    let query = req.uri().query()?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "category")
        .map(|(_, v)| v.into_owned())
}

/// Refuses requests without the credentials their route needs; hands the
/// handler the [`crate::auth::Principal`] as a request extension.
pub(super) async fn authorize(
    State(st): State<Arc<AppState>>,
    matched: Option<MatchedPath>,
    mut req: Request,
    next: Next,
) -> Response {
    let route = matched.map(|m| m.as_str().to_owned()).unwrap_or_default();
    let category = category_of(&route, &req);
    let need = need_for(&route, category.as_deref());
    match st.auth.check(req.headers(), need) {
        Ok(principal) => {
            req.extensions_mut().insert(principal);
            next.run(req).await
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}
