//! The HTTP connection loop.
//!
//! Every accepted connection is served by hyper. A connection with no
//! request in progress for `--idle-timeout` is closed: a socket that never
//! speaks, headers sent a byte at a time, a keep-alive connection left idle
//! between requests. One sweep over the open connections finds them (a
//! tick of a quarter of the timeout, at most a second), rather than
//! hyper's header-read timer, which allocates, arms and cancels a timer for
//! every request (4 % of a one-line request's user-space instructions,
//! docs/benchmarks.md). Request bodies have their own bound
//! (`--request-timeout`, in the handlers).
//!
//! At most `--max-connections` are open at once. When the cap is full and
//! another client connects, the connection that has been idle longest (no
//! request in progress: a silent socket, a half-sent header, a keep-alive
//! connection between requests), and for at least one second, is asked
//! to close, so that sockets that do nothing cannot keep clients with
//! requests waiting until their timeout. A connection with a request in
//! progress (long polls included) is never chosen; when every connection is
//! busy, the new one waits for a slot.
//!
//! Closing an idle connection: one that never had a request (silent, or
//! part of its first header) is dropped at once; one that served requests
//! is shut down gracefully, so an answer still being sent is finished
//! first (hyper closes a keep-alive connection between requests at once).
//!
//! Shutdown: once `shutdown` is cancelled no connection is accepted; each
//! open one finishes the request it is serving and closes (long polls
//! return at once); after [`DRAIN_DEADLINE`] the rest are dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::serve::Listener;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service as _;

use crate::http::App;

/// A connection idle for less than this is not closed to make room: a
/// client that just connected, or just got an answer, has this long to
/// send its request.
const EVICT_GRACE: Duration = Duration::from_secs(1);

/// Longest the connections may take to finish after shutdown began.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(30);

/// How connections are bounded.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// `--idle-timeout`: longest a connection stays open with no request
    /// in progress (waiting for a complete request header).
    pub idle_timeout: Duration,
    /// `--max-connections`.
    pub max_connections: usize,
    /// Open connections now.
    pub open: Gauge,
    /// Idle connections closed to make room for a new one.
    pub evicted: Counter,
}

/// Largest read buffer of a connection, and so the largest request head
/// (request line and headers) accepted. A body streams through it in
/// frames that are kept until the request is answered, so each new buffer
/// is a new allocation: hyper's default (about 400 KB) made a node taking
/// 1 MiB bodies on 4 connections peak at ~50 MiB of memory; 128 KiB gives
/// ~30 MiB at the same speed (docs/benchmarks.md).
pub const READ_BUFFER_MAX_BYTES: usize = 128 << 10;

/// Serves `app` on every connection `listener` accepts until `shutdown`.
pub async fn serve<L>(
    mut listener: L,
    app: App,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) where
    L: Listener,
    L::Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        // The sweep below closes idle connections: no timer per request.
        .header_read_timeout(None)
        .max_buf_size(READ_BUFFER_MAX_BYTES)
        .keep_alive(true);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let open = Arc::new(OpenConnections::default());
    let tracker = TaskTracker::new();
    tracker.spawn(sweep_idle(
        open.clone(),
        limits.idle_timeout,
        shutdown.clone(),
    ));
    'accept: loop {
        let (io, _addr) = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => break,
        };
        // A slot, making room if the cap is full: the longest-idle
        // connection goes, and so does every one that turns idle while
        // this one waits.
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => loop {
                open.waiting.store(true, Ordering::SeqCst);
                let turned_idle = open.turned_idle.notified();
                if open.evict_longest_idle() {
                    limits.evicted.inc();
                }
                tokio::select! {
                    slot = slots.clone().acquire_owned() => {
                        open.waiting.store(false, Ordering::SeqCst);
                        break slot.expect("the connection semaphore is never closed");
                    }
                    _ = turned_idle => {}
                    // Connections idle for less than the grace become
                    // candidates.
                    _ = tokio::time::sleep(EVICT_GRACE) => {}
                    _ = shutdown.cancelled() => break 'accept,
                }
            },
        };
        let conn = open.register();
        let guard = OpenGuard {
            conn: conn.clone(),
            open: open.clone(),
            gauge: limits.open.clone(),
        };
        limits.open.inc();
        let service = {
            let (conn, open) = (conn.clone(), open.clone());
            let app = app.clone();
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let busy = Busy::start(conn.clone(), open.clone());
                let mut app = app.clone();
                async move {
                    // The app is always ready: no poll_ready needed.
                    let resp = app.call(req.map(Body::new)).await;
                    // Busy until the handler answers (a long poll while it
                    // waits). A connection chosen while its answer is still
                    // being sent finishes sending it before it closes: no
                    // wrapper around every response body is needed.
                    drop(busy);
                    resp
                }
            })
        };
        let served = http1.serve_connection(TokioIo::new(io), service);
        tracker.spawn(async move {
            let _slot = slot;
            let _guard = guard;
            tokio::pin!(served);
            let mut closing = false;
            // One signal for every reason to close (idle, room, shutdown):
            // each wake-up of the connection polls it beside the
            // connection, so every signal more is a poll more per request.
            loop {
                tokio::select! {
                    biased;
                    ended = served.as_mut() => {
                        if let Err(e) = ended {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    // Finish the request in progress, if any, then close;
                    // a connection that never had one has nothing to
                    // finish (hyper would wait for the rest of a first
                    // header cut short).
                    _ = conn.evict.notified(), if !closing => {
                        if !conn.served.load(Ordering::Acquire) {
                            break;
                        }
                        served.as_mut().graceful_shutdown();
                        closing = true;
                    }
                }
            }
        });
    }
    drop(listener);
    open.close_all();
    tracker.close();
    if tokio::time::timeout(DRAIN_DEADLINE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(deadline = ?DRAIN_DEADLINE, "connections still open after the shutdown deadline; closing them");
    }
}

