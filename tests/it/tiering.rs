//! The S3 tier against a real S3-compatible server (s3s-fs over HTTP on
//! loopback, with SigV4 authentication), with real `chunkbus` processes.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use chunkbus_client::{ChunkInfo, Client, NodeStatus, ProduceOptions};
use tokio::process::Command;

use crate::harness::{
    BinNode, CONDITION_DEADLINE, all_lines, eventually, metrics_text, serve_command,
};
use crate::s3_server::{BUCKET, TestS3};

/// `chunkbus serve` for node `node` on `dir`, using `s3`, plus `args`.
/// `chunkbus serve` of `node` on `dir` against `s3`, with `args`.
pub(crate) fn s3_command(s3: &TestS3, node: &str, dir: &Path, args: &[&str]) -> Command {
    let mut cmd = serve_command(node, dir);
    cmd.args(s3.args()).args(args);
    for (k, v) in s3.env() {
        cmd.env(k, v);
    }
    cmd
}

async fn start(s3: &TestS3, dir: &Path, args: &[&str]) -> (BinNode, Client) {
    let node = BinNode::spawn(s3_command(s3, "t1", dir, args)).await;
    let client = Client::new(&node.url("")).unwrap();
    (node, client)
}

async fn status(client: &Client) -> NodeStatus {
    client.status().await.unwrap()
}

/// Waits until every chunk of `category` is complete and uploaded; returns them.
async fn all_uploaded(client: &Client, category: &str, at_least: usize) -> Vec<ChunkInfo> {
    eventually(CONDITION_DEADLINE, "every chunk uploaded", || async {
        let chunks = client.chunks(category).await.ok()?;
        (chunks.len() >= at_least && chunks.iter().all(|c| c.complete && c.uploaded))
            .then_some(chunks)
    })
    .await
}

/// Posts `n` numbered lines of about `width` bytes in requests of `per` lines.
async fn produce(
    client: &Client,
    category: &str,
    from: usize,
    n: usize,
    per: usize,
) -> Vec<String> {
    let lines: Vec<String> = (from..from + n)
        .map(|i| format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(i % 97)))
        .collect();
    for batch in lines.chunks(per) {
        let mut body = batch.join("\n");
        body.push('\n');
        client
            .produce(category, body, &ProduceOptions::default())
            .await
            .unwrap();
    }
    lines
}

/// The bytes of `chunk` read through a node, 1 MiB at a time.
async fn read_all(client: &Client, category: &str, chunk: &ChunkInfo) -> Vec<u8> {
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < chunk.size {
        let r = client
            .read_chunk(category, &chunk.name, offset, 1 << 20)
            .await
            .unwrap();
        assert!(r.next_offset > offset, "no progress reading {}", chunk.name);
        out.extend_from_slice(&r.data);
        offset = r.next_offset;
    }
    out
}

/// Every line a consumer named `name` gets from the node at `url` (acking
/// each batch) until idle.
pub(crate) async fn consume_all(url: &str, category: &str, name: &str) -> Vec<String> {
    let consumer = chunkbus_client::Consumer::new(chunkbus_client::ConsumerConfig {
        servers: vec![url.to_owned()],
        category: category.into(),
        name: name.into(),
        until_idle: Some(Duration::from_secs(1)),
        ..Default::default()
    })
    .unwrap();
    let got = std::sync::Mutex::new(Vec::new());
    consumer
        .run(|batch| {
            let text = String::from_utf8(batch.data.to_vec()).unwrap();
            got.lock().unwrap().extend(text.lines().map(str::to_owned));
            async { Ok::<(), std::convert::Infallible>(()) }
        })
        .await
        .unwrap();
    got.into_inner().unwrap()
}

