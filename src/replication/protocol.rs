//! The node-to-node replication protocol (`/v1/internal/...`), JSON over HTTP.
//!
//! A replica asks each owner `POST /v1/internal/changes` with
//! [`ChangesRequest`]: "I am `node`; I have seen your changes up to version
//! `since`; here is how far I got (`progress`); answer when something of
//! yours changed, or after `wait_ms`". The owner answers with
//! [`ChangesResponse`]: its own chunks that changed after `since` (all of
//! them when `since` is 0), with sizes and completeness. The replica then
//! copies the missing bytes with the public chunk read route and asks again.
//! The same exchange carries consumer positions (`positions_since` →
//! `positions`), which any node may change and every node merges.
//!
//! Versions are counters of one process: they start again at 0 when a node
//! restarts. So every answer carries the owner's `incarnation` (a random
//! number drawn at start-up), the replica sends it back with `since`, and an
//! owner that finds another incarnation there answers as for `since = 0`
//! (its full listing, at once). A replica that missed its owner's restart
//! entirely (it was paused, or a partition held its connection) therefore
//! resynchronises with its next request. The replica sends its own
//! incarnation too, so that the owner drops what it knew of an earlier
//! process of that replica (its progress, for `min_replicas`).
//!
//! The chunk read route names the incarnation of the process that read the
//! bytes (`Chunkbus-Incarnation`). A replica takes bytes only from the
//! process whose listing it follows: the owner may have restarted between
//! its listing and the read (and, having lost its disk, reused the chunk's
//! name for other lines), so bytes from another process go, and the
//! replica asks for changes again at once, which brings the new process's
//! full listing.

use serde::{Deserialize, Serialize};

/// Body of `POST /v1/internal/changes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangesRequest {
    /// The asking replica.
    pub node: String,
    /// Highest change version of the owner already seen; 0 for everything.
    pub since: u64,
    /// The owner's incarnation that `since` and `positions_since` belong
    /// to (0 when none is known yet).
    #[serde(default)]
    pub incarnation: u64,
    /// The asking replica's own incarnation.
    #[serde(default)]
    pub node_incarnation: u64,
    /// How long the owner may hold the request when nothing changed.
    pub wait_ms: u64,
    /// What the replica now holds of the owner's chunks.
    #[serde(default)]
    pub progress: Vec<Progress>,
    /// Highest consumer-position version of the asked node already seen.
    #[serde(default)]
    pub positions_since: u64,
}

/// How much of one chunk a replica holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Category.
    pub category: String,
    /// Chunk name.
    pub chunk: String,
    /// Bytes held by the replica.
    pub size: u64,
}

/// Answer of `POST /v1/internal/changes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangesResponse {
    /// The owner's node name (a replica checks it against its `--peers`).
    pub node: String,
    /// The owner's incarnation: its versions mean nothing to another one.
    #[serde(default)]
    pub incarnation: u64,
    /// The owner's change version this answer is complete up to.
    pub version: u64,
    /// The owner's chunks changed after `since`, by category and index.
    pub chunks: Vec<ChangedChunk>,
    /// The asked node's consumer-position version this answer is complete up to.
    #[serde(default)]
    pub positions_version: u64,
    /// Consumers whose positions changed on the asked node after
    /// `positions_since` (merged by the asking node: positions are a CRDT).
    #[serde(default)]
    pub positions: Vec<ChangedConsumer>,
    /// `host:port` Kafka clients reach the owner at (absent when its Kafka
    /// listener is off): peers name it in their Kafka metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka_addr: Option<String>,
    /// The owner's nodes in Kafka partition order (its `--peers`), when
    /// its Kafka listener is on: peers whose order differs do not name it
    /// in their Kafka metadata (a partition number would mean different
    /// nodes on different nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka_nodes: Option<Vec<String>>,
    /// The owner's version and disk, for its peers' consoles (absent
    /// from earlier versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub about: Option<NodeAbout>,
    /// In a full listing (`since` 0): per category, the end of the owner's
    /// line numbers as recorded by it (the number its next chunk's first
    /// line takes at least, its deleted chunks included). A node that
    /// holds none of the owner's chunks (retention deleted them before it
    /// joined or lost its disk) still knows where its numbering stands.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub line_ends: std::collections::BTreeMap<String, u64>,
}

/// What a node says of itself in its replication answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAbout {
    /// `CARGO_PKG_VERSION` of its binary.
    pub version: String,
    /// Its data directory's disk.
    pub disk: chunkbus_client::DiskStatus,
}

/// A consumer's positions in one category, as the asked node holds them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangedConsumer {
    /// Category.
    pub category: String,
    /// Consumer name.
    pub consumer: String,
    /// Positions per owner, and the deletion tombstone.
    pub entry: crate::consumers::ConsumerEntry,
}

/// One changed chunk of the owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangedChunk {
    /// Category.
    pub category: String,
    /// Chunk name.
    pub chunk: String,
    /// Bytes the owner holds.
    pub size: u64,
    /// True once the owner will never append again.
    pub complete: bool,
    /// True once the chunk is in the object store: a replica with S3 on
    /// records it without copying what it does not hold yet.
    #[serde(default)]
    pub uploaded: bool,
    /// Number of the chunk's first line in the owner's numbering, when
    /// known (see `storage::numbering`; absent from earlier versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_line: Option<u64>,
    /// Lines in the `size` bytes, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lines: Option<u64>,
}

impl ChangedChunk {
    /// The listing entry of a chunk held here.
    pub fn new(category: String, chunk: &crate::storage::ChunkStatus) -> Self {
        Self {
            category,
            chunk: chunk.name.to_string(),
            size: chunk.meta.size,
            complete: chunk.meta.complete,
            uploaded: chunk.meta.uploaded,
            first_line: chunk.meta.first_line,
            lines: chunk.meta.lines,
        }
    }

    /// The numbers of the listed bytes, when both are known.
    pub fn line_record(&self) -> Option<crate::storage::numbering::LineRecord> {
        crate::storage::numbering::LineRecord::known(self.size, self.first_line, self.lines)
    }
}

/// Answer of `GET /v1/internal/copies/{node}`: every chunk of `{node}` the
/// asked node holds. A node that lost its disk asks each peer, to learn
/// which chunk names it used before and to restore its chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopiesResponse {
    /// The asked node.
    pub node: String,
    /// The asked node's incarnation.
    pub incarnation: u64,
    /// The chunks, by category and index (`complete`: the copy is).
    pub chunks: Vec<ChangedChunk>,
    /// Per category, the highest chunk index of `{node}` named by a consumer
    /// position held by the asked node (its copies may be deleted since),
    /// or by a chunk it lists but does not hold (`--replicas k`): names
    /// `{node}` must not use again.
    #[serde(default)]
    pub positions: std::collections::BTreeMap<String, u32>,
    /// Per category, the highest end of `{node}`'s line numbers the asked
    /// node recorded (its copies may be deleted since): `{node}` numbers
    /// its next lines after it.
    #[serde(default)]
    pub line_ends: std::collections::BTreeMap<String, u64>,
}
