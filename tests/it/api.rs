//! The produce and read API of one node.

use std::io::Write;
use std::time::Duration;

use chunkbus_client::{ChunkInfo, ErrorBody, ProduceResponse};
use reqwest::StatusCode;

use crate::harness::TestNode;

async fn json<T: serde::de::DeserializeOwned>(r: reqwest::Response) -> T {
    let status = r.status();
    let body = r.bytes().await.unwrap();
    serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "status {status}, body {:?}: {e}",
            String::from_utf8_lossy(&body)
        )
    })
}

async fn produce(node: &TestNode, cat: &str, body: &'static str) -> ProduceResponse {
    let r = node.post(cat, "", body).await;
    assert_eq!(r.status(), StatusCode::OK);
    json(r).await
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .unwrap_or_else(|| panic!("missing header {name}"))
        .to_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_list_and_read_back() {
    let node = TestNode::start().await;
    let a = produce(&node, "app", "one\ntwo\n").await;
    assert_eq!(a.chunk.as_deref(), Some("t1-chunk000000000"));
    assert_eq!((a.offset, a.next_offset, a.lines), (0, 8, 2));
    // The last line lacks its newline: it gets one.
    let b = produce(&node, "app", "three").await;
    assert_eq!((b.offset, b.next_offset, b.lines), (8, 14, 1));
    let cats: Vec<String> = json(node.get("/v1/categories").await).await;
    assert_eq!(cats, ["app"]);
    let chunks: Vec<ChunkInfo> = json(node.get("/v1/categories/app/chunks").await).await;
    assert_eq!(chunks.len(), 1);
    assert_eq!(
        (
            chunks[0].name.as_str(),
            chunks[0].owner.as_str(),
            chunks[0].index,
            chunks[0].size
        ),
        ("t1-chunk000000000", "t1", 0, 14)
    );
    assert!(!chunks[0].complete && chunks[0].local && !chunks[0].uploaded);

    let r = node
        .get("/v1/categories/app/chunks/t1-chunk000000000")
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "chunkbus-next-offset"), "14");
    assert_eq!(header(&r, "chunkbus-complete"), "false");
    assert_eq!(header(&r, "chunkbus-chunk-size"), "14");
    assert_eq!(r.text().await.unwrap(), "one\ntwo\nthree\n");

    // max_bytes cuts at a line boundary; offset continues from there.
    let r = node
        .get("/v1/categories/app/chunks/t1-chunk000000000?offset=4&max_bytes=6")
        .await;
    assert_eq!(header(&r, "chunkbus-next-offset"), "8");
    assert_eq!(r.text().await.unwrap(), "two\n");
    // The file holds exactly the posted bytes.
    assert_eq!(
        node.files("app"),
        [(
            "t1-chunk000000000".to_string(),
            b"one\ntwo\nthree\n".to_vec()
        )]
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_body_writes_nothing() {
    let node = TestNode::start().await;
    let r: ProduceResponse = json(node.post("app", "", "").await).await;
    assert_eq!((r.chunk, r.lines), (None, 0));
    assert!(node.files("app").is_empty());
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_rotate_by_size_and_list_filters() {
    let node = TestNode::start_with(|c| c.max_chunk_bytes = 10).await;
    for _ in 0..3 {
        produce(&node, "app", "12345678\n").await;
    }
    let chunks: Vec<ChunkInfo> = json(node.get("/v1/categories/app/chunks").await).await;
    let states: Vec<_> = chunks
        .iter()
        .map(|c| (c.index, c.size, c.complete))
        .collect();
    assert_eq!(states, [(0, 9, true), (1, 9, true), (2, 9, false)]);
    let after: Vec<ChunkInfo> = json(
        node.get("/v1/categories/app/chunks?owner=t1&after=t1-chunk000000000&limit=1")
            .await,
    )
    .await;
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].index, 1);
    let none: Vec<ChunkInfo> = json(node.get("/v1/categories/app/chunks?owner=other").await).await;
    assert!(none.is_empty());
    let r = node
        .get("/v1/categories/app/chunks/t1-chunk000000000")
        .await;
    assert_eq!(header(&r, "chunkbus-complete"), "true");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_arrays_are_stored_one_compact_line_per_element() {
    let node = TestNode::start().await;
    let r = node
        .http
        .post(node.url("/v1/categories/logs/lines"))
        .header("content-type", "application/json")
        .body("[{\"msg\": \"a b\", \"n\": 1},\n {\"msg\": \"c\"}]")
        .send()
        .await
        .unwrap();
    let p: ProduceResponse = json(r).await;
    assert_eq!(p.lines, 2);
    assert_eq!(
        node.files("logs")[0].1,
        b"{\"msg\":\"a b\",\"n\":1}\n{\"msg\":\"c\"}\n"
    );
    // NDJSON sent as application/json stays as it is.
    let r = node
        .http
        .post(node.url("/v1/categories/logs/lines"))
        .header("content-type", "application/json")
        .body("{\"x\": 1}\n{\"y\": 2}")
        .send()
        .await
        .unwrap();
    assert_eq!(json::<ProduceResponse>(r).await.lines, 2);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_bodies_are_decoded() {
    let node = TestNode::start().await;
    let plain = b"alpha\nbeta\ngamma\n".repeat(1000);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&plain).unwrap();
    let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    zlib.write_all(&plain).unwrap();
    let bodies = [
        ("gzip", gz.finish().unwrap()),
        ("deflate", zlib.finish().unwrap()),
        ("zstd", zstd::encode_all(&plain[..], 3).unwrap()),
    ];
    for (enc, body) in bodies {
        let r = node
            .http
            .post(node.url("/v1/categories/z/lines"))
            .header("content-encoding", enc)
            .body(body)
            .send()
            .await
            .unwrap();
        let p: ProduceResponse = json(r).await;
        assert_eq!(p.lines, 3000, "{enc}");
    }
    assert_eq!(node.files("z")[0].1, plain.repeat(3));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_returns_when_data_arrives() {
    let node = TestNode::start().await;
    let a = produce(&node, "app", "first\n").await;
    let url = node.url(&format!(
        "/v1/categories/app/chunks/{}?offset={}&wait=30s",
        a.chunk.unwrap(),
        a.next_offset
    ));
    let http = node.http.clone();
    let reader =
        tokio::spawn(async move { http.get(url).send().await.unwrap().text().await.unwrap() });
    // Wait until the reader is parked, so that the lines it gets can only
    // come from the wake-up (a timeout would return an empty body).
    crate::harness::wait_for_metric(&node, "chunkbus_read_waiters 1").await;
    produce(&node, "app", "second\n").await;
    let got = tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, "second\n");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_times_out_with_an_empty_body() {
    let node = TestNode::start().await;
    let a = produce(&node, "app", "x\n").await;
    let r = node
        .get(&format!(
            "/v1/categories/app/chunks/{}?offset=2&wait=100ms",
            a.chunk.unwrap()
        ))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "chunkbus-next-offset"), "2");
    assert_eq!(r.text().await.unwrap(), "");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_modes_and_restart_keep_every_line() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = crate::harness::config(tmp.path());
    let node = TestNode::start_config(cfg.clone()).await;
    for q in ["?sync=true", "?sync=false", ""] {
        assert_eq!(node.post("app", q, "line\n").await.status(), StatusCode::OK);
    }
    node.stop().await;
    let node = TestNode::start_config(cfg).await;
    // The chunk that was open is complete after the restart; writes go to a new one.
    let p = produce(&node, "app", "after\n").await;
    assert_eq!(p.chunk.as_deref(), Some("t1-chunk000000001"));
    let chunks: Vec<ChunkInfo> = json(node.get("/v1/categories/app/chunks").await).await;
    assert!(chunks[0].complete && !chunks[1].complete);
    assert_eq!(node.files("app")[0].1, b"line\nline\nline\n");
    node.stop().await;
}

