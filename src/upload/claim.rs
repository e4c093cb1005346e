//! A node's claim on its name in the bucket.
//!
//! Chunk names carry the node's name, so two live processes under one name
//! would write chunks of the same names: their bytes would differ, copies
//! and uploads would disagree, and acknowledged lines could be lost. With
//! S3 on, each process therefore keeps a record at
//! `<prefix>_cluster/nodes/<node>.json` ([`NodeRecord`]): its incarnation,
//! its address, and a heartbeat (`beat`) it rewrites every `claim_refresh`.
//!
//! At start-up ([`acquire`]) a process reads the record:
//! - none, one marked `stopped` (a graceful stop), one of its own
//!   incarnation, or one whose last refresh is more than [`CLOCK_SKEW`] old
//!   by this machine's clock: it writes its own;
//! - otherwise the holder may be alive: the process watches the record for
//!   two and a half refresh periods (its own or the holder's, whichever
//!   is longer; no clock comparison between machines). A beat
//!   that moves means a live process: start-up is refused with a message
//!   naming it. A beat that stands still means the holder is gone (it was
//!   killed): the name is taken over.
//!
//! After writing, it reads the record back a moment later: two processes
//! that started together both wrote, and the one that finds the other's
//! record refuses. While running ([`Claim::refresh`]), every refresh reads before
//! it writes; finding another incarnation there (two processes raced past
//! both checks, or one started while this one could not reach S3) closes
//! this node's writes with the reason and logs an error, until it is
//! restarted. A graceful stop marks the record `stopped` ([`release`]).
//!
//! S3 being unreachable never stops a node from starting: it starts with a
//! warning and claims the name once S3 answers.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::store::{ObjectStore, S3Error};

/// Records older than this by this machine's clock are not watched: their
/// process is long gone, whatever the clocks say.
pub const CLOCK_SKEW: Duration = Duration::from_secs(120);
/// Largest record read.
pub(super) const MAX_RECORD_BYTES: u64 = 64 << 10;
/// The write gate closed when another process holds this node's name.
pub const WRITE_GATE: &str = "node-claim";

/// What a process says of itself under its node's name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The node name.
    pub node: String,
    /// The process's incarnation (drawn at start-up).
    pub incarnation: u64,
    /// Where it listens (`--listen`).
    pub address: String,
    /// The machine it runs on (its host name).
    #[serde(default)]
    pub host: String,
    /// Its version.
    pub version: String,
    /// When it started, in milliseconds since the Unix epoch.
    pub started_ms: u64,
    /// When it last refreshed the record, likewise (its own clock).
    pub refreshed_ms: u64,
    /// Bumped by every refresh: what a watcher compares.
    pub beat: u64,
    /// Its `--s3-claim-refresh` in milliseconds: a watcher waits for two
    /// of these (or of its own, if longer) before it calls the beat still.
    #[serde(default)]
    pub refresh_ms: u64,
    /// Set by a graceful stop.
    #[serde(default)]
    pub stopped: bool,
    /// How the node finds its peers.
    #[serde(default)]
    pub membership: Membership,
    /// Its number in the bucket (bucket membership; see
    /// [`super::members::claim_number`]): its Kafka partition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number: Option<u32>,
}

/// How a node finds its peers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Membership {
    /// `--peers` (or no peers at all): records only guard the name.
    #[default]
    Static,
    /// Through these records ([`super::members`]).
    Bucket,
}

impl std::fmt::Display for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Static => "--peers",
            Self::Bucket => "the bucket's membership",
        })
    }
}

impl NodeRecord {
    /// A record for this process, not written yet.
    pub fn new(
        node: &str,
        incarnation: u64,
        address: String,
        refresh: Duration,
        membership: Membership,
    ) -> Self {
        let now = now_ms();
        Self {
            node: node.to_owned(),
            incarnation,
            address,
            host: rustix::system::uname()
                .nodename()
                .to_string_lossy()
                .into_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_ms: now,
            refreshed_ms: now,
            beat: 0,
            refresh_ms: refresh.as_millis() as u64,
            stopped: false,
            membership,
            number: None,
        }
    }
}

/// `<prefix>_cluster/nodes/<node>.json`.
pub fn record_key(prefix: &str, node: &str) -> String {
    format!("{}{node}.json", records_prefix(prefix))
}

/// `<prefix>_cluster/nodes/`: where every node's record is.
pub fn records_prefix(prefix: &str) -> String {
    format!("{prefix}_cluster/nodes/")
}

