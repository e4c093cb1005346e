//! `chunkbus ship`: follows log files into the bus, like Filebeat or
//! Vector's file source.
//!
//! Files are found from paths, globs (`*`, `?`, `[...]`) and directories
//! (walked recursively); change events (notify) wake the shipper, and a
//! periodic rescan catches what events miss. Whole lines are batched and
//! sent through the client crate's [`Producer`]. A durable registry
//! ([`registry`]) records, per file (device, inode, fingerprint), the offset
//! up to which the server acknowledged the lines: after a crash nothing is
//! lost and only unacknowledged lines are sent again.
//!
//! Rotation: a file renamed away keeps being read through its open handle
//! until its end, and the new file at the path starts at 0 (rename +
//! create); a file that shrinks was truncated in place (copytruncate) and is
//! read again from 0. A file deleted while open is read to its end. A last
//! line without `\n` waits for its end, and is sent as it is after
//! `partial_line_timeout`.

pub mod registry;

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chunkbus_client::{Compression, Delivery, Producer, ProducerConfig};
use notify::Watcher;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use registry::FileEntry;

/// Batches in flight: several, so that reading a large file does not wait
/// on every round trip (batches may then be stored out of order).
const SHIP_IN_FLIGHT: usize = 4;
/// Bytes read from one file per round.
const READ_BYTES: usize = 1 << 20;
/// Shortest time between two registry writes.
const REGISTRY_SAVE_EVERY: Duration = Duration::from_millis(200);

/// What to ship, and where.
#[derive(Debug, Clone)]
pub struct ShipConfig {
    /// Nodes to send to.
    pub servers: Vec<String>,
    /// Token presented to the nodes, when they require one.
    pub token: Option<String>,
    /// A private CA (PEM) to trust for https:// nodes.
    pub ca_pem: Option<Vec<u8>>,
    /// Category.
    pub category: String,
    /// Paths, globs or directories.
    pub patterns: Vec<String>,
    /// Registry file.
    pub registry: PathBuf,
    /// Files found at the first start (without a registry entry) are
    /// shipped from their end instead of their beginning.
    pub from_end: bool,
    /// A last line without newline is sent after this long.
    pub partial_line_timeout: Duration,
    /// Compression of batches.
    pub compression: Compression,
    /// Rescan interval (the fallback when no change event arrives).
    pub poll_interval: Duration,
    /// Where to report how far the shipper is (for a progress bar).
    pub progress: Option<Arc<ShipProgress>>,
}

/// How far a shipper is, updated as it goes.
#[derive(Debug, Default)]
pub struct ShipProgress {
    /// Bytes acknowledged by the nodes since the start.
    pub acked: AtomicU64,
    /// Lines handed to the producer since the start.
    pub lines: AtomicU64,
    /// Bytes of the files found not acknowledged yet, as of the last round.
    pub behind: AtomicU64,
    /// At least one round went through every file found.
    pub measured: AtomicBool,
}

/// Applies an acknowledgement to the file it belongs to (unless the file
/// was truncated since); true when something moved.
fn apply_ack(
    files: &mut BTreeMap<(u64, u64), Tracked>,
    (key, generation, end): Ack,
    progress: Option<&ShipProgress>,
) -> bool {
    let Some(t) = files.get_mut(&key) else {
        return false;
    };
    if t.generation != generation || end <= t.committed {
        return false;
    }
    if let Some(p) = progress {
        p.acked.fetch_add(end - t.committed, Ordering::Relaxed);
    }
    t.committed = end;
    true
}

struct Tracked {
    path: PathBuf,
    file: File,
    dev: u64,
    inode: u64,
    fingerprint: String,
    /// Bumped on truncation, so that late acknowledgements of the old
    /// content are ignored.
    generation: u64,
    /// Bytes handed to the producer.
    sent: u64,
    /// Bytes acknowledged by the server.
    committed: u64,
    /// Bytes after the last newline read, not sent yet.
    partial: Vec<u8>,
    partial_since: Option<Instant>,
    /// The path no longer leads to this file (rotated or deleted).
    gone: bool,
}

