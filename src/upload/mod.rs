//! The object-store tier: complete chunks go to S3, local copies are
//! evicted, evicted chunks are read back from S3, and retention.
//!
//! - **Upload** (`uploader`): the owner uploads each complete chunk to
//!   `s3://BUCKET/{prefix}{category}/{chunk}`, woken by completions. A lost
//!   owner's chunks are uploaded by one replica (the reachable node with the
//!   smallest name), after a HEAD shows the owner did not. Failures back off
//!   (capped, jittered) and show in `/v1/status` and `/metrics`; ingestion
//!   never waits for S3. Uploads only create (`If-None-Match: *`): an
//!   object under a chunk's key is never overwritten (see
//!   `uploader::settle_existing`). Uploaded chunks are recorded durably by the storage
//!   (`.uploads.log`), multipart progress in `<data>/.multipart/`.
//! - **Eviction** (`sweep` and the consumers' retention): an uploaded chunk's
//!   local copy goes once every consumer acked it, past `--local-retention`,
//!   or under disk pressure (oldest first, in the storage's disk monitor).
//! - **Read-through** (`S3Reader`): the storage reads evicted chunks with
//!   ranged GETs.
//! - **Start-up** ([`Tiering::start`]): the bucket is checked (one clear log
//!   line for bad credentials or a missing bucket) and listed, so that a node
//!   whose disk was wiped serves every uploaded chunk again and never reuses
//!   one of its chunk names; a fresh data directory takes writes only once
//!   that listing is done.
//! - **Retention** (`--retention`, `sweep`): chunks past that age are
//!   deleted everywhere, S3 included.

pub mod claim;
pub mod members;
pub mod store;
mod sweep;
mod uploader;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use chunkbus_client::{ChunkName, S3Status};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::storage::numbering::LineRecord;
use crate::storage::{RemoteChunks, Storage, StorageError};
pub use store::{ObjectStore, S3Error, S3ErrorKind};

/// Default age after which an uploaded chunk's local copy is evicted.
pub const DEFAULT_LOCAL_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// Default size of one multipart part (chunks larger than one part are
/// uploaded in parts).
pub const DEFAULT_PART_BYTES: u64 = 16 << 20;
/// Smallest part S3 accepts (except the last).
pub const MIN_PART_BYTES: u64 = 5 << 20;
/// How long a fresh data directory waits for the bucket listing before it
/// takes writes anyway.
pub const FRESH_LISTING_PATIENCE: Duration = Duration::from_secs(30);
/// The storage's write gate this tier holds while a fresh data directory
/// waits for the bucket listing.
const WRITE_GATE: &str = "s3";
/// Default number of uploads running at once.
pub const DEFAULT_UPLOAD_CONCURRENCY: usize = 4;

/// How uploads prove their integrity to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumMode {
    /// `Content-MD5` on each request: accepted by every S3-compatible store.
    Md5,
    /// The SDK's flexible CRC32C checksums (AWS S3 and recent stores).
    Crc32c,
}

impl std::str::FromStr for ChecksumMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "md5" => Ok(Self::Md5),
            "crc32c" => Ok(Self::Crc32c),
            other => Err(format!("{other:?} is not md5 or crc32c")),
        }
    }
}

/// Settings of the S3 tier (`--s3-*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    /// The bucket; S3 is on when set.
    pub bucket: String,
    /// Key prefix in front of `{category}/{chunk}`.
    pub prefix: String,
    /// Endpoint of an S3-compatible store (path-style addressing).
    pub endpoint: Option<String>,
    /// Region; from the AWS chain when absent.
    pub region: Option<String>,
    /// Integrity check of uploads.
    pub checksum: ChecksumMode,
    /// Size of a multipart part; larger chunks are uploaded in parts.
    pub part_bytes: u64,
    /// Uploads running at once.
    pub concurrency: usize,
    /// How often this node rewrites its record under its name
    /// ([`claim`]); a process whose record stood still for two and a half
    /// of these (or of its own, if longer) is taken for dead.
    pub claim_refresh: Duration,
    /// The nodes find each other through their records in the bucket
    /// (no `--peers`; see [`members`]).
    pub bucket_membership: bool,
}

/// Default of [`S3Config::claim_refresh`].
pub const DEFAULT_CLAIM_REFRESH: Duration = Duration::from_secs(5);

