//! `chunkbus produce -c CATEGORY [FILE]...`: lines from files or stdin.

use std::io::Read;
use std::time::Instant;

use bytes::Bytes;
use chunkbus_client::{Compression, ProduceOptions, Producer, ProducerConfig};

/// Bytes read from the input at a time.
const READ_BLOCK_BYTES: usize = 1 << 20;

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

/// Sends every line of the inputs; prints a summary (and a progress bar on
/// a terminal, with an ETA when every input is a file) to stderr.
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
    // Open every input first: a missing file fails before anything is sent,
    // and the total is known for the bar.
    let mut opened: Vec<Box<dyn Read + Send>> = Vec::new();
    let mut total = Some(0u64);
    for input in &inputs {
        match input {
            Some(path) => {
                let f = std::fs::File::open(path)
                    .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
                let len = f.metadata().map(|m| m.len()).ok();
                total = total.zip(len).map(|(a, b)| a + b);
                opened.push(Box::new(f));
            }
            None => {
                total = None;
                opened.push(Box::new(std::io::stdin()));
            }
        }
    }
    let mut progress = super::progress::Progress::new(&args.category, total, true);
    for mut reader in opened {
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
            progress.add(
                n as u64,
                memchr::memchr_iter(b'\n', &block[..n]).count() as u64,
            );
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
    }
    producer.close().await.map_err(|e| e.to_string())?;
    for d in deliveries {
        d.wait().await.map_err(|e| e.to_string())?;
    }
    progress.finish();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "produced {:.1} MiB to {} in {secs:.2} s ({:.1} MiB/s)",
        sent as f64 / 1048576.0,
        args.category,
        sent as f64 / 1048576.0 / secs.max(1e-9)
    );
    Ok(())
}
