//! `--replicas k`: real processes and the test S3 server. Each chunk lives
//! on the disks of its k holders (checked on disk), every node lists and
//! serves every chunk, a killed holder is replaced, and a node that joins
//! through the bucket takes its share.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chunkbus_client::{Client, NodeStatus, ProduceOptions};

use crate::cluster::{CONVERGE_DEADLINE, TestCluster};
use crate::harness::{BinNode, CONDITION_DEADLINE, all_lines, chunk_files, eventually};
use crate::s3_server::TestS3;
use crate::tiering::{consume_all, s3_command};

const CATEGORIES: [&str; 4] = ["app", "web", "db", "audit"];

/// A cluster of `n` nodes on the test S3 server with `flags`.
async fn cluster(s3: &TestS3, n: usize, flags: &[&str]) -> TestCluster {
    let env = s3
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    TestCluster::start_with(n, flags, vec![s3.args(); n], env).await
}

/// Posts `n` lines tagged `tag` to `category`, a few per request; returns
/// them.
async fn produce(client: &Client, category: &str, tag: &str, n: usize) -> Vec<String> {
    produce_with(client, category, tag, n, &ProduceOptions::default()).await
}

/// Like [`produce`], with `opts`.
async fn produce_with(
    client: &Client,
    category: &str,
    tag: &str,
    n: usize,
    opts: &ProduceOptions,
) -> Vec<String> {
    let lines: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "{{\"from\":\"{tag}\",\"n\":{i},\"pad\":\"{}\"}}",
                "r".repeat(i % 97)
            )
        })
        .collect();
    for batch in lines.chunks(5) {
        let body: String = batch.iter().map(|l| format!("{l}\n")).collect();
        client.produce(category, body, opts).await.unwrap();
    }
    lines
}

/// The chunk files of `category` on each node's disk.
fn disks(cluster: &TestCluster, category: &str) -> Vec<BTreeMap<String, Vec<u8>>> {
    disks_in(&cluster.dirs, category)
}

/// The chunk files of `category` in each data directory of `dirs`.
fn disks_in(dirs: &[std::path::PathBuf], category: &str) -> Vec<BTreeMap<String, Vec<u8>>> {
    dirs.iter()
        .map(|d| chunk_files(&d.join(category)).into_iter().collect())
        .collect()
}

/// True when node `i` holds every one of n1's chunks of `category` on its
/// disk, byte for byte as n1 has them.
fn holds_n1_whole(dirs: &[std::path::PathBuf], category: &str, i: usize) -> bool {
    let d = disks_in(dirs, category);
    let of_n1 = |j: usize| -> BTreeMap<&String, &Vec<u8>> {
        d[j].iter().filter(|(k, _)| k.starts_with("n1-")).collect()
    };
    !of_n1(0).is_empty() && of_n1(0) == of_n1(i)
}

/// Waits until n1's chunks of `app` are complete, node `i` holds them
/// whole and n1 counts no chunk with too few copies.
async fn wait_holds_n1(dirs: &[std::path::PathBuf], n1: &Client, i: usize, what: &str) {
    eventually(CONVERGE_DEADLINE, what, || async {
        let complete = n1.chunks("app").await.ok()?.iter().all(|c| c.complete);
        let counted = n1.status().await.ok()?.under_replicated_chunks == 0;
        (complete && counted && holds_n1_whole(dirs, "app", i)).then_some(())
    })
    .await;
}

/// Every line node `client` serves of `category`.
async fn lines_on(client: &Client, category: &str) -> BTreeSet<String> {
    all_lines(client, category).await.into_iter().collect()
}

/// Three nodes without S3, `--replicas 2`, a peer lost after 2 s; n1 has
/// written 150 lines to `app` and the other holder of the pair copied them.
struct N1Copied {
    cluster: TestCluster,
    owner: Client,
    acked: BTreeSet<String>,
    /// The other holder of (app, n1), and the node that does not hold it.
    holder: usize,
    other: usize,
    dirs: Vec<std::path::PathBuf>,
}

