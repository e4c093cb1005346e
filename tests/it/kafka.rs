//! The Kafka listener against a real Kafka client (kcat, librdkafka),
//! installed by `scripts/test`: topic = category, partition = node,
//! offsets = line numbers.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use chunkbus_client::{Client, ProduceOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cluster::{TestCluster, check_numbering};
use crate::harness::{BinNode, all_lines, serve_command};
use crate::proxy::Proxy;

/// Longest a kcat run may take.
const KCAT_DEADLINE: Duration = Duration::from_secs(120);

/// Runs kcat with `args`, feeding it `input`; returns its stdout.
async fn kcat(args: &[&str], input: &[u8]) -> String {
    let mut child = tokio::process::Command::new("kcat")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("kcat is installed by scripts/test");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let feed = tokio::spawn(async move {
        stdin.write_all(&input).await.unwrap();
        drop(stdin);
    });
    let out = tokio::time::timeout(KCAT_DEADLINE, child.wait_with_output())
        .await
        .expect("kcat finished in time")
        .unwrap();
    feed.await.unwrap();
    assert!(
        out.status.success(),
        "kcat {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `lines` with the offsets they must have: 0, 1, 2...
fn numbered(lines: &[String]) -> Vec<(u64, String)> {
    lines
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, l)| (i as u64, l))
        .collect()
}

