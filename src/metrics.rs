//! Prometheus metrics of a node, in one registry owned by the node (no
//! globals, so several nodes can run in one test process).
//!
//! Names follow Prometheus conventions: `_total` counters, base units
//! (bytes, seconds), one label set per family.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of per-category families.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CategoryLabels {
    /// The category.
    pub category: String,
}

/// Labels of the Kafka request counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KafkaLabels {
    /// The API's name (`Produce`, `Fetch`, ...).
    pub api: &'static str,
}

/// Labels of per-peer families.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    /// The peer's node name.
    pub peer: String,
}

/// Labels of per-peer, per-category families.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerCategoryLabels {
    /// The peer's node name.
    pub peer: String,
    /// The category.
    pub category: String,
}

/// Labels of HTTP request families.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// HTTP method.
    pub method: String,
    /// The matched route, e.g. `/v1/categories/{category}/lines`.
    pub route: String,
    /// Status code.
    pub status: u16,
}

/// Labels of the HTTP latency histogram.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// HTTP method.
    pub method: String,
    /// The matched route.
    pub route: String,
}

/// One more in `gauge` while it lives, also when the future holding it
/// is dropped mid-wait (a client gone, a timeout).
#[derive(Debug)]
pub struct GaugeHeld<'a>(&'a Gauge);

