//! The chaos soak: three real nodes with the test S3 server, writers with a
//! mix of `sync`, `min_replicas` and body encodings (lines holding NUL, CR
//! and TAB), a consumer that hops between nodes, and a nemesis that
//! SIGKILLs and restarts nodes, pauses them, cuts peer links one way or
//! both (a held link delivers its bytes late), freezes S3 (for a few
//! seconds, and in long runs every 150 s for longer than a new data
//! directory waits for it, wiping a node as it starts), and wipes a node's
//! disk, and forgets a killed node (`forget-node` on the others,
//! then it comes back, with its disk or wiped). Then everything is healed
//! and checked: every acknowledged line readable from every node exactly
//! once, every chunk byte-identical on every node and in S3, the consumer
//! saw every acknowledged line, no line that was never written (no partial
//! lines), no panic in any log.
//!
//! The suite runs it for `CHUNKBUS_CHAOS_SECONDS` (120 by default);
//! `scripts/chaos --minutes N` runs it longer, in release mode, and
//! `--membership bucket` (`CHUNKBUS_CHAOS_MEMBERSHIP=bucket`) with nodes
//! that find each other through the bucket instead of `--peers`, and
//! `--replicas 2` (`CHUNKBUS_CHAOS_REPLICAS=2`) with each chunk held by two
//! of the three nodes (the third reads it from them, or from S3).
//!
//! What a wipe may lose, by the durability contract: lines the wiped node
//! acknowledged without `min_replicas` that no peer had copied and S3 did
//! not hold yet. Those are excused (and counted); every other acknowledged
//! line must survive. So one disk is lost at a time: a wipe (plain, at an
//! S3 outage's start, or after a forget) waits until no node restores its
//! chunks from its peers (status `restoring_chunks`), and `WIPE_EVERY`
//! after that and after the last wipe. A due outage waits for that up to
//! `OUTAGE_WAITS_FOR_WIPE`, then starts without its wipe; a forget then
//! brings its node back with its disk.
//!
//! A forget freezes the forgotten node's open chunk where each copy stands
//! (the soak often keeps some replicas from copying first); when the node
//! comes back with its disk, the copies grow again, and the consumer must
//! still see every line.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chunkbus_client::{ChunkInfo, Client, NextOptions, ProduceOptions};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rustix::process::Signal;
use tokio::sync::RwLock;
use tokio_util::sync::CancellationToken;

use crate::cluster::TestCluster;
use crate::proxy::Cut;
use crate::s3_server::TestS3;

/// Nodes in the soak.
const NODES: usize = 3;
/// Categories written.
const CATEGORIES: [&str; 2] = ["app", "web.logs"];
/// The category the consumer reads.
const CONSUMED: &str = "app";
/// Longest one write may take before it counts as failed.
const WRITE_DEADLINE: Duration = Duration::from_secs(20);
/// How long the healed cluster may take to converge and upload.
const SETTLE_DEADLINE: Duration = Duration::from_secs(240);
/// Shortest time between two wipes (a wiped node restores from its peers),
/// counted from the end of the wiped node's restore: a second disk lost
/// while the first node restores may be the one it restores from, and two
/// disks lost before S3 holds their lines is beyond the contract.
const WIPE_EVERY: Duration = Duration::from_secs(25);
/// Shortest time between two forgets.
const FORGET_EVERY: Duration = Duration::from_secs(20);
/// Time between two S3 outages (the suite's 2-minute run has none).
const OUTAGE_EVERY: Duration = Duration::from_secs(150);
/// How long a due S3 outage waits for a wipe to be allowed before it
/// starts without one.
const OUTAGE_WAITS_FOR_WIPE: Duration = Duration::from_secs(60);
/// How long an S3 outage lasts, in seconds: longer than a node with a new
/// data directory waits for S3 before it takes writes, and than a restore
/// waits for S3 to say what it holds of the node's chunks.
const OUTAGE_SECONDS: std::ops::Range<u64> = 32..45;

