//! `chunkbus ship`: rotation, crashes, a server that goes away, many files.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::harness::{BinNode, TestNode, serve_command};
use crate::proxy::Proxy;

const ARRIVAL_DEADLINE: Duration = Duration::from_secs(60);

fn ship(server: &str, registry: &Path, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_chunkbus"))
        .args([
            "ship",
            "--server",
            server,
            "--partial-line-timeout",
            "1s",
            "--registry",
        ])
        .arg(registry)
        .args(args)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Every line of `category` on the node at `base`, with its count.
async fn received(base: &str, category: &str) -> BTreeMap<String, usize> {
    let client = chunkbus_client::Client::new(base).unwrap();
    let mut out = BTreeMap::new();
    for l in crate::harness::all_lines(&client, category).await {
        *out.entry(l).or_insert(0) += 1;
    }
    out
}

/// Waits until the node holds at least `n` distinct lines of `category`.
async fn wait_for_lines(base: &str, category: &str, n: usize) -> BTreeMap<String, usize> {
    let deadline = tokio::time::Instant::now() + ARRIVAL_DEADLINE;
    loop {
        let got = received(base, category).await;
        if got.len() >= n {
            return got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {n} lines arrived",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn append(path: &Path, from: usize, to: usize) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    let text: String = (from..to).map(|i| format!("line {i:06}\n")).collect();
    f.write_all(text.as_bytes()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_rotated_both_ways_while_written_arrives_complete() {
    let node = TestNode::start().await;
    let base = node.url("");
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("app.log");
    append(&log, 0, 1);
    let mut shipper = ship(
        &base,
        &tmp.path().join("reg.json"),
        &["-c", "rot", log.to_str().unwrap()],
    );
    // The shipper follows the file before it is first rotated.
    wait_for_lines(&base, "rot", 1).await;
    const PER_ROUND: usize = 3000;
    let mut written = 1;
    for round in 0..6 {
        for _ in 0..30 {
            append(&log, written, written + PER_ROUND / 30);
            written += PER_ROUND / 30;
        }
        if round % 2 == 0 {
            // rename + create: the old file is read to its end through its handle.
            std::fs::rename(&log, tmp.path().join(format!("app.log.{round}"))).unwrap();
            append(&log, written, written + 1);
            written += 1;
        } else {
            // copytruncate: lines written between the copy and the truncation
            // are lost by design of copytruncate, so the writer pauses, and
            // the shipper must have read the file first.
            wait_for_lines(&base, "rot", written).await;
            std::fs::copy(&log, tmp.path().join(format!("app.log.{round}"))).unwrap();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&log)
                .unwrap()
                .set_len(0)
                .unwrap();
        }
    }
    // A last line without newline is sent after --partial-line-timeout.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .unwrap()
        .write_all(b"no newline at the end")
        .unwrap();
    let got = wait_for_lines(&base, "rot", written + 1).await;
    for i in 0..written {
        assert!(
            got.contains_key(&format!("line {i:06}")),
            "line {i} is missing"
        );
    }
    assert!(got.contains_key("no newline at the end"));
    shipper.kill().await.unwrap();
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_shipper_resumes_without_losing_lines() {
    let node = TestNode::start().await;
    let base = node.url("");
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("big.log");
    const N: usize = 300_000;
    append(&log, 0, N);
    let reg = tmp.path().join("reg.json");
    let mut first = ship(&base, &reg, &["-c", "kill", log.to_str().unwrap()]);
    wait_for_lines(&base, "kill", N / 10).await;
    first.kill().await.unwrap();
    let registry = std::fs::read_to_string(&reg).unwrap_or_default();
    let mut second = ship(&base, &reg, &["-c", "kill", log.to_str().unwrap()]);
    let got = wait_for_lines(&base, "kill", N).await;
    let dups: usize = got.values().map(|&n| n - 1).sum();
    // Only lines sent but not yet acknowledged when it died come twice: at
    // most the producer's buffer (64 MiB) — in practice a few batches.
    assert!(
        dups * 12 <= 64 << 20,
        "{dups} duplicates; registry was {registry}"
    );
    second.kill().await.unwrap();
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_is_down_for_a_while_receives_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let proxy = Proxy::start().await;
    let data = tmp.path().join("data");
    let node = BinNode::spawn(serve_command("t1", &data)).await;
    proxy.set_target(node.addr);
    let base = format!("http://{}", proxy.addr);
    let log = tmp.path().join("app.log");
    append(&log, 0, 1000);
    let mut shipper = ship(
        &base,
        &tmp.path().join("reg.json"),
        &["-c", "down", log.to_str().unwrap()],
    );
    wait_for_lines(&base, "down", 1000).await;
    node.kill().await;
    append(&log, 1000, 5000);
    // The shipper retries with backoff while the node is down.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let node = BinNode::spawn(serve_command("t1", &data)).await;
    proxy.set_target(node.addr);
    append(&log, 5000, 6000);
    let got = wait_for_lines(&base, "down", 6000).await;
    assert_eq!(got.len(), 6000);
    shipper.kill().await.unwrap();
    node.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_files_in_a_tree_are_all_shipped() {
    let node = TestNode::start().await;
    let base = node.url("");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("logs");
    for d in 0..10 {
        let dir = root.join(format!("d{d}")).join("sub");
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..100 {
            let text: String = (0..5).map(|l| format!("d{d}-f{f}-l{l}\n")).collect();
            std::fs::write(dir.join(format!("f{f}.log")), text).unwrap();
        }
    }
    let mut shipper = ship(
        &base,
        &tmp.path().join("reg.json"),
        &["-c", "tree", root.to_str().unwrap()],
    );
    let got = wait_for_lines(&base, "tree", 5000).await;
    assert_eq!(got.len(), 5000);
    // A file created later in the tree is picked up too.
    std::fs::write(root.join("d0").join("late.log"), "late line\n").unwrap();
    let got = wait_for_lines(&base, "tree", 5001).await;
    assert!(got.contains_key("late line"));
    shipper.kill().await.unwrap();
    node.stop().await;
}
