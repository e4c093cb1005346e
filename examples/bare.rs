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
        return Err("usage: bare append|groupcommit|pread FILE".into());
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
    let end = {
        let mut f = s.file.lock().unwrap();
        if let Err(e) = f.0.write_all(&body) {
            return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
        }
        f.1 += body.len() as u64;
        f.1
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
