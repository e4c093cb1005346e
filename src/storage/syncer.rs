//! Group commit: one thread per category that makes written bytes durable.
//!
//! The writer hands over every batch whose requests asked for `sync`, with
//! the file they went to. The syncer takes everything queued, runs one
//! `fdatasync` per distinct file, and hands the jobs back to the writer task,
//! which answers the requests. While it syncs, the writer keeps writing the
//! next batches, so one fdatasync covers every request that arrived during
//! the previous one.
//!
//! A dedicated thread, rather than a task that sends each fdatasync to the
//! blocking pool, saves two thread switches per group commit; handing the
//! answers back in one message, rather than waking each request from this
//! thread, saves a cross-thread wake-up per request.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::drop_behind::{self, CachedRange};
use super::{Appended, StorageError, runway};
use crate::metrics::Metrics;

/// Most jobs taken in one round.
const MAX_JOBS_PER_ROUND: usize = 4096;

/// A reply to send once the file is durable.
pub(super) type Reply = oneshot::Sender<Result<Appended, StorageError>>;

/// Bytes written to `file` that must reach stable storage; `replies` are
/// answered afterwards (empty for a background flush).
#[derive(Debug)]
pub(super) struct SyncJob {
    pub file: Arc<File>,
    /// The chunk's directory, when the chunk was created since the last
    /// job: its new entry must be durable too.
    pub dir: Option<PathBuf>,
    pub replies: Vec<(Reply, Appended)>,
    /// The chunk had a zero runway and is now complete at this size: cut
    /// the zeros before the sync, remove the mark after it.
    pub finish: Option<u64>,
    /// Written ranges to drop from the page cache once the round is durable
    /// (see `drop_behind`).
    pub drop_cached: Vec<CachedRange>,
}

/// Jobs whose fdatasync is over, with its outcome.
#[derive(Debug)]
pub(super) struct Synced {
    pub jobs: Vec<SyncJob>,
    pub result: Result<(), StorageError>,
}

impl Synced {
    /// Answers every request of every job.
    pub fn answer(self, metrics: &Metrics) {
        let mut answered = 0u64;
        for job in self.jobs {
            for (reply, appended) in job.replies {
                answered += 1;
                let _ = reply.send(self.result.clone().map(|()| appended));
            }
        }
        if answered > 0 {
            metrics.group_commit_requests.observe(answered as f64);
        }
    }
}

/// Runs on its own thread until every sender is dropped and the queue is
/// empty. `done` is unbounded but holds at most what the bounded job queue
/// let in.
pub(super) fn run(
    mut rx: mpsc::Receiver<SyncJob>,
    done: mpsc::UnboundedSender<Synced>,
    metrics: Arc<Metrics>,
) {
    let mut jobs = Vec::with_capacity(64);
    let mut files: Vec<Arc<File>> = Vec::new();
    let mut cut: Vec<Arc<File>> = Vec::new();
    let mut to_drop: Vec<CachedRange> = Vec::new();
    while rx.blocking_recv_many(&mut jobs, MAX_JOBS_PER_ROUND) > 0 {
        files.clear();
        for job in &jobs {
            if !files.iter().any(|f| Arc::ptr_eq(f, &job.file)) {
                files.push(job.file.clone());
            }
        }
        let mut result = Ok(());
        cut.clear();
        for job in &jobs {
            if let Some(size) = job.finish {
                match job.file.set_len(size) {
                    Ok(()) => cut.push(job.file.clone()),
                    // The zero tail stays and so does the mark: start-up cuts it.
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot cut the zero tail of a complete chunk")
                    }
                }
            }
        }
        for file in &files {
            let started = Instant::now();
            if let Err(e) = file.sync_data() {
                tracing::error!(error = %e, "fdatasync of a chunk failed; the requests it covered get an error");
                result = Err(StorageError::io("cannot flush chunk to stable storage", e));
                break;
            }
            metrics
                .fsync_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        for dir in jobs.iter().filter_map(|j| j.dir.as_ref()) {
            if result.is_ok()
                && let Err(e) = super::fsync_dir(dir)
            {
                result = Err(StorageError::io(
                    format!("cannot flush directory {}", dir.display()),
                    e,
                ));
            }
        }
        let ok = result.is_ok();
        if ok {
            for file in &cut {
                if let Err(e) = runway::clear_mark(file) {
                    tracing::warn!(error = %e, "cannot remove the zero-runway mark of a complete chunk");
                }
            }
        }
        to_drop.clear();
        for job in &mut jobs {
            to_drop.append(&mut job.drop_cached);
        }
        let synced = Synced {
            jobs: std::mem::take(&mut jobs),
            result,
        };
        if let Err(mpsc::error::SendError(synced)) = done.send(synced) {
            // The writer is gone (only at shutdown): answer from here.
            synced.answer(&metrics);
        }
        // After the answers: nobody waits on this.
        if ok && !to_drop.is_empty() {
            let dropped = drop_behind::drop_cached(&to_drop);
            metrics.page_cache_dropped_bytes.inc_by(dropped);
        }
    }
}
