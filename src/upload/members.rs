//! Membership through the bucket: with S3 on and no `--peers`, a node's
//! peers are the nodes whose records ([`super::claim::NodeRecord`]) are
//! under `<prefix>_cluster/nodes/` with `"membership": "bucket"`.
//!
//! Every node reads every record each `--s3-claim-refresh` ([`read_all`]):
//! a new name becomes a peer (its puller starts), a known one's address
//! follows its record. Whether a record is still refreshed is judged the
//! way a start judges its own name ([`Watch`]): by whether its `beat`
//! moves, on this process's clock, never by comparing clocks. A peer whose
//! record stood still for `--owner-lost-after` (and that does not answer
//! for as long) is declared lost like any lost owner. Records are never
//! deleted: a node that left stays a peer that does not answer, so its
//! chunks keep their owner's name and numbering.
//!
//! Nodes of one bucket use one kind of membership: a start that finds a
//! live node of the other kind is refused ([`mixed`]).
//!
//! Each node also holds a number, claimed once ([`claim_number`]) and kept
//! for good: `<prefix>_cluster/numbers/<n>.json` names the node that holds
//! `n`, created with `If-None-Match: *` and never deleted, so no two nodes
//! ever hold one number and none is given twice. Its record repeats it;
//! the Kafka listener uses it as the node's partition.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::claim::{self, Membership, NodeRecord};
use super::store::{ObjectStore, S3Error};

/// Records read at once.
const READS_AT_ONCE: usize = 8;
/// Most records read: far above any cluster this design is for, and a
/// bound on what a bucket full of junk under the prefix costs.
const MAX_RECORDS: usize = 10_000;

/// Every node's record under `prefix` (records that do not parse are left
/// out, with a warning).
pub async fn read_all(store: &ObjectStore, prefix: &str) -> Result<Vec<NodeRecord>, S3Error> {
    let mut out: Vec<NodeRecord> = read_objects(store, &claim::records_prefix(prefix)).await?;
    out.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(out)
}

/// Every `.json` object under `under`, parsed (one that does not parse is
/// left out with a warning; one deleted between the listing and its read
/// is no object).
async fn read_objects<T: serde::de::DeserializeOwned>(
    store: &ObjectStore,
    under: &str,
) -> Result<Vec<T>, S3Error> {
    let listed = claim::bounded(store.list(under)).await?;
    if listed.len() > MAX_RECORDS {
        tracing::warn!(
            objects = listed.len(),
            max = MAX_RECORDS,
            under,
            "more objects in the bucket than read; the rest are left out"
        );
    }
    let keys = listed
        .into_iter()
        .filter(|o| o.key.ends_with(".json"))
        .take(MAX_RECORDS)
        .map(|o| o.key);
    let mut reads = futures_util::stream::iter(keys)
        .map(|key| async move { claim::bounded(claim::read_json(store, &key)).await })
        .buffer_unordered(READS_AT_ONCE);
    let mut out = Vec::new();
    while let Some(r) = reads.next().await {
        out.extend(r?);
    }
    Ok(out)
}

/// `<prefix>_cluster/forgotten/`: nodes forgotten with `forget-node`.
pub fn forgotten_prefix(prefix: &str) -> String {
    format!("{prefix}_cluster/forgotten/")
}

/// `forgotten/<node>.json`: `forget-node` forgot `node` while it ran as
/// `incarnation`. Every node forgets it too while its record stands still
/// at that incarnation, those down when it was forgotten and those started
/// later included (a node that lost its disk would otherwise wait for it
/// forever before it takes writes). A new process of the node writes
/// another incarnation, which the mark does not name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgetMark {
    /// The forgotten node.
    pub node: String,
    /// The incarnation its record had.
    pub incarnation: u64,
    /// When, in milliseconds since the Unix epoch (the writer's clock).
    pub forgotten_ms: u64,
}

/// Every forget mark in the bucket.
pub async fn read_marks(store: &ObjectStore, prefix: &str) -> Result<Vec<ForgetMark>, S3Error> {
    read_objects(store, &forgotten_prefix(prefix)).await
}

/// Marks `node` forgotten at the incarnation of its record; `false` when
/// the bucket holds no record of it.
pub async fn mark_forgotten(
    store: &ObjectStore,
    prefix: &str,
    node: &str,
) -> Result<bool, S3Error> {
    let Some(r) = claim::bounded(claim::read(store, &claim::record_key(prefix, node))).await?
    else {
        return Ok(false);
    };
    let mark = ForgetMark {
        node: node.to_owned(),
        incarnation: r.incarnation,
        forgotten_ms: claim::now_ms(),
    };
    let body = Bytes::from(serde_json::to_vec(&mark).expect("a mark serializes"));
    let key = format!("{}{node}.json", forgotten_prefix(prefix));
    claim::bounded(store.put(&key, body, None)).await?;
    Ok(true)
}