/// An acknowledged line: which node took it, with which `min_replicas`, and
/// how many times that node had been wiped when it was sent.
#[derive(Debug, Clone, Copy)]
struct Ack {
    node: usize,
    min_replicas: u32,
    wipes: u64,
}

/// What the nemesis did.
#[derive(Debug, Default)]
struct Counts {
    kills: u64,
    pauses: u64,
    pause_and_kill: u64,
    one_way_cuts: u64,
    held_cuts: u64,
    both_way_cuts: u64,
    s3_freezes: u64,
    s3_outages: u64,
    outage_wipes: u64,
    wipes: u64,
    hot_wipes: u64,
    forgets: u64,
    forgets_behind: u64,
    forgets_wiped: u64,
    writes_ok: u64,
    writes_failed: u64,
    consumed_batches: u64,
}

struct Soak {
    cluster: RwLock<TestCluster>,
    s3: TestS3,
    /// Every line ever sent, by category (acknowledged or not).
    sent: Mutex<BTreeMap<&'static str, BTreeSet<String>>>,
    acked: Mutex<BTreeMap<String, (&'static str, Ack)>>,
    /// Times each node was wiped.
    wipes: [AtomicU64; NODES],
    /// Lines acknowledged by a node later wiped, without `min_replicas`.
    at_risk: Mutex<BTreeSet<String>>,
    consumed: Mutex<BTreeSet<String>>,
    counts: Mutex<Counts>,
}

impl Soak {
    /// A client of node `i` and its wipe count, when it runs.
    async fn node(&self, i: usize) -> Option<(Client, u64)> {
        let c = self.cluster.read().await;
        c.nodes[i]
            .as_ref()
            .map(|_| (c.client(i), self.wipes[i].load(Ordering::SeqCst)))
    }
}

/// The schedule's seed: `CHUNKBUS_CHAOS_SEED`, or a random one (printed, so
/// that a failing run's choices can be replayed; timing still varies).
fn chaos_seed() -> u64 {
    std::env::var("CHUNKBUS_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random())
}

/// A random source of its own for each task, derived from the seed.
fn task_rng(seed: u64, task: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed ^ task.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// `--replicas` of the soak's nodes: `CHUNKBUS_CHAOS_REPLICAS`, `all` by
/// default.
fn chaos_replicas() -> Option<u32> {
    std::env::var("CHUNKBUS_CHAOS_REPLICAS")
        .ok()
        .and_then(|s| s.parse().ok())
}

fn chaos_seconds() -> u64 {
    std::env::var("CHUNKBUS_CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_soak_loses_no_acknowledged_line() {
    let seconds = chaos_seconds();
    let seed = chaos_seed();
    let membership = std::env::var("CHUNKBUS_CHAOS_MEMBERSHIP").unwrap_or("peers".into());
    let replicas = chaos_replicas();
    eprintln!(
        "chaos: seed {seed} (CHUNKBUS_CHAOS_SEED), {seconds} s of faults, membership {membership} (CHUNKBUS_CHAOS_MEMBERSHIP), replicas {} (CHUNKBUS_CHAOS_REPLICAS)",
        replicas.map_or("all".to_owned(), |k| k.to_string())
    );
    let s3 = TestS3::start().await;
    let mut extra: Vec<String> = s3.args();
    extra.extend(
        [
            "--max-chunk-bytes",
            "64KiB",
            "--rotate-after",
            "3s",
            "--owner-lost-after",
            "1h",
        ]
        .map(String::from),
    );
    if let Some(k) = replicas {
        extra.extend(["--replicas".to_owned(), k.to_string()]);
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let env = s3
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .chain([(
            "RUST_LOG".to_owned(),
            // A replay can ask the nodes for more, e.g.
            // `CHUNKBUS_CHAOS_LOG=warn,chunkbus=debug`.
            std::env::var("CHUNKBUS_CHAOS_LOG").unwrap_or_else(|_| "warn".to_owned()),
        )])
        .collect();
    // `CHUNKBUS_CHAOS_MEMBERSHIP=bucket`: the nodes find each other through
    // the bucket instead of `--peers` (a cut link to a node is then every
    // peer's link to it).
    let cluster = if membership == "bucket" {
        TestCluster::start_through_bucket(NODES, &extra, env).await
    } else {
        TestCluster::start_with(NODES, &extra, vec![Vec::new(); NODES], env).await
    };
    let soak = Arc::new(Soak {
        cluster: RwLock::new(cluster),
        s3,
        sent: Mutex::default(),
        acked: Mutex::default(),
        wipes: Default::default(),
        at_risk: Mutex::default(),
        consumed: Mutex::default(),
        counts: Mutex::default(),
    });
    let stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..2 {
        tasks.spawn(writer(
            soak.clone(),
            w,
            task_rng(seed, w as u64),
            stop.clone(),
        ));
    }
    tasks.spawn(consumer(soak.clone(), task_rng(seed, 10), stop.clone()));
    nemesis(&soak, task_rng(seed, 11), Duration::from_secs(seconds)).await;
    stop.cancel();
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    heal(&soak).await;
    let excused = check(&soak, task_rng(seed, 12)).await;
    let c = soak.counts.lock().unwrap();
    let acked = soak.acked.lock().unwrap().len();
    eprintln!(
        "chaos: {seconds} s, membership {membership}, replicas {}, {} SIGKILLs, {} pauses ({} with a kill of another node), {} one-way cuts ({} held and delivered late), {} both-way cuts, {} S3 freezes, {} S3 outages ({} with a wipe at its start), {} wipes ({} with an open chunk not in S3), {} forgets ({} with copies held behind, {} then wiped); {} writes acknowledged ({acked} lines), {} failed; {} consumer batches; lost acknowledged lines: 0 (excused: {excused} acknowledged without min_replicas by a node, not yet copied when it was wiped)",
        replicas.map_or("all".to_owned(), |k| k.to_string()),
        c.kills + c.pause_and_kill,
        c.pauses + c.pause_and_kill,
        c.pause_and_kill,
        c.one_way_cuts,
        c.held_cuts,
        c.both_way_cuts,
        c.s3_freezes,
        c.s3_outages,
        c.outage_wipes,
        c.wipes,
        c.hot_wipes,
        c.forgets,
        c.forgets_behind,
        c.forgets_wiped,
        c.writes_ok,
        c.writes_failed,
        c.consumed_batches,
    );
}

/// One line's text: unique, sometimes holding NUL, CR or TAB (never CR
/// last, which would read as a line ending).
fn line(w: usize, seq: u64, l: usize, rng: &mut impl Rng) -> String {
    let odd = match rng.random_range(0..10) {
        0 => "nul\0byte",
        1 => "cr\rinside",
        2 => "tab\tseparated",
        _ => "plain",
    };
    let pad = "z".repeat(rng.random_range(0..200));
    format!("w{w}-{seq:07}-{l} {odd} {pad}")
}

async fn writer(soak: Arc<Soak>, w: usize, mut rng: rand::rngs::StdRng, stop: CancellationToken) {
    for seq in 0.. {
        if stop.is_cancelled() {
            return;
        }
        let i = rng.random_range(0..NODES);
        let Some((client, wipes)) = soak.node(i).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let category = *CATEGORIES.choose(&mut rng).unwrap();
        let lines: Vec<String> = (0..rng.random_range(1..6))
            .map(|l| line(w, seq, l, &mut rng))
            .collect();
        let mut body = String::new();
        for l in &lines {
            body.push_str(l);
            body.push('\n');
        }
        // At most the other holders of a chunk.
        let most = chaos_replicas().map_or(NODES as u32 - 1, |k| k - 1);
        let min_replicas = (*[0, 0, 1, 1, 2].choose(&mut rng).unwrap()).min(most);
        let opts = ProduceOptions {
            sync: *[Some(true), Some(false), None].choose(&mut rng).unwrap(),
            min_replicas: (min_replicas > 0).then_some(min_replicas),
            timeout: Some(Duration::from_secs(3)),
        };
        soak.sent
            .lock()
            .unwrap()
            .entry(category)
            .or_default()
            .extend(lines.iter().cloned());
        let (encoded, encoding) = encode(body.into_bytes(), rng.random_range(0..3));
        let sent = client.produce_encoded(category, encoded, encoding, &opts);
        let ok = matches!(tokio::time::timeout(WRITE_DEADLINE, sent).await, Ok(Ok(_)));
        let mut counts = soak.counts.lock().unwrap();
        if ok {
            counts.writes_ok += 1;
            let ack = Ack {
                node: i,
                min_replicas,
                wipes,
            };
            let mut acked = soak.acked.lock().unwrap();
            for l in lines {
                acked.insert(l, (category, ack));
            }
        } else {
            counts.writes_failed += 1;
        }
    }
}

/// The body as is, gzip or zstd.
fn encode(body: Vec<u8>, how: u8) -> (Bytes, Option<&'static str>) {
    match how {
        0 => (Bytes::from(body), None),
        1 => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&body).unwrap();
            (Bytes::from(e.finish().unwrap()), Some("gzip"))
        }
        _ => (
            Bytes::from(zstd::encode_all(&body[..], 1).unwrap()),
            Some("zstd"),
        ),
    }
}

/// Reads `CONSUMED` as consumer `chaos`, each batch through a random node.
async fn consumer(soak: Arc<Soak>, mut rng: rand::rngs::StdRng, stop: CancellationToken) {
    while !stop.is_cancelled() {
        consume_once(&soak, &mut rng).await;
    }
}

/// One batch: next, record, ack. Errors (a node down, paused, restarting)
/// just end the attempt.
async fn consume_once(soak: &Soak, rng: &mut impl Rng) -> bool {
    let i = rng.random_range(0..NODES);
    let Some((client, _)) = soak.node(i).await else {
        tokio::time::sleep(Duration::from_millis(20)).await;
        return false;
    };
    let opts = NextOptions {
        wait: Duration::from_millis(500),
        ..NextOptions::default()
    };
    let attempt = async {
        let Ok(Some(batch)) = client.next(CONSUMED, "chaos", &opts).await else {
            return false;
        };
        let text = String::from_utf8(batch.data.to_vec()).unwrap();
        soak.consumed
            .lock()
            .unwrap()
            .extend(text.lines().map(str::to_owned));
        soak.counts.lock().unwrap().consumed_batches += 1;
        client
            .ack(CONSUMED, "chaos", &batch.chunk, batch.next_offset)
            .await
            .is_ok()
    };
    tokio::time::timeout(WRITE_DEADLINE, attempt)
        .await
        .unwrap_or(false)
}

async fn nemesis(soak: &Soak, mut rng: rand::rngs::StdRng, run_for: Duration) {
    let end = tokio::time::Instant::now() + run_for;
    let mut disk_losses = DiskLosses::new();
    let mut last_forget = tokio::time::Instant::now();
    let mut last_outage = tokio::time::Instant::now();
    // While S3 is out: when it comes back.
    let mut outage_ends: Option<tokio::time::Instant> = None;
    let short = |rng: &mut rand::rngs::StdRng| Duration::from_millis(rng.random_range(300..2500));
    while tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..800))).await;
        let i = rng.random_range(0..NODES);
        let j = (i + rng.random_range(1..NODES)) % NODES;
        let now = tokio::time::Instant::now();
        if outage_ends.is_some_and(|t| now >= t) {
            soak.s3.freeze(false);
            outage_ends = None;
            last_outage = now;
        }
        // S3 out for longer than a wiped node waits for it: the node
        // restores from its peers alone (or, with bucket membership, waits
        // to learn who they are), and settles with S3 once it is back.
        // Other faults go on meanwhile.
        // It waits for a disk to be allowed to go (up to
        // `OUTAGE_WAITS_FOR_WIPE`), so that it starts with its wipe.
        if let (None, Some(overdue)) =
            (outage_ends, last_outage.elapsed().checked_sub(OUTAGE_EVERY))
        {
            let wiped = disk_losses.allowed(soak).await;
            if wiped || overdue >= OUTAGE_WAITS_FOR_WIPE {
                soak.s3.freeze(true);
                outage_ends = Some(now + Duration::from_secs(rng.random_range(OUTAGE_SECONDS)));
                if wiped {
                    wipe(soak, i).await;
                    disk_losses.lost();
                }
                let mut c = soak.counts.lock().unwrap();
                c.s3_outages += 1;
                c.outage_wipes += u64::from(wiped);
                continue;
            }
        }
        let out = outage_ends.is_some();
        match rng.random_range(0..100) {
            0..35 => {
                soak.cluster.write().await.kill(i).await;
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..1500))).await;
                soak.cluster.write().await.start_node(i).await;
                soak.counts.lock().unwrap().kills += 1;
            }
            35..47 => {
                soak.cluster.read().await.signal(i, Signal::STOP);
                tokio::time::sleep(short(&mut rng)).await;
                soak.cluster.read().await.signal(i, Signal::CONT);
                soak.counts.lock().unwrap().pauses += 1;
            }
            47..55 => {
                // The schedule that once lost lines: a replica paused across
                // its owner's restart.
                soak.cluster.read().await.signal(i, Signal::STOP);
                tokio::time::sleep(short(&mut rng)).await;
                soak.cluster.write().await.kill(j).await;
                soak.cluster.write().await.start_node(j).await;
                tokio::time::sleep(short(&mut rng)).await;
                soak.cluster.read().await.signal(i, Signal::CONT);
                soak.counts.lock().unwrap().pause_and_kill += 1;
            }
            55..70 => {
                let hold = rng.random_bool(0.5);
                let mode = if hold { Cut::Hold } else { Cut::Reset };
                soak.cluster.read().await.link(i, j).set_mode(mode);
                tokio::time::sleep(short(&mut rng)).await;
                soak.cluster.read().await.link(i, j).set_mode(Cut::Open);
                let mut c = soak.counts.lock().unwrap();
                c.one_way_cuts += 1;
                c.held_cuts += u64::from(hold);
            }
            70..80 => {
                soak.cluster.read().await.set_cut(i, true);
                tokio::time::sleep(short(&mut rng)).await;
                soak.cluster.read().await.set_cut(i, false);
                soak.counts.lock().unwrap().both_way_cuts += 1;
            }
            80..90 if !out => {
                soak.s3.freeze(true);
                tokio::time::sleep(Duration::from_millis(rng.random_range(500..4000))).await;
                soak.s3.freeze(false);
                soak.counts.lock().unwrap().s3_freezes += 1;
            }
            // A forget with bucket membership is a record in the bucket.
            90..96 if !out && last_forget.elapsed() >= FORGET_EVERY => {
                let may_wipe = disk_losses.allowed(soak).await;
                if forget(soak, i, may_wipe, &mut rng).await {
                    disk_losses.lost();
                }
                last_forget = tokio::time::Instant::now();
            }
            _ if disk_losses.allowed(soak).await => {
                wipe(soak, i).await;
                disk_losses.lost();
            }
            _ => {}
        }
    }
}

