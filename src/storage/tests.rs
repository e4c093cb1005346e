//! Unit and property tests of the chunk store.

use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;

use super::*;

fn opts(dir: &Path, max_chunk_bytes: u64) -> StorageOptions {
    StorageOptions {
        data_dir: dir.to_owned(),
        node: "n1".into(),
        max_chunk_bytes,
        rotate_after: Duration::from_secs(3600),
        sync: SyncPolicy::Always,
        disk_high_water_percent: 100,
        tiered: false,
        zero_runway: true,
        drop_behind: None,
        max_categories: 10_000,
        idle_close_after: IDLE_CLOSE_AFTER,
    }
}

async fn read_all(s: &Storage, cat: &str, chunk: &ChunkName) -> Vec<u8> {
    s.read(
        cat,
        chunk,
        0,
        u64::MAX >> 1,
        Duration::ZERO,
        &CancellationToken::new(),
    )
    .await
    .unwrap()
    .data
    .to_vec()
}

fn lines(text: &str) -> (Bytes, u64) {
    (
        Bytes::from(text.to_owned()),
        text.matches('\n').count() as u64,
    )
}

#[tokio::test]
async fn appends_are_contiguous_and_rotate_by_size() {
    let dir = tempfile::tempdir().unwrap();
    let s = Storage::open(opts(dir.path(), 10), Metrics::new())
        .await
        .unwrap();
    let (d, n) = lines("aaaa\n");
    let a = s.append("app", d, n, true).await.unwrap();
    assert_eq!(
        (a.chunk.to_string().as_str(), a.offset, a.next_offset),
        ("n1-chunk000000000", 0, 5)
    );
    let (d, n) = lines("bbbb\n");
    let b = s.append("app", d, n, false).await.unwrap();
    assert_eq!((b.offset, b.next_offset), (5, 10));
    // Would pass 10 bytes: goes to a new chunk.
    let (d, n) = lines("c\n");
    let c = s.append("app", d, n, true).await.unwrap();
    assert_eq!((c.chunk.index, c.offset), (1, 0));
    // Bigger than a chunk on its own: a fresh chunk holds it whole.
    let (d, n) = lines("0123456789abcdef\nx\n");
    let big = s.append("app", d, n, true).await.unwrap();
    assert_eq!((big.chunk.index, big.offset, big.lines), (2, 0, 2));
    let list = s.chunks("app").unwrap();
    let states: Vec<_> = list
        .iter()
        .map(|c| (c.name.index, c.meta.size, c.meta.complete))
        .collect();
    assert_eq!(states, [(0, 10, true), (1, 2, true), (2, 19, false)]);
    assert_eq!(read_all(&s, "app", &a.chunk).await, b"aaaa\nbbbb\n");
    s.shutdown().await;
}

#[tokio::test]
async fn age_rotation_completes_and_wakes_readers() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path(), 1 << 20);
    o.rotate_after = Duration::from_millis(100);
    let s = Storage::open(o, Metrics::new()).await.unwrap();
    let (d, n) = lines("x\n");
    let a = s.append("app", d, n, false).await.unwrap();
    // A long-poll at the end returns when the timer completes the chunk.
    let r = s
        .read(
            "app",
            &a.chunk,
            2,
            100,
            Duration::from_secs(30),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    assert!(r.meta.complete);
    assert!(r.data.is_empty());
    // The timer created no new, empty chunk.
    assert_eq!(s.chunks("app").unwrap().len(), 1);
    s.shutdown().await;
}

#[tokio::test]
async fn long_poll_wakes_on_append() {
    let dir = tempfile::tempdir().unwrap();
    let s = Storage::open(opts(dir.path(), 1 << 20), Metrics::new())
        .await
        .unwrap();
    let (d, n) = lines("first\n");
    let a = s.append("app", d, n, false).await.unwrap();
    let reader = {
        let s = s.clone();
        let chunk = a.chunk.clone();
        tokio::spawn(async move {
            s.read(
                "app",
                &chunk,
                6,
                100,
                Duration::from_secs(30),
                &CancellationToken::new(),
            )
            .await
            .unwrap()
        })
    };
    // The reader is parked; this append wakes it.
    let (d, n) = lines("second\n");
    s.append("app", d, n, false).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&r.data[..], b"second\n");
    assert_eq!(r.next_offset, 13);
    s.shutdown().await;
}

#[tokio::test]
async fn restart_completes_the_open_chunk_and_cuts_torn_tails() {
    let dir = tempfile::tempdir().unwrap();
    let s = Storage::open(opts(dir.path(), 1 << 20), Metrics::new())
        .await
        .unwrap();
    let (d, n) = lines("one\ntwo\n");
    let a = s.append("app", d, n, true).await.unwrap();
    s.shutdown().await;
    drop(s);
    // A crash in the middle of a write.
    let path = dir.path().join("app").join(a.chunk.to_string());
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    std::io::Write::write_all(&mut f, b"thr").unwrap();
    let s = Storage::open(opts(dir.path(), 1 << 20), Metrics::new())
        .await
        .unwrap();
    let list = s.chunks("app").unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!((list[0].meta.size, list[0].meta.complete), (8, true));
    let (d, n) = lines("four\n");
    let b = s.append("app", d, n, true).await.unwrap();
    assert_eq!((b.chunk.index, b.offset), (1, 0));
    assert_eq!(std::fs::read(&path).unwrap(), b"one\ntwo\n");
    s.shutdown().await;
}

