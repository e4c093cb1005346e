//! Group commit: a small, fixed pool of threads that make written bytes
//! durable for every category.
//!
//! The writer of a category hands over every batch whose requests asked for
//! `sync`, with the file they went to. Each category is served by one
//! thread of the pool (assigned in turn as categories start), so its jobs
//! stay in order: a chunk's directory entry is durable before any request
//! written to it later is answered. A thread takes everything queued by all
//! of its categories, runs one `fdatasync` per distinct file, and hands each
//! category's jobs back to its writer task in one message, which answers
//! the requests. While it syncs, the writers keep writing the next batches,
//! so one fdatasync covers every request that arrived during the previous
//! one.
//!
//! A fixed pool rather than a thread per category: a category then costs a
//! task, not an OS thread and its stack, so that many categories stay cheap
//! (see docs/operations.md). Dedicated threads, rather than sending each
//! fdatasync to the blocking pool, save two thread switches per group
//! commit; handing the answers back in one message per category, rather
//! than waking each request from here, saves a cross-thread wake-up per
//! request.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::drop_behind::{self, CachedRange};
use super::{Appended, StorageError, runway};
use crate::metrics::Metrics;

/// Most jobs taken in one round.
const MAX_JOBS_PER_ROUND: usize = 4096;
/// Group-commit threads. Their fdatasyncs run side by side (file systems
/// and devices that overlap flushes gain from it); one category's jobs are
/// always served by the same thread.
pub(super) const SYNC_THREADS: usize = 4;
/// Bound of each thread's queue, for all of its categories together.
const QUEUE_JOBS: usize = 4096;

/// A reply to send once the file is durable.
pub(super) type Reply = oneshot::Sender<Result<Appended, StorageError>>;

/// Bytes written to `file` that must reach stable storage; `replies` are
/// answered afterwards (empty for a background flush).
#[derive(Debug)]
pub(super) struct SyncJob {
    pub file: Arc<File>,
    /// Another file to flush in the same round (the category's producer
    /// log); the job succeeds only if both are flushed.
    pub also: Option<Arc<File>>,
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
    /// Where the job goes back once synced: its category's writer.
    pub done: mpsc::UnboundedSender<Synced>,
}

/// One category's jobs whose fdatasync is over, each with its outcome.
#[derive(Debug)]
pub(super) struct Synced {
    pub jobs: Vec<(SyncJob, Result<(), StorageError>)>,
}

impl Synced {
    /// Answers every request of every job.
    pub fn answer(self, metrics: &Metrics) {
        let mut answered = 0u64;
        for (job, result) in self.jobs {
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

/// The group-commit threads. They end once the pool and every queue handed
/// out are dropped and their queues are empty.
#[derive(Debug)]
pub(super) struct SyncPool {
    queues: Vec<mpsc::Sender<SyncJob>>,
    next: AtomicUsize,
}

impl SyncPool {
    /// Starts `threads` group-commit threads.
    pub fn start(threads: usize, metrics: &Arc<Metrics>) -> std::io::Result<Self> {
        let mut queues = Vec::with_capacity(threads);
        for i in 0..threads.max(1) {
            let (tx, rx) = mpsc::channel(QUEUE_JOBS);
            let metrics = metrics.clone();
            std::thread::Builder::new()
                .name(format!("chunkbus-sync-{i}"))
                .spawn(move || run(rx, &metrics))?;
            queues.push(tx);
        }
        Ok(Self {
            queues,
            next: AtomicUsize::new(0),
        })
    }

    /// The queue of the thread that serves a new category: the threads in
    /// turn.
    pub fn assign(&self) -> mpsc::Sender<SyncJob> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.queues.len();
        self.queues[i].clone()
    }
}

/// Serves one thread's queue until every sender is dropped and it is empty.
fn run(mut rx: mpsc::Receiver<SyncJob>, metrics: &Metrics) {
    let mut jobs = Vec::with_capacity(64);
    let mut files: Vec<(Arc<File>, Result<(), StorageError>)> = Vec::new();
    let mut cut: Vec<Arc<File>> = Vec::new();
    let mut to_drop: Vec<CachedRange> = Vec::new();
    while rx.blocking_recv_many(&mut jobs, MAX_JOBS_PER_ROUND) > 0 {
        for job in &jobs {
            for file in std::iter::once(&job.file).chain(&job.also) {
                if !files.iter().any(|(f, _)| Arc::ptr_eq(f, file)) {
                    files.push((file.clone(), Ok(())));
                }
            }
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
        for (file, result) in &mut files {
            let started = Instant::now();
            if let Err(e) = file.sync_data() {
                tracing::error!(error = %e, "fdatasync of a chunk failed; the requests it covered get an error");
                *result = Err(StorageError::io("cannot flush chunk to stable storage", e));
                continue;
            }
            metrics
                .fsync_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        // Each job's outcome: its file's, then its directory's.
        let mut synced: Vec<Synced> = Vec::new();
        to_drop.clear();
        for mut job in jobs.drain(..) {
            let result_of = |file: &Arc<File>| {
                files
                    .iter()
                    .find(|(f, _)| Arc::ptr_eq(f, file))
                    .map_or(Ok(()), |(_, r)| r.clone())
            };
            let mut result = result_of(&job.file);
            if result.is_ok()
                && let Some(also) = &job.also
            {
                result = result_of(also);
            }
            if result.is_ok()
                && let Some(dir) = &job.dir
                && let Err(e) = super::fsync_dir(dir)
            {
                result = Err(StorageError::io(
                    format!("cannot flush directory {}", dir.display()),
                    e,
                ));
            }
            if result.is_ok() {
                if job.finish.is_some()
                    && cut.iter().any(|f| Arc::ptr_eq(f, &job.file))
                    && let Err(e) = runway::clear_mark(&job.file)
                {
                    tracing::warn!(error = %e, "cannot remove the zero-runway mark of a complete chunk");
                }
                to_drop.append(&mut job.drop_cached);
            }
            match synced
                .iter_mut()
                .find(|s| s.jobs[0].0.done.same_channel(&job.done))
            {
                Some(s) => s.jobs.push((job, result)),
                None => synced.push(Synced {
                    jobs: vec![(job, result)],
                }),
            }
        }
        for s in synced {
            let done = s.jobs[0].0.done.clone();
            if let Err(mpsc::error::SendError(s)) = done.send(s) {
                // The writer is gone (only at shutdown): answer from here.
                s.answer(metrics);
            }
        }
        // After the answers: nobody waits on this.
        if !to_drop.is_empty() {
            let dropped = drop_behind::drop_cached(&to_drop);
            metrics.page_cache_dropped_bytes.inc_by(dropped);
        }
        // Files are closed once their writer lets go of them too (an idle
        // category holds none).
        files.clear();
        cut.clear();
    }
}
