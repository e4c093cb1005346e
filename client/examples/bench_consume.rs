//! Benchmark helper for `scripts/bench`: consumers through this crate.
//!
//! ```text
//! bench_consume throughput URL CATEGORY      # read everything as a new consumer
//! bench_consume latency URL MIB_PER_S SECONDS  # produce-to-consume latency
//! ```
//!
//! `throughput` prints `bytes=N seconds=S mib_per_s=R`. `latency` writes
//! ~2.5 KB bodies at a fixed rate while a long-polling consumer reads them;
//! every line carries its send time, and the latency of a line is the time
//! from just before its produce request to the consumer receiving it:
//! `samples=N p50_ms=.. p99_ms=.. max_ms=..`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chunkbus_client::{Client, Consumer, ConsumerConfig, ProduceOptions};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match &args[..] {
        [mode, url, category] if mode == "throughput" => throughput(url, category).await,
        [mode, url, rate, secs] if mode == "latency" => {
            latency(url, rate.parse()?, secs.parse()?).await
        }
        _ => Err(
            "usage: bench_consume throughput URL CATEGORY | latency URL MIB_PER_S SECONDS".into(),
        ),
    }
}

async fn throughput(url: &str, category: &str) -> Result<(), Box<dyn std::error::Error>> {
    let consumer = Consumer::new(ConsumerConfig {
        servers: vec![url.to_owned()],
        category: category.to_owned(),
        name: format!("bench-{}", std::process::id()),
        max_bytes: 16 << 20,
        wait: Duration::from_millis(200),
        until_idle: Some(Duration::from_millis(500)),
        ..ConsumerConfig::default()
    })?;
    let bytes = Arc::new(AtomicU64::new(0));
    let last = Arc::new(std::sync::Mutex::new(Instant::now()));
    let started = Instant::now();
    consumer
        .run(|b| {
            let (bytes, last) = (bytes.clone(), last.clone());
            async move {
                bytes.fetch_add(b.data.len() as u64, Ordering::Relaxed);
                *last.lock().unwrap() = Instant::now();
                Ok::<(), std::io::Error>(())
            }
        })
        .await?;
    let secs = last.lock().unwrap().duration_since(started).as_secs_f64();
    let bytes = bytes.load(Ordering::Relaxed);
    println!(
        "bytes={bytes} seconds={secs:.3} mib_per_s={:.1}",
        bytes as f64 / secs / 1048576.0
    );
    Ok(())
}

async fn latency(url: &str, rate: f64, secs: u64) -> Result<(), Box<dyn std::error::Error>> {
    let client = Client::new(url)?;
    let category = format!("latency-{}", std::process::id());
    let start = Instant::now();
    let run = Duration::from_secs(secs);
    let lines_per_body = 16;
    let body_bytes = 2500usize;
    let interval = Duration::from_secs_f64(body_bytes as f64 / (rate * 1048576.0));
    let producer = {
        let (client, category) = (client.clone(), category.clone());
        tokio::spawn(async move {
            let opts = ProduceOptions {
                sync: Some(false),
                ..ProduceOptions::default()
            };
            let mut next = start;
            while next < start + run {
                tokio::time::sleep_until(next.into()).await;
                next += interval;
                let sent = start.elapsed().as_nanos();
                let line = format!(
                    "{{\"sent_ns\":{sent},\"pad\":\"{}\"}}\n",
                    "x".repeat(body_bytes / lines_per_body - 30)
                );
                let _ = client
                    .produce(&category, line.repeat(lines_per_body), &opts)
                    .await;
            }
        })
    };
    let consumer = Consumer::new(ConsumerConfig {
        servers: vec![url.to_owned()],
        category: category.clone(),
        name: "latency".into(),
        wait: Duration::from_secs(1),
        until_idle: Some(Duration::from_secs(2)),
        ..ConsumerConfig::default()
    })?;
    let lags = Arc::new(std::sync::Mutex::new(Vec::new()));
    let consume = {
        let lags = lags.clone();
        async move {
            consumer
                .run(|b| {
                    let lags = lags.clone();
                    async move {
                        let now = start.elapsed().as_nanos();
                        let mut l = lags.lock().unwrap();
                        for line in b.data.split(|&c| c == b'\n').filter(|l| !l.is_empty()) {
                            let text = std::str::from_utf8(line).unwrap_or("");
                            if let Some(v) = text
                                .strip_prefix("{\"sent_ns\":")
                                .and_then(|r| r.split(',').next())
                            {
                                let sent: u128 = v.parse().unwrap_or(now);
                                l.push(Duration::from_nanos((now.saturating_sub(sent)) as u64));
                            }
                        }
                        Ok::<(), std::io::Error>(())
                    }
                })
                .await
        }
    };
    let (p, c) = tokio::join!(producer, consume);
    p?;
    c?;
    let mut lags = lags.lock().unwrap().clone();
    lags.sort();
    let pct = |p: f64| lags[((lags.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1000.0;
    println!(
        "samples={} p50_ms={:.2} p99_ms={:.2} max_ms={:.2}",
        lags.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    Ok(())
}
