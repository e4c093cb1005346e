//! Command-line and config-file syntax (clap derive + serde).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use super::{ByteSize, DropBehind, HumanDuration, PeerList, Percent, Preallocate, SyncSetting};

/// chunkbus: a leaderless, peer-replicated chunk bus.
#[derive(Debug, Parser)]
#[command(name = "chunkbus", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands of the `chunkbus` binary.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node: accept lines over HTTP, store them in chunks, serve reads.
    Serve(Box<ServeArgs>),
    /// Administer a cluster.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Send lines from files (or stdin) to a category.
    Produce(ProduceCmd),
    /// Read a category as a named consumer: lines to stdout, acked once written.
    Consume(ConsumeCmd),
    /// Print a category's lines without acking (-f to follow).
    Tail(TailCmd),
    /// Follow log files (paths, globs, directories) into a category.
    Ship(ShipCmd),
    /// List the categories of a node.
    Categories(ServerArgs),
    /// Show a node's status (peers, replication lag, disk).
    Status(ServerArgs),
    /// Watch a node and its cluster: nodes, categories with rates,
    /// consumers with lag, upload backlog (q or Ctrl-C to quit).
    Top(TopCmd),
}

/// `--server`, repeatable.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// A node's base URL; repeat for several (also CHUNKBUS_SERVER, comma-separated).
    #[arg(
        long = "server",
        env = "CHUNKBUS_SERVER",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:8080"
    )]
    pub servers: Vec<String>,
    /// File holding the token to present (also CHUNKBUS_TOKEN_FILE; or the
    /// token itself in CHUNKBUS_TOKEN). Never a flag value, so that it does
    /// not show in the process list.
    #[arg(long, env = "CHUNKBUS_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// A private CA (PEM) to trust for https:// nodes, besides the system's.
    #[arg(long, env = "CHUNKBUS_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
}

impl ServerArgs {
    /// The token to present: from `--token-file`, else `CHUNKBUS_TOKEN`.
    pub fn token(&self) -> Result<Option<String>, String> {
        read_token(self.token_file.as_deref())
    }

    /// The CA of `--ca-file`, if given.
    pub fn ca_pem(&self) -> Result<Option<Vec<u8>>, String> {
        self.ca_file
            .as_ref()
            .map(|p| {
                std::fs::read(p).map_err(|e| format!("cannot read CA file {}: {e}", p.display()))
            })
            .transpose()
    }
}

/// The token in `file`, else in `CHUNKBUS_TOKEN`, if any.
pub fn read_token(file: Option<&std::path::Path>) -> Result<Option<String>, String> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read token file {}: {e}", path.display()))?;
        return Ok(Some(text.trim().to_owned()));
    }
    Ok(std::env::var("CHUNKBUS_TOKEN")
        .ok()
        .filter(|t| !t.is_empty()))
}

/// `chunkbus produce`.
#[derive(Debug, Clone, Args)]
pub struct ProduceCmd {
    /// The category.
    #[arg(short, long)]
    pub category: String,
    /// Files to send; stdin when none (or `-`).
    pub files: Vec<PathBuf>,
    #[command(flatten)]
    pub server: ServerArgs,
    /// Compression of batches: none, gzip or zstd.
    #[arg(long, default_value = "none", value_parser = ["none", "gzip", "zstd"])]
    pub compression: String,
    /// Ask for fdatasync before each batch is acknowledged (true/false).
    #[arg(long)]
    pub sync: Option<bool>,
    /// Wait until this many other nodes hold each batch.
    #[arg(long)]
    pub min_replicas: Option<u32>,
}

