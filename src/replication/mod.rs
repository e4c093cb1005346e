//! Leaderless replication: every node copies every peer's chunks (with
//! `--replicas k`, those of the (category, owner) pairs it holds, see
//! [`placement`]; it lists the others and reads them from their holders).
//!
//! One puller task per peer asks the peer's change feed
//! (`POST /v1/internal/changes`, a long poll the owner answers as soon as it
//! appends) and copies the missing bytes of its chunks, in chunk order per
//! owner, with the public chunk read route. Only owners append to their
//! chunks; the copies are written through the storage's replica methods,
//! which refuse chunks of this node's own name. With every request the
//! puller reports how much it holds, which the owner uses to answer writes
//! with `min_replicas` ([`progress`]).
//!
//! Failures: a peer that does not answer is retried with capped, jittered
//! backoff; the puller then starts from a full listing (`since = 0`), so
//! nothing is missed while it was away, including categories created
//! meanwhile. A peer unreachable for `--owner-lost-after` (or forgotten with
//! `forget-node`) has its open chunks completed here so readers can finish
//! them. A node whose data directory is new asks its peers which of its
//! chunks they hold before it takes writes, and restores them
//! (`bootstrap`). The protocol is described in `docs/architecture.md`.

mod bootstrap;
mod elsewhere;
mod lost;
pub use elsewhere::MAX_HELD_READ_BYTES;
pub mod placement;
pub mod progress;
pub mod protocol;
mod puller;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime};

use chunkbus_client::{ForgetReport, PeerStatus};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Peer;
use crate::consumers::Consumers;
use crate::metrics::{Metrics, PeerCategoryLabels, PeerLabels};
use crate::storage::{Storage, StorageError};
use progress::ProgressStore;

/// Settings of replication.
#[derive(Debug, Clone)]
pub struct ReplicationConfig {
    /// The other nodes.
    pub peers: Vec<Peer>,
    /// Longest wait of one long poll.
    pub wait: Duration,
    /// Time a peer may take beyond the wait.
    pub peer_timeout: Duration,
    /// Declare an unreachable peer lost after this long.
    pub owner_lost_after: Option<Duration>,
    /// A new data directory takes writes before the peers answered.
    pub first_start: bool,
    /// Presented to peers as a bearer token.
    pub cluster_secret: Option<String>,
    /// Peers are reached over HTTPS.
    pub https: bool,
    /// The CA (PEM) that signed the peers' certificates, when private.
    pub ca_pem: Option<Vec<u8>>,
    /// This node's Kafka partition order (`None`: its listener is off).
    pub kafka_nodes: Option<Arc<PartitionOrder>>,
    /// Membership through the bucket: peers are added as their records
    /// appear ([`Replication::member`]), and a peer is declared lost only
    /// when its record, too, stood still for `--owner-lost-after`.
    pub bucket: bool,
    /// How many nodes hold each chunk (`--replicas k`); `None`: every node.
    pub replicas: Option<u32>,
}

/// Replication of one node: its pullers, their state, and its replicas'
/// progress. Shared as `Arc<Replication>`.
#[derive(Debug)]
pub struct Replication {
    storage: Storage,
    consumers: Arc<Consumers>,
    cfg: ReplicationConfig,
    /// One per peer; only ever grows (a peer that left stays a peer that
    /// does not answer, as with `--peers`).
    links: RwLock<Vec<Arc<PeerLink>>>,
    /// Where the pullers of peers found later start (set by `start`).
    spawner: OnceLock<(TaskTracker, CancellationToken)>,
    /// `None` until the nodes' records in the bucket were first read
    /// (bucket membership), then whether this node's name was among them:
    /// a name the bucket never held wrote no chunk, so a new data
    /// directory has nothing to restore. `Some(true)` without bucket
    /// membership.
    members_read: tokio::sync::watch::Sender<Option<bool>>,
    /// Moves whenever the members that hold chunks change (a peer added,
    /// lost, or back): the pullers then list their owners' chunks again
    /// and copy what this node holds now.
    placement: tokio::sync::watch::Sender<u64>,
    /// While this node restores its chunks from its peers (its data
    /// directory is new, or a restore is unfinished): the chunks left to
    /// restore, 0 while the peers have not all said which they hold.
    restoring: Mutex<Option<u64>>,
    /// What the replicas hold of this node's chunks.
    pub progress: ProgressStore,
    http: reqwest::Client,
    /// Like `http` without the cluster secret: relays callers' requests
    /// with their own credentials.
    relay_http: reqwest::Client,
    metrics: Arc<Metrics>,
}

