//! Schedules that once lost acknowledged lines, replayed against real
//! processes: a replica that misses its owner's restart, a node that lost
//! its disk and would reuse a chunk name its peers hold.

use std::collections::BTreeSet;
use std::time::Duration;

use chunkbus_client::{ChunkName, ProduceOptions, ProduceResponse};
use rustix::process::Signal;

use crate::cluster::TestCluster;
use crate::harness::all_lines;

fn sync() -> ProduceOptions {
    ProduceOptions {
        sync: Some(true),
        ..ProduceOptions::default()
    }
}

/// Writes one request of two lines to node `i`, records them as acknowledged.
async fn write(
    cluster: &TestCluster,
    i: usize,
    cat: &str,
    tag: &str,
    acked: &mut BTreeSet<String>,
) -> ProduceResponse {
    let body = format!("{tag}-a {}\n{tag}-b\n", "x".repeat(80));
    let r = cluster.client(i).produce(cat, body.clone(), &sync()).await;
    let r = r.unwrap_or_else(|e| panic!("write {tag} to node {i}: {e}"));
    acked.extend(body.lines().map(str::to_owned));
    r
}

/// Every acknowledged line is readable from node `i`, exactly once.
async fn assert_all_lines(cluster: &TestCluster, i: usize, cat: &str, acked: &BTreeSet<String>) {
    let lines = all_lines(&cluster.client(i), cat).await;
    let got: BTreeSet<String> = lines.iter().cloned().collect();
    assert_eq!(got.len(), lines.len(), "node {i} serves a line twice");
    let missing: Vec<_> = acked.difference(&got).take(5).collect();
    assert!(
        missing.is_empty(),
        "node {i} lacks {} acknowledged lines, e.g. {missing:?}",
        acked.difference(&got).count()
    );
}

/// The owner restarts while its replica is paused with the owner's answer
/// to its long poll in its socket buffer: the replica sees no error, and
/// its change version belongs to the owner's previous process. Before
/// incarnations, the replica never heard that the open chunk grew and was
/// completed, kept a short copy, and a later completion made it complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_paused_across_its_owners_restart_copies_every_acknowledged_line() {
    let mut cluster = TestCluster::start(2, &["--max-chunk-bytes", "4KiB"]).await;
    cluster.wait_peer_connected(1, "n1", true).await;
    let mut acked = BTreeSet::new();
    // Enough appends that the owner's change version runs far ahead of
    // what its next process reaches soon after starting.
    for r in 0..30 {
        write(&cluster, 0, "app", &format!("early{r}"), &mut acked).await;
    }
    cluster.wait_converged(&["app"]).await;
    // Pause the replica while its long poll is pending at the owner, and
    // let the owner answer it (into the paused replica's socket buffer).
    let answers = cluster.link(1, 0);
    let mut attempt = 0;
    loop {
        attempt += 1;
        cluster.signal(1, Signal::STOP);
        let before = answers.bytes_to_client();
        write(&cluster, 0, "app", &format!("seen{attempt}"), &mut acked).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while answers.bytes_to_client() == before && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if answers.bytes_to_client() > before {
            break;
        }
        // Paused between two polls: nothing was pending. Try again.
        assert!(attempt < 5, "the replica never had a long poll pending");
        cluster.signal(1, Signal::CONT);
        cluster.wait_converged(&["app"]).await;
    }
    // Appended after that answer: the replica has not heard of it.
    let missed = write(&cluster, 0, "app", "missed", &mut acked).await;
    cluster.kill(0).await;
    cluster.start_node(0).await;
    cluster.signal(1, Signal::CONT);
    // The new process completed the chunk at start-up; write on until it
    // has completed later chunks and its change version passed the old one.
    for r in 0..60 {
        write(&cluster, 0, "app", &format!("late{r}"), &mut acked).await;
    }
    cluster.wait_converged(&["app"]).await;
    let replica = cluster.client(1).chunks("app").await.unwrap();
    let copy = replica
        .iter()
        .find(|c| Some(&c.name) == missed.chunk.as_ref())
        .expect("the replica lists the chunk");
    assert!(copy.complete && copy.size >= missed.next_offset, "{copy:?}");
    assert_all_lines(&cluster, 1, "app", &acked).await;
    // The replica's completion records are right across its own restart.
    cluster.kill(1).await;
    cluster.start_node(1).await;
    cluster.wait_converged(&["app"]).await;
    assert_all_lines(&cluster, 1, "app", &acked).await;
    let restarts = crate::harness::metrics_text(&cluster.url(1)).await;
    assert!(
        !restarts.contains("chunkbus_copies_disagreeing{peer=\"n1\"} 1"),
        "{restarts}"
    );
}

