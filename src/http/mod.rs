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
mod console;
mod consumers;
mod error;
pub mod es;
pub(crate) mod filter_path;
pub mod hec;
mod internal;
pub(crate) mod lines;
pub(crate) mod loki;
mod ops;
pub(crate) mod otlp;
mod params;
pub(crate) mod produce;
pub(crate) mod protobuf;
mod read;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::handler::Handler;
use axum::http::Method;
use axum::routing::{MethodFilter, MethodRouter, on};
use futures_util::FutureExt as _;
use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

pub use access::Access;
pub use body::Inflight;
pub use error::ApiError;

use crate::auth::Auth;
use crate::config::IngestApi;
use crate::consumers::Consumers;
use crate::metrics::Metrics;
use crate::replication::Replication;
use crate::storage::{Storage, SyncPolicy};
use crate::upload::Tiering;

/// Loki's push messages (`logproto.PushRequest`), also for the benchmark's
/// bodies and bare reference (`examples/`).
pub mod loki_push {
    pub use super::loki::{EntryAdapter, LabelPairAdapter, PushRequest, StreamAdapter, Timestamp};
}

/// Stripes of [`AppState::producer_lock`].
const PRODUCER_LOCK_STRIPES: usize = 256;

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
    /// Ids of documents created through the Elasticsearch bulk API.
    pub es_ids: es::CreatedIds,
    /// Idempotent produce: requests of one producer to one category are
    /// served one at a time (a lock per stripe of producers).
    producer_locks: Vec<Arc<tokio::sync::Mutex<()>>>,
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
    /// Rates, consumer movements and recent errors for the console.
    pub console: Arc<crate::console::Console>,
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
    /// Where Kafka clients reach this node (`--kafka-advertised-addr`);
    /// `None` when its Kafka listener is off.
    pub kafka_advertised: Option<String>,
    /// The nodes in partition order (`--peers`), when the Kafka listener
    /// is on: told to peers, which check it is the same as theirs.
    pub kafka_nodes: Option<Arc<crate::replication::PartitionOrder>>,
    /// The stock agent APIs served (`--ingest-apis`) and their settings.
    pub ingest: crate::config::IngestSettings,
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
            es_ids: es::CreatedIds::default(),
            producer_locks: (0..PRODUCER_LOCK_STRIPES)
                .map(|_| Arc::new(tokio::sync::Mutex::new(())))
                .collect(),
        })
    }

    /// The lock that serializes the idempotent requests of `producer` to
    /// `category` (shared with the producers of the same stripe).
    pub fn producer_lock(&self, category: &str, producer: &str) -> &Arc<tokio::sync::Mutex<()>> {
        use std::hash::{Hash, Hasher};
        // A fixed hasher: the stripe must be the same for every request.
        let mut fixed = std::hash::DefaultHasher::new();
        (category, producer).hash(&mut fixed);
        &self.producer_locks[(fixed.finish() % PRODUCER_LOCK_STRIPES as u64) as usize]
    }

    /// The server's default for `sync=`.
    pub fn default_sync(&self) -> bool {
        self.storage.options().sync == SyncPolicy::Always
    }
}

/// One route: its path, method, what it needs, its handler.
struct Route {
    path: &'static str,
    /// Also in `handler`; kept for [`route_table`].
    method: Method,
    access: Access,
    handler: MethodRouter<Arc<AppState>>,
    /// The handler reads the body itself, within its own limits (the
    /// produce routes); other bodies are read whole first, within
    /// `--request-timeout` and [`ops::SMALL_BODY_BYTES`].
    own_body: bool,
    /// The stock agent API it belongs to, served only when that API is on
    /// (`--ingest-apis`).
    api: Option<IngestApi>,
    /// A browser asking for a page (`Accept: text/html`) is sent to the
    /// console instead, before any check.
    browsers_to_console: bool,
    /// The handler, called directly: how [`App`] serves the routes it
    /// serves before the router.
    direct: Direct,
}

