//! Group commit: one task per category that makes written bytes durable.
//!
//! The writer hands over every batch whose requests asked for `sync`, with
//! the file they went to. The syncer takes everything queued, runs one
//! `fdatasync` per distinct file, and only then answers the requests. While
//! it syncs, the writer keeps writing the next batches, so one fdatasync
//! covers every request that arrived during the previous one.

use std::fs::File;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::{Appended, StorageError};
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
    pub replies: Vec<(Reply, Appended)>,
}

/// Runs until every sender is dropped and the queue is empty.
pub(super) async fn run(mut rx: mpsc::Receiver<SyncJob>, metrics: Arc<Metrics>) {
    let mut jobs = Vec::with_capacity(64);
    while rx.recv_many(&mut jobs, MAX_JOBS_PER_ROUND).await > 0 {
        let mut files: Vec<Arc<File>> = Vec::new();
        for job in &jobs {
            if !files.iter().any(|f| Arc::ptr_eq(f, &job.file)) {
                files.push(job.file.clone());
            }
        }
        let fsync_seconds = metrics.fsync_seconds.clone();
        let result = tokio::task::spawn_blocking(move || {
            for file in files {
                let started = Instant::now();
                file.sync_data()?;
                fsync_seconds.observe(started.elapsed().as_secs_f64());
            }
            Ok::<(), std::io::Error>(())
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        let result = result.map_err(|e| {
            tracing::error!(error = %e, "fdatasync of a chunk failed; the requests it covered get an error");
            StorageError::io("cannot flush chunk to stable storage", e)
        });
        let mut answered = 0u64;
        for job in jobs.drain(..) {
            for (reply, appended) in job.replies {
                answered += 1;
                let _ = reply.send(result.clone().map(|()| appended));
            }
        }
        if answered > 0 {
            metrics.group_commit_requests.observe(answered as f64);
        }
    }
}