/// A chunk copied short and completed (a replica that declared its owner
/// lost while the owner went on writing) is repaired when the owner
/// answers again: reopened, copied to the owner's size, completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_completed_short_by_forget_node_is_repaired_when_the_owner_returns() {
    let cluster = TestCluster::start(2, &["--max-chunk-bytes", "4KiB"]).await;
    cluster.wait_peer_connected(1, "n1", true).await;
    let mut acked = BTreeSet::new();
    let first = write(&cluster, 0, "app", "before", &mut acked).await;
    cluster.wait_converged(&["app"]).await;
    cluster.set_cut(0, true);
    cluster.wait_peer_connected(1, "n1", false).await;
    // The owner goes on writing into its open chunk while cut off.
    let later = write(&cluster, 0, "app", "during", &mut acked).await;
    assert_eq!(later.chunk, first.chunk);
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_chunkbus"))
        .args(["admin", "forget-node", "n1", "--server", &cluster.url(1)])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let chunk = first.chunk.clone().unwrap();
    let short = cluster.client(1).chunks("app").await.unwrap();
    assert!(
        short
            .iter()
            .any(|c| c.name == chunk && c.complete && c.size == first.next_offset),
        "{short:?}"
    );
    cluster.set_cut(0, false);
    crate::harness::wait_for_metric_at(
        &reqwest::Client::new(),
        &cluster.url(1),
        "chunkbus_copies_repaired_total{peer=\"n1\"} 1",
    )
    .await;
    // The owner completes it by size; the copy follows, at its size.
    let mut last = later;
    for r in 0.. {
        if last.chunk.as_ref() != Some(&chunk) {
            break;
        }
        last = write(&cluster, 0, "app", &format!("after{r}"), &mut acked).await;
    }
    cluster.wait_converged(&["app"]).await;
    let copy = cluster.client(1).chunks("app").await.unwrap();
    let owner = cluster.client(0).chunks("app").await.unwrap();
    let find = |l: &[chunkbus_client::ChunkInfo]| l.iter().find(|c| c.name == chunk).cloned();
    assert_eq!(find(&copy), find(&owner));
    assert!(find(&copy).unwrap().complete);
    assert_all_lines(&cluster, 1, "app", &acked).await;
}

fn replicated(n: u32) -> ProduceOptions {
    ProduceOptions {
        sync: Some(true),
        min_replicas: Some(n),
        ..ProduceOptions::default()
    }
}

/// Kills node `i`, removes its data directory, starts it again.
async fn wipe(cluster: &mut TestCluster, i: usize) {
    cluster.kill(i).await;
    std::fs::remove_dir_all(&cluster.dirs[i]).unwrap();
    cluster.start_node(i).await;
}

/// Writes 60 lines of ~100 bytes to node `i` of a cluster with 4 KiB
/// chunks, each confirmed by `min_replicas` peers; returns the chunk the
/// last went to, open, after at least one complete chunk.
async fn fill_chunks(
    cluster: &TestCluster,
    i: usize,
    min_replicas: u32,
    acked: &mut BTreeSet<String>,
) -> ChunkName {
    let mut last = None;
    for r in 0..60 {
        let body = format!("before{r} {}\n", "y".repeat(90));
        let p = cluster
            .client(i)
            .produce("app", body.clone(), &replicated(min_replicas))
            .await
            .unwrap();
        acked.insert(body.trim_end().to_owned());
        last = p.chunk;
    }
    let open = ChunkName::parse(&last.unwrap()).unwrap();
    assert!(open.index >= 1, "a complete chunk and an open one: {open}");
    open
}