/// A handler called with the request and the state, without the router.
type Direct = Arc<
    dyn Fn(axum::extract::Request, Arc<AppState>) -> BoxFuture<'static, axum::response::Response>
        + Send
        + Sync,
>;

fn route<H, T>(path: &'static str, method: Method, access: Access, handler: H) -> Route
where
    H: Handler<T, Arc<AppState>>,
    T: 'static,
{
    let filter = MethodFilter::try_from(method.clone()).expect("a standard method");
    let direct = {
        let handler = handler.clone();
        Arc::new(move |req, st| handler.clone().call(req, st).boxed()) as Direct
    };
    Route {
        path,
        method,
        access,
        handler: on(filter, handler),
        own_body: false,
        api: None,
        browsers_to_console: false,
        direct,
    }
}

/// A route of a stock agent API.
fn of_api(api: IngestApi, route: Route) -> Route {
    Route {
        api: Some(api),
        ..route
    }
}

/// A route whose handler reads its body itself.
fn streaming(route: Route) -> Route {
    Route {
        own_body: true,
        ..route
    }
}

/// The native produce route, the busiest: [`App`] serves it before the
/// router when its category needs no percent-decoding.
const NATIVE_PRODUCE: &str = "/v1/categories/{category}/lines";

/// Every route of a node, each with the access it needs: declared here
/// and nowhere else, so that no route can be added without one.
fn routes() -> Vec<Route> {
    use Access::*;
    use Method as M;
    vec![
        route("/v1/categories", M::GET, Read, read::categories),
        streaming(route(NATIVE_PRODUCE, M::POST, Produce, produce::produce)),
        route(
            "/v1/categories/{category}/chunks",
            M::GET,
            Read,
            read::chunks,
        ),
        route(
            "/v1/categories/{category}/chunks/{chunk}",
            M::GET,
            Read,
            read::read_chunk,
        ),
        route(
            "/v1/categories/{category}/consumers",
            M::GET,
            Consume,
            consumers::list,
        ),
        route(
            "/v1/categories/{category}/consumers/{consumer}",
            M::GET,
            Consume,
            consumers::get,
        ),
        route(
            "/v1/categories/{category}/consumers/{consumer}",
            M::DELETE,
            Consume,
            consumers::delete,
        ),
        route(
            "/v1/categories/{category}/consumers/{consumer}/next",
            M::GET,
            Consume,
            consumers::next,
        ),
        route(
            "/v1/categories/{category}/consumers/{consumer}/acks",
            M::POST,
            Consume,
            consumers::ack,
        ),
        route(
            "/v1/categories/{category}/consumers/{consumer}/position",
            M::PUT,
            Consume,
            consumers::set_position,
        ),
        streaming(route("/write", M::POST, Produce, chukcha::write)),
        route("/ack", M::GET, Consume, chukcha::ack),
        route("/read", M::GET, Read, chukcha::read),
        route("/listChunks", M::GET, Read, chukcha::list_chunks),
        route("/listCategories", M::GET, Read, read::categories),
        route("/v1/status", M::GET, Anyone, admin::status),
        route("/v1/console", M::GET, Anyone, console::view),
        route(
            "/v1/categories/{category}/console",
            M::GET,
            Read,
            console::category,
        ),
        route("/ui", M::GET, Open, console::page),
        route("/ui/console.js", M::GET, Open, console::script),
        route("/ui/console.css", M::GET, Open, console::style),
        route(
            "/v1/admin/forget-node/{node}",
            M::POST,
            Admin,
            admin::forget_node,
        ),
        route("/v1/internal/changes", M::POST, Peer, internal::changes),
        route("/v1/internal/copies/{node}", M::GET, Peer, internal::copies),
        route(
            "/v1/internal/held/{category}/{chunk}",
            M::GET,
            Peer,
            internal::held,
        ),
        route("/healthz", M::GET, Open, ops::healthz),
        route("/metrics", M::GET, Anyone, ops::metrics),
    ]
    .into_iter()
    .chain(es_routes().into_iter().map(|r| of_api(IngestApi::Es, r)))
    .chain(hec_routes().into_iter().map(|r| of_api(IngestApi::Hec, r)))
    .chain([of_api(
        IngestApi::Otlp,
        streaming(route("/v1/logs", M::POST, Produce, otlp::export)),
    )])
    .chain([
        of_api(
            IngestApi::Loki,
            streaming(route("/loki/api/v1/push", M::POST, Produce, loki::push)),
        ),
        of_api(IngestApi::Loki, route("/ready", M::GET, Open, loki::ready)),
    ])
    .collect()
}

/// Elasticsearch's bulk API and what agents ask before using it
/// (docs/ingest.md).
fn es_routes() -> Vec<Route> {
    use Access::*;
    use Method as M;
    vec![
        streaming(route("/_bulk", M::POST, Produce, es::bulk)),
        streaming(route("/_bulk", M::PUT, Produce, es::bulk)),
        streaming(route("/{index}/_bulk", M::POST, Produce, es::bulk_index)),
        streaming(route("/{index}/_bulk", M::PUT, Produce, es::bulk_index)),
        Route {
            browsers_to_console: true,
            ..route("/", M::GET, Anyone, es::root)
        },
        route("/_license", M::GET, Anyone, es::license),
        route("/_cluster/health", M::GET, Anyone, es::health),
        route("/_index_template/{name}", M::GET, Anyone, es::none),
        route("/_index_template/{name}", M::PUT, Produce, es::accepted),
        route("/_template/{name}", M::GET, Anyone, es::none),
        route("/_template/{name}", M::PUT, Produce, es::accepted),
        route("/_ilm/policy/{name}", M::GET, Anyone, es::none),
        route("/_ilm/policy/{name}", M::PUT, Produce, es::accepted),
        route("/_ingest/pipeline/{name}", M::GET, Anyone, es::none),
        route("/_ingest/pipeline/{name}", M::PUT, Produce, es::accepted),
    ]
}

/// Splunk's HTTP Event Collector (docs/ingest.md).
fn hec_routes() -> Vec<Route> {
    use Access::*;
    use Method as M;
    let mut routes = Vec::new();
    for path in [
        "/services/collector",
        "/services/collector/event",
        "/services/collector/event/1.0",
    ] {
        routes.push(streaming(route(path, M::POST, Produce, hec::event)));
    }
    for path in ["/services/collector/raw", "/services/collector/raw/1.0"] {
        routes.push(streaming(route(path, M::POST, Produce, hec::raw)));
    }
    routes.push(route(
        "/services/collector/health",
        M::GET,
        Open,
        hec::health,
    ));
    routes.push(route(
        "/services/collector/health/1.0",
        M::GET,
        Open,
        hec::health,
    ));
    routes
}

/// Every route's method, path and access, as the router serves them (for
/// tests and documentation).
pub fn route_table() -> Vec<(Method, &'static str, Access)> {
    routes()
        .into_iter()
        .map(|r| (r.method, r.path, r.access))
        .collect()
}

/// The name of one of the methods routes use.
fn method_name(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        _ => "OTHER",
    }
}