/// Settings of eviction and retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionConfig {
    /// Evict uploaded chunks' local copies older than this.
    pub local_retention: Duration,
    /// Delete chunks everywhere (S3 included) older than this.
    pub retention: Option<Duration>,
}

/// What the cluster says about owners, for choosing who uploads a lost
/// owner's chunks.
pub trait Cluster: Send + Sync + std::fmt::Debug {
    /// True when `owner` will not upload its chunks: forgotten, declared
    /// lost, or not a member of the cluster.
    fn owner_lost(&self, owner: &str) -> bool;
    /// Names of the peers that answer now.
    fn reachable_peers(&self) -> Vec<String>;
    /// A node found in the bucket (bucket membership) at `address`, whose
    /// record has stood still since `still_since` (`None`: refreshed).
    fn member(&self, name: &str, address: &str, still_since: Option<std::time::Instant>);
    /// Every node's record was read (bucket membership): the members
    /// found so far were told; `named_before`: this node's name was among
    /// them (it may have written chunks before). Only the first call
    /// counts: true for it.
    fn members_known(&self, named_before: bool) -> bool;
    /// The nodes by number (bucket membership): entry `p` holds number `p`
    /// (`""`: not known).
    fn partitions(&self, order: &[String]);
    /// A node forgotten with `forget-node` and still down (bucket
    /// membership): to be forgotten here too.
    fn forgotten(&self, name: &str);
    /// The nodes that copied `owner`'s chunks of `category` while it was a
    /// member (`--replicas k`); `None`: every node.
    fn copied_by(&self, category: &str, owner: &str) -> Option<Vec<String>>;
    /// This node holds `owner`'s chunks of `category` (always with
    /// `--replicas all`).
    fn holds(&self, category: &str, owner: &str) -> bool;
    /// Brings this node's complete copy of a lost owner's `chunk` up to
    /// the longest copy a reachable peer holds, before this node uploads
    /// it; the bytes added.
    fn catch_up_lost_copy<'a>(
        &'a self,
        category: &'a str,
        chunk: &'a ChunkName,
    ) -> futures_util::future::BoxFuture<'a, Result<u64, String>>;
}

/// The tier of one node. Shared as `Arc<Tiering>`.
#[derive(Debug)]
pub struct Tiering {
    storage: Storage,
    cluster: Arc<dyn Cluster>,
    /// `None` when S3 is off (retention may still run).
    s3: Option<(S3Config, ObjectStore)>,
    retention: RetentionConfig,
    metrics: Arc<Metrics>,
    status: Mutex<Status>,
    /// True once writes were let through on a fresh data directory.
    writes_open: AtomicBool,
    /// This process's claim on its node's name (S3 on, once
    /// [`Tiering::claim_name`] ran).
    claim: Mutex<Option<claim::Claim>>,
    /// When each node's record last moved (bucket membership).
    watch: Mutex<members::Watch>,
    /// This node's number in the bucket, once claimed (bucket membership).
    number: Mutex<Option<u32>>,
}

#[derive(Debug, Default)]
struct Status {
    backlog_chunks: u64,
    backlog_bytes: u64,
    uploaded_chunks: u64,
    uploaded_bytes: u64,
    last_success: Option<SystemTime>,
    last_error: Option<String>,
    last_error_at: Option<SystemTime>,
    failing_chunks: Vec<chunkbus_client::FailingChunk>,
}

impl Tiering {
    /// Builds the tier; with `s3`, connects the client and installs the
    /// reader of evicted chunks. Nothing talks to S3 before
    /// [`Tiering::claim_name`] and [`Tiering::start`].
    pub async fn new(
        storage: Storage,
        cluster: Arc<dyn Cluster>,
        s3: Option<S3Config>,
        retention: RetentionConfig,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let s3 = match s3 {
            Some(cfg) => {
                let store = ObjectStore::connect(&cfg).await;
                storage.set_remote(Arc::new(S3Reader {
                    store: store.clone(),
                    prefix: cfg.prefix.clone(),
                    runtime: tokio::runtime::Handle::current(),
                    metrics: metrics.clone(),
                }));
                Some((cfg, store))
            }
            None => None,
        };
        Arc::new(Self {
            storage,
            cluster,
            s3,
            retention,
            metrics,
            status: Mutex::new(Status::default()),
            writes_open: AtomicBool::new(false),
            claim: Mutex::new(None),
            watch: Mutex::new(members::Watch::default()),
            number: Mutex::new(None),
        })
    }

