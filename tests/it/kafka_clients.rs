//! The Kafka listener against the Python clients most used with Kafka:
//! kafka-python (pure Python, idempotent by default) and confluent-kafka
//! (librdkafka), from the venv `scripts/test` makes in `target/pyvenv`
//! (the scripts they run are in `tests/kafka/`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncBufReadExt;

use crate::cluster::TestCluster;
use crate::harness::python;

/// Longest a producer script may take.
const PRODUCE_DEADLINE: Duration = Duration::from_secs(120);
/// Longest the group may take to read everything.
const CONSUME_DEADLINE: Duration = Duration::from_secs(120);

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/kafka")
        .join(name)
}

/// Produces `count` lines `{prefix}-{i}` through `bootstrap` with
/// kafka-python's defaults (idempotent, acks=all); every one must be acked.
async fn produce(bootstrap: &str, topic: &str, prefix: &str, count: usize) {
    let out = tokio::time::timeout(
        PRODUCE_DEADLINE,
        tokio::process::Command::new(python())
            .arg(script("produce.py"))
            .args([
                "--bootstrap",
                bootstrap,
                "--topic",
                topic,
                "--prefix",
                prefix,
            ])
            .args(["--count", &count.to_string()])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the producer finished in time")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&format!("acked {count}")),
        "kafka-python producer: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A running group member (confluent-kafka) and what it printed.
struct Member {
    child: tokio::process::Child,
    said: Arc<Mutex<Vec<String>>>,
    out: PathBuf,
}

impl Member {
    fn start(bootstrap: &str, topic: &str, group: &str, out: PathBuf) -> Self {
        let mut child = tokio::process::Command::new(python())
            .arg(script("group_consume.py"))
            .args(["--bootstrap", bootstrap, "--topic", topic, "--group", group])
            .arg("--out")
            .arg(&out)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let said = Arc::new(Mutex::new(Vec::new()));
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let s = said.clone();
        tokio::spawn(async move {
            while let Ok(Some(l)) = lines.next_line().await {
                s.lock().unwrap().push(l);
            }
        });
        Self { child, said, out }
    }

    /// The partitions of its last assignment (empty before the first and
    /// after a revocation).
    fn assigned(&self) -> BTreeSet<i32> {
        let said = self.said.lock().unwrap();
        match said
            .iter()
            .rev()
            .find(|l| l.starts_with("assigned") || l.starts_with("revoked"))
        {
            Some(l) if l.starts_with("assigned ") => l["assigned ".len()..]
                .split(',')
                .filter(|p| !p.is_empty())
                .map(|p| p.parse().unwrap())
                .collect(),
            _ => BTreeSet::new(),
        }
    }

    /// (partition, offset, value) of every message it wrote down.
    fn seen(&self) -> Vec<(i32, u64, String)> {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut f = l.splitn(3, ' ');
                Some((
                    f.next()?.parse().ok()?,
                    f.next()?.parse().ok()?,
                    f.next()?.to_owned(),
                ))
            })
            .collect()
    }

    fn said(&self) -> String {
        self.said.lock().unwrap().join("\n")
    }
}

