//! Bare reference servers for `scripts/bench overhead`: the least a server
//! of each kind must do, built with the same HTTP stack (axum on tokio) and
//! allocator as chunkbus, so that the benchmark can print chunkbus's figures
//! as ratios of these, measured in the same run. Not part of the product.
//!
//! ```text
//! bare append FILE        POST any path: check the body is whole lines, one
//!                         write(2) of it to FILE under a mutex, answer 200
//! bare groupcommit FILE   the same, then wait for one fdatasync thread that
//!                         covers every request waiting when it starts
//! bare pread FILE         GET any path ?offset=N&max_bytes=M: one pread of
//!                         that range of FILE into a buffer, answered whole
//! bare mmap FILE          the same range answered from one mapping of the
//!                         whole FILE, made at start (no copy but the
//!                         kernel's into the socket; FILE must not change)
//! ```
//!
//! And for `scripts/bench ingest`, the least a server of each stock agent
//! API must do to store a request's records as lines: decode the request
//! with the crates chunkbus uses, write each record's line into one buffer,
//! one write(2) of it to FILE under a mutex, and the API's answer. No
//! names, auth, limits on what a request decodes into, categories or
//! metrics:
//!
//! ```text
//! bare es FILE      Elasticsearch `_bulk`: each action line parsed (or the
//!                   same as the one before), each document checked to be
//!                   JSON and stored as sent; an item per document
//! bare otlp FILE    OTLP/HTTP logs (protobuf, the published types): each
//!                   record's time, severity, string body and resource
//!                   attributes as a JSON line; the empty answer
//! bare loki FILE    Loki push (snappy, protobuf): each entry as
//!                   {"ts":..,"labels":"..","line":".."}; 204
//! bare hec FILE     Splunk HEC events: each JSON object checked and
//!                   stored as sent; HEC's success answer
//! ```
//!
//! Each listens on 127.0.0.1 (an ephemeral port) and prints
//! `bare listening on http://ADDR`.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::sync::watch;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Longest line accepted, as chunkbus's default `--max-line-bytes`.
const MAX_LINE_BYTES: usize = 1 << 20;

struct Appender {
    file: Mutex<(File, u64)>,
    /// Set for `groupcommit`.
    commit: Option<GroupCommit>,
}

/// One fdatasync thread: `wanted` is the highest end offset written by a
/// waiting request; `synced` what the last fdatasync covered.
struct GroupCommit {
    wanted: AtomicU64,
    wake: (Mutex<bool>, Condvar),
    synced: watch::Sender<u64>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, path] = &args[..] else {
        return Err("usage: bare append|groupcommit|pread|mmap|es|otlp|loki|hec FILE".into());
    };
    let app = match mode.as_str() {
        "append" | "groupcommit" => {
            let file = OpenOptions::new().create(true).append(true).open(path)?;
            let size = file.metadata()?.len();
            let commit = (mode == "groupcommit").then(|| GroupCommit {
                wanted: AtomicU64::new(0),
                wake: (Mutex::new(false), Condvar::new()),
                synced: watch::Sender::new(0),
            });
            let state = Arc::new(Appender {
                file: Mutex::new((file.try_clone()?, size)),
                commit,
            });
            if state.commit.is_some() {
                let s = state.clone();
                std::thread::spawn(move || sync_loop(&s, &file));
            }
            Router::new().fallback(post(append)).with_state(state)
        }
        "pread" => {
            let file = Arc::new(File::open(path)?);
            Router::new().fallback(get(pread)).with_state(file)
        }
        "mmap" => Router::new()
            .fallback(get(mapped))
            .with_state(Bytes::from_owner(Mapped::new(&File::open(path)?)?)),
        "es" | "otlp" | "loki" | "hec" => {
            let file = OpenOptions::new().create(true).append(true).open(path)?;
            let size = file.metadata()?.len();
            let state = Arc::new(Appender {
                file: Mutex::new((file, size)),
                commit: None,
            });
            let handler = match mode.as_str() {
                "es" => post(bulk),
                "otlp" => post(otlp),
                "loki" => post(loki),
                _ => post(hec),
            };
            Router::new().fallback(handler).with_state(state)
        }
        other => return Err(format!("unknown mode {other}").into()),
    };
    tokio::runtime::Runtime::new()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("bare listening on http://{}", listener.local_addr()?);
        axum::serve(listener, app).await
    })?;
    Ok(())
}

