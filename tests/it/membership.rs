//! Membership through the bucket (S3 on, no `--peers`): real processes
//! against the test S3 server find each other, copy each other's chunks,
//! pick up a node that joins and a node that comes back at another address.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use chunkbus_client::{Client, ProduceOptions};

use crate::harness::{BinNode, CONDITION_DEADLINE, all_lines, chunk_files, eventually};
use crate::s3_server::TestS3;
use crate::tiering::{s3_command, serve_until_exit};

const ARGS: &[&str] = &["--max-chunk-bytes", "16KiB", "--rotate-after", "300ms"];

async fn node(s3: &TestS3, name: &str, dir: &Path) -> (BinNode, Client) {
    let node = BinNode::spawn(s3_command(s3, name, dir, ARGS)).await;
    let client = Client::new(&node.url("")).unwrap();
    (node, client)
}

/// Posts `n` lines tagged `tag` to category `m` through `client`, one
/// request each; returns them.
async fn produce(client: &Client, tag: &str, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..n {
        let line = format!(
            "{{\"from\":\"{tag}\",\"n\":{i},\"pad\":\"{}\"}}",
            "y".repeat(i % 61)
        );
        client
            .produce("m", format!("{line}\n"), &ProduceOptions::default())
            .await
            .unwrap();
        out.push(line);
    }
    out
}

/// Waits until the node behind `client` serves every line of `want`.
async fn serves_all(client: &Client, name: &str, want: &BTreeSet<String>) {
    eventually(
        CONDITION_DEADLINE,
        &format!("{name} serves every acknowledged line"),
        || async {
            let have: BTreeSet<String> = all_lines(client, "m").await.into_iter().collect();
            want.is_subset(&have).then_some(())
        },
    )
    .await;
}