/// True while this process holds `path` open.
fn held_open(path: &Path) -> bool {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .any(|target| target == path)
}

/// An open chunk left idle has its file closed (flushed first); the next
/// write opens it again and continues it, and a chunk with a zero runway
/// still loses its zeros when it completes while closed.
#[tokio::test]
async fn idle_open_chunks_hold_no_file_and_continue_when_written_again() {
    let dir = tempfile::tempdir().unwrap();
    let dir_path = dir.path().canonicalize().unwrap();
    let s = Storage::open(
        StorageOptions {
            idle_close_after: Duration::from_millis(50),
            ..opts(&dir_path, 1 << 20)
        },
        Metrics::new(),
    )
    .await
    .unwrap();
    let mut want = Vec::new();
    let mut first = None;
    // Enough small synced groups for a zero runway where the file system has it.
    for i in 0..20 {
        let text = format!("line {i}\n");
        want.extend_from_slice(text.as_bytes());
        let (d, n) = lines(&text);
        first.get_or_insert(s.append("app", d, n, true).await.unwrap());
    }
    let chunk = first.unwrap().chunk;
    let path = dir_path.join("app").join(chunk.to_string());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while held_open(&path) {
        assert!(
            std::time::Instant::now() < deadline,
            "the idle chunk stays open"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (d, n) = lines("after the pause\n");
    let after = s.append("app", d, n, true).await.unwrap();
    assert_eq!((&after.chunk, after.offset), (&chunk, want.len() as u64));
    want.extend_from_slice(b"after the pause\n");
    assert_eq!(read_all(&s, "app", &chunk).await, want);
    // Idle again, then completed: the zeros go all the same.
    while held_open(&path) {
        assert!(
            std::time::Instant::now() < deadline,
            "the idle chunk stays open"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    s.rotate("app").await.unwrap();
    s.shutdown().await;
    assert_eq!(std::fs::read(&path).unwrap(), want);
    let file = std::fs::File::open(&path).unwrap();
    assert_eq!(runway::marked_from(&file).unwrap(), None);
}

#[tokio::test]
async fn zero_runways_are_written_ahead_and_cut_at_completion() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Metrics::new();
    let s = Storage::open(opts(dir.path(), 1 << 20), metrics.clone())
        .await
        .unwrap();
    let runway = runway::supported(dir.path());
    let mut want = Vec::new();
    let mut chunk = None;
    for i in 0..40 {
        let text = format!("line {i}\n");
        want.extend_from_slice(text.as_bytes());
        let (d, n) = lines(&text);
        chunk = Some(s.append("app", d, n, true).await.unwrap().chunk);
    }
    let chunk = chunk.unwrap();
    let path = dir.path().join("app").join(chunk.to_string());
    let file = std::fs::File::open(&path).unwrap();
    let on_disk = file.metadata().unwrap().len();
    let zeros = metrics.category("app").runway_bytes.get();
    if runway {
        // Marked from the end of the eighth group, zeros ahead of the data.
        assert!(runway::marked_from(&file).unwrap().is_some_and(|f| f > 0));
        assert!(zeros >= runway::LOW && on_disk > want.len() as u64);
        assert!(
            std::fs::read(&path).unwrap()[want.len()..]
                .iter()
                .all(|&b| b == 0)
        );
    } else {
        assert_eq!((zeros, on_disk), (0, want.len() as u64));
    }
    assert_eq!(read_all(&s, "app", &chunk).await, want);
    // A NUL byte completes the chunk first; its chunk never gets zeros.
    let (d, n) = lines("a\0b\n");
    let nul = s.append("app", d, n, true).await.unwrap();
    assert_eq!(nul.chunk.index, chunk.index + u32::from(runway));
    // The completion's job ran before the last append's sync (one queue).
    assert_eq!(std::fs::read(&path).unwrap()[..want.len()], want[..]);
    if runway {
        assert_eq!(std::fs::read(&path).unwrap(), want);
        assert_eq!(runway::marked_from(&file).unwrap(), None);
    }
    for i in 0..40 {
        let (d, n) = lines(&format!("more {i}\0\n"));
        let a = s.append("app", d, n, true).await.unwrap();
        assert_eq!(a.chunk, nul.chunk);
    }
    let last = dir.path().join("app").join(nul.chunk.to_string());
    let file = std::fs::File::open(&last).unwrap();
    assert_eq!(runway::marked_from(&file).unwrap(), None);
    assert_eq!(metrics.category("app").runway_bytes.get(), zeros);
    s.shutdown().await;
}

#[tokio::test]
async fn second_storage_on_a_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = Storage::open(opts(dir.path(), 1 << 20), Metrics::new())
        .await
        .unwrap();
    let err = Storage::open(opts(dir.path(), 1 << 20), Metrics::new())
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Locked { .. }), "{err}");
    s.shutdown().await;
}