/// `chunkbus consume`.
#[derive(Debug, Clone, Args)]
pub struct ConsumeCmd {
    /// The category.
    #[arg(short, long)]
    pub category: String,
    /// The consumer's name (the server keeps its position).
    #[arg(long)]
    pub consumer: String,
    #[command(flatten)]
    pub server: ServerArgs,
    /// Exit once nothing new arrived for this long, e.g. 5s.
    #[arg(long, value_name = "DURATION")]
    pub until_idle: Option<HumanDuration>,
    /// A consumer that never acked starts at the end instead of the earliest data.
    #[arg(long)]
    pub from_latest: bool,
}

/// `chunkbus ship`.
#[derive(Debug, Clone, Args)]
pub struct ShipCmd {
    /// The category (not needed with --config).
    #[arg(short, long)]
    pub category: Option<String>,
    /// Files, globs (quote them) or directories to follow.
    pub paths: Vec<String>,
    #[command(flatten)]
    pub server: ServerArgs,
    /// Where the shipper records how far each file was acknowledged.
    #[arg(long, default_value = "./chunkbus-ship.registry.json")]
    pub registry: PathBuf,
    /// Where files found at the first start begin: beginning or end.
    #[arg(long, default_value = "beginning", value_parser = ["beginning", "end"])]
    pub from: String,
    /// Send a last line that has no newline after this long.
    #[arg(long, default_value = "5s")]
    pub partial_line_timeout: HumanDuration,
    /// Compression of batches: none, gzip or zstd.
    #[arg(long, default_value = "zstd", value_parser = ["none", "gzip", "zstd"])]
    pub compression: String,
    /// TOML file with several groups (`[[group]] category = .. paths = [..]`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// `chunkbus tail`.
#[derive(Debug, Clone, Args)]
pub struct TailCmd {
    /// The category.
    #[arg(short, long)]
    pub category: String,
    /// Keep printing new lines as they arrive.
    #[arg(short, long)]
    pub follow: bool,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// `chunkbus top`.
#[derive(Debug, Clone, Args)]
pub struct TopCmd {
    /// Print the tables once and exit (for scripts; no terminal needed).
    #[arg(long)]
    pub once: bool,
    /// Time between refreshes.
    #[arg(long, default_value = "1s", value_name = "DURATION")]
    pub interval: HumanDuration,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// `chunkbus admin ...`.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Declare a node permanently lost: its open chunks become complete on
    /// every node, so that readers can finish them. Bytes it had not yet
    /// replicated are given up.
    ForgetNode {
        /// The lost node's name.
        node: String,
        /// Any live node of the cluster.
        #[arg(long, env = "CHUNKBUS_SERVER", default_value = "http://127.0.0.1:8080")]
        server: String,
        /// File holding an admin token (or the token in CHUNKBUS_TOKEN).
        #[arg(long, env = "CHUNKBUS_TOKEN_FILE", value_name = "FILE")]
        token_file: Option<PathBuf>,
    },
}

/// Flags of `chunkbus serve`. Each is also a `CHUNKBUS_*` environment
/// variable and a key of the `--config` TOML file.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServeArgs {
    /// TOML file with any of these settings (keys spelled like the flags).
    #[arg(long, env = "CHUNKBUS_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Directory for chunks and state [default: ./chunkbus-data].
    #[arg(long, env = "CHUNKBUS_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// This node's name, 1-64 of [A-Za-z0-9_-] [default: the host name, made valid].
    #[arg(long, env = "CHUNKBUS_NODE")]
    pub node: Option<String>,

    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "CHUNKBUS_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,

    /// Size at which a chunk is completed and a new one started [default: 64MiB].
    #[arg(long, env = "CHUNKBUS_MAX_CHUNK_BYTES", value_name = "SIZE")]
    pub max_chunk_bytes: Option<ByteSize>,

    /// Age at which a non-empty open chunk is completed [default: 1m].
    #[arg(long, env = "CHUNKBUS_ROTATE_AFTER", value_name = "DURATION")]
    pub rotate_after: Option<HumanDuration>,

    /// When writes reach stable storage: always (fdatasync before answering,
    /// group-committed), never (page cache), or an interval like 100ms [default: always].
    #[arg(long, env = "CHUNKBUS_SYNC", value_name = "always|never|INTERVAL")]
    pub sync: Option<SyncSetting>,

