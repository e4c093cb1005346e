//! Wire types of the operator's view of a node (`GET /v1/console`,
//! `GET /v1/categories/{category}/console`): what the web console at `/ui`
//! and `chunkbus top` show. Every figure is computed by the node; rates are
//! taken over the node's sampling interval (`sample_seconds`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{ChunkPosition, DiskStatus, S3Status};

/// `GET /v1/console`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsoleView {
    /// The node asked.
    pub node: String,
    /// Its version.
    pub version: String,
    /// Seconds since it started.
    pub uptime_seconds: u64,
    /// When the figures were taken (RFC 3339, the node's clock).
    pub taken_at: String,
    /// Seconds between two samples of the rates and of `history`.
    pub sample_seconds: f64,
    /// A consumer is `stalled` when its lag grew while it acked nothing
    /// for this long.
    pub stalled_after_seconds: f64,
    /// The whole cluster at a glance.
    pub cluster: ClusterSummary,
    /// This node first, then its peers in `--peers` order.
    pub nodes: Vec<NodeView>,
    /// The categories the caller may see, by name.
    pub categories: Vec<CategoryView>,
    /// The S3 tier of this node; absent when S3 is off.
    pub s3: Option<S3Status>,
    /// This node's last warnings and errors, newest first (only for a
    /// caller that may see every category: messages name categories).
    pub errors: Vec<LoggedEvent>,
    /// Requests answered by this node since it started, by route and
    /// status.
    pub requests: Vec<RequestCount>,
}

/// The cluster header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterSummary {
    /// Nodes answering (this node included).
    pub nodes_up: u32,
    /// Peers not answering.
    pub nodes_down: u32,
    /// Lines per second arriving in the categories shown, as this node
    /// sees them: written here plus copied here from their owners.
    pub lines_per_second: f64,
    /// Bytes per second, likewise.
    pub bytes_per_second: f64,
    /// Complete chunks this node still has to upload (S3 on).
    pub s3_backlog_chunks: Option<u64>,
    /// Their bytes.
    pub s3_backlog_bytes: Option<u64>,
    /// Warnings and errors this node logged in the last 5 minutes.
    pub errors_last_5m: u64,
    /// How many nodes hold each chunk (`--replicas`): `all` or a number;
    /// empty from a node that does not say.
    #[serde(default)]
    pub replicas: String,
    /// This node's complete chunks, not in S3, held by fewer other nodes
    /// than `replicas` asks.
    #[serde(default)]
    pub under_replicated_chunks: u64,
}

/// One node as the node asked sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    /// Node name.
    pub name: String,
    /// Its address (`--peers`); absent for the node asked.
    pub address: Option<String>,
    /// True for the node asked.
    pub this_node: bool,
    /// Answering: for a peer, its replication exchange works.
    pub up: bool,
    /// Treated as lost (`forget-node`, or down past `--owner-lost-after`).
    pub forgotten: bool,
    /// When it last answered (RFC 3339); absent for the node asked.
    pub last_contact: Option<String>,
    /// Seconds since then.
    pub last_contact_seconds: Option<f64>,
    /// The last error talking to it, while down.
    pub last_error: Option<String>,
    /// Bytes of its chunks this node does not hold yet (in the categories
    /// shown).
    pub lag_bytes: u64,
    /// How long this node has been behind it.
    pub lag_seconds: f64,
    /// Its data directory's disk, as it last said.
    pub disk: Option<DiskStatus>,
    /// Its version, as it last said.
    pub version: Option<String>,
}

/// One category.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CategoryView {
    /// Category name.
    pub name: String,
    /// Lines per second in the last sample (written here plus copied here).
    pub lines_per_second: f64,
    /// Bytes per second in the last sample.
    pub bytes_per_second: f64,
    /// Bytes per second of each sample of the last minutes, oldest first.
    pub history: Vec<f64>,
    /// Its chunks on this node.
    pub chunks: ChunkCounts,
    /// Age in seconds of the oldest complete chunk not yet in S3 (S3 on).
    pub oldest_not_uploaded_seconds: Option<f64>,
    /// The largest `lag_bytes` of its consumers.
    pub max_consumer_lag_bytes: u64,
    /// Its consumers, by name.
    pub consumers: Vec<ConsumerView>,
}

/// Chunks of a category held or known on this node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkCounts {
    /// Every chunk known here.
    pub total: u64,
    /// Not complete yet.
    pub open: u64,
    /// With their bytes on this node's disk.
    pub local: u64,
    /// In S3.
    pub uploaded: u64,
    /// In S3 and no longer on this node's disk.
    pub evicted: u64,
    /// Listed here, held by other nodes only (`--replicas k`).
    #[serde(default)]
    pub elsewhere: u64,
    /// Bytes of all of them.
    pub bytes: u64,
}

/// One consumer of a category.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsumerView {
    /// Consumer name.
    pub name: String,
    /// Its position per owner.
    pub positions: BTreeMap<String, ChunkPosition>,
    /// Bytes held on this node it has not acked.
    pub lag_bytes: u64,
    /// Age of the oldest chunk holding lines it has not acked (0 when it
    /// has acked everything).
    pub lag_seconds: f64,
    /// When its position last moved as seen by this node (an ack here or
    /// on a peer); absent when it has not moved since this node started.
    pub last_ack: Option<String>,
    /// Seconds since then.
    pub last_ack_seconds: Option<f64>,
    /// Its lag grew while it acked nothing for at least
    /// [`ConsoleView::stalled_after_seconds`].
    pub stalled: bool,
}

/// A warning or error the node logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedEvent {
    /// When (RFC 3339).
    pub time: String,
    /// `WARN` or `ERROR`.
    pub level: String,
    /// The module that logged it.
    pub target: String,
    /// The message with its fields.
    pub message: String,
}

/// Requests of one route answered with one status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestCount {
    /// HTTP method.
    pub method: String,
    /// Route pattern, e.g. `/v1/categories/{category}/lines`.
    pub route: String,
    /// Status answered.
    pub status: u16,
    /// How many.
    pub count: u64,
}

/// `GET /v1/categories/{category}/console`: a category's chunks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CategoryChunks {
    /// Category name.
    pub name: String,
    /// Copies a chunk should have besides its owner's (the peers).
    pub replicas_wanted: u32,
    /// The newest chunks, at most [`CategoryChunks::LIMIT`], by owner then
    /// index.
    pub chunks: Vec<ChunkView>,
    /// Chunks left out (the oldest).
    pub left_out: u64,
}

impl CategoryChunks {
    /// Chunks listed at most.
    pub const LIMIT: usize = 200;
}

/// One chunk in the category view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkView {
    /// Chunk name.
    pub name: String,
    /// Its owner.
    pub owner: String,
    /// Bytes held here.
    pub size: u64,
    /// `open` or `complete`.
    pub state: String,
    /// For this node's own chunks: peers known to hold all of it.
    pub replicas: Option<u32>,
    /// Bytes on this node's disk.
    pub local: bool,
    /// In S3.
    pub uploaded: bool,
    /// Lines in it, when known.
    pub lines: Option<u64>,
    /// Seconds since this node first held it.
    pub age_seconds: f64,
}
