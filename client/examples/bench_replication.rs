//! Benchmark helper for `scripts/bench`: replication lag of a 3-node cluster.
//!
//! ```text
//! bench_replication MIB_PER_S SECONDS URL1 URL2 URL3
//! ```
//!
//! Producers write ~2.5 KB bodies to every node at a fixed total rate.
//! Followers long-poll every node's copy of every other node's chunks. The
//! lag of a write is the time from the owner's 200 to the moment its bytes
//! are readable on another node; each write is measured on both other
//! nodes, after a warm-up of a few seconds. Prints one line:
//! `samples=N missing=M p50_ms=.. p99_ms=.. max_ms=.. mib_per_s=..`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chunkbus_client::{ChunkName, Client, ClientError, ProduceOptions};

const CATEGORY: &str = "replbench";
const PRODUCERS_PER_NODE: usize = 8;
/// Time followers keep reading after producers stop.
const DRAIN: Duration = Duration::from_secs(3);
/// Writes in the first seconds (connections opening, categories created on
/// every node) are not measured.
const WARMUP: Duration = Duration::from_secs(3);

/// (chunk index, offset, when) in the order they happened.
type Marks = Arc<Mutex<Vec<(u32, u64, Instant)>>>;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [rate, secs, urls @ ..] = &args[..] else {
        return Err("usage: bench_replication MIB_PER_S SECONDS URL...".into());
    };
    let rate: f64 = rate.parse()?;
    let run = Duration::from_secs(secs.parse()?);
    let clients: Vec<Client> = urls
        .iter()
        .map(|u| Client::new(u))
        .collect::<Result<_, _>>()?;
    let mut names = Vec::new();
    for c in &clients {
        names.push(c.status().await?.node);
    }
    let line = r#"{"ts":"2026-11-22T01:00:00.000Z","level":"info","service":"checkout","msg":"request served","status":200,"dur_ms":12,"path":"/api/v1/items"}"#;
    let body: String = format!("{line}\n").repeat(16);
    let per_second = rate * (1 << 20) as f64 / body.len() as f64;
    let tasks = (clients.len() * PRODUCERS_PER_NODE) as f64;
    let interval = Duration::from_secs_f64(tasks / per_second);

    let acks: Vec<Marks> = clients.iter().map(|_| Marks::default()).collect();
    let start = Instant::now();
    let measure_from = start + WARMUP;
    let stop_at = measure_from + run;
    let mut handles = Vec::new();
    for (o, client) in clients.iter().enumerate() {
        for p in 0..PRODUCERS_PER_NODE {
            let (client, acks, body) = (client.clone(), acks[o].clone(), body.clone());
            let offset = interval.mul_f64(p as f64 / PRODUCERS_PER_NODE as f64);
            handles.push(tokio::spawn(async move {
                let opts = ProduceOptions {
                    sync: Some(false),
                    ..ProduceOptions::default()
                };
                let mut next = start + offset;
                let mut bytes = 0u64;
                while next < stop_at {
                    tokio::time::sleep_until(next.into()).await;
                    next += interval;
                    if let Ok(r) = client.produce(CATEGORY, body.clone(), &opts).await {
                        let chunk = ChunkName::parse(&r.chunk.unwrap()).unwrap();
                        let now = Instant::now();
                        if now >= measure_from {
                            acks.lock().unwrap().push((chunk.index, r.next_offset, now));
                            bytes += body.len() as u64;
                        }
                    }
                }
                bytes
            }));
        }
    }
    let mut followers = Vec::new();
    for (o, owner) in names.iter().enumerate() {
        for (r, replica) in clients.iter().enumerate() {
            if r == o {
                continue;
            }
            let seen = Marks::default();
            followers.push((o, seen.clone()));
            let (replica, owner) = (replica.clone(), owner.clone());
            tokio::spawn(follow(replica, owner, seen, stop_at + DRAIN));
        }
    }
    let mut bytes = 0;
    for h in handles {
        bytes += h.await?;
    }
    tokio::time::sleep_until((stop_at + DRAIN).into()).await;

    let mut lags = Vec::new();
    let mut missing = 0;
    for (o, seen) in &followers {
        let seen = seen.lock().unwrap();
        for &(index, off, t_ack) in acks[*o].lock().unwrap().iter() {
            match seen.iter().find(|&&(i, s, _)| (i, s) >= (index, off)) {
                Some(&(_, _, t_seen)) => lags.push(t_seen.saturating_duration_since(t_ack)),
                None => missing += 1,
            }
        }
    }
    lags.sort();
    let pct = |p: f64| -> f64 {
        if lags.is_empty() {
            return f64::NAN;
        }
        lags[((lags.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1000.0
    };
    println!(
        "samples={} missing={missing} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} mib_per_s={:.1}",
        lags.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0),
        bytes as f64 / run.as_secs_f64() / (1 << 20) as f64
    );
    Ok(())
}

/// Reads `owner`'s chunks on `replica` in order, long-polling at the end,
/// and records when each position became readable.
async fn follow(replica: Client, owner: String, seen: Marks, until: Instant) {
    let (mut index, mut offset) = (0u32, 0u64);
    while Instant::now() < until {
        let chunk = ChunkName::new(owner.clone(), index).to_string();
        match replica
            .read_chunk_wait(CATEGORY, &chunk, offset, 16 << 20, Duration::from_secs(1))
            .await
        {
            Ok(r) => {
                if r.next_offset > offset {
                    offset = r.next_offset;
                    seen.lock().unwrap().push((index, offset, Instant::now()));
                }
                if r.complete && offset == r.chunk_size {
                    index += 1;
                    offset = 0;
                }
            }
            // Not copied here yet: the chunk appears within a round trip.
            Err(ClientError::Status { .. }) => tokio::time::sleep(Duration::from_millis(1)).await,
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}
