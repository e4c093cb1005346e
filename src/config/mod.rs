//! Configuration of `chunkbus serve`: one typed struct, validated once.
//!
//! Every setting can come from a flag, a `CHUNKBUS_*` environment variable or
//! the TOML file named by `--config` (keys spelled like the flags, without the
//! dashes in front: `max-chunk-bytes = "64MiB"`). Flags and environment
//! variables win over the file, the file wins over the defaults. Unknown keys
//! in the file are rejected.

mod args;
mod peers;
mod size;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

pub use args::{
    AdminCommand, Cli, Command, ConsumeCmd, ProduceCmd, ServeArgs, ServerArgs, ShipCmd, TailCmd,
    read_token,
};
pub use peers::{Peer, PeerList};
pub use size::ByteSize;

use crate::storage::{StorageOptions, SyncPolicy};
use crate::upload::{
    ChecksumMode, DEFAULT_LOCAL_RETENTION, DEFAULT_PART_BYTES, DEFAULT_UPLOAD_CONCURRENCY,
    MIN_PART_BYTES, RetentionConfig, S3Config,
};

/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "./chunkbus-data";
/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default size at which a chunk is rotated.
pub const DEFAULT_MAX_CHUNK_BYTES: ByteSize = ByteSize::mib(64);
/// Default age at which a non-empty open chunk is completed.
pub const DEFAULT_ROTATE_AFTER: Duration = Duration::from_secs(60);
/// Default written bytes per category kept in the page cache behind the
/// newest write.
pub const DEFAULT_DROP_BEHIND: Option<u64> = Some(64 << 20);
/// Default longest line.
pub const DEFAULT_MAX_LINE_BYTES: ByteSize = ByteSize::mib(1);
/// Default largest (decoded) request body.
pub const DEFAULT_MAX_BODY_BYTES: ByteSize = ByteSize::mib(64);
/// Default bound on the bytes of request bodies held in memory at once.
pub const DEFAULT_MAX_INFLIGHT_BYTES: ByteSize = ByteSize::mib(512);
/// Default disk usage above which writes are shed with 503.
pub const DEFAULT_DISK_HIGH_WATER_PERCENT: u8 = 90;
/// Default longest wait of a replication long poll.
pub const DEFAULT_REPLICATION_WAIT: Duration = Duration::from_secs(30);
/// Default time a peer may take to answer beyond a long poll's wait.
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default longest time for a request body to arrive.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Default of `--max-categories`.
pub const DEFAULT_MAX_CATEGORIES: usize = 10_000;
/// Default of `--idle-timeout`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default cap on open connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Largest body the in-flight accounting can admit in one request.
const MAX_BODY_BYTES_LIMIT: u64 = u32::MAX as u64;

/// A problem with the configuration, reported before anything starts.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The TOML file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TOML file is not valid or has unknown keys.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's explanation (names the key and line).
        message: String,
    },
    /// A value is out of range or inconsistent with another.
    #[error("invalid setting: {0}")]
    Invalid(String),
}

/// `--sync`: when appended bytes reach stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncSetting(pub SyncPolicy);

impl FromStr for SyncSetting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "always" => Ok(Self(SyncPolicy::Always)),
            "never" => Ok(Self(SyncPolicy::Never)),
            other => humantime::parse_duration(other)
                .map_err(|e| {
                    format!("{other:?} is not 'always', 'never' or an interval like '100ms' ({e})")
                })
                .and_then(|d| {
                    if d.is_zero() {
                        Err("the sync interval must be longer than zero; use 'always'".into())
                    } else {
                        Ok(Self(SyncPolicy::Interval(d)))
                    }
                }),
        }
    }
}

/// A human duration (`250ms`, `10s`, `5m`) in flags and config files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(s)
            .map(Self)
            .map_err(|e| format!("{s:?} is not a duration like 250ms, 10s or 5m ({e})"))
    }
}

/// A percentage of the data directory's file system, `90%` or `90`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Percent(pub u8);

impl FromStr for Percent {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let n: u8 = s
            .trim()
            .trim_end_matches('%')
            .parse()
            .map_err(|_| format!("{s:?} is not a percentage like 90%"))?;
        if n == 0 || n > 100 {
            return Err(format!("{s:?} must be between 1% and 100%"));
        }
        Ok(Self(n))
    }
}

macro_rules! deserialize_from_str {
    ($($t:ty),*) => {$(
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}
deserialize_from_str!(SyncSetting, HumanDuration, Percent, Preallocate);

/// `--preallocate`: whether open chunks may get zeros written ahead of
/// their data (a "zero runway", see the storage module).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preallocate {
    /// Where the file system gains by it (ext4, XFS), for chunks taking
    /// many small synced writes.
    Auto,
    /// Never: chunk files only ever grow by their data.
    Off,
}

impl FromStr for Preallocate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "off" => Ok(Self::Off),
            other => Err(format!("{other:?} is not 'auto' or 'off'")),
        }
    }
}

/// `--drop-behind`: written data kept in the page cache behind each
/// category's newest write (`None`: `off`, the kernel decides).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropBehind(pub Option<u64>);

impl FromStr for DropBehind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "off" => Ok(Self(None)),
            size => size
                .parse::<ByteSize>()
                .map(|b| Self(Some(b.0)))
                .map_err(|e| format!("{e}, or 'off'")),
        }
    }
}

impl<'de> serde::Deserialize<'de> for DropBehind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match <size::RawSize as serde::Deserialize>::deserialize(d)? {
            size::RawSize::Int(n) => Ok(Self(Some(n))),
            size::RawSize::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// `--replicas`: how many nodes hold each chunk (`None`: all of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replicas(pub Option<u32>);

impl FromStr for Replicas {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "all" => Ok(Self(None)),
            n => match n.parse::<u32>() {
                Ok(k) if k >= 1 => Ok(Self(Some(k))),
                _ => Err(format!(
                    "{n:?} is not 'all' or a number of nodes (1 or more)"
                )),
            },
        }
    }
}

