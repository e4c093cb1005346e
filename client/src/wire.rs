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
