//! Idempotent produce (`Chunkbus-Producer`, `Chunkbus-Sequence`): a retry
//! is answered with the original position and stored once, also after a
//! restart and across SIGKILLs; a record the node cannot confirm against
//! its chunk is not trusted.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chunkbus_client::ProduceResponse;
use reqwest::StatusCode;

use crate::harness::{BinNode, TestNode, chunk_files};

async fn tagged(
    node: &TestNode,
    producer: &str,
    sequence: &str,
    body: &str,
) -> (StatusCode, String) {
    let r = node
        .http
        .post(node.url("/v1/categories/idem/lines"))
        .header("chunkbus-producer", producer)
        .header("chunkbus-sequence", sequence)
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    (r.status(), r.text().await.unwrap())
}

fn stored(node: &TestNode) -> String {
    node.files("idem")
        .into_iter()
        .map(|(_, d)| String::from_utf8(d).unwrap())
        .collect()
}

async fn repeats(node: &TestNode) -> u64 {
    let text = node.get("/metrics").await.text().await.unwrap();
    text.lines()
        .find(|l| l.contains("produce_repeats") && !l.starts_with('#'))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .expect("the produce_repeats metric")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_sequence_is_answered_with_the_original_position_and_stored_once() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = crate::harness::config(tmp.path());
    let node = TestNode::start_config(cfg.clone()).await;

    let (status, first) = tagged(&node, "p1", "0", "a\nb\n").await;
    assert_eq!(status, StatusCode::OK);
    let (status, again) = tagged(&node, "p1", "0", "a\nb\n").await;
    assert_eq!((status, &again), (StatusCode::OK, &first));
    // The body of a repeat is not stored, whatever it holds.
    let (_, other_body) = tagged(&node, "p1", "0", "different\n").await;
    assert_eq!(other_body, first);
    let (_, next) = tagged(&node, "p1", "1", "c\n").await;
    let next: ProduceResponse = serde_json::from_str(&next).unwrap();
    let first: ProduceResponse = serde_json::from_str(&first).unwrap();
    assert_eq!(next.offset, first.next_offset);
    // Another producer's sequence 0 is its own.
    let (_, p2) = tagged(&node, "p2", "0", "d\n").await;
    assert_ne!(p2, serde_json::to_string(&first).unwrap());
    assert_eq!(stored(&node), "a\nb\nc\nd\n");
    assert_eq!(repeats(&node).await, 2);

    // Eight at once with the same sequence: one is stored, all are
    // answered with its position.
    let sends: Vec<_> = (0..8).map(|_| tagged(&node, "p3", "0", "e\n")).collect();
    let answers: Vec<(StatusCode, String)> = futures_util::future::join_all(sends).await;
    assert!(
        answers
            .iter()
            .all(|a| a == &answers[0] && a.0 == StatusCode::OK)
    );
    assert_eq!(stored(&node), "a\nb\nc\nd\ne\n");

    // The headers go together and are checked.
    for (producer, sequence) in [
        (Some("p1"), None),
        (None, Some("3")),
        (Some("a b"), Some("1")),
        (Some("p1"), Some("x")),
        // The Kafka listener's producers, and the node's own.
        (Some("kafka.42"), Some("1")),
        (Some("chunkbus.rescue.n1-chunk000000000"), Some("1")),
    ] {
        let mut req = node
            .http
            .post(node.url("/v1/categories/idem/lines"))
            .body("f\n");
        if let Some(p) = producer {
            req = req.header("chunkbus-producer", p);
        }
        if let Some(s) = sequence {
            req = req.header("chunkbus-sequence", s);
        }
        let r = req.send().await.unwrap();
        assert_eq!(
            r.status(),
            StatusCode::BAD_REQUEST,
            "{producer:?} {sequence:?}"
        );
    }
    node.stop().await;

    // After a restart the node still knows, and checks the bytes first.
    let node = TestNode::start_config(cfg.clone()).await;
    let (status, after) = tagged(&node, "p1", "1", "c\n").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_str::<ProduceResponse>(&after).unwrap(),
        next
    );
    assert_eq!(stored(&node), "a\nb\nc\nd\ne\n");
    node.stop().await;

    // A record whose bytes are not where it says (as after a crash between
    // the record and the lines) is not trusted: the request is stored.
    let log = tmp.path().join("idem/.producers.log");
    let mut text = std::fs::read_to_string(&log).unwrap();
    text.push_str("p9 0 t1-chunk000000000 0 4 2 deadbeef\n");
    std::fs::write(&log, text).unwrap();
    let node = TestNode::start_config(cfg).await;
    let (status, forged) = tagged(&node, "p9", "0", "g\n").await;
    assert_eq!(status, StatusCode::OK);
    let forged: ProduceResponse = serde_json::from_str(&forged).unwrap();
    assert_ne!(forged.chunk.as_deref(), Some("t1-chunk000000000"));
    assert!(stored(&node).ends_with("g\n"));
    // And then it is remembered like any other.
    let (_, again) = tagged(&node, "p9", "0", "g\n").await;
    assert_eq!(
        serde_json::from_str::<ProduceResponse>(&again).unwrap(),
        forged
    );
    node.stop().await;
}

