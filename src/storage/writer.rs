//! The writer task of one category: the only code that appends to this
//! node's chunks of the category.
//!
//! It takes every request queued since its last round, lays them out
//! back to back (a request never straddles two chunks), and writes each run
//! with one positional vectored write. A chunk is completed when the next
//! request would push it past `max_chunk_bytes` (unless it is empty) or when
//! it has held data for `rotate_after`. A new chunk file is created only when
//! a request needs it, so timers never create empty chunks.
//!
//! A failed write is cut back (`ftruncate`) to where it started, so a chunk
//! never holds part of a request that was answered with an error, and the
//! visible size only moves past bytes that were fully written.

use std::fs::{File, OpenOptions};
use std::io::IoSlice;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chunkbus_client::ChunkName;
use chunkbus_client::names::MAX_CHUNK_INDEX;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::category::Category;
use super::syncer::{Reply, SyncJob, Synced};
use super::{Appended, StorageError, SyncPolicy};
use crate::metrics::Metrics;

/// Runs up to this size are written on the async worker itself; larger
/// ones go to the blocking pool.
const INLINE_WRITE_MAX_BYTES: usize = 256 * 1024;
/// Without sync requests, an open chunk is flushed in the background each
/// time this many bytes were written to it.
const FLUSH_EVERY_BYTES: u64 = 16 << 20;
/// Most queued messages handled in one round.
const MAX_BATCH_MESSAGES: usize = 1024;

/// What the writer task is asked to do.
#[derive(Debug)]
pub(crate) enum WriterMsg {
    /// Append one request's lines.
    Append(AppendRequest),
    /// Complete the open chunk now (if it holds data).
    Rotate(oneshot::Sender<()>),
}

/// One request's lines, validated: whole lines, ending with `\n`, not empty.
#[derive(Debug)]
pub(crate) struct AppendRequest {
    pub data: Bytes,
    pub lines: u64,
    /// Answer only once the bytes are on stable storage.
    pub sync: bool,
    pub reply: Reply,
}

#[derive(Debug)]
struct OpenChunk {
    name: ChunkName,
    file: Arc<File>,
    size: u64,
    /// When the first byte went in; the chunk completes `rotate_after` later.
    first_write: Option<Instant>,
    /// Bytes written since the last flush was queued.
    unflushed_bytes: u64,
    /// The chunk's directory entry is not yet known to be durable; the
    /// next flush syncs the directory too.
    dir_pending: bool,
}

/// Settings and shared handles the writer needs.
#[derive(Debug, Clone)]
pub(crate) struct WriterConfig {
    pub node: String,
    pub max_chunk_bytes: u64,
    pub rotate_after: Duration,
    pub sync: SyncPolicy,
    pub data_dir: std::path::PathBuf,
    pub disk: Arc<super::disk::DiskMonitor>,
    pub metrics: Arc<Metrics>,
}

#[derive(Debug)]
pub(crate) struct Writer {
    cat: Arc<Category>,
    cfg: WriterConfig,
    next_index: u32,
    open: Option<OpenChunk>,
    /// Queue of the group-commit thread; `None` once shutting down.
    syncer: Option<mpsc::Sender<SyncJob>>,
    /// Jobs the group-commit thread has made durable, to answer.
    synced: mpsc::UnboundedReceiver<Synced>,
}

impl Writer {
    pub fn new(
        cat: Arc<Category>,
        cfg: WriterConfig,
        next_index: u32,
        syncer: mpsc::Sender<SyncJob>,
        synced: mpsc::UnboundedReceiver<Synced>,
    ) -> Self {
        Self {
            cat,
            cfg,
            next_index,
            open: None,
            syncer: Some(syncer),
            synced,
        }
    }