/// Asks every connection with no request in progress for `idle_timeout` to
/// close, a tick of a quarter of the timeout (at most a second) at a time,
/// until `shutdown`.
async fn sweep_idle(
    open: Arc<OpenConnections>,
    idle_timeout: Duration,
    shutdown: CancellationToken,
) {
    let tick = (idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut ticks = tokio::time::interval(tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => open.close_idle(idle_timeout),
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Every open connection, to find the one idle longest.
#[derive(Debug)]
struct OpenConnections {
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    /// When the map was made; `Conn::idle_since` counts from here.
    epoch: Instant,
    /// Signalled when a connection's last request ends, while `waiting`.
    turned_idle: Notify,
    /// A new connection waits for a slot (only then is `turned_idle`
    /// signalled: a missed signal costs at most the grace, which the
    /// waiter sleeps anyway).
    waiting: AtomicBool,
}

impl Default for OpenConnections {
    fn default() -> Self {
        Self {
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            epoch: Instant::now(),
            turned_idle: Notify::new(),
            waiting: AtomicBool::new(false),
        }
    }
}

impl OpenConnections {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn register(&self) -> Arc<Conn> {
        let conn = Arc::new(Conn {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            requests: AtomicUsize::new(0),
            idle_since: AtomicU64::new(self.now()),
            served: AtomicBool::new(false),
            evict: Notify::new(),
            evicted: AtomicBool::new(false),
        });
        self.conns.lock().unwrap().insert(conn.id, conn.clone());
        conn
    }

    /// Asks every connection with no request in progress for `idle_timeout`
    /// to close.
    fn close_idle(&self, idle_timeout: Duration) {
        let idle_before = self.now().saturating_sub(idle_timeout.as_micros() as u64);
        for conn in self.conns.lock().unwrap().values() {
            if conn.requests.load(Ordering::Acquire) == 0
                && !conn.evicted.load(Ordering::Relaxed)
                && conn.idle_since.load(Ordering::Relaxed) <= idle_before
            {
                conn.evicted.store(true, Ordering::Relaxed);
                conn.evict.notify_one();
            }
        }
    }

    /// Asks every connection to close (shutdown: none is accepted any more).
    fn close_all(&self) {
        for conn in self.conns.lock().unwrap().values() {
            conn.evicted.store(true, Ordering::Relaxed);
            conn.evict.notify_one();
        }
    }

    /// Asks the connection idle longest, and for at least [`EVICT_GRACE`],
    /// to close; false when there is none.
    fn evict_longest_idle(&self) -> bool {
        let idle_before = self.now().saturating_sub(EVICT_GRACE.as_micros() as u64);
        let conns = self.conns.lock().unwrap();
        let longest = conns
            .values()
            .filter(|c| {
                c.requests.load(Ordering::Acquire) == 0
                    && !c.evicted.load(Ordering::Relaxed)
                    && c.idle_since.load(Ordering::Relaxed) <= idle_before
            })
            .min_by_key(|c| c.idle_since.load(Ordering::Relaxed));
        match longest {
            Some(conn) => {
                conn.evicted.store(true, Ordering::Relaxed);
                conn.evict.notify_one();
                true
            }
            None => false,
        }
    }
}

/// One open connection.
#[derive(Debug)]
struct Conn {
    id: u64,
    /// Requests in progress (received, not yet answered).
    requests: AtomicUsize,
    /// When its last request ended (or it was accepted), in µs from
    /// `OpenConnections::epoch`.
    idle_since: AtomicU64,
    /// A request reached the service (set before `requests` counts it).
    served: AtomicBool,
    /// Signalled when it is chosen to close (idle too long, to make room,
    /// shutdown).
    evict: Notify,
    evicted: AtomicBool,
}

/// A request in progress on a connection, from its head to its handler's
/// answer.
struct Busy {
    conn: Arc<Conn>,
    open: Arc<OpenConnections>,
}

impl Busy {
    fn start(conn: Arc<Conn>, open: Arc<OpenConnections>) -> Self {
        conn.served.store(true, Ordering::Release);
        conn.requests.fetch_add(1, Ordering::AcqRel);
        Self { conn, open }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.conn
            .idle_since
            .store(self.open.now(), Ordering::Relaxed);
        if self.conn.requests.fetch_sub(1, Ordering::SeqCst) == 1
            && self.open.waiting.load(Ordering::SeqCst)
        {
            self.open.turned_idle.notify_waiters();
        }
    }
}

/// Takes an ended connection out of the map and the gauge.
struct OpenGuard {
    conn: Arc<Conn>,
    open: Arc<OpenConnections>,
    gauge: Gauge,
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.open.conns.lock().unwrap().remove(&self.conn.id);
        self.gauge.dec();
    }
}