/// Waits until `done` holds, polling every 100 ms, for at most `deadline`.
async fn wait_for(deadline: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + deadline;
    while !done() {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_group_splits_the_partitions_and_takes_over_a_dead_members() {
    let cluster = TestCluster::start(3, &["--kafka-listen", "127.0.0.1:0"]).await;
    let dir = tempfile::tempdir().unwrap();
    let (topic, group) = ("orders", "billing");
    // Lines before the group exists, through node 1 (idempotent producer:
    // each partition's batches go to their owners).
    produce(&cluster.kafka_addr(0), topic, "before", 3_000).await;
    // Two members, each bootstrapped through a different node.
    let a = Member::start(&cluster.kafka_addr(0), topic, group, dir.path().join("a"));
    let mut b = Member::start(&cluster.kafka_addr(2), topic, group, dir.path().join("b"));
    wait_for(
        Duration::from_secs(60),
        "both members to share the partitions",
        || {
            let (pa, pb) = (a.assigned(), b.assigned());
            !pa.is_empty() && !pb.is_empty() && pa.is_disjoint(&pb) && pa.len() + pb.len() == 3
        },
    )
    .await;
    let a_parts = a.assigned();
    // Both read; then `a` dies without a word, mid-stream.
    produce(&cluster.kafka_addr(1), topic, "during", 3_000).await;
    wait_for(
        Duration::from_secs(60),
        "a to read some of its partitions",
        || a.seen().len() > 500,
    )
    .await;
    let mut a = a;
    a.child.kill().await.unwrap();
    // `b` is given every partition once the coordinator drops `a` (after
    // its 6 s session timeout).
    wait_for(
        Duration::from_secs(60),
        "b to take over a's partitions",
        || b.assigned().len() == 3,
    )
    .await;
    produce(&cluster.kafka_addr(2), topic, "after", 3_000).await;
    let want: BTreeSet<String> = ["before", "during", "after"]
        .iter()
        .flat_map(|p| (0..3_000).map(move |i| format!("{p}-{i}")))
        .collect();
    let seen_all = || {
        let mut all: Vec<(i32, u64, String)> = a.seen();
        all.extend(b.seen());
        all
    };
    wait_for(CONSUME_DEADLINE, "the group to read every line", || {
        let got: BTreeSet<String> = seen_all().into_iter().map(|(_, _, v)| v).collect();
        want.is_subset(&got)
    })
    .await;
    // Each line once, but for what `a` read after its last commit (at most
    // one batch of 100 per partition it held) and `b` read again.
    let mut times: BTreeMap<String, usize> = BTreeMap::new();
    for (_, _, v) in seen_all() {
        *times.entry(v).or_default() += 1;
    }
    let twice = times.values().filter(|&&n| n > 1).count();
    assert!(times.values().all(|&n| n <= 2), "a line read three times");
    assert!(
        twice <= 100 * a_parts.len(),
        "{twice} lines read twice; a held {a_parts:?}; a said:\n{}\nb said:\n{}",
        a.said(),
        b.said()
    );
    assert_eq!(times.len(), want.len(), "lines that were never produced");
    // Offsets are line numbers: per partition, each offset names one line.
    let mut by_offset: BTreeMap<(i32, u64), String> = BTreeMap::new();
    for (p, o, v) in seen_all() {
        let prev = by_offset.insert((p, o), v.clone());
        assert!(
            prev.is_none_or(|x| x == v),
            "offset {o} of {p} named two lines"
        );
    }
    // The group's commits are a chunkbus consumer, on every node, and it
    // has read everything.
    for i in 0..3 {
        let client = cluster.client(i);
        let end = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let consumers = client.consumers(topic).await.unwrap();
            if consumers
                .iter()
                .any(|c| c.name == group && c.lag_bytes == 0)
            {
                break;
            }
            assert!(tokio::time::Instant::now() < end, "node {i}: {consumers:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    b.child.kill().await.unwrap();
}

/// The node (index into `names`) that coordinates `group`: as the nodes
/// choose it when all are up (rendezvous hashing of name and group).
fn coordinator_of(group: &str, names: &[&str]) -> usize {
    let score = |name: &str| crc32c::crc32c(format!("{name}\0{group}").as_bytes());
    (0..names.len()).max_by_key(|&i| score(names[i])).unwrap()
}

/// The lines in a file, one per line.
fn lines_of(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_under_kafka_producers_and_consumers_loses_no_acknowledged_line() {
    let mut cluster = TestCluster::start(3, &["--kafka-listen", "127.0.0.1:0"]).await;
    let dir = tempfile::tempdir().unwrap();
    let topic = "metrics";
    // The node that dies owns partition 0 and coordinates the group.
    let group = (0..)
        .map(|i| format!("dashboards-{i}"))
        .find(|g| coordinator_of(g, &["n1", "n2", "n3"]) == 0)
        .unwrap();
    let all = (0..3)
        .map(|i| cluster.kafka_addr(i))
        .collect::<Vec<_>>()
        .join(",");
    let member = Member::start(&all, topic, &group, dir.path().join("seen"));
    let (acked, stop) = (dir.path().join("acked"), dir.path().join("stop"));
    let producer = tokio::process::Command::new(python())
        .arg(script("produce_steady.py"))
        .args(["--bootstrap", &all, "--topic", topic, "--prefix", "m"])
        .arg("--acked")
        .arg(&acked)
        .arg("--stop")
        .arg(&stop)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(60), "lines acked and read", || {
        lines_of(&acked).len() >= 2_000 && member.seen().len() >= 1_000
    })
    .await;
    cluster.kill(0).await;
    let at_kill = lines_of(&acked).len();
    // The producer goes on with the partitions whose owners live.
    wait_for(Duration::from_secs(60), "the producer to go on", || {
        lines_of(&acked).len() >= at_kill + 4_000
    })
    .await;
    std::fs::write(&stop, b"").unwrap();
    let out = tokio::time::timeout(PRODUCE_DEADLINE, producer.wait_with_output())
        .await
        .expect("the producer stopped in time")
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("done sent"),
        "{said}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Records stay unacknowledged only if they were bound for the dead
    // owner before the producer learned it had no leader any more.
    let counts: Vec<usize> = said
        .split_whitespace()
        .skip_while(|w| *w != "sent")
        .filter_map(|w| w.parse().ok())
        .collect();
    let [sent, acked_n] = counts[..] else {
        panic!("{said}")
    };
    assert!(sent - acked_n <= 1_000, "{said}");
    // Every acknowledged line is read, the dead owner's too (from the
    // copies on the nodes left), by the member, which found a new
    // coordinator.
    let acked: BTreeSet<String> = lines_of(&acked).into_iter().collect();
    let mut missing = usize::MAX;
    let end = tokio::time::Instant::now() + CONSUME_DEADLINE;
    while missing > 0 {
        let seen: BTreeSet<String> = member.seen().into_iter().map(|(_, _, v)| v).collect();
        missing = acked.difference(&seen).count();
        assert!(
            tokio::time::Instant::now() < end,
            "{missing} of {} acknowledged lines never read; producer: {said}; member:\n{}",
            acked.len(),
            member.said()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut member = member;
    member.child.kill().await.unwrap();
}
