//! Replication between real nodes: convergence, crashes, partitions,
//! `min_replicas` and lost owners.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chunkbus_client::{Client, ProduceOptions, ProduceResponse};
use reqwest::StatusCode;

use crate::cluster::TestCluster;
use crate::harness::all_lines;

fn body(tag: &str, req: usize) -> String {
    (0..10)
        .map(|l| format!("{tag}-r{req}-l{l}-{}\n", "x".repeat(200)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_spread_over_three_nodes_are_readable_everywhere() {
    let cluster = TestCluster::start(3, &["--max-chunk-bytes", "32KiB"]).await;
    let mut written = BTreeSet::new();
    for req in 0..90 {
        let node = req % 3;
        let cat = if req % 2 == 0 { "app" } else { "web.access" };
        let b = body(&format!("{cat}-n{node}"), req);
        written.extend(b.lines().map(|l| (cat, l.to_owned())));
        cluster
            .client(node)
            .produce(cat, b, &ProduceOptions::default())
            .await
            .unwrap();
    }
    // A category that only one node was ever written to.
    cluster
        .client(2)
        .produce("only-n3", "solo\n", &ProduceOptions::default())
        .await
        .unwrap();
    cluster
        .wait_converged(&["app", "web.access", "only-n3"])
        .await;
    for i in 0..3 {
        let client = cluster.client(i);
        for cat in ["app", "web.access"] {
            let got: BTreeSet<_> = all_lines(&client, cat)
                .await
                .into_iter()
                .map(|l| (cat, l))
                .collect();
            let want: BTreeSet<_> = written.iter().filter(|(c, _)| *c == cat).cloned().collect();
            assert_eq!(got, want, "node {i}, category {cat}");
        }
        assert_eq!(all_lines(&client, "only-n3").await, ["solo"]);
        let st = client.status().await.unwrap();
        assert_eq!(st.peers.len(), 2);
        assert!(
            st.peers.iter().all(|p| p.connected && p.lag_bytes == 0),
            "{st:#?}"
        );
    }
    // Each node owns chunks; replicas were never written under their own name.
    let lists = cluster.chunk_lists("app").await;
    let owners: BTreeSet<_> = lists[0].iter().map(|c| c.owner.clone()).collect();
    assert_eq!(owners.len(), 3);
    let text = crate::harness::metrics_text(&cluster.url(0)).await;
    assert!(
        text.contains("chunkbus_peer_connected{peer=\"n2\"} 1"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_during_writes_converges_after_restart() {
    let mut cluster = TestCluster::start(3, &["--max-chunk-bytes", "64KiB"]).await;
    let urls: Vec<String> = (0..3).map(|i| cluster.url(i)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    // Writers on the two nodes that stay up, with sync: every 200 counts.
    let mut writers = Vec::new();
    for (w, url) in urls.iter().take(2).enumerate() {
        let (stop, client) = (stop.clone(), Client::new(url).unwrap());
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut req = 0;
            while !stop.load(Ordering::Relaxed) {
                let b = body(&format!("w{w}"), req);
                if client
                    .produce("crash", b.clone(), &ProduceOptions::default())
                    .await
                    .is_ok()
                {
                    acked.extend(b.lines().map(str::to_owned));
                }
                req += 1;
            }
            acked
        }));
    }
    // Node 3 writes too, and is SIGKILLed in the middle.
    let n3 = cluster.client(2);
    let mut acked3 = Vec::new();
    for req in 0..40 {
        let b = body("n3", req);
        n3.produce("crash", b.clone(), &ProduceOptions::default())
            .await
            .unwrap();
        acked3.extend(b.lines().map(str::to_owned));
    }
    cluster.wait_peer_connected(0, "n3", true).await;
    cluster.kill(2).await;
    cluster.wait_peer_connected(0, "n3", false).await;
    cluster.start_node(2).await;
    for req in 40..60 {
        let b = body("n3", req);
        cluster
            .client(2)
            .produce("crash", b.clone(), &ProduceOptions::default())
            .await
            .unwrap();
        acked3.extend(b.lines().map(str::to_owned));
    }
    stop.store(true, Ordering::Relaxed);
    let mut acked: BTreeSet<String> = acked3.into_iter().collect();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    cluster.wait_converged(&["crash"]).await;
    // The restarted owner completed its open chunk and started a new one.
    let list = cluster.client(0).chunks("crash").await.unwrap();
    let n3_chunks: Vec<_> = list.iter().filter(|c| c.owner == "n3").collect();
    assert!(n3_chunks.len() >= 2 && n3_chunks[..n3_chunks.len() - 1].iter().all(|c| c.complete));
    for i in 0..3 {
        let got: BTreeSet<String> = all_lines(&cluster.client(i), "crash")
            .await
            .into_iter()
            .collect();
        let missing: Vec<_> = acked.difference(&got).take(3).collect();
        assert!(
            missing.is_empty(),
            "node {i} lacks acknowledged lines, e.g. {missing:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_node_keeps_serving_and_catches_up_after_the_heal() {
    let cluster = TestCluster::start(3, &["--max-chunk-bytes", "256KiB"]).await;
    cluster.wait_peer_connected(2, "n1", true).await;
    cluster.set_cut(2, true);
    cluster.wait_peer_connected(0, "n3", false).await;
    cluster.wait_peer_connected(2, "n1", false).await;
    let mut written = BTreeSet::new();
    for req in 0..150 {
        // Every node, the cut one included, keeps taking writes.
        let node = req % 3;
        let b = body(&format!("n{node}"), req);
        written.extend(b.lines().map(str::to_owned));
        cluster
            .client(node)
            .produce("part", b, &ProduceOptions::default())
            .await
            .unwrap();
    }
    let st = cluster.client(0).status().await.unwrap();
    let n3 = st.peers.iter().find(|p| p.name == "n3").unwrap();
    assert!(!n3.connected && n3.last_error.is_some(), "{n3:#?}");
    cluster.set_cut(2, false);
    cluster.wait_converged(&["part"]).await;
    for i in 0..3 {
        let got: BTreeSet<String> = all_lines(&cluster.client(i), "part")
            .await
            .into_iter()
            .collect();
        assert_eq!(got, written, "node {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_replicas_waits_for_replicas_and_times_out_with_the_position() {
    let mut cluster = TestCluster::start(3, &[]).await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/categories/mr/lines", cluster.url(0));
    let r = http
        .post(format!("{url}?min_replicas=2"))
        .body("a\nb\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let p: ProduceResponse = r.json().await.unwrap();
    assert_eq!(p.replicas, Some(2));
    // Both replicas really hold the bytes.
    for i in 1..3 {
        let meta = cluster.client(i).chunks("mr").await.unwrap();
        assert_eq!(meta[0].size, p.next_offset, "node {i}");
    }
    let r = http
        .post(format!("{url}?min_replicas=3"))
        .body("c\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    cluster.kill(2).await;
    let r = http
        .post(format!("{url}?min_replicas=2&timeout=1s"))
        .body("d\ne\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["chunk"], p.chunk.clone().unwrap().as_str());
    assert_eq!(v["offset"], p.next_offset);
    assert_eq!(v["next_offset"], p.next_offset + 4);
    assert_eq!(v["replicas"], 1);
    assert!(v["error"].as_str().unwrap().contains("min_replicas"));
    // The data is stored anyway, and one replica confirms with min_replicas=1.
    let r = http
        .post(format!("{url}?min_replicas=1"))
        .body("f\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // Chukcha's parameter works the same way.
    let r = http
        .post(format!(
            "{}/write?category=mr&min_sync_replicas=1",
            cluster.url(0)
        ))
        .body("g\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let lines = all_lines(&cluster.client(0), "mr").await;
    assert_eq!(lines, ["a", "b", "d", "e", "f", "g"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_node_lets_readers_finish_a_dead_nodes_chunk() {
    let mut cluster = TestCluster::start(3, &[]).await;
    let p = cluster
        .client(2)
        .produce("lost", "from n3\n", &ProduceOptions::default())
        .await
        .unwrap();
    let chunk = p.chunk.unwrap();
    cluster.wait_converged(&["lost"]).await;
    cluster.kill(2).await;
    for i in 0..2 {
        let r = cluster
            .client(i)
            .read_chunk("lost", &chunk, 0, 1024)
            .await
            .unwrap();
        assert!(
            !r.complete,
            "the dead node's chunk is still open on node {i}"
        );
    }
    // A reader parked at the end of the chunk is woken by the forget.
    let reader = {
        let client = cluster.client(1);
        let chunk = chunk.clone();
        let next = p.next_offset;
        tokio::spawn(async move {
            client
                .read_chunk_wait("lost", &chunk, next, 1024, Duration::from_secs(60))
                .await
                .unwrap()
        })
    };
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_chunkbus"))
        .args(["admin", "forget-node", "n3", "--server", &cluster.url(0)])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("n2: ok"), "{stdout}");
    let woken = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .unwrap()
        .unwrap();
    assert!(woken.complete);
    for i in 0..2 {
        let list = cluster.client(i).chunks("lost").await.unwrap();
        assert!(list.iter().all(|c| c.complete), "node {i}: {list:?}");
    }
    // Forgetting the node one asks is refused.
    let r = reqwest::Client::new()
        .post(format!("{}/v1/admin/forget-node/n1", cluster.url(0)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // The completion is durable: it survives a restart of a replica, and
    // so does treating n3 as lost.
    cluster.kill(1).await;
    cluster.start_node(1).await;
    let list = cluster.client(1).chunks("lost").await.unwrap();
    assert!(list.iter().all(|c| c.complete), "{list:?}");
    let n3 = |st: chunkbus_client::NodeStatus| st.peers.into_iter().find(|p| p.name == "n3");
    let peer = n3(cluster.client(1).status().await.unwrap()).unwrap();
    assert!(peer.forgotten && !peer.connected, "{peer:?}");
    // Until it answers again; that is durable too.
    cluster.start_node(2).await;
    cluster.wait_peer_connected(1, "n3", true).await;
    let peer = n3(cluster.client(1).status().await.unwrap()).unwrap();
    assert!(!peer.forgotten, "{peer:?}");
    cluster.kill(2).await;
    cluster.wait_peer_connected(1, "n3", false).await;
    cluster.kill(1).await;
    cluster.start_node(1).await;
    let peer = n3(cluster.client(1).status().await.unwrap()).unwrap();
    assert!(!peer.forgotten && !peer.connected, "{peer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_a_peer_list_that_contradicts_it() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_chunkbus"))
        .args([
            "serve",
            "--node",
            "a",
            "--listen",
            "127.0.0.1:0",
            "--peers",
            "a=127.0.0.1:1,b=127.0.0.1:2",
        ])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("names this node"));
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_chunkbus"))
        .args([
            "serve",
            "--node",
            "a",
            "--peers",
            "b=127.0.0.1:1,b=127.0.0.1:2",
        ])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("appears twice"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_lost_after_completes_an_unreachable_peers_chunks() {
    let mut cluster = TestCluster::start(3, &["--owner-lost-after", "1s"]).await;
    let p = cluster
        .client(2)
        .produce("auto", "from n3\n", &ProduceOptions::default())
        .await
        .unwrap();
    cluster.wait_converged(&["auto"]).await;
    cluster.kill(2).await;
    // Parked at the end of the open chunk until the peer is declared lost.
    let r = cluster
        .client(0)
        .read_chunk_wait(
            "auto",
            &p.chunk.unwrap(),
            p.next_offset,
            1024,
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert!(r.complete, "the lost owner's chunk was completed");
    let st = cluster.client(0).status().await.unwrap();
    let n3 = st.peers.iter().find(|p| p.name == "n3").unwrap();
    assert!(!n3.connected);
}

/// A fake owner `n1` whose process restarts between a listing and the read
/// of what it listed, at an exact moment. Process 1 (incarnation 1) holds
/// chunk `c` with the line "old 1", lists it, then lists a second line; the
/// read of that line is answered by process 2 (incarnation 2), which lost
/// its disk and wrote other lines under the same name.
/// Or, `balanced`, an owner whose listings process 1 always answers and
/// whose reads process 2 does, as two processes behind a balancer would.
#[derive(Default)]
struct RestartingOwner {
    balanced: bool,
    /// Process 2 answers from now on.
    restarted: AtomicBool,
    /// Reads process 2 answered for a listing of process 1.
    stale_reads: std::sync::atomic::AtomicU32,
    /// Reads answered.
    reads: std::sync::atomic::AtomicU32,
}

const RESTARTING_CHUNK: &str = "n1-chunk000000000";
/// Process 1's chunk as first listed, then as listed again.
const BEFORE: &str = "old 1\n";
const BEFORE_LONGER: &str = "old 1\nold 2\n";
/// Process 2's chunk under the same name.
const AFTER: &str = "new 1\nnew 2\n";

impl RestartingOwner {
    /// The routes of `n1` a node asks.
    fn router(self: Arc<Self>) -> axum::Router {
        use axum::routing::{get, post};
        axum::Router::new()
            .route("/v1/internal/changes", post(Self::changes))
            .route("/v1/internal/copies/{node}", get(Self::copies))
            .route("/v1/categories/{category}/chunks/{chunk}", get(Self::read))
            .with_state(self)
    }

    /// The process that reads.
    fn incarnation(&self) -> u64 {
        if self.balanced || self.restarted.load(Ordering::SeqCst) {
            2
        } else {
            1
        }
    }

    /// Serves `n1`'s routes on loopback; its address.
    async fn serve(self: &Arc<Self>) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = self.clone().router();
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    /// A node `n2` whose only peer is `n1` at `addr`.
    async fn follower(
        addr: std::net::SocketAddr,
        dir: &std::path::Path,
    ) -> crate::harness::BinNode {
        let mut cmd = crate::harness::serve_command("n2", dir);
        cmd.args(["--peers", &format!("n1={addr}")]).args([
            "--replication-wait",
            "2s",
            "--peer-timeout",
            "1s",
        ]);
        crate::harness::BinNode::spawn(cmd).await
    }

    /// A changes answer of process `incarnation` at `version`, listing `c`
    /// open at `held` (if any).
    fn listing(incarnation: u64, version: u64, held: Option<&str>) -> serde_json::Value {
        let chunks: Vec<serde_json::Value> = held
            .map(|h| {
                serde_json::json!({
                    "category": "app",
                    "chunk": RESTARTING_CHUNK,
                    "size": h.len(),
                    "complete": false,
                    "first_line": 0,
                    "lines": h.lines().count(),
                })
            })
            .into_iter()
            .collect();
        serde_json::json!({
            "node": "n1",
            "incarnation": incarnation,
            "version": version,
            "chunks": chunks,
        })
    }

    async fn changes(
        axum::extract::State(me): axum::extract::State<Arc<Self>>,
        axum::Json(req): axum::Json<serde_json::Value>,
    ) -> axum::Json<serde_json::Value> {
        let asked = req["incarnation"].as_u64().unwrap_or(0);
        let since = req["since"].as_u64().unwrap_or(0);
        let wait = Duration::from_millis(req["wait_ms"].as_u64().unwrap_or(0).min(200));
        if me.balanced {
            if asked == 1 && since == 1 {
                tokio::time::sleep(wait).await;
                return axum::Json(Self::listing(1, 1, None));
            }
            return axum::Json(Self::listing(1, 1, Some(BEFORE_LONGER)));
        }
        if me.restarted.load(Ordering::SeqCst) {
            if asked == 2 {
                tokio::time::sleep(wait).await;
                return axum::Json(Self::listing(2, 1, None));
            }
            return axum::Json(Self::listing(2, 1, Some(AFTER)));
        }
        if asked != 1 || since == 0 {
            return axum::Json(Self::listing(1, 1, Some(BEFORE)));
        }
        let copied = req["progress"].as_array().is_some_and(|p| {
            p.iter()
                .any(|p| p["chunk"] == RESTARTING_CHUNK && p["size"] == BEFORE.len())
        });
        if !copied {
            tokio::time::sleep(wait).await;
            return axum::Json(Self::listing(1, 1, None));
        }
        // The listing is process 1's last word: process 2 reads from now on.
        me.restarted.store(true, Ordering::SeqCst);
        axum::Json(Self::listing(1, 2, Some(BEFORE_LONGER)))
    }

    async fn copies(
        axum::extract::State(me): axum::extract::State<Arc<Self>>,
    ) -> axum::Json<serde_json::Value> {
        axum::Json(serde_json::json!({
            "node": "n1",
            "incarnation": me.incarnation(),
            "chunks": [],
        }))
    }

    async fn read(
        axum::extract::State(me): axum::extract::State<Arc<Self>>,
        axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
    ) -> axum::response::Response {
        use axum::response::IntoResponse;
        let offset: usize = q.get("offset").and_then(|o| o.parse().ok()).unwrap_or(0);
        me.reads.fetch_add(1, Ordering::SeqCst);
        let incarnation = me.incarnation();
        let held = if incarnation == 2 { AFTER } else { BEFORE };
        if incarnation == 2 && offset == BEFORE.len() {
            me.stale_reads.fetch_add(1, Ordering::SeqCst);
        }
        let data = held.get(offset..).unwrap_or("").to_owned();
        let next = offset + data.len();
        (
            [
                ("chunkbus-next-offset", next.to_string()),
                ("chunkbus-complete", "false".to_owned()),
                ("chunkbus-chunk-size", held.len().to_string()),
                ("chunkbus-incarnation", incarnation.to_string()),
            ],
            data,
        )
            .into_response()
    }
}

/// The owner restarts (having lost its disk, it reuses a chunk's name for
/// other lines) between its listing and the read of what it listed: the
/// replica does not append the new process's bytes to the old process's
/// copy. It asks again, gets the new listing, and keeps its copy as it was,
/// reported as disagreeing with its owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_read_by_a_restarted_owner_are_not_added_to_its_earlier_lines() {
    let owner = Arc::new(RestartingOwner::default());
    let dir = tempfile::tempdir().unwrap();
    let node = RestartingOwner::follower(owner.serve().await, dir.path()).await;
    let client = Client::new(&node.url("")).unwrap();
    crate::harness::eventually(
        crate::harness::CONDITION_DEADLINE,
        "the copy reported as disagreeing with its owner",
        || async {
            let st = client.status().await.ok()?;
            st.peers
                .iter()
                .flat_map(|p| &p.disagreeing_chunks)
                .any(|d| d.chunk == RESTARTING_CHUNK)
                .then_some(())
        },
    )
    .await;
    assert!(
        owner.stale_reads.load(Ordering::SeqCst) > 0,
        "the read after the listing did not reach the new process"
    );
    let copy = client
        .read_chunk("app", RESTARTING_CHUNK, 0, 1 << 20)
        .await
        .unwrap();
    assert_eq!(copy.data, BEFORE, "the copy took bytes of another process");
    node.kill().await;
}

/// Listings answered by one process of the owner and reads by another,
/// round after round (as behind a balancer): the replica takes none of
/// those bytes, and asks with backoff rather than at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_answered_by_another_process_round_after_round_are_asked_with_backoff() {
    let owner = Arc::new(RestartingOwner {
        balanced: true,
        ..RestartingOwner::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let node = RestartingOwner::follower(owner.serve().await, dir.path()).await;
    crate::harness::eventually(
        crate::harness::CONDITION_DEADLINE,
        "the backoff's warning",
        || async {
            node.stderr
                .lock()
                .unwrap()
                .contains("round after round")
                .then_some(())
        },
    )
    .await;
    // Without the backoff a replica asks thousands of times a second; with
    // it, at most a few times in the window, whatever this machine's speed.
    let before = owner.reads.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let asked = owner.reads.load(Ordering::SeqCst) - before;
    assert!(asked <= 20, "{asked} reads in 3 s");
    let client = Client::new(&node.url("")).unwrap();
    let held = client.read_chunk("app", RESTARTING_CHUNK, 0, 1 << 20).await;
    assert!(
        matches!(&held, Err(chunkbus_client::ClientError::Status { status, .. }) if *status == StatusCode::NOT_FOUND),
        "the replica took bytes: {held:?}"
    );
    node.kill().await;
}