#[derive(Debug)]
struct PeerLink {
    /// The peer's node name.
    name: String,
    /// `host:port` of its HTTP listener (with bucket membership, as its
    /// record last said).
    addr: Mutex<String>,
    /// A std mutex: held only to read or set a few fields.
    state: Mutex<PeerState>,
}

impl PeerLink {
    fn new(peer: &Peer, forgotten: bool) -> Self {
        Self {
            name: peer.name.clone(),
            addr: Mutex::new(peer.addr.clone()),
            state: Mutex::new(PeerState {
                forgotten,
                ..PeerState::default()
            }),
        }
    }

    fn addr(&self) -> String {
        self.addr.lock().unwrap().clone()
    }

    /// Treated as lost (forgotten, or unreachable past `--owner-lost-after`).
    fn lost(&self) -> bool {
        self.state.lock().unwrap().forgotten
    }
}

#[derive(Debug, Default)]
struct PeerState {
    connected: bool,
    since: Option<SystemTime>,
    last_error: Option<String>,
    lag: BTreeMap<String, u64>,
    behind_since: Option<Instant>,
    down_since: Option<Instant>,
    /// Treated as lost (forgotten, or unreachable past
    /// `--owner-lost-after`) until it answers again; durable in the storage.
    forgotten: bool,
    /// (category, chunk) → (owner's size, size here) of the peer's chunks
    /// whose copy here holds more than the peer lists.
    disagreeing: BTreeMap<(String, String), (u64, u64)>,
    /// Where Kafka clients reach the peer, as it last said.
    kafka_addr: Option<String>,
    /// The peer's nodes in Kafka partition order, as it last said.
    kafka_nodes: Option<Vec<String>>,
    /// When its last answer arrived.
    last_contact: Option<SystemTime>,
    /// Its version and disk, as it last said.
    about: Option<protocol::NodeAbout>,
    /// With bucket membership: since when its record in the bucket has not
    /// been refreshed (`None` while it is).
    record_still_since: Option<Instant>,
}

/// What a node knows of a peer's Kafka listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerKafka {
    /// The peer answers now.
    pub connected: bool,
    /// Where Kafka clients reach it (`None`: listener off, or not said yet).
    pub addr: Option<String>,
    /// Its nodes in partition order.
    pub nodes: Option<Vec<String>>,
}

impl PeerKafka {
    /// True unless the peer numbers partitions in another order than
    /// `ours` (then partition `p` names different nodes on the two).
    pub fn agrees(&self, ours: &[String]) -> bool {
        self.nodes
            .as_deref()
            .is_none_or(|theirs| orders_agree(theirs, ours))
    }
}

/// True when no partition names two different nodes in `a` and `b`: a
/// partition one of them does not know yet (beyond its end, or `""`)
/// disagrees with nothing.
pub fn orders_agree(a: &[String], b: &[String]) -> bool {
    a.iter()
        .zip(b)
        .all(|(x, y)| x == y || x.is_empty() || y.is_empty())
}

/// The Kafka partition order: entry `p` names the node whose lines are
/// partition `p` of every topic (`""`: a partition whose node is not known
/// here). Fixed by `--peers`; with bucket membership it grows as the
/// nodes' numbers are read, and a known entry never changes (a number is
/// never given twice).
#[derive(Debug, Default)]
pub struct PartitionOrder(RwLock<Arc<Vec<String>>>);

impl PartitionOrder {
    /// An order of `nodes`.
    pub fn new(nodes: Vec<String>) -> Self {
        Self(RwLock::new(Arc::new(nodes)))
    }

    /// The order now.
    pub fn get(&self) -> Arc<Vec<String>> {
        self.0.read().unwrap().clone()
    }

    /// Learns the entries of `nodes` not known yet; true when it grew.
    pub fn learn(&self, nodes: &[String]) -> bool {
        let mut cur = self.0.write().unwrap();
        let mut next = (**cur).clone();
        if next.len() < nodes.len() {
            next.resize(nodes.len(), String::new());
        }
        for (slot, n) in next.iter_mut().zip(nodes) {
            if slot.is_empty() && !n.is_empty() {
                slot.clone_from(n);
            }
        }
        let grew = next != **cur;
        if grew {
            *cur = Arc::new(next);
        }
        grew
    }
}