/// When a node's disk may be lost: `WIPE_EVERY` after the last wipe and
/// after the end of every restore from peers.
struct DiskLosses {
    /// The last wipe, or the last time a restore was seen ending.
    since: tokio::time::Instant,
    /// A node was restoring when last asked.
    restoring: bool,
}

impl DiskLosses {
    /// How often nodes are asked again while one restores.
    const RECHECK: Duration = Duration::from_secs(2);

    fn new() -> Self {
        Self {
            since: tokio::time::Instant::now(),
            restoring: false,
        }
    }

    /// A disk was lost now.
    fn lost(&mut self) {
        self.since = tokio::time::Instant::now();
    }

    /// True when a disk may be lost now. A node that does not answer its
    /// status counts as restoring.
    async fn allowed(&mut self, soak: &Soak) -> bool {
        if self.since.elapsed() < WIPE_EVERY {
            return false;
        }
        let mut restoring = false;
        for i in 0..NODES {
            let Some((client, _)) = soak.node(i).await else {
                continue;
            };
            let status = tokio::time::timeout(WRITE_DEADLINE, client.status()).await;
            if !matches!(status, Ok(Ok(ref st)) if st.restoring_chunks.is_none()) {
                restoring = true;
                break;
            }
        }
        let now = tokio::time::Instant::now();
        if restoring {
            // Asked again soon, so that the time counts from the end.
            self.since = now.checked_sub(WIPE_EVERY - Self::RECHECK).unwrap_or(now);
        } else if self.restoring {
            self.since = now;
        }
        let ended_long_ago = !restoring && !self.restoring;
        self.restoring = restoring;
        ended_long_ago
    }
}

