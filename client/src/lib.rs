//! `chunkbus-client`: the wire types shared with the chunkbus server, name
//! validation, raw HTTP calls ([`Client`]), a batching [`Producer`] and an
//! acking [`Consumer`].
//!
//! The server and this crate use the same types, so the JSON on the wire has
//! exactly one definition.
//!
//! ```no_run
//! # async fn demo() -> Result<(), chunkbus_client::ClientError> {
//! use chunkbus_client::{Client, ProduceOptions};
//!
//! let client = Client::new("http://127.0.0.1:8080")?;
//! let written = client
//!     .produce("app", "first line\nsecond line\n", &ProduceOptions::default())
//!     .await?;
//! let read = client.read_chunk("app", written.chunk.as_deref().unwrap(), 0, 1 << 20).await?;
//! assert_eq!(&read.data[..], b"first line\nsecond line\n");
//! # Ok(()) }
//! ```

pub mod console;
mod consumer;
mod error;
pub mod names;
mod producer;
pub mod raw;
pub mod wire;

pub use consumer::{ConsumeError, Consumer, ConsumerConfig};
pub use error::ClientError;
pub use names::{ChunkName, NameError};
pub use producer::{Compression, Delivery, Producer, ProducerConfig};
pub use raw::{Client, NextBatch, NextOptions, ProduceOptions, ReadChunk};
pub use wire::{
    AckRequest, ChukchaChunk, ChunkInfo, ChunkPosition, ConsumerDetail, ConsumerSummary,
    DisagreeingChunk, DiskStatus, ErrorBody, FailingChunk, ForgetReport, NodeStatus, PairHolders,
    PeerStatus, PositionRequest, ProduceResponse, S3Status,
};