/// `<prefix>_cluster/numbers/`: one object per number ever given.
pub fn numbers_prefix(prefix: &str) -> String {
    format!("{prefix}_cluster/numbers/")
}

/// What `numbers/<n>.json` says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct NumberRecord {
    /// The node that holds the number.
    node: String,
    /// The process that claimed it.
    incarnation: u64,
    /// When, in milliseconds since the Unix epoch (its clock).
    claimed_ms: u64,
}

/// Who holds number `n`, if anyone; an object that does not parse names
/// nobody but keeps its number taken.
async fn holder(store: &ObjectStore, key: &str) -> Result<Option<String>, S3Error> {
    let Some(data) = claim::bounded(store.get_small(key, 4096)).await? else {
        return Ok(None);
    };
    Ok(Some(
        serde_json::from_slice::<NumberRecord>(&data)
            .map(|r| r.node)
            .unwrap_or_default(),
    ))
}

/// This node's number: the one it holds (`previous`, as its record said,
/// or found among the numbers: a start that stopped between claiming one
/// and writing its record), else the smallest one never given, created
/// with `If-None-Match: *`. A created number is read back, so that a
/// store that ignores the condition is caught when the other writer's
/// object is already there.
pub async fn claim_number(
    store: &ObjectStore,
    prefix: &str,
    node: &str,
    incarnation: u64,
    previous: Option<u32>,
) -> Result<u32, S3Error> {
    let key = |n: u32| format!("{}{n}.json", numbers_prefix(prefix));
    if let Some(n) = previous {
        match holder(store, &key(n)).await? {
            Some(h) if h == node => return Ok(n),
            Some(h) => {
                tracing::error!(number = n, holder = %h, "this node's record names a number held by another node; claiming another");
            }
            None => {
                tracing::warn!(
                    number = n,
                    "this node's number is missing from the bucket; claiming it again"
                );
            }
        }
    }
    let listed = claim::bounded(store.list(&numbers_prefix(prefix))).await?;
    let mut taken: BTreeSet<u32> = listed
        .iter()
        .filter_map(|o| {
            o.key
                .strip_prefix(&numbers_prefix(prefix))?
                .strip_suffix(".json")?
                .parse()
                .ok()
        })
        .collect();
    for &n in taken.iter().take(MAX_RECORDS) {
        if holder(store, &key(n)).await?.as_deref() == Some(node) {
            return Ok(n);
        }
    }
    let body = Bytes::from(
        serde_json::to_vec(&NumberRecord {
            node: node.to_owned(),
            incarnation,
            claimed_ms: claim::now_ms(),
        })
        .expect("a number record serializes"),
    );
    let mut n = 0u32;
    for _ in 0..MAX_RECORDS {
        while taken.contains(&n) {
            n += 1;
        }
        let created = claim::bounded(store.put_if_absent(&key(n), body.clone())).await?;
        let now = holder(store, &key(n)).await?;
        if now.as_deref() == Some(node) {
            if !created {
                // This node's own earlier attempt (its answer was lost).
                tracing::info!(
                    number = n,
                    "this node's number was created by an earlier try"
                );
            }
            return Ok(n);
        }
        if created {
            tracing::error!(number = n, holder = ?now, "a number this node created names another node: the store may not honour If-None-Match; claiming another");
        }
        taken.insert(n);
    }
    Err(S3Error {
        message: format!("no free number among the first {MAX_RECORDS}"),
        kind: super::store::S3ErrorKind::Other,
    })
}

/// The Kafka partition order the records give: entry `p` is the node that
/// holds number `p` (`""` for a number no record read names).
pub fn partition_order(records: &[NodeRecord]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in records {
        let Some(n) = r.number else { continue };
        let n = n as usize;
        if n >= MAX_RECORDS {
            continue;
        }
        if out.len() <= n {
            out.resize(n + 1, String::new());
        }
        out[n] = r.node.clone();
    }
    out
}

/// A record that names a process that may be alive: not stopped, and
/// refreshed within [`claim::CLOCK_SKEW`] by this machine's clock. Used
/// only to refuse a start, where a wrong "alive" costs a retry.
fn maybe_alive(r: &NodeRecord) -> bool {
    !r.stopped
        && claim::now_ms().saturating_sub(r.refreshed_ms) < claim::CLOCK_SKEW.as_millis() as u64
}