fn key(category: &str, chunk: &str) -> String {
    format!("{category}/{chunk}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_chunks_are_uploaded_byte_identical_in_one_part_or_many() {
    let s3 = TestS3::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (node, client) = start(
        &s3,
        dir.path(),
        &[
            "--max-chunk-bytes",
            "12MiB",
            "--s3-part-size",
            "5MiB",
            "--rotate-after",
            "500ms",
        ],
    )
    .await;
    // Small chunks (one PUT each) ...
    produce(&client, "small", 0, 3000, 100).await;
    // ... and one of 12 MiB minus a little (three parts).
    let line = format!("{}\n", "m".repeat(1023));
    let body = line.repeat(4096);
    for _ in 0..3 {
        client
            .produce("big", body.clone(), &ProduceOptions::default())
            .await
            .unwrap();
    }
    for (category, n) in [("small", 1), ("big", 1)] {
        let chunks = all_uploaded(&client, category, n).await;
        for c in &chunks {
            let local = std::fs::read(dir.path().join(category).join(&c.name)).unwrap();
            assert_eq!(local.len() as u64, c.size);
            let object = s3
                .get(&key(category, &c.name))
                .await
                .expect("object exists");
            assert!(
                object == local,
                "object {} differs from the chunk file",
                c.name
            );
            assert!(c.local, "{} is still local", c.name);
            assert_eq!(
                s3.uploads(&key(category, &c.name)),
                1,
                "{} uploaded once",
                c.name
            );
        }
    }
    let big = client.chunks("big").await.unwrap();
    assert!(big.iter().any(|c| c.size > 10 << 20), "{big:?}");
    let head = s3
        .client()
        .head_object()
        .bucket(BUCKET)
        .key(key("big", &big[0].name))
        .send()
        .await
        .unwrap();
    assert_eq!(head.content_type(), Some("application/x-ndjson"));
    let st = status(&client).await.s3.expect("S3 status");
    assert_eq!((st.backlog_chunks, st.backlog_bytes), (0, 0));
    assert!(st.uploaded_chunks >= 2 && st.last_error.is_none(), "{st:?}");
    assert!(
        !dir.path()
            .join(".multipart")
            .join("big")
            .read_dir()
            .unwrap()
            .any(|_| true)
    );
    node.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crc32c_checksums_are_an_option() {
    let s3 = TestS3::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (node, client) = start(
        &s3,
        dir.path(),
        &[
            "--s3-checksum",
            "crc32c",
            "--max-chunk-bytes",
            "6MiB",
            "--s3-part-size",
            "5MiB",
            "--rotate-after",
            "300ms",
        ],
    )
    .await;
    let line = format!("{}\n", "c".repeat(511));
    client
        .produce("c", line.repeat(11_000), &ProduceOptions::default())
        .await
        .unwrap();
    produce(&client, "c", 0, 100, 100).await;
    for c in all_uploaded(&client, "c", 1).await {
        let local = std::fs::read(dir.path().join("c").join(&c.name)).unwrap();
        assert!(s3.get(&key("c", &c.name)).await.unwrap() == local);
    }
    node.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_backlog_resumes_without_repeating_or_skipping() {
    let mut s3 = TestS3::start().await;
    let dir = tempfile::tempdir().unwrap();
    let args = ["--max-chunk-bytes", "16KiB", "--rotate-after", "300ms"];
    let (node, client) = start(&s3, dir.path(), &args).await;
    let mut sent = produce(&client, "app", 0, 1000, 50).await;
    let first = all_uploaded(&client, "app", 2).await;
    // The store goes down: a backlog builds up.
    s3.stop().await;
    sent.extend(produce(&client, "app", 1000, 1000, 50).await);
    let backlog = eventually(CONDITION_DEADLINE, "a backlog", || async {
        let st = status(&client).await.s3?;
        let all_complete = client.chunks("app").await.ok()?.iter().all(|c| c.complete);
        (all_complete && st.backlog_chunks > 0 && st.last_error.is_some()).then_some(st)
    })
    .await;
    node.kill().await;
    s3.restart().await;
    let (node, client) = start(&s3, dir.path(), &args).await;
    let chunks = all_uploaded(
        &client,
        "app",
        first.len() + backlog.backlog_chunks as usize,
    )
    .await;
    for c in &chunks {
        let k = key("app", &c.name);
        assert_eq!(s3.uploads(&k), 1, "{k} uploaded {} times", s3.uploads(&k));
        let local = std::fs::read(dir.path().join("app").join(&c.name)).unwrap();
        assert!(s3.get(&k).await.unwrap() == local, "{k} differs");
    }
    assert_eq!(s3.keys().await.len(), chunks.len());
    assert_eq!(all_lines(&client, "app").await, sent);
    node.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_outage_never_stops_ingestion_and_the_backlog_drains() {
    let mut s3 = TestS3::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (node, client) = start(
        &s3,
        dir.path(),
        &["--max-chunk-bytes", "8KiB", "--rotate-after", "200ms"],
    )
    .await;
    // A steady producer: every request must succeed while S3 is down.
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let producer = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut sent = Vec::new();
            let mut i = 0;
            loop {
                sent.extend(produce(&client, "steady", i, 20, 20).await);
                i += 20;
                if stop_rx.try_recv().is_ok() {
                    return sent;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    eventually(CONDITION_DEADLINE, "a first upload", || async {
        let st = status(&client).await.s3?;
        (st.uploaded_chunks > 0).then_some(())
    })
    .await;
    s3.stop().await;
    let down = eventually(CONDITION_DEADLINE, "the outage to show", || async {
        let st = status(&client).await.s3?;
        (st.backlog_chunks >= 20 && st.last_error.is_some()).then_some(st)
    })
    .await;
    assert!(down.backlog_bytes > 0, "{down:?}");
    let metrics = metrics_text(&node.url("")).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("chunkbus_s3_backlog_chunks ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    s3.restart().await;
    stop_tx.send(()).unwrap();
    let sent = producer.await.unwrap();
    let chunks = all_uploaded(&client, "steady", down.backlog_chunks as usize).await;
    for c in &chunks {
        let local = std::fs::read(dir.path().join("steady").join(&c.name)).unwrap();
        assert!(s3.get(&key("steady", &c.name)).await.unwrap() == local);
    }
    let st = status(&client).await.s3.unwrap();
    assert_eq!(st.backlog_chunks, 0);
    assert!(
        st.last_error.is_none() && st.last_success.is_some(),
        "{st:?}"
    );
    assert_eq!(all_lines(&client, "steady").await, sent);
    node.kill().await;
}

/// A new data directory whose store hangs (requests accepted, never
/// answered) takes writes once the listing's patience is over, not once
/// the hung requests time out (two minutes each, retried). Then its chunks
/// are uploaded when the store answers. (`--peers`: with membership through
/// the bucket, a new data directory waits for the bucket however long.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_node_whose_store_hangs_takes_writes_after_the_patience() {
    let s3 = TestS3::start().await;
    s3.freeze(true);
    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let (node, client) = start(
        &s3,
        dir.path(),
        &["--peers", "t1=127.0.0.1:0", "--rotate-after", "200ms"],
    )
    .await;
    let patience = chunkbus::upload::FRESH_LISTING_PATIENCE;
    eventually(patience + CONDITION_DEADLINE, "writes to open", || async {
        status(&client).await.writes_held.is_empty().then_some(())
    })
    .await;
    assert!(
        started.elapsed() >= patience,
        "writes opened before the listing or its patience: {:?}",
        started.elapsed()
    );
    produce(&client, "app", 0, 3, 3).await;
    s3.freeze(false);
    all_uploaded(&client, "app", 1).await;
    node.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_chunks_are_evicted_and_read_back_from_s3_everywhere() {
    let s3 = TestS3::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (node, client) = start(
        &s3,
        dir.path(),
        &["--max-chunk-bytes", "16KiB", "--rotate-after", "300ms"],
    )
    .await;
    let sent = produce(&client, "ev", 0, 1500, 100).await;
    let chunks = all_uploaded(&client, "ev", 3).await;
    let mut originals = BTreeMap::new();
    for c in &chunks {
        originals.insert(
            c.name.clone(),
            std::fs::read(dir.path().join("ev").join(&c.name)).unwrap(),
        );
    }
    // Nothing is evicted while a consumer has not acked it...
    client
        .set_position("ev", "reader", "earliest")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(client.chunks("ev").await.unwrap().iter().all(|c| c.local));
    assert_eq!(consume_all(&node.url(""), "ev", "reader").await, sent);
    // ... and everything is once it has.
    let evicted = eventually(CONDITION_DEADLINE, "eviction", || async {
        let cs = client.chunks("ev").await.ok()?;
        (cs.len() == chunks.len() && cs.iter().all(|c| !c.local && c.uploaded)).then_some(cs)
    })
    .await;
    for c in &evicted {
        assert!(
            !dir.path().join("ev").join(&c.name).exists(),
            "{} still on disk",
            c.name
        );
        // The /v1 read route, from S3, 1 MiB ranged reads.
        assert!(
            read_all(&client, "ev", c).await == originals[&c.name],
            "{}",
            c.name
        );
        // Headers as for a local chunk.
        let r = client.read_chunk("ev", &c.name, 0, 100).await.unwrap();
        assert!(r.complete && r.chunk_size == c.size && r.next_offset <= 100);
        // A line boundary check on an evicted chunk.
        let resp = reqwest::get(node.url(&format!("/v1/categories/ev/chunks/{}?offset=1", c.name)))
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
    }
    // A second consumer reads it all through `next`, from S3.
    assert_eq!(consume_all(&node.url(""), "ev", "late").await, sent);
    // Chukcha's /read serves it too.
    let c = &evicted[0];
    let body = reqwest::get(node.url(&format!(
        "/read?category=ev&chunk={}&off=0&max_size=1000000",
        c.name
    )))
    .await
    .unwrap()
    .bytes()
    .await
    .unwrap();
    assert!(body[..] == originals[&c.name][..]);
    let st = status(&client).await.s3.unwrap();
    assert!(st.evicted_chunks >= evicted.len() as u64, "{st:?}");
    node.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_its_disk_serves_everything_from_s3_and_reuses_no_name() {
    let s3 = TestS3::start().await;
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--max-chunk-bytes",
        "16KiB",
        "--rotate-after",
        "300ms",
        "--local-retention",
        "1s",
        "--kafka-listen",
        "127.0.0.1:0",
    ];
    let (node, client) = start(&s3, dir.path(), &args).await;
    let sent = produce(&client, "lost", 0, 1200, 100).await;
    // Kafka offsets are the line numbers: 0, 1, 2...
    let kafka = |node: &BinNode| node.kafka_addr.unwrap().to_string();
    let numbered: Vec<(u64, String)> = sent
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u64, l.clone()))
        .collect();
    assert!(crate::kafka::consume(&kafka(&node), "lost", 0).await == numbered);
    let chunks = all_uploaded(&client, "lost", 2).await;
    // --local-retention evicts uploaded chunks by age alone.
    eventually(CONDITION_DEADLINE, "eviction by age", || async {
        let cs = client.chunks("lost").await.ok()?;
        cs.iter().all(|c| !c.local).then_some(())
    })
    .await;
    node.kill().await;
    std::fs::remove_dir_all(dir.path()).unwrap();
    let (node, client) = start(&s3, dir.path(), &args).await;
    // Writes wait until the bucket is listed; this one lands in a new chunk.
    let appended = client
        .produce("lost", "after the wipe\n", &ProduceOptions::default())
        .await
        .unwrap();
    let new_chunk = appended.chunk.unwrap();
    assert!(
        chunks.iter().all(|c| c.name != new_chunk),
        "{new_chunk} reuses the name of an uploaded chunk"
    );
    let listed = client.chunks("lost").await.unwrap();
    for c in &chunks {
        let l = listed
            .iter()
            .find(|l| l.name == c.name)
            .expect("listed again");
        assert!(
            !l.local && l.uploaded && l.complete && l.size == c.size,
            "{l:?}"
        );
        // Numbered as before, from the objects' metadata.
        assert_eq!((l.first_line, l.lines), (c.first_line, c.lines), "{l:?}");
    }
    crate::cluster::check_numbering("lost", &listed);
    let end = chunks
        .iter()
        .filter_map(|c| Some(c.first_line? + c.lines?))
        .max();
    let new = listed.iter().find(|l| l.name == new_chunk).unwrap();
    assert_eq!((new.first_line, new.lines), (end, Some(1)), "{new:?}");
    let mut want = sent.clone();
    want.push("after the wipe".to_owned());
    assert_eq!(all_lines(&client, "lost").await, want);
    // The same offsets through Kafka, from S3 now, and the new line after.
    let mut numbered = numbered;
    numbered.push((sent.len() as u64, "after the wipe".to_owned()));
    assert!(crate::kafka::consume(&kafka(&node), "lost", 0).await == numbered);
    assert_eq!(s3.upload_counts().values().copied().max(), Some(1));
    node.kill().await;
}

/// A node that lost its disk and cannot list the bucket uses its chunk
/// names again. Under its second name S3 holds a chunk its previous process
/// wrote: its lines are stored again as new lines, and the object replaced
/// by the chunk of that name. Under its first name S3 holds an object that
/// is no chunk (it does not end a line): never overwritten, that chunk
/// fails alone and is reported while the others are uploaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_that_cannot_be_uploaded_fails_alone_and_is_reported() {
    let s3 = TestS3::start().await;
    let (foreign, previous) = (
        key("app", "t1-chunk000000000"),
        key("app", "t1-chunk000000001"),
    );
    for (k, body) in [
        (&foreign, &b"not lines: no newline at the end"[..]),
        (&previous, &b"uploaded before the disk was lost\n"[..]),
    ] {
        s3.client()
            .put_object()
            .bucket(BUCKET)
            .key(k)
            .body(body.to_vec().into())
            .send()
            .await
            .unwrap();
    }
    let before = s3.get(&foreign).await.unwrap();
    s3.refuse_bucket(true);
    let dir = tempfile::tempdir().unwrap();
    let args = ["--max-chunk-bytes", "4KiB", "--rotate-after", "300ms"];
    let (node, client) = start(&s3, dir.path(), &args).await;
    let mut sent = produce(&client, "app", 0, 300, 20).await;
    // Every other chunk is uploaded while the colliding one keeps failing.
    let (failing, chunks) = eventually(CONDITION_DEADLINE, "the others uploaded", || async {
        let chunks = client.chunks("app").await.ok()?;
        let st = status(&client).await.s3?;
        let others = chunks.iter().filter(|c| c.name != "t1-chunk000000000");
        let done = chunks.len() > 3 && others.clone().all(|c| c.complete && c.uploaded);
        let failing = st.failing_chunks.first()?.clone();
        (done && failing.attempts >= 2).then_some((failing, chunks))
    })
    .await;
    assert_eq!(
        (failing.category.as_str(), failing.chunk.as_str()),
        ("app", "t1-chunk000000000")
    );
    assert!(
        failing.error.contains("does not end a line") && failing.error.contains("left as it is"),
        "{failing:?}"
    );
    let first = chunks
        .iter()
        .find(|c| c.name == "t1-chunk000000000")
        .unwrap();
    assert!(
        first.complete && !first.uploaded && first.local,
        "{first:?}"
    );
    assert_eq!(s3.get(&foreign).await.unwrap(), before);
    let st = status(&client).await.s3.unwrap();
    assert_eq!(
        (st.backlog_chunks, st.failing_chunks.len()),
        (1, 1),
        "{st:?}"
    );
    let metrics = metrics_text(&node.url("")).await;
    assert!(
        metrics.contains("chunkbus_s3_failing_chunks 1"),
        "{metrics}"
    );
    // The previous process's line is kept once; S3 holds the chunk of its
    // name as the node does.
    let second = chunks
        .iter()
        .find(|c| c.name == "t1-chunk000000001")
        .unwrap();
    assert_eq!(
        s3.get(&previous).await.unwrap(),
        read_all(&client, "app", second).await
    );
    sent.push("uploaded before the disk was lost".to_owned());
    sent.sort();
    let mut lines = all_lines(&client, "app").await;
    lines.sort();
    assert_eq!(lines, sent);
    crate::cluster::check_numbering("app", &chunks);
    let metrics = metrics_text(&node.url("")).await;
    assert!(
        metrics.contains("chunkbus_s3_rescued_lines_total 1\n"),
        "{metrics}"
    );
    node.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_are_reported_clearly_and_ingestion_goes_on() {
    let s3 = TestS3::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = s3_command(&s3, "t1", dir.path(), &["--max-chunk-bytes", "4KiB"]);
    cmd.env("AWS_SECRET_ACCESS_KEY", "wrong-secret");
    let node = BinNode::spawn(cmd).await;
    let client = Client::new(&node.url("")).unwrap();
    produce(&client, "app", 0, 300, 50).await;
    let st = eventually(CONDITION_DEADLINE, "the refusal in the status", || async {
        let st = status(&client).await.s3?;
        (st.backlog_chunks > 0 && st.last_error.is_some()).then_some(st)
    })
    .await;
    assert!(
        st.last_error
            .as_deref()
            .unwrap()
            .contains("SignatureDoesNotMatch")
            || st.last_error.as_deref().unwrap().contains("HTTP 403"),
        "{st:?}"
    );
    let log = eventually(CONDITION_DEADLINE, "the start-up log line", || async {
        let log = node.stderr.lock().unwrap().clone();
        log.contains("S3 refused the credentials").then_some(log)
    })
    .await;
    assert!(!log.contains("wrong-secret"), "the secret was logged");
    assert_eq!(
        log.matches("S3 refused the credentials").count(),
        1,
        "{log}"
    );
    assert!(s3.keys().await.is_empty());
    node.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_bucket_is_reported_clearly() {
    let s3 = TestS3::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = serve_command("t1", dir.path());
    cmd.args([
        "--s3-bucket",
        "no-such-bucket",
        "--s3-endpoint",
        &s3.endpoint(),
    ]);
    for (k, v) in s3.env() {
        cmd.env(k, v);
    }
    let node = BinNode::spawn(cmd).await;
    eventually(CONDITION_DEADLINE, "the start-up log line", || async {
        let log = node.stderr.lock().unwrap().clone();
        log.contains("the S3 bucket does not exist").then_some(())
    })
    .await;
    node.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_read_uploaded_chunks_through_s3_and_upload_for_a_lost_owner() {
    let s3 = TestS3::start().await;
    // n1 reaches S3 through a proxy that the test can cut.
    let args = ["--max-chunk-bytes", "16KiB", "--rotate-after", "300ms"];
    let (mut cluster, to_s3) = s3_cluster_through_proxy(&s3, 2, 0, &args).await;
    let (n1, n2) = (cluster.client(0), cluster.client(1));
    // The owner uploads; the replica learns it and reads through S3.
    let sent = produce(&n1, "app", 0, 800, 100).await;
    let owned = all_uploaded(&n1, "app", 2).await;
    let seen = eventually(
        CONDITION_DEADLINE,
        "the replica to learn the uploads",
        || async {
            let cs = n2.chunks("app").await.ok()?;
            (cs.len() == owned.len() && cs.iter().all(|c| c.uploaded && c.complete)).then_some(cs)
        },
    )
    .await;
    assert_eq!(
        seen.iter().map(|c| (&c.name, c.size)).collect::<Vec<_>>(),
        owned.iter().map(|c| (&c.name, c.size)).collect::<Vec<_>>()
    );
    assert_eq!(all_lines(&n2, "app").await, sent);
    // n1 can no longer reach S3: its next chunks only get to n2.
    to_s3.set_cut(true);
    let orphans_sent = produce(&n1, "orphan", 0, 600, 100).await;
    let copies = eventually(
        CONDITION_DEADLINE,
        "n2 to hold n1's complete chunks",
        || async {
            let owner = n1.chunks("orphan").await.ok()?;
            let copy = n2.chunks("orphan").await.ok()?;
            let done = !owner.is_empty()
                && owner.iter().all(|c| c.complete && !c.uploaded)
                && copy.len() == owner.len()
                && copy
                    .iter()
                    .zip(&owner)
                    .all(|(a, b)| a.complete && a.size == b.size);
            done.then_some(copy)
        },
    )
    .await;
    // n1 dies; n2 is told it is gone and uploads its chunks.
    cluster.kill(0).await;
    n2.forget_node("n1").await.unwrap();
    let uploaded = all_uploaded(&n2, "orphan", copies.len()).await;
    for c in &uploaded {
        let local = std::fs::read(cluster.dirs[1].join("orphan").join(&c.name)).unwrap();
        assert!(
            s3.get(&key("orphan", &c.name)).await.unwrap() == local,
            "{}",
            c.name
        );
    }
    assert_eq!(all_lines(&n2, "orphan").await, orphans_sent);
}

/// An owner is lost while the chunk uploader for it (the smallest name)
/// holds a shorter copy of its open chunk than the other replica: it was
/// cut off from the owner while the other copied lines acknowledged with
/// `min_replicas` 1, and each completes its copy where it stands when the
/// owner is forgotten. The uploader brings its copy up to the longer one
/// first: S3 holds every acknowledged line. Before, it uploaded its shorter
/// copy, and the lines past its end were on the other node's disk only
/// (which waited for an object of its own length for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_owners_chunk_is_uploaded_from_its_longest_copy() {
    lost_owner_with_copies_of_two_lengths(0).await;
}

/// As above, the other replica cut off: its copy is shorter than the
/// object the uploader wrote, and gives way to it (read through S3).
/// Before, it waited for an object of its own length for ever, never
/// evicted, and served fewer lines than the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shorter_copy_of_a_lost_owners_chunk_gives_way_to_its_upload() {
    lost_owner_with_copies_of_two_lengths(1).await;
}

/// As above (the uploader's copy shorter), but the replica with the
/// longer copy cannot be reached while the uploader writes the object, and
/// cannot reach S3 itself. Once back, it finds the object shorter than its
/// copy: it stores the lines past the object's end again as its own new
/// lines (replicated and uploaded like any), and its copy gives way to the
/// object. Before, the lines past the object's end stayed on its disk
/// alone, the copy never uploaded nor evicted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_longer_copy_of_a_lost_owners_chunk_stores_its_lines_again_and_gives_way() {
    let s3 = TestS3::start().await;
    let (uploader, longer, owner) = (0, 1, 2);
    // The longer copy's node reaches S3 through a proxy the test can cut.
    let (mut cluster, to_s3) =
        s3_cluster_through_proxy(&s3, 3, longer, &["--rotate-after", "1h"]).await;
    let (name, mut sent) = copies_of_two_lengths(&cluster, uploader).await;
    let short = cluster.client(uploader).chunks("app").await.unwrap()[0].size;
    // The owner is lost while the longer copy's node is cut off from the
    // others and from S3: the uploader writes its shorter copy.
    cluster.kill(owner).await;
    cluster.set_cut(longer, true);
    to_s3.set_cut(true);
    for i in [uploader, longer] {
        cluster.client(i).forget_node("n3").await.unwrap();
    }
    let key = key("app", &name);
    eventually(CONDITION_DEADLINE, "the shorter copy uploaded", || async {
        (s3.get(&key).await?.len() as u64 == short).then_some(())
    })
    .await;
    cluster.set_cut(longer, false);
    to_s3.set_cut(false);
    // Every acknowledged line on both nodes, once; the chunk as in S3.
    sent.sort();
    for i in [uploader, longer] {
        let got = eventually(CONDITION_DEADLINE, "every line on the node", || async {
            let list = cluster.client(i).chunks("app").await.ok()?;
            let c = list.iter().find(|c| c.name == name)?;
            (c.uploaded && c.size == short).then_some(())?;
            let mut lines = all_lines(&cluster.client(i), "app").await;
            lines.sort();
            (lines == sent).then_some(lines)
        })
        .await;
        assert_eq!(got, sent, "node {i}");
    }
    // The same chunks, sizes and numbers on both.
    let list = eventually(
        CONDITION_DEADLINE,
        "both nodes to list the same",
        || async {
            let key = |l: Vec<ChunkInfo>| -> Vec<_> {
                l.into_iter()
                    .map(|c| (c.name, c.size, c.first_line, c.lines))
                    .collect()
            };
            let a = cluster.client(uploader).chunks("app").await.ok()?;
            let b = cluster.client(longer).chunks("app").await.ok()?;
            (key(a.clone()) == key(b)).then_some(a)
        },
    )
    .await;
    crate::cluster::check_numbering("app", &list);
    let metrics = metrics_text(&cluster.url(longer)).await;
    assert!(
        metrics.contains("chunkbus_s3_rescued_lines_total 50\n"),
        "{metrics}"
    );
}

/// Nodes 0 and 1 copy node 2's open chunk; node `cut_off` is cut off from
/// node 2 while the other copies 50 more lines (`min_replicas` 1); node 2
/// is killed and forgotten. Checks that S3 holds every acknowledged line
/// and both nodes list and serve the same chunk.
async fn lost_owner_with_copies_of_two_lengths(cut_off: usize) {
    let s3 = TestS3::start().await;
    let mut cluster = s3_cluster(&s3, 3, &["--rotate-after", "1h"]).await;
    let owner = 2;
    let (name, sent) = copies_of_two_lengths(&cluster, cut_off).await;
    let whole = cluster.client(owner).chunks("app").await.unwrap()[0].size;
    let short = cluster.client(cut_off).chunks("app").await.unwrap()[0].size;
    assert!(short < whole, "{short} {whole}");
    // The owner is lost: each replica completes its copy where it stands.
    cluster.kill(owner).await;
    for i in [0, 1] {
        cluster.client(i).forget_node("n3").await.unwrap();
    }
    let what = "the chunk in S3 whole and listed so on both replicas";
    let lists = eventually(CONDITION_DEADLINE, what, || async {
        let mut lists = Vec::new();
        for i in [0, 1] {
            let list = cluster.client(i).chunks("app").await.ok()?;
            let c = list.iter().find(|c| c.name == name)?;
            (c.complete && c.uploaded && c.size == whole).then_some(())?;
            lists.push(list);
        }
        Some(lists)
    })
    .await;
    assert_eq!(
        s3.get(&key("app", &name)).await.map(|b| b.len() as u64),
        Some(whole)
    );
    crate::cluster::check_numbering("app", &lists[0]);
    let sizes = |l: &Vec<ChunkInfo>| -> Vec<_> { l.iter().map(|c| (c.size, c.lines)).collect() };
    assert_eq!(sizes(&lists[0]), sizes(&lists[1]));
    for i in [0, 1] {
        assert_eq!(all_lines(&cluster.client(i), "app").await, sent, "node {i}");
    }
}

/// A forgotten owner that was not really gone comes back with more of its
/// chunk than the object its replicas uploaded for it: 50 lines it
/// acknowledged without `min_replicas` while no replica could copy them.
/// Afterwards every acknowledged line is on every node once and in S3,
/// every node lists the same chunks, sizes and numbers, and a consumer that
/// read the frozen chunk to its end on a replica before the owner came back
/// gets the 50 lines too. The owner replaces the object in one conditional
/// write: S3 never deletes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_owner_that_returns_with_more_of_its_chunk_loses_no_line() {
    let s3 = TestS3::start().await;
    let object = forgotten_owner_returns(&s3, 50, &[]).await;
    assert_eq!(s3.deletes(&object), 0);
}

/// The same, with the owner's chunk larger than a part: the multipart
/// upload replaces the object, conditionally, at its completion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_owner_replaces_the_object_by_a_multipart_upload() {
    let s3 = TestS3::start().await;
    let object = forgotten_owner_returns(&s3, 6 * 1024, &["--s3-part-size", "5MiB"]).await;
    assert_eq!(s3.deletes(&object), 0);
    assert_eq!(s3.parts(&object), 2);
}

/// The same against a store without conditional overwrites (`If-Match`
/// answered 501): the owner deletes the object and creates its chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_owner_replaces_the_object_on_a_store_without_if_match() {
    let s3 = TestS3::start().await;
    s3.refuse_if_match(true);
    let object = forgotten_owner_returns(&s3, 50, &[]).await;
    assert_eq!(s3.deletes(&object), 1);
}

/// The schedule of the tests above: `lines` lines that only the owner
/// holds (of 1 KiB each when there are more than 50), nodes started with
/// `args`. Checks all but how the object was replaced, and that it was
/// uploaded twice (for the forgotten owner, then by the owner); its key.
async fn forgotten_owner_returns(s3: &TestS3, lines: usize, args: &[&str]) -> String {
    let args: Vec<&str> = ["--rotate-after", "1h"]
        .iter()
        .chain(args)
        .copied()
        .collect();
    let mut cluster = s3_cluster(s3, 3, &args).await;
    let owner = 2;
    let (name, mut sent) = copied_fifty(&cluster).await;
    for i in [0, 1] {
        cluster.link(i, owner).set_cut(true);
    }
    let pad = if lines > 50 {
        "x".repeat(1000)
    } else {
        String::new()
    };
    let more: Vec<String> = (0..lines)
        .map(|i| format!("owner only {i:05}{pad}"))
        .collect();
    let body = more.join("\n") + "\n";
    let default = ProduceOptions::default();
    cluster
        .client(owner)
        .produce("app", body, &default)
        .await
        .unwrap();
    sent.extend(more);
    sent.sort();
    let short = cluster.client(0).chunks("app").await.unwrap()[0].size;
    // Lost: the replicas complete their copies and upload one.
    cluster.kill(owner).await;
    for i in [0, 1] {
        cluster.client(i).forget_node("n3").await.unwrap();
        cluster.link(i, owner).set_cut(false);
    }
    let object = key("app", &name);
    eventually(CONDITION_DEADLINE, "the frozen chunk uploaded", || async {
        (s3.get(&object).await?.len() as u64 == short).then_some(())
    })
    .await;
    let early = consume_all(&cluster.url(0), "app", "reader").await;
    assert_eq!(early.len(), 50, "{early:?}");
    assert_eq!(s3.uploads(&object), 1);
    // Back, with its disk.
    cluster.start_node(owner).await;
    let list = settled_alike(&cluster, &sent).await;
    for c in list.iter().filter(|c| c.complete) {
        let held = read_all(&cluster.client(0), "app", c).await;
        assert!(
            s3.get(&key("app", &c.name)).await == Some(held),
            "{}",
            c.name
        );
    }
    let late = consume_all(&cluster.url(0), "app", "reader").await;
    let mut seen: Vec<String> = early.into_iter().chain(late).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen, sent, "the consumer");
    assert_eq!(s3.uploads(&object), 2);
    object
}