    /// Keep a short run of zeros written ahead of an open chunk that takes
    /// many small synced writes, so that a group commit need not also write
    /// the file's new size (ext4 and XFS): auto or off [default: auto].
    #[arg(long, env = "CHUNKBUS_PREALLOCATE", value_name = "auto|off")]
    pub preallocate: Option<Preallocate>,

    /// Written data more than SIZE behind its category's newest write is
    /// dropped from the OS page cache once on disk, so that new writes reuse
    /// warm memory and recent data stays cached for readers; off leaves the
    /// page cache to the kernel [default: 64MiB].
    #[arg(long, env = "CHUNKBUS_DROP_BEHIND", value_name = "SIZE|off")]
    pub drop_behind: Option<DropBehind>,

    /// Longest accepted line, without its newline [default: 1MiB].
    #[arg(long, env = "CHUNKBUS_MAX_LINE_BYTES", value_name = "SIZE")]
    pub max_line_bytes: Option<ByteSize>,

    /// Largest accepted request body, after decoding [default: 64MiB].
    #[arg(long, env = "CHUNKBUS_MAX_BODY_BYTES", value_name = "SIZE")]
    pub max_body_bytes: Option<ByteSize>,

    /// Request body bytes held in memory at once; past it writes get 503 [default: 512MiB].
    #[arg(long, env = "CHUNKBUS_MAX_INFLIGHT_BYTES", value_name = "SIZE")]
    pub max_inflight_bytes: Option<ByteSize>,

    /// Disk usage of the data directory's file system above which writes get 503 [default: 90%].
    #[arg(long, env = "CHUNKBUS_DISK_HIGH_WATER", value_name = "PERCENT")]
    pub disk_high_water: Option<Percent>,

    /// The cluster: name=host:port,... (may include this node) [default: none, a single node].
    #[arg(long, env = "CHUNKBUS_PEERS", value_name = "NAME=HOST:PORT,...")]
    pub peers: Option<PeerList>,

    /// Where the other nodes reach this one (host:port of its HTTP
    /// listener), written in its record when the nodes find each other
    /// through the S3 bucket (S3 on, no --peers) [default: --listen].
    #[arg(long, env = "CHUNKBUS_ADVERTISE_ADDR", value_name = "HOST:PORT")]
    pub advertise_addr: Option<String>,

    /// How many nodes hold each chunk: `all`, or k (the owner and the k-1
    /// other nodes that rendezvous hashing picks per category and owner;
    /// every node still lists and serves every chunk) [default: all].
    #[arg(long, env = "CHUNKBUS_REPLICAS", value_name = "all|K")]
    pub replicas: Option<super::Replicas>,

    /// Complete an unreachable peer's open chunks here after this long [default: never].
    #[arg(long, env = "CHUNKBUS_OWNER_LOST_AFTER", value_name = "DURATION")]
    pub owner_lost_after: Option<HumanDuration>,

    /// This is the cluster's first start: with a new data directory, take
    /// writes without first asking every peer which chunk names this node
    /// used before (a node that lost its disk asks them, so that it never
    /// reuses a name; see docs/operations.md). Command line or environment
    /// only, never in the config file.
    #[arg(long, env = "CHUNKBUS_FIRST_START")]
    #[serde(skip)]
    pub first_start: bool,

    /// Longest wait of one replication long poll [default: 30s].
    #[arg(long, env = "CHUNKBUS_REPLICATION_WAIT", value_name = "DURATION")]
    pub replication_wait: Option<HumanDuration>,

    /// How long a peer may take to answer beyond a long poll's wait [default: 10s].
    #[arg(long, env = "CHUNKBUS_PEER_TIMEOUT", value_name = "DURATION")]
    pub peer_timeout: Option<HumanDuration>,

