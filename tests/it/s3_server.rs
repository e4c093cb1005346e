//! A real S3-compatible server for tests and benchmarks: s3s-fs (objects as
//! files under a root directory) behind SigV4 authentication, served over
//! HTTP on 127.0.0.1. It can be stopped and restarted on the same port, and
//! it counts completed uploads per key (PutObject and
//! CompleteMultipartUpload answered 2xx) and deletions, so tests can tell
//! a repeated upload from a single one and a replacement from a deletion.
//!
//! Also compiled into `examples/s3_server.rs` (the benchmark's store).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use tokio::net::TcpListener;

/// Access key the server accepts.
pub const ACCESS_KEY: &str = "chunkbus-test";
/// Secret key the server accepts.
pub const SECRET_KEY: &str = "chunkbus-test-secret";
/// The bucket created at start.
pub const BUCKET: &str = "chunkbus";

/// Requests counted per key, and what to refuse.
#[derive(Debug, Default)]
struct Counters {
    /// Completed uploads (PutObject, CompleteMultipartUpload) per key.
    uploads: BTreeMap<String, u32>,
    /// Parts uploaded (UploadPart answered 2xx) per key.
    parts: BTreeMap<String, u32>,
    /// Objects deleted (DeleteObject answered 2xx) per key.
    deletes: BTreeMap<String, u32>,
    /// Listings asked for, per prefix, counted as they arrive (also while
    /// the store is frozen).
    listings: BTreeMap<String, u32>,
    /// When set, conditional overwrites (`If-Match` on PutObject or
    /// CompleteMultipartUpload) answer 501, as on a store without them.
    refuse_if_match: bool,
    /// When set, CompleteMultipartUpload answers 503.
    refuse_completes: bool,
    /// When set, requests on the bucket itself (check, listing) answer 403;
    /// requests on objects are served.
    refuse_bucket: bool,
    /// When set, listings of the whole bucket (no prefix, or an empty one)
    /// answer 503; listings under a prefix are served.
    refuse_full_listings: bool,
    /// When set, reads of objects (GET on a key) answer 503; lookups
    /// (HEAD) and listings are served.
    refuse_object_reads: bool,
}

type Counts = Arc<Mutex<Counters>>;

/// A key of the nodes' own records under `_cluster/` (their claims, numbers
/// and forget marks), not a chunk: a category named `_cluster` has chunk
/// keys `_cluster/<node>-chunk...`.
fn cluster_record(key: &str) -> bool {
    [
        "_cluster/nodes/",
        "_cluster/numbers/",
        "_cluster/forgotten/",
    ]
    .iter()
    .any(|p| key.contains(p))
}

/// The prefix of a listing (ListObjectsV2: a GET on the bucket with
/// `list-type`), `""` for the whole bucket.
fn listing_prefix<B>(req: &hyper::Request<B>) -> Option<String> {
    let on_bucket = req.uri().path().trim_matches('/') == BUCKET;
    let mut query = form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes());
    if req.method() != hyper::Method::GET
        || !on_bucket
        || !query.clone().any(|(k, _)| k == "list-type")
    {
        return None;
    }
    let prefix = query
        .find(|(k, _)| k == "prefix")
        .map(|(_, v)| v.into_owned());
    Some(prefix.unwrap_or_default())
}

/// A running (or stopped) S3 server.
pub struct TestS3 {
    /// Where it listens (kept across restarts).
    pub addr: SocketAddr,
    /// Root directory: `<root>/<bucket>/<key>`.
    pub root: PathBuf,
    counts: Counts,
    /// While true, every request waits (a store that hangs, not one that
    /// refuses).
    frozen: Arc<tokio::sync::watch::Sender<bool>>,
    server: Option<tokio::task::JoinHandle<()>>,
    _tmp: Option<tempfile::TempDir>,
}