/// `(offset, value)` of every message of `topic` partition `p`, read from
/// the beginning to the end through `broker`.
pub async fn consume(broker: &str, topic: &str, p: i32) -> Vec<(u64, String)> {
    let p = p.to_string();
    let out = kcat(
        &[
            "-b",
            broker,
            "-C",
            "-t",
            topic,
            "-p",
            &p,
            "-o",
            "beginning",
            "-e",
            "-q",
            "-f",
            "%o %s\\n",
        ],
        b"",
    )
    .await;
    out.lines()
        .map(|l| {
            let (o, v) = l.split_once(' ').unwrap();
            (o.parse().unwrap(), v.to_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kcat_produces_in_every_codec_and_reads_back_every_line_by_its_number() {
    let dir = tempfile::tempdir().unwrap();
    let node = BinNode::start(
        dir.path(),
        &[
            "--kafka-listen",
            "127.0.0.1:0",
            "--max-chunk-bytes",
            "256KiB",
        ],
    )
    .await;
    let broker = node.kafka_addr.unwrap().to_string();
    let client = Client::new(&node.url("")).unwrap();
    // Lines written over HTTP are numbered like the others.
    client
        .produce(
            "mixed",
            "over http 1\nover http 2\n",
            &ProduceOptions::default(),
        )
        .await
        .unwrap();
    let mut sent: Vec<String> = vec!["over http 1".into(), "over http 2".into()];
    for codec in ["none", "gzip", "snappy", "lz4", "zstd"] {
        let lines: Vec<String> = (0..20_000)
            .map(|i| format!("{codec} line {i} {}", "x".repeat(i % 50)))
            .collect();
        let input = lines.iter().map(|l| format!("{l}\n")).collect::<String>();
        kcat(
            &["-b", &broker, "-P", "-t", "mixed", "-p", "0", "-z", codec],
            input.as_bytes(),
        )
        .await;
        sent.extend(lines);
    }
    let got = consume(&broker, "mixed", 0).await;
    let want = numbered(&sent);
    assert_eq!(got.len(), want.len());
    assert!(got == want, "lines or their offsets differ");
    // The same bytes over HTTP, and the same numbers in the listing.
    assert_eq!(all_lines(&client, "mixed").await, sent);
    let listed = client.chunks("mixed").await.unwrap();
    assert!(listed.len() > 10, "{} chunks", listed.len());
    check_numbering("mixed", &listed);
    // The latest offset, and a read from the middle.
    let end = kcat(&["-b", &broker, "-Q", "-t", "mixed:0:-1"], b"").await;
    assert!(end.contains(&format!("offset {}", sent.len())), "{end}");
    let mid = kcat(
        &[
            "-b", &broker, "-C", "-t", "mixed", "-p", "0", "-o", "61234", "-c", "3", "-e", "-q",
            "-f", "%o %s\\n",
        ],
        b"",
    )
    .await;
    let want_mid: String = (61234..61237)
        .map(|i| format!("{i} {}\n", sent[i]))
        .collect();
    assert_eq!(mid, want_mid);
    node.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_partition_is_read_from_one_node_after_its_owners_died() {
    let mut cluster = TestCluster::start(
        3,
        &[
            "--kafka-listen",
            "127.0.0.1:0",
            "--max-chunk-bytes",
            "64KiB",
        ],
    )
    .await;
    let mut sent: BTreeMap<i32, Vec<String>> = BTreeMap::new();
    // 100,000 lines in all.
    for (p, n) in [(0, 33_334), (1, 33_333), (2, 33_333)] {
        // Through node 2's listener: the client sends each partition to its
        // owner, as metadata names it.
        let lines: Vec<String> = (0..n).map(|i| format!("p{p} line {i}")).collect();
        let input = lines.iter().map(|l| format!("{l}\n")).collect::<String>();
        let part = p.to_string();
        kcat(
            &[
                "-b",
                &cluster.kafka_addr(1),
                "-P",
                "-t",
                "app",
                "-p",
                &part,
                "-z",
                "lz4",
            ],
            input.as_bytes(),
        )
        .await;
        sent.insert(p, lines);
    }
    cluster.wait_converged(&["app"]).await;
    // Every node numbers every partition alike.
    for p in 0..3 {
        let from_owner = consume(&cluster.kafka_addr(p as usize), "app", p).await;
        let want = numbered(&sent[&p]);
        assert!(from_owner == want, "partition {p} read through its owner");
    }
    cluster.kill(0).await;
    cluster.kill(1).await;
    cluster.wait_peer_connected(2, "n1", false).await;
    cluster.wait_peer_connected(2, "n2", false).await;
    // Node 3 now names itself leader of the dead owners' partitions and
    // serves them from its copies.
    let broker = cluster.kafka_addr(2);
    for p in 0..3 {
        let got = consume(&broker, "app", p).await;
        let want = numbered(&sent[&p]);
        assert!(got == want, "partition {p} read through node 3 alone");
    }
    // Its metadata names it leader of the dead owners' partitions.
    let meta = kcat(&["-b", &broker, "-L", "-t", "app"], b"").await;
    assert!(meta.contains("partition 0, leader 2"), "{meta}");
}

/// A request frame: length, then the bytes.
fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    out.put_i32(body.len() as i32);
    out.put_slice(body);
    out.to_vec()
}

/// Sends `bytes` to `addr`; returns what came back before the node closed
/// the connection (or after 5 s).
async fn exchange(addr: &str, bytes: &[u8]) -> Vec<u8> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_the_connection_and_leave_the_node_serving() {
    let dir = tempfile::tempdir().unwrap();
    let node = BinNode::start(
        dir.path(),
        &["--kafka-listen", "127.0.0.1:0", "--max-body-bytes", "1MiB"],
    )
    .await;
    let broker = node.kafka_addr.unwrap().to_string();
    // A frame claiming 2 GiB: closed before anything is read into memory.
    assert!(exchange(&broker, &i32::MAX.to_be_bytes()).await.is_empty());
    // An unknown API key.
    let mut unknown = BytesMut::new();
    unknown.put_i16(9999);
    unknown.put_i16(0);
    unknown.put_i32(7);
    unknown.put_i16(-1);
    assert!(exchange(&broker, &frame(&unknown)).await.is_empty());
    // A metadata request claiming two billion topics in a few bytes.
    let mut meta = BytesMut::new();
    meta.put_i16(3);
    meta.put_i16(4);
    meta.put_i32(8);
    meta.put_i16(-1);
    meta.put_i32(i32::MAX);
    meta.put_slice(b"ab");
    assert!(exchange(&broker, &frame(&meta)).await.is_empty());
    // A produce request whose batch claims two billion records: answered
    // with CORRUPT_MESSAGE (2), nothing stored.
    let mut batch = BytesMut::new();
    batch.put_i64(0);
    let len_at = batch.len();
    batch.put_i32(0);
    batch.put_i32(0);
    batch.put_i8(2);
    let crc_at = batch.len();
    batch.put_u32(0);
    batch.put_i16(0);
    batch.put_i32(0);
    batch.put_i64(0);
    batch.put_i64(0);
    batch.put_i64(-1);
    batch.put_i16(-1);
    batch.put_i32(-1);
    batch.put_i32(i32::MAX);
    batch.put_slice(&[0u8; 16]);
    let len = (batch.len() - 12) as i32;
    batch[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
    let crc = crc32c::crc32c(&batch[crc_at + 4..]);
    batch[crc_at..crc_at + 4].copy_from_slice(&crc.to_be_bytes());
    let mut produce = BytesMut::new();
    produce.put_i16(0);
    produce.put_i16(3);
    produce.put_i32(9);
    produce.put_i16(-1);
    produce.put_i16(-1); // transactional id: null
    produce.put_i16(1); // acks
    produce.put_i32(1000);
    produce.put_i32(1); // one topic
    produce.put_i16(4);
    produce.put_slice(b"evil");
    produce.put_i32(1); // one partition
    produce.put_i32(0);
    produce.put_i32(batch.len() as i32);
    produce.put_slice(&batch);
    let answer = exchange(&broker, &frame(&produce)).await;
    // ... length, correlation id, 1 topic "evil", 1 partition 0, error code.
    assert!(answer.len() > 30, "{answer:?}");
    assert_eq!(&answer[4..8], &9i32.to_be_bytes());
    let code_at = 4 + 4 + 4 + 2 + 4 + 4 + 4;
    assert_eq!(
        &answer[code_at..code_at + 2],
        &2i16.to_be_bytes(),
        "{answer:?}"
    );
    // Nothing stored, the node unharmed and counting what it refused.
    let client = Client::new(&node.url("")).unwrap();
    assert!(client.chunks("evil").await.unwrap().is_empty());
    let metrics = reqwest::get(node.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("chunkbus_kafka_bad_frames_total 3"),
        "{metrics}"
    );
    let meta = kcat(&["-b", &broker, "-L"], b"").await;
    assert!(meta.contains("1 brokers"), "{meta}");
    node.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_clients_use_tls_when_the_node_serves_https() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = crate::security::test_pki(dir.path());
    let data = dir.path().join("data");
    let node = BinNode::start(
        &data,
        &[
            "--kafka-listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    )
    .await;
    let broker = node.kafka_addr.unwrap().to_string();
    let ca = ca.to_str().unwrap();
    let tls = ["-X", "security.protocol=ssl", "-X"];
    let ca_opt = format!("ssl.ca.location={ca}");
    let mut produce = vec!["-b", &broker, "-P", "-t", "secure", "-p", "0"];
    produce.extend(tls);
    produce.push(&ca_opt);
    kcat(&produce, b"over tls 1\nover tls 2\n").await;
    let mut read = vec![
        "-b",
        &broker,
        "-C",
        "-t",
        "secure",
        "-p",
        "0",
        "-o",
        "beginning",
        "-e",
        "-q",
    ];
    read.extend(tls);
    read.push(&ca_opt);
    assert_eq!(kcat(&read, b"").await, "over tls 1\nover tls 2\n");
    // Plain TCP gets no Kafka answer from a TLS listener.
    let mut api_versions = BytesMut::new();
    api_versions.put_i16(18);
    api_versions.put_i16(0);
    api_versions.put_i32(1);
    api_versions.put_i16(-1);
    let answer = exchange(&broker, &frame(&api_versions)).await;
    assert!(!answer.starts_with(&[0, 0]), "{answer:?}");
    node.kill().await;
}

/// A record batch of `values` from producer `pid` (-1: not idempotent),
/// its sequences starting at `seq`.
fn record_batch(pid: i64, epoch: i16, seq: i32, values: &[&str]) -> bytes::Bytes {
    use kafka_protocol::records::{
        Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
    };
    let records: Vec<Record> = values
        .iter()
        .enumerate()
        .map(|(i, v)| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: 0,
            producer_id: pid,
            producer_epoch: epoch,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            sequence: seq + i as i32,
            timestamp: 0,
            key: None,
            value: Some(bytes::Bytes::copy_from_slice(v.as_bytes())),
            headers: Default::default(),
        })
        .collect();
    let mut out = BytesMut::new();
    let options = RecordEncodeOptions {
        version: 2,
        compression: Compression::None,
    };
    RecordBatchEncoder::encode(&mut out, &records, &options).unwrap();
    out.freeze()
}

/// A produce request frame (v3, acks=1) of `batch` to partition 0 of
/// `topic`.
fn produce_request(topic: &str, batch: &[u8], correlation: i32) -> Vec<u8> {
    let mut p = BytesMut::new();
    p.put_i16(0);
    p.put_i16(3);
    p.put_i32(correlation);
    p.put_i16(-1);
    p.put_i16(-1); // transactional id: null
    p.put_i16(1); // acks
    p.put_i32(5000);
    p.put_i32(1);
    p.put_i16(topic.len() as i16);
    p.put_slice(topic.as_bytes());
    p.put_i32(1);
    p.put_i32(0);
    p.put_i32(batch.len() as i32);
    p.put_slice(batch);
    frame(&p)
}

/// Reads a produce answer of one partition of `topic`: its correlation id,
/// the partition's error code and base offset.
async fn produce_answer(conn: &mut tokio::net::TcpStream, topic: &str) -> (i32, i16, i64) {
    let len = conn.read_i32().await.unwrap();
    let mut answer = vec![0u8; len as usize];
    conn.read_exact(&mut answer).await.unwrap();
    let correlation = i32::from_be_bytes(answer[..4].try_into().unwrap());
    // Correlation id, 1 topic (name), 1 partition: index, error, offset.
    let at = 4 + 4 + 2 + topic.len() + 4 + 4;
    let code = i16::from_be_bytes(answer[at..at + 2].try_into().unwrap());
    let offset = i64::from_be_bytes(answer[at + 2..at + 10].try_into().unwrap());
    (correlation, code, offset)
}

/// Sends one produce request and waits for its answer: the partition's
/// error code and base offset.
async fn produce_raw(conn: &mut tokio::net::TcpStream, topic: &str, batch: &[u8]) -> (i16, i64) {
    conn.write_all(&produce_request(topic, batch, 11))
        .await
        .unwrap();
    let (correlation, code, offset) = produce_answer(conn, topic).await;
    assert_eq!(correlation, 11);
    (code, offset)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_even_when_a_bad_frame_follows() {
    let dir = tempfile::tempdir().unwrap();
    let node = BinNode::start(dir.path(), &["--kafka-listen", "127.0.0.1:0"]).await;
    let broker = node.kafka_addr.unwrap().to_string();
    let mut conn = tokio::net::TcpStream::connect(&broker).await.unwrap();
    // Five produce requests and a frame claiming 2 GiB, in one write.
    let mut bytes = Vec::new();
    for i in 0..5 {
        let batch = record_batch(-1, -1, -1, &[&format!("line {i}")]);
        bytes.extend(produce_request("pipe", &batch, i));
    }
    bytes.extend_from_slice(&i32::MAX.to_be_bytes());
    conn.write_all(&bytes).await.unwrap();
    // Each is stored and answered, in order, before the connection closes.
    for i in 0..5 {
        assert_eq!(produce_answer(&mut conn, "pipe").await, (i, 0, i as i64));
    }
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut rest)).await;
    assert!(matches!(closed, Ok(Ok(0))), "{closed:?}");
    let client = Client::new(&node.url("")).unwrap();
    let want: Vec<String> = (0..5).map(|i| format!("line {i}")).collect();
    assert_eq!(all_lines(&client, "pipe").await, want);
    node.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_idempotent_batch_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let node = BinNode::start(dir.path(), &["--kafka-listen", "127.0.0.1:0"]).await;
    let broker = node.kafka_addr.unwrap().to_string();
    let mut conn = tokio::net::TcpStream::connect(&broker).await.unwrap();
    let (pid, topic) = (4242, "idem");
    let first = record_batch(pid, 0, 0, &["a", "b"]);
    assert_eq!(produce_raw(&mut conn, topic, &first).await, (0, 0));
    let second = record_batch(pid, 0, 2, &["c"]);
    assert_eq!(produce_raw(&mut conn, topic, &second).await, (0, 2));
    // Both sent again, on another connection (the first one broke): each
    // answered with the offset it got, nothing stored again.
    let mut again = tokio::net::TcpStream::connect(&broker).await.unwrap();
    assert_eq!(produce_raw(&mut again, topic, &first).await, (0, 0));
    assert_eq!(produce_raw(&mut again, topic, &second).await, (0, 2));
    // A gap: OUT_OF_ORDER_SEQUENCE_NUMBER (45), nothing stored.
    let gap = record_batch(pid, 0, 5, &["x"]);
    assert_eq!(produce_raw(&mut again, topic, &gap).await.0, 45);
    // An older epoch of the same producer: INVALID_PRODUCER_EPOCH (47).
    let newer = record_batch(pid, 1, 0, &["d"]);
    assert_eq!(produce_raw(&mut again, topic, &newer).await, (0, 3));
    let fenced = record_batch(pid, 0, 3, &["y"]);
    assert_eq!(produce_raw(&mut again, topic, &fenced).await.0, 47);
    // Another producer is independent of the first.
    let other = record_batch(pid + 1, 0, 0, &["e"]);
    assert_eq!(produce_raw(&mut again, topic, &other).await, (0, 4));
    let client = Client::new(&node.url("")).unwrap();
    assert_eq!(all_lines(&client, topic).await, ["a", "b", "c", "d", "e"]);
    node.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_batch_retried_after_the_owner_restarted_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--kafka-listen", "127.0.0.1:0"];
    let node = BinNode::start(dir.path(), &args).await;
    let mut conn = tokio::net::TcpStream::connect(node.kafka_addr.unwrap())
        .await
        .unwrap();
    let (pid, topic) = (777, "idem-restart");
    let batches = [
        record_batch(pid, 0, 0, &["a", "b"]),
        record_batch(pid, 0, 2, &["c"]),
        record_batch(pid, 0, 3, &["d", "e", "f"]),
    ];
    for (batch, offset) in batches.iter().zip([0, 2, 3]) {
        assert_eq!(produce_raw(&mut conn, topic, batch).await, (0, offset));
    }
    // The owner dies before the producer saw the answers, and comes back
    // with no memory of the producer but what it wrote with the lines.
    node.kill().await;
    let node = BinNode::start(dir.path(), &args).await;
    let mut conn = tokio::net::TcpStream::connect(node.kafka_addr.unwrap())
        .await
        .unwrap();
    // Each retry (the oldest first, as a producer resends) is answered
    // with the offset it got, nothing stored again; a gap is still one.
    for (batch, offset) in batches.iter().zip([0, 2, 3]) {
        assert_eq!(produce_raw(&mut conn, topic, batch).await, (0, offset));
    }
    let gap = record_batch(pid, 0, 9, &["x"]);
    assert_eq!(produce_raw(&mut conn, topic, &gap).await.0, 45);
    let next = record_batch(pid, 0, 6, &["g"]);
    assert_eq!(produce_raw(&mut conn, topic, &next).await, (0, 6));
    let client = Client::new(&node.url("")).unwrap();
    assert_eq!(
        all_lines(&client, topic).await,
        ["a", "b", "c", "d", "e", "f", "g"]
    );
    node.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_listing_the_nodes_in_another_order_is_not_named_a_leader() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (to_a, to_b) = (Proxy::start().await, Proxy::start().await);
    // Partition 1 is b's lines on a, and a's on b.
    let node = |name: &str, dir: &std::path::Path, peers: String| {
        let mut cmd = serve_command(name, dir);
        cmd.args(["--peers", &peers, "--kafka-listen", "127.0.0.1:0"])
            .args(["--peer-timeout", "1s"]);
        BinNode::spawn(cmd)
    };
    let a = node("a", da.path(), format!("a=127.0.0.1:0,b={}", to_b.addr)).await;
    to_a.set_target(a.addr);
    let b = node("b", db.path(), format!("b=127.0.0.1:0,a={}", to_a.addr)).await;
    to_b.set_target(b.addr);
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    while !a
        .stderr
        .lock()
        .unwrap()
        .contains("lists the nodes in another order")
    {
        assert!(tokio::time::Instant::now() < end, "a never noticed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // b answers, but a names itself for b's partition: b would serve its
    // own lines there, which are partition 0 by its order.
    let meta = kcat(
        &["-b", &a.kafka_addr.unwrap().to_string(), "-L", "-t", "t"],
        b"",
    )
    .await;
    assert!(meta.contains("partition 1, leader 0"), "{meta}");
    a.kill().await;
    b.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_bucket_membership_partitions_are_the_nodes_numbers_and_grow_as_nodes_join() {
    use crate::harness::{CONDITION_DEADLINE, eventually};
    let s3 = crate::s3_server::TestS3::start().await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let args = ["--kafka-listen", "127.0.0.1:0"];
    let start = |i: usize| {
        let name = format!("n{}", i + 1);
        BinNode::spawn(crate::tiering::s3_command(
            &s3,
            &name,
            dirs[i].path(),
            &args,
        ))
    };
    let number_of = |n: u32| {
        let key = format!("_cluster/numbers/{n}.json");
        let s3 = &s3;
        async move {
            let body = s3.get(&key).await?;
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            Some(v["node"].as_str().unwrap().to_owned())
        }
    };
    let n1 = start(0).await;
    let n2 = start(1).await;
    assert_eq!(number_of(0).await.as_deref(), Some("n1"));
    assert_eq!(number_of(1).await.as_deref(), Some("n2"));
    let k = |n: &BinNode| n.kafka_addr.unwrap().to_string();
    // Each node's metadata names both partitions once it read the other's
    // record.
    for n in [&n1, &n2] {
        let broker = k(n);
        eventually(CONDITION_DEADLINE, "two partitions", || async {
            let meta = kcat(&["-b", &broker, "-L", "-t", "app"], b"").await;
            meta.contains("2 partitions").then_some(())
        })
        .await;
    }
    // A producer sends partition 1 to n2, through n1's metadata.
    let lines: Vec<String> = (0..2_000).map(|i| format!("p1 line {i}")).collect();
    let input: String = lines.iter().map(|l| format!("{l}\n")).collect();
    kcat(
        &["-b", &k(&n1), "-P", "-t", "app", "-p", "1"],
        input.as_bytes(),
    )
    .await;
    let c2 = Client::new(&n2.url("")).unwrap();
    let on_n2 = all_lines(&c2, "app").await;
    assert_eq!(on_n2, lines, "partition 1 is n2's lines");
    let want = numbered(&lines);
    let broker = k(&n1);
    eventually(CONDITION_DEADLINE, "n1 serves partition 1", || async {
        (consume(&broker, "app", 1).await == want).then_some(())
    })
    .await;

    // A third node joins: partition 2, without a restart of the others.
    let n3 = start(2).await;
    assert_eq!(number_of(2).await.as_deref(), Some("n3"));
    let broker = k(&n1);
    eventually(CONDITION_DEADLINE, "n1 names three partitions", || async {
        let meta = kcat(&["-b", &broker, "-L", "-t", "app"], b"").await;
        meta.contains("3 partitions").then_some(())
    })
    .await;
    // n2 killed and restarted keeps its number; so does n3 with a new data
    // directory (its number is found among the numbers).
    n2.kill().await;
    let n2 = start(1).await;
    n3.kill().await;
    std::fs::remove_dir_all(dirs[2].path()).unwrap();
    let _n3 = start(2).await;
    assert!(number_of(3).await.is_none());
    let broker = k(&n2);
    eventually(
        CONDITION_DEADLINE,
        "n2 serves partition 1 again",
        || async { (consume(&broker, "app", 1).await == want).then_some(()) },
    )
    .await;
    let meta = kcat(&["-b", &broker, "-L", "-t", "app"], b"").await;
    assert!(meta.contains("3 partitions"), "{meta}");
}

/// Asks one request (non-flexible `version` of `api`) with `body` on
/// `conn`; the answer after its correlation id.
async fn ask(
    conn: &mut tokio::net::TcpStream,
    api: i16,
    version: i16,
    body: &[u8],
) -> bytes::Bytes {
    let mut p = BytesMut::new();
    p.put_i16(api);
    p.put_i16(version);
    p.put_i32(21);
    p.put_i16(-1); // client id: null
    p.put_slice(body);
    conn.write_all(&frame(&p)).await.unwrap();
    let len = conn.read_i32().await.unwrap();
    let mut answer = vec![0u8; len as usize];
    conn.read_exact(&mut answer).await.unwrap();
    assert_eq!(i32::from_be_bytes(answer[..4].try_into().unwrap()), 21);
    bytes::Bytes::from(answer).slice(4..)
}

/// A Kafka string.
fn put_str(b: &mut BytesMut, s: &str) {
    b.put_i16(s.len() as i16);
    b.put_slice(s.as_bytes());
}

/// Skips a Kafka string (or a null one).
fn skip_str(r: &mut bytes::Bytes) {
    use bytes::Buf;
    let len = r.get_i16();
    r.advance(len.max(0) as usize);
}

/// ListOffsets v1 of partition 0 of `topic` at `timestamp` (-2 the log
/// start, -1 its end): the error code and the offset.
async fn list_offset(conn: &mut tokio::net::TcpStream, topic: &str, timestamp: i64) -> (i16, i64) {
    list_offset_of(conn, topic, 0, timestamp).await
}

/// [`list_offset`] of partition `p`.
async fn list_offset_of(
    conn: &mut tokio::net::TcpStream,
    topic: &str,
    p: i32,
    timestamp: i64,
) -> (i16, i64) {
    use bytes::Buf;
    let mut b = BytesMut::new();
    b.put_i32(-1); // replica id
    b.put_i32(1);
    put_str(&mut b, topic);
    b.put_i32(1);
    b.put_i32(p);
    b.put_i64(timestamp);
    let mut r = ask(conn, 2, 1, &b).await;
    assert_eq!(r.get_i32(), 1);
    skip_str(&mut r);
    assert_eq!((r.get_i32(), r.get_i32()), (1, p));
    let code = r.get_i16();
    let _timestamp = r.get_i64();
    (code, r.get_i64())
}

/// OffsetFetch v1 of partition 0 of `topic` for `group`: the error code
/// and the committed offset.
async fn committed(conn: &mut tokio::net::TcpStream, group: &str, topic: &str) -> (i16, i64) {
    use bytes::Buf;
    let mut b = BytesMut::new();
    put_str(&mut b, group);
    b.put_i32(1);
    put_str(&mut b, topic);
    b.put_i32(1);
    b.put_i32(0);
    let mut r = ask(conn, 9, 1, &b).await;
    assert_eq!(r.get_i32(), 1);
    skip_str(&mut r);
    assert_eq!((r.get_i32(), r.get_i32()), (1, 0));
    let offset = r.get_i64();
    skip_str(&mut r);
    (r.get_i16(), offset)
}

/// OffsetCommit v2 of `offset` in partition 0 of `topic` for `group`, as a
/// consumer outside any group's generation: the error code.
async fn commit(conn: &mut tokio::net::TcpStream, group: &str, topic: &str, offset: i64) -> i16 {
    use bytes::Buf;
    let mut b = BytesMut::new();
    put_str(&mut b, group);
    b.put_i32(-1); // generation
    put_str(&mut b, ""); // member
    b.put_i64(-1); // retention
    b.put_i32(1);
    put_str(&mut b, topic);
    b.put_i32(1);
    b.put_i32(0);
    b.put_i64(offset);
    b.put_i16(-1); // metadata: null
    let mut r = ask(conn, 8, 2, &b).await;
    assert_eq!(r.get_i32(), 1);
    skip_str(&mut r);
    assert_eq!((r.get_i32(), r.get_i32()), (1, 0));
    r.get_i16()
}

/// A Kafka listener, and chunks that complete at once and that retention
/// deletes soon after.
const EXPIRING: [&str; 6] = [
    "--kafka-listen",
    "127.0.0.1:0",
    "--rotate-after",
    "300ms",
    "--retention",
    "5s",
];

/// Retention deletes every chunk of a partition: the log is empty at the
/// owner's next offset, not back at 0 (a consumer at its end is not out
/// of range, and one reset to the end does not skip what comes next);
/// positions in the deleted chunk stand there, a commit there is taken at
/// once, and the lines written later go on from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_emptied_by_retention_keeps_its_offsets() {
    use crate::harness::{CONDITION_DEADLINE, eventually};
    let dir = tempfile::tempdir().unwrap();
    let node = BinNode::start(dir.path(), &EXPIRING).await;
    let broker = node.kafka_addr.unwrap().to_string();
    let client = Client::new(&node.url("")).unwrap();
    let topic = "expiring";
    let old: String = (0..10).map(|i| format!("old {i}\n")).collect();
    client
        .produce(topic, old, &ProduceOptions::default())
        .await
        .unwrap();
    let chunk = eventually(CONDITION_DEADLINE, "the chunk complete", || async {
        let list = client.chunks(topic).await.ok()?;
        list.into_iter().find(|c| c.complete)
    })
    .await;
    // One consumer passed the whole chunk, one its first four lines.
    client
        .ack(topic, "end", &chunk.name, chunk.size)
        .await
        .unwrap();
    client.ack(topic, "mid", &chunk.name, 24).await.unwrap();
    let mut conn = tokio::net::TcpStream::connect(&broker).await.unwrap();
    assert_eq!(committed(&mut conn, "mid", topic).await, (0, 4));
    eventually(CONDITION_DEADLINE, "retention", || async {
        client.chunks(topic).await.ok()?.is_empty().then_some(())
    })
    .await;
    assert_eq!(list_offset(&mut conn, topic, -2).await, (0, 10));
    assert_eq!(list_offset(&mut conn, topic, -1).await, (0, 10));
    assert_eq!(committed(&mut conn, "end", topic).await, (0, 10));
    assert_eq!(committed(&mut conn, "mid", topic).await, (0, 10));
    let asked = tokio::time::Instant::now();
    assert_eq!(commit(&mut conn, "mid", topic, 10).await, 0);
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "the commit waited"
    );
    let new: String = (0..5).map(|i| format!("new {i}\n")).collect();
    let p = client
        .produce(topic, new, &ProduceOptions::default())
        .await
        .unwrap();
    let list = client.chunks(topic).await.unwrap();
    let next = list
        .iter()
        .find(|c| Some(&c.name) == p.chunk.as_ref())
        .unwrap();
    assert_eq!(next.first_line, Some(10), "{list:?}");
    assert_eq!(committed(&mut conn, "end", topic).await, (0, 10));
    assert_eq!(committed(&mut conn, "mid", topic).await, (0, 10));
    assert_eq!(list_offset(&mut conn, topic, -2).await, (0, 10));
    let read = consume(&broker, topic, 0).await;
    let want: Vec<(u64, String)> = (0..5).map(|i| (10 + i, format!("new {i}"))).collect();
    assert_eq!(read, want);
    node.kill().await;
}

/// Both partitions' log start and end through node `i`'s listener, each
/// with its error code: `[(start, end) of partition 0, of partition 1]`.
async fn offsets_through(cluster: &TestCluster, i: usize, topic: &str) -> Vec<[(i16, i64); 2]> {
    let mut conn = tokio::net::TcpStream::connect(cluster.kafka_addr(i))
        .await
        .unwrap();
    let mut out = Vec::new();
    for p in 0..2 {
        out.push([
            list_offset_of(&mut conn, topic, p, -2).await,
            list_offset_of(&mut conn, topic, p, -1).await,
        ]);
    }
    out
}

/// Retention deletes every chunk of both partitions, then one node loses
/// its disk: it answers every partition's offsets as its peer does, and
/// still after a restart while its peer is down. Its own numbering it
/// learns from its peer's records, its peer's from its peer's listing,
/// although no chunk of either is left to vouch for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_node_knows_where_emptied_partitions_stand() {
    use crate::harness::{CONDITION_DEADLINE, eventually};
    let mut cluster = TestCluster::start(2, &EXPIRING).await;
    let topic = "expiring";
    for (i, n) in [(0, 10), (1, 7)] {
        let lines: String = (0..n).map(|j| format!("line {j}\n")).collect();
        cluster
            .client(i)
            .produce(topic, lines, &ProduceOptions::default())
            .await
            .unwrap();
    }
    // Each node's chunk is copied before retention deletes it.
    eventually(
        CONDITION_DEADLINE,
        "both chunks complete on both nodes",
        || async {
            for i in 0..2 {
                let list = cluster.client(i).chunks(topic).await.ok()?;
                (list.iter().filter(|c| c.complete).count() == 2).then_some(())?;
            }
            Some(())
        },
    )
    .await;
    eventually(CONDITION_DEADLINE, "retention on both nodes", || async {
        for i in 0..2 {
            cluster
                .client(i)
                .chunks(topic)
                .await
                .ok()?
                .is_empty()
                .then_some(())?;
        }
        Some(())
    })
    .await;
    // Log start and end, code 0: n1's partition at 10, n2's at 7.
    let want = vec![[(0, 10), (0, 10)], [(0, 7), (0, 7)]];
    for i in 0..2 {
        assert_eq!(offsets_through(&cluster, i, topic).await, want, "node {i}");
    }
    cluster.kill(1).await;
    std::fs::remove_dir_all(&cluster.dirs[1]).unwrap();
    cluster.start_node(1).await;
    cluster.wait_writes_open(1).await;
    eventually(
        CONDITION_DEADLINE,
        "the wiped node's offsets as its peer's",
        || async { (offsets_through(&cluster, 1, topic).await == want).then_some(()) },
    )
    .await;
    // Both ends survive a restart while the peer is down.
    cluster.kill(0).await;
    cluster.kill(1).await;
    cluster.start_node(1).await;
    assert_eq!(offsets_through(&cluster, 1, topic).await, want);
}
