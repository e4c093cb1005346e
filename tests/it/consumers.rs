//! Consumers with explicit acks: `next`, `acks`, positions, Chukcha's `/ack`.

use std::collections::BTreeSet;
use std::time::Duration;

use chunkbus_client::{ChukchaChunk, ConsumerDetail, ConsumerSummary, ProduceOptions};
use reqwest::StatusCode;

use crate::cluster::TestCluster;
use crate::harness::TestNode;

/// One `next` answer: (chunk, offset, next_offset, lines), or None for 204.
async fn next(
    http: &reqwest::Client,
    base: &str,
    cat: &str,
    consumer: &str,
    query: &str,
) -> Option<(String, u64, u64, String)> {
    let r = http
        .get(format!(
            "{base}/v1/categories/{cat}/consumers/{consumer}/next{query}"
        ))
        .send()
        .await
        .unwrap();
    if r.status() == StatusCode::NO_CONTENT {
        return None;
    }
    assert_eq!(r.status(), StatusCode::OK);
    let h = |n: &str| r.headers()[n].to_str().unwrap().to_owned();
    let (chunk, offset, next) = (
        h("chunkbus-chunk"),
        h("chunkbus-offset"),
        h("chunkbus-next-offset"),
    );
    Some((
        chunk,
        offset.parse().unwrap(),
        next.parse().unwrap(),
        r.text().await.unwrap(),
    ))
}

