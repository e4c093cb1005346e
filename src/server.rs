//! Wiring of a node: storage, HTTP, signals and graceful shutdown.
//!
//! Shutdown order: stop accepting connections, let in-flight requests finish
//! (long polls return at once), then stop the writers, which write and flush
//! every accepted request before exiting.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ServeConfig;
use crate::consumers::Consumers;
use crate::http::{AppState, Limits, Services, router};
use crate::metrics::Metrics;
use crate::replication::{Replication, ReplicationConfig};
use crate::storage::{Storage, StorageError};
use crate::tls::TlsListener;
use crate::upload::{Cluster, Tiering};

/// The replication's view of the cluster, for the S3 tier.
#[derive(Debug)]
struct ClusterView(Arc<Replication>);

impl Cluster for ClusterView {
    fn owner_lost(&self, owner: &str) -> bool {
        self.0.owner_lost(owner)
    }
    fn reachable_peers(&self) -> Vec<String> {
        self.0.reachable_peers()
    }
    fn member(&self, name: &str, address: &str, still_since: Option<std::time::Instant>) {
        self.0.member(name, address, still_since)
    }
    fn members_known(&self, named_before: bool) -> bool {
        self.0.members_known(named_before)
    }
    fn partitions(&self, order: &[String]) {
        self.0.learn_partitions(order)
    }
    fn forgotten(&self, name: &str) {
        let (replication, name) = (self.0.clone(), name.to_owned());
        tokio::spawn(async move { replication.forget_member(&name).await });
    }
    fn copied_by(&self, category: &str, owner: &str) -> Option<Vec<String>> {
        self.0.copied_by(category, owner)
    }
    fn holds(&self, category: &str, owner: &str) -> bool {
        self.0.holds(category, owner)
    }
    fn catch_up_lost_copy<'a>(
        &'a self,
        category: &'a str,
        chunk: &'a chunkbus_client::ChunkName,
    ) -> futures_util::future::BoxFuture<'a, Result<u64, String>> {
        Box::pin(self.0.catch_up_lost_copy(category, chunk))
    }
}

/// Why a node could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The storage could not be opened.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The tokens or the cluster secret are not usable.
    #[error(transparent)]
    Auth(crate::auth::TokensError),
    /// The HTTP server failed.
    #[error("HTTP server failed: {0}")]
    Http(#[source] std::io::Error),
    /// Another live process holds this node's name in the bucket.
    #[error(transparent)]
    NameTaken(#[from] crate::upload::claim::ClaimError),
    /// The bucket's membership does not allow this start.
    #[error("{0}")]
    Membership(String),
}

/// Binds `cfg.listen`, runs until SIGINT or SIGTERM, then shuts down cleanly.
pub async fn serve(cfg: ServeConfig) -> Result<(), ServeError> {
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: cfg.listen,
            source,
        })?;
    // The Kafka listener takes up to as many connections again.
    let connections = cfg.max_connections * if cfg.kafka.is_some() { 2 } else { 1 };
    raise_fd_limit(connections, cfg.max_categories);
    let shutdown = CancellationToken::new();
    let signals = tokio::spawn(stop_on_signal(
        shutdown.clone(),
        "finishing in-flight requests",
    ));
    let result = run(cfg, listener, shutdown).await;
    signals.abort();
    result
}

/// Descriptors kept for everything but connections and open chunks: the
/// listener, the data directory lock, chunks being read, replicated,
/// uploaded or restored, the runtime's own.
const FD_RESERVE: u64 = 256;

/// Raises the soft limit of open files to the hard one: every connection,
/// chunk being read and category's open chunk takes a descriptor, and the
/// usual soft limit (1,024) is far below what the other limits allow. Then
/// warns when the limit is below what `--max-connections` and
/// `--max-categories` may take at once (past it, what needs a descriptor is
/// refused with 503, never 500).
fn raise_fd_limit(max_connections: usize, max_categories: usize) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    let (Some(soft), Some(hard)) = (limit.current, limit.maximum) else {
        return;
    };
    let mut now = soft;
    if soft < hard {
        limit.current = Some(hard);
        match setrlimit(Resource::Nofile, limit) {
            Ok(()) => {
                tracing::info!(from = soft, to = hard, "raised the open files limit");
                now = hard;
            }
            Err(e) => {
                tracing::warn!(soft, hard, error = %e, "cannot raise the open files limit")
            }
        }
    }
    let may_need = max_connections as u64 + max_categories as u64 + FD_RESERVE;
    if now < may_need {
        tracing::warn!(
            limit = now,
            may_need,
            "the open files limit is below what --max-connections ({max_connections}) and --max-categories ({max_categories}) may take at once; past it, requests get 503. Raise the hard limit (ulimit -Hn, LimitNOFILE= in a systemd unit) or lower those two"
        );
    }
}

