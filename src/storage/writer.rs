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
//!
//! Once a chunk takes many small synced groups, the writer keeps zeros
//! written just past its data, so that group commits write data only (see
//! `runway`); from then on a request holding a NUL byte goes to a new chunk.

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
use super::drop_behind::DropBehind;
use super::producers::{COMPACT_AFTER_RECORDS, ProducerLog, Recorded, record_line};
use super::runway;
use super::syncer::{Reply, SyncJob, Synced};
use super::{Appended, StorageError, SyncPolicy};
use crate::metrics::Metrics;

/// Runs up to this size are written on the async worker itself; larger
/// ones go to the blocking pool.
const INLINE_WRITE_MAX_BYTES: usize = 256 * 1024;
/// Without sync requests, an open chunk is flushed in the background each
/// time this many bytes were written to it. 4 MiB measured about 6 % faster
/// than 16 MiB with 1 MiB bodies and the same with small ones (see
/// docs/benchmarks.md).
const FLUSH_EVERY_BYTES: u64 = 4 << 20;
/// Most queued messages handled in one round.
const MAX_BATCH_MESSAGES: usize = 1024;
/// A chunk that took this many synced groups...
pub(super) const RUNWAY_AFTER_GROUPS: u64 = 8;
/// ...of at most this many bytes each on average gets a zero runway: for
/// larger groups the write of the new size is a small part of the commit.
const RUNWAY_MAX_GROUP_BYTES: u64 = 256 * 1024;

/// What the writer task is asked to do.
#[derive(Debug)]
pub(crate) enum WriterMsg {
    /// Append one request's lines.
    Append(AppendRequest),
    /// Complete the open chunk now (if it holds data).
    Rotate(oneshot::Sender<()>),
    /// Number this node's next lines from `end` on, unless a chunk after
    /// `after` (one of this node's) already took a number below `end`:
    /// answers whether the numbers up to `end` were free (see
    /// `Storage::add_remote`). `end: None` (not known) is never free.
    /// `durable`: saved in the category's state before the answer (else
    /// the caller's record of the numbers makes it durable).
    ReserveAfter {
        after: ChunkName,
        end: Option<u64>,
        durable: bool,
        reply: oneshot::Sender<Result<bool, StorageError>>,
    },
}

/// One request's lines, validated: whole lines, ending with `\n`, not empty.
#[derive(Debug)]
pub(crate) struct AppendRequest {
    /// The lines, in one or more buffers.
    pub data: Vec<Bytes>,
    pub lines: u64,
    /// Answer only once the bytes are on stable storage.
    pub sync: bool,
    pub reply: Reply,
    /// Idempotent produce: the record written with the lines.
    pub producer: Option<super::producers::ProducerTag>,
}

impl AppendRequest {
    fn len(&self) -> u64 {
        self.data.iter().map(|d| d.len() as u64).sum()
    }
}

#[derive(Debug)]
struct OpenChunk {
    name: ChunkName,
    path: std::path::PathBuf,
    /// `None` while closed for being idle (see `WriterConfig::idle_close_after`).
    file: Option<Arc<File>>,
    size: u64,
    /// Number of the chunk's first line, and lines written to it.
    first_line: u64,
    lines: u64,
    /// When the first byte went in; the chunk completes `rotate_after` later.
    first_write: Option<Instant>,
    /// When it was last written (or opened).
    last_write: Instant,
    /// Bytes written since the last flush was queued.
    unflushed_bytes: u64,
    /// The chunk's directory entry is not yet known to be durable; the
    /// next flush syncs the directory too.
    dir_pending: bool,
    /// Flushes queued with requests waiting on them.
    sync_groups: u64,
    runway: Runway,
}

/// Where an open chunk stands with its zero runway (see `runway`).
#[derive(Debug)]
enum Runway {
    /// None yet; one may come when the chunk takes many small groups.
    Not,
    /// Never for this chunk: it was opened for a request holding a NUL byte.
    Never,
    /// The mark (NUL-free from the chunk's size at that moment on) is
    /// being made durable. Requests are already checked for NUL bytes.
    Marking {
        task: tokio::task::JoinHandle<std::io::Result<()>>,
    },
    /// Marked; zeros are written up to `zeroed_to` (0: none yet).
    Marked { zeroed_to: u64 },
    /// Marking failed, perhaps after the mark was set: the chunk is kept
    /// as if marked (NUL-free, mark removed when complete) but gets no zeros.
    Failed,
}

