//! `chunkbus consume -c CATEGORY --consumer NAME`: lines to stdout, acked
//! only after they are written and flushed.

use std::io::Write;
use std::time::Duration;

use chunkbus_client::{ConsumeError, Consumer, ConsumerConfig};

/// Options of `consume`.
#[derive(Debug, Clone)]
pub struct ConsumeArgs {
    /// Nodes (the consumer moves on when one fails).
    pub servers: Vec<String>,
    /// Category.
    pub category: String,
    /// Consumer name.
    pub consumer: String,
    /// Exit once nothing new arrived for this long.
    pub until_idle: Option<Duration>,
    /// A new consumer starts at the end.
    pub start_latest: bool,
    /// Token to present.
    pub token: Option<String>,
    /// Private CA to trust.
    pub ca_pem: Option<Vec<u8>>,
}

/// Runs the consumer until idle (or forever).
pub async fn consume(args: ConsumeArgs) -> Result<(), String> {
    let consumer = Consumer::new(ConsumerConfig {
        servers: args.servers,
        category: args.category,
        name: args.consumer,
        until_idle: args.until_idle,
        start_latest: args.start_latest,
        token: args.token,
        ca_pem: args.ca_pem,
        ..ConsumerConfig::default()
    })
    .map_err(|e| e.to_string())?;
    consumer
        .run(|batch| async move {
            tokio::task::spawn_blocking(move || {
                let mut out = std::io::stdout().lock();
                out.write_all(&batch.data)?;
                out.flush()
            })
            .await
            .map_err(std::io::Error::other)?
        })
        .await
        .map_err(|e| match e {
            ConsumeError::Handler(e) => format!("cannot write to stdout: {e}"),
            ConsumeError::Client(e) => e.to_string(),
        })
}