/// Waits until the node behind `client` lists exactly `peers` as connected.
async fn sees(client: &Client, name: &str, peers: &[&str]) {
    let want: BTreeSet<String> = peers.iter().map(|p| p.to_string()).collect();
    eventually(
        CONDITION_DEADLINE,
        &format!("{name} connected to {peers:?}"),
        || async {
            let st = client.status().await.ok()?;
            let connected: BTreeSet<String> = st
                .peers
                .iter()
                .filter(|p| p.connected)
                .map(|p| p.name.clone())
                .collect();
            (connected == want).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_find_each_other_through_the_bucket_and_a_node_joins_while_writes_go_on() {
    let s3 = TestS3::start().await;
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    // Started one after the other: each finds those before it in the
    // bucket, and is found by them without a restart.
    let (n1, c1) = node(&s3, "n1", dirs[0].path()).await;
    let (n2, c2) = node(&s3, "n2", dirs[1].path()).await;
    let (_n3, c3) = node(&s3, "n3", dirs[2].path()).await;
    sees(&c1, "n1", &["n2", "n3"]).await;
    sees(&c2, "n2", &["n1", "n3"]).await;
    sees(&c3, "n3", &["n1", "n2"]).await;

    let mut acked = BTreeSet::new();
    for (c, tag) in [(&c1, "n1"), (&c2, "n2"), (&c3, "n3")] {
        acked.extend(produce(c, tag, 150).await);
    }
    for (c, name) in [(&c1, "n1"), (&c2, "n2"), (&c3, "n3")] {
        serves_all(c, name, &acked).await;
    }

    // A fourth node joins while n1 takes writes.
    let written = Arc::new(Mutex::new(Vec::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = {
        let (c1, written, stop) = (c1.clone(), written.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.is_cancelled() {
                let line = format!("{{\"during\":{i}}}");
                c1.produce("m", format!("{line}\n"), &ProduceOptions::default())
                    .await
                    .unwrap();
                written.lock().unwrap().push(line);
                i += 1;
            }
        })
    };
    let (_n4, c4) = node(&s3, "n4", dirs[3].path()).await;
    sees(&c4, "n4", &["n1", "n2", "n3"]).await;
    sees(&c1, "n1", &["n2", "n3", "n4"]).await;
    sees(&c2, "n2", &["n1", "n3", "n4"]).await;
    sees(&c3, "n3", &["n1", "n2", "n4"]).await;
    acked.extend(produce(&c4, "n4", 150).await);
    stop.cancel();
    writer.await.unwrap();
    acked.extend(written.lock().unwrap().drain(..));
    for (c, name) in [(&c1, "n1"), (&c2, "n2"), (&c3, "n3"), (&c4, "n4")] {
        serves_all(c, name, &acked).await;
    }
    // n4's chunks are copied onto the others' disks, not only served.
    let on_n1 = chunk_files(&dirs[0].path().join("m"));
    assert!(
        on_n1.iter().any(|(name, _)| name.starts_with("n4-chunk")),
        "{:?}",
        on_n1.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );

    // n2 is killed and comes back on another port: the others follow its
    // record to the new address and copy what it takes from then on.
    let old = n2.addr;
    n2.kill().await;
    let (n2, c2) = node(&s3, "n2", dirs[1].path()).await;
    assert_ne!(n2.addr, old);
    let after = produce(&c2, "n2-again", 50).await;
    acked.extend(after);
    for (c, name) in [(&c1, "n1"), (&c3, "n3"), (&c4, "n4")] {
        serves_all(c, name, &acked).await;
    }
    let st = c1.status().await.unwrap();
    let p = st.peers.iter().find(|p| p.name == "n2").unwrap();
    assert_eq!(p.address, n2.addr.to_string());
    // Numbers in the order the names first started, kept across restarts.
    assert_eq!((st.membership.as_str(), st.number), ("bucket", Some(0)));
    assert_eq!(c2.status().await.unwrap().number, Some(1));
    assert_eq!(c4.status().await.unwrap().number, Some(3));

    // A node started with --peers against the same bucket is refused: a
    // cluster finds its nodes one way. Nothing of it is written there.
    let other = tempfile::tempdir().unwrap();
    let peers = format!("n1={}", n1.addr);
    let (ok, stderr) =
        serve_until_exit(&s3, "n9", other.path(), &["--peers", peers.as_str()]).await;
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("must find each other the same way"),
        "{stderr}"
    );
    assert!(s3.get("_cluster/nodes/n9.json").await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_its_disk_asks_the_peers_the_bucket_names_and_reuses_no_name() {
    let s3 = TestS3::start().await;
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // n1's chunk stays open: its lines are only in n1's file and n2's copy.
    let open = ["--rotate-after", "1h"];
    let n1 = BinNode::spawn(s3_command(&s3, "n1", d1.path(), &open)).await;
    let c1 = Client::new(&n1.url("")).unwrap();
    let (_n2, c2) = node(&s3, "n2", d2.path()).await;
    sees(&c1, "n1", &["n2"]).await;
    let mut acked: BTreeSet<String> = produce(&c1, "n1", 100).await.into_iter().collect();
    serves_all(&c2, "n2", &acked).await;
    let before = c2.chunks("m").await.unwrap();
    assert!(
        before
            .iter()
            .any(|c| c.name.starts_with("n1-") && !c.complete)
    );

    // Its disk is lost: a new data directory under the same name. The
    // bucket says who its peers are; it asks n2, restores its chunk, and
    // writes on under a new name.
    n1.kill().await;
    drop(d1);
    let d1 = tempfile::tempdir().unwrap();
    let n1 = BinNode::spawn(s3_command(&s3, "n1", d1.path(), &open)).await;
    let c1 = Client::new(&n1.url("")).unwrap();
    acked.extend(produce(&c1, "n1-again", 100).await);
    serves_all(&c1, "n1", &acked).await;
    serves_all(&c2, "n2", &acked).await;
    let st = c2.status().await.unwrap();
    assert!(
        st.peers.iter().all(|p| p.disagreeing_chunks.is_empty()),
        "{:?}",
        st.peers
    );
    let after = c1.chunks("m").await.unwrap();
    let mine: Vec<_> = after.iter().filter(|c| c.name.starts_with("n1-")).collect();
    assert!(mine.len() >= 2, "{mine:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_forgotten_through_the_bucket_is_not_waited_for_by_a_node_that_lost_its_disk() {
    let s3 = TestS3::start().await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (_n1, c1) = node(&s3, "n1", dirs[0].path()).await;
    let (n2, c2) = node(&s3, "n2", dirs[1].path()).await;
    let (n3, _c3) = node(&s3, "n3", dirs[2].path()).await;
    sees(&c1, "n1", &["n2", "n3"]).await;
    let mut acked: BTreeSet<String> = produce(&c2, "n2", 50).await.into_iter().collect();
    serves_all(&c1, "n1", &acked).await;

    // n3 is gone for good: forgotten once, through n1. The bucket keeps it.
    n3.kill().await;
    let report = c1.forget_node("n3").await.unwrap();
    assert_eq!(report.bucket.as_deref(), Some("recorded"), "{report:?}");

    // n2 loses its disk. Its new data directory knows nothing of the
    // forget, and n3 never answers: the bucket tells it n3 is forgotten,
    // so it takes writes once n1 has answered.
    n2.kill().await;
    std::fs::remove_dir_all(dirs[1].path()).unwrap();
    let (_n2, c2) = node(&s3, "n2", dirs[1].path()).await;
    eventually(CONDITION_DEADLINE, "n2 takes writes", || async {
        let st = c2.status().await.ok()?;
        st.writes_held.is_empty().then_some(st)
    })
    .await;
    acked.extend(produce(&c2, "n2-again", 50).await);
    serves_all(&c2, "n2", &acked).await;
    serves_all(&c1, "n1", &acked).await;
    let st = c2.status().await.unwrap();
    assert!(
        st.peers.iter().any(|p| p.name == "n3" && p.forgotten),
        "{:?}",
        st.peers
    );

    // n3 comes back as a new process: the mark no longer names it.
    let (_n3, _c3) = node(&s3, "n3", dirs[2].path()).await;
    eventually(CONDITION_DEADLINE, "n3 no longer forgotten", || async {
        let st = c1.status().await.ok()?;
        st.peers
            .iter()
            .any(|p| p.name == "n3" && p.connected && !p.forgotten)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tokens_a_node_the_bucket_gives_peers_needs_the_cluster_secret() {
    let s3 = TestS3::start().await;
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let tokens = d1.path().join("tokens.toml");
    crate::security::write_tokens_file(&tokens, "ops", "s3cret-token-value", &["admin"]);
    let with_tokens = ["--tokens-file", tokens.to_str().unwrap()];
    // Alone in the bucket, tokens without a cluster secret are fine.
    let _n1 = BinNode::spawn(s3_command(&s3, "n1", d1.path(), &with_tokens)).await;
    // The second node would have a peer it cannot reach: refused, and its
    // name released at once (its record marked stopped).
    let (ok, stderr) = serve_until_exit(&s3, "n2", d2.path(), &with_tokens).await;
    assert!(!ok, "{stderr}");
    assert!(stderr.contains("--cluster-secret-file"), "{stderr}");
    let record = s3.get("_cluster/nodes/n2.json").await.expect("n2's record");
    let record: serde_json::Value = serde_json::from_slice(&record).unwrap();
    assert_eq!(record["stopped"], true, "{record}");
}