/// Reloads the tokens file on every SIGHUP until `stop`; a file that does
/// not load leaves the tokens in use. The handler is installed when this is
/// called, not when the future first runs: a SIGHUP that arrived in between
/// would otherwise take its default action and end the process.
fn reload_on_sighup(
    auth: Arc<crate::auth::Auth>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let hup = signal(SignalKind::hangup());
    async move {
        let Ok(mut hup) = hup else {
            tracing::error!("cannot install the SIGHUP handler; tokens are not reloaded");
            return;
        };
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = hup.recv() => {}
            }
            match auth.reload() {
                Ok(n) => tracing::info!(tokens = n, "tokens reloaded"),
                Err(e) => {
                    metrics.tokens_reload_failures.inc();
                    tracing::error!(error = %e, "cannot reload the tokens; the previous ones stay in use")
                }
            }
        }
    }
}

/// Cancels `shutdown` on SIGTERM or SIGINT, logging `doing` ("stopping:
/// ..."); the handlers are installed when this is called, not when the
/// future first runs (as for SIGHUP). The node and `chunkbus
/// ship` stop this way.
pub fn stop_on_signal(
    shutdown: CancellationToken,
    doing: &'static str,
) -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            tracing::error!("cannot install signal handlers; stop the node with SIGKILL");
            return;
        };
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "stopping: {doing}");
        shutdown.cancel();
    }
}

/// With bucket membership, what a start needs beyond the name's claim:
/// tokens need the cluster secret once there are peers; a Kafka listener
/// needs this node's number (its partition).
fn bucket_start_checks(
    cfg: &ServeConfig,
    auth: &crate::auth::Auth,
    replication: &Replication,
    number: Option<u32>,
) -> Result<(), String> {
    if !cfg.bucket_membership() {
        return Ok(());
    }
    let peers = replication.peer_count();
    if peers > 0 && auth.required() && !auth.has_cluster_secret() {
        return Err(format!(
            "tokens are configured and the bucket names {peers} other node(s): the nodes need --cluster-secret-file to reach each other"
        ));
    }
    if cfg.kafka.is_some() && number.is_none() {
        return Err(
            "the Kafka listener's partition is this node's number in the bucket, which could not be claimed (S3 did not answer; see the warnings above): start again once S3 answers".into(),
        );
    }
    Ok(())
}