impl<'de> serde::Deserialize<'de> for Replicas {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => n.to_string().parse().map_err(serde::de::Error::custom),
            Raw::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// The validated configuration of a node.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Where chunks and state live.
    pub data_dir: PathBuf,
    /// This node's name; it owns the chunks named `<node>-chunk*`.
    pub node: String,
    /// Address of the HTTP listener.
    pub listen: SocketAddr,
    /// Size at which an open chunk is completed and a new one started.
    pub max_chunk_bytes: u64,
    /// Age at which a non-empty open chunk is completed.
    pub rotate_after: Duration,
    /// When appended bytes are flushed to stable storage by default.
    pub sync: SyncPolicy,
    /// Whether open chunks may get zeros written ahead of their data.
    pub preallocate: Preallocate,
    /// Written bytes of each category kept in the page cache behind its
    /// newest write; `None`: the kernel decides.
    pub drop_behind: Option<u64>,
    /// Longest accepted line, without its `\n`.
    pub max_line_bytes: u64,
    /// Largest accepted request body, after decoding.
    pub max_body_bytes: u64,
    /// Bound on request body bytes held in memory at once.
    pub max_inflight_bytes: u64,
    /// Disk usage (percent of the file system) above which writes get 503.
    pub disk_high_water_percent: u8,
    /// The other nodes of the cluster (this node excluded); with bucket
    /// membership ([`S3Config::bucket_membership`]), found at run time.
    pub peers: Vec<Peer>,
    /// Where peers reach this node (`--advertise-addr`); `None`: the
    /// address it listens on.
    pub advertise_addr: Option<String>,
    /// Declare a peer lost (complete its open chunks here) after it has been
    /// unreachable this long; `None`: never.
    pub owner_lost_after: Option<Duration>,
    /// How many nodes hold each chunk (`--replicas k`); `None`: all.
    pub replicas: Option<u32>,
    /// A new data directory takes writes without asking the peers first
    /// (`--first-start`).
    pub first_start: bool,
    /// Longest wait of one replication long poll.
    pub replication_wait: Duration,
    /// Time a peer may take to answer, beyond a long poll's wait.
    pub peer_timeout: Duration,
    /// The S3 tier; `None`: local disk only.
    pub s3: Option<S3Config>,
    /// Eviction and retention ages.
    pub retention: RetentionConfig,
    /// Tokens and the cluster secret.
    pub auth: AuthSettings,
    /// HTTPS; `None`: plain HTTP.
    pub tls: Option<TlsSettings>,
    /// Longest time a request body may take to arrive.
    pub request_timeout: Duration,
    /// Longest a connection may go without sending a complete request
    /// header (before its first request, or between two).
    pub idle_timeout: Duration,
    /// Open connections at most.
    pub max_connections: usize,
    /// Categories writes may create at most.
    pub max_categories: usize,
    /// The Kafka listener; `None`: off.
    pub kafka: Option<KafkaSettings>,
    /// `--kafka-allow-anonymous`: serve Kafka clients although tokens are
    /// configured (the listener takes no token).
    pub kafka_allow_anonymous: bool,
    /// The stock agent APIs.
    pub ingest: IngestSettings,
}

/// A stock agent API the HTTP listener may serve (docs/ingest.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IngestApi {
    /// Elasticsearch's bulk API and its probes.
    Es,
    /// OTLP/HTTP logs.
    Otlp,
    /// Loki's push API.
    Loki,
    /// Splunk's HTTP Event Collector.
    Hec,
}

impl IngestApi {
    /// Every one, in `--ingest-apis` order.
    pub const ALL: [IngestApi; 4] = [
        IngestApi::Es,
        IngestApi::Otlp,
        IngestApi::Loki,
        IngestApi::Hec,
    ];

    /// Its name in `--ingest-apis`.
    pub fn name(self) -> &'static str {
        match self {
            IngestApi::Es => "es",
            IngestApi::Otlp => "otlp",
            IngestApi::Loki => "loki",
            IngestApi::Hec => "hec",
        }
    }
}

/// `--ingest-apis` and the settings of each API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestSettings {
    /// The APIs served.
    pub apis: std::collections::BTreeSet<IngestApi>,
    /// `--hec-default-category`.
    pub hec_default_category: String,
    /// `--otlp-category-attribute`.
    pub otlp_category_attribute: String,
    /// `--otlp-default-category`.
    pub otlp_default_category: String,
    /// `--loki-category-label`.
    pub loki_category_label: String,
    /// `--loki-default-category`.
    pub loki_default_category: String,
}

impl Default for IngestSettings {
    fn default() -> Self {
        Self {
            apis: IngestApi::ALL.into_iter().collect(),
            hec_default_category: "hec".into(),
            otlp_category_attribute: "service.name".into(),
            otlp_default_category: "otlp".into(),
            loki_category_label: "job".into(),
            loki_default_category: "loki".into(),
        }
    }
}

impl IngestSettings {
    fn resolve(args: &ServeArgs) -> Result<Self, ConfigError> {
        let mut out = IngestSettings::default();
        if let Some(list) = args.ingest_apis.as_deref() {
            out.apis.clear();
            for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                if name == "none" {
                    continue;
                }
                let api = IngestApi::ALL
                    .into_iter()
                    .find(|a| a.name() == name)
                    .ok_or_else(|| {
                        ConfigError::Invalid(format!(
                            "--ingest-apis: unknown API {name:?} (known: es, otlp, loki, hec, or none)"
                        ))
                    })?;
                out.apis.insert(api);
            }
        }
        for (flag, given, setting) in [
            (
                "--hec-default-category",
                &args.hec_default_category,
                &mut out.hec_default_category,
            ),
            (
                "--otlp-default-category",
                &args.otlp_default_category,
                &mut out.otlp_default_category,
            ),
            (
                "--loki-default-category",
                &args.loki_default_category,
                &mut out.loki_default_category,
            ),
        ] {
            if let Some(c) = given {
                chunkbus_client::names::validate_category(c)
                    .map_err(|e| ConfigError::Invalid(format!("{flag}: {e}")))?;
                *setting = c.clone();
            }
        }
        for (flag, given, setting) in [
            (
                "--otlp-category-attribute",
                &args.otlp_category_attribute,
                &mut out.otlp_category_attribute,
            ),
            (
                "--loki-category-label",
                &args.loki_category_label,
                &mut out.loki_category_label,
            ),
        ] {
            if let Some(key) = given {
                if key.is_empty() {
                    return Err(ConfigError::Invalid(format!("{flag} may not be empty")));
                }
                *setting = key.clone();
            }
        }
        Ok(out)
    }
}