#[tokio::test]
async fn bad_names_never_reach_the_file_system() {
    let dir = tempfile::tempdir().unwrap();
    let s = Storage::open(opts(dir.path(), 1 << 20), Metrics::new())
        .await
        .unwrap();
    for bad in ["..", "../x", "/etc", "a/b", "a\0b", ""] {
        let (d, n) = lines("x\n");
        let err = s.append(bad, d, n, false).await.unwrap_err();
        assert!(matches!(err, StorageError::Name(_)), "{bad:?}: {err}");
    }
    let entries: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, [std::ffi::OsString::from(lock::LOCK_FILE)]);
    s.shutdown().await;
}

/// One step of the property test.
#[derive(Debug, Clone)]
enum Op {
    /// Append these lines (each without its newline) to a category.
    Append {
        cat: usize,
        lines: Vec<String>,
        sync: bool,
    },
    /// Complete the open chunk of a category.
    Rotate { cat: usize },
    /// Stop the store and open it again; `lose_line_log`: after deleting
    /// the line logs (the numbers are counted again from the chunks).
    Restart { lose_line_log: bool },
}

const CATS: [&str; 2] = ["a", "b.c"];
const MODEL_MAX_CHUNK_BYTES: u64 = 48;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..CATS.len(), prop::collection::vec("[a-z0-9 ]{0,20}", 1..4), any::<bool>())
            .prop_map(|(cat, lines, sync)| Op::Append { cat, lines, sync }),
        1 => (0..CATS.len()).prop_map(|cat| Op::Rotate { cat }),
        1 => any::<bool>().prop_map(|lose_line_log| Op::Restart { lose_line_log }),
    ]
}

/// Mostly synced appends into larger chunks, some lines holding NUL bytes:
/// chunks get zero runways, and NUL bytes start new chunks.
fn runway_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        20 => (0..CATS.len(), prop::collection::vec("[a-z\0]{0,60}", 1..4), prop::bool::weighted(0.9))
            .prop_map(|(cat, lines, sync)| Op::Append { cat, lines, sync }),
        1 => (0..CATS.len()).prop_map(|cat| Op::Rotate { cat }),
        1 => Just(Op::Restart { lose_line_log: false }),
    ]
}

/// The model: per category, the chunks in order (content, complete).
#[derive(Debug, Clone)]
struct Model {
    chunks: Vec<(Vec<u8>, bool)>,
    max_chunk_bytes: u64,
    /// Zero runways are on: the writer checks for NUL bytes once the open
    /// chunk took `RUNWAY_AFTER_GROUPS` synced groups.
    runway: bool,
    /// Synced groups of the open chunk (one per synced append here, as
    /// each append is awaited before the next).
    groups: u64,
    /// The open chunk was started for a request holding a NUL byte.
    never: bool,
}

impl Model {
    fn new(max_chunk_bytes: u64, runway: bool) -> Self {
        Self {
            chunks: Vec::new(),
            max_chunk_bytes,
            runway,
            groups: 0,
            never: false,
        }
    }

    fn open(&mut self) -> Option<&mut (Vec<u8>, bool)> {
        self.chunks.last_mut().filter(|c| !c.1)
    }

    fn append(&mut self, data: &[u8], sync: bool) -> (u32, u64) {
        let checking = self.runway && !self.never && self.groups >= writer::RUNWAY_AFTER_GROUPS;
        let nul = checking && self.open().is_some() && data.contains(&0);
        let max = self.max_chunk_bytes;
        if let Some(open) = self.open()
            && (nul || (!open.0.is_empty() && (open.0.len() + data.len()) as u64 > max))
        {
            open.1 = true;
        }
        if self.open().is_none() {
            self.chunks.push((Vec::new(), false));
            self.groups = 0;
            self.never = nul;
        }
        if sync {
            self.groups += 1;
        }
        let index = self.chunks.len() as u32 - 1;
        let open = self.open().unwrap();
        let offset = open.0.len() as u64;
        open.0.extend_from_slice(data);
        (index, offset)
    }

    fn complete_all(&mut self) {
        for c in &mut self.chunks {
            c.1 = true;
        }
    }

    fn complete_open(&mut self) {
        if let Some(open) = self.open() {
            open.1 = true;
        }
    }
}

/// After a shutdown every chunk file holds exactly its chunk's bytes (no
/// zeros, no mark).
fn check_files(dir: &Path, models: &[Model]) {
    for (cat, model) in CATS.iter().zip(models) {
        for (i, (content, _)) in model.chunks.iter().enumerate() {
            let path = dir
                .join(cat)
                .join(ChunkName::new("n1", i as u32).to_string());
            let file = std::fs::File::open(&path).unwrap();
            assert_eq!(
                runway::marked_from(&file).unwrap(),
                None,
                "{}",
                path.display()
            );
            assert_eq!(
                std::fs::read(&path).unwrap(),
                *content,
                "{}",
                path.display()
            );
        }
    }
}

