//! Benchmark helper for `scripts/bench s3`: the S3 tier against a local
//! S3-compatible server (s3s-fs, in this process, over HTTP on loopback).
//!
//! ```text
//! bench_s3 CHUNKBUS_BINARY WORK_DIR SECONDS
//! ```
//!
//! Prints one line per figure:
//! - `store`: the store's own upload speed (4 streams of 16 MiB PUTs with
//!   Content-MD5, the uploader's settings), the ceiling of the rest;
//! - `ingest`: a node with S3 on, 1 MiB bodies as fast as it takes them:
//!   ingest MiB/s, and upload MiB/s until the backlog is drained;
//! - `sustained`: 100 MiB/s offered for SECONDS: the backlog's peak and
//!   final size (bounded means the uploads keep up);
//! - `read-through`: a 256 MiB category whose chunks were all evicted, read
//!   back through the node (ranged GETs to S3) 16 MiB at a time.
//!
//! The S3 credentials come from the environment (`scripts/bench` sets them
//! to the ones this server accepts).

#[path = "../tests/it/s3_server.rs"]
mod s3_server;

use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chunkbus::upload::{ChecksumMode, ObjectStore, S3Config};
use chunkbus_client::{Client, ProduceOptions};
use tokio::io::{AsyncBufReadExt, BufReader};