impl Runway {
    /// True when the chunk must hold no NUL byte from here on.
    fn checks_nul(&self) -> bool {
        !matches!(self, Runway::Not | Runway::Never)
    }
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
    /// Zero runways are allowed and help on this file system.
    pub zero_runway: bool,
    /// Written bytes kept in the page cache behind the newest write; `None`:
    /// left to the kernel (see `drop_behind`).
    pub drop_behind: Option<u64>,
    /// Close the open chunk's file once it is idle this long.
    pub idle_close_after: Duration,
}

#[derive(Debug)]
pub(crate) struct Writer {
    cat: Arc<Category>,
    cfg: WriterConfig,
    next_index: u32,
    /// Number of the next line this node writes to the category.
    next_line: u64,
    open: Option<OpenChunk>,
    /// Queue of this category's group-commit thread and where its jobs
    /// come back; `None` once shutting down.
    syncer: Option<(mpsc::Sender<SyncJob>, mpsc::UnboundedSender<Synced>)>,
    /// Jobs the group-commit thread has made durable, to answer.
    synced: mpsc::UnboundedReceiver<Synced>,
    /// What was written recently, to drop from the page cache in time.
    drop_behind: DropBehind,
    /// The category's log of tagged requests, once one came.
    producer_log: Option<ProducerLog>,
}

impl Writer {
    pub fn new(
        cat: Arc<Category>,
        cfg: WriterConfig,
        next_index: u32,
        syncer: mpsc::Sender<SyncJob>,
    ) -> Self {
        let (done, synced) = mpsc::unbounded_channel();
        Self {
            cat,
            drop_behind: DropBehind::new(cfg.drop_behind),
            cfg,
            next_index,
            next_line: 0,
            open: None,
            syncer: Some((syncer, done)),
            synced,
            producer_log: None,
        }
    }

    /// Serves the queue until shutdown, then drains it and flushes.
    pub async fn run(mut self, mut rx: mpsc::Receiver<WriterMsg>, cancel: CancellationToken) {
        // Grown by the first rounds that need it: an idle category keeps
        // no batch space.
        let mut batch = Vec::new();
        let mut tick = match self.cfg.sync {
            SyncPolicy::Interval(every) => Some(tokio::time::interval(every)),
            _ => None,
        };
        // The timers live across rounds and are moved only when their
        // deadline changes (to a later one, which costs the timer wheel
        // nothing until it is due): a round per batch makes no timer.
        let rotate = tokio::time::sleep(Duration::ZERO);
        let idle = tokio::time::sleep(Duration::ZERO);
        let cancelled = cancel.cancelled();
        tokio::pin!(rotate, idle, cancelled);
        let (mut rotate_set, mut idle_set) = (None, None);
        loop {
            let rotate_at = self
                .open
                .as_ref()
                .and_then(|o| o.first_write)
                .map(|t| t + self.cfg.rotate_after);
            let idle_at = self
                .open
                .as_ref()
                .filter(|o| o.file.is_some())
                .map(|o| o.last_write + self.cfg.idle_close_after);
            if let Some(at) = rotate_at
                && rotate_set != rotate_at
            {
                rotate.as_mut().reset(at);
            }
            if let Some(at) = idle_at
                && idle_set != idle_at
            {
                idle.as_mut().reset(at);
            }
            (rotate_set, idle_set) = (rotate_at, idle_at);
            tokio::select! {
                biased;
                _ = &mut cancelled => break,
                Some(synced) = self.synced.recv() => synced.answer(&self.cfg.metrics),
                n = rx.recv_many(&mut batch, MAX_BATCH_MESSAGES) => {
                    if n == 0 {
                        break;
                    }
                    self.handle(&mut batch).await;
                }
                _ = &mut rotate, if rotate_at.is_some() => self.complete_open().await,
                _ = &mut idle, if idle_at.is_some() => self.close_idle().await,
                _ = tick_opt(&mut tick) => self.flush_in_background().await,
            }
        }
        // Shutdown: finish what was accepted, then make it durable.
        rx.close();
        while rx.recv_many(&mut batch, MAX_BATCH_MESSAGES).await > 0 {
            self.handle(&mut batch).await;
        }
        // The open chunk is complete at the next start-up: its zeros go now,
        // so that start-up need not search it.
        self.settle_mark().await;
        let marked = self
            .open
            .as_ref()
            .is_some_and(|o| matches!(o.runway, Runway::Marked { .. } | Runway::Failed));
        let file = match marked {
            true => self.file().await.ok(),
            false => None,
        };
        match (self.open.as_mut(), file) {
            (Some(open), Some(file)) => {
                open.unflushed_bytes = 0;
                let job = Job {
                    file,
                    dir: std::mem::take(&mut open.dir_pending).then(|| self.cat.dir.clone()),
                    replies: Vec::new(),
                    finish: Some(open.size),
                    also: None,
                };
                self.queue_sync(job).await;
            }
            // Not marked, or its file cannot be opened again: then the
            // next start-up cuts the zeros.
            _ => self.flush_in_background().await,
        }
        // Answer what the group-commit thread syncs until every job queued
        // has come back (each holds a sender of `synced`).
        self.syncer = None;
        while let Some(synced) = self.synced.recv().await {
            synced.answer(&self.cfg.metrics);
        }
    }