impl TestS3 {
    /// A server on a fresh temp dir, with the bucket created.
    pub async fn start() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let mut s3 = Self::start_in(tmp.path(), "127.0.0.1:0".parse().unwrap()).await;
        s3._tmp = Some(tmp);
        s3
    }

    /// A server keeping its objects under `root`, listening on `addr`.
    pub async fn start_in(root: &Path, addr: SocketAddr) -> Self {
        std::fs::create_dir_all(root.join(BUCKET)).unwrap();
        let mut s3 = Self {
            addr,
            root: root.to_owned(),
            counts: Counts::default(),
            frozen: Arc::new(tokio::sync::watch::Sender::new(false)),
            server: None,
            _tmp: None,
        };
        s3.listen().await;
        s3
    }

    async fn listen(&mut self) {
        // Rebinding the port of a server just stopped can race the kernel.
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tries < 100 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot listen on {}: {e}", self.addr),
            }
        };
        self.addr = listener.local_addr().unwrap();
        let fs = s3s_fs::FileSystem::new(&self.root).unwrap();
        let mut b = s3s::service::S3ServiceBuilder::new(fs);
        b.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = b.build();
        let counts = self.counts.clone();
        let frozen = self.frozen.clone();
        self.server = Some(tokio::spawn(async move {
            // Dropping this task (stop) drops the set: every connection ends.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let (service, counts) = (service.clone(), counts.clone());
                let frozen = frozen.clone();
                let svc = hyper::service::service_fn(move |req| {
                    let (service, counts) = (service.clone(), counts.clone());
                    let mut thawed = frozen.subscribe();
                    if let Some(prefix) = listing_prefix(&req) {
                        *counts.lock().unwrap().listings.entry(prefix).or_insert(0) += 1;
                    }
                    async move {
                        let _ = thawed.wait_for(|f| !*f).await;
                        counted(&service, &counts, req).await
                    }
                });
                conns.spawn(async move {
                    let _ = ConnBuilder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(socket), svc)
                        .await;
                });
                while conns.try_join_next().is_some() {}
            }
        }));
    }

    /// Stops listening and drops every connection (the store is down).
    pub async fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
            let _ = server.await;
        }
    }

    /// Listens again on the same address.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.listen().await;
    }

    /// `http://ADDR`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Listings under exactly `prefix` asked for so far (counted as they
    /// arrive, also while frozen).
    pub fn listings(&self, prefix: &str) -> u32 {
        let c = self.counts.lock().unwrap();
        c.listings.get(prefix).copied().unwrap_or(0)
    }

    /// How many times `key` was uploaded completely.
    pub fn uploads(&self, key: &str) -> u32 {
        let c = self.counts.lock().unwrap();
        c.uploads.get(key).copied().unwrap_or(0)
    }

    /// Every chunk key uploaded, with its upload count (not the nodes'
    /// records under `_cluster/`, rewritten at every refresh).
    pub fn upload_counts(&self) -> BTreeMap<String, u32> {
        let mut counts = self.counts.lock().unwrap().uploads.clone();
        counts.retain(|k, _| !cluster_record(k));
        counts
    }

    /// How many times `key` was deleted.
    pub fn deletes(&self, key: &str) -> u32 {
        let c = self.counts.lock().unwrap();
        c.deletes.get(key).copied().unwrap_or(0)
    }

    /// Makes conditional overwrites answer 501 Not Implemented (or work
    /// again), as a store without them does.
    pub fn refuse_if_match(&self, refuse: bool) {
        self.counts.lock().unwrap().refuse_if_match = refuse;
    }

    /// How many parts of `key` were uploaded (all multipart uploads).
    pub fn parts(&self, key: &str) -> u32 {
        let c = self.counts.lock().unwrap();
        c.parts.get(key).copied().unwrap_or(0)
    }

    /// Makes CompleteMultipartUpload answer 503 (or work again).
    pub fn refuse_completes(&self, refuse: bool) {
        self.counts.lock().unwrap().refuse_completes = refuse;
    }

    /// Makes every request hang until unfrozen (`false`).
    pub fn freeze(&self, frozen: bool) {
        self.frozen.send_replace(frozen);
    }

    /// Refuses (403) requests on the bucket itself, such as listings.
    pub fn refuse_bucket(&self, refuse: bool) {
        self.counts.lock().unwrap().refuse_bucket = refuse;
    }

    /// Makes listings of the whole bucket answer 503 (or work again), while
    /// listings under a prefix are served: a node's start-up listing fails
    /// (it is retried), lookups of chunks by name prefix do not.
    pub fn refuse_full_listings(&self, refuse: bool) {
        self.counts.lock().unwrap().refuse_full_listings = refuse;
    }

    /// Makes reads of objects answer 503 (or work again), while lookups
    /// and listings are served: a node finds a chunk, but cannot download
    /// it.
    pub fn refuse_object_reads(&self, refuse: bool) {
        self.counts.lock().unwrap().refuse_object_reads = refuse;
    }

    /// An S3 client with the accepted credentials, for checking objects.
    pub fn client(&self) -> aws_sdk_s3::Client {
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(self.endpoint())
            .force_path_style(true)
            .credentials_provider(Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "test"))
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build();
        aws_sdk_s3::Client::from_conf(conf)
    }

    /// The bytes of `key`, read back through the S3 API; `None` when absent.
    pub async fn get(&self, key: &str) -> Option<Vec<u8>> {
        let out = self
            .client()
            .get_object()
            .bucket(BUCKET)
            .key(key)
            .send()
            .await
            .ok()?;
        Some(out.body.collect().await.unwrap().into_bytes().to_vec())
    }

    /// Every chunk key in the bucket, through the S3 API (not the nodes'
    /// records under `_cluster/`).
    pub async fn keys(&self) -> Vec<String> {
        let mut keys = self.all_keys().await;
        keys.retain(|k| !cluster_record(k));
        keys
    }

    /// Every key in the bucket, through the S3 API.
    pub async fn all_keys(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let page = self
                .client()
                .list_objects_v2()
                .bucket(BUCKET)
                .set_continuation_token(token)
                .send()
                .await
                .unwrap();
            out.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_owned)),
            );
            token = page.next_continuation_token().map(str::to_owned);
            if token.is_none() {
                return out;
            }
        }
    }

    /// Environment for a `chunkbus serve` process using this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_owned()),
            ("AWS_REGION", "us-east-1".to_owned()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
        ]
    }

    /// `--s3-bucket BUCKET --s3-endpoint http://ADDR`.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--s3-bucket".into(),
            BUCKET.into(),
            "--s3-endpoint".into(),
            self.endpoint(),
            // Restarts after a SIGKILL wait two of these.
            "--s3-claim-refresh".into(),
            "200ms".into(),
        ]
    }
}