/// An acknowledged batch: (file key, generation, end offset).
type Ack = ((u64, u64), u64, u64);

/// Ships until `stop`; then flushes, waits for acknowledgements and saves
/// the registry.
pub async fn run(cfg: ShipConfig, stop: CancellationToken) -> Result<(), String> {
    let producer = Producer::new(ProducerConfig {
        servers: cfg.servers.clone(),
        category: cfg.category.clone(),
        compression: cfg.compression,
        max_in_flight: SHIP_IN_FLIGHT,
        token: cfg.token.clone(),
        ca_pem: cfg.ca_pem.clone(),
        ..ProducerConfig::default()
    })
    .map_err(|e| e.to_string())?;
    let known = registry::load(&cfg.registry)?;
    let wake = Arc::new(Notify::new());
    let rescan = Arc::new(AtomicBool::new(true));
    let _watcher = watch(&cfg.patterns, wake.clone(), rescan.clone());
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<Ack>();
    let (pending_tx, pending_rx) = mpsc::unbounded_channel::<(Ack, Delivery)>();
    let committer = tokio::spawn(commit_in_order(pending_rx, ack_tx));
    let mut files: BTreeMap<(u64, u64), Tracked> = BTreeMap::new();
    let mut first_scan = true;
    let mut dirty = false;
    let mut last_save = Instant::now();
    let mut last_scan = Instant::now();
    loop {
        // Walk the patterns when files appeared, moved or went away, and
        // at the poll interval (events can be missed); otherwise only read.
        if first_scan
            || rescan.swap(false, Ordering::Relaxed)
            || last_scan.elapsed() >= cfg.poll_interval
        {
            discover(&cfg, &known, &mut files, first_scan);
            first_scan = false;
            last_scan = Instant::now();
        }
        for (key, t) in files.iter_mut() {
            ship_file(&cfg, &producer, &pending_tx, *key, t).await?;
        }
        while let Ok(ack) = ack_rx.try_recv() {
            dirty |= apply_ack(&mut files, ack, cfg.progress.as_deref());
        }
        if let Some(p) = &cfg.progress {
            let behind: u64 = files
                .values()
                .map(|t| {
                    let size = t.file.metadata().map_or(t.committed, |m| m.len());
                    size.saturating_sub(t.committed)
                })
                .sum();
            p.behind.store(behind, Ordering::Relaxed);
            p.measured.store(true, Ordering::Relaxed);
        }
        // Forget files that are gone and fully acknowledged.
        files
            .retain(|_, t| !(t.gone && t.partial.is_empty() && t.committed >= t.sent && at_end(t)));
        if dirty && last_save.elapsed() >= REGISTRY_SAVE_EVERY {
            save(&cfg.registry, &files)?;
            dirty = false;
            last_save = Instant::now();
        }
        // Let the producer and the committer run between rounds.
        tokio::task::yield_now().await;
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(cfg.poll_interval) => {}
            Some(ack) = ack_rx.recv() => {
                dirty |= apply_ack(&mut files, ack, cfg.progress.as_deref());
            }
        }
    }
    // Shutdown: send what is read, wait for every acknowledgement, save.
    producer.close().await.map_err(|e| e.to_string())?;
    drop(pending_tx);
    let _ = committer.await;
    while let Ok(ack) = ack_rx.try_recv() {
        apply_ack(&mut files, ack, cfg.progress.as_deref());
    }
    save(&cfg.registry, &files)
}

fn at_end(t: &Tracked) -> bool {
    t.file.metadata().map(|m| m.len() <= t.sent).unwrap_or(true)
}

fn save(path: &Path, files: &BTreeMap<(u64, u64), Tracked>) -> Result<(), String> {
    let entries: Vec<FileEntry> = files
        .values()
        .filter(|t| !t.gone)
        .map(|t| FileEntry {
            path: t.path.clone(),
            dev: t.dev,
            inode: t.inode,
            fingerprint: t.fingerprint.clone(),
            offset: t.committed,
        })
        .collect();
    registry::save(path, &entries)
}