async fn check(s: &Storage, models: &[Model]) {
    for (cat, model) in CATS.iter().zip(models) {
        let got = match s.chunks(cat) {
            Ok(list) => list,
            Err(StorageError::UnknownCategory(_)) => Vec::new(),
            Err(e) => panic!("{e}"),
        };
        assert_eq!(got.len(), model.chunks.len(), "category {cat}");
        // Lines are numbered 0, 1, 2, ... across the chunks.
        let mut next_line = 0;
        for (i, (status, (content, complete))) in got.iter().zip(&model.chunks).enumerate() {
            assert_eq!(status.name, ChunkName::new("n1", i as u32));
            assert_eq!(status.meta.size, content.len() as u64);
            assert_eq!(status.meta.complete, *complete, "chunk {i} of {cat}");
            assert_eq!(read_all(s, cat, &status.name).await, *content);
            let lines = content.iter().filter(|&&b| b == b'\n').count() as u64;
            assert_eq!(
                (status.meta.first_line, status.meta.lines),
                (Some(next_line), Some(lines)),
                "numbers of chunk {i} of {cat}"
            );
            next_line += lines;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn chunk_log_matches_model(ops in prop::collection::vec(op(), 1..40)) {
        run_model(ops, MODEL_MAX_CHUNK_BYTES);
    }

    #[test]
    fn chunk_log_with_zero_runways_matches_model(ops in prop::collection::vec(runway_op(), 1..120)) {
        run_model(ops, 2048);
    }
}

fn run_model(ops: Vec<Op>, max_chunk_bytes: u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let o = opts(dir.path(), max_chunk_bytes);
        let mut s = Storage::open(o.clone(), Metrics::new()).await.unwrap();
        let runway = runway::supported(dir.path());
        let mut models = vec![Model::new(max_chunk_bytes, runway); CATS.len()];
        for op in ops {
            match op {
                Op::Append { cat, lines, sync } => {
                    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
                    let (index, offset) = models[cat].append(text.as_bytes(), sync);
                    let got = s
                        .append(
                            CATS[cat],
                            Bytes::from(text.clone()),
                            lines.len() as u64,
                            sync,
                        )
                        .await
                        .unwrap();
                    assert_eq!(got.chunk, ChunkName::new("n1", index));
                    assert_eq!(got.offset, offset);
                    assert_eq!(got.next_offset, offset + text.len() as u64);
                }
                Op::Rotate { cat } => {
                    models[cat].complete_open();
                    match s.rotate(CATS[cat]).await {
                        Ok(()) | Err(StorageError::UnknownCategory(_)) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
                Op::Restart { lose_line_log } => {
                    s.shutdown().await;
                    drop(s);
                    if lose_line_log {
                        for cat in CATS {
                            let _ = std::fs::remove_file(
                                dir.path().join(cat).join(numbering::LINES_LOG),
                            );
                        }
                    }
                    for m in &mut models {
                        m.complete_all();
                    }
                    // A clean shutdown leaves no zeros to cut.
                    check_files(dir.path(), &models);
                    s = Storage::open(o.clone(), Metrics::new()).await.unwrap();
                    check_files(dir.path(), &models);
                }
            }
            check(&s, &models).await;
        }
        s.shutdown().await;
    });
}

/// An object store kept in memory, keyed `category/chunk`.
#[derive(Debug, Default)]
struct MemRemote(std::sync::Mutex<BTreeMap<String, Vec<u8>>>);

impl RemoteChunks for MemRemote {
    fn read_exact_at(
        &self,
        category: &str,
        chunk: &ChunkName,
        buf: &mut [u8],
        offset: u64,
    ) -> std::io::Result<()> {
        let objects = self.0.lock().unwrap();
        let data = objects
            .get(&format!("{category}/{chunk}"))
            .ok_or(std::io::ErrorKind::NotFound)?;
        let part = data
            .get(offset as usize..offset as usize + buf.len())
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(part);
        Ok(())
    }
}

/// A restore given up (no copy left) leaves no partial file, and the chunk
/// stays unknown here.
#[tokio::test]
async fn a_restore_given_up_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = Storage::open(opts(dir.path(), 64), Metrics::new())
        .await
        .unwrap();
    let chunk = ChunkName::new("n1", 0);
    s.reserve_own_index("app", 1).await.unwrap();
    s.restore_append("app", &chunk, 0, Bytes::from_static(b"a\n"))
        .await
        .unwrap();
    let partial = s.restore_path("app", &chunk);
    assert!(partial.exists());
    s.restore_abandon("app", &chunk).await;
    assert!(!partial.exists());
    assert!(s.chunk_meta("app", &chunk).is_none());
    // Given up twice (nothing written the second time): no error.
    s.restore_abandon("app", &chunk).await;
    s.shutdown().await;
}

/// Tiered storage on `dir` reading evicted chunks from an in-memory store;
/// also its options (to open it again) and the store.
async fn open_with_remote(dir: &Path) -> (StorageOptions, Arc<MemRemote>, Storage) {
    let tiered = StorageOptions {
        tiered: true,
        ..opts(dir, 64)
    };
    let remote = Arc::new(MemRemote::default());
    let s = Storage::open(tiered.clone(), Metrics::new()).await.unwrap();
    s.set_remote(remote.clone());
    (tiered, remote, s)
}

/// This node's own chunk restored from a peer's copy that fell short of
/// what the node had uploaded before it lost its disk gives way to the
/// object once its bytes are found to be the object's first ones (and the
/// numbers of its further lines are free: see the next test); one of
/// other bytes under the name is kept, not recorded as uploaded, and said
/// to conflict; an object recorded while a restore was under way is not
/// overwritten by it.
#[tokio::test]
async fn an_own_chunk_restored_short_gives_way_to_the_object_it_begins() {
    let dir = tempfile::tempdir().unwrap();
    let (tiered, remote, s) = open_with_remote(dir.path()).await;
    let [short, other, raced] = [0, 1, 2].map(|i| ChunkName::new("n1", i));
    s.reserve_own_index("app", 3).await.unwrap();
    // The copy of the next chunk knows its first number: after the whole
    // of the short one's lines.
    for (c, bytes, first) in [(&short, "a\n", None), (&other, "x\n", Some(2))] {
        s.restore_append("app", c, 0, Bytes::from_static(bytes.as_bytes()))
            .await
            .unwrap();
        s.restore_finish("app", c, 2, first).await.unwrap();
    }
    for (c, bytes) in [(&short, "a\nb\n"), (&other, "y\nz\n"), (&raced, "c\nd\n")] {
        let key = format!("app/{c}");
        remote.0.lock().unwrap().insert(key, bytes.into());
    }
    let numbers = numbering::LineRecord {
        size: 4,
        first: 0,
        lines: 2,
    };
    assert_eq!(
        s.add_remote("app", &short, 4, 0, Some(numbers))
            .await
            .unwrap(),
        TierOutcome::Done
    );
    let m = s.chunk_meta("app", &short).unwrap();
    assert!(m.complete && m.uploaded && !m.local && m.size == 4, "{m:?}");
    assert_eq!(m.line_record(), Some(numbers));
    assert_eq!(read_all(&s, "app", &short).await, b"a\nb\n");
    assert_eq!(
        s.add_remote("app", &other, 4, 0, None).await.unwrap(),
        TierOutcome::Conflicting { unique_from: 0 }
    );
    let m = s.chunk_meta("app", &other).unwrap();
    assert!(m.complete && !m.uploaded && m.local && m.size == 2, "{m:?}");
    // Found in S3 while its restore was under way.
    s.restore_append("app", &raced, 0, Bytes::from_static(b"c\n"))
        .await
        .unwrap();
    s.add_remote("app", &raced, 4, 0, None).await.unwrap();
    assert!(matches!(
        s.restore_finish("app", &raced, 2, None).await,
        Err(StorageError::NotRestorable { .. })
    ));
    let m = s.chunk_meta("app", &raced).unwrap();
    assert!(m.complete && m.uploaded && !m.local && m.size == 4, "{m:?}");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("app"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(".restore."))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    s.shutdown().await;
    drop(s);
    // As recorded; no name used again.
    let s = Storage::open(tiered, Metrics::new()).await.unwrap();
    s.set_remote(remote);
    let m = s.chunk_meta("app", &short).unwrap();
    assert!(m.uploaded && !m.local && m.size == 4, "{m:?}");
    let m = s.chunk_meta("app", &other).unwrap();
    assert!(!m.uploaded && m.local && m.size == 2, "{m:?}");
    let (d, n) = lines("new\n");
    let next = s.append("app", d, n, true).await.unwrap().chunk;
    assert_eq!(next, ChunkName::new("n1", 3));
    s.shutdown().await;
}

/// Every line of `category` held here, in chunk order.
async fn category_lines(s: &Storage, category: &str) -> Vec<String> {
    let mut out = Vec::new();
    for c in s.chunks(category).unwrap() {
        let bytes = read_all(s, category, &c.name).await;
        out.extend(String::from_utf8(bytes).unwrap().lines().map(str::to_owned));
    }
    out
}

/// An object that starts with this node's chunk restored short, and
/// numbers its further lines on from the chunk's: taken, and those numbers
/// reserved, while this node numbered no line after the chunk; once it did
/// (S3 applied the upload of its previous process late), the chunk is kept
/// and the object conflicts, as does one of other bytes at the chunk's
/// size; one not held here is then not recorded. The lines only such an
/// object holds are stored again once, also when asked again after a
/// restart.
#[tokio::test]
async fn a_longer_object_is_taken_only_while_the_numbers_of_its_lines_are_free() {
    let dir = tempfile::tempdir().unwrap();
    let (tiered, remote, s) = open_with_remote(dir.path()).await;
    let chunk = ChunkName::new("n1", 0);
    let whole = numbering::LineRecord {
        size: 4,
        first: 0,
        lines: 2,
    };
    for category in ["free", "taken"] {
        s.reserve_own_index(category, 1).await.unwrap();
        s.restore_append(category, &chunk, 0, Bytes::from_static(b"a\n"))
            .await
            .unwrap();
        s.restore_finish(category, &chunk, 2, Some(0))
            .await
            .unwrap();
        remote
            .0
            .lock()
            .unwrap()
            .insert(format!("{category}/{chunk}"), b"a\nb\n".to_vec());
    }
    assert_eq!(
        s.add_remote("free", &chunk, 4, 0, Some(whole))
            .await
            .unwrap(),
        TierOutcome::Done
    );
    let (d, n) = lines("c\n");
    let next = s.append("free", d, n, true).await.unwrap().chunk;
    assert_eq!(s.chunk_meta("free", &next).unwrap().first_line, Some(2));
    // A line numbered after the restored chunk: the object's further lines
    // cannot have their numbers, nor can an object's whose are not known.
    let (d, n) = lines("new\n");
    let next = s.append("taken", d, n, true).await.unwrap().chunk;
    assert_eq!(s.chunk_meta("taken", &next).unwrap().first_line, Some(1));
    for numbers in [Some(whole), None] {
        assert_eq!(
            s.add_remote("taken", &chunk, 4, 0, numbers).await.unwrap(),
            TierOutcome::Conflicting { unique_from: 2 }
        );
    }
    let m = s.chunk_meta("taken", &chunk).unwrap();
    assert!(m.complete && m.local && !m.uploaded && m.size == 2, "{m:?}");
    assert_eq!(m.line_record().map(|r| r.end()), Some(1));
    remote
        .0
        .lock()
        .unwrap()
        .insert(format!("taken/{chunk}"), b"z\n".to_vec());
    assert_eq!(
        s.add_remote("taken", &chunk, 2, 0, None).await.unwrap(),
        TierOutcome::Conflicting { unique_from: 0 }
    );
    // Not held here (its restore to come): its numbers are reserved while
    // free, else it is not recorded.
    s.reserve_own_index("unheld", 1).await.unwrap();
    s.reserve_own_line("unheld", 1).await.unwrap();
    let (d, n) = lines("new\n");
    let next = s.append("unheld", d, n, true).await.unwrap().chunk;
    assert_eq!(s.chunk_meta("unheld", &next).unwrap().first_line, Some(1));
    assert_eq!(
        s.add_remote("unheld", &chunk, 4, 0, Some(whole))
            .await
            .unwrap(),
        TierOutcome::NotEligible
    );
    assert_eq!(s.chunk_meta("unheld", &chunk), None);
    let one = numbering::LineRecord {
        size: 2,
        first: 0,
        lines: 1,
    };
    assert_eq!(
        s.add_remote("unheld", &chunk, 2, 0, Some(one))
            .await
            .unwrap(),
        TierOutcome::Done
    );
    for stored in [true, false] {
        assert_eq!(
            s.rescue_lines("taken", &chunk, 0, Bytes::from_static(b"b\n"), 1)
                .await
                .unwrap(),
            stored
        );
    }
    assert_eq!(category_lines(&s, "taken").await, ["a", "new", "b"]);
    s.shutdown().await;
    drop(s);
    let s = Storage::open(tiered, Metrics::new()).await.unwrap();
    assert!(
        !s.rescue_lines("taken", &chunk, 0, Bytes::from_static(b"b\n"), 1)
            .await
            .unwrap()
    );
    assert_eq!(category_lines(&s, "taken").await, ["a", "new", "b"]);
    s.shutdown().await;
}

/// One of this node's chunks restored only as a record of its peers'
/// shorter object (S3 could not be asked), then a line numbered after it:
/// the longer object found later is not taken (the numbers of its further
/// lines are given). The chunk is fetched from the object's beginning,
/// held here and no longer recorded as uploaded, so that the uploader
/// settles it, also after a restart. A chunk held here and recorded as
/// uploaded (a crash between the fetch and the record's removal) is
/// unrecorded the same way.
#[tokio::test]
async fn an_own_record_whose_object_grew_into_later_numbers_is_fetched_and_unrecorded() {
    let dir = tempfile::tempdir().unwrap();
    let (tiered, remote, s) = open_with_remote(dir.path()).await;
    let chunk = ChunkName::new("n1", 0);
    let key = format!("app/{chunk}");
    let short = numbering::LineRecord {
        size: 2,
        first: 0,
        lines: 1,
    };
    let whole = numbering::LineRecord {
        size: 4,
        first: 0,
        lines: 2,
    };
    s.reserve_own_index("app", 1).await.unwrap();
    remote
        .0
        .lock()
        .unwrap()
        .insert(key.clone(), b"a\n".to_vec());
    assert_eq!(
        s.add_remote("app", &chunk, 2, 0, Some(short))
            .await
            .unwrap(),
        TierOutcome::Done
    );
    let (d, n) = lines("new\n");
    let next = s.append("app", d, n, true).await.unwrap().chunk;
    assert_eq!(s.chunk_meta("app", &next).unwrap().first_line, Some(1));
    remote.0.lock().unwrap().insert(key, b"a\nb\n".to_vec());
    let conflict = TierOutcome::Conflicting { unique_from: 2 };
    for _ in 0..2 {
        assert_eq!(
            s.add_remote("app", &chunk, 4, 0, Some(whole))
                .await
                .unwrap(),
            conflict
        );
        let m = s.chunk_meta("app", &chunk).unwrap();
        assert!(m.complete && m.local && !m.uploaded && m.size == 2, "{m:?}");
        assert_eq!(m.line_record(), Some(short));
        assert_eq!(read_all(&s, "app", &chunk).await, b"a\n");
    }
    s.shutdown().await;
    drop(s);
    let s = Storage::open(tiered.clone(), Metrics::new()).await.unwrap();
    s.set_remote(remote.clone());
    let m = s.chunk_meta("app", &chunk).unwrap();
    assert!(m.complete && m.local && !m.uploaded && m.size == 2, "{m:?}");
    // Held and recorded as uploaded, as a crash after the fetch leaves it.
    s.mark_uploaded("app", &chunk).await.unwrap();
    assert!(s.chunk_meta("app", &chunk).unwrap().uploaded);
    assert_eq!(
        s.add_remote("app", &chunk, 4, 0, Some(whole))
            .await
            .unwrap(),
        conflict
    );
    assert!(!s.chunk_meta("app", &chunk).unwrap().uploaded);
    s.shutdown().await;
    drop(s);
    let s = Storage::open(tiered, Metrics::new()).await.unwrap();
    let m = s.chunk_meta("app", &chunk).unwrap();
    assert!(m.complete && m.local && !m.uploaded && m.size == 2, "{m:?}");
    assert_eq!(category_lines(&s, "app").await, ["a", "new"]);
    s.shutdown().await;
}

#[tokio::test]
async fn only_uploaded_chunks_are_evicted_and_they_read_back_from_the_remote() {
    let dir = tempfile::tempdir().unwrap();
    let tiered = StorageOptions {
        tiered: true,
        zero_runway: true,
        drop_behind: None,
        ..opts(dir.path(), 8)
    };
    // Always above the mark: everything evictable goes.
    let pressed = StorageOptions {
        disk_high_water_percent: 1,
        ..tiered.clone()
    };
    let remote = Arc::new(MemRemote::default());
    let s = Storage::open(tiered.clone(), Metrics::new()).await.unwrap();
    s.set_remote(remote.clone());
    let mut names = Vec::new();
    for text in ["one 1\n", "two 22\n", "three\n"] {
        let (d, n) = lines(text);
        names.push(s.append("app", d, n, true).await.unwrap().chunk);
    }
    s.rotate("app").await.unwrap();
    // An incomplete or not uploaded chunk is never evicted.
    assert_eq!(
        s.evict("app", &names[0]).await.unwrap(),
        TierOutcome::NotEligible
    );
    for name in &names[..2] {
        let bytes = read_all(&s, "app", name).await;
        remote
            .0
            .lock()
            .unwrap()
            .insert(format!("app/{name}"), bytes);
        assert_eq!(
            s.mark_uploaded("app", name).await.unwrap(),
            TierOutcome::Done
        );
    }
    assert_eq!(s.disk().reclaimable(), 6 + 7);
    s.shutdown().await;
    drop(s);
    let s = Storage::open(pressed, Metrics::new()).await.unwrap();
    s.set_remote(remote.clone());
    assert_eq!(
        s.disk().reclaimable(),
        6 + 7,
        "recovered from the upload log"
    );
    // The disk monitor evicts under pressure too; either may take a chunk.
    let mut freed = s.evict_for_space().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.disk().reclaimable() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "eviction did not finish"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        freed += s.evict_for_space().await;
    }
    assert!(freed <= 6 + 7);
    let flags = |s: &Storage| {
        s.chunks("app")
            .unwrap()
            .into_iter()
            .map(|c| (c.name.index, c.meta.local, c.meta.uploaded, c.meta.complete))
            .collect::<Vec<_>>()
    };
    let want = [
        (0, false, true, true),
        (1, false, true, true),
        (2, true, false, true),
    ];
    assert_eq!(flags(&s), want);
    assert!(!dir.path().join("app").join(names[0].to_string()).exists());
    assert!(dir.path().join("app").join(names[2].to_string()).exists());
    assert_eq!(read_all(&s, "app", &names[1]).await, b"two 22\n");
    // A line boundary is checked against the remote bytes too.
    assert!(matches!(
        s.check_boundary("app", &names[1], 3).await,
        Err(StorageError::NotLineBoundary { .. })
    ));
    // After a restart the evicted chunks are still listed and readable, and
    // their names are never used again.
    s.shutdown().await;
    drop(s);
    let s = Storage::open(tiered, Metrics::new()).await.unwrap();
    s.set_remote(remote.clone());
    assert_eq!(flags(&s), want);
    assert_eq!(read_all(&s, "app", &names[0]).await, b"one 1\n");
    let (d, n) = lines("four\n");
    assert_eq!(s.append("app", d, n, true).await.unwrap().chunk.index, 3);
    // An object gone from the store is a clear "missing", not an I/O error.
    remote.0.lock().unwrap().clear();
    let e = s
        .read(
            "app",
            &names[0],
            0,
            100,
            Duration::ZERO,
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::RemoteMissing { .. }), "{e}");
}