/// A node wiped while one of its chunks was open and copied by its peers
/// (not in S3: there is none): before, it wrote new lines into that chunk
/// name from offset 0, and the peers' copies of acknowledged lines were
/// lost. Now it takes its next names past what its peers hold and restores
/// its chunks from them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_node_restores_its_chunks_from_peers_and_reuses_no_name() {
    let mut cluster = TestCluster::start(3, &["--max-chunk-bytes", "4KiB"]).await;
    let mut acked = BTreeSet::new();
    let open = fill_chunks(&cluster, 2, 2, &mut acked).await;
    wipe(&mut cluster, 2).await;
    cluster.wait_writes_open(2).await;
    let p = write(&cluster, 2, "app", "after", &mut acked).await;
    let new = ChunkName::parse(&p.chunk.unwrap()).unwrap();
    assert!(new.index > open.index, "{new} reuses a name up to {open}");
    cluster.wait_converged(&["app"]).await;
    let lists = cluster.chunk_lists("app").await;
    let restored = lists[2]
        .iter()
        .find(|c| c.name == open.to_string())
        .unwrap();
    assert!(restored.complete, "{restored:?}");
    for i in 0..3 {
        assert_all_lines(&cluster, i, "app", &acked).await;
    }
}

/// A write to node `i` that must be held: a 503 that agents retry (with
/// `Retry-After`); its reason.
async fn held_write(cluster: &TestCluster, i: usize) -> String {
    let r = reqwest::Client::new()
        .post(format!("{}/v1/categories/app/lines", cluster.url(i)))
        .body("too early\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.headers().contains_key("retry-after"));
    r.text().await.unwrap()
}

/// Until every peer has answered, a new data directory holds writes with a
/// clear 503; then it takes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_node_holds_writes_until_its_peers_answer() {
    let mut cluster = TestCluster::start(2, &[]).await;
    let mut acked = BTreeSet::new();
    let first = cluster
        .client(1)
        .produce("app", "held by n1\n", &replicated(1))
        .await
        .unwrap();
    acked.insert("held by n1".to_owned());
    cluster.kill(0).await;
    wipe(&mut cluster, 1).await;
    let text = held_write(&cluster, 1).await;
    assert!(text.contains("waiting for n1"), "{text}");
    let st = cluster.client(1).status().await.unwrap();
    assert_eq!(st.writes_held.len(), 1, "{st:?}");
    // A restore under way, the chunks to restore not known yet.
    assert_eq!(st.restoring_chunks, Some(0), "{st:?}");
    cluster.start_node(0).await;
    cluster.wait_writes_open(1).await;
    // The one chunk n0 held a copy of is restored, and the status says so.
    cluster.wait_restored(1).await;
    assert_all_lines(
        &cluster,
        1,
        "app",
        &BTreeSet::from(["held by n1".to_owned()]),
    )
    .await;
    let p = write(&cluster, 1, "app", "later", &mut acked).await;
    assert_ne!(p.chunk, first.chunk);
    cluster.wait_converged(&["app"]).await;
    for i in 0..2 {
        assert_all_lines(&cluster, i, "app", &acked).await;
    }
}

