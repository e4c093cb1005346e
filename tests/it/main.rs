//! Black-box tests of chunkbus through HTTP: in-process nodes on
//! `127.0.0.1:0` for the API, the real binary for crashes and signals.

mod api;
mod bad_input;
mod binary;
mod browser;
mod chaos;
mod chukcha;
mod client;
mod cluster;
mod console;
mod consumers;
mod crash;
mod durability;
mod fuzz_regressions;
mod harness;
mod idempotent;
mod ingest;
mod kafka;
mod kafka_clients;
mod membership;
mod otlp_loki;
mod proxy;
mod replicas;
mod replication;
mod s3_server;
mod security;
mod ship;
mod shippers;
mod tiering;