/// Why a process may not take its node's name.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Another live process holds it.
    #[error(
        "another process runs as node {node}: incarnation {incarnation:016x} on host {host:?} at {address}, started {started}, still refreshing {key} in the bucket. Two processes must never write under one node name (their chunk names would collide); stop the other one, or give this one another --node"
    )]
    Taken {
        /// The node name.
        node: String,
        /// The other process's incarnation.
        incarnation: u64,
        /// Its address.
        address: String,
        /// Its host.
        host: String,
        /// When it started (RFC 3339).
        started: String,
        /// The record's key.
        key: String,
    },
    /// A live node of the bucket finds its peers the other way.
    #[error(
        "node {node} at {address} runs against this bucket with {theirs}, and this node would use {mine}: the nodes of one bucket must find each other the same way (all with --peers, or none); stop that node or start this one like it"
    )]
    Mixed {
        /// The other node.
        node: String,
        /// Its address.
        address: String,
        /// Its kind of membership.
        theirs: String,
        /// This node's.
        mine: String,
    },
}

fn taken(key: &str, r: &NodeRecord) -> ClaimError {
    ClaimError::Taken {
        node: r.node.clone(),
        incarnation: r.incarnation,
        address: r.address.clone(),
        host: r.host.clone(),
        started: humantime::format_rfc3339_seconds(
            SystemTime::UNIX_EPOCH + Duration::from_millis(r.started_ms),
        )
        .to_string(),
        key: key.to_owned(),
    }
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The record at `key`, if any; a record that does not parse counts as
/// none (it names no live process).
pub(super) async fn read(store: &ObjectStore, key: &str) -> Result<Option<NodeRecord>, S3Error> {
    read_json(store, key).await
}

/// The JSON object at `key` (at most [`MAX_RECORD_BYTES`]), if any; one
/// that does not parse counts as none, with a warning.
pub(super) async fn read_json<T: serde::de::DeserializeOwned>(
    store: &ObjectStore,
    key: &str,
) -> Result<Option<T>, S3Error> {
    let Some(data) = store.get_small(key, MAX_RECORD_BYTES).await? else {
        return Ok(None);
    };
    Ok(serde_json::from_slice(&data)
        .inspect_err(|e| tracing::warn!(key, error = %e, "a record of the cluster in the bucket does not parse; treating it as absent"))
        .ok())
}

/// How long `r`'s heartbeat must stand still before its process is taken
/// for gone: two and a half refresh periods, its own or `own`, whichever
/// is longer.
pub(super) fn still_after(r: &NodeRecord, own: Duration) -> Duration {
    let period = Duration::from_millis(r.refresh_ms).max(own);
    period * 2 + period / 2
}

async fn write(store: &ObjectStore, key: &str, r: &NodeRecord) -> Result<(), S3Error> {
    let body = serde_json::to_vec(r).expect("a record serializes");
    store.put(key, Bytes::from(body), None).await
}

/// How long one S3 call of the claim may take: a store that hangs delays
/// a start by this much at most.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) async fn bounded<T>(
    call: impl Future<Output = Result<T, S3Error>>,
) -> Result<T, S3Error> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| {
            Err(S3Error {
                message: format!("no answer within {CALL_TIMEOUT:?}"),
                kind: super::store::S3ErrorKind::Other,
            })
        })
}

/// This process's claim on its node's name.
#[derive(Debug, Clone)]
pub struct Claim {
    /// The record's key.
    pub key: String,
    /// This process's record.
    pub mine: NodeRecord,
    /// The record was written (and not found taken since).
    pub claimed: bool,
    /// A record of this name was in the bucket before this process wrote
    /// its own: the name was used before (`false` also when S3 could not
    /// be asked).
    pub named_before: bool,
    /// Another process's record being watched before taking the name over,
    /// and since when (this process's clock).
    watched: Option<(NodeRecord, std::time::Instant)>,
}

impl Claim {
    /// An unclaimed claim of `mine.node` under `prefix`.
    pub fn new(prefix: &str, mine: NodeRecord) -> Self {
        Self {
            key: record_key(prefix, &mine.node),
            mine,
            claimed: false,
            named_before: false,
            watched: None,
        }
    }