    /// Hands a job to the group-commit thread, or fails its requests when
    /// that thread is gone.
    async fn queue_sync(&mut self, job: Job) {
        let Some((tx, done)) = &self.syncer else {
            for (reply, _) in job.replies {
                let _ = reply.send(Err(StorageError::ShuttingDown));
            }
            return;
        };
        let job = SyncJob {
            file: job.file,
            also: job.also,
            dir: job.dir,
            replies: job.replies,
            finish: job.finish,
            drop_cached: self.drop_behind.take_due(),
            done: done.clone(),
        };
        if let Err(mpsc::error::SendError(job)) = tx.send(job).await {
            for (reply, _) in job.replies {
                let _ = reply.send(Err(StorageError::ShuttingDown));
            }
        }
    }

    async fn handle(&mut self, batch: &mut Vec<WriterMsg>) {
        let mut run = Run::default();
        for msg in batch.drain(..) {
            match msg {
                WriterMsg::Rotate(done) => {
                    self.write_run(std::mem::take(&mut run)).await;
                    self.complete_open().await;
                    let _ = done.send(());
                }
                WriterMsg::ReserveAfter {
                    after,
                    end,
                    durable,
                    reply,
                } => {
                    // The requests before it may open a chunk.
                    self.write_run(std::mem::take(&mut run)).await;
                    let _ = reply.send(self.reserve_after(&after, end, durable).await);
                }
                WriterMsg::Append(req) => {
                    // A chunk with a runway takes no NUL byte: such a
                    // request starts a new chunk, which never gets one.
                    let nul = self.open.as_ref().is_some_and(|o| o.runway.checks_nul())
                        && req.data.iter().any(|d| memchr::memchr(0, d).is_some());
                    if nul {
                        self.write_run(std::mem::take(&mut run)).await;
                        self.complete_open().await;
                    }
                    let len = req.len();
                    let used = self.open.as_ref().map_or(0, |o| o.size) + run.bytes;
                    if used > 0 && used + len > self.cfg.max_chunk_bytes {
                        self.write_run(std::mem::take(&mut run)).await;
                        self.complete_open().await;
                    }
                    run.bytes += len;
                    run.has_nul |= nul;
                    run.reqs.push(req);
                }
            }
        }
        self.write_run(run).await;
    }

