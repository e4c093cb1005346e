//! A batching producer: lines in, batches out, retried on another node.
//!
//! ```no_run
//! # async fn demo() -> Result<(), chunkbus_client::ClientError> {
//! use chunkbus_client::{Compression, Producer, ProducerConfig};
//!
//! let producer = Producer::new(ProducerConfig {
//!     servers: vec!["http://10.0.0.1:8080".into(), "http://10.0.0.2:8080".into()],
//!     category: "app".into(),
//!     compression: Compression::Zstd,
//!     ..ProducerConfig::default()
//! })?;
//! let delivery = producer.send("{\"msg\":\"hello\"}\n").await?;
//! delivery.wait().await?; // the server acknowledged the batch holding it
//! producer.close().await?;
//! # Ok(()) }
//! ```
//!
//! Lines are gathered into a batch until it holds `max_batch_bytes` or
//! `max_batch_lines`, or `linger` has passed since its first line, then sent
//! (compressed when asked), each to the next server in turn. By default one
//! batch is in flight at a time, so batches are stored in the order they
//! were sent; `max_in_flight` trades that order for throughput. A batch that fails with a connection
//! error, 408, 429 or 5xx is sent again after a capped, jittered backoff;
//! any other error fails the batch's deliveries. Memory is bounded: `send`
//! waits while `max_buffered_bytes` are not yet acknowledged.
//!
//! Batches are idempotent by default (`idempotent`): each carries this
//! producer's id and its own sequence number, and a batch whose failure
//! says it may have been stored (a timeout, a connection lost after
//! sending, a 5xx other than 503) is retried once on the same server,
//! which answers with the original position instead of storing it again.
//! Other failures, and a second one, move the batch to the next server,
//! where a copy the first server stored would be stored again: delivery
//! stays at least once (docs/consumers.md).

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::{Client, ClientError, ProduceOptions, ProduceResponse};

/// zstd level of batches: the fastest level, since batches are compressed
/// on the sending path (log lines still shrink several times).
const ZSTD_LEVEL: i32 = 1;

/// How batches are compressed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// As they are.
    #[default]
    None,
    /// `Content-Encoding: gzip`.
    Gzip,
    /// `Content-Encoding: zstd`.
    Zstd,
}

/// Settings of a [`Producer`].
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// Base URLs of the nodes to send to (any node takes any write).
    pub servers: Vec<String>,
    /// The category.
    pub category: String,
    /// Send a batch once it holds this many bytes.
    pub max_batch_bytes: usize,
    /// Send a batch once it holds this many lines.
    pub max_batch_lines: usize,
    /// Send a batch this long after its first line at the latest.
    pub linger: Duration,
    /// Compression of batches.
    pub compression: Compression,
    /// Bytes accepted by `send` and not yet acknowledged, at most.
    pub max_buffered_bytes: usize,
    /// Durability asked of the server for each batch.
    pub options: ProduceOptions,
    /// Longest wait between two attempts of one batch.
    pub max_backoff: Duration,
    /// Batches sent at the same time. With more than one, throughput no
    /// longer waits on each round trip, but batches may be stored out of
    /// order (each batch stays whole and in order).
    pub max_in_flight: usize,
    /// Token presented to the nodes, when they require one.
    pub token: Option<String>,
    /// A private CA (PEM) to trust for `https://` nodes.
    pub ca_pem: Option<Vec<u8>>,
    /// Send each batch with this producer's id and a sequence number, so
    /// that a node answers a retry of a batch it stored with the original
    /// position (see the module documentation).
    pub idempotent: bool,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        Self {
            servers: vec!["http://127.0.0.1:8080".into()],
            category: String::new(),
            max_batch_bytes: 1 << 20,
            max_batch_lines: 100_000,
            linger: Duration::from_millis(20),
            compression: Compression::None,
            max_buffered_bytes: 64 << 20,
            options: ProduceOptions::default(),
            max_backoff: Duration::from_secs(5),
            max_in_flight: 1,
            token: None,
            ca_pem: None,
            idempotent: true,
        }
    }
}

/// Resolves when the batch holding some lines was acknowledged.
#[derive(Debug)]
pub struct Delivery {
    rx: oneshot::Receiver<Result<ProduceResponse, Arc<ClientError>>>,
}

impl Delivery {
    /// Waits for the server's acknowledgement of the batch.
    pub async fn wait(self) -> Result<ProduceResponse, ClientError> {
        match self.rx.await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(ClientError::Protocol {
                url: String::new(),
                reason: format!("batch failed: {e}"),
            }),
            Err(_) => Err(ClientError::Protocol {
                url: String::new(),
                reason: "the producer stopped before the batch was sent".into(),
            }),
        }
    }
}