    /// One refresh: reads the record, then writes this process's next beat,
    /// unless another process holds the name: then returns its record
    /// (nothing written) when it is a conflict, or `None` while it is
    /// watched (a recent record of a process that may be dead: taken over
    /// once its beat stood still for two and a half refresh periods, its
    /// or this process's, whichever is longer).
    pub async fn refresh(&mut self, store: &ObjectStore) -> Result<Option<NodeRecord>, S3Error> {
        if !self.claimed {
            // Nothing is written to a bucket that is missing or refused
            // (some S3-compatible stores create what a PUT names).
            bounded(store.check()).await?;
        }
        let found = bounded(read(store, &self.key)).await?;
        if !self.claimed && found.is_some() {
            self.named_before = true;
        }
        if let Some(theirs) = found
            && theirs.incarnation != self.mine.incarnation
            && !theirs.stopped
        {
            if self.claimed {
                return Ok(Some(theirs));
            }
            let recent =
                now_ms().saturating_sub(theirs.refreshed_ms) < CLOCK_SKEW.as_millis() as u64;
            if recent {
                match &self.watched {
                    Some((w, since)) if w.incarnation == theirs.incarnation => {
                        if w.beat != theirs.beat {
                            return Ok(Some(theirs));
                        }
                        let own = Duration::from_millis(self.mine.refresh_ms);
                        if since.elapsed() < still_after(&theirs, own) {
                            return Ok(None);
                        }
                        tracing::warn!(key = %self.key, other = theirs.incarnation, "the process that held this node's name stopped refreshing it (killed?); taking the name over");
                    }
                    _ => {
                        tracing::info!(key = %self.key, other = theirs.incarnation, "this node's name was refreshed lately by another process; watching whether it still runs");
                        self.watched = Some((theirs, std::time::Instant::now()));
                        return Ok(None);
                    }
                }
            }
        }
        self.mine.beat += 1;
        self.mine.refreshed_ms = now_ms();
        bounded(write(store, &self.key, &self.mine)).await?;
        self.claimed = true;
        self.watched = None;
        Ok(None)
    }
}

/// Claims the name at start-up (see the module documentation): `Err` when
/// another live process holds it; `Ok` also when S3 cannot be asked (the
/// claim is then made by the refresh loop, once S3 answers).
pub async fn acquire(
    claim: &mut Claim,
    store: &ObjectStore,
    refresh: Duration,
) -> Result<(), ClaimError> {
    let key = claim.key.clone();
    let unreachable = |e: S3Error| {
        tracing::warn!(%key, error = %e, "cannot check this node's name in the bucket; starting anyway and claiming it once S3 answers");
    };
    while !claim.claimed {
        match claim.refresh(store).await {
            Ok(Some(theirs)) => return Err(taken(&claim.key, &theirs)),
            Ok(None) if claim.claimed => {}
            Ok(None) => tokio::time::sleep(refresh / 2).await,
            Err(e) => {
                unreachable(e);
                return Ok(());
            }
        }
    }
    // Two processes that started together both wrote: the later write
    // wins, and the other process finds it here.
    tokio::time::sleep(refresh / 2).await;
    match bounded(read(store, &claim.key)).await {
        Ok(Some(now)) if now.incarnation != claim.mine.incarnation && !now.stopped => {
            claim.claimed = false;
            Err(taken(&claim.key, &now))
        }
        Ok(_) => Ok(()),
        Err(e) => {
            unreachable(e);
            Ok(())
        }
    }
}

/// Marks this process's record `stopped` (a graceful stop), unless another
/// process holds the name: the next process under it starts at once.
pub async fn release(claim: &Claim, store: &ObjectStore) {
    if !claim.claimed {
        return;
    }
    match bounded(read(store, &claim.key)).await {
        Ok(Some(r)) if r.incarnation != claim.mine.incarnation => return,
        Err(_) => return,
        _ => {}
    }
    let mut last = claim.mine.clone();
    last.stopped = true;
    last.refreshed_ms = now_ms();
    if let Err(e) = bounded(write(store, &claim.key, &last)).await {
        tracing::warn!(key = %claim.key, error = %e, "cannot mark this node's name released in the bucket; the next start under it watches it first");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_live_beside_the_chunks_without_colliding() {
        assert_eq!(record_key("eu/", "n1"), "eu/_cluster/nodes/n1.json");
        // A category may be called `_cluster`: its chunk keys are
        // `_cluster/<node>-chunk<digits>`, never `_cluster/nodes/...`.
        assert!(chunkbus_client::ChunkName::parse("nodes/n1.json").is_err());
        let r = NodeRecord::new(
            "n1",
            7,
            "127.0.0.1:8080".into(),
            Duration::from_secs(5),
            Membership::Bucket,
        );
        let back: NodeRecord = serde_json::from_slice(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }
}