const MIB: f64 = (1 << 20) as f64;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [bin, work, secs] = &args[..] else {
        return Err("usage: bench_s3 CHUNKBUS_BINARY WORK_DIR SECONDS".into());
    };
    let secs: u64 = secs.parse()?;
    let work = std::path::PathBuf::from(work);
    let s3 = s3_server::TestS3::start_in(&work.join("s3"), "127.0.0.1:0".parse()?).await;

    // The store alone.
    let store = ObjectStore::connect(&S3Config {
        bucket: s3_server::BUCKET.into(),
        prefix: "raw/".into(),
        endpoint: Some(s3.endpoint()),
        region: Some("us-east-1".into()),
        checksum: ChecksumMode::Md5,
        part_bytes: 16 << 20,
        concurrency: 4,
        claim_refresh: chunkbus::upload::DEFAULT_CLAIM_REFRESH,
        bucket_membership: false,
    })
    .await;
    let part = Bytes::from(vec![b'x'; 16 << 20]);
    let started = Instant::now();
    let mut puts = tokio::task::JoinSet::new();
    for stream in 0..4 {
        let (store, part) = (store.clone(), part.clone());
        puts.spawn(async move {
            for i in 0..8 {
                store
                    .put(&format!("raw/{stream}-{i}"), part.clone(), None)
                    .await?;
            }
            Ok::<(), chunkbus::upload::S3Error>(())
        });
    }
    while let Some(r) = puts.join_next().await {
        r??;
    }
    let store_mib_s = 512.0 / started.elapsed().as_secs_f64();
    // Sequential ranged GETs of 16 MiB, as read-through does them.
    let started = Instant::now();
    for i in 0..8 {
        store.get_range(&format!("raw/0-{i}"), 0, 16 << 20).await?;
    }
    let get_mib_s = 128.0 / started.elapsed().as_secs_f64();
    println!("store        upload_mib_s={store_mib_s:.0} ranged_get_mib_s={get_mib_s:.0}");

    // A node with S3 on.
    let mut child = tokio::process::Command::new(bin)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--node",
            "bench",
            "--sync",
            "never",
        ])
        .args([
            "--max-inflight-bytes",
            "2GiB",
            "--rotate-after",
            "2s",
            "--local-retention",
            "5s",
        ])
        .args([
            "--s3-bucket",
            s3_server::BUCKET,
            "--s3-endpoint",
            &s3.endpoint(),
        ])
        .arg("--data-dir")
        .arg(work.join("node"))
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut out = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
    let url = loop {
        let line = out.next_line().await?.ok_or("the node exited")?;
        if let Some(u) = line.strip_prefix("chunkbus listening on ") {
            break u.to_owned();
        }
    };
    let client = Client::new(&url)?;
    let body = Bytes::from(format!("{}\n", "y".repeat(1023)).repeat(1024));

    // As fast as the node takes it.
    let started = Instant::now();
    let sent = produce(&client, "ingest", &body, None, Duration::from_secs(secs)).await?;
    let ingest_secs = started.elapsed().as_secs_f64();
    let drained = drain(&client).await?;
    let upload_secs = started.elapsed().as_secs_f64();
    println!(
        "ingest       ingest_mib_s={:.0} upload_mib_s={:.0} drained_after_s={:.1} uploaded_mib={:.0}",
        sent as f64 / MIB / ingest_secs,
        drained.1 as f64 / MIB / upload_secs,
        drained.0.as_secs_f64(),
        drained.1 as f64 / MIB,
    );

    // 100 MiB/s offered; the backlog must stay bounded.
    let sampler = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut peak = 0u64;
            let stop = Instant::now() + Duration::from_secs(secs);
            while Instant::now() < stop {
                if let Ok(st) = client.status().await {
                    peak = peak.max(st.s3.map_or(0, |s| s.backlog_bytes));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            peak
        })
    };
    let started = Instant::now();
    let sent = produce(
        &client,
        "sustained",
        &body,
        Some(100.0),
        Duration::from_secs(secs),
    )
    .await?;
    let offered = sent as f64 / MIB / started.elapsed().as_secs_f64();
    let peak = sampler.await?;
    let end = client.status().await?.s3.map_or(0, |s| s.backlog_bytes);
    let (drain_time, _) = drain(&client).await?;
    println!(
        "sustained    offered_mib_s={offered:.0} peak_backlog_mib={:.0} end_backlog_mib={:.0} drained_after_s={:.1}",
        peak as f64 / MIB,
        end as f64 / MIB,
        drain_time.as_secs_f64()
    );

    // Read-through of an evicted 256 MiB category.
    for _ in 0..256 {
        client
            .produce("readthrough", body.clone(), &ProduceOptions::default())
            .await?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let chunks = loop {
        let cs = client.chunks("readthrough").await?;
        if cs.iter().all(|c| c.complete && c.uploaded && !c.local) {
            break cs;
        }
        if Instant::now() > deadline {
            return Err("the category was not evicted within 2 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let started = Instant::now();
    let mut total = 0u64;
    for c in &chunks {
        let mut offset = 0;
        while offset < c.size {
            let r = client
                .read_chunk("readthrough", &c.name, offset, 16 << 20)
                .await?;
            total += r.data.len() as u64;
            offset = r.next_offset;
        }
    }
    if total != 256 << 20 {
        return Err(format!("read back {total} bytes, not 256 MiB").into());
    }
    println!(
        "read-through mib_s={:.0} chunks={}",
        total as f64 / MIB / started.elapsed().as_secs_f64(),
        chunks.len()
    );
    child.kill().await?;
    Ok(())
}

/// Posts `body` to `category` on 4 connections for `run`, at `rate` MiB/s
/// in all when given; returns the bytes acknowledged.
async fn produce(
    client: &Client,
    category: &str,
    body: &Bytes,
    rate: Option<f64>,
    run: Duration,
) -> Result<u64, Box<dyn std::error::Error>> {
    let stop = Instant::now() + run;
    let per_task = rate.map(|r| Duration::from_secs_f64(4.0 * body.len() as f64 / (r * MIB)));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (client, body, category) = (client.clone(), body.clone(), category.to_owned());
        tasks.spawn(async move {
            let mut sent = 0u64;
            let mut next = Instant::now();
            while Instant::now() < stop {
                client
                    .produce(&category, body.clone(), &ProduceOptions::default())
                    .await?;
                sent += body.len() as u64;
                if let Some(every) = per_task {
                    next += every;
                    tokio::time::sleep_until(next.into()).await;
                }
            }
            Ok::<u64, chunkbus_client::ClientError>(sent)
        });
    }
    let mut sent = 0;
    while let Some(r) = tasks.join_next().await {
        sent += r??;
    }
    Ok(sent)
}

/// Waits until every chunk is complete and uploaded; returns how long that
/// took and the bytes uploaded so far.
async fn drain(client: &Client) -> Result<(Duration, u64), Box<dyn std::error::Error>> {
    let started = Instant::now();
    loop {
        let st = client.status().await?;
        let s3 = st.s3.ok_or("S3 is off")?;
        let mut open = false;
        for c in &st.categories {
            open |= client.chunks(c).await?.iter().any(|c| !c.complete);
        }
        if s3.backlog_chunks == 0 && !open {
            return Ok((started.elapsed(), s3.uploaded_bytes));
        }
        if started.elapsed() > Duration::from_secs(300) {
            return Err("the backlog did not drain within 5 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