/// A restart in the middle of a restore from peers (found by the chaos
/// soak): the process before had reserved the chunk names its peers
/// named, restored nothing yet, and was killed. The next process used to
/// take writes at once, numbering new lines from 0 under the reserved
/// name: numbers the chunks not restored yet held. Now it holds writes
/// until its peers have answered again, and numbers after every line they
/// know.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_mid_restore_holds_writes_and_numbers_after_its_peers() {
    let mut cluster = TestCluster::start(2, &["--max-chunk-bytes", "4KiB"]).await;
    let mut acked = BTreeSet::new();
    let open = fill_chunks(&cluster, 1, 1, &mut acked).await;
    // What a restore cut short leaves on a new disk: the names reserved,
    // the restore marked unfinished, no chunk restored yet.
    cluster.kill(1).await;
    cluster.kill(0).await;
    let dir = &cluster.dirs[1];
    std::fs::remove_dir_all(dir).unwrap();
    std::fs::create_dir_all(dir.join("app")).unwrap();
    std::fs::write(dir.join(".restoring.json"), r#"{"version":1}"#).unwrap();
    std::fs::write(
        dir.join("app/.state.json"),
        format!(
            r#"{{"version":2,"complete":{{}},"next_own_index":{}}}"#,
            open.index + 1
        ),
    )
    .unwrap();
    cluster.start_node(1).await;
    let text = held_write(&cluster, 1).await;
    let peer = &cluster.names[0];
    assert!(
        text.contains("restore") && text.contains(&format!("waiting for {peer}")),
        "{text}"
    );
    cluster.start_node(0).await;
    cluster.wait_writes_open(1).await;
    let p = write(&cluster, 1, "app", "after", &mut acked).await;
    let new = ChunkName::parse(&p.chunk.unwrap()).unwrap();
    assert!(new.index > open.index, "{new} reuses a name up to {open}");
    cluster.wait_converged(&["app"]).await;
    for list in cluster.chunk_lists("app").await {
        crate::cluster::check_numbering("app", &list);
    }
    for i in 0..2 {
        assert_all_lines(&cluster, i, "app", &acked).await;
    }
}

/// Every copy of a wiped node's chunks was deleted (every consumer acked
/// them, no S3), but the consumer positions on its peers still name them:
/// the node must not use those names again, or the consumer would take its
/// new lines for lines it had acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_node_reuses_no_name_a_consumer_position_holds() {
    let mut cluster = TestCluster::start(2, &["--rotate-after", "1s"]).await;
    let first = cluster
        .client(1)
        .produce("app", "old line\n", &replicated(1))
        .await
        .unwrap();
    let reader = cluster.client(0);
    let opts = chunkbus_client::NextOptions {
        wait: Duration::from_secs(5),
        ..Default::default()
    };
    let batch = reader.next("app", "c", &opts).await.unwrap().unwrap();
    assert_eq!(&batch.data[..], b"old line\n");
    // Acked once the chunk is complete (rotation after 1 s): then every
    // node deletes its copy.
    let deadline = tokio::time::Instant::now() + crate::harness::CONDITION_DEADLINE;
    loop {
        let listed = cluster.chunk_lists("app").await;
        if listed.iter().all(|l| l.iter().all(|c| c.complete)) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{listed:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    reader
        .ack("app", "c", &batch.chunk, batch.next_offset)
        .await
        .unwrap();
    loop {
        let listed = cluster.chunk_lists("app").await;
        if listed.iter().all(|l| l.is_empty()) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{listed:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wipe(&mut cluster, 1).await;
    cluster.wait_writes_open(1).await;
    let p = cluster
        .client(1)
        .produce("app", "new line\n", &replicated(1))
        .await
        .unwrap();
    assert_ne!(p.chunk, first.chunk, "a chunk name was used twice");
    // Nor a line number: the peer remembers where n2's numbering stood.
    let listed = cluster.client(1).chunks("app").await.unwrap();
    let new = listed
        .iter()
        .find(|c| Some(&c.name) == p.chunk.as_ref())
        .unwrap();
    assert_eq!((new.first_line, new.lines), (Some(1), Some(1)), "{new:?}");
    let batch = reader.next("app", "c", &opts).await.unwrap();
    assert_eq!(
        batch.map(|b| b.data),
        Some(bytes::Bytes::from_static(b"new line\n"))
    );
}