/// `--kafka-listen` and what goes with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaSettings {
    /// Where the Kafka listener listens.
    pub listen: SocketAddr,
    /// `host:port` clients are told to reach this node at; `None`: the
    /// address the listener is bound to (known once bound, for port 0).
    pub advertised: Option<String>,
    /// Every node of the cluster in `--peers` order, this one included:
    /// partition `p` of every topic is the `p`-th node's lines.
    pub nodes: Vec<String>,
    /// Other nodes that must hold a produce with acks=all before it is
    /// answered.
    pub acks_all_replicas: u32,
}

/// `--tls-cert`, `--tls-key`, `--tls-ca`.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// The server's rustls configuration (certificate and key loaded).
    pub server: std::sync::Arc<rustls::ServerConfig>,
    /// The CA that signed the peers' certificates (PEM), if private.
    pub ca_pem: Option<Vec<u8>>,
}

/// Who may use the node (see [`crate::auth`]).
#[derive(Debug, Clone, Default)]
pub struct AuthSettings {
    /// `--tokens-file`, reloaded on SIGHUP.
    pub tokens_file: Option<PathBuf>,
    /// `[[token]]` tables of the config file.
    pub tokens: Vec<crate::auth::TokenSpec>,
    /// The cluster secret, read from `--cluster-secret-file`.
    pub cluster_secret: Option<String>,
    /// `--cluster-secret-file` (for the start-up check of its permissions).
    pub cluster_secret_file: Option<PathBuf>,
    /// `--allow-anonymous`.
    pub allow_anonymous: bool,
}

impl AuthSettings {
    /// The node's [`crate::auth::Auth`].
    pub fn build(&self) -> Result<crate::auth::Auth, crate::auth::TokensError> {
        crate::auth::Auth::new(
            self.tokens_file.clone(),
            self.tokens.clone(),
            self.cluster_secret.clone(),
        )
    }
}