/// A forgotten owner comes back with its disk and replaces the beginning
/// of its chunk that a peer uploaded for it, then loses its disk before
/// its peers hear of the replacement: they still record their copies as
/// uploaded at the short size. The wiped owner restores the chunk as S3
/// holds it, not as the peers record it, before its own listing of the
/// bucket could tell it (refused here), and numbers its next lines after
/// the object's: no line number is given twice. (Found by the chaos soak:
/// the restore trusted the peers' record, numbered a later chunk after it,
/// and the object's last lines and that chunk's first lines shared
/// numbers.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_owner_restores_the_object_it_replaced_not_its_peers_short_record() {
    let s3 = TestS3::start().await;
    let mut w = replaced_then_wiped(&s3).await;
    s3.refuse_full_listings(true);
    w.cluster.start_node(w.owner).await;
    let restored = w.restored().await;
    assert_eq!(
        (restored.size, restored.first_line, restored.lines),
        (w.full, Some(0), Some(70)),
        "{restored:?}"
    );
    s3.refuse_full_listings(false);
    w.cluster.wait_writes_open(w.owner).await;
    let next = w.produce_one().await;
    assert_eq!(next.first_line, Some(70), "{next:?}");
    w.settles(&s3, w.full).await;
}

/// The schedule of the test above, where the wiped owner cannot ask S3 at
/// its restore (the bucket refuses it): it restores its peers' record of
/// the short object and numbers its next lines after it. Once S3 answers,
/// the object under the chunk's name is found longer, with numbers those
/// lines took: the owner fetches the chunk as recorded from the object's
/// beginning, stores the object's further lines again as new lines, and
/// replaces the object with the chunk, so that no number is given twice
/// and no line is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_owner_that_could_not_ask_s3_stores_again_what_its_replacement_held_more() {
    let s3 = TestS3::start().await;
    let mut w = replaced_then_wiped(&s3).await;
    w.restart_refused(&s3).await;
    s3.refuse_bucket(false);
    w.settles(&s3, w.short).await;
    let logs = w.cluster.logs(w.owner);
    assert!(
        logs.contains("fetching the recorded bytes from S3"),
        "{logs}"
    );
}