async fn append(State(s): State<Arc<Appender>>, body: Bytes) -> Response {
    if body.last() != Some(&b'\n') {
        return (StatusCode::BAD_REQUEST, "the body must end with a newline").into_response();
    }
    let mut start = 0;
    for end in memchr::memchr_iter(b'\n', &body) {
        if end - start > MAX_LINE_BYTES {
            return (StatusCode::PAYLOAD_TOO_LARGE, "line too long").into_response();
        }
        start = end + 1;
    }
    let end = match write_lines(&s, &body) {
        Ok(end) => end,
        Err(e) => return write_failed(e),
    };
    if let Some(commit) = &s.commit {
        let mut synced = commit.synced.subscribe();
        commit.wanted.fetch_max(end, Ordering::AcqRel);
        *commit.wake.0.lock().unwrap() = true;
        commit.wake.1.notify_one();
        if synced.wait_for(|&at| at >= end).await.is_err() {
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    }
    (StatusCode::OK, format!("{{\"next_offset\":{end}}}")).into_response()
}

fn sync_loop(s: &Appender, file: &File) {
    let commit = s.commit.as_ref().expect("groupcommit mode");
    loop {
        {
            let mut woken = commit.wake.0.lock().unwrap();
            while !*woken {
                woken = commit.wake.1.wait(woken).unwrap();
            }
            *woken = false;
        }
        let target = commit.wanted.load(Ordering::Acquire);
        if target <= *commit.synced.borrow() {
            continue;
        }
        file.sync_data().expect("fdatasync");
        commit.synced.send_replace(target);
    }
}

#[derive(serde::Deserialize)]
struct ReadQuery {
    offset: u64,
    max_bytes: u64,
}

async fn pread(State(file): State<Arc<File>>, Query(q): Query<ReadQuery>) -> Response {
    let size = match file.metadata() {
        Ok(m) => m.len(),
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    let len = q.max_bytes.min(size.saturating_sub(q.offset)) as usize;
    let mut buf = vec![0u8; len];
    match file.read_exact_at(&mut buf, q.offset) {
        Ok(()) => buf.into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// A read-only mapping of a whole file, never unmapped (the process ends).
struct Mapped(&'static [u8]);

impl Mapped {
    fn new(file: &File) -> std::io::Result<Self> {
        let len = usize::try_from(file.metadata()?.len()).map_err(std::io::Error::other)?;
        // SAFETY: a new read-only mapping of a file nothing changes while
        // this process runs; it is never unmapped, so the slice stays valid.
        let bytes = unsafe {
            let ptr = rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ,
                rustix::mm::MapFlags::SHARED,
                file,
                0,
            )?;
            std::slice::from_raw_parts(ptr.cast::<u8>(), len)
        };
        Ok(Mapped(bytes))
    }
}

impl AsRef<[u8]> for Mapped {
    fn as_ref(&self) -> &[u8] {
        self.0
    }
}

async fn mapped(State(file): State<Bytes>, Query(q): Query<ReadQuery>) -> Response {
    let start = q.offset.min(file.len() as u64) as usize;
    let end = q.offset.saturating_add(q.max_bytes).min(file.len() as u64) as usize;
    file.slice(start..end).into_response()
}

/// Appends `lines` to the file in one write; its end offset.
fn write_lines(s: &Appender, lines: &[u8]) -> std::io::Result<u64> {
    let mut f = s.file.lock().unwrap();
    f.0.write_all(lines)?;
    f.1 += lines.len() as u64;
    Ok(f.1)
}

fn write_failed(e: std::io::Error) -> Response {
    (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
}

fn bad_request(what: impl std::fmt::Display) -> Response {
    (StatusCode::BAD_REQUEST, what.to_string()).into_response()
}

/// A bulk action line: `{"index":{..}}` or `{"create":{..}}`.
#[derive(serde::Deserialize)]
struct BulkAction {
    index: Option<serde::de::IgnoredAny>,
    create: Option<serde::de::IgnoredAny>,
}

async fn bulk(State(s): State<Arc<Appender>>, body: Bytes) -> Response {
    let mut lines = Vec::with_capacity(body.len());
    let mut items = 0usize;
    let mut last_action: &[u8] = &[];
    let mut rest = &body[..];
    while !rest.is_empty() {
        let (action, after) = split_line(rest);
        if action.is_empty() {
            rest = after;
            continue;
        }
        let (doc, after) = split_line(after);
        rest = after;
        if action != last_action {
            match serde_json::from_slice::<BulkAction>(action) {
                Ok(a) if a.index.is_some() || a.create.is_some() => last_action = action,
                _ => return bad_request("not an index or create action"),
            }
        }
        if serde_json::from_slice::<serde::de::IgnoredAny>(doc).is_err() {
            return bad_request("a document is not JSON");
        }
        lines.extend_from_slice(doc);
        lines.push(b'\n');
        items += 1;
    }
    if let Err(e) = write_lines(&s, &lines) {
        return write_failed(e);
    }
    let mut answer = Vec::with_capacity(40 + items * 27);
    answer.extend_from_slice(br#"{"took":0,"errors":false,"items":["#);
    for i in 0..items {
        if i > 0 {
            answer.push(b',');
        }
        answer.extend_from_slice(br#"{"create":{"status":201}}"#);
    }
    answer.extend_from_slice(b"]}");
    (
        StatusCode::OK,
        [
            ("content-type", "application/json"),
            ("x-elastic-product", "Elasticsearch"),
        ],
        answer,
    )
        .into_response()
}

/// The first line of `buf` (without its `\n`) and what follows it.
fn split_line(buf: &[u8]) -> (&[u8], &[u8]) {
    match memchr::memchr(b'\n', buf) {
        Some(i) => (&buf[..i], &buf[i + 1..]),
        None => (buf, &[]),
    }
}

async fn otlp(State(s): State<Arc<Appender>>, body: Bytes) -> Response {
    use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use prost::Message;
    let request = match ExportLogsServiceRequest::decode(body) {
        Ok(r) => r,
        Err(e) => return bad_request(e),
    };
    let mut lines = Vec::new();
    for rl in &request.resource_logs {
        // The resource's string attributes, the same in each line.
        let mut resource = std::collections::BTreeMap::new();
        for kv in rl.resource.iter().flat_map(|r| &r.attributes) {
            if let Some(Value::StringValue(v)) = kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                resource.insert(kv.key.as_str(), v.as_str());
            }
        }
        let resource = serde_json::to_vec(&resource).expect("a map of strings");
        for sl in &rl.scope_logs {
            for r in &sl.log_records {
                let body = match r.body.as_ref().and_then(|b| b.value.as_ref()) {
                    Some(Value::StringValue(v)) => v.as_str(),
                    _ => "",
                };
                let line = OtlpLine {
                    time_unix_nano: r.time_unix_nano,
                    severity_number: r.severity_number,
                    severity_text: &r.severity_text,
                    body,
                };
                serde_json::to_writer(&mut lines, &line).expect("a line");
                lines.pop();
                lines.extend_from_slice(br#","resource":"#);
                lines.extend_from_slice(&resource);
                lines.extend_from_slice(b"}\n");
            }
        }
    }
    if let Err(e) = write_lines(&s, &lines) {
        return write_failed(e);
    }
    // An empty ExportLogsServiceResponse encodes to no bytes.
    (
        StatusCode::OK,
        [("content-type", "application/x-protobuf")],
        Vec::new(),
    )
        .into_response()
}

#[derive(serde::Serialize)]
struct OtlpLine<'a> {
    time_unix_nano: u64,
    severity_number: i32,
    severity_text: &'a str,
    body: &'a str,
}

async fn loki(State(s): State<Arc<Appender>>, body: Bytes) -> Response {
    use chunkbus::http::loki_push::PushRequest;
    use prost::Message;
    let raw = match snap::raw::Decoder::new().decompress_vec(&body) {
        Ok(r) => r,
        Err(e) => return bad_request(e),
    };
    let push = match PushRequest::decode(&raw[..]) {
        Ok(p) => p,
        Err(e) => return bad_request(e),
    };
    let mut lines = Vec::new();
    for stream in &push.streams {
        let labels = serde_json::to_vec(&stream.labels).expect("a string");
        for e in &stream.entries {
            let ts = e
                .timestamp
                .map_or(0, |t| t.seconds as i128 * 1_000_000_000 + t.nanos as i128);
            lines.extend_from_slice(br#"{"ts":"#);
            serde_json::to_writer(&mut lines, &ts).expect("a number");
            lines.extend_from_slice(br#","labels":"#);
            lines.extend_from_slice(&labels);
            lines.extend_from_slice(br#","line":"#);
            serde_json::to_writer(&mut lines, &e.line).expect("a string");
            lines.extend_from_slice(b"}\n");
        }
    }
    if let Err(e) = write_lines(&s, &lines) {
        return write_failed(e);
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn hec(State(s): State<Arc<Appender>>, body: Bytes) -> Response {
    let mut lines = Vec::with_capacity(body.len());
    let mut events =
        serde_json::Deserializer::from_slice(&body).into_iter::<serde::de::IgnoredAny>();
    let mut start = 0;
    while let Some(event) = events.next() {
        if let Err(e) = event {
            return bad_request(e);
        }
        let end = events.byte_offset();
        let object = body[start..end].trim_ascii_start();
        if object.first() != Some(&b'{') {
            return bad_request("an event is not a JSON object");
        }
        lines.extend_from_slice(object);
        lines.push(b'\n');
        start = end;
    }
    if let Err(e) = write_lines(&s, &lines) {
        return write_failed(e);
    }
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        r#"{"text":"Success","code":0}"#,
    )
        .into_response()
}