/// Awaits deliveries in the order they were sent and reports each.
async fn commit_in_order(
    mut rx: mpsc::UnboundedReceiver<(Ack, Delivery)>,
    acks: mpsc::UnboundedSender<Ack>,
) {
    let mut queue = VecDeque::new();
    while let Some(item) = rx.recv().await {
        queue.push_back(item);
        while let Some((ack, delivery)) = queue.pop_front() {
            match delivery.wait().await {
                Ok(_) => {}
                Err(e) => {
                    // Not retryable (e.g. a line above the server's limit):
                    // retrying would never succeed, so the lines are skipped.
                    tracing::error!(error = %e, "batch refused by the server; its lines are skipped");
                }
            }
            let _ = acks.send(ack);
            while let Ok(more) = rx.try_recv() {
                queue.push_back(more);
            }
        }
    }
}

/// Every file the patterns match now.
fn matching_files(patterns: &[String]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for p in patterns {
        let path = Path::new(p);
        if path.is_dir() {
            out.extend(
                walkdir::WalkDir::new(path)
                    .into_iter()
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_file())
                    .map(|e| e.into_path()),
            );
        } else if let Ok(paths) = glob::glob(p) {
            out.extend(paths.filter_map(Result::ok).filter(|p| p.is_file()));
        }
    }
    out.sort();
    out.dedup();
    out
}

fn fingerprint(file: &File) -> String {
    let mut buf = [0u8; registry::FINGERPRINT_BYTES];
    let n = file.read_at(&mut buf, 0).unwrap_or(0);
    registry::hex(&buf[..n])
}

/// Starts tracking new files and notices rotated or deleted ones.
fn discover(
    cfg: &ShipConfig,
    known: &[FileEntry],
    files: &mut BTreeMap<(u64, u64), Tracked>,
    first_scan: bool,
) {
    let mut present = std::collections::BTreeSet::new();
    for path in matching_files(&cfg.patterns) {
        // The registry (and its temp file) may live among the shipped files.
        if path == cfg.registry || path == cfg.registry.with_extension("tmp") {
            continue;
        }
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        let key = (meta.dev(), meta.ino());
        present.insert(key);
        if let Some(t) = files.get_mut(&key) {
            t.path = path;
            t.gone = false;
            continue;
        }
        let Ok(file) = File::open(&path) else {
            continue;
        };
        let fp = fingerprint(&file);
        let size = meta.len();
        let start = match known.iter().find(|e| {
            e.dev == key.0 && e.inode == key.1 && registry::same_start(&e.fingerprint, &fp)
        }) {
            Some(e) if e.offset <= size => e.offset,
            Some(_) => 0,
            None if first_scan && cfg.from_end => size,
            None => 0,
        };
        tracing::info!(path = %path.display(), offset = start, "shipping file");
        files.insert(
            key,
            Tracked {
                path,
                file,
                dev: key.0,
                inode: key.1,
                fingerprint: fp,
                generation: 0,
                sent: start,
                committed: start,
                partial: Vec::new(),
                partial_since: None,
                gone: false,
            },
        );
    }
    for (key, t) in files.iter_mut() {
        if !present.contains(key) && !t.gone {
            tracing::info!(path = %t.path.display(), "file rotated or deleted; reading it to its end");
            t.gone = true;
        }
    }
}