impl Replication {
    /// Builds the replication of a node (pullers start with [`Replication::start`]).
    pub fn new(
        storage: Storage,
        consumers: Arc<Consumers>,
        cfg: ReplicationConfig,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let forgotten = storage.forgotten_owners();
        let links = cfg
            .peers
            .iter()
            .map(|p| Arc::new(PeerLink::new(p, forgotten.contains(&p.name))))
            .collect();
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(secret) = &cfg.cluster_secret
            && let Ok(mut v) = reqwest::header::HeaderValue::from_str(&format!("Bearer {secret}"))
        {
            v.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, v);
        }
        let ca = cfg.ca_pem.as_ref().and_then(|pem| {
            reqwest::Certificate::from_pem_bundle(pem)
                .inspect_err(|e| {
                    tracing::error!(error = %e, "--tls-ca is not a PEM certificate; using the system's roots")
                })
                .ok()
        });
        let client = |headers: reqwest::header::HeaderMap| {
            let mut builder = reqwest::Client::builder()
                .connect_timeout(cfg.peer_timeout)
                .tcp_nodelay(true)
                .default_headers(headers);
            if let Some(certs) = ca.clone() {
                builder = builder.tls_certs_merge(certs);
            }
            builder.build().expect("the peers' HTTP client builds")
        };
        let http = client(headers);
        let relay_http = client(reqwest::header::HeaderMap::new());
        for p in &cfg.peers {
            metrics
                .peer_connected
                .get_or_create(&PeerLabels {
                    peer: p.name.clone(),
                })
                .set(0);
        }
        let members_read = (!cfg.bucket).then_some(true);
        let restoring = (storage.fresh() || storage.restore_pending()).then_some(0);
        Arc::new(Self {
            storage,
            consumers,
            cfg,
            links: RwLock::new(links),
            spawner: OnceLock::new(),
            members_read: tokio::sync::watch::Sender::new(members_read),
            placement: tokio::sync::watch::Sender::new(0),
            restoring: Mutex::new(restoring),
            progress: ProgressStore::default(),
            http,
            relay_http,
            metrics,
        })
    }

    /// Starts one puller per peer and, for a new data directory, the
    /// bootstrap from the peers (see `bootstrap`), owned by `tasks`,
    /// stopped by `cancel`.
    pub fn start(self: &Arc<Self>, tasks: &TaskTracker, cancel: &CancellationToken) {
        bootstrap::hold_writes(self);
        tasks.spawn(bootstrap::run(self.clone(), cancel.clone()));
        tasks.spawn(self.clone().count_under_replicated(cancel.clone()));
        tasks.spawn(self.clone().drop_unheld_copies(cancel.clone()));
        tasks.spawn(self.clone().copy_lost_owners(cancel.clone()));
        tasks.spawn(self.clone().complete_forgotten());
        // Under the lock that `member` adds links with: a peer added
        // meanwhile gets its puller from exactly one of the two.
        let links = self.links.read().unwrap();
        for link in links.iter() {
            tasks.spawn(puller::run(self.clone(), link.clone(), cancel.clone()));
        }
        self.spawner
            .set((tasks.clone(), cancel.clone()))
            .expect("replication starts once");
    }

    /// Says that the nodes' records in the bucket were read and every
    /// member found was told ([`Replication::member`]); `named_before`:
    /// this node's name was among them. Only the first call counts: true
    /// for it.
    pub fn members_known(&self, named_before: bool) -> bool {
        self.members_read.send_if_modified(|known| {
            let first = known.is_none();
            if first {
                *known = Some(named_before);
            }
            first
        })
    }

    /// The bucket held no record of this node's name before this process
    /// claimed it: the name never wrote a chunk.
    fn name_is_new(&self) -> bool {
        *self.members_read.borrow() == Some(false)
    }

    /// A new data directory takes writes without asking the peers first.
    fn skip_bootstrap_wait(&self) -> bool {
        self.cfg.first_start || self.name_is_new()
    }

    /// A snapshot of the peers.
    fn links(&self) -> Vec<Arc<PeerLink>> {
        self.links.read().unwrap().clone()
    }

    fn link(&self, name: &str) -> Option<Arc<PeerLink>> {
        self.links
            .read()
            .unwrap()
            .iter()
            .find(|l| l.name == name)
            .cloned()
    }

    /// A node found in the bucket (bucket membership): a new one becomes a
    /// peer, its puller started; a known one's address follows its record.
    /// `still_since`: since when its record has not been refreshed (`None`
    /// while it is), which `--owner-lost-after` also waits for.
    pub fn member(self: &Arc<Self>, name: &str, addr: &str, still_since: Option<Instant>) {
        if name == self.node() {
            return;
        }
        if let Some(link) = self.link(name) {
            let mut a = link.addr.lock().unwrap();
            if *a != addr {
                tracing::info!(peer = name, from = %a, to = addr, "a peer's record in the bucket names a new address");
                *a = addr.to_owned();
            }
            drop(a);
            link.state.lock().unwrap().record_still_since = still_since;
            return;
        }
        let peer = Peer {
            name: name.to_owned(),
            addr: addr.to_owned(),
        };
        let link = Arc::new(PeerLink::new(
            &peer,
            self.storage.forgotten_owners().contains(name),
        ));
        link.state.lock().unwrap().record_still_since = still_since;
        {
            let mut links = self.links.write().unwrap();
            if links.iter().any(|l| l.name == name) {
                return;
            }
            links.push(link.clone());
            if let Some((tasks, cancel)) = self.spawner.get()
                && !cancel.is_cancelled()
            {
                tasks.spawn(puller::run(self.clone(), link, cancel.clone()));
            }
        }
        self.placement_moved();
        self.metrics
            .peer_connected
            .get_or_create(&PeerLabels {
                peer: name.to_owned(),
            })
            .set(0);
        tracing::info!(
            peer = name,
            addr,
            "a node found in the bucket is a peer now"
        );
    }

    /// The nodes' numbers as the bucket's records give them (bucket
    /// membership): the Kafka partition order learns the new ones.
    pub fn learn_partitions(&self, order: &[String]) {
        if let Some(o) = &self.cfg.kafka_nodes
            && o.learn(order)
        {
            tracing::info!(partitions = ?o.get(), "Kafka partitions: the nodes in the bucket by number");
        }
    }

    /// `http(s)://host:port` of a peer.
    fn peer_base(&self, link: &PeerLink) -> String {
        let scheme = if self.cfg.https { "https" } else { "http" };
        format!("{scheme}://{}", link.addr())
    }

    /// Whether peer `name` answers now, where Kafka clients reach it and
    /// its partition order (as it last said); `None` for a node that is
    /// not a peer.
    pub fn peer_kafka(&self, name: &str) -> Option<PeerKafka> {
        let link = self.link(name)?;
        let st = link.state.lock().unwrap();
        Some(PeerKafka {
            connected: st.connected,
            addr: st.kafka_addr.clone(),
            nodes: st.kafka_nodes.clone(),
        })
    }

    /// The peers are found through the bucket.
    pub fn bucket_membership(&self) -> bool {
        self.cfg.bucket
    }

    /// Number of other nodes.
    pub fn peer_count(&self) -> usize {
        self.links.read().unwrap().len()
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        self.storage.node()
    }

    /// Replication state of every peer.
    pub fn status(&self) -> Vec<PeerStatus> {
        self.links()
            .iter()
            .map(|l| {
                let st = l.state.lock().unwrap();
                PeerStatus {
                    name: l.name.clone(),
                    address: l.addr(),
                    connected: st.connected,
                    since: st
                        .since
                        .map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                    last_error: st.last_error.clone(),
                    lag_bytes: st.lag.values().sum(),
                    lag_seconds: st.behind_since.map_or(0.0, |t| t.elapsed().as_secs_f64()),
                    categories: st.lag.clone(),
                    forgotten: st.forgotten,
                    last_contact: st
                        .last_contact
                        .map(|t| humantime::format_rfc3339_millis(t).to_string()),
                    version: st.about.as_ref().map(|a| a.version.clone()),
                    disk: st.about.as_ref().map(|a| a.disk.clone()),
                    disagreeing_chunks: st
                        .disagreeing
                        .iter()
                        .map(|((category, chunk), &(owner_size, local_size))| {
                            chunkbus_client::DisagreeingChunk {
                                category: category.clone(),
                                chunk: chunk.clone(),
                                owner_size,
                                local_size,
                            }
                        })
                        .collect(),
                }
            })
            .collect()
    }

    /// Completes `node`'s open chunks here and asks every peer to do the
    /// same through its admin route, with `caller` (the Authorization the
    /// request came with): a relayed admin action carries the caller's own
    /// authority, never the cluster secret. Peers that cannot be reached or
    /// refuse are reported, not retried.
    pub async fn forget_everywhere(
        &self,
        node: &str,
        caller: Option<reqwest::header::HeaderValue>,
    ) -> Result<ForgetReport, StorageError> {
        let chunks_completed = self.forget_here(node).await?;
        let mut peers = BTreeMap::new();
        for link in self.links().iter().filter(|l| l.name != node) {
            let url = format!(
                "{}/v1/admin/forget-node/{node}?relayed=true",
                self.peer_base(link)
            );
            let mut req = self.relay_http.post(&url).timeout(self.cfg.peer_timeout);
            if let Some(auth) = &caller {
                req = req.header(reqwest::header::AUTHORIZATION, auth.clone());
            }
            let res = req.send().await.map_err(|e| e.to_string()).and_then(|r| {
                if r.status().is_success() {
                    Ok(())
                } else {
                    Err(format!("answered {}", r.status()))
                }
            });
            peers.insert(
                link.name.clone(),
                res.map_or_else(|e| format!("error: {e}"), |()| "ok".to_owned()),
            );
        }
        Ok(ForgetReport {
            node: node.to_owned(),
            chunks_completed,
            peers,
            bucket: None,
        })
    }

    /// Completes `node`'s open chunks here and treats it as lost (until it
    /// answers again).
    pub async fn forget_here(&self, node: &str) -> Result<usize, StorageError> {
        let n = self.storage.forget_owner(node).await?;
        if let Some(link) = self.link(node) {
            link.state.lock().unwrap().forgotten = true;
            self.placement_moved();
        }
        Ok(n)
    }

    /// A peer forgotten through the bucket (bucket membership): forgotten
    /// here too, unless it answers now or is forgotten already.
    pub async fn forget_member(&self, node: &str) {
        let Some(link) = self.link(node) else { return };
        {
            let st = link.state.lock().unwrap();
            if st.connected || st.forgotten {
                return;
            }
        }
        match self.forget_here(node).await {
            Ok(n) => {
                tracing::warn!(
                    peer = node,
                    chunks = n,
                    "a peer forgotten with forget-node (recorded in the bucket) is forgotten here: its open chunks are complete here"
                )
            }
            Err(e) => {
                tracing::error!(peer = node, error = %e, "cannot complete a forgotten peer's chunks")
            }
        }
    }

    /// True when `owner` will not upload its own chunks: forgotten, declared
    /// lost past `--owner-lost-after`, or not a member of the cluster.
    pub fn owner_lost(&self, owner: &str) -> bool {
        if owner == self.node() {
            return false;
        }
        match self.link(owner) {
            Some(link) => link.lost(),
            None => true,
        }
    }

    /// Names of the peers whose change feed answers now.
    pub fn reachable_peers(&self) -> Vec<String> {
        self.links
            .read()
            .unwrap()
            .iter()
            .filter(|l| l.state.lock().unwrap().connected)
            .map(|l| l.name.clone())
            .collect()
    }

    /// Records whether `link`'s peer answers. A forgotten peer that answers
    /// is not lost (forgotten while it was connected too, a forget of a live
    /// node, not only when it comes back): that is recorded durably.
    async fn set_connected(&self, link: &PeerLink, connected: bool, error: Option<String>) {
        let returned = self.note_connected(link, connected, error);
        if returned {
            self.placement_moved();
            tracing::info!(peer = %link.name, "a forgotten peer answers: no longer treated as lost");
            if let Err(e) = self.storage.owner_returned(&link.name).await {
                tracing::error!(peer = %link.name, error = %e, "cannot record that a forgotten peer is back");
            }
        }
    }

    /// Records that a peer answered, with what it said of itself.
    fn note_answer(&self, link: &PeerLink, about: Option<protocol::NodeAbout>) {
        let mut st = link.state.lock().unwrap();
        st.last_contact = Some(SystemTime::now());
        if about.is_some() {
            st.about = about;
        }
    }

    /// Records where Kafka clients reach a peer and its partition order,
    /// as its answer said.
    /// A peer whose order differs from this node's is reported when it is
    /// first seen (see `PeerKafka::agrees`).
    fn note_kafka(&self, link: &PeerLink, addr: Option<String>, nodes: Option<Vec<String>>) {
        let mut st = link.state.lock().unwrap();
        st.kafka_addr = addr;
        if st.kafka_nodes != nodes
            && let (Some(theirs), Some(ours)) = (&nodes, &self.cfg.kafka_nodes)
            && !orders_agree(theirs, &ours.get())
        {
            tracing::error!(
                peer = %link.name,
                ?theirs,
                ours = ?ours.get(),
                "a peer lists the nodes in another order: Kafka partition numbers would name different nodes, so neither names the other in its Kafka metadata until both have the same --peers order"
            );
        }
        st.kafka_nodes = nodes;
    }

    /// The in-memory part of [`Replication::set_connected`]; true when a
    /// forgotten peer answered.
    fn note_connected(&self, link: &PeerLink, connected: bool, error: Option<String>) -> bool {
        let mut st = link.state.lock().unwrap();
        let returned = connected && std::mem::take(&mut st.forgotten);
        if st.connected != connected || st.since.is_none() {
            if connected {
                tracing::info!(peer = %link.name, addr = %link.addr(), "peer connected");
            } else {
                tracing::warn!(peer = %link.name, addr = %link.addr(), error = error.as_deref().unwrap_or(""), "peer unreachable; retrying with backoff");
            }
            st.connected = connected;
            st.since = Some(SystemTime::now());
            st.down_since = (!connected).then(Instant::now);
            self.metrics
                .peer_connected
                .get_or_create(&PeerLabels {
                    peer: link.name.clone(),
                })
                .set(i64::from(connected));
        }
        st.last_error = error;
        returned
    }

    fn set_lag(&self, link: &PeerLink, lag: BTreeMap<String, u64>) {
        let mut st = link.state.lock().unwrap();
        let total: u64 = lag.values().sum();
        if total == 0 {
            st.behind_since = None;
        } else if st.behind_since.is_none() {
            st.behind_since = Some(Instant::now());
        }
        for cat in st.lag.keys().chain(lag.keys()) {
            self.metrics
                .replication_lag_bytes
                .get_or_create(&PeerCategoryLabels {
                    peer: link.name.clone(),
                    category: cat.clone(),
                })
                .set(lag.get(cat).copied().unwrap_or(0) as i64);
        }
        self.metrics
            .replication_lag_seconds
            .get_or_create(&PeerLabels {
                peer: link.name.clone(),
            })
            .set(st.behind_since.map_or(0.0, |t| t.elapsed().as_secs_f64()));
        st.lag = lag;
    }

    /// Records whether the copy here of the peer's `chunk` disagrees with
    /// the peer's listing (`Some((owner_size, local_size))`: it holds more,
    /// or other bytes under a reused name) or not (`None`).
    fn set_disagreeing(
        &self,
        link: &PeerLink,
        category: &str,
        chunk: &str,
        sizes: Option<(u64, u64)>,
    ) {
        let mut st = link.state.lock().unwrap();
        let key = (category.to_owned(), chunk.to_owned());
        let changed = match sizes {
            Some(s) => {
                let new = st.disagreeing.insert(key, s) != Some(s);
                if new {
                    tracing::error!(peer = %link.name, category, chunk, owner_size = s.0, local_size = s.1, "the copy here does not match its owner's chunk (the owner lost bytes or reused the name after it lost its disk); the copy is kept as it is");
                }
                new
            }
            None => st.disagreeing.remove(&key).is_some(),
        };
        if changed {
            self.metrics
                .copies_disagreeing
                .get_or_create(&PeerLabels {
                    peer: link.name.clone(),
                })
                .set(st.disagreeing.len() as i64);
        }
    }

    /// Declares `link`'s node lost when it has been down past `--owner-lost-after`.
    async fn maybe_declare_lost(&self, link: &PeerLink) {
        let Some(after) = self.cfg.owner_lost_after else {
            return;
        };
        let due = {
            let st = link.state.lock().unwrap();
            // With bucket membership, a peer that cannot be reached from
            // here but still refreshes its record is alive (a one-way
            // partition): it may still write its open chunks.
            let record_still =
                !self.cfg.bucket || st.record_still_since.is_some_and(|t| t.elapsed() >= after);
            !st.forgotten && record_still && st.down_since.is_some_and(|t| t.elapsed() >= after)
        };
        if !due {
            return;
        }
        match self.storage.forget_owner(&link.name).await {
            Ok(n) => {
                tracing::warn!(peer = %link.name, chunks = n, after = %humantime::format_duration(after), "peer unreachable past --owner-lost-after: its open chunks are complete here");
                link.state.lock().unwrap().forgotten = true;
                self.placement_moved();
            }
            Err(e) => {
                tracing::error!(peer = %link.name, error = %e, "cannot complete a lost peer's chunks")
            }
        }
    }
}