#[tokio::test]
async fn data_behind_the_window_is_dropped_from_the_page_cache_once_on_disk() {
    const MIB: u64 = 1 << 20;
    for window in [None, Some(8 * MIB)] {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Metrics::new();
        let s = Storage::open(
            StorageOptions {
                drop_behind: window,
                ..opts(dir.path(), 16 * MIB)
            },
            metrics.clone(),
        )
        .await
        .unwrap();
        // Two full chunks.
        let line = Bytes::from(format!("{}\n", "x".repeat(MIB as usize - 1)));
        for _ in 0..32 {
            s.append("app", line.clone(), 1, false).await.unwrap();
        }
        // A synced append is answered after the round holding the earlier
        // flushes; the one after it, after that round's drops.
        let (d, n) = lines("tail\n");
        s.append("app", d.clone(), n, true).await.unwrap();
        s.append("app", d, n, true).await.unwrap();
        let dropped = metrics.page_cache_dropped_bytes.get();
        match window {
            None => assert_eq!(dropped, 0),
            // All of the first chunk, nothing of the last 8 MiB.
            Some(w) => assert!(
                (16 * MIB..=32 * MIB - w).contains(&dropped),
                "{dropped} bytes dropped"
            ),
        }
        s.shutdown().await;
    }
}

/// The line numbers a node that lost its disk learns from its peers stay
/// reserved across a restart that finds neither the chunks that held them
/// nor their records (not restored yet, or deleted on every peer).
#[tokio::test]
async fn reserved_line_numbers_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path(), 64);
    let s = Storage::open(o.clone(), Metrics::new()).await.unwrap();
    s.reserve_own_index("app", 3).await.unwrap();
    s.reserve_own_line("app", 40).await.unwrap();
    // Never lowered.
    s.reserve_own_line("app", 7).await.unwrap();
    s.shutdown().await;
    drop(s);
    let s = Storage::open(o, Metrics::new()).await.unwrap();
    let (d, n) = lines("a\nb\n");
    let a = s.append("app", d, n, true).await.unwrap();
    assert_eq!((a.chunk.index, a.first_line), (3, 40));
    s.shutdown().await;
}