/// An S3 error answer with `code`, refused by the test.
fn refused(status: hyper::StatusCode, code: &str) -> hyper::Response<s3s::Body> {
    let mut resp = hyper::Response::new(s3s::Body::from(format!(
        "<Error><Code>{code}</Code><Message>refused by the test</Message></Error>"
    )));
    *resp.status_mut() = status;
    resp
}

async fn counted(
    service: &s3s::service::S3Service,
    counts: &Counts,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<s3s::Body>, s3s::HttpError> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let is_part = method == hyper::Method::PUT && query.contains("partNumber");
    let is_complete = method == hyper::Method::POST && query.contains("uploadId");
    let on_bucket = path.trim_end_matches('/') == format!("/{BUCKET}");
    if on_bucket && counts.lock().unwrap().refuse_bucket {
        return Ok(refused(hyper::StatusCode::FORBIDDEN, "AccessDenied"));
    }
    let full_listing = listing_prefix(&req).is_some_and(|p| p.is_empty());
    if full_listing && counts.lock().unwrap().refuse_full_listings {
        return Ok(refused(hyper::StatusCode::SERVICE_UNAVAILABLE, "SlowDown"));
    }
    if method == hyper::Method::GET && !on_bucket && counts.lock().unwrap().refuse_object_reads {
        return Ok(refused(hyper::StatusCode::SERVICE_UNAVAILABLE, "SlowDown"));
    }
    if is_complete && counts.lock().unwrap().refuse_completes {
        let mut resp = hyper::Response::new(s3s::Body::from("slow down".to_owned()));
        *resp.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
        return Ok(resp);
    }
    let writes = (method == hyper::Method::PUT && !is_part) || is_complete;
    if writes
        && req.headers().contains_key(hyper::header::IF_MATCH)
        && counts.lock().unwrap().refuse_if_match
    {
        let mut resp = hyper::Response::new(s3s::Body::from(
            "<Error><Code>NotImplemented</Code><Message>A header you provided implies functionality that is not implemented</Message></Error>"
                .to_owned(),
        ));
        *resp.status_mut() = hyper::StatusCode::NOT_IMPLEMENTED;
        return Ok(resp);
    }
    let deletes = method == hyper::Method::DELETE && !query.contains("uploadId");
    let resp = hyper::service::Service::call(service, req).await?;
    if resp.status().is_success()
        && let Some(key) = path.strip_prefix(&format!("/{BUCKET}/"))
        && !key.is_empty()
    {
        let mut c = counts.lock().unwrap();
        let map = if is_part {
            &mut c.parts
        } else if writes {
            &mut c.uploads
        } else if deletes {
            &mut c.deletes
        } else {
            return Ok(resp);
        };
        *map.entry(key.to_owned()).or_insert(0) += 1;
    }
    Ok(resp)
}
