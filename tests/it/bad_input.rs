//! Bad input gets a clear JSON error with the right status, and nothing is
//! written: names, parameters, sizes, encodings, load and disk pressure.

use std::time::Duration;

use chunkbus_client::ErrorBody;
use reqwest::StatusCode;

use crate::harness::{TestNode, raw_request, tree, wait_for_metric};

fn error_of(body: &str) -> String {
    serde_json::from_str::<ErrorBody>(body)
        .unwrap_or_else(|e| panic!("not a JSON error body {body:?}: {e}"))
        .error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_names_never_reach_the_file_system() {
    let node = TestNode::start().await;
    let long = "a".repeat(129);
    let bad_categories = [
        "..", "%2e%2e", "%2E%2E", ".", "%2e", "a%2Fb", "%2Fetc", "a%00b", "a%5Cb", ".hidden", "-x",
        "a%20b", "%C3%A9", "%FF", &long,
    ];
    for cat in bad_categories {
        for (method, target) in [
            ("POST", format!("/v1/categories/{cat}/lines")),
            ("GET", format!("/v1/categories/{cat}/chunks")),
            (
                "GET",
                format!("/v1/categories/{cat}/chunks/t1-chunk000000000"),
            ),
            ("POST", format!("/write?category={cat}")),
            ("GET", format!("/listChunks?category={cat}")),
            (
                "GET",
                format!("/read?category={cat}&chunk=t1-chunk000000000&off=0&max_size=10"),
            ),
        ] {
            let (status, body) = raw_request(node.addr, method, &target, b"x\n").await;
            assert_eq!(status, 400, "{method} {target}: {body}");
            assert!(!error_of(&body).is_empty());
        }
    }
    let bad_chunks = [
        "..",
        "%2e%2e",
        "t1-chunk1",
        "t1-chunk0000000001",
        "t1-chunkabcdefghi",
        "..%2Ft1-chunk000000000",
        "t1.x-chunk000000000",
        "-chunk000000000",
    ];
    for chunk in bad_chunks {
        let (status, body) = raw_request(
            node.addr,
            "GET",
            &format!("/v1/categories/app/chunks/{chunk}"),
            b"",
        )
        .await;
        assert_eq!(status, 400, "{chunk}: {body}");
        assert!(error_of(&body).contains("chunk"), "{body}");
    }
    // Literal dot segments are not normalised into another route.
    let (status, _) = raw_request(node.addr, "POST", "/v1/categories/../lines", b"x\n").await;
    assert_eq!(status, 400);
    assert_eq!(tree(&node.dir), [".lock"]);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_parameters_are_400() {
    let node = TestNode::start().await;
    assert_eq!(node.post("app", "", "x\n").await.status(), StatusCode::OK);
    for (method, target, words) in [
        ("POST", "/v1/categories/app/lines?sync=maybe", "sync"),
        (
            "POST",
            "/v1/categories/app/lines?min_replicas=x",
            "min_replicas",
        ),
        ("POST", "/v1/categories/app/lines?min_replicas=1", "peers"),
        ("POST", "/v1/categories/app/lines?timeout=soon", "timeout"),
        ("POST", "/write?category=app&min_sync_replicas=1", "peers"),
        ("POST", "/write", "category"),
        (
            "GET",
            "/v1/categories/app/chunks/t1-chunk000000000?offset=-1",
            "offset",
        ),
        (
            "GET",
            "/v1/categories/app/chunks/t1-chunk000000000?max_bytes=0",
            "max_bytes",
        ),
        (
            "GET",
            "/v1/categories/app/chunks/t1-chunk000000000?max_bytes=16777217",
            "16 MiB",
        ),
        (
            "GET",
            "/v1/categories/app/chunks/t1-chunk000000000?wait=forever",
            "wait",
        ),
        (
            "GET",
            "/v1/categories/app/chunks/t1-chunk000000000?wait=1h",
            "limit",
        ),
        ("GET", "/v1/categories/app/chunks?owner=a.b", "node"),
        ("GET", "/v1/categories/app/chunks?after=x", "chunk"),
        ("GET", "/v1/categories/app/chunks?limit=many", "limit"),
        (
            "GET",
            "/read?category=app&chunk=t1-chunk000000000&max_size=20000000",
            "max_size",
        ),
        ("GET", "/read?category=app", "chunk"),
    ] {
        let (status, body) = raw_request(node.addr, method, target, b"y\n").await;
        assert_eq!(status, 400, "{method} {target}: {body}");
        let e = error_of(&body);
        assert!(e.contains(words), "{target}: {e}");
    }
    // None of the refused writes landed.
    assert_eq!(node.files("app")[0].1, b"x\n");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_lines_and_bodies_are_413_and_write_nothing() {
    let node = TestNode::start_with(|c| {
        c.max_line_bytes = 100;
        c.max_body_bytes = 1000;
    })
    .await;
    let long_line = format!("ok\n{}\nok\n", "x".repeat(101));
    let r = node.post("app", "", long_line).await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let e = r.json::<ErrorBody>().await.unwrap().error;
    assert!(
        e.contains("line 2") && e.contains("101 bytes") && e.contains("100B"),
        "{e}"
    );

    let r = node.post("app", "", "y\n".repeat(501)).await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let e = r.json::<ErrorBody>().await.unwrap().error;
    assert!(e.contains("--max-body-bytes") && e.contains("1000B"), "{e}");

    // Without Content-Length (chunked transfer), the limit holds while reading.
    let stream =
        futures_util::stream::iter((0..20).map(|_| Ok::<_, std::io::Error>("z\n".repeat(50))));
    let r = node
        .http
        .post(node.url("/v1/categories/app/lines"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // A body refused before it was read closes its connection, and the
    // answer says so: the client's next request goes on a new connection
    // (it failed on the closed one before).
    assert_eq!(r.headers()["connection"], "close");
    let http = node.http.clone();
    // A small gzip body that decodes past the limit.
    let gz = {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(&b"q\n".repeat(10_000)).unwrap();
        e.finish().unwrap()
    };
    let r = http
        .post(node.url("/v1/categories/app/lines"))
        .header("content-encoding", "gzip")
        .body(gz)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(node.files("app").is_empty());
    node.stop().await;
}

/// A chunked body sent a few bytes per chunk (each chunk its own frame at
/// the node) is stored whole and in order, lines split across chunks
/// included; its frames are gathered, not kept one by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_in_tiny_chunks_is_stored_whole() {
    let node = TestNode::start().await;
    let body: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
    let pieces: Vec<String> = body
        .as_bytes()
        .chunks(3)
        .map(|c| String::from_utf8(c.to_vec()).unwrap())
        .collect();
    let stream = futures_util::stream::iter(pieces.into_iter().map(Ok::<_, std::io::Error>));
    let r = reqwest::Client::new()
        .post(node.url("/v1/categories/app/lines"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let files = node.files("app");
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].1, body.as_bytes());
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_encodings_are_415_and_bad_json_is_400() {
    let node = TestNode::start().await;
    for (enc, body) in [
        ("br", &b"x\n"[..]),
        ("gzip", b"not gzip"),
        ("zstd", b"not zstd"),
        ("deflate", b"nope"),
    ] {
        let r = node
            .http
            .post(node.url("/v1/categories/app/lines"))
            .header("content-encoding", enc)
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "{enc}");
        let e = r.json::<ErrorBody>().await.unwrap().error;
        assert!(
            e.contains(if enc == "br" {
                "Content-Encoding"
            } else {
                "not valid"
            }),
            "{e}"
        );
    }
    let r = node
        .http
        .post(node.url("/v1/categories/app/lines"))
        .header("content-type", "application/json")
        .body("[{\"a\": 1}, {broken")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(
        r.json::<ErrorBody>()
            .await
            .unwrap()
            .error
            .contains("JSON array")
    );
    assert!(node.files("app").is_empty());
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inflight_limit_sheds_with_503_and_retry_after() {
    let node = TestNode::start_with(|c| {
        c.max_body_bytes = 1 << 20;
        c.max_inflight_bytes = 1 << 20;
    })
    .await;
    // A slow request holds what it has sent so far (not what it announced,
    // so that slow senders cannot hold the budget with promises).
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    let slow = {
        let req = node
            .http
            .post(node.url("/v1/categories/app/lines"))
            .header("content-length", "600000")
            .body(reqwest::Body::wrap_stream(stream));
        tokio::spawn(async move { req.send().await.unwrap() })
    };
    tx.send(Ok(b"a\n".repeat(299_000))).await.unwrap();
    wait_for_metric(&node, "chunkbus_inflight_bytes 598001").await;
    let r = node.post("app", "", "b\n".repeat(250_000)).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers()["retry-after"], "1");
    let e = r.json::<ErrorBody>().await.unwrap().error;
    assert!(e.contains("--max-inflight-bytes"), "{e}");
    // The slow request completes; the budget is released.
    tx.send(Ok(b"a\n".repeat(1000))).await.unwrap();
    drop(tx);
    let done = tokio::time::timeout(Duration::from_secs(20), slow)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.status(), StatusCode::OK);
    wait_for_metric(&node, "chunkbus_inflight_bytes 0").await;
    assert_eq!(node.post("app", "", "c\n").await.status(), StatusCode::OK);
    assert_eq!(node.files("app")[0].1.len(), 600_002);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_above_high_water_sheds_with_503() {
    let tmp = tempfile::tempdir().unwrap();
    let st = rustix::fs::statvfs(tmp.path()).unwrap();
    let used = st.f_blocks - st.f_bfree;
    assert!(
        used * 100 > st.f_blocks,
        "this test needs a file system more than 1% used"
    );
    let mut cfg = crate::harness::config(tmp.path());
    cfg.disk_high_water_percent = 1;
    let node = TestNode::start_config(cfg).await;
    let r = node.post("app", "", "x\n").await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers()["retry-after"], "1");
    let e = r.json::<ErrorBody>().await.unwrap().error;
    assert!(e.contains("--disk-high-water"), "{e}");
    assert!(node.files("app").is_empty());
    node.stop().await;
}

/// Peak resident memory of a process, from `/proc`.
fn peak_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// A small gzip body that decodes to a JSON array of tiny elements at the
/// body limit once cost about 16 bytes more per element than its size (a
/// list of them was built before the lines): 16 MiB of `[0,0,...]` took
/// over 300 MiB. Now it costs a few times the decoded size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_array_of_tiny_elements_costs_a_few_times_its_size() {
    use std::io::Write as _;
    const DECODED: usize = (16 << 20) - 4096;
    let dir = tempfile::tempdir().unwrap();
    let node = crate::harness::BinNode::start(
        dir.path(),
        &["--max-body-bytes", "16MiB", "--sync", "never"],
    )
    .await;
    let before = peak_rss_bytes(node.child.id().unwrap());
    let mut array = Vec::with_capacity(DECODED);
    array.push(b'[');
    while array.len() < DECODED - 2 {
        array.extend_from_slice(b"0,");
    }
    array.extend_from_slice(b"0]");
    let elements = array.len() / 2;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&array).unwrap();
    let body = gz.finish().unwrap();
    let r = reqwest::Client::new()
        .post(node.url("/v1/categories/big/lines"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let answer: chunkbus_client::ProduceResponse = r.json().await.unwrap();
    assert_eq!(answer.lines as usize, elements);
    let grown = peak_rss_bytes(node.child.id().unwrap()).saturating_sub(before);
    assert!(
        grown < 8 * DECODED as u64,
        "peak RSS grew by {} MiB for a {} MiB body",
        grown >> 20,
        DECODED >> 20
    );
}

/// Categories cost a thread and a file each: a write may create them only
/// up to `--max-categories`, past which it gets a clear 507 and nothing is
/// created (a token limited to `app*` once created 5,000 of them).
#[tokio::test]
async fn writes_create_categories_up_to_the_limit_only() {
    let node = TestNode::start_with(|c| c.max_categories = 3).await;
    for cat in ["app0", "app1", "app2"] {
        assert_eq!(node.post(cat, "", "x\n").await.status(), StatusCode::OK);
    }
    let r = node.post("app3", "", "x\n").await;
    assert_eq!(r.status(), StatusCode::INSUFFICIENT_STORAGE);
    let body: ErrorBody = r.json().await.unwrap();
    assert!(body.error.contains("--max-categories"), "{}", body.error);
    assert!(!node.dir.join("app3").exists());
    // Existing categories still take writes.
    assert_eq!(node.post("app1", "", "y\n").await.status(), StatusCode::OK);
    node.stop().await;
}

/// A category costs a task, not an OS thread: 200 categories created by
/// synced writes leave the node's thread count where it was (each took a
/// group-commit thread of its own before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn categories_do_not_cost_threads() {
    let dir = tempfile::tempdir().unwrap();
    let node = crate::harness::BinNode::start(dir.path(), &["--sync", "always"]).await;
    let threads = || {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", node.child.id().unwrap())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .unwrap()
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    let client = reqwest::Client::new();
    let write = |cat: String| {
        client
            .post(node.url(&format!("/v1/categories/{cat}/lines")))
            .body("x\n")
            .send()
    };
    // The first synced write starts whatever the node starts once.
    assert_eq!(write("warm".into()).await.unwrap().status(), StatusCode::OK);
    let before = threads();
    for i in 0..200 {
        assert_eq!(
            write(format!("cat{i}")).await.unwrap().status(),
            StatusCode::OK
        );
    }
    let after = threads();
    // Blocking-pool threads come and go with load; a thread per category
    // would add 200.
    assert!(
        after < before + 20,
        "{before} threads before, {after} after"
    );
}

/// The node raises its soft limit of open files to the hard one at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_files_limit_is_raised_to_the_hard_limit() {
    let dir = tempfile::tempdir().unwrap();
    // Started with a soft limit below the hard one.
    let cmd = crate::harness::wrapped_serve_command(
        &["sh", "-c", "ulimit -Sn 256 && exec \"$0\" \"$@\""],
        "t1",
        dir.path(),
    );
    let node = crate::harness::BinNode::spawn(cmd).await;
    let limits =
        std::fs::read_to_string(format!("/proc/{}/limits", node.child.id().unwrap())).unwrap();
    let files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .collect();
    // "Max open files <soft> <hard> files"
    assert_ne!(files[3], "256", "{limits}");
    assert_eq!(files[3], files[4], "{limits}");
}

/// With few descriptors, writes that create categories run out of them:
/// they get 503 (retryable), never 500, and reads of existing chunks keep
/// working; once the open chunks are idle their files close and writes to
/// new categories go through again. Start-up warns that the limit is below
/// what the two caps may take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_is_a_retryable_503() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd =
        crate::harness::wrapped_serve_command(&["prlimit", "--nofile=64:64"], "t1", dir.path());
    cmd.args(["--max-connections", "8"]);
    let node = crate::harness::BinNode::spawn(cmd).await;
    assert!(
        node.stderr
            .lock()
            .unwrap()
            .contains("the open files limit is below what --max-connections (8)"),
        "no start-up warning"
    );
    let client = reqwest::Client::new();
    let post = |cat: String| {
        client
            .post(node.url(&format!("/v1/categories/{cat}/lines")))
            .body("x\n")
            .send()
    };
    let first: chunkbus_client::ProduceResponse =
        post("c0".into()).await.unwrap().json().await.unwrap();
    let first = first.chunk.expect("c0 was written");
    let mut refused = None;
    for i in 1..100 {
        let r = post(format!("c{i}")).await.unwrap();
        match r.status() {
            StatusCode::OK => {}
            StatusCode::SERVICE_UNAVAILABLE => {
                assert!(r.headers().contains_key("retry-after"));
                let body: ErrorBody = r.json().await.unwrap();
                assert!(body.error.contains("too many open files"), "{}", body.error);
                refused = Some(i);
                break;
            }
            other => panic!("c{i}: {other} {}", r.text().await.unwrap()),
        }
    }
    let refused = refused.expect("64 descriptors held 100 open chunks");
    // Reads of a chunk already written are served meanwhile, or refused
    // the same way; never a 500.
    let read = client
        .get(node.url(&format!("/v1/categories/c0/chunks/{first}")))
        .send()
        .await
        .unwrap();
    assert!(
        [StatusCode::OK, StatusCode::SERVICE_UNAVAILABLE].contains(&read.status()),
        "{}",
        read.status()
    );
    // Idle open chunks close their files; then the refused write goes
    // through and the read is served.
    let pid = node.child.id().unwrap();
    let open_chunks = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy().contains("-chunk"))
            .count()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while open_chunks() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "idle chunk files stay open"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = post(format!("c{refused}")).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let read = client
        .get(node.url(&format!("/v1/categories/c0/chunks/{first}")))
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), StatusCode::OK);
    assert_eq!(read.text().await.unwrap(), "x\n");
}

/// A JSON body (acks, positions, the internal routes) that is announced and
/// then withheld gets 408 after `--request-timeout`, as produce bodies do;
/// before, the request stayed open for good.
#[tokio::test]
async fn a_withheld_json_body_gets_408_after_the_request_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let node = TestNode::start_with(|c| c.request_timeout = Duration::from_millis(500)).await;
    let mut s = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    s.write_all(
        b"POST /v1/categories/app/consumers/c1/acks HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"chunk\":",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(crate::harness::CONDITION_DEADLINE, s.read(&mut buf))
        .await
        .expect("the withheld body held the request open")
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("--request-timeout"), "{answer}");
    node.stop().await;
}