impl ServeConfig {
    /// Merges flags/environment with the config file and the defaults, and validates.
    pub fn resolve(args: ServeArgs) -> Result<Self, ConfigError> {
        let args = match &args.config {
            Some(path) => args.clone().or(load_file(path)?),
            None => args,
        };
        let s3 = s3_config(&args)?;
        let ingest = IngestSettings::resolve(&args)?;
        let auth = AuthSettings {
            tokens_file: args.tokens_file.clone(),
            tokens: args.token.clone().unwrap_or_default(),
            cluster_secret: args
                .cluster_secret_file
                .as_deref()
                .map(crate::auth::load_secret_file)
                .transpose()
                .map_err(|e| ConfigError::Invalid(e.to_string()))?,
            cluster_secret_file: args.cluster_secret_file.clone(),
            allow_anonymous: args.allow_anonymous,
        };
        let tls = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(TlsSettings {
                server: crate::tls::server_config(cert, key)
                    .map_err(|e| ConfigError::Invalid(e.to_string()))?,
                ca_pem: args
                    .tls_ca
                    .as_ref()
                    .map(|p| {
                        std::fs::read(p).map_err(|e| {
                            ConfigError::Invalid(format!(
                                "cannot read --tls-ca {}: {e}",
                                p.display()
                            ))
                        })
                    })
                    .transpose()?,
            }),
            (None, None) if args.tls_ca.is_none() => None,
            (None, None) => {
                return Err(ConfigError::Invalid(
                    "--tls-ca needs --tls-cert and --tls-key".into(),
                ));
            }
            _ => {
                return Err(ConfigError::Invalid(
                    "--tls-cert and --tls-key go together".into(),
                ));
            }
        };
        let node = match args.node {
            Some(node) => {
                chunkbus_client::names::validate_node(&node)
                    .map_err(|e| ConfigError::Invalid(e.to_string()))?;
                node
            }
            None => default_node_name(),
        };
        let listen_raw = args.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen = listen_raw.parse().map_err(|_| {
            ConfigError::Invalid(format!(
                "--listen {listen_raw:?} is not an address like 127.0.0.1:8080 or [::1]:8080"
            ))
        })?;
        let cfg = Self {
            data_dir: args.data_dir.unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
            node,
            listen,
            max_chunk_bytes: args.max_chunk_bytes.unwrap_or(DEFAULT_MAX_CHUNK_BYTES).0,
            rotate_after: args.rotate_after.map_or(DEFAULT_ROTATE_AFTER, |d| d.0),
            sync: args.sync.map_or(SyncPolicy::Always, |s| s.0),
            preallocate: args.preallocate.unwrap_or(Preallocate::Auto),
            drop_behind: args.drop_behind.map_or(DEFAULT_DROP_BEHIND, |d| d.0),
            max_line_bytes: args.max_line_bytes.unwrap_or(DEFAULT_MAX_LINE_BYTES).0,
            max_body_bytes: args.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES).0,
            max_inflight_bytes: args
                .max_inflight_bytes
                .unwrap_or(DEFAULT_MAX_INFLIGHT_BYTES)
                .0,
            disk_high_water_percent: args
                .disk_high_water
                .map_or(DEFAULT_DISK_HIGH_WATER_PERCENT, |p| p.0),
            peers: Vec::new(),
            advertise_addr: args.advertise_addr,
            owner_lost_after: args.owner_lost_after.map(|d| d.0),
            replicas: args.replicas.and_then(|r| r.0),
            first_start: args.first_start,
            replication_wait: args
                .replication_wait
                .map_or(DEFAULT_REPLICATION_WAIT, |d| d.0),
            peer_timeout: args.peer_timeout.map_or(DEFAULT_PEER_TIMEOUT, |d| d.0),
            s3,
            auth,
            tls,
            request_timeout: args
                .request_timeout
                .map_or(DEFAULT_REQUEST_TIMEOUT, |d| d.0),
            idle_timeout: args.idle_timeout.map_or(DEFAULT_IDLE_TIMEOUT, |d| d.0),
            max_connections: args.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
            max_categories: args.max_categories.unwrap_or(DEFAULT_MAX_CATEGORIES),
            kafka: None,
            kafka_allow_anonymous: false,
            ingest,
            retention: RetentionConfig {
                local_retention: args
                    .local_retention
                    .map_or(DEFAULT_LOCAL_RETENTION, |d| d.0),
                retention: args.retention.map(|d| d.0),
            },
        };
        let mut cfg = cfg;
        if let Some(s3) = &mut cfg.s3 {
            s3.bucket_membership = args.peers.is_none();
        }
        let peers = args.peers.unwrap_or_default();
        cfg.kafka = kafka_settings(
            &cfg.node,
            args.kafka_listen.as_deref(),
            args.kafka_advertised_addr,
            args.kafka_acks_all_replicas,
            &peers,
            cfg.bucket_membership(),
            cfg.replicas,
        )?;
        cfg.kafka_allow_anonymous = args.kafka_allow_anonymous;
        cfg.peers = others(&cfg.node, listen, peers)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |s: String| Err(ConfigError::Invalid(s));
        if self.max_chunk_bytes == 0 {
            return invalid("--max-chunk-bytes must be larger than zero".into());
        }
        if self.rotate_after.is_zero() {
            return invalid("--rotate-after must be longer than zero".into());
        }
        if self.request_timeout.is_zero() {
            return invalid("--request-timeout must be longer than zero".into());
        }
        if self.idle_timeout.is_zero() {
            return invalid("--idle-timeout must be longer than zero".into());
        }
        if self.max_connections == 0 {
            return invalid("--max-connections must be at least 1".into());
        }
        if self.max_categories == 0 {
            return invalid("--max-categories must be at least 1".into());
        }
        if self.max_line_bytes == 0 {
            return invalid("--max-line-bytes must be larger than zero".into());
        }
        if self.max_body_bytes > MAX_BODY_BYTES_LIMIT {
            return invalid(format!(
                "--max-body-bytes {} is above the largest supported body, {}",
                ByteSize(self.max_body_bytes),
                ByteSize(MAX_BODY_BYTES_LIMIT)
            ));
        }
        if self.max_line_bytes > self.max_body_bytes {
            return invalid(format!(
                "--max-line-bytes ({}) must not exceed --max-body-bytes ({})",
                ByteSize(self.max_line_bytes),
                ByteSize(self.max_body_bytes)
            ));
        }
        let auth = self
            .auth
            .build()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if !auth.required() && !self.auth.allow_anonymous && !self.listen.ip().is_loopback() {
            return invalid(format!(
                "no tokens are configured, so chunkbus listens on loopback only, not on {}: give --tokens-file (see docs/security.md), or --allow-anonymous to serve anyone who can reach it",
                self.listen
            ));
        }
        if let Some(k) = &self.kafka
            && !auth.required()
            && !self.auth.allow_anonymous
            && !k.listen.ip().is_loopback()
        {
            return invalid(format!(
                "no tokens are configured, so chunkbus listens on loopback only, not on --kafka-listen {}: give --allow-anonymous to serve anyone who can reach it",
                k.listen
            ));
        }
        if auth.required() && self.kafka.is_some() && !self.kafka_allow_anonymous {
            return invalid(
                "tokens are configured, but Kafka clients cannot present one (the Kafka listener speaks no SASL): without --kafka-listen, or with --kafka-allow-anonymous to let anyone who reaches it read and write every category".into(),
            );
        }
        let bucket = self.bucket_membership();
        match &self.advertise_addr {
            Some(_) if !bucket => {
                return invalid(
                    "--advertise-addr is where the nodes that find each other through the S3 bucket reach this one; with --peers (or without S3) the peers' addresses come from --peers".into(),
                );
            }
            Some(a) if !is_host_port(a) => {
                return invalid(format!("--advertise-addr {a:?} must be host:port"));
            }
            None if bucket && self.listen.ip().is_unspecified() => {
                return invalid(format!(
                    "--listen {} listens on every address, and the other nodes of the bucket need one to reach this node at: give --advertise-addr",
                    self.listen
                ));
            }
            _ => {}
        }
        if auth.required() && !self.peers.is_empty() && !auth.has_cluster_secret() {
            return invalid(
                "tokens are configured and --peers is set: the nodes need --cluster-secret-file to reach each other".into(),
            );
        }
        if self.max_body_bytes > self.max_inflight_bytes {
            return invalid(format!(
                "--max-body-bytes ({}) must not exceed --max-inflight-bytes ({}): such a body could never be admitted",
                ByteSize(self.max_body_bytes),
                ByteSize(self.max_inflight_bytes)
            ));
        }
        Ok(())
    }

    /// The nodes find each other through the S3 bucket (S3 on, no
    /// `--peers`).
    pub fn bucket_membership(&self) -> bool {
        self.s3.as_ref().is_some_and(|s| s.bucket_membership)
    }

    /// The storage layer's part of the configuration.
    pub fn storage_options(&self) -> StorageOptions {
        StorageOptions {
            data_dir: self.data_dir.clone(),
            node: self.node.clone(),
            max_chunk_bytes: self.max_chunk_bytes,
            rotate_after: self.rotate_after,
            sync: self.sync,
            disk_high_water_percent: self.disk_high_water_percent,
            tiered: self.s3.is_some(),
            zero_runway: self.preallocate == Preallocate::Auto,
            drop_behind: self.drop_behind,
            max_categories: self.max_categories,
            idle_close_after: crate::storage::IDLE_CLOSE_AFTER,
        }
    }
}