async fn three_nodes_with_n1_copied() -> N1Copied {
    let cluster = TestCluster::start(
        3,
        &[
            "--replicas",
            "2",
            "--max-chunk-bytes",
            "4KiB",
            "--rotate-after",
            "300ms",
            "--owner-lost-after",
            "2s",
        ],
    )
    .await;
    let owner = cluster.client(0);
    let acked = produce(&owner, "app", "before", 150)
        .await
        .into_iter()
        .collect();
    let holders = holders_in(&owner.status().await.unwrap(), "app", "n1").unwrap();
    let holder = cluster.names.iter().position(|n| *n == holders[1]).unwrap();
    let dirs = cluster.dirs.clone();
    wait_holds_n1(&dirs, &owner, holder, "the holder holds n1's chunks").await;
    N1Copied {
        cluster,
        owner,
        acked,
        holder,
        other: 3 - holder,
        dirs,
    }
}

/// The holders node `status` names for `owner`'s chunks of `category`.
fn holders_in(status: &NodeStatus, category: &str, owner: &str) -> Option<Vec<String>> {
    status
        .holders
        .iter()
        .find(|h| h.category == category && h.owner == owner)
        .map(|h| h.nodes.clone())
}

/// Waits until every running node's chunks are complete and uploaded, and
/// no node counts a chunk with too few copies.
async fn settled(cluster: &TestCluster, categories: &[&str]) {
    let running: Vec<Client> = (0..cluster.names.len())
        .filter(|&i| cluster.nodes[i].is_some())
        .map(|i| cluster.client(i))
        .collect();
    settled_on(&running, categories).await;
}