    /// Upload complete chunks to this S3 bucket (turns the S3 tier on)
    /// [default: none, local disk only]. Credentials and region come from
    /// the standard AWS chain (environment, profile, instance role).
    #[arg(long, env = "CHUNKBUS_S3_BUCKET", value_name = "BUCKET")]
    pub s3_bucket: Option<String>,

    /// Key prefix of the objects, e.g. `logs/` [default: none].
    #[arg(long, env = "CHUNKBUS_S3_PREFIX", value_name = "PREFIX")]
    pub s3_prefix: Option<String>,

    /// Endpoint of an S3-compatible store (MinIO, RustFS, Ceph, R2...), with
    /// path-style addressing [default: AWS].
    #[arg(long, env = "CHUNKBUS_S3_ENDPOINT", value_name = "URL")]
    pub s3_endpoint: Option<String>,

    /// Region of the bucket [default: from the AWS chain, else us-east-1].
    #[arg(long, env = "CHUNKBUS_S3_REGION", value_name = "REGION")]
    pub s3_region: Option<String>,

    /// Integrity check of uploads: md5 (Content-MD5, every store) or crc32c
    /// (flexible checksums) [default: md5].
    #[arg(long, env = "CHUNKBUS_S3_CHECKSUM", value_name = "md5|crc32c")]
    pub s3_checksum: Option<String>,

    /// Multipart part size; larger chunks are uploaded in parts (at least 5MiB) [default: 16MiB].
    #[arg(long, env = "CHUNKBUS_S3_PART_SIZE", value_name = "SIZE")]
    pub s3_part_size: Option<ByteSize>,

    /// Uploads running at once [default: 4].
    #[arg(long, env = "CHUNKBUS_S3_UPLOAD_CONCURRENCY", value_name = "N")]
    pub s3_upload_concurrency: Option<usize>,

    /// How often the node rewrites its record under its name in the bucket
    /// (two processes must never run as one node; a restart after a crash
    /// waits about three of these) [default: 5s].
    #[arg(long, env = "CHUNKBUS_S3_CLAIM_REFRESH", value_name = "DURATION")]
    pub s3_claim_refresh: Option<HumanDuration>,

    /// Evict the local copy of an uploaded chunk older than this, acked or
    /// not [default: 24h].
    #[arg(long, env = "CHUNKBUS_LOCAL_RETENTION", value_name = "DURATION")]
    pub local_retention: Option<HumanDuration>,

    /// Delete chunks older than this everywhere, S3 included [default: never].
    #[arg(long, env = "CHUNKBUS_RETENTION", value_name = "DURATION")]
    pub retention: Option<HumanDuration>,

    /// TOML file of tokens (`[[token]]` with secret, roles, categories),
    /// reloaded on SIGHUP [default: none: no authentication, loopback only].
    #[arg(long, env = "CHUNKBUS_TOKENS_FILE", value_name = "FILE")]
    pub tokens_file: Option<PathBuf>,

    /// Tokens written in the config file itself (`[[token]]` tables); never
    /// a flag, so that no secret shows in the process list.
    #[arg(skip)]
    #[serde(default)]
    pub token: Option<Vec<crate::auth::TokenSpec>>,

    /// Serve without tokens on an address other than loopback.
    #[arg(long, env = "CHUNKBUS_ALLOW_ANONYMOUS")]
    #[serde(default)]
    pub allow_anonymous: bool,

    /// File holding the secret the cluster's nodes present to each other.
    #[arg(long, env = "CHUNKBUS_CLUSTER_SECRET_FILE", value_name = "FILE")]
    pub cluster_secret_file: Option<PathBuf>,

    /// Longest time a request body may take to arrive; slower senders get
    /// 408 [default: 60s].
    #[arg(long, env = "CHUNKBUS_REQUEST_TIMEOUT", value_name = "DURATION")]
    pub request_timeout: Option<HumanDuration>,