    /// Serves the queue until shutdown, then drains it and flushes.
    pub async fn run(mut self, mut rx: mpsc::Receiver<WriterMsg>, cancel: CancellationToken) {
        let mut batch = Vec::with_capacity(MAX_BATCH_MESSAGES);
        let mut tick = match self.cfg.sync {
            SyncPolicy::Interval(every) => Some(tokio::time::interval(every)),
            _ => None,
        };
        loop {
            let rotate_at = self
                .open
                .as_ref()
                .and_then(|o| o.first_write)
                .map(|t| t + self.cfg.rotate_after);
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                Some(synced) = self.synced.recv() => synced.answer(&self.cfg.metrics),
                n = rx.recv_many(&mut batch, MAX_BATCH_MESSAGES) => {
                    if n == 0 {
                        break;
                    }
                    self.handle(&mut batch).await;
                }
                _ = sleep_until_opt(rotate_at) => self.complete_open().await,
                _ = tick_opt(&mut tick) => self.flush_in_background().await,
            }
        }
        // Shutdown: finish what was accepted, then make it durable.
        rx.close();
        while rx.recv_many(&mut batch, MAX_BATCH_MESSAGES).await > 0 {
            self.handle(&mut batch).await;
        }
        self.flush_in_background().await;
        // Let the group-commit thread finish, then answer what it synced.
        self.syncer = None;
        while let Some(synced) = self.synced.recv().await {
            synced.answer(&self.cfg.metrics);
        }
    }

    /// Hands a job to the group-commit thread, or fails its requests when
    /// that thread is gone.
    async fn queue_sync(&self, job: SyncJob) {
        let sent = match &self.syncer {
            Some(tx) => tx.send(job).await.map_err(|e| e.0),
            None => Err(job),
        };
        if let Err(job) = sent {
            for (reply, _) in job.replies {
                let _ = reply.send(Err(StorageError::ShuttingDown));
            }
        }
    }

    async fn handle(&mut self, batch: &mut Vec<WriterMsg>) {
        let mut run: Vec<AppendRequest> = Vec::new();
        let mut run_bytes = 0u64;
        for msg in batch.drain(..) {
            match msg {
                WriterMsg::Rotate(done) => {
                    self.write_run(std::mem::take(&mut run)).await;
                    run_bytes = 0;
                    self.complete_open().await;
                    let _ = done.send(());
                }
                WriterMsg::Append(req) => {
                    let len = req.data.len() as u64;
                    let used = self.open.as_ref().map_or(0, |o| o.size) + run_bytes;
                    if used > 0 && used + len > self.cfg.max_chunk_bytes {
                        self.write_run(std::mem::take(&mut run)).await;
                        run_bytes = 0;
                        self.complete_open().await;
                    }
                    run_bytes += len;
                    run.push(req);
                }
            }
        }
        self.write_run(run).await;
    }

    /// Writes `run` contiguously into the open chunk (creating it if needed)
    /// and answers or hands the requests to the syncer.
    async fn write_run(&mut self, run: Vec<AppendRequest>) {
        if run.is_empty() {
            return;
        }
        if let Err(e) = self.ensure_open().await {
            for req in run {
                let _ = req.reply.send(Err(e.clone()));
            }
            return;
        }
        let open = self.open.as_mut().expect("ensure_open succeeded");
        let start = open.size;
        let file = open.file.clone();
        let bufs: Vec<Bytes> = run.iter().map(|r| r.data.clone()).collect();
        let total: usize = bufs.iter().map(Bytes::len).sum();
        let written = if total <= INLINE_WRITE_MAX_BYTES {
            // A small copy into the page cache: cheaper than two thread switches.
            write_all_at(&file, &bufs, start)
        } else {
            tokio::task::spawn_blocking(move || write_all_at(&file, &bufs, start))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        };
        if let Err(e) = written {
            let err = StorageError::io(format!("cannot append to chunk {}", open.name), e);
            tracing::warn!(category = %self.cat.name, chunk = %open.name, error = %err, "append failed; cutting the chunk back");
            let file = open.file.clone();
            let cut = tokio::task::spawn_blocking(move || file.set_len(start))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)));
            if let Err(cut_err) = cut {
                // The tail past `start` is garbage we could not remove: never
                // append after it. Readers see only `start` bytes, and the
                // next start-up cuts the file back to its last whole line.
                tracing::error!(category = %self.cat.name, chunk = %open.name, error = %cut_err, "cannot cut back a failed append; completing the chunk");
                self.complete_open().await;
            }
            for req in run {
                let _ = req.reply.send(Err(err.clone()));
            }
            return;
        }
        let mut offset = start;
        let mut lines = 0;
        let mut to_sync = Vec::new();
        for req in run {
            let appended = Appended {
                chunk: open.name.clone(),
                offset,
                next_offset: offset + req.data.len() as u64,
                lines: req.lines,
            };
            offset = appended.next_offset;
            lines += req.lines;
            if req.sync {
                to_sync.push((req.reply, appended));
            } else {
                let _ = req.reply.send(Ok(appended));
            }
        }
        open.size = offset;
        open.unflushed_bytes += offset - start;
        open.first_write.get_or_insert_with(Instant::now);
        self.cat.metrics.bytes_in.inc_by(offset - start);
        self.cat.metrics.lines_in.inc_by(lines);
        self.cat.update(&open.name, offset, false);
        if !to_sync.is_empty() || open.unflushed_bytes >= FLUSH_EVERY_BYTES {
            // Requests that asked for sync; or, without them, a flush every
            // few MiB so that the kernel writes back steadily instead of in
            // large stalls (RocksDB's bytes_per_sync).
            open.unflushed_bytes = 0;
            let job = SyncJob {
                file: open.file.clone(),
                dir: std::mem::take(&mut open.dir_pending).then(|| self.cat.dir.clone()),
                replies: to_sync,
            };
            self.queue_sync(job).await;
        }
    }

    /// Creates the next chunk file if none is open.
    async fn ensure_open(&mut self) -> Result<(), StorageError> {
        if self.open.is_some() {
            return Ok(());
        }
        if self.next_index > MAX_CHUNK_INDEX {
            return Err(StorageError::IndexExhausted {
                category: self.cat.name.clone(),
                node: self.cfg.node.clone(),
            });
        }
        // Names already known (chunks listed from the object store) are
        // never reused.
        while self
            .cat
            .meta(&ChunkName::new(self.cfg.node.clone(), self.next_index))
            .is_some()
        {
            self.next_index += 1;
        }
        let name = ChunkName::new(self.cfg.node.clone(), self.next_index);
        let path = self.cat.chunk_path(&name);
        let data_dir = self.cfg.data_dir.clone();
        let disk = self.cfg.disk.clone();
        let file = tokio::task::spawn_blocking(move || {
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&path)?;
            let _ = disk.refresh(&data_dir);
            Ok::<File, std::io::Error>(file)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        .map_err(|e| {
            StorageError::io(
                format!("cannot create chunk {name} in category {:?}", self.cat.name),
                e,
            )
        })?;
        self.next_index += 1;
        tracing::debug!(category = %self.cat.name, chunk = %name, "chunk opened");
        self.cat.update(&name, 0, false);
        self.open = Some(OpenChunk {
            name,
            file: Arc::new(file),
            size: 0,
            first_write: None,
            unflushed_bytes: 0,
            dir_pending: true,
        });
        Ok(())
    }

    /// Completes the open chunk: no byte is ever appended to it again.
    async fn complete_open(&mut self) {
        let Some(open) = self.open.take() else {
            return;
        };
        self.cat.update(&open.name, open.size, true);
        self.cat.metrics.chunks_completed.inc();
        tracing::debug!(category = %self.cat.name, chunk = %open.name, size = open.size, "chunk completed");
        if open.unflushed_bytes > 0 {
            // Complete chunks are flushed in the background whatever the sync policy.
            self.queue_sync(SyncJob {
                file: open.file,
                dir: open.dir_pending.then(|| self.cat.dir.clone()),
                replies: Vec::new(),
            })
            .await;
        }
    }

    /// Queues a flush of the open chunk if it was written since the last one.
    async fn flush_in_background(&mut self) {
        if let Some(open) = self.open.as_mut().filter(|o| o.unflushed_bytes > 0) {
            open.unflushed_bytes = 0;
            let job = SyncJob {
                file: open.file.clone(),
                dir: std::mem::take(&mut open.dir_pending).then(|| self.cat.dir.clone()),
                replies: Vec::new(),
            };
            self.queue_sync(job).await;
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn tick_opt(tick: &mut Option<tokio::time::Interval>) {
    match tick {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Writes every buffer back to back at `offset` with positional vectored writes.
fn write_all_at(file: &File, bufs: &[Bytes], mut offset: u64) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        // pwritev takes at most IOV_MAX (1024) buffers per call.
        let take = slices.len().min(1024);
        let n = rustix::io::pwritev(file, &slices[..take], offset)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                "pwritev wrote nothing",
            ));
        }
        offset += n as u64;
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn vectored_write_covers_every_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let bufs: Vec<Bytes> = (0..3000)
            .map(|i| Bytes::from(format!("line {i}\n")))
            .collect();
        write_all_at(&file, &bufs, 0).unwrap();
        let mut got = String::new();
        File::open(&path).unwrap().read_to_string(&mut got).unwrap();
        let want: String = (0..3000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(got, want);
    }
}
