//! An acking consumer: `next` → handler → ack, pipelined.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use chunkbus_client::{Consumer, ConsumerConfig};
//!
//! let consumer = Consumer::new(ConsumerConfig {
//!     servers: vec!["http://127.0.0.1:8080".into()],
//!     category: "app".into(),
//!     name: "billing".into(),
//!     ..ConsumerConfig::default()
//! })?;
//! consumer
//!     .run(|batch| async move {
//!         for line in batch.data.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
//!             // process `line` idempotently: it may come again after a crash
//!             let _ = line;
//!         }
//!         Ok::<(), std::io::Error>(())
//!     })
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! The server keeps the position, so a consumer restarted anywhere resumes
//! after its last ack. A batch is acked only after the handler returned
//! `Ok`; while the handler runs, the next batch is already being fetched
//! (`next?after=`), so throughput is not one round trip per batch.

use std::future::Future;
use std::time::Duration;

use crate::{Client, ClientError, NextBatch, NextOptions};

/// Settings of a [`Consumer`].
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Base URLs of the nodes; the consumer moves to the next on errors.
    pub servers: Vec<String>,
    /// The category.
    pub category: String,
    /// The consumer's name (its position is kept per name).
    pub name: String,
    /// Most bytes per batch.
    pub max_bytes: u64,
    /// Long-poll wait of each `next`.
    pub wait: Duration,
    /// A consumer that never acked starts at the end instead of the earliest data.
    pub start_latest: bool,
    /// Return once nothing new arrived for this long (`None`: run forever).
    pub until_idle: Option<Duration>,
    /// Token presented to the nodes, when they require one.
    pub token: Option<String>,
    /// A private CA (PEM) to trust for `https://` nodes.
    pub ca_pem: Option<Vec<u8>>,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            servers: vec!["http://127.0.0.1:8080".into()],
            category: String::new(),
            name: String::new(),
            max_bytes: 1 << 20,
            wait: Duration::from_secs(30),
            start_latest: false,
            until_idle: None,
            token: None,
            ca_pem: None,
        }
    }
}

/// A consumer; see the module documentation.
#[derive(Debug)]
pub struct Consumer {
    cfg: ConsumerConfig,
    clients: Vec<Client>,
}

/// What a consumer loop can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError<E> {
    /// Talking to the servers failed in a way retrying does not fix.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The handler failed; the batch was not acked.
    #[error("handler failed: {0}")]
    Handler(E),
}

impl Consumer {
    /// A consumer for `cfg`.
    pub fn new(cfg: ConsumerConfig) -> Result<Self, ClientError> {
        crate::names::validate_category(&cfg.category)?;
        crate::names::validate_consumer(&cfg.name)?;
        let clients = cfg
            .servers
            .iter()
            .map(|s| Client::with_tls(s, cfg.token.as_deref(), cfg.ca_pem.as_deref()))
            .collect::<Result<Vec<_>, _>>()?;
        if clients.is_empty() {
            return Err(ClientError::BadUrl {
                url: String::new(),
                reason: "a consumer needs at least one server".into(),
            });
        }
        Ok(Self { cfg, clients })
    }

    async fn fetch(
        &self,
        server: &mut usize,
        after: Option<(String, u64)>,
        wait: Duration,
    ) -> Result<Option<NextBatch>, ClientError> {
        let mut backoff = Duration::from_millis(50);
        loop {
            let client = &self.clients[*server % self.clients.len()];
            let opts = NextOptions {
                max_bytes: self.cfg.max_bytes,
                wait,
                start_latest: self.cfg.start_latest,
                after: after.clone(),
            };
            match client.next(&self.cfg.category, &self.cfg.name, &opts).await {
                Ok(b) => return Ok(b),
                Err(e) if e.is_retryable() => {
                    tracing::warn!(server = %client.base_url(), error = %e, "next failed; trying the next server");
                    *server += 1;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn ack(&self, server: &mut usize, batch: &NextBatch) -> Result<(), ClientError> {
        let mut backoff = Duration::from_millis(50);
        loop {
            let client = &self.clients[*server % self.clients.len()];
            match client
                .ack(
                    &self.cfg.category,
                    &self.cfg.name,
                    &batch.chunk,
                    batch.next_offset,
                )
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if e.is_retryable() => {
                    *server += 1;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Runs `handler` on every batch, acking each after it returned `Ok`.
    /// Returns when `until_idle` passed without new lines, or on the first
    /// handler error (that batch is not acked).
    pub async fn run<F, Fut, E>(&self, mut handler: F) -> Result<(), ConsumeError<E>>
    where
        F: FnMut(NextBatch) -> Fut,
        Fut: Future<Output = Result<(), E>>,
    {
        let mut server = 0usize;
        let wait = self
            .cfg
            .until_idle
            .map_or(self.cfg.wait, |d| d.min(self.cfg.wait));
        let mut idle_since = tokio::time::Instant::now();
        let mut current = self.fetch(&mut server, None, wait).await?;
        loop {
            let Some(batch) = current.take() else {
                if self
                    .cfg
                    .until_idle
                    .is_some_and(|d| idle_since.elapsed() >= d)
                {
                    return Ok(());
                }
                current = self.fetch(&mut server, None, wait).await?;
                continue;
            };
            idle_since = tokio::time::Instant::now();
            let after = Some((batch.chunk.clone(), batch.next_offset));
            let mut ahead_server = server;
            // Fetch the next batch while the handler runs; ack as soon as
            // the handler is done, without waiting for the fetch.
            let process = async {
                handler(batch.clone())
                    .await
                    .map_err(ConsumeError::Handler)?;
                self.ack(&mut server, &batch).await?;
                Ok::<(), ConsumeError<E>>(())
            };
            let (processed, ahead) =
                tokio::join!(process, self.fetch(&mut ahead_server, after, wait));
            processed?;
            current = ahead?;
        }
    }
}