const WRITERS: usize = 3;
const KILLS: usize = 5;
const ACKS_BETWEEN_KILLS: u64 = 30;

/// Writers retry each request with the same (producer, sequence) until it
/// is acknowledged, while the real binary is SIGKILLed at random moments:
/// every acknowledged request's lines are in the chunks exactly once, and
/// no line is there twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_across_sigkill_store_each_request_once() {
    use rand::Rng;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let args = ["--sync", "always", "--max-chunk-bytes", "64KiB"];
    let node = BinNode::start(&dir, &args).await;
    let base = Arc::new(tokio::sync::RwLock::new(node.url("")));
    let acks = Arc::new(AtomicU64::new(0));
    let retried = Arc::new(AtomicU64::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (base, acks, retried, stop, http) = (
            base.clone(),
            acks.clone(),
            retried.clone(),
            stop.clone(),
            http.clone(),
        );
        writers.push(tokio::spawn(async move {
            let mut acked = 0u64;
            'requests: for seq in 0u64.. {
                let body: String = (0..10).map(|l| format!("w{w}-s{seq}-l{l}\n")).collect();
                let mut attempt = 0;
                loop {
                    if stop.is_cancelled() {
                        break 'requests;
                    }
                    attempt += 1;
                    if attempt > 1 {
                        retried.fetch_add(1, Ordering::Relaxed);
                    }
                    let url = format!("{}/v1/categories/crash/lines", base.read().await);
                    let sent = http
                        .post(url)
                        .header("chunkbus-producer", format!("w{w}"))
                        .header("chunkbus-sequence", seq.to_string())
                        .body(body.clone())
                        .send()
                        .await;
                    if let Ok(r) = sent
                        && r.status().is_success()
                    {
                        acked = seq + 1;
                        acks.fetch_add(1, Ordering::Relaxed);
                        continue 'requests;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            acked
        }));
    }
    let mut node = node;
    let mut rng = rand::rng();
    for kill in 0..KILLS {
        let target = acks.load(Ordering::Relaxed) + ACKS_BETWEEN_KILLS;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while acks.load(Ordering::Relaxed) < target {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no progress before kill {kill}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..30))).await;
        node.kill().await;
        node = BinNode::start(&dir, &args).await;
        *base.write().await = node.url("");
    }
    stop.cancel();
    let mut acked = Vec::new();
    for w in writers {
        acked.push(w.await.unwrap());
    }
    node.kill().await;
    assert!(
        retried.load(Ordering::Relaxed) > 0,
        "no request was retried"
    );
    let node = BinNode::start(&dir, &args).await;
    node.kill().await;
    let mut count: HashMap<String, usize> = HashMap::new();
    for (_, data) in chunk_files(&dir.join("crash")) {
        for line in std::str::from_utf8(&data).unwrap().lines() {
            *count.entry(line.to_owned()).or_default() += 1;
        }
    }
    let twice: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "stored twice: {twice:?}");
    for (w, &n) in acked.iter().enumerate() {
        assert!(n > 0);
        for seq in 0..n {
            for l in 0..10 {
                let line = format!("w{w}-s{seq}-l{l}");
                assert_eq!(count.get(&line), Some(&1), "{line}");
            }
        }
    }
}

/// A producer's request whose body is still arriving holds up none of the
/// producer's other requests (the lock is taken once the body is here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_holds_up_no_other_request_of_its_producer() {
    use tokio::io::AsyncWriteExt;
    let node = TestNode::start().await;
    let mut slow = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    slow.write_all(
        b"POST /v1/categories/idem/lines HTTP/1.1\r\nHost: x\r\nChunkbus-Producer: p\r\nChunkbus-Sequence: 1\r\nContent-Length: 100\r\n\r\nslow li",
    )
    .await
    .unwrap();
    // The node is reading the slow body (it holds its first bytes) before
    // the next request is sent.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = node.get("/metrics").await.text().await.unwrap();
        let held: f64 = text
            .lines()
            .find(|l| l.starts_with("chunkbus_inflight_bytes "))
            .and_then(|l| l.split_whitespace().last()?.parse().ok())
            .expect("the inflight_bytes metric");
        if held > 0.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slow body never arrived"
        );
        tokio::task::yield_now().await;
    }
    let quick = tokio::time::timeout(Duration::from_secs(5), tagged(&node, "p", "2", "quick\n"))
        .await
        .expect("answered while the other body is still arriving");
    assert_eq!(quick.0, StatusCode::OK);
    assert_eq!(stored(&node), "quick\n");
    drop(slow);
    node.stop().await;
}