/// As above, but when S3 answers again it serves lookups and refuses
/// downloads: the start-up listing finds the object and cannot fetch the
/// recorded bytes. The node tries again (it is not left short until its next
/// start), and the chunk settles as above once S3 serves reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_owner_tries_again_the_fetch_that_s3_refused() {
    let s3 = TestS3::start().await;
    let mut w = replaced_then_wiped(&s3).await;
    w.restart_refused(&s3).await;
    s3.refuse_object_reads(true);
    s3.refuse_bucket(false);
    eventually(CONDITION_DEADLINE, "the fetch refused", || async {
        let logs = w.cluster.logs(w.owner);
        logs.contains("cannot record a chunk found in S3; trying again")
            .then_some(())
    })
    .await;
    s3.refuse_object_reads(false);
    w.settles(&s3, w.short).await;
}

/// A wiped owner restores its open chunk from the peer with the largest
/// copy, and that peer loses its disk too while the restore waits for S3
/// (found by the chaos soak with an S3 outage). The restore used to read
/// that peer's copy again until the process stopped ("does not exist on
/// this node"), the chunk never restored. Now, once the peer answers
/// without it, it asks the peers again and restores the largest copy left;
/// the lines past it were on the two lost disks only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_whose_best_copy_was_lost_too_takes_the_largest_left() {
    let s3 = TestS3::start().await;
    let lost = best_copy_lost(&s3, &[1]).await;
    let logs = lost.cluster.logs(lost.owner);
    assert!(logs.contains("restoring the largest copy left"), "{logs}");
    // Node 0's copy, everywhere: the 50 lines the two lost disks did not
    // alone hold.
    uploaded_everywhere(&lost.cluster, 3, &lost.name, lost.short).await;
    let mut lines = all_lines(&lost.cluster.client(1), "app").await;
    lines.sort();
    assert_eq!(lines, lost.sent);
}

