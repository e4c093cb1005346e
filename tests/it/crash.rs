//! Crash test: concurrent writers post with `sync=true` while the real
//! binary is SIGKILLed at random moments and restarted. Every acknowledged
//! line must be present once, whole, in order within its request, and no
//! chunk may hold a partial line.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chunkbus_client::ProduceResponse;
use rand::Rng;
use tokio::sync::RwLock;

use crate::harness::{BinNode, chunk_files};

const WRITERS: usize = 6;
const KILLS: usize = 10;
const LINES_PER_REQUEST: usize = 20;
/// Acknowledged writes to wait for between two kills.
const ACKS_BETWEEN_KILLS: u64 = 40;
const ROUND_DEADLINE: Duration = Duration::from_secs(60);

/// What one writer had acknowledged: request id → (chunk, offset).
type Acked = HashMap<String, (String, u64)>;

/// True when a chunk file in `dir` carries the zero-runway mark.
fn holds_a_runway(dir: &std::path::Path) -> bool {
    let mut buf = [0u8; 32];
    std::fs::read_dir(dir).unwrap().any(|e| {
        let file = std::fs::File::open(e.unwrap().path()).unwrap();
        rustix::fs::fgetxattr(&file, chunkbus::storage::runway::MARKER, &mut buf[..]).is_ok()
    })
}

fn request_lines(writer: usize, req: u64) -> String {
    (0..LINES_PER_REQUEST)
        .map(|l| {
            format!(
                "w{writer}-r{req}-l{l}-{}\n",
                "p".repeat((req as usize * 7 + l) % 50)
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_lines_survive_sigkill() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    // Small chunks so that rotation happens while killing.
    let args = ["--sync", "always", "--max-chunk-bytes", "64KiB"];
    let node = BinNode::start(&dir, &args).await;
    let base = Arc::new(RwLock::new(node.url("")));
    let acks = Arc::new(AtomicU64::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (base, acks, stop, http) = (base.clone(), acks.clone(), stop.clone(), http.clone());
        writers.push(tokio::spawn(async move {
            let mut acked = Acked::new();
            let mut req = 0u64;
            while !stop.is_cancelled() {
                req += 1;
                let url = format!("{}/v1/categories/crash/lines?sync=true", base.read().await);
                let Ok(r) = http.post(url).body(request_lines(w, req)).send().await else {
                    // The node is down: each request id is tried once, then a
                    // new one, so every line in the files is unique.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                if r.status().is_success()
                    && let Ok(p) = r.json::<ProduceResponse>().await
                {
                    acked.insert(format!("w{w}-r{req}"), (p.chunk.unwrap(), p.offset));
                    acks.fetch_add(1, Ordering::Relaxed);
                }
            }
            acked
        }));
    }

    let mut node = node;
    let mut rng = rand::rng();
    // Kills that left a chunk with a zero runway (zeros past its data).
    let mut runway_kills = 0;
    for kill in 0..KILLS {
        // Let some writes be acknowledged, then kill at a random moment.
        let target = acks.load(Ordering::Relaxed) + ACKS_BETWEEN_KILLS;
        let deadline = tokio::time::Instant::now() + ROUND_DEADLINE;
        while acks.load(Ordering::Relaxed) < target {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no progress before kill {kill}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..50))).await;
        node.kill().await;
        runway_kills += usize::from(holds_a_runway(&dir.join("crash")));
        node = BinNode::start(&dir, &args).await;
        *base.write().await = node.url("");
    }
    stop.cancel();
    let mut acked = Acked::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    node.kill().await;
    assert!(acked.len() as u64 >= KILLS as u64 * ACKS_BETWEEN_KILLS);
    if chunkbus::storage::runway::supported(&dir) {
        assert!(runway_kills > 0, "no kill hit a chunk with a zero runway");
    }

    // Restart once more so that torn tails of the last kill are cut, then
    // check the files themselves.
    let node = BinNode::start(&dir, &args).await;
    node.kill().await;
    let files = chunk_files(&dir.join("crash"));
    assert!(files.len() > 1, "chunks should have rotated");
    // line → (chunk, offset, position in the file's line list)
    let mut seen: HashMap<String, (String, u64)> = HashMap::new();
    let mut order: HashMap<String, Vec<String>> = HashMap::new();
    for (name, data) in &files {
        assert!(
            data.is_empty() || data.ends_with(b"\n"),
            "{name} ends with a partial line"
        );
        let text = std::str::from_utf8(data).unwrap();
        let mut offset = 0u64;
        let mut lines = Vec::new();
        for line in text.split_terminator('\n') {
            let mut parts = line.splitn(4, '-');
            let (w, r, l) = (
                parts.next().unwrap(),
                parts.next().unwrap(),
                parts.next().unwrap(),
            );
            let pad = parts.next().expect("a whole line has 4 parts");
            assert!(
                pad.bytes().all(|b| b == b'p'),
                "damaged line {line:?} in {name}"
            );
            let prev = seen.insert(line.to_owned(), (name.clone(), offset));
            assert!(prev.is_none(), "line {line:?} stored twice");
            lines.push(format!("{w}-{r}-{l}"));
            offset += line.len() as u64 + 1;
        }
        order.insert(name.clone(), lines);
    }
    for (req, (chunk, offset)) in &acked {
        let (w, r): (usize, u64) = {
            let mut it = req.trim_start_matches('w').split("-r");
            (
                it.next().unwrap().parse().unwrap(),
                it.next().unwrap().parse().unwrap(),
            )
        };
        let expected = request_lines(w, r);
        let (_, data) = files
            .iter()
            .find(|(n, _)| n == chunk)
            .unwrap_or_else(|| panic!("chunk {chunk} of acknowledged request {req} is gone"));
        let at = *offset as usize;
        assert_eq!(
            data.get(at..at + expected.len()),
            Some(expected.as_bytes()),
            "acknowledged request {req} is not intact at {chunk}:{offset}"
        );
    }
    eprintln!(
        "crash test: {} kills, {} acknowledged requests, {} lines on disk in {} chunks",
        KILLS,
        acked.len(),
        seen.len(),
        files.len()
    );
}