/// The node's HTTP service: every route of the node through axum's
/// router, except the routes that take data in (those that read their own
/// body), which are recognised first and served directly behind the same
/// guard: the router's matching, its path parameters and the boxed layers
/// around each route were more than half of what a one-line request cost
/// beyond a bare appender's (docs/benchmarks.md). Served first: the native
/// produce route (`POST /v1/categories/{category}/lines`, with a category
/// that needs no percent-decoding) and every such route without a path
/// parameter (`/write`, `/_bulk`, `/v1/logs`, Loki's push, HEC's). The
/// router still holds them all (their 405s, `route_table`, paths with `%`,
/// `/{index}/_bulk`).
#[derive(Clone, Debug)]
pub struct App {
    router: Router,
    /// The routes served first.
    early: Arc<[Early]>,
}

/// A route [`App`] serves before the router.
struct Early {
    method: Method,
    /// The route's path: a request's path equal to it, or for
    /// [`NATIVE_PRODUCE`] one [`produce::native_category`] accepts.
    path: &'static str,
    /// Shared with the route's entry in the router (one set of request
    /// counters).
    guard: Arc<ops::RouteGuard>,
    /// HEC's answers to a missing or refused token ([`hec::auth_answers`]).
    hec: bool,
    /// The route's handler; `None` for [`NATIVE_PRODUCE`], served by
    /// [`produce::produce_native`] inside the guard's future (no second
    /// boxed future per request).
    direct: Option<Direct>,
}

