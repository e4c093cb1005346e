//! JSON bodies of the HTTP API, shared by the server and the client.

use serde::{Deserialize, Serialize};

/// Answer to a produce request (`POST /v1/categories/{c}/lines`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProduceResponse {
    /// The chunk the lines were appended to; `None` for an empty body.
    pub chunk: Option<String>,
    /// Where the first line starts in `chunk`.
    pub offset: u64,
    /// Just past the last `\n` written.
    pub next_offset: u64,
    /// How many lines were written.
    pub lines: u64,
    /// How many other nodes confirmed the bytes (only with `min_replicas`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
}

/// One entry of `GET /v1/categories/{c}/chunks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkInfo {
    /// `<owner>-chunk<9 digits>`.
    pub name: String,
    /// The node that owns the chunk.
    pub owner: String,
    /// The chunk's index in its owner's sequence.
    pub index: u32,
    /// Bytes this node holds.
    pub size: u64,
    /// True once the owner will never append to the chunk again.
    pub complete: bool,
    /// True when this node has the bytes on its local disk.
    pub local: bool,
    /// True when the chunk is in the object store.
    pub uploaded: bool,
    /// Number of the chunk's first line in its owner's numbering of the
    /// category's lines (0, 1, 2, ... across the owner's chunks; the same
    /// on every node), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_line: Option<u64>,
    /// Lines in the `size` bytes held, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lines: Option<u64>,
}

/// One entry of Chukcha's `GET /listChunks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChukchaChunk {
    /// Chunk name.
    pub name: String,
    /// True once the chunk will not grow any more.
    pub complete: bool,
    /// Bytes this node holds.
    pub size: u64,
}

/// Body of every error answer: `{"error": "<human sentence>"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What was wrong and, where there is one, what limit applied.
    pub error: String,
}

/// `GET /v1/status`: the node at a glance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// This node's name.
    pub node: String,
    /// chunkbus version.
    pub version: String,
    /// Seconds since the node started.
    pub uptime_seconds: u64,
    /// How the node finds its peers: `peers` (`--peers`, or none) or
    /// `bucket` (the nodes' records in the S3 bucket); empty from a node
    /// that does not say.
    #[serde(default)]
    pub membership: String,
    /// The node's number in the bucket (bucket membership, once claimed):
    /// its Kafka partition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number: Option<u32>,
    /// Why writes are held (answered 503) now; empty when they go through.
    #[serde(default)]
    pub writes_held: Vec<String>,
    /// Why the last reload of the tokens file failed (the earlier tokens
    /// stay in use), until a reload works.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_reload_error: Option<String>,
    /// Every peer and how far behind this node's copy of it is.
    pub peers: Vec<PeerStatus>,
    /// Categories held here, sorted.
    pub categories: Vec<String>,
    /// The data directory's file system.
    pub disk: DiskStatus,
    /// The object-store tier; absent when S3 is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Status>,
    /// How many nodes hold each chunk (`--replicas`): `all`, or a number;
    /// empty from a node that does not say.
    #[serde(default)]
    pub replicas: String,
    /// This node's complete chunks, not in S3, that fewer other nodes hold
    /// than `replicas` asks (every peer not lost with `all`): the number
    /// to watch.
    #[serde(default)]
    pub under_replicated_chunks: u64,
    /// While this node restores its chunks from its peers (it lost its
    /// disk, or its data directory is new): the chunks it has still to
    /// restore, 0 while its peers have not all said which they hold.
    /// Absent when no restore is under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restoring_chunks: Option<u64>,
    /// With `--replicas k`: per category and owner, the nodes that hold
    /// the owner's chunks, the owner first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<PairHolders>,
}

/// The nodes that hold one owner's chunks of one category (`--replicas k`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairHolders {
    /// The category.
    pub category: String,
    /// The node that writes the chunks.
    pub owner: String,
    /// The nodes that hold them (the owner first while it is a member).
    pub nodes: Vec<String>,
    /// For the node asked's own chunks: those complete, not in S3, that
    /// fewer other nodes hold than `--replicas` asks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub under_replicated_chunks: Option<u64>,
}