    /// With S3 on, claims this node's name in the bucket before the node
    /// serves anything: refused when another live process holds it (see
    /// [`claim`]), or when a live node of the bucket finds its peers the
    /// other way ([`members::mixed`]). With bucket membership, the nodes
    /// found are told to the cluster as members. `address`: where peers
    /// reach this node, for the record.
    pub async fn claim_name(&self, address: String) -> Result<(), claim::ClaimError> {
        let Some((cfg, store)) = &self.s3 else {
            return Ok(());
        };
        let membership = if cfg.bucket_membership {
            claim::Membership::Bucket
        } else {
            claim::Membership::Static
        };
        let node = self.storage.node();
        let records = match members::read_all(store, &cfg.prefix).await {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the nodes' records in the bucket; reading them again every --s3-claim-refresh");
                None
            }
        };
        if let Some(other) = records
            .as_deref()
            .and_then(|r| members::mixed(r, node, membership))
        {
            return Err(claim::ClaimError::Mixed {
                node: other.node.clone(),
                address: other.address.clone(),
                theirs: other.membership.to_string(),
                mine: membership.to_string(),
            });
        }
        let mut mine = claim::NodeRecord::new(
            node,
            self.storage.incarnation(),
            address,
            cfg.claim_refresh,
            membership,
        );
        if cfg.bucket_membership
            && let Some(records) = &records
        {
            mine.number = self.claim_number(cfg, store, records).await;
        }
        let mut c = claim::Claim::new(&cfg.prefix, mine);
        claim::acquire(&mut c, store, cfg.claim_refresh).await?;
        *self.claim.lock().unwrap() = Some(c);
        if cfg.bucket_membership
            && let Some(records) = records
        {
            let marks = self.forget_marks(cfg, store).await;
            self.note_members(&records, &marks, cfg);
        }
        Ok(())
    }

    /// Marks this process's record stopped (a start refused after the
    /// claim).
    pub async fn release_name(&self) {
        let Some((_, store)) = &self.s3 else { return };
        let claim = self.claim.lock().unwrap().clone();
        if let Some(c) = claim {
            claim::release(&c, store).await;
        }
    }

    /// The nodes forgotten with `forget-node`, as the bucket says (none,
    /// with a warning, when it cannot be read).
    async fn forget_marks(&self, cfg: &S3Config, store: &ObjectStore) -> Vec<members::ForgetMark> {
        members::read_marks(store, &cfg.prefix)
            .await
            .inspect_err(|e| tracing::warn!(error = %e, "cannot read which nodes were forgotten in the bucket; retrying every --s3-claim-refresh"))
            .unwrap_or_default()
    }

    /// This node's number in the bucket ([`members::claim_number`]; the
    /// one its record in `records` names, if any), kept for the record's
    /// next refresh; `None` when S3 did not answer.
    async fn claim_number(
        &self,
        cfg: &S3Config,
        store: &ObjectStore,
        records: &[claim::NodeRecord],
    ) -> Option<u32> {
        let node = self.storage.node();
        let previous = records
            .iter()
            .find(|r| r.node == node)
            .and_then(|r| r.number);
        match members::claim_number(
            store,
            &cfg.prefix,
            node,
            self.storage.incarnation(),
            previous,
        )
        .await
        {
            Ok(n) => {
                if previous != Some(n) {
                    tracing::info!(
                        number = n,
                        "this node holds number {n} in the bucket (its Kafka partition)"
                    );
                }
                *self.number.lock().unwrap() = Some(n);
                Some(n)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot claim this node's number in the bucket; retrying every --s3-claim-refresh");
                None
            }
        }
    }

    /// This node's number in the bucket, once claimed.
    pub fn number(&self) -> Option<u32> {
        *self.number.lock().unwrap()
    }

    /// With bucket membership, records that `node` was forgotten
    /// ([`members::mark_forgotten`]): `Some("recorded")` or the error;
    /// `None` without bucket membership.
    pub async fn mark_forgotten(&self, node: &str) -> Option<String> {
        let (cfg, store) = self.s3.as_ref()?;
        if !cfg.bucket_membership {
            return None;
        }
        Some(
            match members::mark_forgotten(store, &cfg.prefix, node).await {
                Ok(true) => "recorded".to_owned(),
                Ok(false) => format!("error: the bucket holds no record of {node}"),
                Err(e) => format!("error: {e}"),
            },
        )
    }

    /// Tells the cluster of the bucket-membership nodes in `records`, and
    /// that the membership is known, with whether this node's name was
    /// among the records (the first reading counts: the one before its
    /// claim, or, if S3 did not answer then, a later one, a conservative
    /// yes).
    ///
    /// A node forgotten with `forget-node` whose record stands still at
    /// the incarnation that was forgotten is forgotten here too
    /// ([`members::ForgetMark`]).
    fn note_members(
        &self,
        records: &[claim::NodeRecord],
        marks: &[members::ForgetMark],
        cfg: &S3Config,
    ) {
        let me = self.storage.node();
        let mut forget = Vec::new();
        {
            let mut watch = self.watch.lock().unwrap();
            for r in records {
                if r.node == me || r.membership != claim::Membership::Bucket {
                    continue;
                }
                let still = watch.observe(r, cfg.claim_refresh);
                self.cluster.member(&r.node, &r.address, still);
                if still.is_some()
                    && marks
                        .iter()
                        .any(|m| m.node == r.node && m.incarnation == r.incarnation)
                {
                    forget.push(r.node.clone());
                }
            }
        }
        for node in forget {
            self.cluster.forgotten(&node);
        }
        let mut order = members::partition_order(records);
        if let Some(n) = self.number() {
            let n = n as usize;
            if order.len() <= n {
                order.resize(n + 1, String::new());
            }
            me.clone_into(&mut order[n]);
        }
        self.cluster.partitions(&order);
        self.cluster
            .members_known(records.iter().any(|r| r.node == me));
    }

    /// Reads the nodes' records every `--s3-claim-refresh` until `cancel`
    /// (bucket membership), telling the cluster of new nodes, new
    /// addresses and records that stood still; a live node found with
    /// `--peers` is reported (it is not a peer).
    async fn keep_members(self: Arc<Self>, cancel: CancellationToken) {
        let Some((cfg, store)) = &self.s3 else { return };
        let mut tick = tokio::time::interval(cfg.claim_refresh);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        let mut mixed_reported = std::collections::BTreeSet::new();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = cancel.cancelled() => return,
            }
            match members::read_all(store, &cfg.prefix).await {
                Ok(records) => {
                    failing = false;
                    if self.number().is_none() {
                        self.claim_number(cfg, store, &records).await;
                    }
                    if let Some(other) =
                        members::mixed(&records, self.storage.node(), claim::Membership::Bucket)
                        && mixed_reported.insert(other.node.clone())
                    {
                        tracing::error!(peer = %other.node, addr = %other.address, "a node runs against this bucket with --peers: it is not a peer of the nodes that find each other through the bucket, and they are not its peers; give every node of a bucket the same kind of membership");
                    }
                    let marks = self.forget_marks(cfg, store).await;
                    self.note_members(&records, &marks, cfg);
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "cannot read the nodes' records in the bucket; peers found so far are kept; retrying");
                    }
                    failing = true;
                }
            }
        }
    }

    /// Refreshes the claim until `cancel`, then releases it. Finding
    /// another process under this node's name closes writes here.
    async fn keep_claim(self: Arc<Self>, cancel: CancellationToken) {
        let Some((cfg, store)) = &self.s3 else { return };
        let Some(mut c) = self.claim.lock().unwrap().clone() else {
            return;
        };
        let mut tick = tokio::time::interval(cfg.claim_refresh);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut failing = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = cancel.cancelled() => break,
            }
            let was_claimed = c.claimed;
            c.mine.number = self.number();
            match c.refresh(store).await {
                Ok(None) => {
                    if c.claimed && !was_claimed {
                        tracing::info!(key = %c.key, "claimed this node's name in the bucket");
                    }
                    failing = false;
                }
                Ok(Some(theirs)) => {
                    let why = format!(
                        "another process (incarnation {:016x} on host {:?} at {}) writes as this node in the bucket ({}): two processes under one node name would write chunks of the same names; this one takes no writes until it is restarted once the other is stopped or renamed",
                        theirs.incarnation, theirs.host, theirs.address, c.key
                    );
                    tracing::error!("{why}");
                    self.storage.close_writes(claim::WRITE_GATE, why);
                    *self.claim.lock().unwrap() = Some(c);
                    return;
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(key = %c.key, error = %e, "cannot refresh this node's record in the bucket; retrying");
                    }
                    failing = true;
                }
            }
        }
        claim::release(&c, store).await;
    }

    /// Starts the uploader, the start-up listing and the sweeper, owned by
    /// `tasks`, stopped by `cancel`.
    pub fn start(self: &Arc<Self>, tasks: &TaskTracker, cancel: &CancellationToken) {
        if self.s3.is_some() {
            if self.storage.fresh() {
                self.storage.close_writes(
                    WRITE_GATE,
                    "this node's data directory is new: it is listing the S3 bucket first, so that it never reuses a chunk name it uploaded before",
                );
            }
            tasks.spawn(self.clone().discover(cancel.clone()));
            tasks.spawn(uploader::run(self.clone(), cancel.clone()));
            tasks.spawn(self.clone().keep_claim(cancel.clone()));
            if self.s3.as_ref().is_some_and(|(c, _)| c.bucket_membership) {
                tasks.spawn(self.clone().keep_members(cancel.clone()));
            }
        }
        tasks.spawn(sweep::run(self.clone(), cancel.clone()));
    }

    /// The object key of a chunk.
    pub fn key(&self, category: &str, chunk: &ChunkName) -> Option<String> {
        self.s3
            .as_ref()
            .map(|(cfg, _)| object_key(&cfg.prefix, category, chunk))
    }

    /// The tier's state for `/v1/status`; `None` when S3 is off.
    pub fn status(&self) -> Option<S3Status> {
        let (cfg, _) = self.s3.as_ref()?;
        let st = self.status.lock().unwrap();
        let time =
            |t: Option<SystemTime>| t.map(|t| humantime::format_rfc3339_seconds(t).to_string());
        Some(S3Status {
            bucket: cfg.bucket.clone(),
            prefix: cfg.prefix.clone(),
            backlog_chunks: st.backlog_chunks,
            backlog_bytes: st.backlog_bytes,
            uploaded_chunks: st.uploaded_chunks,
            uploaded_bytes: st.uploaded_bytes,
            last_success: time(st.last_success),
            last_error: st.last_error.clone(),
            last_error_at: time(st.last_error_at),
            failing_chunks: st.failing_chunks.clone(),
            evicted_chunks: self
                .storage
                .categories()
                .iter()
                .map(|c| {
                    let labels = crate::metrics::CategoryLabels {
                        category: c.clone(),
                    };
                    self.metrics.chunks_evicted.get_or_create(&labels).get()
                })
                .sum(),
        })
    }

    /// True when this node uploads `owner`'s chunks of `category`: its
    /// own, or a lost owner's when it is the reachable node with the
    /// smallest name (among the nodes that held the pair, with
    /// `--replicas k`).
    fn uploads_for(&self, category: &str, owner: &str) -> Responsibility {
        let me = self.storage.node();
        if owner == me {
            return Responsibility::Owner;
        }
        if !self.cluster.owner_lost(owner) {
            return Responsibility::None;
        }
        let held_by = self.cluster.copied_by(category, owner);
        let chosen = self
            .cluster
            .reachable_peers()
            .into_iter()
            .filter(|p| p != owner)
            .filter(|p| held_by.as_ref().is_none_or(|h| h.contains(p)))
            .all(|p| p.as_str() > me);
        if chosen {
            Responsibility::Chosen
        } else {
            Responsibility::Watch
        }
    }

    fn record_error(&self, e: &S3Error) {
        self.metrics.s3_errors.inc();
        let mut st = self.status.lock().unwrap();
        st.last_error = Some(e.message.clone());
        st.last_error_at = Some(SystemTime::now());
    }

    fn record_upload(&self, bytes: u64) {
        self.metrics.s3_uploads.inc();
        self.metrics.s3_upload_bytes.inc_by(bytes);
        let now = SystemTime::now();
        self.metrics.s3_last_success_seconds.set(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        );
        let mut st = self.status.lock().unwrap();
        st.uploaded_chunks += 1;
        st.uploaded_bytes += bytes;
        st.last_success = Some(now);
        st.last_error = None;
    }

    fn set_failing(&self, failing: Vec<chunkbus_client::FailingChunk>) {
        self.metrics.s3_failing_chunks.set(failing.len() as i64);
        self.status.lock().unwrap().failing_chunks = failing;
    }

    fn set_backlog(&self, chunks: u64, bytes: u64) {
        self.metrics.s3_backlog_chunks.set(chunks as i64);
        self.metrics.s3_backlog_bytes.set(bytes as i64);
        let mut st = self.status.lock().unwrap();
        st.backlog_chunks = chunks;
        st.backlog_bytes = bytes;
    }

    /// Checks the bucket (one clear log line when it is refused), then
    /// lists it until that succeeds once, recording chunks not held here.
    ///
    /// A fresh data directory takes writes once the listing is done. When
    /// the store refuses (bad credentials, missing bucket) or has not
    /// answered within [`FRESH_LISTING_PATIENCE`] (unreachable, or a request
    /// that hangs), it takes them anyway, with a warning: ingestion does not
    /// wait for S3. Its own uploads never overwrite an object (see the
    /// uploader).
    async fn discover(self: Arc<Self>, cancel: CancellationToken) {
        let patience = tokio::time::sleep(FRESH_LISTING_PATIENCE);
        let listing = self.list_until_done(&cancel);
        tokio::pin!(listing);
        tokio::select! {
            _ = &mut listing => return,
            _ = cancel.cancelled() => return,
            _ = patience => self.take_writes_anyway("S3 has not answered since start-up", false),
        }
        // A request that hangs does not hold the shutdown.
        tokio::select! {
            _ = listing => {}
            _ = cancel.cancelled() => {}
        }
    }

    /// Opens a fresh data directory's writes without the listing (once).
    fn take_writes_anyway(&self, why: &str, refused: bool) {
        let Some((cfg, _)) = &self.s3 else { return };
        if self.storage.fresh() && !self.writes_open.swap(true, Ordering::SeqCst) {
            tracing::warn!(bucket = %cfg.bucket, "{why}: taking writes without knowing which chunk names this node uploaded before (if it lost its disk, a colliding chunk stays local, never overwrites S3)");
            self.storage.open_writes(WRITE_GATE);
            // With bucket membership, the peers hold this node's open chunk
            // if it lost its disk: they must be known first. A store that is
            // only unreachable is waited for; one that refuses this node (no
            // such bucket, bad credentials) names no peers it could wait for.
            if refused && cfg.bucket_membership && self.cluster.members_known(true) {
                tracing::warn!(bucket = %cfg.bucket, "{why}: taking writes without knowing this node's peers (the nodes' records in the bucket cannot be read)");
            }
        }
    }

    /// The bucket's check, then its listing until one succeeds (or
    /// `cancel`).
    async fn list_until_done(&self, cancel: &CancellationToken) {
        let Some((cfg, store)) = &self.s3 else { return };
        match store.check().await {
            Ok(()) => {
                tracing::info!(bucket = %cfg.bucket, prefix = %cfg.prefix, "S3 bucket reachable")
            }
            Err(e) => {
                let hint = match e.kind {
                    S3ErrorKind::Auth => {
                        "S3 refused the credentials (check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, the profile or the instance role, and the bucket policy)"
                    }
                    S3ErrorKind::NoBucket => {
                        "the S3 bucket does not exist (create it, or fix --s3-bucket / --s3-endpoint)"
                    }
                    _ => "S3 is unreachable",
                };
                tracing::error!(bucket = %cfg.bucket, error = %e, "{hint}; chunks stay on local disk and are uploaded once it works");
                self.record_error(&e);
                if e.kind != S3ErrorKind::Other {
                    self.take_writes_anyway("S3 refuses this node", true);
                }
            }
        }
        let mut backoff = uploader::Backoff::default();
        let mut failed = loop {
            match self.list_once(cfg, store).await {
                Ok((found, failed)) => {
                    tracing::info!(bucket = %cfg.bucket, chunks = found, "S3 bucket listed");
                    self.writes_open.store(true, Ordering::SeqCst);
                    self.storage.open_writes(WRITE_GATE);
                    break failed;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list the S3 bucket; retrying");
                    self.record_error(&e);
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        };
        // A chunk that could not be recorded (S3 failed between the listing
        // and a lookup or download, the disk refused its record) is tried
        // again: nothing else revisits it until the next start, and one of
        // this node's own may be held short of what its object holds.
        let mut backoff = uploader::Backoff::default();
        while !failed.is_empty() {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
            // As the bucket holds them now: an object may have been
            // replaced (or deleted) since.
            let mut again = Vec::new();
            let mut unlisted = Vec::new();
            for (category, chunk, o) in failed {
                match store.list(&o.key).await {
                    Ok(listed) => again.extend(
                        listed
                            .into_iter()
                            .find(|l| l.key == o.key)
                            .map(|l| (category, chunk, l)),
                    ),
                    Err(e) => {
                        tracing::warn!(key = %o.key, error = %e, "cannot look up a chunk in S3; trying again");
                        self.record_error(&e);
                        unlisted.push((category, chunk, o));
                    }
                }
            }
            failed = self.record_found(store, again).await;
            failed.extend(unlisted);
        }
    }

    /// Records every chunk object under the prefix that is not held here.
    /// Returns how many objects were chunks, and the objects that could not
    /// be recorded.
    async fn list_once(
        &self,
        cfg: &S3Config,
        store: &ObjectStore,
    ) -> Result<(usize, Vec<Found>), S3Error> {
        let listed = store.list(&cfg.prefix).await?;
        let mut found = 0;
        let mut new = Vec::new();
        for o in listed {
            let Some((category, chunk)) = parse_key(&cfg.prefix, &o.key) else {
                continue;
            };
            found += 1;
            new.push((category, chunk, o));
        }
        Ok((found, self.record_found(store, new).await))
    }

    /// Records the objects `found` that are not held here as they are;
    /// returns those that could not be.
    async fn record_found(&self, store: &ObjectStore, found: Vec<Found>) -> Vec<Found> {
        // Anything else (held at another size included) is the storage's to
        // settle (see `Storage::add_remote`).
        let new = found.into_iter().filter(|(category, chunk, o)| {
            !self
                .storage
                .chunk_meta(category, chunk)
                .is_some_and(|m| m.uploaded && m.size == o.size)
        });
        // The objects' metadata numbers their lines (uploads by earlier
        // versions have none): a few lookups at a time.
        let mut heads = futures_util::stream::iter(new)
            .map(|(category, chunk, o)| async move {
                let numbers = match store.head(&o.key).await {
                    Ok(Some(h)) if h.size == o.size => h.numbers,
                    Ok(_) => None,
                    Err(e) => {
                        tracing::warn!(key = %o.key, error = %e, "cannot read the line numbers of a chunk in S3");
                        None
                    }
                };
                (category, chunk, o, numbers)
            })
            .buffered(LIST_LOOKUPS);
        let mut failed = Vec::new();
        while let Some((category, chunk, o, numbers)) = heads.next().await {
            if let Err(e) = self
                .storage
                .add_remote(&category, &chunk, o.size, o.modified_ms, numbers)
                .await
            {
                // A name or limit refused stays refused.
                if matches!(
                    e,
                    StorageError::Io { .. }
                        | StorageError::DiskFull(_)
                        | StorageError::OutOfFiles { .. }
                        | StorageError::Remote { .. }
                ) {
                    tracing::warn!(category, chunk = %chunk, error = %e, "cannot record a chunk found in S3; trying again");
                    failed.push((category, chunk, o));
                } else {
                    tracing::warn!(category, chunk = %chunk, error = %e, "cannot record a chunk found in S3");
                }
            }
        }
        failed
    }
}

/// A chunk object found in the bucket: its category, name and listing.
type Found = (String, ChunkName, store::Listed);

/// Object lookups in flight while recording the chunks found in S3.
const LIST_LOOKUPS: usize = 16;

/// Who uploads a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Responsibility {
    /// This node owns it.
    Owner,
    /// Its owner is lost and this node was chosen.
    Chosen,
    /// Its owner is lost and another node was chosen: this node only looks
    /// whether the object appeared.
    Watch,
    /// Its owner uploads it.
    None,
}