/// Reads what is new in `t` and hands whole lines to the producer.
async fn ship_file(
    cfg: &ShipConfig,
    producer: &Producer,
    pending: &mpsc::UnboundedSender<(Ack, Delivery)>,
    key: (u64, u64),
    t: &mut Tracked,
) -> Result<(), String> {
    loop {
        let size = t.file.metadata().map(|m| m.len()).unwrap_or(0);
        let read_pos = t.sent + t.partial.len() as u64;
        if size < read_pos {
            tracing::warn!(path = %t.path.display(), size, offset = read_pos, "file truncated (copytruncate); reading it again from the start");
            t.generation += 1;
            t.sent = 0;
            t.committed = 0;
            t.partial.clear();
            t.partial_since = None;
            t.fingerprint = fingerprint(&t.file);
            continue;
        }
        if t.fingerprint.len() < 2 * registry::FINGERPRINT_BYTES {
            t.fingerprint = fingerprint(&t.file);
        }
        if size == read_pos {
            break;
        }
        let want = ((size - read_pos) as usize).min(READ_BYTES);
        let mut buf = vec![0u8; want];
        let n = t
            .file
            .read_at(&mut buf, read_pos)
            .map_err(|e| format!("cannot read {}: {e}", t.path.display()))?;
        if n == 0 {
            break;
        }
        buf.truncate(n);
        t.partial.extend_from_slice(&buf);
        if let Some(last) = memchr::memrchr(b'\n', &t.partial) {
            let rest = t.partial.split_off(last + 1);
            let whole = std::mem::replace(&mut t.partial, rest);
            send(cfg, producer, pending, key, t, whole).await?;
        }
        if !t.partial.is_empty() {
            t.partial_since.get_or_insert_with(Instant::now);
        }
        if n < want {
            break;
        }
    }
    if t.partial_since
        .is_some_and(|s| s.elapsed() >= cfg.partial_line_timeout)
        && !t.partial.is_empty()
    {
        let line = std::mem::take(&mut t.partial);
        send(cfg, producer, pending, key, t, line).await?;
    }
    Ok(())
}

async fn send(
    cfg: &ShipConfig,
    producer: &Producer,
    pending: &mpsc::UnboundedSender<(Ack, Delivery)>,
    key: (u64, u64),
    t: &mut Tracked,
    data: Vec<u8>,
) -> Result<(), String> {
    if let Some(p) = &cfg.progress {
        let lines = memchr::memchr_iter(b'\n', &data).count() as u64;
        p.lines.fetch_add(lines, Ordering::Relaxed);
    }
    t.sent += data.len() as u64;
    t.partial_since = None;
    let delivery = producer
        .send(Bytes::from(data))
        .await
        .map_err(|e| e.to_string())?;
    let _ = pending.send(((key, t.generation, t.sent), delivery));
    Ok(())
}

/// Watches the directories the patterns live in. Writes wake the shipper;
/// creations, renames and removals also make it walk the patterns again.
/// Reads (its own included) are ignored.
fn watch(
    patterns: &[String],
    wake: Arc<Notify>,
    rescan: Arc<AtomicBool>,
) -> Option<notify::RecommendedWatcher> {
    use notify::EventKind;
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(ev) = res else {
            rescan.store(true, Ordering::Relaxed);
            wake.notify_one();
            return;
        };
        match ev.kind {
            EventKind::Access(_) => return,
            EventKind::Modify(notify::event::ModifyKind::Data(_)) => {}
            _ => rescan.store(true, Ordering::Relaxed),
        }
        wake.notify_one();
    })
    .map_err(
        |e| tracing::warn!(error = %e, "file change events unavailable; rescanning periodically"),
    )
    .ok()?;
    for p in patterns {
        let path = Path::new(p);
        let (dir, mode) = if path.is_dir() {
            (path.to_path_buf(), notify::RecursiveMode::Recursive)
        } else {
            // The longest leading part without glob characters.
            let fixed: PathBuf = path
                .components()
                .take_while(|c| !c.as_os_str().to_string_lossy().contains(['*', '?', '[']))
                .collect();
            let dir = if fixed == path {
                fixed.parent().map(Path::to_path_buf).unwrap_or_default()
            } else {
                fixed
            };
            (dir, notify::RecursiveMode::Recursive)
        };
        if let Err(e) = watcher.watch(&dir, mode) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch; rescanning periodically");
        }
    }
    Some(watcher)
}