/// The `--s3-*` settings, validated; `None` without `--s3-bucket`.
fn s3_config(args: &ServeArgs) -> Result<Option<S3Config>, ConfigError> {
    let invalid = |s: String| ConfigError::Invalid(s);
    let Some(bucket) = args.s3_bucket.clone() else {
        let stray = [
            ("--s3-prefix", args.s3_prefix.is_some()),
            ("--s3-endpoint", args.s3_endpoint.is_some()),
            ("--s3-region", args.s3_region.is_some()),
            ("--s3-checksum", args.s3_checksum.is_some()),
            ("--s3-part-size", args.s3_part_size.is_some()),
            (
                "--s3-upload-concurrency",
                args.s3_upload_concurrency.is_some(),
            ),
            ("--s3-claim-refresh", args.s3_claim_refresh.is_some()),
        ];
        if let Some((flag, _)) = stray.iter().find(|(_, set)| *set) {
            return Err(invalid(format!("{flag} needs --s3-bucket")));
        }
        return Ok(None);
    };
    // Bucket names as S3 defines them (3-63 of a-z 0-9 . -), plus the
    // underscores and capitals some compatible stores allow.
    let valid_bucket = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
    if !valid_bucket {
        return Err(invalid(format!(
            "--s3-bucket {bucket:?} is not a bucket name (3-63 letters, digits, '.', '-')"
        )));
    }
    let prefix = args.s3_prefix.clone().unwrap_or_default();
    if prefix.starts_with('/') || prefix.split('/').any(|p| p == "..") {
        return Err(invalid(format!(
            "--s3-prefix {prefix:?} must not start with '/' or contain '..'"
        )));
    }
    if let Some(e) = &args.s3_endpoint
        && !(e.starts_with("http://") || e.starts_with("https://"))
    {
        return Err(invalid(format!(
            "--s3-endpoint {e:?} must be a URL like http://127.0.0.1:9000"
        )));
    }
    let checksum = match &args.s3_checksum {
        Some(c) => c
            .parse()
            .map_err(|e| invalid(format!("--s3-checksum: {e}")))?,
        None => ChecksumMode::Md5,
    };
    let part_bytes = args.s3_part_size.map_or(DEFAULT_PART_BYTES, |s| s.0);
    if part_bytes < MIN_PART_BYTES {
        return Err(invalid(format!(
            "--s3-part-size {} is below S3's smallest part, {}",
            ByteSize(part_bytes),
            ByteSize(MIN_PART_BYTES)
        )));
    }
    let concurrency = args
        .s3_upload_concurrency
        .unwrap_or(DEFAULT_UPLOAD_CONCURRENCY);
    if concurrency == 0 {
        return Err(invalid("--s3-upload-concurrency must be at least 1".into()));
    }
    let claim_refresh = args
        .s3_claim_refresh
        .map_or(crate::upload::DEFAULT_CLAIM_REFRESH, |d| d.0);
    if claim_refresh < Duration::from_millis(100) || claim_refresh > Duration::from_secs(60) {
        return Err(invalid(
            "--s3-claim-refresh must be between 100ms and 60s".into(),
        ));
    }
    Ok(Some(S3Config {
        bucket,
        prefix,
        endpoint: args.s3_endpoint.clone(),
        region: args.s3_region.clone(),
        checksum,
        part_bytes,
        concurrency,
        claim_refresh,
        bucket_membership: false,
    }))
}

/// The Kafka listener's settings (`None` without `--kafka-listen`).
fn kafka_settings(
    node: &str,
    listen: Option<&str>,
    advertised: Option<String>,
    acks_all_replicas: Option<u32>,
    peers: &PeerList,
    bucket: bool,
    replicas: Option<u32>,
) -> Result<Option<KafkaSettings>, ConfigError> {
    let Some(listen_raw) = listen else {
        if advertised.is_some() || acks_all_replicas.is_some() {
            return Err(ConfigError::Invalid(
                "--kafka-advertised-addr and --kafka-acks-all-replicas need --kafka-listen".into(),
            ));
        }
        return Ok(None);
    };
    let listen: SocketAddr = listen_raw.parse().map_err(|_| {
        ConfigError::Invalid(format!(
            "--kafka-listen {listen_raw:?} is not an address like 127.0.0.1:9092"
        ))
    })?;
    let advertised = match advertised {
        Some(a) => {
            if !is_host_port(&a) {
                return Err(ConfigError::Invalid(format!(
                    "--kafka-advertised-addr {a:?} must be host:port"
                )));
            }
            Some(a)
        }
        None if listen.ip().is_unspecified() => {
            return Err(ConfigError::Invalid(format!(
                "--kafka-listen {listen} listens on every address: say which one clients reach this node at with --kafka-advertised-addr"
            )));
        }
        None => None,
    };
    let nodes: Vec<String> = if peers.0.is_empty() {
        vec![node.to_owned()]
    } else {
        peers.0.iter().map(|p| p.name.clone()).collect()
    };
    if !nodes.iter().any(|n| n == node) {
        return Err(ConfigError::Invalid(format!(
            "with --kafka-listen, --peers must name every node, this one ({node}) included, in the same order on every node: partition p of every topic is the p-th node of that list"
        )));
    }
    // With bucket membership the other nodes are known at run time:
    // acks=all waits for at most as many as the bucket names then.
    let others = if bucket {
        u32::MAX
    } else {
        nodes.len() as u32 - 1
    };
    // With --replicas k, k-1 other nodes copy a chunk.
    let holders = replicas.map_or(others, |k| others.min(k - 1));
    let acks_all_replicas = acks_all_replicas.unwrap_or(holders.min(1));
    if acks_all_replicas > holders {
        return Err(ConfigError::Invalid(match replicas {
            Some(k) if k - 1 < others => format!(
                "--kafka-acks-all-replicas {acks_all_replicas} is above --replicas {k} minus one (the other nodes that hold a chunk)"
            ),
            _ => format!(
                "--kafka-acks-all-replicas {acks_all_replicas}: there are only {others} other nodes"
            ),
        }));
    }
    Ok(Some(KafkaSettings {
        listen,
        advertised,
        nodes,
        acks_all_replicas,
    }))
}

/// `host:port` with a port number.
fn is_host_port(a: &str) -> bool {
    a.rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
}