/// Kills node `i`, removes its data directory and starts it again.
async fn wipe(soak: &Soak, i: usize) {
    let name = soak.cluster.read().await.names[i].clone();
    let hot = open_chunks(soak, i, &name)
        .await
        .iter()
        .any(|(_, _, size)| *size > 0);
    let mut cluster = soak.cluster.write().await;
    cluster.kill(i).await;
    remove_disk(soak, &cluster, i);
    cluster.start_node(i).await;
    let mut c = soak.counts.lock().unwrap();
    c.wipes += 1;
    c.hot_wipes += u64::from(hot);
}

/// Removes the data directory of node `i`, which is not running.
fn remove_disk(soak: &Soak, cluster: &TestCluster, i: usize) {
    // Everything the old process acknowledged is in `acked` now; those
    // without min_replicas may be lost with its disk.
    let old = soak.wipes[i].fetch_add(1, Ordering::SeqCst);
    {
        let acked = soak.acked.lock().unwrap();
        let mut at_risk = soak.at_risk.lock().unwrap();
        for (l, (_, a)) in acked.iter() {
            if a.node == i && a.min_replicas == 0 && a.wipes <= old {
                at_risk.insert(l.clone());
            }
        }
    }
    std::fs::remove_dir_all(&cluster.dirs[i]).unwrap();
}