/// As above, with node 0's disk lost as well: no copy is left, and the
/// restore gives the chunk up instead of trying it forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_with_no_copy_left_gives_the_chunk_up() {
    let s3 = TestS3::start().await;
    let lost = best_copy_lost(&s3, &[0, 1]).await;
    let logs = lost.cluster.logs(lost.owner);
    assert!(
        logs.contains("no peer holds a copy of this chunk any more"),
        "{logs}"
    );
    for i in 0..3 {
        let list = lost.cluster.client(i).chunks("app").await.unwrap();
        assert!(
            list.iter().all(|c| c.name != lost.name),
            "node {i}: {list:?}"
        );
    }
    let partial: Vec<_> = std::fs::read_dir(lost.cluster.dirs[lost.owner].join("app"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(".restore."))
        .collect();
    assert!(partial.is_empty(), "{partial:?}");
}

/// What [`best_copy_lost`] leaves: the owner's restore ended.
struct BestCopyLost {
    cluster: crate::cluster::TestCluster,
    owner: usize,
    /// The owner's chunk.
    name: String,
    /// Node 0's copy of it: its first 50 lines.
    short: u64,
    /// Those 50 lines.
    sent: Vec<String>,
}

/// The owner (node 2) writes 100 lines to one chunk, node 1 copies them
/// all and node 0 the first 50; the owner loses its disk and restarts
/// while S3 does not answer, and once its restore has asked its peers
/// (node 1's copy the largest) and waits for S3, the nodes `wiped` lose
/// theirs. Returns once the owner says its restore ended.
async fn best_copy_lost(s3: &TestS3, wiped: &[usize]) -> BestCopyLost {
    let mut cluster = s3_cluster(s3, 3, &["--rotate-after", "1h"]).await;
    let owner = 2;
    let (name, sent) = copied_fifty(&cluster).await;
    // Node 0 falls behind: node 1 alone copies the next 50 lines.
    cluster.link(0, owner).set_cut(true);
    post_fifty(&cluster.client(owner), "node 1 only").await;
    let short = cluster.client(0).chunks("app").await.unwrap()[0].size;
    eventually(CONDITION_DEADLINE, "node 1's copy of 100 lines", || async {
        let copy = cluster.client(1).chunks("app").await.ok()?[0].clone();
        (copy.lines == Some(100)).then_some(())
    })
    .await;
    s3.freeze(true);
    cluster.kill(owner).await;
    std::fs::remove_dir_all(&cluster.dirs[owner]).unwrap();
    cluster.start_node(owner).await;
    let listing = format!("app/{}", chunkbus_client::ChunkName::prefix_of("n3"));
    eventually(
        CONDITION_DEADLINE,
        "the restore's listing of S3",
        || async { (s3.listings(&listing) > 0).then_some(()) },
    )
    .await;
    for &i in wiped {
        cluster.kill(i).await;
        std::fs::remove_dir_all(&cluster.dirs[i]).unwrap();
        cluster.start_node(i).await;
    }
    s3.freeze(false);
    cluster.link(0, owner).set_cut(false);
    cluster.wait_restored(owner).await;
    BestCopyLost {
        cluster,
        owner,
        name,
        short,
        sent,
    }
}

/// Waits until the three nodes of `cluster` list the same chunks of `app`
/// (names, sizes, completeness, numbers), each complete one uploaded; then
/// checks their numbering, and that each node serves exactly the lines
/// `sent` (sorted). Their list.
async fn settled_alike(cluster: &crate::cluster::TestCluster, sent: &[String]) -> Vec<ChunkInfo> {
    let what = "every node to list the same chunks, each complete one uploaded";
    let list = eventually(CONDITION_DEADLINE, what, || async {
        let mut lists = Vec::new();
        for i in 0..3 {
            let list = cluster.client(i).chunks("app").await.ok()?;
            list.iter()
                .all(|c| !c.complete || c.uploaded)
                .then_some(())?;
            lists.push(list);
        }
        let key = |l: &Vec<ChunkInfo>| -> Vec<_> {
            l.iter()
                .map(|c| (c.name.clone(), c.size, c.complete, c.first_line, c.lines))
                .collect()
        };
        (key(&lists[0]) == key(&lists[1]) && key(&lists[1]) == key(&lists[2]))
            .then(|| lists.swap_remove(0))
    })
    .await;
    crate::cluster::check_numbering("app", &list);
    for i in 0..3 {
        let mut lines = all_lines(&cluster.client(i), "app").await;
        lines.sort();
        assert_eq!(lines, sent, "node {i}");
    }
    list
}

/// A cluster whose node `owner` replaced the object of its chunk `name`
/// (`full` bytes; its peers uploaded its first `short` bytes while it was
/// forgotten, and record their copies so), then was killed and wiped.
struct ReplacedThenWiped {
    cluster: crate::cluster::TestCluster,
    owner: usize,
    name: String,
    full: u64,
    short: u64,
    /// Every line acknowledged, sorted.
    sent: Vec<String>,
}

