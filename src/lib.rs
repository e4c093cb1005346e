//! chunkbus: a leaderless, peer-replicated chunk bus.
//!
//! The library holds the whole server; `main.rs` only parses arguments and
//! calls [`server::serve`].
//!
//! | module    | owns |
//! |-----------|------|
//! | [`auth`]    | tokens, roles, the cluster secret |
//! | [`cli`]     | the client commands of the binary (`produce`, `consume`, `tail`, ...) |
//! | [`config`]  | flags, environment, TOML file, validation |
//! | [`storage`] | chunk files, rotation, recovery, group commit, waking readers |
//! | [`consumers`] | consumer positions (a CRDT), their persistence |
//! | [`durable`] | small files written whole and atomically |
//! | [`http`]    | routes (`/v1`, Chukcha compatibility, operations), errors → status codes |
//! | [`metrics`] | the Prometheus registry of a node |
//! | [`replication`] | pulling every peer's chunks, `min_replicas`, lost owners |
//! | [`tls`]     | HTTPS for clients and peers (rustls) |
//! | [`upload`]  | the S3 tier: uploads, eviction, read-through, retention |
//! | [`ship`]    | `chunkbus ship`: following log files into the bus |
//! | [`serve`]   | the HTTP connection loop: the idle timeout, the connection cap, draining |
//! | [`server`]  | wiring: listener, storage, HTTP, signals, graceful shutdown |

pub mod auth;
pub mod cli;
pub mod config;
pub mod console;
pub mod consumers;
pub mod durable;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod kafka;
pub mod metrics;
pub mod replication;
pub mod serve;
pub mod server;
pub mod ship;
pub mod storage;
pub mod tls;
pub mod upload;