/// Runs a node on `listener` until `shutdown` is cancelled.
///
/// Prints `chunkbus listening on http://ADDR` on stdout once it accepts
/// requests (scripts and tests wait for that line).
pub async fn run(
    cfg: ServeConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    // The Kafka listener, and where clients are told to reach it.
    let kafka_listener = match &cfg.kafka {
        Some(k) => {
            let listener =
                TcpListener::bind(k.listen)
                    .await
                    .map_err(|source| ServeError::Bind {
                        addr: k.listen,
                        source,
                    })?;
            let bound = listener.local_addr().map_err(ServeError::Http)?;
            let mut settings = k.clone();
            settings.advertised = Some(k.advertised.clone().unwrap_or(bound.to_string()));
            Some((listener, settings))
        }
        None => None,
    };
    let kafka_advertised = kafka_listener
        .as_ref()
        .and_then(|(_, k)| k.advertised.clone());
    // Fixed by --peers; learned from the bucket with bucket membership.
    let kafka_nodes = kafka_listener.as_ref().map(|(_, k)| {
        Arc::new(crate::replication::PartitionOrder::new(
            if cfg.bucket_membership() {
                Vec::new()
            } else {
                k.nodes.clone()
            },
        ))
    });
    let auth = Arc::new(cfg.auth.build().map_err(ServeError::Auth)?);
    if let Some(path) = &cfg.auth.cluster_secret_file {
        crate::auth::warn_if_others_read(path, "cluster secret file");
    }
    let metrics = Metrics::new();
    let storage = Storage::open(cfg.storage_options(), metrics.clone()).await?;
    let consumers = Consumers::open(storage.clone()).await?;
    let replication = Replication::new(
        storage.clone(),
        consumers.clone(),
        ReplicationConfig {
            peers: cfg.peers.clone(),
            wait: cfg.replication_wait,
            peer_timeout: cfg.peer_timeout,
            owner_lost_after: cfg.owner_lost_after,
            first_start: cfg.first_start,
            cluster_secret: cfg.auth.cluster_secret.clone(),
            https: cfg.tls.is_some(),
            ca_pem: cfg.tls.as_ref().and_then(|t| t.ca_pem.clone()),
            kafka_nodes: kafka_nodes.clone(),
            bucket: cfg.bucket_membership(),
            replicas: cfg.replicas,
        },
        metrics.clone(),
    );
    storage.set_elsewhere_reader(replication.elsewhere_reader());
    let pullers = TaskTracker::new();
    let stop_pullers = CancellationToken::new();
    let tiering = Tiering::new(
        storage.clone(),
        Arc::new(ClusterView(replication.clone())),
        cfg.s3.clone(),
        cfg.retention,
        metrics.clone(),
    )
    .await;
    let address = match &cfg.advertise_addr {
        Some(a) => a.clone(),
        None => listener.local_addr().map_err(ServeError::Http)?.to_string(),
    };
    // With bucket membership, the peers found are known from here on.
    let started = match tiering.claim_name(address).await {
        Ok(()) => match bucket_start_checks(&cfg, &auth, &replication, tiering.number()) {
            Ok(()) => Ok(()),
            Err(why) => {
                // Claimed, but not starting: the next start need not wait.
                tiering.release_name().await;
                Err(ServeError::Membership(why))
            }
        },
        Err(e) => Err(e.into()),
    };
    if let Err(e) = started {
        storage.shutdown().await;
        return Err(e);
    }
    replication.start(&pullers, &stop_pullers);
    pullers.spawn(crate::consumers::release::run(
        storage.clone(),
        consumers.clone(),
        stop_pullers.clone(),
    ));
    tiering.start(&pullers, &stop_pullers);
    if cfg.auth.tokens_file.is_some() {
        pullers.spawn(reload_on_sighup(
            auth.clone(),
            metrics.clone(),
            stop_pullers.clone(),
        ));
    }
    let console = crate::console::Console::new(
        storage.clone(),
        consumers.clone(),
        metrics.clone(),
        cfg.s3.is_some(),
    );
    pullers.spawn(console.clone().run(stop_pullers.clone()));
    pullers.close();
    let state = AppState::new(
        Services {
            storage: storage.clone(),
            console,
            metrics,
            replication,
            consumers,
            tiering,
            auth: auth.clone(),
            kafka_advertised,
            kafka_nodes,
            ingest: cfg.ingest.clone(),
        },
        Limits {
            max_line_bytes: cfg.max_line_bytes,
            max_body_bytes: cfg.max_body_bytes,
            max_inflight_bytes: cfg.max_inflight_bytes,
            request_timeout: cfg.request_timeout,
        },
        shutdown.clone(),
    );
    let addr = listener.local_addr().map_err(ServeError::Http)?;
    tracing::info!(%addr, node = %cfg.node, sync = %cfg.sync, peers = state.replication.peer_count(), bucket_membership = cfg.bucket_membership(), s3 = cfg.s3.as_ref().map_or("off", |s| s.bucket.as_str()), "listening");
    if auth.required() {
        tracing::info!(
            cluster_secret = auth.has_cluster_secret(),
            "tokens required on every route but /healthz"
        );
    } else {
        tracing::warn!(%addr, "no tokens configured: anyone who can reach this address may read and write (see docs/security.md)");
    }
    let limits = crate::serve::ConnectionLimits {
        idle_timeout: cfg.idle_timeout,
        max_connections: cfg.max_connections,
        open: state.metrics.connections.clone(),
        evicted: state.metrics.idle_connections_closed.clone(),
    };
    let kafka = match kafka_listener {
        Some((listener, settings)) => {
            let addr = listener.local_addr().map_err(ServeError::Http)?;
            tracing::info!(%addr, advertised = ?settings.advertised, partitions = settings.nodes.len(), "kafka listening");
            // Before the HTTP line, which scripts and tests wait for.
            println!("chunkbus kafka listening on {addr}");
            let (st, stop) = (state.clone(), shutdown.clone());
            let max_conns = cfg.max_connections;
            Some(match &cfg.tls {
                Some(tls) => {
                    let listener =
                        TlsListener::new(listener, tls.server.clone()).map_err(ServeError::Http)?;
                    tokio::spawn(crate::kafka::serve(listener, st, settings, max_conns, stop))
                }
                None => {
                    let listener = listener.tap_io(|tcp| {
                        let _ = tcp.set_nodelay(true);
                    });
                    tokio::spawn(crate::kafka::serve(listener, st, settings, max_conns, stop))
                }
            })
        }
        None => None,
    };
    let app = router(state);
    match &cfg.tls {
        Some(tls) => {
            let listener =
                TlsListener::new(listener, tls.server.clone()).map_err(ServeError::Http)?;
            println!("chunkbus listening on https://{addr}");
            crate::serve::serve(listener, app, limits, shutdown.clone()).await;
        }
        None => {
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            println!("chunkbus listening on http://{addr}");
            crate::serve::serve(listener, app, limits, shutdown.clone()).await;
        }
    }
    if let Some(kafka) = kafka {
        let _ = kafka.await;
    }
    stop_pullers.cancel();
    pullers.wait().await;
    storage.shutdown().await;
    Ok(())
}