async fn replaced_then_wiped(s3: &TestS3) -> ReplacedThenWiped {
    let mut cluster = s3_cluster(s3, 3, &["--rotate-after", "1h"]).await;
    let owner = 2;
    let (name, mut sent) = copied_fifty(&cluster).await;
    // The peers stay cut off from the owner until the test heals them.
    for i in [0, 1] {
        cluster.link(i, owner).set_cut(true);
    }
    let more: Vec<String> = (0..20).map(|i| format!("owner only {i:03}")).collect();
    cluster
        .client(owner)
        .produce("app", more.join("\n") + "\n", &ProduceOptions::default())
        .await
        .unwrap();
    sent.extend(more);
    sent.sort();
    let full = cluster.client(owner).chunks("app").await.unwrap()[0].size;
    let short = cluster.client(0).chunks("app").await.unwrap()[0].size;
    assert!(short < full);
    cluster.kill(owner).await;
    for i in [0, 1] {
        cluster.client(i).forget_node("n3").await.unwrap();
    }
    let object = key("app", &name);
    let what = "the frozen chunk uploaded, and recorded so by both peers";
    eventually(CONDITION_DEADLINE, what, || async {
        (s3.get(&object).await?.len() as u64 == short).then_some(())?;
        for i in [0, 1] {
            let copy = cluster.client(i).chunks("app").await.ok()?[0].clone();
            (copy.size == short && copy.uploaded).then_some(())?;
        }
        Some(())
    })
    .await;
    cluster.start_node(owner).await;
    eventually(CONDITION_DEADLINE, "the owner's replacement", || async {
        (s3.get(&object).await?.len() as u64 == full).then_some(())
    })
    .await;
    for i in [0, 1] {
        let copy = cluster.client(i).chunks("app").await.unwrap()[0].clone();
        assert_eq!((copy.size, copy.uploaded), (short, true), "node {i}");
    }
    cluster.kill(owner).await;
    std::fs::remove_dir_all(&cluster.dirs[owner]).unwrap();
    ReplacedThenWiped {
        cluster,
        owner,
        name,
        full,
        short,
        sent,
    }
}

impl ReplacedThenWiped {
    /// The chunk `name` as the owner lists it once restored (writes open
    /// before the restore, which goes on in the background).
    async fn restored(&self) -> ChunkInfo {
        eventually(CONDITION_DEADLINE, "the chunk restored", || async {
            let list = self.cluster.client(self.owner).chunks("app").await.ok()?;
            list.into_iter().find(|c| c.name == self.name)
        })
        .await
    }

    /// Starts the owner again while the bucket refuses it (left so): it
    /// restores its peers' record of the short object, no bytes, and
    /// numbers its next line after that record.
    async fn restart_refused(&mut self, s3: &TestS3) {
        s3.refuse_bucket(true);
        self.cluster.start_node(self.owner).await;
        let restored = self.restored().await;
        assert_eq!(
            (
                restored.size,
                restored.first_line,
                restored.lines,
                restored.local
            ),
            (self.short, Some(0), Some(50), false),
            "{restored:?}"
        );
        self.cluster.wait_writes_open(self.owner).await;
        let next = self.produce_one().await;
        assert_eq!(next.first_line, Some(50), "{next:?}");
    }

    /// Writes one line to the owner; the chunk it went to, as listed.
    async fn produce_one(&mut self) -> ChunkInfo {
        let line = "after the wipe".to_owned();
        let client = self.cluster.client(self.owner);
        let p = client
            .produce("app", format!("{line}\n"), &ProduceOptions::default())
            .await
            .unwrap();
        self.sent.push(line);
        self.sent.sort();
        let list = client.chunks("app").await.unwrap();
        list.into_iter()
            .find(|c| Some(&c.name) == p.chunk.as_ref())
            .unwrap()
    }