/// The object-store tier of a node (`--s3-bucket`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct S3Status {
    /// The bucket.
    pub bucket: String,
    /// Key prefix in front of `{category}/{chunk}`.
    pub prefix: String,
    /// Complete chunks this node has still to upload.
    pub backlog_chunks: u64,
    /// Their bytes.
    pub backlog_bytes: u64,
    /// Chunks uploaded since the node started.
    pub uploaded_chunks: u64,
    /// Bytes uploaded since the node started.
    pub uploaded_bytes: u64,
    /// When the last upload succeeded (RFC 3339).
    pub last_success: Option<String>,
    /// The last S3 error, until an upload succeeds again.
    pub last_error: Option<String>,
    /// When the last error happened (RFC 3339).
    pub last_error_at: Option<String>,
    /// Local copies of uploaded chunks evicted since the node started.
    pub evicted_chunks: u64,
    /// Chunks that fail to upload for a reason of their own (their local
    /// copy cannot be read, their key holds another object); they are
    /// retried on their own while the others go on.
    #[serde(default)]
    pub failing_chunks: Vec<FailingChunk>,
}

/// A chunk whose upload keeps failing for a reason of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailingChunk {
    /// Its category.
    pub category: String,
    /// Its name.
    pub chunk: String,
    /// The last error.
    pub error: String,
    /// Failed attempts so far.
    pub attempts: u32,
    /// When the first attempt failed (RFC 3339).
    pub since: String,
}

/// Replication state of one peer, seen from this node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// The peer's node name.
    pub name: String,
    /// Its `host:port`.
    pub address: String,
    /// True while its changes feed answers.
    pub connected: bool,
    /// Since when `connected` has had its value (RFC 3339), if it changed yet.
    pub since: Option<String>,
    /// Last error talking to it, while disconnected.
    pub last_error: Option<String>,
    /// Bytes of its chunks it holds and this node does not yet.
    pub lag_bytes: u64,
    /// How long this node has been behind it (0 when caught up).
    pub lag_seconds: f64,
    /// `lag_bytes` per category (only categories that lag).
    pub categories: std::collections::BTreeMap<String, u64>,
    /// True while this node treats it as lost (`forget-node`, or
    /// unreachable past `--owner-lost-after`), until it answers again.
    #[serde(default)]
    pub forgotten: bool,
    /// The peer's chunks whose copy here holds more bytes than the peer
    /// lists (it lost bytes, or reused a chunk name): kept as they are,
    /// never cut back, until the peer lists them at least as large.
    #[serde(default)]
    pub disagreeing_chunks: Vec<DisagreeingChunk>,
    /// When its last replication answer arrived (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_contact: Option<String>,
    /// Its version, as it last said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Its disk, as it last said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskStatus>,
}

/// A copy that holds more than its owner lists (see [`PeerStatus`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisagreeingChunk {
    /// Category.
    pub category: String,
    /// Chunk name.
    pub chunk: String,
    /// Bytes the owner lists.
    pub owner_size: u64,
    /// Bytes held here.
    pub local_size: u64,
}

/// Disk usage of the data directory's file system.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskStatus {
    /// Bytes used.
    pub used_bytes: u64,
    /// Bytes in all.
    pub total_bytes: u64,
    /// Percent used.
    pub used_percent: u8,
    /// `--disk-high-water`, in percent.
    pub high_water_percent: u8,
}

/// Answer of `POST /v1/admin/forget-node/{node}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgetReport {
    /// The forgotten node.
    pub node: String,
    /// Chunks completed on the node that was asked.
    pub chunks_completed: usize,
    /// Per peer: `ok` or the error it answered.
    pub peers: std::collections::BTreeMap<String, String>,
    /// With bucket membership: `recorded` (every node, those down now
    /// included, and any node started later, forgets it while it stays
    /// down) or why it could not be recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
}

/// Body of `POST /v1/categories/{c}/consumers/{consumer}/acks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckRequest {
    /// The chunk read.
    pub chunk: String,
    /// Everything before this offset of `chunk` is processed.
    pub offset: u64,
}

/// Body of `PUT /v1/categories/{c}/consumers/{consumer}/position`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PositionRequest {
    /// `earliest` or `latest`.
    pub to: String,
}

/// Where a consumer stands in one owner's chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkPosition {
    /// The chunk holding the next unprocessed byte.
    pub chunk: String,
    /// Its offset.
    pub offset: u64,
}

/// `GET /v1/categories/{c}/consumers/{consumer}` (and the answer to acks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerDetail {
    /// Per owner.
    pub positions: std::collections::BTreeMap<String, ChunkPosition>,
    /// Bytes held on the node asked that the consumer has not acked.
    pub lag_bytes: u64,
    /// Bumped by each rewind or skip.
    pub generation: u64,
}

/// One entry of `GET /v1/categories/{c}/consumers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerSummary {
    /// Consumer name.
    pub name: String,
    /// Bytes held on the node asked that the consumer has not acked.
    pub lag_bytes: u64,
}