    /// A connection that sends no complete request header for this long is
    /// closed: silent sockets, slow headers, idle keep-alive connections
    /// [default: 30s].
    #[arg(long, env = "CHUNKBUS_IDLE_TIMEOUT", value_name = "DURATION")]
    pub idle_timeout: Option<HumanDuration>,

    /// Categories writes may create at most; past it a write to a new
    /// category gets 507 [default: 10000].
    #[arg(long, env = "CHUNKBUS_MAX_CATEGORIES", value_name = "N")]
    pub max_categories: Option<usize>,

    /// Open connections at most; past it new ones wait in the kernel's
    /// backlog [default: 10000].
    #[arg(long, env = "CHUNKBUS_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

    /// Serve HTTPS with this certificate chain (PEM); peers are then reached
    /// over HTTPS too [default: plain HTTP].
    #[arg(long, env = "CHUNKBUS_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "CHUNKBUS_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// A private CA (PEM) that signed the peers' certificates [default: the system's roots].
    #[arg(long, env = "CHUNKBUS_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,

    /// Also serve the Kafka protocol on this address (topics are categories,
    /// partitions are nodes; see docs/kafka.md) [default: off].
    #[arg(long, env = "CHUNKBUS_KAFKA_LISTEN", value_name = "HOST:PORT")]
    pub kafka_listen: Option<String>,

    /// The host:port Kafka clients are told to reach this node at
    /// [default: --kafka-listen].
    #[arg(long, env = "CHUNKBUS_KAFKA_ADVERTISED_ADDR", value_name = "HOST:PORT")]
    pub kafka_advertised_addr: Option<String>,

    /// Serve Kafka clients while tokens are configured: the Kafka listener
    /// takes no token (it speaks no SASL), so anyone who reaches it may read
    /// and write every category.
    #[arg(long, env = "CHUNKBUS_KAFKA_ALLOW_ANONYMOUS")]
    #[serde(default)]
    pub kafka_allow_anonymous: bool,

    /// How many other nodes must hold a Kafka producer's records before a
    /// produce with acks=all (-1) is answered; with bucket membership, at
    /// most as many as the bucket names then [default: 1 with peers or
    /// bucket membership, else 0].
    #[arg(long, env = "CHUNKBUS_KAFKA_ACKS_ALL_REPLICAS", value_name = "N")]
    pub kafka_acks_all_replicas: Option<u32>,

    /// Stock agent APIs served on the HTTP listener (docs/ingest.md), a
    /// comma-separated list of es (Elasticsearch bulk), otlp (OTLP/HTTP
    /// logs), loki (Loki push) and hec (Splunk HEC), or none [default:
    /// es,otlp,loki,hec].
    #[arg(long, env = "CHUNKBUS_INGEST_APIS", value_name = "LIST")]
    pub ingest_apis: Option<String>,

    /// Category of Splunk HEC events without an index [default: hec].
    #[arg(long, env = "CHUNKBUS_HEC_DEFAULT_CATEGORY", value_name = "CATEGORY")]
    pub hec_default_category: Option<String>,

    /// The resource attribute whose value names the category of OTLP log
    /// records [default: service.name].
    #[arg(long, env = "CHUNKBUS_OTLP_CATEGORY_ATTRIBUTE", value_name = "KEY")]
    pub otlp_category_attribute: Option<String>,

    /// Category of OTLP log records whose resource lacks that attribute
    /// [default: otlp].
    #[arg(long, env = "CHUNKBUS_OTLP_DEFAULT_CATEGORY", value_name = "CATEGORY")]
    pub otlp_default_category: Option<String>,

    /// The stream label whose value names the category of Loki entries
    /// [default: job].
    #[arg(long, env = "CHUNKBUS_LOKI_CATEGORY_LABEL", value_name = "LABEL")]
    pub loki_category_label: Option<String>,

