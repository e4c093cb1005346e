//! The real binary: lock file, signals, environment configuration, a full disk.

use std::time::Duration;

use chunkbus_client::{ErrorBody, ProduceResponse};
use reqwest::StatusCode;
use rustix::process::Signal;
use tokio::process::Command;

use crate::harness::{BinNode, chunk_files, wait_for_metric_at};

const EXIT_DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_dir_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let first = BinNode::start(tmp.path(), &[]).await;
    let out = tokio::time::timeout(
        EXIT_DEADLINE,
        Command::new(env!("CARGO_BIN_EXE_chunkbus"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(tmp.path())
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is in use by another chunkbus process"),
        "{err}"
    );
    assert!(
        err.contains(&first.child.id().unwrap().to_string()),
        "{err}"
    );
    first.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_requests_and_exits_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let mut node = BinNode::start(tmp.path(), &["--sync", "never"]).await;
    let http = reqwest::Client::new();
    let r = http
        .post(node.url("/v1/categories/app/lines"))
        .body("a\nb\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // A parked long poll must not hold the shutdown up.
    let poll = http
        .get(node.url("/v1/categories/app/chunks/t1-chunk000000000?offset=4&wait=5m"))
        .send();
    let poll = tokio::spawn(poll);
    wait_for_metric_at(&http, &node.url(""), "chunkbus_read_waiters 1").await;
    node.signal(Signal::TERM);
    let status = tokio::time::timeout(EXIT_DEADLINE, node.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    let answered = poll.await.unwrap().unwrap();
    assert_eq!(answered.status(), StatusCode::OK);
    assert_eq!(chunk_files(&tmp.path().join("app"))[0].1, b"a\nb\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_and_config_file_configure_the_node() {
    let tmp = tempfile::tempdir().unwrap();
    let conf = tmp.path().join("chunkbus.toml");
    std::fs::write(&conf, "max-chunk-bytes = \"4B\"\nnode = \"from-file\"\n").unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chunkbus"));
    cmd.args(["serve", "--listen", "127.0.0.1:0"])
        .env("CHUNKBUS_DATA_DIR", tmp.path().join("data"))
        .env("CHUNKBUS_NODE", "from-env")
        .env("CHUNKBUS_CONFIG", &conf);
    let node = BinNode::spawn(cmd).await;
    let http = reqwest::Client::new();
    for _ in 0..2 {
        let p: ProduceResponse = http
            .post(node.url("/v1/categories/app/lines"))
            .body("abc\n")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(p.chunk.unwrap().starts_with("from-env-chunk"));
    }
    // 4-byte chunks from the file: two writes, two chunks.
    assert_eq!(chunk_files(&tmp.path().join("data/app")).len(), 2);
    node.kill().await;

    std::fs::write(&conf, "max-chunk-byte = 4\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_chunkbus"))
        .args(["serve", "--config"])
        .arg(&conf)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max-chunk-byte"));
}

/// A node on a 1 MiB tmpfs (in a private mount namespace) fills it: writes
/// get 507, nothing acknowledged is lost, no chunk holds a partial request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_507_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount -t tmpfs -o size=1m tmpfs "$1" && exec "$2" serve --listen 127.0.0.1:0 --node t1 --data-dir "$1" --disk-high-water 100%"#)
        .arg("sh")
        .arg(&mnt)
        .arg(env!("CARGO_BIN_EXE_chunkbus"));
    let node = BinNode::spawn(cmd).await;
    let http = reqwest::Client::new();
    let mut acked: Vec<Vec<u8>> = Vec::new();
    let mut saw_507 = false;
    for i in 0..40 {
        let body = format!("{i:04}-{}\n", "x".repeat(100)).repeat(500);
        let r = http
            .post(node.url("/v1/categories/app/lines"))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        match r.status() {
            StatusCode::OK => acked.push(body.into_bytes()),
            StatusCode::INSUFFICIENT_STORAGE => {
                let e = r.json::<ErrorBody>().await.unwrap().error;
                assert!(e.contains("disk") && e.contains("full"), "{e}");
                saw_507 = true;
                break;
            }
            s => panic!("unexpected status {s}"),
        }
    }
    assert!(saw_507, "1 MiB never filled up");
    assert!(!acked.is_empty());
    // Read back through the API (the tmpfs is private to the node).
    let chunk = "t1-chunk000000000";
    let r = http
        .get(node.url(&format!(
            "/v1/categories/app/chunks/{chunk}?max_bytes=16777216"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let size: usize = r.headers()["chunkbus-chunk-size"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let data = r.bytes().await.unwrap();
    assert_eq!(
        data,
        acked.concat(),
        "exactly the acknowledged requests, nothing partial"
    );
    assert_eq!(size, data.len());
    node.kill().await;
}
