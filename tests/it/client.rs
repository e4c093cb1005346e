//! The `chunkbus-client` Producer and Consumer, and the CLI built on them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chunkbus_client::{
    Compression, ConsumeError, Consumer, ConsumerConfig, Producer, ProducerConfig,
};
use tokio::process::Command;

use crate::cluster::TestCluster;
use crate::harness::TestNode;

fn count_lines(data: &[u8], seen: &mut BTreeMap<String, usize>) {
    for l in String::from_utf8(data.to_vec()).unwrap().lines() {
        *seen.entry(l.to_owned()).or_default() += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_spreads_over_nodes_and_a_killed_consumer_resumes() {
    let cluster = TestCluster::start(3, &["--max-chunk-bytes", "8KiB"]).await;
    let servers: Vec<String> = (0..3).map(|i| cluster.url(i)).collect();
    let producer = Producer::new(ProducerConfig {
        servers: servers.clone(),
        category: "orders".into(),
        max_batch_lines: 50,
        compression: Compression::Gzip,
        ..ProducerConfig::default()
    })
    .unwrap();
    const N: usize = 2000;
    for i in 0..N {
        producer.send(format!("order-{i:05}")).await.unwrap();
    }
    producer.close().await.unwrap();
    cluster.wait_converged(&["orders"]).await;
    // Batches went to every node.
    let owners: std::collections::BTreeSet<_> = cluster
        .client(0)
        .chunks("orders")
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.owner)
        .collect();
    assert_eq!(owners.len(), 3);

    // A second consumer name, created before `billing` reads (so that
    // retention keeps what it has not read), receives everything too.
    let first = cluster.client(0).chunks("orders").await.unwrap()[0]
        .name
        .clone();
    cluster
        .client(0)
        .ack("orders", "audit", &first, 0)
        .await
        .unwrap();
    let cfg = ConsumerConfig {
        servers: servers.clone(),
        category: "orders".into(),
        name: "billing".into(),
        max_bytes: 2048,
        wait: Duration::from_millis(200),
        until_idle: Some(Duration::from_millis(500)),
        ..ConsumerConfig::default()
    };
    // The first run dies (its handler fails) after 5 batches.
    let seen = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
    let batches = Arc::new(AtomicUsize::new(0));
    let consumer = Consumer::new(cfg.clone()).unwrap();
    let r = consumer
        .run(|b| {
            let (seen, batches) = (seen.clone(), batches.clone());
            async move {
                if batches.fetch_add(1, Ordering::SeqCst) == 5 {
                    return Err("simulated crash");
                }
                count_lines(&b.data, &mut seen.lock().unwrap());
                Ok(())
            }
        })
        .await;
    assert!(matches!(r, Err(ConsumeError::Handler("simulated crash"))));
    let before = seen.lock().unwrap().len();
    assert!(before > 0 && before < N);
    // A new consumer process under the same name resumes after the last ack.
    let consumer = Consumer::new(cfg).unwrap();
    consumer
        .run(|b| {
            let seen = seen.clone();
            async move {
                count_lines(&b.data, &mut seen.lock().unwrap());
                Ok::<(), std::io::Error>(())
            }
        })
        .await
        .unwrap();
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), N, "every line at least once");
        assert!(seen.values().all(|&n| n == 1), "nothing acked came twice");
    }
    let audit_cfg = ConsumerConfig {
        servers,
        category: "orders".into(),
        name: "audit".into(),
        wait: Duration::from_millis(200),
        until_idle: Some(Duration::from_millis(500)),
        ..ConsumerConfig::default()
    };
    let audit_seen = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
    Consumer::new(audit_cfg)
        .unwrap()
        .run(|b| {
            let seen = audit_seen.clone();
            async move {
                count_lines(&b.data, &mut seen.lock().unwrap());
                Ok::<(), std::io::Error>(())
            }
        })
        .await
        .unwrap();
    assert_eq!(
        audit_seen.lock().unwrap().len(),
        N,
        "the second consumer name got everything"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_cli_consumer_resumes_from_its_acked_position() {
    use tokio::io::AsyncBufReadExt;
    let node = TestNode::start_with(|c| c.max_chunk_bytes = 16 << 10).await;
    const N: usize = 50_000;
    let producer = Producer::new(ProducerConfig {
        servers: vec![node.url("")],
        category: "kill".into(),
        ..ProducerConfig::default()
    })
    .unwrap();
    for i in 0..N {
        producer.send(format!("k{i}")).await.unwrap();
    }
    producer.close().await.unwrap();
    let bin = env!("CARGO_BIN_EXE_chunkbus");
    let mut child = Command::new(bin)
        .args([
            "consume",
            "-c",
            "kill",
            "--consumer",
            "victim",
            "--server",
            &node.url(""),
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut seen = BTreeMap::new();
    // Whole lines only: a SIGKILL can cut the last write to stdout short.
    let mut read_line = async |seen: &mut BTreeMap<String, usize>| -> bool {
        let mut buf = Vec::new();
        let n = out.read_until(b'\n', &mut buf).await.unwrap();
        if n > 0 && buf.ends_with(b"\n") {
            buf.pop();
            *seen.entry(String::from_utf8(buf).unwrap()).or_insert(0) += 1;
        }
        n > 0
    };
    while seen.len() < N / 3 {
        assert!(read_line(&mut seen).await, "consumer output ended early");
    }
    child.kill().await.unwrap();
    // What it wrote before dying is still in the pipe (written and acked).
    while read_line(&mut seen).await {}
    let out = Command::new(bin)
        .args([
            "consume",
            "-c",
            "kill",
            "--consumer",
            "victim",
            "--until-idle",
            "500ms",
            "--server",
            &node.url(""),
        ])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let again = String::from_utf8(out.stdout).unwrap();
    for l in again.lines() {
        *seen.entry(l.to_owned()).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), N, "every line arrived");
    let twice = seen.values().filter(|&&n| n > 1).count();
    assert!(
        twice <= 2 * 65536 / 6,
        "duplicates limited to unacked batches, got {twice}"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_produce_consume_and_tail() {
    let node = TestNode::start_with(|c| c.max_chunk_bytes = 64 << 10).await;
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.txt");
    let lines: String = (0..20_000).map(|i| format!("event {i}\n")).collect();
    std::fs::write(&input, &lines).unwrap();
    let bin = env!("CARGO_BIN_EXE_chunkbus");
    let out = Command::new(bin)
        .args([
            "produce",
            "-c",
            "cli",
            "--compression",
            "zstd",
            "--server",
            &node.url(""),
        ])
        .arg(&input)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("produced"));
    // tail reads without acking (before the consumer, whose acks let
    // retention delete the complete chunks).
    let out = Command::new(bin)
        .args(["tail", "-c", "cli", "--server", &node.url("")])
        .output()
        .await
        .unwrap();
    assert_eq!(out.stdout.len(), lines.len());
    let consume = || {
        Command::new(bin)
            .args([
                "consume",
                "-c",
                "cli",
                "--consumer",
                "cli-reader",
                "--until-idle",
                "500ms",
            ])
            .env("CHUNKBUS_SERVER", node.url(""))
            .output()
    };
    let out = consume().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut got: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    got.sort_by_key(|l| l[6..].parse::<u32>().unwrap());
    let want: Vec<&str> = lines.lines().collect();
    assert_eq!(got, want);
    // Everything was acked: a second run prints nothing.
    let out = consume().await.unwrap();
    assert!(out.status.success() && out.stdout.is_empty());
    let out = Command::new(bin)
        .args(["categories", "--server", &node.url("")])
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "cli\n");
    // A server that is not there is a clear error, not a hang.
    let out = Command::new(bin)
        .args(["status", "--server", "http://127.0.0.1:1"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("error"));
    node.stop().await;
}

/// A front for a node that loses the node's first answer: it forwards the
/// first request, drops the node's answer and closes the client's
/// connection, as when a connection breaks after the request was sent.
/// Later connections go through untouched.
async fn lose_first_answer(node: std::net::SocketAddr) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut client, _)) = listener.accept().await {
            let mut upstream = tokio::net::TcpStream::connect(node).await.unwrap();
            if !std::mem::take(&mut first) {
                tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
                continue;
            }
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let (mut from_client, _to_client) = client.split();
                let (mut from_node, mut to_node) = upstream.split();
                let forward = async {
                    let mut buf = vec![0u8; 64 << 10];
                    while let Ok(n) = from_client.read(&mut buf).await {
                        if n == 0 || to_node.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                };
                let answered = async {
                    let mut buf = [0u8; 1];
                    let _ = from_node.read(&mut buf).await;
                };
                // Once the node starts answering, everything is dropped.
                tokio::select! {
                    _ = forward => {}
                    _ = answered => {}
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_producer_retry_after_a_lost_answer_is_stored_once() {
    let node = TestNode::start().await;
    for (category, idempotent, copies) in [("idem", true, 1), ("plain", false, 2)] {
        let front = lose_first_answer(node.addr).await;
        let producer = Producer::new(ProducerConfig {
            servers: vec![format!("http://{front}")],
            category: category.into(),
            idempotent,
            max_backoff: Duration::from_millis(100),
            ..ProducerConfig::default()
        })
        .unwrap();
        let delivery = producer.send("only once\n").await.unwrap();
        delivery.wait().await.unwrap();
        producer.close().await.unwrap();
        let stored: Vec<u8> = node
            .files(category)
            .into_iter()
            .flat_map(|(_, d)| d)
            .collect();
        assert_eq!(
            stored,
            b"only once\n".repeat(copies),
            "idempotent: {idempotent}"
        );
    }
    node.stop().await;
}
