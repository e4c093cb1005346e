//! Raw calls: one HTTP request each, no batching and no retries.

use std::time::Duration;

use bytes::Bytes;
use reqwest::{StatusCode, Url};

use crate::ClientError;
use crate::names::{ChunkName, validate_category};
use crate::wire::{ChunkInfo, ErrorBody, ProduceResponse};

/// Header with the offset just past the returned bytes.
pub const HEADER_NEXT_OFFSET: &str = "chunkbus-next-offset";
/// Header saying whether the chunk is complete (`true`/`false`).
pub const HEADER_COMPLETE: &str = "chunkbus-complete";
/// Header with the number of bytes of the chunk the server holds.
pub const HEADER_CHUNK_SIZE: &str = "chunkbus-chunk-size";
/// Header of `next`: the chunk the lines come from.
pub const HEADER_CHUNK: &str = "chunkbus-chunk";
/// Header of `next`: the offset of the first line.
pub const HEADER_OFFSET: &str = "chunkbus-offset";
/// Header of a chunk read: the incarnation of the server process that read
/// the bytes (a number drawn at its start-up).
pub const HEADER_INCARNATION: &str = "chunkbus-incarnation";

/// A handle on one chunkbus server. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    base: Url,
    http: reqwest::Client,
}

/// Options of a produce request.
#[derive(Debug, Clone, Default)]
pub struct ProduceOptions {
    /// `sync=true|false`; `None` uses the server's default.
    pub sync: Option<bool>,
    /// Wait until this many other nodes hold the data.
    pub min_replicas: Option<u32>,
    /// Bound on the `min_replicas` wait.
    pub timeout: Option<Duration>,
}

/// Options of [`Client::next`].
#[derive(Debug, Clone)]
pub struct NextOptions {
    /// Most bytes in one batch (a single longer line comes whole).
    pub max_bytes: u64,
    /// How long the server may hold the request when there is nothing new.
    pub wait: Duration,
    /// On the first call of a consumer that never acked: start at the end.
    pub start_latest: bool,
    /// Read as if `(chunk, offset)` were acked already.
    pub after: Option<(String, u64)>,
}

impl Default for NextOptions {
    fn default() -> Self {
        Self {
            max_bytes: 1 << 20,
            wait: Duration::from_secs(30),
            start_latest: false,
            after: None,
        }
    }
}

/// Lines returned by [`Client::next`].
#[derive(Debug, Clone)]
pub struct NextBatch {
    /// The chunk they come from.
    pub chunk: String,
    /// Offset of the first line.
    pub offset: u64,
    /// Offset just past the last line: ack this to move past the batch.
    pub next_offset: u64,
    /// Whole lines.
    pub data: Bytes,
}

/// Lines read from a chunk.
#[derive(Debug, Clone)]
pub struct ReadChunk {
    /// Whole lines, possibly empty.
    pub data: Bytes,
    /// Offset just past `data`: where the next read starts.
    pub next_offset: u64,
    /// True when the chunk will not grow any more.
    pub complete: bool,
    /// Bytes of the chunk the server holds.
    pub chunk_size: u64,
    /// The incarnation of the server process that read the bytes (absent
    /// from servers before it was sent): a node copying from its peer
    /// takes bytes only from the process whose listing it follows.
    pub incarnation: Option<u64>,
}

impl Client {
    /// A client for the server at `base` (e.g. `http://127.0.0.1:8080`).
    pub fn new(base: &str) -> Result<Self, ClientError> {
        Self::with_token(base, None)
    }

    /// A client that presents `token` (`Authorization: Bearer`) on every
    /// request, for nodes that require tokens.
    pub fn with_token(base: &str, token: Option<&str>) -> Result<Self, ClientError> {
        Self::with_tls(base, token, None)
    }