/// `{prefix}{category}/{chunk}`.
pub fn object_key(prefix: &str, category: &str, chunk: &ChunkName) -> String {
    format!("{prefix}{category}/{chunk}")
}

/// The category and chunk of a key under `prefix`, if it names one.
fn parse_key(prefix: &str, key: &str) -> Option<(String, ChunkName)> {
    let rest = key.strip_prefix(prefix)?;
    let (category, chunk) = rest.split_once('/')?;
    chunkbus_client::names::validate_category(category).ok()?;
    let chunk = ChunkName::parse(chunk).ok()?;
    Some((category.to_owned(), chunk))
}

/// Size of one ranged GET of a read-through.
const READ_PIECE_BYTES: usize = 2 << 20;

/// Reads evicted chunks with ranged GETs, for the storage's blocking readers.
#[derive(Debug)]
struct S3Reader {
    store: ObjectStore,
    prefix: String,
    runtime: tokio::runtime::Handle,
    metrics: Arc<Metrics>,
}

impl RemoteChunks for S3Reader {
    fn read_exact_at(
        &self,
        category: &str,
        chunk: &ChunkName,
        buf: &mut [u8],
        offset: u64,
    ) -> std::io::Result<()> {
        let key = object_key(&self.prefix, category, chunk);
        // Large reads go as several ranged GETs at once: one stream is
        // bounded by the store's per-request speed.
        let pieces = buf
            .chunks_mut(READ_PIECE_BYTES)
            .enumerate()
            .map(|(i, piece)| {
                let at = offset + (i * READ_PIECE_BYTES) as u64;
                let get = self.store.get_range(&key, at, piece.len() as u64);
                async move {
                    piece.copy_from_slice(&get.await?);
                    Ok::<(), S3Error>(())
                }
            });
        self.runtime
            .block_on(futures_util::future::try_join_all(pieces))
            .map_err(|e| match e.kind {
                S3ErrorKind::NotFound => std::io::Error::new(std::io::ErrorKind::NotFound, e),
                _ => std::io::Error::other(e),
            })?;
        self.metrics.s3_read_bytes.inc_by(buf.len() as u64);
        Ok(())
    }

