//! The HTTP connection loop: every accepted connection is served by hyper
//! with its timer set, so that a connection that sends no complete request
//! header within `--idle-timeout` is closed: a socket that never speaks,
//! headers sent a byte at a time, a keep-alive connection left idle between
//! requests. (Without a timer hyper applies no header timeout at all, and
//! such sockets held a `--max-connections` slot forever.) Request bodies
//! have their own bound (`--request-timeout`, in the handlers).
//!
//! Shutdown: once `shutdown` is cancelled no connection is accepted; each
//! open one finishes the request it is serving and closes (long polls
//! return at once); after [`DRAIN_DEADLINE`] the rest are dropped.

use std::time::Duration;

use axum::Router;
use axum::serve::Listener;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

/// Longest the connections may take to finish after shutdown began.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(30);

/// Serves `app` on every connection `listener` accepts until `shutdown`.
pub async fn serve<L>(
    mut listener: L,
    app: Router,
    idle_timeout: Duration,
    shutdown: CancellationToken,
) where
    L: Listener,
    L::Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(idle_timeout)
        .keep_alive(true);
    let graceful = GracefulShutdown::new();
    loop {
        let (io, _addr) = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => break,
        };
        let service = TowerToHyperService::new(app.clone());
        let conn = graceful.watch(http1.serve_connection(TokioIo::new(io), service));
        // Owned by the graceful-shutdown watcher, which waits for it below.
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_DEADLINE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(deadline = ?DRAIN_DEADLINE, "connections still open after the shutdown deadline; closing them");
    }
}