    /// Waits until S3 holds the chunk `name` at `size` bytes, heals the
    /// links, then checks that every node lists the same chunks, numbered
    /// without a gap or a number given twice, every line once, and the
    /// chunk in S3 as every node holds it.
    async fn settles(&self, s3: &TestS3, size: u64) {
        let cluster = &self.cluster;
        let object = key("app", &self.name);
        eventually(
            CONDITION_DEADLINE,
            "the object of the chunk settled",
            || async { (s3.get(&object).await?.len() as u64 == size).then_some(()) },
        )
        .await;
        for i in [0, 1] {
            cluster.link(i, self.owner).set_cut(false);
        }
        let list = settled_alike(cluster, &self.sent).await;
        assert_eq!(list[0].size, size, "{list:?}");
        let held = read_all(&cluster.client(0), "app", &list[0]).await;
        assert!(s3.get(&object).await == Some(held));
        let logs = cluster.logs(self.owner);
        assert!(!logs.contains("share numbers"), "{logs}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_old_chunks_everywhere_s3_included() {
    let s3 = TestS3::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (node, client) = start(
        &s3,
        dir.path(),
        &[
            "--max-chunk-bytes",
            "16KiB",
            "--rotate-after",
            "300ms",
            "--retention",
            "3s",
        ],
    )
    .await;
    produce(&client, "old", 0, 500, 100).await;
    let chunks = all_uploaded(&client, "old", 1).await;
    assert_eq!(s3.keys().await.len(), chunks.len());
    eventually(CONDITION_DEADLINE, "retention", || async {
        let listed = client.chunks("old").await.ok()?;
        (listed.is_empty() && s3.keys().await.is_empty()).then_some(())
    })
    .await;
    assert!(crate::harness::chunk_files(&dir.path().join("old")).is_empty());
    // Deleted chunks stay deleted after a restart (no resurrection from
    // the upload log or the bucket listing), and names are not reused.
    node.kill().await;
    let (node, client) = start(&s3, dir.path(), &["--retention", "3s"]).await;
    assert!(client.chunks("old").await.unwrap().is_empty());
    let next = client
        .produce("old", "new\n", &ProduceOptions::default())
        .await
        .unwrap()
        .chunk
        .unwrap();
    assert!(chunks.iter().all(|c| c.name != next), "{next} reused");
    node.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_multipart_upload_resumes_without_sending_parts_again() {
    let s3 = TestS3::start().await;
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--max-chunk-bytes",
        "32MiB",
        "--s3-part-size",
        "5MiB",
        "--rotate-after",
        "300ms",
    ];
    let (node, client) = start(&s3, dir.path(), &args).await;
    // Every part goes through, the completion does not.
    s3.refuse_completes(true);
    let line = format!("{}\n", "p".repeat(1023));
    client
        .produce("mp", line.repeat(18 * 1024), &ProduceOptions::default())
        .await
        .unwrap();
    let chunk = eventually(CONDITION_DEADLINE, "the chunk to complete", || async {
        let cs = client.chunks("mp").await.ok()?;
        cs.first().filter(|c| c.complete).cloned()
    })
    .await;
    let k = key("mp", &chunk.name);
    eventually(CONDITION_DEADLINE, "all four parts", || async {
        (s3.parts(&k) == 4).then_some(())
    })
    .await;
    let progress = dir
        .path()
        .join(".multipart")
        .join("mp")
        .join(format!("{}.json", chunk.name));
    eventually(CONDITION_DEADLINE, "the durable progress", || async {
        let text = std::fs::read_to_string(&progress).ok()?;
        (text.matches("etag").count() == 4).then_some(())
    })
    .await;
    node.kill().await;
    s3.refuse_completes(false);
    let (node, client) = start(&s3, dir.path(), &args).await;
    let done = all_uploaded(&client, "mp", 1).await;
    assert_eq!(done[0].name, chunk.name);
    assert_eq!(s3.parts(&k), 4, "parts were sent again");
    assert_eq!(s3.uploads(&k), 1);
    let local = std::fs::read(dir.path().join("mp").join(&chunk.name)).unwrap();
    assert!(s3.get(&k).await.unwrap() == local);
    assert!(!progress.exists(), "the progress file outlived the upload");
    node.kill().await;
}

/// Runs `chunkbus serve` as node `node` on `dir` with `s3` until it exits
/// (within the deadline); returns its exit status and stderr.
/// Runs [`s3_command`] until it exits (a start that is refused): whether
/// it succeeded, and its stderr.
pub(crate) async fn serve_until_exit(
    s3: &TestS3,
    node: &str,
    dir: &Path,
    args: &[&str],
) -> (bool, String) {
    let mut cmd = s3_command(s3, node, dir, args);
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(CONDITION_DEADLINE, cmd.output())
        .await
        .expect("the second process to exit")
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_under_a_live_node_name_refuses_to_start() {
    let s3 = TestS3::start().await;
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let first = BinNode::spawn(s3_command(&s3, "n1", a.path(), &[])).await;
    // Another data directory, the same name and bucket: refused, nothing
    // served, the first one untouched.
    let (ok, stderr) = serve_until_exit(&s3, "n1", b.path(), &[]).await;
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("another process runs as node n1")
            && stderr.contains(&first.addr.to_string()),
        "{stderr}"
    );
    let client = Client::new(&first.url("")).unwrap();
    client
        .produce("app", "still mine\n", &ProduceOptions::default())
        .await
        .unwrap();

    // A SIGKILLed process cannot release the name: its successor watches
    // the record until the beat stands still, then takes it over.
    first.kill().await;
    let second = BinNode::spawn(s3_command(&s3, "n1", a.path(), &[])).await;
    assert!(
        second
            .stderr
            .lock()
            .unwrap()
            .contains("taking the name over"),
    );
    // A graceful stop releases it: the next start does not wait.
    second.signal(rustix::process::Signal::TERM);
    let mut child = second.child;
    assert!(child.wait().await.unwrap().success());
    let third = BinNode::spawn(s3_command(&s3, "n1", a.path(), &[])).await;
    assert!(
        !third
            .stderr
            .lock()
            .unwrap()
            .contains("watching whether it still runs"),
        "{}",
        third.stderr.lock().unwrap()
    );
    let record = s3.get("_cluster/nodes/n1.json").await.expect("a record");
    let record: serde_json::Value = serde_json::from_slice(&record).unwrap();
    assert_eq!(record["node"], "n1");
    assert_eq!(record["stopped"], false);
    assert_eq!(record["address"], third.addr.to_string());

    // A process that finds another one writing under its name while it
    // runs takes no more writes, and says why.
    let mut other = record.clone();
    other["incarnation"] = serde_json::json!(1);
    other["address"] = serde_json::json!("10.9.9.9:8080");
    s3.client()
        .put_object()
        .bucket(BUCKET)
        .key("_cluster/nodes/n1.json")
        .body(serde_json::to_vec(&other).unwrap().into())
        .send()
        .await
        .unwrap();
    let client = Client::new(&third.url("")).unwrap();
    let held = eventually(CONDITION_DEADLINE, "writes closed", || async {
        let st = client.status().await.ok()?;
        st.writes_held
            .into_iter()
            .find(|w| w.contains("10.9.9.9:8080"))
    })
    .await;
    assert!(held.contains("another process"), "{held}");
    let refused = client
        .produce("app", "not now\n", &ProduceOptions::default())
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("503"), "{refused}");
    third.kill().await;
}

/// A cluster of `nodes` on the test S3 in which node `proxied` reaches S3
/// through a proxy the test can cut (returned with it).
async fn s3_cluster_through_proxy(
    s3: &TestS3,
    nodes: usize,
    proxied: usize,
    args: &[&str],
) -> (crate::cluster::TestCluster, crate::proxy::Proxy) {
    let to_s3 = crate::proxy::Proxy::start().await;
    to_s3.set_target(s3.addr);
    let endpoint = |i: usize| {
        let addr = if i == proxied { to_s3.addr } else { s3.addr };
        vec!["--s3-endpoint".to_owned(), format!("http://{addr}")]
    };
    let env = s3
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    let mut extra = vec!["--s3-bucket", BUCKET];
    extra.extend_from_slice(args);
    let cluster = crate::cluster::TestCluster::start_with(
        nodes,
        &extra,
        (0..nodes).map(endpoint).collect(),
        env,
    )
    .await;
    (cluster, to_s3)
}

/// Nodes 0 and 1 copy 50 lines of node 2's open chunk of `app`; then node
/// `cut_off` (0 or 1) is cut off from node 2 while the other copies 50 more
/// (acknowledged with `min_replicas` 1). The chunk and the lines.
async fn copies_of_two_lengths(
    cluster: &crate::cluster::TestCluster,
    cut_off: usize,
) -> (String, Vec<String>) {
    let owner = 2;
    let (name, mut sent) = copied_fifty(cluster).await;
    cluster.link(cut_off, owner).set_cut(true);
    let (again, more) = post_fifty(&cluster.client(owner), "one").await;
    assert_eq!(again, name);
    sent.extend(more);
    (name, sent)
}

/// Posts 50 lines tagged `both` to node 2's `app` with `min_replicas` 1,
/// and waits until nodes 0 and 1 both copied them; the chunk and the lines.
async fn copied_fifty(cluster: &crate::cluster::TestCluster) -> (String, Vec<String>) {
    let (name, sent) = post_fifty(&cluster.client(2), "both").await;
    eventually(CONDITION_DEADLINE, "both replicas to copy", || async {
        for i in [0, 1] {
            let list = cluster.client(i).chunks("app").await.ok()?;
            list.iter()
                .find(|c| c.name == name && c.lines == Some(50))?;
        }
        Some(())
    })
    .await;
    (name, sent)
}

/// Posts 50 lines tagged `tag` to `app` with `min_replicas` 1; the chunk
/// they went to and the lines.
async fn post_fifty(client: &Client, tag: &str) -> (String, Vec<String>) {
    let lines: Vec<String> = (0..50).map(|i| format!("{tag} {i:03}")).collect();
    let acked = ProduceOptions {
        min_replicas: Some(1),
        ..ProduceOptions::default()
    };
    let p = client
        .produce("app", lines.join("\n") + "\n", &acked)
        .await
        .unwrap();
    (p.chunk.unwrap(), lines)
}

/// A cluster of `nodes` nodes using `s3`, with `args`.
async fn s3_cluster(s3: &TestS3, nodes: usize, args: &[&str]) -> crate::cluster::TestCluster {
    let mut extra = s3.args();
    extra.extend(args.iter().map(|a| a.to_string()));
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let env = s3
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    crate::cluster::TestCluster::start_with(nodes, &extra, vec![Vec::new(); nodes], env).await
}

/// Waits until nodes `0..nodes` of `cluster` list chunk `name` of `app`
/// complete and uploaded at `size`, and list the same chunks of `app` (names,
/// sizes, numbers); returns their lists.
async fn uploaded_everywhere(
    cluster: &crate::cluster::TestCluster,
    nodes: usize,
    name: &str,
    size: u64,
) -> Vec<Vec<ChunkInfo>> {
    let what = format!("every node to list {name} uploaded at {size} bytes, and the same chunks");
    eventually(CONDITION_DEADLINE, &what, || async {
        let mut lists = Vec::new();
        for i in 0..nodes {
            let list = cluster.client(i).chunks("app").await.ok()?;
            let c = list.iter().find(|c| c.name == name)?;
            if !(c.complete && c.uploaded && c.size == size) {
                return None;
            }
            lists.push(list);
        }
        let key = |l: &Vec<ChunkInfo>| -> Vec<_> {
            l.iter()
                .map(|c| (c.name.clone(), c.size, c.first_line, c.lines))
                .collect()
        };
        lists
            .windows(2)
            .all(|w| key(&w[0]) == key(&w[1]))
            .then_some(lists)
    })
    .await
}

/// A node uploaded a chunk whose end its peers never copied (they were cut
/// off from it), then lost its disk, and at its restart the bucket cannot
/// be listed. Before, it restored the chunk from its peers' short copies as
/// complete, numbered its next lines after that, and uploaded the short
/// chunk over the whole one: the lines only S3 held were gone. Now it asks
/// S3 about each chunk its peers do not show uploaded, and takes S3's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_its_disk_takes_from_s3_what_its_peers_copied_short() {
    let s3 = TestS3::start().await;
    let mut cluster = s3_cluster(&s3, 3, &["--rotate-after", "1h"]).await;
    let owner = 2;
    let mut sent = Vec::new();
    let mut post = async |cluster: &crate::cluster::TestCluster, tag: &str| {
        let body = format!("{tag} {}\n", "y".repeat(60));
        let p = cluster
            .client(owner)
            .produce("app", body.clone(), &ProduceOptions::default())
            .await
            .unwrap_or_else(|e| panic!("{tag}: {e}"));
        sent.push(body.trim_end().to_owned());
        p.chunk.unwrap()
    };
    let mut name = String::new();
    for r in 0..5 {
        name = post(&cluster, &format!("copied{r}")).await;
    }
    let copied = cluster.client(owner).chunks("app").await.unwrap()[0].size;
    for peer in 0..2 {
        eventually(
            CONDITION_DEADLINE,
            "both peers to copy the chunk",
            || async {
                let list = cluster.client(peer).chunks("app").await.ok()?;
                list.iter()
                    .any(|c| c.name == name && c.size == copied)
                    .then_some(())
            },
        )
        .await;
    }
    // The peers never see the rest; the owner completes the chunk at its
    // restart and uploads it whole.
    cluster.set_cut(owner, true);
    for r in 0..5 {
        assert_eq!(post(&cluster, &format!("owner-only{r}")).await, name);
    }
    cluster.kill(owner).await;
    cluster.start_node(owner).await;
    let key = format!("app/{name}");
    let whole = eventually(CONDITION_DEADLINE, "the whole chunk in S3", || async {
        s3.get(&key).await.filter(|b| b.len() as u64 > copied)
    })
    .await;
    for peer in 0..2 {
        let list = cluster.client(peer).chunks("app").await.unwrap();
        assert_eq!(list[0].size, copied, "the peers stay short: {list:?}");
    }
    // Its disk is lost; at the restart the bucket cannot be listed (objects
    // can be read).
    cluster.kill(owner).await;
    std::fs::remove_dir_all(&cluster.dirs[owner]).unwrap();
    s3.refuse_bucket(true);
    cluster.set_cut(owner, false);
    cluster.start_node(owner).await;
    cluster.wait_writes_open(owner).await;
    // What S3 holds was learned before writes went through: the next lines
    // are numbered after the whole chunk's, S3 or not.
    s3.freeze(true);
    let next = post(&cluster, "after").await;
    assert_ne!(next, name);
    s3.freeze(false);
    s3.refuse_bucket(false);
    let lists = uploaded_everywhere(&cluster, 3, &name, whole.len() as u64).await;
    // Numbered once: the next chunk after the whole one.
    crate::cluster::check_numbering("app", &lists[0]);
    assert_eq!(
        s3.get(&key).await.unwrap(),
        whole,
        "S3 kept the whole chunk"
    );
    for i in 0..3 {
        let mut lines = all_lines(&cluster.client(i), "app").await;
        lines.sort();
        let mut want = sent.clone();
        want.sort();
        assert_eq!(lines, want, "node {i}");
    }
}