    /// A client that presents `token` and, for `https://` nodes whose
    /// certificate a private CA signed, trusts that CA (PEM) besides the
    /// system's roots.
    pub fn with_tls(
        base: &str,
        token: Option<&str>,
        ca_pem: Option<&[u8]>,
    ) -> Result<Self, ClientError> {
        let bad = |reason: String| ClientError::BadUrl {
            url: base.to_owned(),
            reason,
        };
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(token) = token {
            let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| ClientError::BadUrl {
                    url: base.to_owned(),
                    reason: "the token has characters a header cannot carry".into(),
                })?;
            v.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, v);
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .default_headers(headers);
        if let Some(pem) = ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| bad(format!("the CA is not a PEM certificate: {e}")))?;
            if certs.is_empty() {
                return Err(bad("the CA file holds no certificate".into()));
            }
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder.build().map_err(|e| ClientError::BadUrl {
            url: base.to_owned(),
            reason: e.to_string(),
        })?;
        Self::with_http(base, http)
    }

    /// A client that uses an existing `reqwest::Client` (for shared pools and settings).
    pub fn with_http(base: &str, http: reqwest::Client) -> Result<Self, ClientError> {
        let mut base = Url::parse(base).map_err(|e| ClientError::BadUrl {
            url: base.to_owned(),
            reason: e.to_string(),
        })?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(ClientError::BadUrl {
                url: base.to_string(),
                reason: "the scheme must be http or https".into(),
            });
        }
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        Ok(Self { base, http })
    }

    /// The server's base URL.
    pub fn base_url(&self) -> &Url {
        &self.base
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("http(s) URLs have path segments")
            .pop_if_empty()
            .extend(segments);
        url
    }

    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        url: &Url,
    ) -> Result<reqwest::Response, ClientError> {
        let resp = req.send().await.map_err(|source| ClientError::Transport {
            url: url.to_string(),
            source,
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp.bytes().await.unwrap_or_default();
        let message = serde_json::from_slice::<ErrorBody>(&body)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
        Err(ClientError::Status { status, message })
    }

    /// Sends `req` and decodes the JSON answer.
    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
        url: &Url,
    ) -> Result<T, ClientError> {
        let resp = self.send(req, url).await?;
        Self::json(resp, url).await
    }

    async fn json<T: serde::de::DeserializeOwned>(
        resp: reqwest::Response,
        url: &Url,
    ) -> Result<T, ClientError> {
        let body = resp
            .bytes()
            .await
            .map_err(|source| ClientError::Transport {
                url: url.to_string(),
                source,
            })?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Protocol {
            url: url.to_string(),
            reason: format!("bad JSON: {e}"),
        })
    }

    /// Appends newline-delimited `lines` to `category`.
    pub async fn produce(
        &self,
        category: &str,
        lines: impl Into<reqwest::Body>,
        opts: &ProduceOptions,
    ) -> Result<ProduceResponse, ClientError> {
        validate_category(category)?;
        let url = self.produce_url(category, opts);
        self.call(self.http.post(url.clone()).body(lines), &url)
            .await
    }

    fn produce_url(&self, category: &str, opts: &ProduceOptions) -> Url {
        let mut url = self.url(&["v1", "categories", category, "lines"]);
        {
            let mut q = url.query_pairs_mut();
            if let Some(sync) = opts.sync {
                q.append_pair("sync", if sync { "true" } else { "false" });
            }
            if let Some(n) = opts.min_replicas {
                q.append_pair("min_replicas", &n.to_string());
            }
            if let Some(t) = opts.timeout {
                q.append_pair("timeout", &format!("{}ms", t.as_millis()));
            }
        }
        if url.query() == Some("") {
            url.set_query(None);
        }
        url
    }

    /// `.../v1/categories/{category}/consumers/{consumer}/{rest...}`, with both
    /// names validated.
    fn consumer_url(
        &self,
        category: &str,
        consumer: &str,
        rest: &[&str],
    ) -> Result<Url, ClientError> {
        validate_category(category)?;
        crate::names::validate_consumer(consumer)?;
        let mut segments = vec!["v1", "categories", category, "consumers", consumer];
        segments.extend_from_slice(rest);
        Ok(self.url(&segments))
    }

    /// `GET .../consumers/{consumer}/next`: the consumer's next unacked
    /// lines, or `None` when nothing arrived within `wait`. `after` reads as
    /// if `(chunk, offset)` were acked already (to fetch ahead).
    pub async fn next(
        &self,
        category: &str,
        consumer: &str,
        opts: &NextOptions,
    ) -> Result<Option<NextBatch>, ClientError> {
        let mut url = self.consumer_url(category, consumer, &["next"])?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("max_bytes", &opts.max_bytes.to_string())
                .append_pair("wait", &format!("{}ms", opts.wait.as_millis()));
            if opts.start_latest {
                q.append_pair("start", "latest");
            }
            if let Some((chunk, offset)) = &opts.after {
                q.append_pair("after", &format!("{chunk}:{offset}"));
            }
        }
        let resp = self.send(self.http.get(url.clone()), &url).await?;
        if resp.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        let chunk = header_str(&resp, HEADER_CHUNK, &url)?;
        let offset = header_u64(&resp, HEADER_OFFSET, &url)?;
        let next_offset = header_u64(&resp, HEADER_NEXT_OFFSET, &url)?;
        let data = resp
            .bytes()
            .await
            .map_err(|source| ClientError::Transport {
                url: url.to_string(),
                source,
            })?;
        Ok(Some(NextBatch {
            chunk,
            offset,
            next_offset,
            data,
        }))
    }

    /// `POST .../consumers/{consumer}/acks`: everything of `chunk` before
    /// `offset` is processed.
    pub async fn ack(
        &self,
        category: &str,
        consumer: &str,
        chunk: &str,
        offset: u64,
    ) -> Result<crate::ConsumerDetail, ClientError> {
        let url = self.consumer_url(category, consumer, &["acks"])?;
        let body = crate::AckRequest {
            chunk: chunk.to_owned(),
            offset,
        };
        self.call(self.http.post(url.clone()).json(&body), &url)
            .await
    }

    /// `PUT .../consumers/{consumer}/position`: `earliest` rewinds, `latest` skips.
    pub async fn set_position(
        &self,
        category: &str,
        consumer: &str,
        to: &str,
    ) -> Result<crate::ConsumerDetail, ClientError> {
        let url = self.consumer_url(category, consumer, &["position"])?;
        let body = crate::PositionRequest { to: to.to_owned() };
        self.call(self.http.put(url.clone()).json(&body), &url)
            .await
    }

    /// `GET .../consumers/{consumer}`.
    pub async fn consumer(
        &self,
        category: &str,
        consumer: &str,
    ) -> Result<crate::ConsumerDetail, ClientError> {
        let url = self.consumer_url(category, consumer, &[])?;
        self.call(self.http.get(url.clone()), &url).await
    }

    /// `GET .../consumers`: every consumer of `category` with its lag.
    pub async fn consumers(
        &self,
        category: &str,
    ) -> Result<Vec<crate::ConsumerSummary>, ClientError> {
        validate_category(category)?;
        let url = self.url(&["v1", "categories", category, "consumers"]);
        self.call(self.http.get(url.clone()), &url).await
    }

    /// `POST /v1/categories/{c}/lines` with an already encoded body.
    pub async fn produce_encoded(
        &self,
        category: &str,
        body: Bytes,
        content_encoding: Option<&'static str>,
        opts: &ProduceOptions,
    ) -> Result<ProduceResponse, ClientError> {
        self.produce_as(category, body, content_encoding, opts, None)
            .await
    }

    /// [`Client::produce_encoded`] of an idempotent request: the node that
    /// stores it remembers (`producer`, `sequence`), and answers a retry of
    /// the same pair with the original position instead of storing the
    /// lines again (`Chunkbus-Producer`, `Chunkbus-Sequence`; see
    /// docs/api.md). `producer` is 1 to 128 of `A-Z a-z 0-9 . _ : -`.
    pub async fn produce_idempotent(
        &self,
        category: &str,
        body: Bytes,
        content_encoding: Option<&'static str>,
        opts: &ProduceOptions,
        producer: &str,
        sequence: u64,
    ) -> Result<ProduceResponse, ClientError> {
        self.produce_as(
            category,
            body,
            content_encoding,
            opts,
            Some((producer, sequence)),
        )
        .await
    }

    async fn produce_as(
        &self,
        category: &str,
        body: Bytes,
        content_encoding: Option<&'static str>,
        opts: &ProduceOptions,
        producer: Option<(&str, u64)>,
    ) -> Result<ProduceResponse, ClientError> {
        validate_category(category)?;
        let url = self.produce_url(category, opts);
        let mut req = self.http.post(url.clone()).body(body);
        if let Some(enc) = content_encoding {
            req = req.header(reqwest::header::CONTENT_ENCODING, enc);
        }
        if let Some((id, seq)) = producer {
            req = req
                .header("chunkbus-producer", id)
                .header("chunkbus-sequence", seq.to_string());
        }
        self.call(req, &url).await
    }

    /// Lists the categories the server knows, sorted.
    pub async fn categories(&self) -> Result<Vec<String>, ClientError> {
        let url = self.url(&["v1", "categories"]);
        self.call(self.http.get(url.clone()), &url).await
    }

    /// Lists the chunks of `category`, sorted by owner then index.
    pub async fn chunks(&self, category: &str) -> Result<Vec<ChunkInfo>, ClientError> {
        validate_category(category)?;
        let url = self.url(&["v1", "categories", category, "chunks"]);
        self.call(self.http.get(url.clone()), &url).await
    }

    /// Reads whole lines of `chunk` from `offset`, at most `max_bytes` (a
    /// single longer line comes back whole).
    pub async fn read_chunk(
        &self,
        category: &str,
        chunk: &str,
        offset: u64,
        max_bytes: u64,
    ) -> Result<ReadChunk, ClientError> {
        self.read_chunk_wait(category, chunk, offset, max_bytes, Duration::ZERO)
            .await
    }

    /// Like [`Client::read_chunk`], but when there is nothing past `offset`
    /// yet, the server holds the request for up to `wait` until data arrives.
    pub async fn read_chunk_wait(
        &self,
        category: &str,
        chunk: &str,
        offset: u64,
        max_bytes: u64,
        wait: Duration,
    ) -> Result<ReadChunk, ClientError> {
        validate_category(category)?;
        ChunkName::parse(chunk)?;
        let mut url = self.url(&["v1", "categories", category, "chunks", chunk]);
        url.query_pairs_mut()
            .append_pair("offset", &offset.to_string())
            .append_pair("max_bytes", &max_bytes.to_string())
            .append_pair("wait", &format!("{}ms", wait.as_millis()));
        let resp = self.send(self.http.get(url.clone()), &url).await?;
        let next_offset = header_u64(&resp, HEADER_NEXT_OFFSET, &url)?;
        let chunk_size = header_u64(&resp, HEADER_CHUNK_SIZE, &url)?;
        let complete = header_str(&resp, HEADER_COMPLETE, &url)? == "true";
        let incarnation = resp
            .headers()
            .get(HEADER_INCARNATION)
            .map(|_| header_u64(&resp, HEADER_INCARNATION, &url))
            .transpose()?;
        let data = resp
            .bytes()
            .await
            .map_err(|source| ClientError::Transport {
                url: url.to_string(),
                source,
            })?;
        Ok(ReadChunk {
            data,
            next_offset,
            complete,
            chunk_size,
            incarnation,
        })
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> Result<crate::NodeStatus, ClientError> {
        let url = self.url(&["v1", "status"]);
        self.call(self.http.get(url.clone()), &url).await
    }

    /// `GET /v1/console`: the operator's view of the node and its cluster.
    pub async fn console(&self) -> Result<crate::console::ConsoleView, ClientError> {
        let url = self.url(&["v1", "console"]);
        self.call(self.http.get(url.clone()), &url).await
    }

    /// `GET /v1/categories/{category}/console`: a category's newest chunks
    /// with their state.
    pub async fn console_category(
        &self,
        category: &str,
    ) -> Result<crate::console::CategoryChunks, ClientError> {
        validate_category(category)?;
        let url = self.url(&["v1", "categories", category, "console"]);
        self.call(self.http.get(url.clone()), &url).await
    }

    /// `POST /v1/admin/forget-node/{node}`: completes a permanently lost
    /// node's open chunks on every node.
    pub async fn forget_node(&self, node: &str) -> Result<crate::ForgetReport, ClientError> {
        crate::names::validate_node(node)?;
        let url = self.url(&["v1", "admin", "forget-node", node]);
        self.call(self.http.post(url.clone()), &url).await
    }

    /// `GET /healthz`: true when the server answers `ok`.
    pub async fn healthy(&self) -> bool {
        let url = self.url(&["healthz"]);
        matches!(self.http.get(url).send().await, Ok(r) if r.status() == StatusCode::OK)
    }
}

fn header_str(resp: &reqwest::Response, name: &str, url: &Url) -> Result<String, ClientError> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| ClientError::Protocol {
            url: url.to_string(),
            reason: format!("missing header {name}"),
        })
}

fn header_u64(resp: &reqwest::Response, name: &str, url: &Url) -> Result<u64, ClientError> {
    header_str(resp, name, url)?
        .parse()
        .map_err(|_| ClientError::Protocol {
            url: url.to_string(),
            reason: format!("header {name} is not a number"),
        })
}
