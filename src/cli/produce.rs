//! `chunkbus produce -c CATEGORY [FILE]...`: lines from files or stdin.

use std::io::{IsTerminal, Read};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chunkbus_client::{Compression, ProduceOptions, Producer, ProducerConfig};

/// Bytes read from the input at a time.
const READ_BLOCK_BYTES: usize = 1 << 20;
/// How often the progress line is redrawn.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// Options of `produce`.
#[derive(Debug, Clone)]
pub struct ProduceArgs {
    /// Nodes to send to.
    pub servers: Vec<String>,
    /// Category.
    pub category: String,
    /// Input files; stdin when empty or `-`.
    pub files: Vec<std::path::PathBuf>,
    /// Compression of batches.
    pub compression: Compression,
    /// Durability asked for.
    pub options: ProduceOptions,
    /// Token to present.
    pub token: Option<String>,
    /// Private CA to trust.
    pub ca_pem: Option<Vec<u8>>,
}

/// Sends every line of the inputs; prints a summary (and a progress line
/// on a terminal when reading files) to stderr.
pub async fn produce(args: ProduceArgs) -> Result<(), String> {
    let producer = Producer::new(ProducerConfig {
        servers: args.servers.clone(),
        category: args.category.clone(),
        compression: args.compression,
        options: args.options.clone(),
        token: args.token.clone(),
        ca_pem: args.ca_pem.clone(),
        ..ProducerConfig::default()
    })
    .map_err(|e| e.to_string())?;
    let inputs: Vec<Option<std::path::PathBuf>> = if args.files.is_empty() {
        vec![None]
    } else {
        args.files
            .iter()
            .map(|f| (f.as_os_str() != "-").then(|| f.clone()))
            .collect()
    };
    let started = Instant::now();
    let mut sent = 0u64;
    let mut deliveries = Vec::new();
    for input in inputs {
        let (mut reader, total): (Box<dyn Read + Send>, Option<u64>) = match &input {
            Some(path) => {
                let f = std::fs::File::open(path)
                    .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
                let len = f.metadata().map(|m| m.len()).ok();
                (Box::new(f), len)
            }
            None => (Box::new(std::io::stdin()), None),
        };
        let show = total.is_some() && std::io::stderr().is_terminal();
        let mut last_draw = Instant::now();
        let mut done_in_file = 0u64;
        let mut carry: Vec<u8> = Vec::new();
        loop {
            let (block, r) = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; READ_BLOCK_BYTES];
                let n = reader.read(&mut buf);
                (buf, n.map(|n| (n, reader)))
            })
            .await
            .map_err(|e| e.to_string())?;
            let (n, back) = r.map_err(|e| format!("cannot read input: {e}"))?;
            reader = back;
            if n == 0 {
                break;
            }
            carry.extend_from_slice(&block[..n]);
            done_in_file += n as u64;
            // Send whole lines; keep a partial last line for the next block.
            if let Some(last) = memchr::memrchr(b'\n', &carry) {
                let rest = carry.split_off(last + 1);
                let whole = std::mem::replace(&mut carry, rest);
                sent += whole.len() as u64;
                deliveries.push(
                    producer
                        .send(Bytes::from(whole))
                        .await
                        .map_err(|e| e.to_string())?,
                );
            }
            if show && last_draw.elapsed() >= PROGRESS_EVERY {
                last_draw = Instant::now();
                let total = total.unwrap_or(1).max(1);
                eprint!(
                    "\r{}: {:5.1}% {:>8.1} MiB  {:>7.1} MiB/s ",
                    input
                        .as_ref()
                        .map_or("stdin".into(), |p| p.display().to_string()),
                    done_in_file as f64 * 100.0 / total as f64,
                    done_in_file as f64 / 1048576.0,
                    sent as f64 / 1048576.0 / started.elapsed().as_secs_f64()
                );
            }
            // Keep the list of pending deliveries short.
            if deliveries.len() > 256 {
                for d in deliveries.drain(..) {
                    d.wait().await.map_err(|e| e.to_string())?;
                }
            }
        }
        if !carry.is_empty() {
            sent += carry.len() as u64 + 1;
            deliveries.push(
                producer
                    .send(Bytes::from(carry))
                    .await
                    .map_err(|e| e.to_string())?,
            );
        }
        if show {
            eprintln!();
        }
    }
    producer.close().await.map_err(|e| e.to_string())?;
    for d in deliveries {
        d.wait().await.map_err(|e| e.to_string())?;
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "produced {:.1} MiB to {} in {secs:.2} s ({:.1} MiB/s)",
        sent as f64 / 1048576.0,
        args.category,
        sent as f64 / 1048576.0 / secs.max(1e-9)
    );
    Ok(())
}