/// A node lost its disk while S3 had not yet applied its upload of a chunk
/// whose end its peers never copied. Restarted, it restored the chunk short
/// from a peer's copy (S3 held nothing under the name yet) and numbered
/// new lines after it; then S3 applied the dead process's upload of the
/// whole chunk (here: written by the test while the node's own upload of
/// the restored chunk cannot complete). Before, the node took the longer
/// object as its chunk: the lines past the restored end and the new lines
/// had the same numbers (two lines at one Kafka offset), and so did a peer
/// that listed the bucket meanwhile. Now the chunk stays as restored
/// everywhere, the lines only the object held are stored again as new
/// lines, and the object is replaced by the chunk. A peer restarted then
/// keeps its copy; one that lost its disk too, and listed the bucket before
/// it could reach the owner, took the object and follows the replacement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_applied_late_after_a_lost_disk_gives_no_number_twice_and_loses_no_line() {
    let s3 = TestS3::start().await;
    // A chunk past one part goes in a multipart upload, whose completion
    // the test can hold back.
    let args = ["--rotate-after", "1h", "--s3-part-size", "5MiB"];
    let mut cluster = s3_cluster(&s3, 3, &args).await;
    let (owner, peer, wiped) = (1, 0, 2);
    let lines_of = |tag: &str, n: usize| -> Vec<String> {
        (0..n)
            .map(|i| format!("{tag}{i:05} {}", "z".repeat(1000)))
            .collect()
    };
    let mut sent = Vec::new();
    let mut name = String::new();
    for b in 0..64 {
        let batch = lines_of(&format!("copied{b:02}-"), 100);
        let p = cluster
            .client(owner)
            .produce("app", batch.join("\n") + "\n", &ProduceOptions::default())
            .await
            .unwrap();
        name = p.chunk.unwrap();
        sent.extend(batch);
    }
    let copied = cluster.client(owner).chunks("app").await.unwrap()[0].size;
    assert!(copied > 5 << 20, "{copied}");
    eventually(
        CONDITION_DEADLINE,
        "the peers to copy the chunk",
        || async {
            for i in [peer, wiped] {
                let list = cluster.client(i).chunks("app").await.ok()?;
                list.iter().find(|c| c.name == name && c.size == copied)?;
            }
            Some(())
        },
    )
    .await;
    // The disk is lost; the restart restores the chunk from the peer's copy
    // and completes it, and its upload cannot complete.
    cluster.kill(owner).await;
    std::fs::remove_dir_all(&cluster.dirs[owner]).unwrap();
    s3.refuse_completes(true);
    cluster.start_node(owner).await;
    cluster.wait_writes_open(owner).await;
    let key = format!("app/{name}");
    eventually(
        CONDITION_DEADLINE,
        "the restored chunk's upload to start",
        || async { (s3.parts(&key) >= 2).then_some(()) },
    )
    .await;
    let after = lines_of("after-", 10);
    let next = cluster
        .client(owner)
        .produce("app", after.join("\n") + "\n", &ProduceOptions::default())
        .await
        .unwrap();
    let next = next.chunk.unwrap();
    assert_ne!(next, name);
    sent.extend(after);
    eventually(
        CONDITION_DEADLINE,
        "the peer to copy the next chunk",
        || async {
            let list = cluster.client(peer).chunks("app").await.ok()?;
            list.iter()
                .any(|c| c.name == next && c.first_line.is_some())
                .then_some(())
        },
    )
    .await;
    // The dead process's upload lands: the chunk whole, with lines the peer
    // never copied, numbered on from the chunk's.
    let restored = cluster.client(owner).chunks("app").await.unwrap()[0].clone();
    assert_eq!(
        (restored.name.as_str(), restored.size),
        (name.as_str(), copied)
    );
    let mut whole = Vec::new();
    while (whole.len() as u64) < copied {
        let r = cluster
            .client(owner)
            .read_chunk("app", &name, whole.len() as u64, 16 << 20)
            .await
            .unwrap();
        whole.extend_from_slice(&r.data);
    }
    let only_in_s3 = lines_of("only-in-s3-", 20);
    for l in &only_in_s3 {
        whole.extend_from_slice(l.as_bytes());
        whole.push(b'\n');
    }
    sent.extend(only_in_s3);
    let whole_size = whole.len() as u64;
    let lines_whole = restored.lines.unwrap() + 20;
    s3.client()
        .put_object()
        .bucket(BUCKET)
        .key(&key)
        .metadata(
            "chunkbus-first-line",
            restored.first_line.unwrap().to_string(),
        )
        .metadata("chunkbus-lines", lines_whole.to_string())
        .body(whole.into())
        .send()
        .await
        .unwrap();
    // A peer restarted now finds the object in the bucket: it keeps its
    // copy, whose numbers its next chunk continues.
    cluster.kill(peer).await;
    cluster.start_node(peer).await;
    cluster.wait_writes_open(peer).await;
    // Another peer, which lost its disk too, lists the bucket before it can
    // reach the owner (so it knows nothing of the next chunk): it takes the
    // object, and follows the owner's replacement of it.
    cluster.kill(wiped).await;
    std::fs::remove_dir_all(&cluster.dirs[wiped]).unwrap();
    cluster.set_cut(wiped, true);
    cluster.start_node(wiped).await;
    eventually(
        CONDITION_DEADLINE,
        "the peer that lost its disk to take the object",
        || async {
            let list = cluster.client(wiped).chunks("app").await.ok()?;
            list.iter()
                .any(|c| c.name == name && c.uploaded && c.size == whole_size)
                .then_some(())
        },
    )
    .await;
    cluster.set_cut(wiped, false);
    cluster.wait_writes_open(wiped).await;
    s3.refuse_completes(false);
    let lists = uploaded_everywhere(&cluster, 3, &name, copied).await;
    // No node reports a copy at odds with its owner: the object was
    // replaced, not a copy's bytes.
    for i in 0..3 {
        let status = cluster.client(i).status().await.unwrap();
        for p in &status.peers {
            assert!(p.disagreeing_chunks.is_empty(), "node {i}: {p:?}");
        }
    }
    // Every number once, and S3 holds what every node holds.
    crate::cluster::check_numbering("app", &lists[0]);
    assert_eq!(
        s3.get(&key).await.map(|b| b.len() as u64),
        Some(copied),
        "the object is the chunk as restored"
    );
    // Every line once, the ones only S3 held included.
    sent.sort();
    for i in 0..3 {
        let got = eventually(CONDITION_DEADLINE, "every line on the node", || async {
            let mut lines = all_lines(&cluster.client(i), "app").await;
            lines.sort();
            (lines.len() >= sent.len()).then_some(lines)
        })
        .await;
        assert_eq!(got, sent, "node {i}");
    }
}