async fn ack(
    http: &reqwest::Client,
    base: &str,
    cat: &str,
    consumer: &str,
    chunk: &str,
    offset: u64,
) -> reqwest::Response {
    http.post(format!(
        "{base}/v1/categories/{cat}/consumers/{consumer}/acks"
    ))
    .json(&serde_json::json!({"chunk": chunk, "offset": offset}))
    .send()
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_returns_the_same_lines_until_acked() {
    let node = TestNode::start_with(|c| c.max_chunk_bytes = 12).await;
    let (http, base) = (node.http.clone(), node.url(""));
    // A consumer that never acked has no position yet.
    assert_eq!(
        node.get("/v1/categories/app/consumers/c1").await.status(),
        StatusCode::NOT_FOUND
    );
    assert!(
        next(&http, &base, "app", "c1", "?wait=50ms")
            .await
            .is_none()
    );
    for body in ["a1\na2\n", "b1\nb2\n", "c1\n"] {
        assert_eq!(node.post("app", "", body).await.status(), StatusCode::OK);
    }
    // Chunks: t1-chunk0 "a1\na2\nb1\nb2\n" (12 bytes, complete), t1-chunk1 "c1\n".
    // c2 exists from now on (an ack at 0), so chunks stay until it read them.
    ack(&http, &base, "app", "c2", "t1-chunk000000000", 0).await;
    let (chunk, offset, end, lines) = next(&http, &base, "app", "c1", "?max_bytes=6")
        .await
        .unwrap();
    assert_eq!(
        (chunk.as_str(), offset, end, lines.as_str()),
        ("t1-chunk000000000", 0, 6, "a1\na2\n")
    );
    // Not acked: the same lines again (at least once).
    assert_eq!(
        next(&http, &base, "app", "c1", "?max_bytes=6")
            .await
            .unwrap()
            .3,
        "a1\na2\n"
    );
    let d: ConsumerDetail = ack(&http, &base, "app", "c1", &chunk, end)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(d.positions["t1"].offset, 6);
    assert_eq!(d.lag_bytes, 6 + 3);
    let (chunk, _, end, lines) = next(&http, &base, "app", "c1", "").await.unwrap();
    assert_eq!(lines, "b1\nb2\n");
    // Acking the end of a complete chunk passes it (the position stays at
    // its end).
    let d: ConsumerDetail = ack(&http, &base, "app", "c1", &chunk, end)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(d.positions["t1"].chunk, chunk);
    assert_eq!(d.positions["t1"].offset, end);
    // An ack behind the position changes nothing.
    let d: ConsumerDetail = ack(&http, &base, "app", "c1", "t1-chunk000000000", 3)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(d.positions["t1"].chunk, chunk);
    assert_eq!(d.positions["t1"].offset, end);
    // Bad acks are 400 and change nothing.
    for (chunk, offset) in [
        ("t1-chunk000000001", 1),
        ("t1-chunk000000001", 99),
        ("t1-chunk000000042", 0),
    ] {
        let r = ack(&http, &base, "app", "c1", chunk, offset).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{chunk}:{offset}");
    }
    let r = http
        .post(format!("{base}/v1/categories/app/consumers/c1/acks"))
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let (chunk, _, end, lines) = next(&http, &base, "app", "c1", "").await.unwrap();
    assert_eq!(lines, "c1\n");
    ack(&http, &base, "app", "c1", &chunk, end).await;
    assert!(
        next(&http, &base, "app", "c1", "?wait=50ms")
            .await
            .is_none()
    );

    // A second consumer gets everything too; the list shows both with their lag.
    assert_eq!(
        next(&http, &base, "app", "c2", "").await.unwrap().3,
        "a1\na2\nb1\nb2\n"
    );
    ack(&http, &base, "app", "c2", "t1-chunk000000000", 6).await;
    let list: Vec<ConsumerSummary> = node
        .get("/v1/categories/app/consumers")
        .await
        .json()
        .await
        .unwrap();
    let lags: Vec<_> = list
        .iter()
        .map(|c| (c.name.as_str(), c.lag_bytes))
        .collect();
    assert_eq!(lags, [("c1", 0), ("c2", 9)]);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_rewind_skip_delete_and_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = crate::harness::config(tmp.path());
    let node = TestNode::start_config(cfg.clone()).await;
    let (http, base) = (node.http.clone(), node.url(""));
    // start=latest on the first call: nothing old is delivered.
    node.post("app", "", "old\n").await;
    // A second consumer keeps the data from being deleted once `live` read it.
    ack(&http, &base, "app", "keeper", "t1-chunk000000000", 0).await;
    assert!(
        next(&http, &base, "app", "live", "?start=latest&wait=50ms")
            .await
            .is_none()
    );
    // A parked next is woken by an append.
    let parked = {
        let (http, base) = (http.clone(), base.clone());
        tokio::spawn(async move { next(&http, &base, "app", "live", "?wait=30s").await })
    };
    crate::harness::wait_for_metric(&node, "chunkbus_read_waiters 1").await;
    node.post("app", "", "new\n").await;
    let got = tokio::time::timeout(Duration::from_secs(20), parked)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got.3, "new\n");
    ack(&http, &base, "app", "live", &got.0, got.2).await;

    // Rewind to the earliest data: everything comes again.
    let put = |to: &'static str| {
        http.put(format!("{base}/v1/categories/app/consumers/live/position"))
            .json(&serde_json::json!({ "to": to }))
            .send()
    };
    let d: ConsumerDetail = put("earliest").await.unwrap().json().await.unwrap();
    assert_eq!(d.generation, 1);
    assert_eq!(
        next(&http, &base, "app", "live", "").await.unwrap().3,
        "old\nnew\n"
    );
    assert_eq!(
        put("sideways").await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    let d: ConsumerDetail = put("latest").await.unwrap().json().await.unwrap();
    assert_eq!((d.generation, d.lag_bytes), (2, 0));
    assert!(
        next(&http, &base, "app", "live", "?wait=50ms")
            .await
            .is_none()
    );

    // Positions survive a restart.
    node.stop().await;
    let node = TestNode::start_config(cfg).await;
    let d: ConsumerDetail = node
        .get("/v1/categories/app/consumers/live")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!((d.generation, d.positions["t1"].offset), (2, 8));
    // Delete forgets the consumer; the name starts again from the earliest data.
    let r = node
        .http
        .delete(node.url("/v1/categories/app/consumers/live"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        node.get("/v1/categories/app/consumers/live").await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        next(&node.http, &node.url(""), "app", "live", "")
            .await
            .unwrap()
            .3,
        "old\nnew\n"
    );
    // Bad names are 400.
    let (status, _) = crate::harness::raw_request(
        node.addr,
        "GET",
        "/v1/categories/app/consumers/%2e%2e/next",
        b"",
    )
    .await;
    assert_eq!(status, 400);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chukcha_ack_hides_fully_acknowledged_chunks() {
    let node = TestNode::start_with(|c| c.max_chunk_bytes = 6).await;
    for body in ["one\n", "two\n"] {
        node.http
            .post(node.url("/write?category=ev"))
            .body(body)
            .send()
            .await
            .unwrap();
    }
    let list: Vec<ChukchaChunk> = node
        .get("/listChunks?category=ev")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list.len(), 2);
    // Only a complete chunk read to its end can be acknowledged.
    let r = node
        .get("/ack?category=ev&chunk=t1-chunk000000001&size=4")
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = node
        .get("/ack?category=ev&chunk=t1-chunk000000000&size=3")
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = node
        .get("/ack?category=ev&chunk=t1-chunk000000000&size=4")
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let list: Vec<ChukchaChunk> = node
        .get("/listChunks?category=ev")
        .await
        .json()
        .await
        .unwrap();
    let names: Vec<_> = list.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["t1-chunk000000001"]);
    // It is the consumer `default`.
    let d: ConsumerDetail = node
        .get("/v1/categories/ev/consumers/default")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(d.positions["t1"].chunk, "t1-chunk000000000");
    assert_eq!(d.positions["t1"].offset, 4);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_switches_nodes_gets_every_line_exactly_once() {
    let cluster = TestCluster::start(3, &["--max-chunk-bytes", "2KiB"]).await;
    let mut written = BTreeSet::new();
    for i in 0..300 {
        let line = format!("line-{i:04}");
        cluster
            .client(i % 3)
            .produce("jobs", format!("{line}\n"), &ProduceOptions::default())
            .await
            .unwrap();
        written.insert(line);
    }
    cluster.wait_converged(&["jobs"]).await;
    let http = reqwest::Client::new();
    let mut got = Vec::new();
    let mut turn = 0;
    loop {
        // Each batch on another node; wait until the previous ack is there.
        let base = cluster.url(turn % 3);
        let Some((chunk, _, end, lines)) =
            next(&http, &base, "jobs", "worker", "?max_bytes=512&wait=200ms").await
        else {
            break;
        };
        got.extend(lines.lines().map(str::to_owned));
        let r = ack(&http, &base, "jobs", "worker", &chunk, end).await;
        assert_eq!(r.status(), StatusCode::OK);
        turn += 1;
        let next_base = cluster.url(turn % 3);
        let want: ConsumerDetail = r.json().await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let r = http
                .get(format!("{next_base}/v1/categories/jobs/consumers/worker"))
                .send()
                .await
                .unwrap();
            if r.status() == StatusCode::OK
                && r.json::<ConsumerDetail>().await.unwrap().positions == want.positions
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the position did not reach node {}",
                turn % 3
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let unique: BTreeSet<_> = got.iter().cloned().collect();
    assert_eq!(got.len(), unique.len(), "some lines were delivered twice");
    assert_eq!(unique, written);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_every_consumer_acked_are_deleted_and_names_never_reused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = crate::harness::config(tmp.path());
    cfg.max_chunk_bytes = 4;
    let node = TestNode::start_config(cfg.clone()).await;
    let (http, base) = (node.http.clone(), node.url(""));
    for body in ["aaa\n", "bbb\n", "ccc\n"] {
        node.post("app", "", body).await;
    }
    // Without consumers nothing is deleted.
    node.post("other", "", "x\n").await;
    // Two consumers; only when both passed a complete chunk does it go.
    ack(&http, &base, "app", "one", "t1-chunk000000000", 0).await;
    ack(&http, &base, "app", "two", "t1-chunk000000000", 0).await;
    ack(&http, &base, "app", "one", "t1-chunk000000001", 4).await;
    ack(&http, &base, "app", "two", "t1-chunk000000000", 4).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let names: Vec<String> = node.files("app").into_iter().map(|(n, _)| n).collect();
        // The file goes first, then the entry.
        let list: Vec<chunkbus_client::ChunkInfo> = node
            .get("/v1/categories/app/chunks")
            .await
            .json()
            .await
            .unwrap();
        if names == ["t1-chunk000000001", "t1-chunk000000002"] && list.len() == 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "chunk 0 was not deleted: {names:?}, listed {}",
            list.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The open chunk is never deleted, even when read to its end.
    ack(&http, &base, "app", "one", "t1-chunk000000002", 4).await;
    ack(&http, &base, "app", "two", "t1-chunk000000002", 4).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while node.files("app").len() != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "chunk 1 was not deleted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(node.files("app")[0].0, "t1-chunk000000002");
    assert_eq!(node.files("other").len(), 1);
    // After a restart the open chunk completes and goes too; the next chunk
    // still gets a new index.
    node.stop().await;
    let node = TestNode::start_config(cfg).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !node.files("app").is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "chunk 2 was not deleted after the restart"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.stop().await;
    let node = TestNode::start_config(crate::harness::config(tmp.path())).await;
    let p: chunkbus_client::ProduceResponse =
        node.post("app", "", "ddd\n").await.json().await.unwrap();
    assert_eq!(p.chunk.as_deref(), Some("t1-chunk000000003"));
    node.stop().await;
}
