//! Authentication and authorization of every routed request, in one place:
//! each route declares its [`Access`] where it is declared (`http::routes`),
//! and this middleware checks it, on the category the request names (see
//! [`crate::auth`]).

use axum::extract::Request;
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};
use crate::auth::{Need, Role};

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Nothing (health checks).
    Open,
    /// Any valid token or the cluster secret (status, metrics).
    Anyone,
    /// The produce role, on the category.
    Produce,
    /// Reading chunks and listings: the consume role on the category, or
    /// the cluster secret (peers copy chunks through the public read route).
    Read,
    /// Consumers' state (next, acks, positions, deletion): the consume role
    /// on the category; not the cluster secret.
    Consume,
    /// The admin role.
    Admin,
    /// The cluster secret (node-to-node routes).
    Peer,
}

impl Access {
    /// The need of a request to a route of this access naming `category`.
    pub fn need(self, category: Option<&str>) -> Need<'_> {
        match self {
            Access::Open => Need::Nothing,
            Access::Anyone => Need::Anyone,
            Access::Produce => Need::Role(Role::Produce, category),
            Access::Read => Need::Read(category),
            Access::Consume => Need::Role(Role::Consume, category),
            Access::Admin => Need::Role(Role::Admin, None),
            Access::Peer => Need::Peer,
        }
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

/// Refuses requests without the credentials their route's `access` needs;
/// hands the handler the [`crate::auth::Principal`] as a request extension
/// (none when the node checks no credentials: anonymous).
pub(super) async fn authorize<F>(
    st: &AppState,
    access: Access,
    route: &'static str,
    mut req: Request,
    next: impl FnOnce(Request) -> F,
) -> Response
where
    F: Future<Output = Response>,
{
    // Without credentials to check, the handler gets no principal, which
    // it treats as anonymous (every category visible).
    if access == Access::Open || st.auth.is_open(access == Access::Peer) {
        return next(req).await;
    }
    let category = category_of(route, &req);
    match st
        .auth
        .check(req.headers(), access.need(category.as_deref()))
    {
        Ok(principal) => {
            req.extensions_mut().insert(principal);
            next(req).await
        }
        Err(e) => {
            if let crate::auth::AuthError::Unauthenticated(why) = &e {
                st.auth.note_refused(route, why);
            }
            ApiError::from(e).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Access;
    use axum::http::Method;

    /// The rules every route declaration must keep.
    #[test]
    fn every_route_declares_an_access_that_fits_it() {
        let table = super::super::route_table();
        let mut seen = std::collections::BTreeSet::new();
        for (method, path, access) in &table {
            assert!(
                seen.insert((method.to_string(), *path)),
                "{method} {path} twice"
            );
            let internal = path.starts_with("/v1/internal/");
            assert_eq!(
                internal,
                *access == Access::Peer,
                "{method} {path}: {access:?}"
            );
            // Health checks only (HEC's and Loki's have their own paths),
            // and the console's files, which hold no data (the page asks
            // for a token and fetches with it).
            let health = *path == "/healthz"
                || *path == "/ready"
                || path.starts_with("/services/collector/health");
            let console_files = *path == "/ui" || path.starts_with("/ui/");
            assert_eq!(
                health || console_files,
                *access == Access::Open,
                "{method} {path}"
            );
            if path.starts_with("/v1/admin/") {
                assert_eq!(*access, Access::Admin, "{method} {path}");
            }
            if path.contains("/consumers") || *path == "/ack" {
                // Consumers' state is never open to the cluster secret.
                assert_eq!(*access, Access::Consume, "{method} {path}");
            }
            if *method != Method::GET && !internal {
                assert!(
                    matches!(access, Access::Produce | Access::Consume | Access::Admin),
                    "{method} {path} changes state with {access:?}"
                );
            }
        }
    }
}