/// The open chunks of `name` as node `i` (named so) lists them:
/// (category, chunk, size).
async fn open_chunks(soak: &Soak, i: usize, name: &str) -> Vec<(&'static str, String, u64)> {
    let client = soak.cluster.read().await.client(i);
    let mut out = Vec::new();
    for cat in CATEGORIES {
        if let Ok(list) = client.chunks(cat).await {
            out.extend(
                list.iter()
                    .filter(|c| c.owner == name && !c.complete)
                    .map(|c| (cat, c.name.clone(), c.size)),
            );
        }
    }
    out
}

/// Kills node `i` and forgets it on every other node (they complete its
/// open chunks where their copies stand and upload its chunks), then,
/// after a while, starts it again: with its disk (it was not really gone)
/// or, one time in three when `may_wipe`, wiped (its machine was
/// replaced); true when it was wiped. Most times
/// some of the others stop copying from it for a moment before it is
/// killed, so that their copies fall behind it (and differ in length).
async fn forget(soak: &Soak, i: usize, may_wipe: bool, rng: &mut rand::rngs::StdRng) -> bool {
    let others: Vec<usize> = (0..NODES).filter(|&j| j != i).collect();
    // Half the time every other node (the owner's open chunk then ends
    // with lines only it holds), else one of them or none.
    let behind: Vec<usize> = match rng.random_range(0..10) {
        0..5 => others.clone(),
        5..8 => vec![*others.choose(rng).unwrap()],
        _ => Vec::new(),
    };
    for &j in &behind {
        soak.cluster.read().await.link(j, i).set_mode(Cut::Reset);
    }
    if !behind.is_empty() {
        // Mostly shorter than a rotation (3 s), so that the copies of the
        // open chunk fall behind rather than miss the next chunk.
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..1000))).await;
    }
    let name = soak.cluster.read().await.names[i].clone();
    let before = open_chunks(soak, i, &name).await;
    soak.cluster.write().await.kill(i).await;
    for &j in &others {
        let client = soak.cluster.read().await.client(j);
        let asked = tokio::time::timeout(WRITE_DEADLINE, client.forget_node(&name)).await;
        assert!(
            matches!(asked, Ok(Ok(_))),
            "node {j} did not forget node {i}: {asked:?}"
        );
        soak.cluster.read().await.link(j, i).set_mode(Cut::Open);
    }
    // What the schedule made (in the soak's log): the forgotten node's
    // open chunks as it held them and as each other node completed them.
    let mut copies = Vec::new();
    for &j in &others {
        let client = soak.cluster.read().await.client(j);
        for (cat, chunk, _) in &before {
            let size = match client.chunks(cat).await {
                Ok(list) => list.iter().find(|c| c.name == *chunk).map(|c| c.size),
                Err(_) => None,
            };
            copies.push(format!("{chunk} of {cat} on node {j}: {size:?}"));
        }
    }
    eprintln!(
        "chaos: node {i} forgotten (copying from it held back on {behind:?}); its open chunks {before:?}; copies {copies:?}"
    );
    tokio::time::sleep(Duration::from_millis(rng.random_range(0..8000))).await;
    let wiped = rng.random_bool(1.0 / 3.0) && may_wipe;
    let mut cluster = soak.cluster.write().await;
    if wiped {
        remove_disk(soak, &cluster, i);
    }
    cluster.start_node(i).await;
    let mut c = soak.counts.lock().unwrap();
    c.forgets += 1;
    c.forgets_behind += u64::from(!behind.is_empty());
    c.forgets_wiped += u64::from(wiped);
    wiped
}