/// Another owner's line end given by its listing, in a category where it
/// lists no chunk, survives a restart, is never lowered, and creates the
/// category it names; in a category where it lists chunks (their records
/// will say it), it is noted in memory only, in a category held.
#[tokio::test]
async fn line_ends_learned_from_a_listing_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path(), 64);
    let s = Storage::open(o.clone(), Metrics::new()).await.unwrap();
    let (d, n) = lines("a\n");
    s.append("web", d, n, true).await.unwrap();
    let ends = |n: u64| BTreeMap::from([("app".to_owned(), n), ("web".to_owned(), n + 1)]);
    let listed = std::collections::BTreeSet::from(["web", "db"]);
    s.learn_line_ends("eu2", &ends(40), &listed).await;
    s.learn_line_ends("eu2", &ends(7), &listed).await;
    assert_eq!(s.line_end_of("app", "eu2"), Some(40));
    assert_eq!(s.line_end_of("web", "eu2"), Some(41));
    assert_eq!(s.line_end_of("app", "eu3"), None);
    let more = BTreeMap::from([("db".to_owned(), 5)]);
    s.learn_line_ends("eu2", &more, &listed).await;
    assert!(!dir.path().join("web").join(".line_ends.json").exists());
    s.shutdown().await;
    drop(s);
    let s = Storage::open(o, Metrics::new()).await.unwrap();
    assert_eq!(s.categories(), ["app", "web"]);
    assert_eq!(s.line_end_of("app", "eu2"), Some(40));
    assert_eq!(s.line_end_of("web", "eu2"), None);
    s.shutdown().await;
}

#[tokio::test]
async fn numbering_goes_on_after_every_chunk_was_deleted_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path(), 10);
    let s = Storage::open(o.clone(), Metrics::new()).await.unwrap();
    for text in ["a\nb\nc\n", "d\ne\n", "f\n"] {
        let (d, n) = lines(text);
        s.append("app", d, n, true).await.unwrap();
    }
    s.rotate("app").await.unwrap();
    for c in s.chunks("app").unwrap() {
        let done = s.reclaim("app", &c.name, Reclaim::Expired).await.unwrap();
        assert_eq!(done, TierOutcome::Done);
    }
    assert!(s.chunks("app").unwrap().is_empty());
    s.shutdown().await;
    drop(s);
    let s = Storage::open(o, Metrics::new()).await.unwrap();
    let (d, n) = lines("g\n");
    let g = s.append("app", d, n, true).await.unwrap();
    let meta = s.chunk_meta("app", &g.chunk).unwrap();
    assert_eq!(
        (g.chunk.index, meta.first_line, meta.lines),
        (2, Some(6), Some(1))
    );
    s.shutdown().await;
}