#[derive(Debug)]
enum Cmd {
    Lines {
        data: Bytes,
        lines: usize,
        permit: OwnedSemaphorePermit,
        done: oneshot::Sender<Result<ProduceResponse, Arc<ClientError>>>,
    },
    Flush(oneshot::Sender<()>),
}

/// A batching, retrying producer. See the module documentation.
#[derive(Debug)]
pub struct Producer {
    tx: mpsc::Sender<Cmd>,
    memory: Arc<Semaphore>,
    max_buffered: usize,
    task: JoinHandle<()>,
}

impl Producer {
    /// Starts a producer (its batching task runs on the current runtime).
    pub fn new(cfg: ProducerConfig) -> Result<Self, ClientError> {
        crate::names::validate_category(&cfg.category)?;
        if cfg.servers.is_empty() {
            return Err(ClientError::BadUrl {
                url: String::new(),
                reason: "a producer needs at least one server".into(),
            });
        }
        let clients = cfg
            .servers
            .iter()
            .map(|s| Client::with_tls(s, cfg.token.as_deref(), cfg.ca_pem.as_deref()))
            .collect::<Result<Vec<_>, _>>()?;
        let (tx, rx) = mpsc::channel(1024);
        let memory = Arc::new(Semaphore::new(cfg.max_buffered_bytes));
        let max_buffered = cfg.max_buffered_bytes;
        let task = tokio::spawn(run(cfg, clients, rx));
        Ok(Self {
            tx,
            memory,
            max_buffered,
            task,
        })
    }

    /// Queues lines (each ending with `\n`; one is added when the last
    /// lacks it). Waits while the memory bound is reached.
    pub async fn send(&self, lines: impl Into<Bytes>) -> Result<Delivery, ClientError> {
        let mut data: Bytes = lines.into();
        if data.last() != Some(&b'\n') {
            let mut b = BytesMut::with_capacity(data.len() + 1);
            b.extend_from_slice(&data);
            b.extend_from_slice(b"\n");
            data = b.freeze();
        }
        let n = data.len().min(self.max_buffered);
        let permit = self
            .memory
            .clone()
            .acquire_many_owned(n as u32)
            .await
            .map_err(|_| stopped())?;
        let lines = memchr::memchr_iter(b'\n', &data).count();
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Lines {
                data,
                lines,
                permit,
                done,
            })
            .await
            .map_err(|_| stopped())?;
        Ok(Delivery { rx })
    }

    /// Sends what is batched now and waits until every line sent before
    /// was acknowledged (or failed).
    pub async fn flush(&self) -> Result<(), ClientError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Flush(done))
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())
    }

    /// Flushes and stops.
    pub async fn close(self) -> Result<(), ClientError> {
        self.flush().await?;
        drop(self.tx);
        self.task.await.map_err(|_| stopped())
    }
}

fn stopped() -> ClientError {
    ClientError::Protocol {
        url: String::new(),
        reason: "the producer has stopped".into(),
    }
}

struct Batch {
    /// Its sequence number (idempotent producers).
    sequence: u64,
    data: BytesMut,
    lines: usize,
    waiters: Vec<oneshot::Sender<Result<ProduceResponse, Arc<ClientError>>>>,
    permits: Vec<OwnedSemaphorePermit>,
    started: Option<tokio::time::Instant>,
}

impl Batch {
    fn new() -> Self {
        Self {
            sequence: 0,
            data: BytesMut::new(),
            lines: 0,
            waiters: Vec::new(),
            permits: Vec::new(),
            started: None,
        }
    }
}