impl std::fmt::Debug for Early {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Early")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("hec", &self.hec)
            .finish_non_exhaustive()
    }
}

impl Early {
    /// True when this route serves `method` on `path`.
    fn serves(&self, method: &Method, path: &str) -> bool {
        self.method == method
            && match self.direct {
                None => produce::native_category(path).is_some(),
                Some(_) => self.path == path,
            }
    }

    /// The same layers the router puts around the route (`router`).
    async fn serve(&self, req: axum::extract::Request) -> axum::response::Response {
        let had_token = self.hec
            && req
                .headers()
                .contains_key(axum::http::header::AUTHORIZATION);
        let resp = ops::guarded(&self.guard, req, |req| async {
            match &self.direct {
                Some(direct) => direct(req, self.guard.state.clone()).await,
                None => produce::produce_native(&self.guard.state, req).await,
            }
        })
        .await;
        if self.hec {
            hec::auth_answer(had_token, resp)
        } else {
            resp
        }
    }
}

impl tower_service::Service<axum::extract::Request> for App {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = futures_util::future::Either<
        axum::routing::future::RouteFuture<std::convert::Infallible>,
        BoxFuture<'static, Result<Self::Response, Self::Error>>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: axum::extract::Request) -> Self::Future {
        use futures_util::future::Either;
        if let Some(at) = self
            .early
            .iter()
            .position(|e| e.serves(req.method(), req.uri().path()))
        {
            let early = self.early.clone();
            return Either::Right(Box::pin(async move { Ok(early[at].serve(req).await) }));
        }
        Either::Left(self.router.call(req))
    }
}

/// Every route of a node, each behind the check of its access.
pub fn router(state: Arc<AppState>) -> App {
    let mut router = Router::new();
    let mut early = Vec::new();
    for r in routes() {
        if r.api.is_some_and(|api| !state.ingest.apis.contains(&api)) {
            continue;
        }
        let mut handler = r.handler;
        if !r.own_body {
            handler = handler.route_layer(axum::middleware::from_fn_with_state(
                state.clone(),
                ops::bounded_body,
            ));
        }
        let guard = Arc::new(ops::RouteGuard {
            state: state.clone(),
            access: r.access,
            metrics: ops::RouteMetrics::new(state.metrics.clone(), method_name(&r.method), r.path),
        });
        let native = r.path == NATIVE_PRODUCE && r.method == Method::POST;
        if native || (r.own_body && !r.path.contains('{') && !r.browsers_to_console) {
            early.push(Early {
                method: r.method.clone(),
                path: r.path,
                guard: guard.clone(),
                hec: r.api == Some(IngestApi::Hec),
                direct: (!native).then(|| r.direct.clone()),
            });
        }
        let guarded = handler.route_layer(axum::middleware::from_fn_with_state(guard, ops::guard));
        let guarded = if r.api == Some(IngestApi::Hec) {
            // HEC's own answers to a missing or refused token.
            guarded.route_layer(axum::middleware::from_fn(hec::auth_answers))
        } else {
            guarded
        };
        let guarded = if r.browsers_to_console {
            guarded.route_layer(axum::middleware::from_fn(console::browser_to_console))
        } else {
            guarded
        };
        router = router.route(r.path, guarded);
    }
    if !state.ingest.apis.contains(&IngestApi::Es) {
        // `/` is Elasticsearch's; without it, browsers still find the console.
        router = router.route("/", axum::routing::get(console::root));
    }
    App {
        router: router
            .fallback(ops::not_found)
            .method_not_allowed_fallback(ops::method_not_allowed)
            .with_state(state),
        early: early.into(),
    }
}
