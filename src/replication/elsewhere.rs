//! `--replicas k`: which chunks this node copies, reading the others from
//! their holders, and counting this node's chunks with too few copies.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use chunkbus_client::ChunkName;
use reqwest::StatusCode;

use super::{Replication, placement};
use crate::storage::RemoteChunks;

/// Largest range one request to a holder may ask for (the route's bound).
pub const MAX_HELD_READ_BYTES: u64 = 8 << 20;
/// Range of one request of a larger read; the requests go at once.
const HELD_PIECE_BYTES: u64 = 2 << 20;

/// How often the chunks with too few copies are counted.
const UNDER_REPLICATED_EVERY: Duration = Duration::from_secs(2);
/// How often copies of pairs no longer held here are looked at (no S3),
/// and lost owners' chunks this node now holds are copied.
const UNHELD_COPIES_EVERY: Duration = Duration::from_secs(5);

impl Replication {
    /// The nodes that hold `owner`'s chunks of `category` (see
    /// `placement`); `None` with `--replicas all`.
    pub fn holders(&self, category: &str, owner: &str) -> Option<Vec<String>> {
        self.placed(category, owner, false)
    }

    /// The nodes that copied `owner`'s chunks of `category` while it was a
    /// member (the holders were it not lost): among them, the one that
    /// uploads a lost owner's chunks. `None` with `--replicas all`.
    pub fn copied_by(&self, category: &str, owner: &str) -> Option<Vec<String>> {
        self.placed(category, owner, true)
    }

    fn placed(&self, category: &str, owner: &str, owner_member: bool) -> Option<Vec<String>> {
        let k = self.cfg.replicas? as usize;
        let links = self.links();
        let members: Vec<&str> = std::iter::once(self.node())
            .chain(
                links
                    .iter()
                    .filter(|l| !l.lost() || (owner_member && l.name == owner))
                    .map(|l| l.name.as_str()),
            )
            .collect();
        Some(placement::holders(category, owner, &members, k))
    }

    /// True when this node holds (copies) `owner`'s chunks of `category`.
    pub fn holds(&self, category: &str, owner: &str) -> bool {
        owner == self.node()
            || self
                .holders(category, owner)
                .is_none_or(|h| h.iter().any(|n| n == self.node()))
    }

    /// How many other nodes copy a chunk of this node: the most
    /// `min_replicas` may ask for.
    pub fn other_holders(&self) -> u64 {
        let peers = self.peer_count() as u64;
        match self.cfg.replicas {
            Some(k) => peers.min(u64::from(k) - 1),
            None => peers,
        }
    }

    /// While this node restores its chunks from its peers: how many are
    /// left (0 while the peers have not all said which they hold).
    pub fn restoring_chunks(&self) -> Option<u64> {
        *self.restoring.lock().unwrap()
    }

    pub(super) fn set_restoring(&self, left: Option<u64>) {
        *self.restoring.lock().unwrap() = left;
    }

    /// `--replicas` as set: `all` or k.
    pub fn replicas_setting(&self) -> String {
        self.cfg
            .replicas
            .map_or_else(|| "all".to_owned(), |k| k.to_string())
    }

    /// With `--replicas k`: per category and owner known here, the nodes
    /// that hold the owner's chunks.
    pub fn pairs(&self) -> Vec<chunkbus_client::PairHolders> {
        if !self.partial() {
            return Vec::new();
        }
        let under = self.under_replicated_by_category();
        let mut out = Vec::new();
        for category in self.storage.categories() {
            let mut owners: Vec<String> = self
                .storage
                .chunks(&category)
                .unwrap_or_default()
                .into_iter()
                .map(|c| c.name.owner)
                .collect();
            owners.dedup();
            for owner in owners {
                let nodes = self.holders(&category, &owner).unwrap_or_default();
                let under_replicated_chunks =
                    (owner == self.node()).then(|| under.get(&category).copied().unwrap_or(0));
                out.push(chunkbus_client::PairHolders {
                    category: category.clone(),
                    owner,
                    nodes,
                    under_replicated_chunks,
                });
            }
        }
        out
    }

    /// Keeps `chunkbus_chunks_under_replicated` current until `cancel`.
    pub(super) async fn count_under_replicated(
        self: Arc<Self>,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        every(UNDER_REPLICATED_EVERY, &cancel, || async {
            let n = self.under_replicated();
            self.metrics.chunks_under_replicated.set(n as i64);
        })
        .await
    }