    /// Writes `run` contiguously into the open chunk (creating it if needed)
    /// and answers or hands the requests to the syncer.
    async fn write_run(&mut self, run: Run) {
        let Run {
            reqs: run, has_nul, ..
        } = run;
        if run.is_empty() {
            return;
        }
        let opened = match self.ensure_open(has_nul).await {
            Ok(()) => self.file().await,
            Err(e) => Err(e),
        };
        let file = match opened {
            Ok(file) => file,
            Err(e) => {
                for req in run {
                    let _ = req.reply.send(Err(e.clone()));
                }
                return;
            }
        };
        // Tagged requests are recorded before their lines are written (see
        // `producers`).
        let tagged_sync = run.iter().any(|r| r.sync && r.producer.is_some());
        if run.iter().any(|r| r.producer.is_some())
            && let Err(e) = self.record_producers(&run).await
        {
            for req in run {
                let _ = req.reply.send(Err(e.clone()));
            }
            return;
        }
        let open = self.open.as_mut().expect("ensure_open succeeded");
        let start = open.size;
        let bufs: Vec<Bytes> = run.iter().flat_map(|r| r.data.iter().cloned()).collect();
        let total: usize = bufs.iter().map(Bytes::len).sum();
        let written = if total <= INLINE_WRITE_MAX_BYTES {
            // A small copy into the page cache: cheaper than two thread switches.
            write_all_at(&file, &bufs, start)
        } else {
            let file = file.clone();
            tokio::task::spawn_blocking(move || write_all_at(&file, &bufs, start))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        };
        if let Err(e) = written {
            if let Runway::Marked { zeroed_to } = &mut open.runway {
                // Cut back below: the zeros go too.
                *zeroed_to = 0;
            }
            let err = StorageError::io(format!("cannot append to chunk {}", open.name), e);
            tracing::warn!(category = %self.cat.name, chunk = %open.name, error = %err, "append failed; cutting the chunk back");
            let file = file.clone();
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
                next_offset: offset + req.len(),
                lines: req.lines,
                first_line: open.first_line + open.lines + lines,
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
        open.lines += lines;
        open.unflushed_bytes += offset - start;
        self.drop_behind.written(&open.path, start, offset);
        open.last_write = Instant::now();
        open.first_write.get_or_insert(open.last_write);
        self.cat.metrics.bytes_in.inc_by(offset - start);
        self.cat.metrics.lines_in.inc_by(lines);
        self.cat
            .update(&open.name, offset, false, None, Some(open.lines));
        if !to_sync.is_empty() || open.unflushed_bytes >= FLUSH_EVERY_BYTES {
            // Requests that asked for sync; or, without them, a flush every
            // few MiB so that the kernel writes back steadily instead of in
            // large stalls (RocksDB's bytes_per_sync).
            open.unflushed_bytes = 0;
            if !to_sync.is_empty() {
                open.sync_groups += 1;
                self.advance_runway().await;
            }
            let open = self.open.as_mut().expect("still open");
            let job = Job {
                file,
                dir: std::mem::take(&mut open.dir_pending).then(|| self.cat.dir.clone()),
                replies: to_sync,
                finish: None,
                also: tagged_sync
                    .then(|| self.producer_log.as_ref().map(|l| l.file.clone()))
                    .flatten(),
            };
            self.queue_sync(job).await;
        }
        if self
            .producer_log
            .as_ref()
            .is_some_and(|l| l.records >= COMPACT_AFTER_RECORDS)
        {
            self.compact_producers().await;
        }
    }

    /// Appends the records of `run`'s tagged requests to the producer log
    /// (opening it first when needed), at the positions `write_run` gives
    /// them. Not flushed here: the group commit flushes it with the lines.
    async fn record_producers(&mut self, run: &[AppendRequest]) -> Result<(), StorageError> {
        let open = self.open.as_ref().expect("ensure_open succeeded");
        let mut text = Vec::new();
        let mut count = 0;
        let mut offset = open.size;
        for req in run {
            let next_offset = offset + req.len();
            if let Some(tag) = &req.producer {
                let r = Recorded {
                    sequence: tag.sequence,
                    chunk: open.name.clone(),
                    offset,
                    next_offset,
                    lines: req.lines,
                    crc: tag.crc,
                    verified: true,
                };
                record_line(&mut text, &tag.producer, &r);
                count += 1;
            }
            offset = next_offset;
        }
        let failed = |e| StorageError::io("cannot record producer sequences", e);
        if self.producer_log.is_none() {
            let dir = self.cat.dir.clone();
            let log = tokio::task::spawn_blocking(move || ProducerLog::open(&dir))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
                .map_err(failed)?;
            self.producer_log = Some(log);
        }
        let log = self.producer_log.as_mut().expect("opened");
        // A few hundred bytes into the page cache.
        std::io::Write::write_all(&mut &*log.file, &text).map_err(failed)?;
        log.records += count;
        Ok(())
    }

    /// Rewrites the producer log with what it keeps. On failure the log
    /// goes on growing and the next run tries again.
    async fn compact_producers(&mut self) {
        let dir = self.cat.dir.clone();
        match tokio::task::spawn_blocking(move || ProducerLog::compact(&dir))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        {
            Ok(log) => self.producer_log = Some(log),
            Err(e) => {
                tracing::warn!(category = %self.cat.name, error = %e, "cannot compact the producer log");
                if let Some(log) = &mut self.producer_log {
                    log.records = 0;
                }
            }
        }
    }

    /// Before a group commit: marks a chunk that takes many small groups,
    /// and writes zeros ahead of a marked chunk's data when few are left.
    async fn advance_runway(&mut self) {
        let Some(open) = self.open.as_mut() else {
            return;
        };
        if let Runway::Marking { task } = &open.runway
            && task.is_finished()
        {
            self.settle_mark().await;
        }
        let Some(open) = self.open.as_mut() else {
            return;
        };
        match &mut open.runway {
            Runway::Not
                if self.cfg.zero_runway
                    && open.sync_groups >= RUNWAY_AFTER_GROUPS
                    && open.size / open.sync_groups <= RUNWAY_MAX_GROUP_BYTES =>
            {
                let Some(file) = open.file.clone() else {
                    return;
                };
                let from = open.size;
                let task = tokio::task::spawn_blocking(move || runway::mark(&file, from));
                open.runway = Runway::Marking { task };
            }
            Runway::Marked { zeroed_to }
                if *zeroed_to < open.size + runway::LOW && !self.cfg.disk.above_limit() =>
            {
                let Some(file) = &open.file else {
                    return;
                };
                let at = open.size.max(*zeroed_to);
                // A few hundred KiB into the page cache: cheaper inline than
                // two thread switches, like small appends.
                match runway::extend(file, at, self.cfg.max_chunk_bytes) {
                    Ok(end) => {
                        self.cat.metrics.runway_bytes.inc_by(end - at);
                        *zeroed_to = end;
                    }
                    Err(e) => {
                        // Zeros may stand past the data; the mark covers them.
                        tracing::debug!(category = %self.cat.name, chunk = %open.name, error = %e, "cannot write a zero runway");
                    }
                }
            }
            _ => {}
        }
    }

    /// Waits for the open chunk's mark to be durable (or to fail).
    async fn settle_mark(&mut self) {
        let Some(open) = self.open.as_mut() else {
            return;
        };
        let Runway::Marking { task } = &mut open.runway else {
            return;
        };
        let done = task.await.unwrap_or_else(|e| Err(std::io::Error::other(e)));
        open.runway = match done {
            Ok(()) => Runway::Marked { zeroed_to: 0 },
            Err(e) => {
                tracing::warn!(category = %self.cat.name, chunk = %open.name, error = %e, "cannot mark a chunk for a zero runway; appending only");
                Runway::Failed
            }
        };
    }

    /// See [`WriterMsg::ReserveAfter`]. Decided here, where chunks are
    /// opened, so that none opens between the check and the reservation.
    async fn reserve_after(
        &mut self,
        after: &ChunkName,
        end: Option<u64>,
        durable: bool,
    ) -> Result<bool, StorageError> {
        let Some(end) = end else {
            return Ok(false);
        };
        // Numbers grow with the index: the next chunk has the lowest. One
        // whose number is not known yet takes it after the chunk before it.
        if let Some(next) = self.cat.next_of_owner(after)
            && next.meta.first_line.is_some_and(|first| first < end)
        {
            return Ok(false);
        }
        if durable {
            let cat = self.cat.clone();
            tokio::task::spawn_blocking(move || cat.reserve_line_durably(end))
                .await
                .map_err(|e| StorageError::io("reserve task failed", std::io::Error::other(e)))??;
        } else {
            self.cat.reserve_line(end);
        }
        self.next_line = self.next_line.max(end);
        Ok(true)
    }

    /// Creates the next chunk file if none is open; `has_nul`: for requests
    /// holding a NUL byte (the chunk then never gets a zero runway).
    async fn ensure_open(&mut self, has_nul: bool) -> Result<(), StorageError> {
        if self.open.is_some() {
            return Ok(());
        }
        // Names reserved since this writer started (learned from the peers
        // by a node that lost its disk) are never used.
        self.next_index = self.next_index.max(self.cat.reserved_index());
        // Likewise numbers: found at start-up, or learned from the peers.
        self.next_line = self.next_line.max(self.cat.reserved_line());
        if self.next_index > MAX_CHUNK_INDEX {
            return Err(StorageError::IndexExhausted {
                category: self.cat.name.clone(),
                node: self.cfg.node.clone(),
            });
        }
        // Names already known (chunks listed from the object store or
        // restored from peers) are never reused.
        while self
            .cat
            .meta(&ChunkName::new(self.cfg.node.clone(), self.next_index))
            .is_some()
        {
            self.next_index += 1;
        }
        let name = ChunkName::new(self.cfg.node.clone(), self.next_index);
        let path = self.cat.chunk_path(&name);
        let create = path.clone();
        let data_dir = self.cfg.data_dir.clone();
        let disk = self.cfg.disk.clone();
        // The chunk's first number is durable before any of its lines is
        // acknowledged: a restart numbers it so even when every chunk
        // before it is gone (see `numbering`).
        let (cat, opened) = (self.cat.clone(), name.clone());
        let numbers = super::numbering::LineRecord {
            size: 0,
            first: self.next_line,
            lines: 0,
        };
        let context = format!("cannot create chunk {name} in category {:?}", self.cat.name);
        let file = tokio::task::spawn_blocking(move || {
            {
                // A full disk or no descriptor left is reported as such.
                let _serial = cat.state.lock().unwrap();
                cat.record_numbers(&[(opened, numbers)])?;
            }
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&create)
                .map_err(|e| StorageError::io(context, e))?;
            let _ = disk.refresh(&data_dir);
            Ok::<File, StorageError>(file)
        })
        .await
        .unwrap_or_else(|e| {
            Err(StorageError::io(
                "chunk creation task failed",
                std::io::Error::other(e),
            ))
        })?;
        self.next_index += 1;
        tracing::debug!(category = %self.cat.name, chunk = %name, "chunk opened");
        self.cat
            .update(&name, 0, false, Some(self.next_line), Some(0));
        self.open = Some(OpenChunk {
            name,
            path,
            file: Some(Arc::new(file)),
            size: 0,
            first_line: self.next_line,
            lines: 0,
            first_write: None,
            last_write: Instant::now(),
            unflushed_bytes: 0,
            dir_pending: true,
            sync_groups: 0,
            runway: match has_nul {
                true => Runway::Never,
                false => Runway::Not,
            },
        });
        Ok(())
    }