/// A complete chunk is read from a mapping of its file (faulted in and
/// counted on a first read, then served from memory): every range comes
/// back as whole lines, the same each time, and lines_out counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_a_complete_chunk_are_whole_lines_every_time() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = crate::harness::config(tmp.path());
    let node = TestNode::start_config(cfg.clone()).await;
    let mut body = String::new();
    for i in 0..5_000 {
        body.push_str(&format!("{i:05} {}\n", "x".repeat(i % 113)));
    }
    assert_eq!(
        node.post("app", "", body.clone()).await.status(),
        StatusCode::OK
    );
    node.stop().await;
    // After the restart the chunk is complete.
    let node = TestNode::start_config(cfg).await;
    let chunk = "t1-chunk000000000";
    let (mut served_lines, mut served_bytes) = (0, 0);
    for round in 0..3 {
        let mut offset = 0;
        let mut got = String::new();
        // Ranges that start and end inside blocks and span several.
        for max_bytes in [1, 5_000, 4_096, 70_000, 300].iter().cycle() {
            let r = node
                .get(&format!(
                    "/v1/categories/app/chunks/{chunk}?offset={offset}&max_bytes={max_bytes}"
                ))
                .await;
            assert_eq!(r.status(), StatusCode::OK);
            assert_eq!(header(&r, "chunkbus-complete"), "true");
            let next: usize = header(&r, "chunkbus-next-offset").parse().unwrap();
            let text = r.text().await.unwrap();
            assert!(
                text.ends_with('\n'),
                "round {round}: not whole lines at {offset}"
            );
            assert_eq!(next, offset + text.len());
            served_lines += text.matches('\n').count();
            served_bytes += text.len();
            got.push_str(&text);
            offset = next;
            if offset == body.len() {
                break;
            }
        }
        assert_eq!(got, body, "round {round}");
    }
    // Not on a line boundary: refused, from memory as from the file.
    let r = node
        .get(&format!("/v1/categories/app/chunks/{chunk}?offset=3"))
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let text = node.get("/metrics").await.text().await.unwrap();
    for want in [
        format!("chunkbus_lines_out_total{{category=\"app\"}} {served_lines}"),
        format!("chunkbus_bytes_out_total{{category=\"app\"}} {served_bytes}"),
    ] {
        assert!(text.contains(&want), "missing {want:?} in\n{text}");
    }
    assert_eq!(served_lines, 3 * 5_000);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_bytes_and_fsyncs() {
    let node = TestNode::start().await;
    produce(&node, "app", "a\nb\n").await;
    node.get("/v1/categories/app/chunks/t1-chunk000000000")
        .await;
    let text = node.get("/metrics").await.text().await.unwrap();
    for want in [
        "chunkbus_bytes_in_total{category=\"app\"} 4",
        "chunkbus_lines_in_total{category=\"app\"} 2",
        "chunkbus_bytes_out_total{category=\"app\"} 4",
        "chunkbus_lines_out_total{category=\"app\"} 2",
        "chunkbus_fsync_seconds_count 1",
        "chunkbus_inflight_bytes 0",
        "route=\"/v1/categories/{category}/lines\",status=\"200\"} 1",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    node.stop().await;
}

/// The native produce route is served before the router (`http::App`)
/// unless its category needs percent-decoding; both ways store, refuse and
/// count requests alike, and the router still answers the paths and
/// methods the early way does not take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_is_the_same_before_the_router_and_through_it() {
    let node = TestNode::start().await;
    // `ap%70` is `app` decoded: the router's way.
    let early = produce(&node, "app", "one\n").await;
    let routed = produce(&node, "ap%70", "two\n").await;
    assert_eq!(early.chunk, routed.chunk);
    assert_eq!((early.offset, routed.offset), (0, 4));
    assert_eq!(node.files("app")[0].1, b"one\ntwo\n");
    let mut refused = 0;
    for (early, routed, query, body) in [
        ("app", "ap%70", "?sync=maybe", "x\n"),
        ("app", "ap%70", "?min_replicas=-1", "x\n"),
        ("app", "ap%70", "?sync=true&sync=false", "x\n"),
        ("app", "ap%70", "?min_replicas=1&timeout=10h", "x\n"),
        ("a:b", "a%3Ab", "", "x\n"),
    ] {
        let a = node.post(early, query, body).await;
        let b = node.post(routed, query, body).await;
        assert_eq!(a.status(), StatusCode::BAD_REQUEST, "{early}{query}");
        assert_eq!(b.status(), StatusCode::BAD_REQUEST, "{routed}{query}");
        let (a, b): (ErrorBody, ErrorBody) = (json(a).await, json(b).await);
        assert_eq!(a.error, b.error, "{query} {body:?}");
        refused += 2;
    }
    assert_eq!(node.files("app")[0].1, b"one\ntwo\n");
    for (method, path, status) in [
        (
            "PUT",
            "/v1/categories/app/lines",
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        ("POST", "/v1/categories//lines", StatusCode::BAD_REQUEST),
        ("POST", "/v1/categories/a/b/lines", StatusCode::NOT_FOUND),
        ("POST", "/v1/categories/app/lines/", StatusCode::NOT_FOUND),
        // The other routes that take data in are served first too; their
        // other methods are still the router's.
        ("GET", "/_bulk", StatusCode::METHOD_NOT_ALLOWED),
        ("GET", "/v1/logs", StatusCode::METHOD_NOT_ALLOWED),
        ("GET", "/write", StatusCode::METHOD_NOT_ALLOWED),
    ] {
        let r = node
            .http
            .request(method.parse().unwrap(), node.url(path))
            .body("x\n")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{method} {path}");
        refused += usize::from(status == StatusCode::BAD_REQUEST);
    }
    // One set of counters for the route, whichever way a request took.
    let text = node.get("/metrics").await.text().await.unwrap();
    for want in [
        "route=\"/v1/categories/{category}/lines\",status=\"200\"} 2\n".to_owned(),
        format!("route=\"/v1/categories/{{category}}/lines\",status=\"400\"}} {refused}\n"),
    ] {
        assert!(text.contains(&want), "missing {want:?} in\n{text}");
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_errors_have_their_status() {
    let node = TestNode::start().await;
    produce(&node, "app", "aa\nbb\n").await;
    for (path, status, words) in [
        (
            "/v1/categories/app/chunks/t1-chunk000000009",
            StatusCode::NOT_FOUND,
            "does not exist",
        ),
        (
            "/v1/categories/nope/chunks/t1-chunk000000000",
            StatusCode::NOT_FOUND,
            "does not exist",
        ),
        (
            "/v1/categories/app/chunks/t1-chunk000000000?offset=1",
            StatusCode::BAD_REQUEST,
            "not at the start of a line",
        ),
        (
            "/v1/categories/app/chunks/t1-chunk000000000?offset=7",
            StatusCode::RANGE_NOT_SATISFIABLE,
            "past the end",
        ),
    ] {
        let r = node.get(path).await;
        assert_eq!(r.status(), status, "{path}");
        let e: ErrorBody = json(r).await;
        assert!(e.error.contains(words), "{path}: {}", e.error);
    }
    node.stop().await;
}