    /// Without S3, drops this node's complete copies of pairs it no longer
    /// holds (a holder came back, a node joined) once every holder holds
    /// the chunk whole, until `cancel`. With S3 they go once uploaded.
    pub(super) async fn drop_unheld_copies(
        self: Arc<Self>,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        if !self.partial() || self.storage.tiered() {
            return;
        }
        every(UNHELD_COPIES_EVERY, &cancel, || async {
            for category in self.storage.categories() {
                for c in self.storage.chunks(&category).unwrap_or_default() {
                    let owner = &c.name.owner;
                    if owner == self.node()
                        || !c.meta.local
                        || !c.meta.complete
                        || self.holds(&category, owner)
                    {
                        continue;
                    }
                    if cancel.is_cancelled() || !self.held_whole(&category, &c).await {
                        continue;
                    }
                    let done = self
                        .storage
                        .reclaim(&category, &c.name, crate::storage::Reclaim::NotHolder)
                        .await;
                    if let Err(e) = done {
                        tracing::warn!(category, chunk = %c.name, error = %e, "cannot drop a copy this node no longer holds");
                    }
                }
            }
        })
        .await
    }

    /// Copies the complete chunks of lost owners that this node holds now
    /// but lists as held elsewhere (a holder of theirs was lost too, or
    /// this node joined), from the nodes that hold them, until `cancel`:
    /// their pullers cannot, the owner being gone.
    pub(super) async fn copy_lost_owners(
        self: Arc<Self>,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        if !self.partial() {
            return;
        }
        every(UNHELD_COPIES_EVERY, &cancel, || async {
            for category in self.storage.categories() {
                for c in self.storage.chunks(&category).unwrap_or_default() {
                    let owner = &c.name.owner;
                    if !c.meta.elsewhere()
                        || !c.meta.complete
                        || !self.owner_lost(owner)
                        || !self.holds(&category, owner)
                        || cancel.is_cancelled()
                    {
                        continue;
                    }
                    let size = c.meta.size;
                    let (cat, chunk, repl) = (category.as_str(), &c.name, &*self);
                    let from_holders = |at: u64| async move {
                        let len = (size - at).min(MAX_HELD_READ_BYTES) as usize;
                        repl.read_from_holders(cat, chunk, len, at)
                            .await
                            .map(Some)
                            .map_err(|e| super::puller::PullError::Peer(e.to_string()))
                    };
                    match super::puller::catch_up(repl, cat, chunk, &cancel, from_holders).await {
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(category, chunk = %c.name, error = %e, "cannot copy a lost owner's chunk from its holders; retrying")
                        }
                    }
                }
            }
        })
        .await
    }

    /// True when `k` holders (all there are, with fewer members) hold
    /// all of `chunk`: each has its last byte.
    async fn held_whole(&self, category: &str, chunk: &crate::storage::ChunkStatus) -> bool {
        let (Some(k), Some(holders)) =
            (self.cfg.replicas, self.holders(category, &chunk.name.owner))
        else {
            return false;
        };
        if holders.len() < k as usize {
            return false;
        }
        let (len, at) = match chunk.meta.size {
            0 => (0, 0),
            n => (1, n - 1),
        };
        for name in holders {
            let Some(link) = self.link(&name) else {
                return false;
            };
            if self
                .read_held(&link, category, &chunk.name, len, at)
                .await
                .is_err()
            {
                return false;
            }
        }
        true
    }

    /// `--replicas k` is set.
    pub fn partial(&self) -> bool {
        self.cfg.replicas.is_some()
    }

    /// The members that hold chunks changed: pullers list again.
    pub(super) fn placement_moved(&self) {
        if self.partial() {
            self.placement.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    pub(super) fn subscribe_placement(&self) -> tokio::sync::watch::Receiver<u64> {
        self.placement.subscribe()
    }

    /// The reader of chunks held elsewhere, for the storage.
    pub fn elsewhere_reader(self: &Arc<Self>) -> Arc<dyn RemoteChunks> {
        Arc::new(HolderReader {
            repl: Arc::downgrade(self),
            runtime: tokio::runtime::Handle::current(),
        })
    }

    /// The peers to ask for `owner`'s chunk of `category`: its holders
    /// (the owner first), then the other peers that answer (a holder in
    /// their view, during a change of membership); those whose change
    /// feed answers before those whose does not (a paused or cut-off
    /// holder is asked last).
    fn sources(&self, category: &str, owner: &str) -> Vec<Arc<super::PeerLink>> {
        let links = self.links();
        let mut out: Vec<Arc<super::PeerLink>> = Vec::new();
        for name in self.holders(category, owner).unwrap_or_default() {
            if let Some(l) = links.iter().find(|l| l.name == name) {
                out.push(l.clone());
            }
        }
        if let Some(l) = links.iter().find(|l| l.name == owner)
            && !out.iter().any(|o| o.name == owner)
        {
            out.insert(0, l.clone());
        }
        for l in links {
            if !out.iter().any(|o| o.name == l.name) && l.state.lock().unwrap().connected {
                out.push(l);
            }
        }
        // Stable: the order above holds within each group.
        out.sort_by_key(|l| !l.state.lock().unwrap().connected);
        out
    }

    /// Exactly `len` bytes of a chunk held elsewhere from `offset`, from
    /// the first source that holds them.
    async fn read_from_holders(
        &self,
        category: &str,
        chunk: &ChunkName,
        len: usize,
        offset: u64,
    ) -> std::io::Result<Bytes> {
        let sources = self.sources(category, &chunk.owner);
        let mut failures = Vec::new();
        for link in sources {
            match self.read_held(&link, category, chunk, len, offset).await {
                Ok(bytes) => {
                    self.metrics.held_elsewhere_read_bytes.inc_by(len as u64);
                    return Ok(bytes);
                }
                Err(e) => failures.push(format!("{}: {e}", link.name)),
            }
        }
        Err(std::io::Error::other(format!(
            "no node that holds {chunk} answered ({})",
            if failures.is_empty() {
                "none is known".to_owned()
            } else {
                failures.join("; ")
            }
        )))
    }

    /// `len` bytes from one holder: ranges of [`HELD_PIECE_BYTES`] asked
    /// at once, the answer handed over as it came when it is one range.
    async fn read_held(
        &self,
        link: &super::PeerLink,
        category: &str,
        chunk: &ChunkName,
        len: usize,
        offset: u64,
    ) -> Result<Bytes, String> {
        let base = self.peer_base(link);
        let url = format!("{base}/v1/internal/held/{category}/{chunk}");
        let piece = |at: u64, n: usize| {
            let url = &url;
            async move {
                let resp = self
                    .http
                    .get(url)
                    .query(&[("offset", at), ("len", n as u64)])
                    .timeout(self.cfg.peer_timeout)
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                match resp.status() {
                    StatusCode::OK => {}
                    StatusCode::NOT_FOUND => return Err("does not hold that range".to_owned()),
                    s => return Err(format!("answered {s}")),
                }
                let body = resp.bytes().await.map_err(|e| e.to_string())?;
                if body.len() != n {
                    return Err(format!("sent {} bytes for {n} asked", body.len()));
                }
                Ok(body)
            }
        };
        let step = HELD_PIECE_BYTES as usize;
        let pieces = (0..len.div_ceil(step).max(1)).map(|i| {
            let at = i * step;
            piece(offset + at as u64, step.min(len - at))
        });
        let mut got = futures_util::future::try_join_all(pieces).await?;
        if got.len() == 1 {
            return Ok(got.pop().unwrap_or_default());
        }
        let mut all = bytes::BytesMut::with_capacity(len);
        for p in got {
            all.extend_from_slice(&p);
        }
        Ok(all.freeze())
    }

    /// This node's complete chunks that are not in S3 and that fewer other
    /// nodes hold than should (k-1, or every peer not lost with
    /// `--replicas all`), as the replicas' reports say.
    pub fn under_replicated(&self) -> u64 {
        self.under_replicated_by_category().values().sum()
    }

    /// [`Replication::under_replicated`] per category (those with any).
    fn under_replicated_by_category(&self) -> BTreeMap<String, u64> {
        // Copies on lost nodes do not count.
        let members: std::collections::HashSet<String> = self
            .links()
            .iter()
            .filter(|l| !l.lost())
            .map(|l| l.name.clone())
            .collect();
        let wanted = match self.cfg.replicas {
            // k, or fewer when there are fewer members.
            Some(_) => self
                .holders("", self.node())
                .map_or(0, |h| h.len().saturating_sub(1)),
            None => members.len(),
        } as u32;
        let mut under = BTreeMap::new();
        if wanted == 0 {
            return under;
        }
        let me = self.node();
        for category in self.storage.categories() {
            let n = self
                .storage
                .chunks(&category)
                .unwrap_or_default()
                .into_iter()
                .filter(|c| {
                    c.name.owner == me
                        && c.meta.complete
                        && !c.meta.uploaded
                        && self
                            .progress
                            .copies(&category, &c.name, c.meta.size, |r| members.contains(r))
                            < wanted
                })
                .count() as u64;
            if n > 0 {
                under.insert(category, n);
            }
        }
        under
    }
}

/// Runs `f` every `period` (the first time at once) until `cancel`.
async fn every<F: Future<Output = ()>>(
    period: Duration,
    cancel: &tokio_util::sync::CancellationToken,
    mut f: impl FnMut() -> F,
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        f().await;
    }
}

/// Reads chunks held elsewhere from their holders, on the storage's
/// blocking threads.
#[derive(Debug)]
struct HolderReader {
    repl: Weak<Replication>,
    runtime: tokio::runtime::Handle,
}

impl RemoteChunks for HolderReader {
    fn read_exact_at(
        &self,
        category: &str,
        chunk: &ChunkName,
        buf: &mut [u8],
        offset: u64,
    ) -> std::io::Result<()> {
        let bytes = self.read_bytes_at(category, chunk, buf.len(), offset)?;
        buf.copy_from_slice(&bytes);
        Ok(())
    }

    fn read_bytes_at(
        &self,
        category: &str,
        chunk: &ChunkName,
        len: usize,
        offset: u64,
    ) -> std::io::Result<Bytes> {
        let Some(repl) = self.repl.upgrade() else {
            return Err(std::io::Error::other("the node is stopping"));
        };
        self.runtime
            .block_on(repl.read_from_holders(category, chunk, len, offset))
    }
}