    fn lookup(
        &self,
        category: &str,
        chunk: &ChunkName,
    ) -> std::io::Result<Option<(u64, Option<LineRecord>)>> {
        let key = object_key(&self.prefix, category, chunk);
        self.runtime
            .block_on(self.store.head(&key))
            .map(|h| h.map(|h| (h.size, h.numbers)))
            .map_err(lookup_error)
    }

    fn sizes(
        &self,
        category: &str,
        owner: &str,
    ) -> std::io::Result<std::collections::BTreeMap<ChunkName, u64>> {
        let under = format!("{}{category}/{}", self.prefix, ChunkName::prefix_of(owner));
        let listed = self
            .runtime
            .block_on(self.store.list(&under))
            .map_err(lookup_error)?;
        Ok(listed
            .into_iter()
            .filter_map(|o| {
                let (c, chunk) = parse_key(&self.prefix, &o.key)?;
                (c == category && chunk.owner == owner).then_some((chunk, o.size))
            })
            .collect())
    }
}

/// An error of the store as [`RemoteChunks::lookup`] gives it:
/// `PermissionDenied` when the store refuses this node.
fn lookup_error(e: S3Error) -> std::io::Error {
    match e.kind {
        S3ErrorKind::Auth | S3ErrorKind::NoBucket => {
            std::io::Error::new(std::io::ErrorKind::PermissionDenied, e)
        }
        _ => std::io::Error::other(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_foreign_keys_are_ignored() {
        let c = ChunkName::parse("eu1-chunk000000042").unwrap();
        let key = object_key("logs/", "app.web", &c);
        assert_eq!(key, "logs/app.web/eu1-chunk000000042");
        assert_eq!(parse_key("logs/", &key), Some(("app.web".to_owned(), c)));
        for foreign in [
            "other/app/eu1-chunk000000042",
            "logs/app/readme.txt",
            "logs/../eu1-chunk000000001",
            "logs/app/sub/eu1-chunk000000001",
            "logs/eu1-chunk000000001",
        ] {
            assert_eq!(parse_key("logs/", foreign), None, "{foreign}");
        }
    }
}