/// [`settled`] for the nodes behind `clients`.
async fn settled_on(clients: &[Client], categories: &[&str]) {
    eventually(
        CONVERGE_DEADLINE,
        "every chunk complete and uploaded",
        || async {
            for c in clients {
                for cat in categories {
                    let chunks = c.chunks(cat).await.ok()?;
                    if chunks.is_empty() || chunks.iter().any(|ch| !ch.complete || !ch.uploaded) {
                        return None;
                    }
                }
                let st = c.status().await.ok()?;
                if st.s3.as_ref()?.backlog_chunks > 0 || st.under_replicated_chunks > 0 {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_with_two_replicas_keep_each_chunk_on_two_disks_and_serve_all_of_it_everywhere()
{
    let s3 = TestS3::start().await;
    let cluster = cluster(
        &s3,
        5,
        &[
            "--replicas",
            "2",
            "--max-chunk-bytes",
            "8KiB",
            "--rotate-after",
            "500ms",
        ],
    )
    .await;
    assert_eq!(cluster.client(0).status().await.unwrap().replicas, "2");

    // A long poll on a node that does not hold the pair, on the open chunk
    // of its owner: woken by the owner's next write, served by a holder.
    cluster
        .client(0)
        .produce("app", "first\n", &ProduceOptions::default())
        .await
        .unwrap();
    let st = cluster.client(0).status().await.unwrap();
    let app_holders = holders_in(&st, "app", "n1").unwrap();
    assert_eq!(app_holders.len(), 2, "{app_holders:?}");
    assert_eq!(app_holders[0], "n1");
    let outsider = (0..5)
        .find(|&i| !app_holders.contains(&cluster.names[i]))
        .unwrap();
    let first = eventually(
        CONDITION_DEADLINE,
        "the outsider lists n1's chunk",
        || async {
            let list = cluster.client(outsider).chunks("app").await.ok()?;
            list.into_iter()
                .find(|c| c.name.starts_with("n1-") && c.size == 6)
        },
    )
    .await;
    assert!(!first.local, "{first:?}");
    // A node answers another only from its own disk (or S3), so reads
    // never go round in circles: the outsider does not hold that range.
    let held = |i: usize| {
        format!(
            "{}/v1/internal/held/app/{}?offset=0&len=6",
            cluster.url(i),
            first.name
        )
    };
    let asked = reqwest::get(held(outsider)).await.unwrap();
    assert_eq!(asked.status(), reqwest::StatusCode::NOT_FOUND);
    let asked = reqwest::get(held(0)).await.unwrap();
    assert_eq!(asked.status(), reqwest::StatusCode::OK);
    assert_eq!(&asked.bytes().await.unwrap()[..], b"first\n");
    let waiting = {
        let (c, name) = (cluster.client(outsider), first.name.clone());
        tokio::spawn(async move {
            c.read_chunk_wait("app", &name, 6, 1 << 20, Duration::from_secs(20))
                .await
                .unwrap()
        })
    };
    // Waiting on the outsider before the write.
    crate::harness::wait_for_metric_at(
        &reqwest::Client::new(),
        &cluster.url(outsider),
        "chunkbus_read_waiters 1",
    )
    .await;
    cluster
        .client(0)
        .produce("app", "second\n", &ProduceOptions::default())
        .await
        .unwrap();
    let woken = waiting.await.unwrap();
    assert_eq!(&woken.data[..], b"second\n");

    // Ingest on every node, into every category, each write acknowledged
    // once the other holder has it (without, a holder that falls behind
    // the upload reads the chunk from S3 rather than copy it).
    let copied = ProduceOptions {
        min_replicas: Some(1),
        ..Default::default()
    };
    let mut acked: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    acked
        .entry("app")
        .or_default()
        .extend(["first".into(), "second".into()]);
    for (i, name) in cluster.names.iter().enumerate() {
        for cat in CATEGORIES {
            let lines = produce_with(&cluster.client(i), cat, name, 120, &copied).await;
            acked.entry(cat).or_default().extend(lines);
        }
    }
    settled(&cluster, &CATEGORIES).await;
    let keys: BTreeSet<String> = s3.keys().await.into_iter().collect();
    let st = cluster.client(2).status().await.unwrap();
    assert_eq!(st.under_replicated_chunks, 0);
    for h in &st.holders {
        let own = h.owner == "n3";
        assert_eq!(h.under_replicated_chunks, own.then_some(0), "{h:?}");
    }
    for cat in CATEGORIES {
        let listed = cluster.client(0).chunks(cat).await.unwrap();
        let on_disk = disks(&cluster, cat);
        let mut per_node = vec![0usize; 5];
        for chunk in &listed {
            let owner = chunk.name.split('-').next().unwrap();
            let want: BTreeSet<usize> = holders_in(&st, cat, owner)
                .unwrap()
                .iter()
                .map(|h| cluster.names.iter().position(|n| n == h).unwrap())
                .collect();
            let have: BTreeSet<usize> = (0..5)
                .filter(|&i| on_disk[i].contains_key(&chunk.name))
                .collect();
            assert_eq!(
                have, want,
                "{cat}/{}: on the disks of {have:?}, held by {want:?}",
                chunk.name
            );
            for i in &have {
                per_node[*i] += 1;
            }
            assert!(
                keys.contains(&format!("{cat}/{}", chunk.name)),
                "{cat}/{} not in S3",
                chunk.name
            );
            // Byte-exact on every node.
            let bytes = &on_disk[*have.iter().next().unwrap()][&chunk.name];
            assert_eq!(bytes.len() as u64, chunk.size);
            for i in 0..5 {
                let read = cluster
                    .client(i)
                    .read_chunk(cat, &chunk.name, 0, 16 << 20)
                    .await
                    .unwrap();
                assert!(
                    read.data[..] == bytes[..],
                    "{cat}/{} read on n{}",
                    chunk.name,
                    i + 1
                );
            }
        }
        // Two copies of each of 5 owners' chunks over 5 nodes: no node
        // holds everything.
        let total: usize = listed.len();
        assert!(
            per_node.iter().all(|&n| n < total),
            "{cat}: {per_node:?} of {total}"
        );
        for i in 0..5 {
            assert_eq!(
                lines_on(&cluster.client(i), cat).await,
                acked[cat],
                "{cat} on n{}",
                i + 1
            );
        }
    }
    // Consumers on any node read everything.
    for (i, cat) in [(3usize, "web"), (4, "audit")] {
        let got: BTreeSet<String> = consume_all(&cluster.url(i), cat, "reader")
            .await
            .into_iter()
            .collect();
        assert_eq!(got, acked[cat], "a consumer of {cat} on n{}", i + 1);
    }
    // min_replicas above k-1 is refused before anything is stored.
    let err = cluster
        .client(0)
        .produce(
            "app",
            "x\n",
            &ProduceOptions {
                min_replicas: Some(2),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("--replicas"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_holder_is_replaced_and_drops_nothing_until_its_place_is_back() {
    let s3 = TestS3::start().await;
    let mut cluster = cluster(
        &s3,
        4,
        &[
            "--replicas",
            "2",
            "--max-chunk-bytes",
            "4KiB",
            "--rotate-after",
            "300ms",
            "--owner-lost-after",
            "2s",
        ],
    )
    .await;
    // Nothing reaches S3 for now: the copies are all there is.
    s3.freeze(true);
    let owner = cluster.client(0);
    let mut acked: BTreeSet<String> = produce(&owner, "app", "before", 200)
        .await
        .into_iter()
        .collect();
    let holders = holders_in(&owner.status().await.unwrap(), "app", "n1").unwrap();
    let holder = cluster.names.iter().position(|n| *n == holders[1]).unwrap();
    // The holder copies every chunk, byte for byte.
    let dirs = cluster.dirs.clone();
    wait_holds_n1(&dirs, &owner, holder, "the holder holds n1's chunks").await;
    cluster.kill(holder).await;

    // Reads on every other node go on at once (from the owner).
    for i in (0..4).filter(|&i| i != holder) {
        let have = lines_on(&cluster.client(i), "app").await;
        assert_eq!(have, acked, "n{} while the holder is down", i + 1);
    }
    acked.extend(produce(&owner, "app", "during", 100).await);
    // Past --owner-lost-after the next node in the order holds the pair
    // and copies what is not in S3 until there are two copies again.
    let replacement = eventually(CONVERGE_DEADLINE, "a replacement holder", || async {
        let h = holders_in(&owner.status().await.ok()?, "app", "n1")?;
        (h[1] != cluster.names[holder])
            .then(|| cluster.names.iter().position(|n| *n == h[1]).unwrap())
    })
    .await;
    wait_holds_n1(
        &dirs,
        &owner,
        replacement,
        "the replacement holds n1's chunks",
    )
    .await;
    let metrics = crate::harness::metrics_text(&cluster.url(0)).await;
    assert!(
        metrics.contains("chunkbus_chunks_under_replicated 0"),
        "{metrics}"
    );

    // S3 back, the killed node back: it takes its place again, and the
    // replacement drops its copies once they are uploaded.
    s3.freeze(false);
    cluster.start_node(holder).await;
    cluster
        .wait_peer_connected(0, &cluster.names[holder], true)
        .await;
    eventually(
        CONVERGE_DEADLINE,
        "the replacement drops its uploaded copies",
        || async {
            let h = holders_in(&owner.status().await.ok()?, "app", "n1")?;
            let d = disks(&cluster, "app");
            let left = d[replacement]
                .keys()
                .filter(|k| k.starts_with("n1-"))
                .count();
            (h[1] == cluster.names[holder] && left == 0).then_some(())
        },
    )
    .await;
    assert!(!disks(&cluster, "app")[0].is_empty());
    settled(&cluster, &["app"]).await;
    for i in 0..4 {
        let have = lines_on(&cluster.client(i), "app").await;
        assert_eq!(have, acked, "n{} after the holder came back", i + 1);
    }
}

const JOIN_ARGS: &[&str] = &[
    "--replicas",
    "2",
    "--max-chunk-bytes",
    "8KiB",
    "--rotate-after",
    "300ms",
];

async fn bucket_node(s3: &TestS3, name: &str, dir: &Path) -> (BinNode, Client) {
    let node = BinNode::spawn(s3_command(s3, name, dir, JOIN_ARGS)).await;
    let client = Client::new(&node.url("")).unwrap();
    (node, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sixth_node_joins_through_the_bucket_under_writes_and_takes_its_share() {
    let s3 = TestS3::start().await;
    let dirs: Vec<_> = (0..6).map(|_| tempfile::tempdir().unwrap()).collect();
    let names: Vec<String> = (1..=6).map(|i| format!("n{i}")).collect();
    let mut nodes = Vec::new();
    for i in 0..5 {
        nodes.push(bucket_node(&s3, &names[i], dirs[i].path()).await);
    }
    let connected = |c: Client, n: usize| async move {
        eventually(
            CONDITION_DEADLINE,
            &format!("{n} peers connected"),
            || async {
                let st = c.status().await.ok()?;
                (st.peers.iter().filter(|p| p.connected).count() == n).then_some(())
            },
        )
        .await
    };
    for (_, c) in &nodes {
        connected(c.clone(), 4).await;
    }
    // n1 writes all along.
    let written = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = {
        let (c1, written, stop) = (nodes[0].1.clone(), written.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.is_cancelled() {
                let line = format!("{{\"during\":{i}}}");
                c1.produce("app", format!("{line}\n"), &ProduceOptions::default())
                    .await
                    .unwrap();
                written.lock().unwrap().insert(line);
                i += 1;
            }
        })
    };
    nodes.push(bucket_node(&s3, &names[5], dirs[5].path()).await);
    for (_, c) in &nodes {
        connected(c.clone(), 5).await;
    }
    // Every node writes to many categories (each write acknowledged once
    // the other holder has it): the newcomer holds its share of the pairs,
    // and its own chunks are copied by one other node.
    let copied = ProduceOptions {
        min_replicas: Some(1),
        ..Default::default()
    };
    let cats: Vec<String> = (0..12).map(|i| format!("c{i}")).collect();
    let mut acked: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (i, (_, c)) in nodes.iter().enumerate() {
        for cat in &cats {
            acked
                .entry(cat.clone())
                .or_default()
                .extend(produce_with(c, cat, &names[i], 30, &copied).await);
        }
    }
    stop.cancel();
    writer.await.unwrap();
    acked.insert("app".into(), written.lock().unwrap().clone());
    let all_cats: Vec<&str> = acked.keys().map(String::as_str).collect();
    let clients: Vec<Client> = nodes.iter().map(|(_, c)| c.clone()).collect();
    settled_on(&clients, &all_cats).await;
    let st = nodes[5].1.status().await.unwrap();
    let mut newcomer_holds = 0;
    for cat in &cats {
        let listed = nodes[0].1.chunks(cat).await.unwrap();
        let on_disk: Vec<BTreeMap<String, Vec<u8>>> = dirs
            .iter()
            .map(|d| chunk_files(&d.path().join(cat)).into_iter().collect())
            .collect();
        for chunk in &listed {
            let owner = chunk.name.split('-').next().unwrap();
            let want: BTreeSet<usize> = holders_in(&st, cat, owner)
                .unwrap()
                .iter()
                .map(|h| names.iter().position(|n| n == h).unwrap())
                .collect();
            // Written after every node saw the newcomer: on exactly its
            // holders' disks.
            let have: BTreeSet<usize> = (0..6)
                .filter(|&i| on_disk[i].contains_key(&chunk.name))
                .collect();
            assert_eq!(have, want, "{cat}/{}", chunk.name);
            if want.contains(&5) && owner != "n6" {
                newcomer_holds += 1;
            }
        }
        for (i, (_, c)) in nodes.iter().enumerate() {
            assert_eq!(lines_on(c, cat).await, acked[cat], "{cat} on {}", names[i]);
        }
    }
    assert!(
        newcomer_holds > 0,
        "the newcomer holds no other node's chunk"
    );
    for (i, (_, c)) in nodes.iter().enumerate() {
        assert_eq!(
            lines_on(c, "app").await,
            acked["app"],
            "app on {}",
            names[i]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_s3_a_replacement_drops_its_copies_once_the_holder_is_back() {
    let N1Copied {
        mut cluster,
        owner,
        mut acked,
        holder,
        other,
        dirs,
    } = three_nodes_with_n1_copied().await;
    assert!(
        disks_in(&dirs, "app")[other]
            .keys()
            .all(|k| !k.starts_with("n1-")),
        "the third node copied a pair it does not hold"
    );
    cluster.kill(holder).await;
    acked.extend(produce(&owner, "app", "during", 100).await);
    wait_holds_n1(&dirs, &owner, other, "the third node replaces the holder").await;
    // Back: the holder takes its place again and copies what it missed;
    // the replacement drops its copies once both holders hold them, and
    // still lists and serves them.
    cluster.start_node(holder).await;
    eventually(
        CONVERGE_DEADLINE,
        "the replacement's copies dropped",
        || async {
            let gone = disks_in(&dirs, "app")[other]
                .keys()
                .all(|k| !k.starts_with("n1-"));
            (gone && holds_n1_whole(&dirs, "app", holder)).then_some(())
        },
    )
    .await;
    for i in 0..3 {
        assert_eq!(
            lines_on(&cluster.client(i), "app").await,
            acked,
            "n{}",
            i + 1
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_owners_chunks_are_copied_from_their_holder_to_the_new_one() {
    let N1Copied {
        mut cluster,
        acked,
        holder,
        other,
        dirs,
        ..
    } = three_nodes_with_n1_copied().await;
    // The owner is gone: the two nodes left hold its pair, and the one
    // that did not copies from the one that did.
    cluster.kill(0).await;
    eventually(
        CONVERGE_DEADLINE,
        "a second copy of the lost owner's chunks",
        || async {
            let st = cluster.client(other).status().await.ok()?;
            let h = holders_in(&st, "app", "n1")?;
            (h.len() == 2 && holds_n1_whole(&dirs, "app", other)).then_some(())
        },
    )
    .await;
    for i in [holder, other] {
        assert_eq!(
            lines_on(&cluster.client(i), "app").await,
            acked,
            "n{}",
            i + 1
        );
    }
}