    /// Completes the open chunk: no byte is ever appended to it again.
    async fn complete_open(&mut self) {
        // A mark being written must land before the completion removes it.
        self.settle_mark().await;
        let Some(open) = self.open.as_ref() else {
            return;
        };
        let marked = matches!(open.runway, Runway::Marked { .. } | Runway::Failed);
        let file = match (&open.file, marked) {
            (Some(file), _) => Some(file.clone()),
            // Closed while idle (so flushed): opened again only to lose its
            // zeros; failing that, the next start-up cuts them.
            (None, true) => self.file().await.ok(),
            (None, false) => None,
        };
        let open = self.open.take().expect("checked above");
        self.cat
            .update(&open.name, open.size, true, None, Some(open.lines));
        let numbers = super::numbering::LineRecord {
            size: open.size,
            first: open.first_line,
            lines: open.lines,
        };
        self.next_line = numbers.end();
        self.record_numbers(&open.name, numbers).await;
        self.cat.metrics.chunks_completed.inc();
        tracing::debug!(category = %self.cat.name, chunk = %open.name, size = open.size, "chunk completed");
        if let Some(file) = file
            && (open.unflushed_bytes > 0 || marked)
        {
            // Complete chunks are flushed in the background whatever the
            // sync policy; a marked one loses its zeros and its mark.
            self.queue_sync(Job {
                file,
                dir: open.dir_pending.then(|| self.cat.dir.clone()),
                replies: Vec::new(),
                finish: marked.then_some(open.size),
                also: None,
            })
            .await;
        }
    }