/// Every node running, every link open, S3 answering.
async fn heal(soak: &Soak) {
    soak.s3.freeze(false);
    let mut cluster = soak.cluster.write().await;
    for i in 0..NODES {
        if cluster.nodes[i].is_none() {
            cluster.start_node(i).await;
        } else {
            cluster.signal(i, Signal::CONT);
        }
        cluster.set_cut(i, false);
    }
    for i in 0..NODES {
        cluster.wait_writes_open(i).await;
    }
}

/// The bytes of a chunk as node `client` serves them.
async fn chunk_bytes(client: &Client, category: &str, chunk: &ChunkInfo) -> Vec<u8> {
    let mut out = Vec::new();
    while (out.len() as u64) < chunk.size {
        let r = client
            .read_chunk(category, &chunk.name, out.len() as u64, 16 << 20)
            .await
            .unwrap_or_else(|e| panic!("reading {} of {category}: {e}", chunk.name));
        assert!(!r.data.is_empty(), "{} ends early", chunk.name);
        out.extend_from_slice(&r.data);
    }
    out
}

/// Checks everything once healed; returns how many acknowledged lines are
/// missing with an excuse (see the module's documentation).
async fn check(soak: &Soak, mut rng: rand::rngs::StdRng) -> usize {
    let cluster = soak.cluster.read().await;
    let deadline = tokio::time::Instant::now() + SETTLE_DEADLINE;
    // Every node lists the same chunks, every complete one uploaded.
    let mut lists: BTreeMap<&str, Vec<ChunkInfo>> = BTreeMap::new();
    for cat in CATEGORIES {
        let list = loop {
            let mut per_node = Vec::new();
            for i in 0..NODES {
                per_node.push(cluster.client(i).chunks(cat).await.unwrap_or_default());
            }
            type Key = (String, u64, bool, Option<u64>, Option<u64>);
            let key = |l: &Vec<ChunkInfo>| -> Vec<Key> {
                l.iter()
                    .map(|c| (c.name.clone(), c.size, c.complete, c.first_line, c.lines))
                    .collect()
            };
            let same = per_node.windows(2).all(|w| key(&w[0]) == key(&w[1]));
            let uploaded = per_node
                .iter()
                .all(|l| l.iter().all(|c| !c.complete || c.uploaded));
            if same && uploaded {
                // Every line numbered once, the same on every node.
                crate::cluster::check_numbering(cat, &per_node[0]);
                break per_node.swap_remove(0);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{cat} did not settle: {:#?}",
                per_node.iter().map(key).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        lists.insert(cat, list);
    }
    // Byte-identical on every node and in S3; only lines that were sent.
    let sent = soak.sent.lock().unwrap().clone();
    // Identical on every node (checked below), so counted once.
    let mut stored: BTreeMap<String, u32> = BTreeMap::new();
    for (cat, list) in &lists {
        for chunk in list {
            let first = chunk_bytes(&cluster.client(0), cat, chunk).await;
            for i in 1..NODES {
                let other = chunk_bytes(&cluster.client(i), cat, chunk).await;
                assert!(
                    other == first,
                    "{} of {cat} differs on node {i}",
                    chunk.name
                );
            }
            if chunk.complete {
                let key = format!("{cat}/{}", chunk.name);
                let object = soak.s3.get(&key).await;
                assert!(object.as_ref() == Some(&first), "{key} differs in S3");
            }
            let newlines = first.iter().filter(|&&b| b == b'\n').count() as u64;
            assert_eq!(
                chunk.lines,
                Some(newlines),
                "lines of {} of {cat}",
                chunk.name
            );
            let text = String::from_utf8(first).unwrap();
            for l in text.lines() {
                assert!(
                    sent[cat].contains(l),
                    "{} of {cat} holds a line never written: {l:?}",
                    chunk.name
                );
                *stored.entry(l.to_owned()).or_insert(0) += 1;
            }
        }
    }
    // Every acknowledged line once, but the excused ones.
    let acked = soak.acked.lock().unwrap().clone();
    let at_risk = soak.at_risk.lock().unwrap().clone();
    let mut lost = Vec::new();
    let mut excused = 0;
    for (l, (_, ack)) in &acked {
        match stored.get(l) {
            Some(1) => {}
            Some(n) => panic!("{l:?} is stored {n} times"),
            None if at_risk.contains(l) => excused += 1,
            None => lost.push((l.clone(), *ack)),
        }
    }
    assert!(
        lost.is_empty(),
        "{} acknowledged lines lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    // The consumer sees every acknowledged line of its category.
    let expected: BTreeSet<String> = acked
        .iter()
        .filter(|(l, (cat, _))| *cat == CONSUMED && !at_risk.contains(*l))
        .map(|(l, _)| l.clone())
        .collect();
    drop(cluster);
    loop {
        let missing = {
            let seen = soak.consumed.lock().unwrap();
            expected.difference(&seen).count()
        };
        if missing == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the consumer never saw {missing} acknowledged lines"
        );
        consume_once(soak, &mut rng).await;
    }
    let cluster = soak.cluster.read().await;
    for i in 0..NODES {
        let logs = cluster.logs(i);
        assert!(!logs.contains("panicked"), "node {i} panicked:\n{logs}");
        // No copy ever held more than its owner (nothing here loses bytes
        // an owner served: no power loss, wipes restore the largest copy).
        assert!(
            !logs.contains("holds more than"),
            "node {i} reported a copy longer than its owner"
        );
        let status = cluster.client(i).status().await.unwrap();
        for p in &status.peers {
            assert!(p.disagreeing_chunks.is_empty(), "node {i}: {p:?}");
        }
    }
    excused
}