/// A node of `records` that runs with the other kind of membership than
/// `mine`, if any is alive; a cluster uses one kind.
pub fn mixed<'a>(
    records: &'a [NodeRecord],
    node: &str,
    mine: Membership,
) -> Option<&'a NodeRecord> {
    records
        .iter()
        .find(|r| r.node != node && r.membership != mine && maybe_alive(r))
}

/// When each record last moved, by this process's clock.
#[derive(Debug, Default)]
pub struct Watch {
    /// Node → (incarnation, beat, when either last changed).
    seen: HashMap<String, (u64, u64, Instant)>,
}

impl Watch {
    /// Notes `r` as read now; returns since when it has stood still, or
    /// `None` while it is refreshed (its beat moved within two and a half
    /// refresh periods, its own or `refresh`, whichever is longer). A
    /// stopped record stands still from its last write. A record seen for
    /// the first time is taken to have moved when it says it was written
    /// (by its writer's clock, bounded by [`claim::CLOCK_SKEW`]), so a node
    /// that starts after a peer died does not wait a whole
    /// `--owner-lost-after` again.
    pub fn observe(&mut self, r: &NodeRecord, refresh: Duration) -> Option<Instant> {
        let now = Instant::now();
        let entry = self.seen.entry(r.node.clone()).or_insert_with(|| {
            let age = Duration::from_millis(claim::now_ms().saturating_sub(r.refreshed_ms))
                .min(claim::CLOCK_SKEW);
            (r.incarnation, r.beat, now.checked_sub(age).unwrap_or(now))
        });
        if (entry.0, entry.1) != (r.incarnation, r.beat) {
            *entry = (r.incarnation, r.beat, now);
        }
        let changed = entry.2;
        if r.stopped {
            return Some(changed);
        }
        (now.duration_since(changed) > claim::still_after(r, refresh)).then_some(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(node: &str, beat: u64, membership: Membership) -> NodeRecord {
        let mut r = NodeRecord::new(
            node,
            1,
            "127.0.0.1:1".into(),
            Duration::from_millis(10),
            membership,
        );
        r.beat = beat;
        r
    }

    #[test]
    fn a_record_is_still_once_its_beat_stops_for_two_and_a_half_periods() {
        let mut w = Watch::default();
        let refresh = Duration::from_millis(10);
        assert_eq!(
            w.observe(&record("a", 1, Membership::Bucket), refresh),
            None
        );
        std::thread::sleep(Duration::from_millis(40));
        // Moved: alive again, whatever the time since the last read.
        assert_eq!(
            w.observe(&record("a", 2, Membership::Bucket), refresh),
            None
        );
        std::thread::sleep(Duration::from_millis(40));
        let still = w.observe(&record("a", 2, Membership::Bucket), refresh);
        assert!(still.is_some_and(|t| t.elapsed() >= Duration::from_millis(40)));
        // A new incarnation with the same beat is a move too.
        let mut r = record("a", 2, Membership::Bucket);
        r.incarnation = 2;
        assert_eq!(w.observe(&r, refresh), None);
        // A stopped record is still at once.
        r.stopped = true;
        assert!(w.observe(&r, refresh).is_some());
    }

    #[test]
    fn a_record_first_seen_long_after_its_last_write_is_still_already() {
        let mut w = Watch::default();
        let mut r = record("a", 7, Membership::Bucket);
        r.refreshed_ms -= 60_000;
        let still = w.observe(&r, Duration::from_millis(10)).unwrap();
        assert!(still.elapsed() >= Duration::from_secs(59));
    }

    #[test]
    fn only_a_live_node_of_the_other_kind_is_a_mix() {
        let mut stat = record("s", 1, Membership::Static);
        let records = vec![record("b", 1, Membership::Bucket), stat.clone()];
        assert_eq!(
            mixed(&records, "b", Membership::Bucket).map(|r| r.node.as_str()),
            Some("s")
        );
        assert!(mixed(&records, "s", Membership::Static).is_some());
        assert!(mixed(&records[..1], "x", Membership::Bucket).is_none());
        stat.stopped = true;
        assert!(mixed(&[stat.clone()], "b", Membership::Bucket).is_none());
        stat.stopped = false;
        stat.refreshed_ms -= 2 * claim::CLOCK_SKEW.as_millis() as u64;
        assert!(mixed(&[stat], "b", Membership::Bucket).is_none());
    }
}
