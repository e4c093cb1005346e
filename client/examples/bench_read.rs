//! Benchmark helper for `scripts/bench`: fills a category, or reads all of
//! it sequentially through `GET /v1/categories/{c}/chunks/{chunk}`.
//!
//! ```text
//! cargo run --release -p chunkbus-client --example bench_read -- fill URL CATEGORY MIB
//! cargo run --release -p chunkbus-client --example bench_read -- read URL CATEGORY
//! ```
//!
//! `read` prints one line: `bytes=N seconds=S mib_per_s=R requests=Q`.

use std::time::Instant;

use chunkbus_client::{Client, ProduceOptions};

/// Size of each produce request while filling.
const FILL_BODY_BYTES: usize = 8 << 20;
/// `max_bytes` of each read.
const READ_MAX_BYTES: u64 = 16 << 20;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, url, category, rest @ ..] = &args[..] else {
        return Err("usage: bench_read fill URL CATEGORY MIB | read URL CATEGORY".into());
    };
    let client = Client::new(url)?;
    match mode.as_str() {
        "fill" => {
            let mib: usize = rest.first().ok_or("fill needs MIB")?.parse()?;
            let line = format!("{{\"msg\":\"{}\"}}\n", "x".repeat(100));
            let body = line.repeat(FILL_BODY_BYTES / line.len());
            let opts = ProduceOptions {
                sync: Some(false),
                ..ProduceOptions::default()
            };
            let mut written = 0usize;
            while written < mib << 20 {
                client.produce(category, body.clone(), &opts).await?;
                written += body.len();
            }
            println!("filled bytes={written}");
        }
        "read" => {
            let started = Instant::now();
            let (mut bytes, mut requests) = (0u64, 0u64);
            for chunk in client.chunks(category).await? {
                let mut offset = 0;
                while offset < chunk.size {
                    let r = client
                        .read_chunk(category, &chunk.name, offset, READ_MAX_BYTES)
                        .await?;
                    bytes += r.data.len() as u64;
                    requests += 1;
                    offset = r.next_offset;
                }
            }
            let secs = started.elapsed().as_secs_f64();
            println!(
                "bytes={bytes} seconds={secs:.3} mib_per_s={:.1} requests={requests}",
                bytes as f64 / secs / (1 << 20) as f64
            );
        }
        other => return Err(format!("unknown mode {other:?}").into()),
    }
    Ok(())
}