impl<'a> GaugeHeld<'a> {
    pub fn new(gauge: &'a Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for GaugeHeld<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Every metric of a node. Cheap to share (`Arc<Metrics>`).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// HTTP requests answered, by route and status.
    pub http_requests: Family<RequestLabels, Counter>,
    /// The counters of `http_requests` created so far, (method, route,
    /// status, counter), for the console (a `Family` cannot be listed).
    pub http_request_counters: std::sync::Mutex<Vec<(&'static str, &'static str, u16, Counter)>>,
    /// HTTP request latency, by route.
    pub http_request_seconds: Family<RouteLabels, Histogram>,
    /// Bytes appended, per category.
    pub bytes_in: Family<CategoryLabels, Counter>,
    /// Lines appended, per category.
    pub lines_in: Family<CategoryLabels, Counter>,
    /// Bytes served to readers, per category.
    pub bytes_out: Family<CategoryLabels, Counter>,
    /// Lines served to readers, per category.
    pub lines_out: Family<CategoryLabels, Counter>,
    /// Chunks completed (rotated), per category.
    pub chunks_completed: Family<CategoryLabels, Counter>,
    /// Zeros written ahead of open chunks' data, per category.
    pub runway_bytes: Family<CategoryLabels, Counter>,
    /// Bytes copied from other owners, per category.
    pub bytes_replicated: Family<CategoryLabels, Counter>,
    /// Lines copied from other owners' chunks, per category.
    pub lines_replicated: Family<CategoryLabels, Counter>,
    /// Latency of one fdatasync (which may cover many requests).
    pub fsync_seconds: Histogram,
    /// Requests covered by one group commit.
    pub group_commit_requests: Histogram,
    /// Written bytes dropped from the page cache (drop-behind).
    pub page_cache_dropped_bytes: Counter,
    /// Request body bytes held in memory now.
    pub inflight_bytes: Gauge,
    pub connections: Gauge,
    /// Idle connections closed to make room while the cap was full.
    pub idle_connections_closed: Counter,
    /// Readers parked in a long poll.
    pub read_waiters: Gauge,
    /// Requests refused because of load or disk pressure.
    pub shed_requests: Counter,
    /// Idempotent produce requests answered with the position of the
    /// request they repeat, not stored again.
    pub produce_repeats: Counter,
    /// Kafka requests answered, by API.
    pub kafka_requests: Family<KafkaLabels, Counter>,
    /// Kafka connections closed for a frame that could not be a request.
    pub kafka_bad_frames: Counter,
    /// 1 while a peer's change feed answers, 0 otherwise.
    pub peer_connected: Family<PeerLabels, Gauge>,
    /// Bytes of a peer's chunks not yet copied here, per category.
    pub replication_lag_bytes: Family<PeerCategoryLabels, Gauge>,
    /// How long this node has been behind a peer.
    pub replication_lag_seconds: Family<PeerLabels, Gauge<f64, AtomicU64>>,
    /// Reloads of the tokens file (SIGHUP) that failed; the tokens in use stay.
    pub tokens_reload_failures: Counter,
    /// Restarts of a peer this node noticed through its incarnation.
    pub peer_restarts: Family<PeerLabels, Counter>,
    /// Complete copies found shorter than the owner's chunk and reopened.
    pub copies_repaired: Family<PeerLabels, Counter>,
    /// Chunks of a peer whose copy here holds more than the peer lists, or
    /// other bytes under a name it reused.
    pub copies_disagreeing: Family<PeerLabels, Gauge>,
    /// This node's complete chunks, not in S3, that fewer other nodes
    /// hold than `--replicas` asks (every peer with `all`).
    pub chunks_under_replicated: Gauge,
    /// Bytes of chunks held elsewhere (`--replicas k`) read from their holders.
    pub held_elsewhere_read_bytes: Counter,
    /// Bytes used on the data directory's file system.
    pub disk_used_bytes: Gauge,
    /// Size of the data directory's file system.
    pub disk_total_bytes: Gauge,
    pub chunks_evicted: Family<CategoryLabels, Counter>,
    pub s3_backlog_chunks: Gauge,
    pub s3_backlog_bytes: Gauge,
    pub s3_failing_chunks: Gauge,
    pub s3_uploads: Counter,
    pub s3_upload_bytes: Counter,
    pub s3_errors: Counter,
    pub s3_rescued_lines: Counter,
    pub s3_last_success_seconds: Gauge<f64, AtomicU64>,
    pub s3_read_bytes: Counter,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Arc<Self> {
        let latency = || Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        let mut m = Self {
            registry: Registry::with_prefix("chunkbus"),
            http_requests: Family::default(),
            http_request_counters: Default::default(),
            http_request_seconds: Family::new_with_constructor(latency),
            bytes_in: Family::default(),
            lines_in: Family::default(),
            bytes_out: Family::default(),
            lines_out: Family::default(),
            chunks_completed: Family::default(),
            runway_bytes: Family::default(),
            bytes_replicated: Family::default(),
            lines_replicated: Family::default(),
            fsync_seconds: Histogram::new(exponential_buckets(0.00005, 2.0, 16)),
            group_commit_requests: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            page_cache_dropped_bytes: Counter::default(),
            inflight_bytes: Gauge::default(),
            connections: Gauge::default(),
            idle_connections_closed: Counter::default(),
            read_waiters: Gauge::default(),
            shed_requests: Counter::default(),
            produce_repeats: Counter::default(),
            kafka_requests: Family::default(),
            kafka_bad_frames: Counter::default(),
            peer_connected: Family::default(),
            replication_lag_bytes: Family::default(),
            replication_lag_seconds: Family::default(),
            tokens_reload_failures: Counter::default(),
            peer_restarts: Family::default(),
            copies_repaired: Family::default(),
            copies_disagreeing: Family::default(),
            chunks_under_replicated: Gauge::default(),
            held_elsewhere_read_bytes: Counter::default(),
            disk_used_bytes: Gauge::default(),
            disk_total_bytes: Gauge::default(),
            chunks_evicted: Family::default(),
            s3_backlog_chunks: Gauge::default(),
            s3_failing_chunks: Gauge::default(),
            s3_backlog_bytes: Gauge::default(),
            s3_uploads: Counter::default(),
            s3_upload_bytes: Counter::default(),
            s3_errors: Counter::default(),
            s3_rescued_lines: Counter::default(),
            s3_last_success_seconds: Gauge::default(),
            s3_read_bytes: Counter::default(),
        };
        let r = &mut m.registry;
        r.register(
            "http_requests",
            "HTTP requests answered",
            m.http_requests.clone(),
        );
        r.register(
            "http_request_seconds",
            "HTTP request latency",
            m.http_request_seconds.clone(),
        );
        r.register("bytes_in", "Bytes appended to chunks", m.bytes_in.clone());
        r.register("lines_in", "Lines appended to chunks", m.lines_in.clone());
        r.register("bytes_out", "Bytes served to readers", m.bytes_out.clone());
        r.register("lines_out", "Lines served to readers", m.lines_out.clone());
        r.register(
            "chunks_completed",
            "Chunks completed by rotation",
            m.chunks_completed.clone(),
        );
        r.register(
            "runway_bytes",
            "Zeros written ahead of open chunks' data so that group commits write data only",
            m.runway_bytes.clone(),
        );
        r.register(
            "bytes_replicated",
            "Bytes copied from other owners' chunks",
            m.bytes_replicated.clone(),
        );
        r.register(
            "lines_replicated",
            "Lines copied from other owners' chunks",
            m.lines_replicated.clone(),
        );
        r.register(
            "fsync_seconds",
            "Latency of one fdatasync of a chunk (one group commit)",
            m.fsync_seconds.clone(),
        );
        r.register(
            "group_commit_requests",
            "Write requests made durable by one group commit",
            m.group_commit_requests.clone(),
        );
        r.register(
            "page_cache_dropped_bytes",
            "Written chunk bytes dropped from the page cache once on disk (--drop-behind)",
            m.page_cache_dropped_bytes.clone(),
        );
        r.register(
            "inflight_bytes",
            "Request body bytes held in memory (bounded by --max-inflight-bytes)",
            m.inflight_bytes.clone(),
        );
        r.register(
            "connections",
            "Open client and peer connections (bounded by --max-connections)",
            m.connections.clone(),
        );
        r.register(
            "idle_connections_closed",
            "Idle connections closed to make room for a new one while --max-connections was reached",
            m.idle_connections_closed.clone(),
        );
        r.register(
            "read_waiters",
            "Readers parked in a long poll, waiting for an append",
            m.read_waiters.clone(),
        );
        r.register(
            "shed_requests",
            "Write requests refused with 503 because of load or disk pressure",
            m.shed_requests.clone(),
        );
        r.register(
            "produce_repeats",
            "Idempotent produce requests (Chunkbus-Producer, Chunkbus-Sequence) answered with the position of the request they repeat instead of being stored again",
            m.produce_repeats.clone(),
        );
        r.register(
            "kafka_requests",
            "Kafka requests answered, by API",
            m.kafka_requests.clone(),
        );
        r.register(
            "kafka_bad_frames",
            "Kafka connections closed for a frame too large or unreadable",
            m.kafka_bad_frames.clone(),
        );
        r.register(
            "peer_connected",
            "1 while the peer's change feed answers",
            m.peer_connected.clone(),
        );
        r.register(
            "replication_lag_bytes",
            "Bytes of the peer's chunks not yet copied here",
            m.replication_lag_bytes.clone(),
        );
        r.register(
            "replication_lag_seconds",
            "How long this node has been behind the peer",
            m.replication_lag_seconds.clone(),
        );
        r.register(
            "tokens_reload_failures",
            "Reloads of the tokens file (SIGHUP) that failed; the tokens in use stay",
            m.tokens_reload_failures.clone(),
        );
        r.register(
            "peer_restarts",
            "Restarts of the peer noticed here (a new incarnation in its change feed)",
            m.peer_restarts.clone(),
        );
        r.register(
            "copies_repaired",
            "Complete copies of the peer's chunks found short of the peer's chunk and reopened to copy the rest",
            m.copies_repaired.clone(),
        );
        r.register(
            "copies_disagreeing",
            "Chunks of the peer whose copy here holds more bytes than the peer lists, or other bytes under a name it reused (see /v1/status)",
            m.copies_disagreeing.clone(),
        );
        r.register(
            "chunks_under_replicated",
            "This node's complete chunks, not in S3, held by fewer other nodes than --replicas asks (every peer with all): the number to watch",
            m.chunks_under_replicated.clone(),
        );
        r.register(
            "held_elsewhere_read_bytes",
            "Bytes of chunks this node lists but does not hold (--replicas k) read from the nodes that hold them",
            m.held_elsewhere_read_bytes.clone(),
        );
        r.register(
            "disk_used_bytes",
            "Bytes used on the data directory's file system",
            m.disk_used_bytes.clone(),
        );
        r.register(
            "disk_total_bytes",
            "Size of the data directory's file system",
            m.disk_total_bytes.clone(),
        );
        r.register(
            "chunks_evicted",
            "Local copies of uploaded chunks deleted (the chunk stays readable from S3)",
            m.chunks_evicted.clone(),
        );
        r.register(
            "s3_failing_chunks",
            "Chunks whose upload fails for a reason of their own, retried apart",
            m.s3_failing_chunks.clone(),
        );
        r.register(
            "s3_backlog_chunks",
            "Complete chunks this node has still to upload",
            m.s3_backlog_chunks.clone(),
        );
        r.register(
            "s3_backlog_bytes",
            "Bytes of the chunks this node has still to upload",
            m.s3_backlog_bytes.clone(),
        );
        r.register("s3_uploads", "Chunks uploaded to S3", m.s3_uploads.clone());
        r.register(
            "s3_upload_bytes",
            "Bytes uploaded to S3",
            m.s3_upload_bytes.clone(),
        );
        r.register(
            "s3_errors",
            "Failed S3 requests of the uploader (each retried with backoff)",
            m.s3_errors.clone(),
        );
        r.register(
            "s3_rescued_lines",
            "Lines stored again as new lines because only one place held them: an object under the name of one of this node's chunks (written by its process before it lost its disk), or this node's copy of a lost owner's chunk past a shorter object another replica uploaded",
            m.s3_rescued_lines.clone(),
        );
        r.register(
            "s3_last_success_seconds",
            "Unix time of the last successful upload",
            m.s3_last_success_seconds.clone(),
        );
        r.register(
            "s3_read_bytes",
            "Bytes of evicted chunks read back from S3",
            m.s3_read_bytes.clone(),
        );
        Arc::new(m)
    }

    /// The metrics in the OpenMetrics text format (read by Prometheus).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// The per-category counters, looked up once per category.
    pub fn category(&self, category: &str) -> CategoryMetrics {
        let l = CategoryLabels {
            category: category.to_owned(),
        };
        CategoryMetrics {
            bytes_in: self.bytes_in.get_or_create(&l).clone(),
            lines_in: self.lines_in.get_or_create(&l).clone(),
            bytes_out: self.bytes_out.get_or_create(&l).clone(),
            lines_out: self.lines_out.get_or_create(&l).clone(),
            chunks_completed: self.chunks_completed.get_or_create(&l).clone(),
            runway_bytes: self.runway_bytes.get_or_create(&l).clone(),
            bytes_replicated: self.bytes_replicated.get_or_create(&l).clone(),
            lines_replicated: self.lines_replicated.get_or_create(&l).clone(),
            chunks_evicted: self.chunks_evicted.get_or_create(&l).clone(),
        }
    }
}

/// Counters of one category (handles into the families of [`Metrics`]).
#[derive(Debug, Clone)]
pub struct CategoryMetrics {
    /// Bytes appended.
    pub bytes_in: Counter,
    /// Lines appended.
    pub lines_in: Counter,
    /// Bytes read.
    pub bytes_out: Counter,
    /// Lines read.
    pub lines_out: Counter,
    /// Chunks completed.
    pub chunks_completed: Counter,
    /// Zeros written ahead of open chunks' data.
    pub runway_bytes: Counter,
    /// Bytes copied from other owners.
    pub bytes_replicated: Counter,
    /// Lines copied from other owners.
    pub lines_replicated: Counter,
    /// Local copies evicted.
    pub chunks_evicted: Counter,
}