/// The peers other than `node`; refuses a list that names `node` with an
/// address other than the one it listens on.
fn others(node: &str, listen: SocketAddr, peers: PeerList) -> Result<Vec<Peer>, ConfigError> {
    let mut out = Vec::new();
    for p in peers.0 {
        if p.name != node {
            out.push(p);
            continue;
        }
        let same = match p.addr.parse::<SocketAddr>() {
            Ok(a) => a == listen || (listen.ip().is_unspecified() && a.port() == listen.port()),
            Err(_) => p
                .addr
                .rsplit_once(':')
                .is_some_and(|(_, port)| port == listen.port().to_string()),
        };
        if !same {
            return Err(ConfigError::Invalid(format!(
                "--peers names this node ({node}) with address {}, but it listens on {listen}",
                p.addr
            )));
        }
    }
    Ok(out)
}

fn load_file(path: &Path) -> Result<ServeArgs, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// The host name, made into a valid node name.
pub fn default_node_name() -> String {
    let uname = rustix::system::uname();
    let host = uname.nodename().to_string_lossy();
    chunkbus_client::names::sanitize_node(&host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn serve_args(argv: &[&str]) -> ServeArgs {
        let cli = Cli::try_parse_from(argv).unwrap();
        match cli.command {
            Command::Serve(a) => *a,
            _ => unreachable!("tests parse serve"),
        }
    }

    #[test]
    fn defaults_are_safe() {
        let cfg = ServeConfig::resolve(serve_args(&["chunkbus", "serve"])).unwrap();
        assert_eq!(cfg.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(cfg.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(cfg.sync, SyncPolicy::Always);
        assert_eq!(cfg.preallocate, Preallocate::Auto);
        assert!(cfg.storage_options().zero_runway);
        assert_eq!(cfg.storage_options().drop_behind, Some(64 << 20));
        assert_eq!(cfg.max_chunk_bytes, 64 << 20);
        assert!(chunkbus_client::names::validate_node(&cfg.node).is_ok());
    }

    #[test]
    fn ingest_apis_are_all_on_unless_listed() {
        let resolve = |extra: &[&str]| {
            let argv = [&["chunkbus", "serve"][..], extra].concat();
            ServeConfig::resolve(serve_args(&argv)).map(|c| c.ingest)
        };
        let all = resolve(&[]).unwrap();
        assert_eq!(all.apis.len(), IngestApi::ALL.len());
        assert_eq!(all.hec_default_category, "hec");
        let es = resolve(&["--ingest-apis", "es"]).unwrap();
        assert_eq!(es.apis.into_iter().collect::<Vec<_>>(), [IngestApi::Es]);
        assert!(resolve(&["--ingest-apis", "none"]).unwrap().apis.is_empty());
        assert!(
            resolve(&["--ingest-apis", " hec , es "])
                .unwrap()
                .apis
                .len()
                == 2
        );
        let err = resolve(&["--ingest-apis", "es,kafka"]).unwrap_err();
        assert!(err.to_string().contains("\"kafka\""), "{err}");
        let c = resolve(&["--hec-default-category", "splunk.main"]).unwrap();
        assert_eq!(c.hec_default_category, "splunk.main");
        let err = resolve(&["--hec-default-category", "a/b"]).unwrap_err();
        assert!(err.to_string().contains("--hec-default-category"), "{err}");
        assert_eq!(
            (
                all.otlp_category_attribute.as_str(),
                all.otlp_default_category.as_str()
            ),
            ("service.name", "otlp")
        );
        assert_eq!(
            (
                all.loki_category_label.as_str(),
                all.loki_default_category.as_str()
            ),
            ("job", "loki")
        );
        let c = resolve(&[
            "--otlp-category-attribute",
            "k8s.namespace.name",
            "--otlp-default-category",
            "otel",
            "--loki-category-label",
            "app",
            "--loki-default-category",
            "logs",
        ])
        .unwrap();
        assert_eq!(
            [
                c.otlp_category_attribute,
                c.otlp_default_category,
                c.loki_category_label,
                c.loki_default_category
            ],
            ["k8s.namespace.name", "otel", "app", "logs"]
        );
        for flag in ["--otlp-default-category", "--loki-default-category"] {
            let err = resolve(&[flag, "a b"]).unwrap_err();
            assert!(err.to_string().contains(flag), "{err}");
        }
        let err = resolve(&["--loki-category-label", ""]).unwrap_err();
        assert!(err.to_string().contains("--loki-category-label"), "{err}");
    }

    #[test]
    fn file_fills_in_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "node = \"filenode\"\nmax-chunk-bytes = \"1MiB\"\nsync = \"50ms\"\nrotate-after = \"5s\"\npreallocate = \"off\"\ndrop-behind = \"off\"\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let cfg = ServeConfig::resolve(serve_args(&[
            "chunkbus", "serve", "--config", p, "--node", "flagnode",
        ]))
        .unwrap();
        assert_eq!(cfg.node, "flagnode");
        assert_eq!(cfg.max_chunk_bytes, 1 << 20);
        assert_eq!(cfg.sync, SyncPolicy::Interval(Duration::from_millis(50)));
        assert_eq!(cfg.rotate_after, Duration::from_secs(5));
        assert!(!cfg.storage_options().zero_runway);
        assert_eq!(cfg.drop_behind, None);
        std::fs::write(&path, "drop-behind = 1048576\n").unwrap();
        let cfg = ServeConfig::resolve(serve_args(&["chunkbus", "serve", "--config", p])).unwrap();
        assert_eq!(cfg.drop_behind, Some(1 << 20));
        let cfg = ServeConfig::resolve(serve_args(&["chunkbus", "serve", "--drop-behind", "1GiB"]))
            .unwrap();
        assert_eq!(cfg.drop_behind, Some(1 << 30));
    }

    #[test]
    fn kafka_acks_all_waits_for_one_other_node_by_default_and_at_most_all() {
        let kafka = |extra: &[&str]| {
            let mut argv = vec!["chunkbus", "serve", "--node", "a", "--kafka-listen"];
            argv.extend_from_slice(&["127.0.0.1:9092", "--listen", "127.0.0.1:8080"]);
            argv.extend_from_slice(extra);
            ServeConfig::resolve(serve_args(&argv)).map(|c| c.kafka.unwrap().acks_all_replicas)
        };
        assert_eq!(kafka(&[]).unwrap(), 0);
        let peers = [
            "--peers",
            "a=127.0.0.1:8080,b=127.0.0.1:8081,c=127.0.0.1:8082",
        ];
        assert_eq!(kafka(&peers).unwrap(), 1);
        let two = [&peers[..], &["--kafka-acks-all-replicas", "2"]].concat();
        assert_eq!(kafka(&two).unwrap(), 2);
        let three = [&peers[..], &["--kafka-acks-all-replicas", "3"]].concat();
        let e = kafka(&three).unwrap_err().to_string();
        assert!(e.contains("only 2 other nodes"), "{e}");
        let argv = ["chunkbus", "serve", "--kafka-acks-all-replicas", "1"];
        let e = ServeConfig::resolve(serve_args(&argv))
            .unwrap_err()
            .to_string();
        assert!(e.contains("need --kafka-listen"), "{e}");
    }

    #[test]
    fn replicas_are_all_or_a_number_and_bound_kafka_acks_all() {
        assert_eq!("all".parse::<Replicas>().unwrap(), Replicas(None));
        assert_eq!(" 2 ".parse::<Replicas>().unwrap(), Replicas(Some(2)));
        for bad in ["0", "-1", "two", ""] {
            let e = bad.parse::<Replicas>().unwrap_err();
            assert!(e.contains("not 'all' or a number"), "{bad}: {e}");
        }
        // The file takes a number or a string.
        let file: ServeArgs = toml::from_str("replicas = 3").unwrap();
        assert_eq!(file.replicas, Some(Replicas(Some(3))));
        let file: ServeArgs = toml::from_str(r#"replicas = "all""#).unwrap();
        assert_eq!(file.replicas, Some(Replicas(None)));
        assert!(toml::from_str::<ServeArgs>("replicas = 0").is_err());
        let peers = "a=127.0.0.1:8080,b=127.0.0.1:8081,c=127.0.0.1:8082";
        let resolve = |extra: &[&str]| {
            let mut argv = vec!["chunkbus", "serve", "--node", "a", "--listen"];
            argv.extend_from_slice(&["127.0.0.1:8080", "--peers", peers]);
            argv.extend_from_slice(extra);
            ServeConfig::resolve(serve_args(&argv))
        };
        assert_eq!(resolve(&[]).unwrap().replicas, None);
        assert_eq!(resolve(&["--replicas", "2"]).unwrap().replicas, Some(2));
        // acks=all waits for at most the k-1 other holders.
        let kafka = ["--kafka-listen", "127.0.0.1:9092", "--replicas"];
        let acks = |k: &str| {
            resolve(&[&kafka[..], &[k]].concat()).map(|c| c.kafka.unwrap().acks_all_replicas)
        };
        assert_eq!(acks("1").unwrap(), 0);
        assert_eq!(acks("2").unwrap(), 1);
        let e = resolve(&[&kafka[..], &["2", "--kafka-acks-all-replicas", "2"]].concat())
            .unwrap_err()
            .to_string();
        assert!(e.contains("above --replicas 2 minus one"), "{e}");
    }

    #[test]
    fn sync_policy_is_shown_as_it_is_given() {
        for given in ["always", "never", "100ms", "2s", "1m 30s"] {
            let SyncSetting(policy) = given.parse().unwrap();
            assert_eq!(policy.to_string(), given);
            assert_eq!(policy.to_string().parse::<SyncSetting>().unwrap().0, policy);
        }
        assert!(
            "0s".parse::<SyncSetting>()
                .unwrap_err()
                .contains("longer than zero")
        );
        assert!(
            "sometimes"
                .parse::<SyncSetting>()
                .unwrap_err()
                .contains("'always'")
        );
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "max-chunk-byte = 5\n").unwrap();
        let err = ServeConfig::resolve(serve_args(&[
            "chunkbus",
            "serve",
            "--config",
            path.to_str().unwrap(),
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("max-chunk-byte"), "{err}");
    }

    #[test]
    fn inconsistent_limits_are_rejected() {
        let err = ServeConfig::resolve(serve_args(&[
            "chunkbus",
            "serve",
            "--max-line-bytes",
            "2MiB",
            "--max-body-bytes",
            "1MiB",
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("--max-line-bytes"), "{err}");
        assert!(Cli::try_parse_from(["chunkbus", "serve", "--sync", "sometimes"]).is_err());
        let err = Cli::try_parse_from(["chunkbus", "serve", "--preallocate", "yes"]).unwrap_err();
        assert!(err.to_string().contains("'auto' or 'off'"), "{err}");
        let err = Cli::try_parse_from(["chunkbus", "serve", "--drop-behind", "lots"]).unwrap_err();
        assert!(err.to_string().contains("or 'off'"), "{err}");
        assert!(Cli::try_parse_from(["chunkbus", "serve", "--node", "a/b"]).is_ok());
        assert!(ServeConfig::resolve(serve_args(&["chunkbus", "serve", "--node", "a/b"])).is_err());
    }

    #[test]
    fn tokens_come_from_files_and_the_cluster_needs_its_secret() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("c.toml");
        std::fs::write(
            &conf,
            "[[token]]\nname = \"ops\"\nsecret = \"0123456789abcdef-ops\"\nroles = [\"admin\"]\n",
        )
        .unwrap();
        let c = conf.to_str().unwrap();
        let cfg = ServeConfig::resolve(serve_args(&["chunkbus", "serve", "--config", c])).unwrap();
        assert_eq!(cfg.auth.tokens.len(), 1);
        assert!(cfg.auth.build().unwrap().required());
        // Anywhere but loopback, a node without tokens needs --allow-anonymous.
        let open = ["chunkbus", "serve", "--listen", "0.0.0.0:8080"];
        let err = ServeConfig::resolve(serve_args(&open))
            .unwrap_err()
            .to_string();
        assert!(err.contains("loopback"), "{err}");
        let anon = [&open[..], &["--allow-anonymous"]].concat();
        assert!(ServeConfig::resolve(serve_args(&anon)).is_ok());
        // Tokens and peers, but no cluster secret.
        let peers = ["--node", "eu1", "--peers", "eu2=127.0.0.1:9"];
        let argv = [&["chunkbus", "serve", "--config", c][..], &peers].concat();
        let err = ServeConfig::resolve(serve_args(&argv))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--cluster-secret-file"), "{err}");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "short").unwrap();
        let s = secret.to_str().unwrap();
        let argv = [&argv[..], &["--cluster-secret-file", s]].concat();
        let err = ServeConfig::resolve(serve_args(&argv))
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least 16"), "{err}");
        std::fs::write(&secret, "a-long-enough-cluster-secret\n").unwrap();
        let cfg = ServeConfig::resolve(serve_args(&argv)).unwrap();
        assert_eq!(
            cfg.auth.cluster_secret.as_deref(),
            Some("a-long-enough-cluster-secret")
        );
        // A secret is never a flag.
        assert!(Cli::try_parse_from(["chunkbus", "serve", "--token", "x"]).is_err());
    }

    #[test]
    fn s3_settings_are_checked() {
        let cfg = ServeConfig::resolve(serve_args(&["chunkbus", "serve"])).unwrap();
        assert!(cfg.s3.is_none() && !cfg.storage_options().tiered);
        assert_eq!(cfg.retention.local_retention, DEFAULT_LOCAL_RETENTION);
        let cfg = ServeConfig::resolve(serve_args(&[
            "chunkbus",
            "serve",
            "--s3-bucket",
            "logs",
            "--s3-prefix",
            "eu/",
            "--s3-endpoint",
            "http://127.0.0.1:9000",
            "--retention",
            "30d",
        ]))
        .unwrap();
        let s3 = cfg.s3.clone().unwrap();
        assert_eq!((s3.bucket.as_str(), s3.prefix.as_str()), ("logs", "eu/"));
        assert_eq!(s3.checksum, ChecksumMode::Md5);
        assert!(cfg.storage_options().tiered);
        assert_eq!(
            cfg.retention.retention,
            Some(Duration::from_secs(30 * 86400))
        );
        for (bad, says) in [
            (&["--s3-prefix", "x/"][..], "needs --s3-bucket"),
            (&["--s3-bucket", "a/b"], "not a bucket name"),
            (&["--s3-bucket", "ok-bucket", "--s3-prefix", "../x"], "'..'"),
            (
                &[
                    "--s3-bucket",
                    "ok-bucket",
                    "--s3-endpoint",
                    "localhost:9000",
                ],
                "URL",
            ),
            (
                &["--s3-bucket", "ok-bucket", "--s3-part-size", "1MiB"],
                "smallest part",
            ),
            (
                &["--s3-bucket", "ok-bucket", "--s3-checksum", "sha1"],
                "md5 or crc32c",
            ),
        ] {
            let argv = [&["chunkbus", "serve"][..], bad].concat();
            let err = ServeConfig::resolve(serve_args(&argv))
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    #[test]
    fn without_peers_the_nodes_of_a_bucket_find_each_other_through_it() {
        let s3 = ["chunkbus", "serve", "--s3-bucket", "logs"];
        let cfg = ServeConfig::resolve(serve_args(&s3)).unwrap();
        assert!(cfg.bucket_membership() && cfg.advertise_addr.is_none());
        let peers = [&s3[..], &["--peers", "eu2=127.0.0.1:8081"]].concat();
        assert!(
            !ServeConfig::resolve(serve_args(&peers))
                .unwrap()
                .bucket_membership()
        );
        let plain = ServeConfig::resolve(serve_args(&["chunkbus", "serve"])).unwrap();
        assert!(!plain.bucket_membership());
        // Kafka: acks=all waits for one other node by default, for as many
        // as asked (at most those the bucket names when it is answered).
        let kafka = [&s3[..], &["--kafka-listen", "127.0.0.1:9092"]].concat();
        let k = ServeConfig::resolve(serve_args(&kafka))
            .unwrap()
            .kafka
            .unwrap();
        assert_eq!(k.acks_all_replicas, 1);
        let three = [&kafka[..], &["--kafka-acks-all-replicas", "3"]].concat();
        let k = ServeConfig::resolve(serve_args(&three))
            .unwrap()
            .kafka
            .unwrap();
        assert_eq!(k.acks_all_replicas, 3);
        let advertised = [&s3[..], &["--advertise-addr", "node1.internal:8080"]].concat();
        let cfg = ServeConfig::resolve(serve_args(&advertised)).unwrap();
        assert_eq!(cfg.advertise_addr.as_deref(), Some("node1.internal:8080"));
        for (bad, says) in [
            (&["--advertise-addr", "node1"][..], "must be host:port"),
            (
                &["--listen", "0.0.0.0:8080", "--allow-anonymous"],
                "give --advertise-addr",
            ),
        ] {
            let argv = [&s3[..], bad].concat();
            let err = ServeConfig::resolve(serve_args(&argv))
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
        for without_bucket in [&peers[..], &["chunkbus", "serve"]] {
            let argv = [without_bucket, &["--advertise-addr", "h:1"]].concat();
            let err = ServeConfig::resolve(serve_args(&argv))
                .unwrap_err()
                .to_string();
            assert!(err.contains("through the S3 bucket"), "{err}");
        }
    }

    #[test]
    fn peers_exclude_this_node_and_check_its_address() {
        let base = [
            "chunkbus",
            "serve",
            "--node",
            "eu1",
            "--listen",
            "127.0.0.1:8080",
            "--peers",
        ];
        let ok = [&base[..], &["eu1=127.0.0.1:8080,eu2=127.0.0.1:8081"]].concat();
        let cfg = ServeConfig::resolve(serve_args(&ok)).unwrap();
        assert_eq!(cfg.peers.len(), 1);
        assert_eq!(cfg.peers[0].name, "eu2");
        let wrong = [&base[..], &["eu1=127.0.0.1:9999,eu2=127.0.0.1:8081"]].concat();
        let err = ServeConfig::resolve(serve_args(&wrong))
            .unwrap_err()
            .to_string();
        assert!(err.contains("names this node"), "{err}");
        let twice = [&base[..], &["eu2=127.0.0.1:1,eu2=127.0.0.1:2"]].concat();
        assert!(Cli::try_parse_from(twice).is_err());
    }
}