async fn run(cfg: ProducerConfig, clients: Vec<Client>, mut rx: mpsc::Receiver<Cmd>) {
    let mut out = Sender {
        slots: Arc::new(Semaphore::new(cfg.max_in_flight.max(1))),
        tasks: tokio::task::JoinSet::new(),
        next_server: 0,
        cfg: Arc::new(cfg),
        clients: Arc::new(clients),
        id: Arc::from(producer_id()),
        next_sequence: 0,
    };
    let cfg = out.cfg.clone();
    let mut batch = Batch::new();
    loop {
        while out.tasks.try_join_next().is_some() {}
        let deadline = batch.started.map(|t| t + cfg.linger);
        let cmd = tokio::select! {
            cmd = rx.recv() => cmd,
            _ = sleep_until(deadline) => {
                out.dispatch(std::mem::replace(&mut batch, Batch::new())).await;
                continue;
            }
        };
        match cmd {
            None => break,
            Some(Cmd::Flush(done)) => {
                out.dispatch(std::mem::replace(&mut batch, Batch::new()))
                    .await;
                while out.tasks.join_next().await.is_some() {}
                let _ = done.send(());
            }
            Some(Cmd::Lines {
                data,
                lines,
                permit,
                done,
            }) => {
                if !batch.data.is_empty() && batch.data.len() + data.len() > cfg.max_batch_bytes {
                    out.dispatch(std::mem::replace(&mut batch, Batch::new()))
                        .await;
                }
                batch.data.extend_from_slice(&data);
                batch.lines += lines;
                batch.waiters.push(done);
                batch.permits.push(permit);
                batch.started.get_or_insert_with(tokio::time::Instant::now);
                if batch.data.len() >= cfg.max_batch_bytes || batch.lines >= cfg.max_batch_lines {
                    out.dispatch(std::mem::replace(&mut batch, Batch::new()))
                        .await;
                }
            }
        }
    }
    out.dispatch(batch).await;
    while out.tasks.join_next().await.is_some() {}
}

/// Sends batches, at most `max_in_flight` at a time, each to the next server.
struct Sender {
    slots: Arc<Semaphore>,
    tasks: tokio::task::JoinSet<()>,
    next_server: usize,
    cfg: Arc<ProducerConfig>,
    clients: Arc<Vec<Client>>,
    /// This producer's id.
    id: Arc<str>,
    next_sequence: u64,
}

/// A producer id unlikely to be any other's: 128 random bits (from the
/// standard library's randomly keyed hasher) in hex.
fn producer_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut bits = [0u64; 2];
    for (i, b) in bits.iter_mut().enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(i);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.write_u32(std::process::id());
        *b = h.finish();
    }
    format!("p-{:016x}{:016x}", bits[0], bits[1])
}

impl Sender {
    async fn dispatch(&mut self, mut batch: Batch) {
        if batch.data.is_empty() {
            return;
        }
        batch.sequence = self.next_sequence;
        self.next_sequence += 1;
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        let server = self.next_server;
        self.next_server += 1;
        let (cfg, clients) = (self.cfg.clone(), self.clients.clone());
        let id = cfg.idempotent.then(|| self.id.clone());
        self.tasks.spawn(async move {
            send_batch(&cfg, &clients, server, id.as_deref(), batch).await;
            drop(slot);
        });
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn encode(c: Compression, data: &[u8]) -> (Bytes, Option<&'static str>) {
    match c {
        Compression::None => (Bytes::copy_from_slice(data), None),
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data).expect("writing to memory");
            (
                Bytes::from(e.finish().expect("writing to memory")),
                Some("gzip"),
            )
        }
        Compression::Zstd => (
            Bytes::from(zstd::encode_all(data, ZSTD_LEVEL).expect("writing to memory")),
            Some("zstd"),
        ),
    }
}

/// Sends one batch, retrying transient failures (see the module
/// documentation for where).
async fn send_batch(
    cfg: &ProducerConfig,
    clients: &[Client],
    mut server: usize,
    id: Option<&str>,
    batch: Batch,
) {
    let (body, encoding) = encode(cfg.compression, &batch.data);
    let mut backoff = Duration::from_millis(50);
    let mut retried_here = false;
    let result = loop {
        let client = &clients[server % clients.len()];
        let sent = match id {
            Some(id) => {
                client
                    .produce_idempotent(
                        &cfg.category,
                        body.clone(),
                        encoding,
                        &cfg.options,
                        id,
                        batch.sequence,
                    )
                    .await
            }
            None => {
                client
                    .produce_encoded(&cfg.category, body.clone(), encoding, &cfg.options)
                    .await
            }
        };
        match sent {
            Ok(r) => break Ok(r),
            Err(e) if e.is_retryable() => {
                if id.is_some() && e.may_be_stored() && !retried_here {
                    tracing::warn!(server = %client.base_url(), error = %e, "batch may have been stored; retrying on the same server");
                    retried_here = true;
                } else {
                    tracing::warn!(server = %client.base_url(), error = %e, "batch not accepted; retrying on the next server");
                    retried_here = false;
                    server += 1;
                }
                let jitter = 0.5 + f64::from(std::process::id() % 7 + (server as u32 % 5)) / 12.0;
                tokio::time::sleep(backoff.mul_f64(jitter)).await;
                backoff = (backoff * 2).min(cfg.max_backoff);
            }
            Err(e) => break Err(Arc::new(e)),
        }
    };
    for w in batch.waiters {
        let _ = w.send(result.clone());
    }
    drop(batch.permits);
}
