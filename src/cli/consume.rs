//! `chunkbus consume -c CATEGORY --consumer NAME`: lines to stdout, acked
//! only after they are written and flushed.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
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

/// Runs the consumer until idle (or forever). With `until_idle`, stdout
/// redirected and stderr a terminal, a progress bar shows the catching up
/// (out of the consumer's lag on the first node when it has a position).
pub async fn consume(args: ConsumeArgs) -> Result<(), String> {
    let progress = match args.until_idle {
        Some(_) if !std::io::stdout().is_terminal() && std::io::stderr().is_terminal() => {
            let first = args.servers.first().and_then(|url| {
                chunkbus_client::Client::with_tls(
                    url,
                    args.token.as_deref(),
                    args.ca_pem.as_deref(),
                )
                .ok()
            });
            let total = match first {
                Some(c) => c
                    .consumer(&args.category, &args.consumer)
                    .await
                    .ok()
                    .map(|d| d.lag_bytes),
                None => None,
            };
            Some(Arc::new(Mutex::new(super::progress::Progress::new(
                &args.category,
                total,
                true,
            ))))
        }
        _ => None,
    };
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
    let result = consumer
        .run(|batch| {
            let progress = progress.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&batch.data)?;
                    out.flush()?;
                    if let Some(p) = progress {
                        let lines = memchr::memchr_iter(b'\n', &batch.data).count() as u64;
                        p.lock().unwrap().add(batch.data.len() as u64, lines);
                    }
                    Ok::<(), std::io::Error>(())
                })
                .await
                .map_err(std::io::Error::other)?
            }
        })
        .await
        .map_err(|e| match e {
            ConsumeError::Handler(e) => format!("cannot write to stdout: {e}"),
            ConsumeError::Client(e) => e.to_string(),
        });
    if let Some(p) = progress {
        let p = p.lock().unwrap();
        p.finish();
        eprintln!("consumed {} bytes", p.done());
    }
    result
}