    /// Category of Loki streams without that label [default: loki].
    #[arg(long, env = "CHUNKBUS_LOKI_DEFAULT_CATEGORY", value_name = "CATEGORY")]
    pub loki_default_category: Option<String>,
}

impl ServeArgs {
    /// Fills every unset field from `file`.
    pub fn or(self, file: ServeArgs) -> ServeArgs {
        ServeArgs {
            config: self.config,
            data_dir: self.data_dir.or(file.data_dir),
            node: self.node.or(file.node),
            listen: self.listen.or(file.listen),
            max_chunk_bytes: self.max_chunk_bytes.or(file.max_chunk_bytes),
            rotate_after: self.rotate_after.or(file.rotate_after),
            sync: self.sync.or(file.sync),
            preallocate: self.preallocate.or(file.preallocate),
            drop_behind: self.drop_behind.or(file.drop_behind),
            max_line_bytes: self.max_line_bytes.or(file.max_line_bytes),
            max_body_bytes: self.max_body_bytes.or(file.max_body_bytes),
            max_inflight_bytes: self.max_inflight_bytes.or(file.max_inflight_bytes),
            disk_high_water: self.disk_high_water.or(file.disk_high_water),
            peers: self.peers.or(file.peers),
            advertise_addr: self.advertise_addr.or(file.advertise_addr),
            owner_lost_after: self.owner_lost_after.or(file.owner_lost_after),
            replicas: self.replicas.or(file.replicas),
            first_start: self.first_start,
            replication_wait: self.replication_wait.or(file.replication_wait),
            peer_timeout: self.peer_timeout.or(file.peer_timeout),
            s3_bucket: self.s3_bucket.or(file.s3_bucket),
            s3_prefix: self.s3_prefix.or(file.s3_prefix),
            s3_endpoint: self.s3_endpoint.or(file.s3_endpoint),
            s3_region: self.s3_region.or(file.s3_region),
            s3_checksum: self.s3_checksum.or(file.s3_checksum),
            s3_part_size: self.s3_part_size.or(file.s3_part_size),
            s3_upload_concurrency: self.s3_upload_concurrency.or(file.s3_upload_concurrency),
            s3_claim_refresh: self.s3_claim_refresh.or(file.s3_claim_refresh),
            local_retention: self.local_retention.or(file.local_retention),
            retention: self.retention.or(file.retention),
            tokens_file: self.tokens_file.or(file.tokens_file),
            token: self.token.or(file.token),
            allow_anonymous: self.allow_anonymous || file.allow_anonymous,
            cluster_secret_file: self.cluster_secret_file.or(file.cluster_secret_file),
            request_timeout: self.request_timeout.or(file.request_timeout),
            idle_timeout: self.idle_timeout.or(file.idle_timeout),
            max_connections: self.max_connections.or(file.max_connections),
            max_categories: self.max_categories.or(file.max_categories),
            tls_cert: self.tls_cert.or(file.tls_cert),
            tls_key: self.tls_key.or(file.tls_key),
            tls_ca: self.tls_ca.or(file.tls_ca),
            kafka_listen: self.kafka_listen.or(file.kafka_listen),
            kafka_advertised_addr: self.kafka_advertised_addr.or(file.kafka_advertised_addr),
            kafka_allow_anonymous: self.kafka_allow_anonymous || file.kafka_allow_anonymous,
            kafka_acks_all_replicas: self
                .kafka_acks_all_replicas
                .or(file.kafka_acks_all_replicas),
            ingest_apis: self.ingest_apis.or(file.ingest_apis),
            hec_default_category: self.hec_default_category.or(file.hec_default_category),
            otlp_category_attribute: self
                .otlp_category_attribute
                .or(file.otlp_category_attribute),
            otlp_default_category: self.otlp_default_category.or(file.otlp_default_category),
            loki_category_label: self.loki_category_label.or(file.loki_category_label),
            loki_default_category: self.loki_default_category.or(file.loki_default_category),
        }
    }
}