    /// Records a completed chunk's numbers durably, before anything can
    /// upload and evict it. A failure is logged: the next start-up counts
    /// the lines of a local chunk without a record.
    async fn record_numbers(&self, chunk: &ChunkName, numbers: super::numbering::LineRecord) {
        let cat = self.cat.clone();
        let rec = [(chunk.clone(), numbers)];
        let written = tokio::task::spawn_blocking(move || {
            let _serial = cat.state.lock().unwrap();
            cat.record_numbers(&rec)
        })
        .await
        .unwrap_or_else(|e| {
            Err(StorageError::io(
                "line log task failed",
                std::io::Error::other(e),
            ))
        });
        if let Err(e) = written {
            tracing::warn!(category = %self.cat.name, chunk = %chunk, error = %e, "cannot record the line numbers of a completed chunk");
        }
    }

    /// Closes the file of an open chunk that has not been written for
    /// `idle_close_after`, after queueing its flush (the job keeps the file
    /// open until it is done). The next write opens it again.
    async fn close_idle(&mut self) {
        // A mark being written lands first (its task holds the file).
        self.settle_mark().await;
        self.flush_in_background().await;
        if let Some(open) = self.open.as_mut()
            && open.file.take().is_some()
        {
            tracing::debug!(category = %self.cat.name, chunk = %open.name, "idle chunk file closed");
        }
    }

    /// The open chunk's file, opened again if it was closed while idle.
    async fn file(&mut self) -> Result<Arc<File>, StorageError> {
        let open = self.open.as_mut().expect("a chunk is open");
        if let Some(file) = &open.file {
            return Ok(file.clone());
        }
        let path = open.path.clone();
        let file = tokio::task::spawn_blocking(move || OpenOptions::new().write(true).open(path))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            .map_err(|e| StorageError::io(format!("cannot open chunk {} again", open.name), e))?;
        let file = Arc::new(file);
        open.file = Some(file.clone());
        open.last_write = Instant::now();
        Ok(file)
    }

    /// Queues a flush of the open chunk if it was written since the last one.
    async fn flush_in_background(&mut self) {
        if let Some(open) = self.open.as_mut().filter(|o| o.unflushed_bytes > 0)
            && let Some(file) = open.file.clone()
        {
            open.unflushed_bytes = 0;
            let job = Job {
                file,
                dir: std::mem::take(&mut open.dir_pending).then(|| self.cat.dir.clone()),
                replies: Vec::new(),
                finish: None,
                also: None,
            };
            self.queue_sync(job).await;
        }
    }
}

/// What the writer asks the group-commit thread to make durable (see
/// `SyncJob`).
#[derive(Debug)]
struct Job {
    file: Arc<File>,
    dir: Option<std::path::PathBuf>,
    replies: Vec<(Reply, Appended)>,
    finish: Option<u64>,
    /// The producer log, flushed with the chunk.
    also: Option<Arc<File>>,
}

/// Requests to write back to back into one chunk.
#[derive(Debug, Default)]
struct Run {
    reqs: Vec<AppendRequest>,
    bytes: u64,
    /// One of them holds a NUL byte (known only while checking).
    has_nul: bool,
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
