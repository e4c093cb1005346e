//! Line numbers: each owner numbers the lines it writes to a category 0, 1,
//! 2, ... across its chunks, in chunk order. A chunk's first line number and
//! its count of lines are facts about immutable bytes, decided once by the
//! owner when it opens the chunk (the previous chunk's first line plus its
//! lines), and learned by every other node from the owner's listing, so
//! every node gives the same number to the same line, and no number is
//! ever given twice (the Kafka listener's offsets are these numbers).
//!
//! What a node learns it keeps in an append-only log per category,
//! `<data>/<category>/.lines.log`, so that the numbers survive the bytes
//! (a chunk evicted to the object store, one deleted by retention):
//!
//! ```text
//! chunkbus-lines 1
//! l eu1-chunk000000007 4096 1200 64     chunk, size, first line, lines
//! ```
//!
//! A record is written when a chunk is complete here (the owner's own at
//! completion, a copy once complete, a restored chunk) and holds for a
//! chunk of exactly that size. Start-up counts the lines of local chunks that
//! have no record (a crash just after a completion; data written by an
//! earlier version) and numbers this node's own chunks from the record
//! before them; the record of the highest own chunk is always kept, so
//! numbering goes on from there after every chunk was deleted.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use chunkbus_client::ChunkName;

use super::StorageError;
use super::record_log::RecordLog;

/// File name of the line log inside a category directory.
pub const LINES_LOG: &str = ".lines.log";

const LOG: RecordLog = RecordLog {
    file: LINES_LOG,
    header: "chunkbus-lines 1",
    what: "line",
};

/// Block size of a count of lines in a file.
const COUNT_BLOCK_BYTES: usize = 1 << 20;

/// The numbers of a complete chunk of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineRecord {
    /// Bytes the record is about.
    pub size: u64,
    /// Number of the chunk's first line in its owner's numbering.
    pub first: u64,
    /// Lines in those bytes.
    pub lines: u64,
}

impl LineRecord {
    /// The numbers of `size` bytes, when both are known.
    pub fn known(size: u64, first: Option<u64>, lines: Option<u64>) -> Option<Self> {
        Some(Self {
            size,
            first: first?,
            lines: lines?,
        })
    }

    /// The number the owner gives to the line after this chunk's last.
    pub fn end(&self) -> u64 {
        self.first + self.lines
    }
}

/// Replays the line log of the category at `dir` (empty when absent).
pub(super) fn load(dir: &Path) -> Result<(BTreeMap<ChunkName, LineRecord>, usize), StorageError> {
    let mut map = BTreeMap::new();
    let records = LOG.replay(dir, |line| {
        let mut f = line.split(' ');
        if f.next()? != "l" {
            return None;
        }
        let name = ChunkName::parse(f.next()?).ok()?;
        let mut num = || f.next()?.parse::<u64>().ok();
        let (size, first, lines) = (num()?, num()?, num()?);
        first.checked_add(lines)?;
        map.insert(name, LineRecord { size, first, lines });
        Some(())
    })?;
    Ok((map, records))
}

fn record_line(out: &mut String, chunk: &ChunkName, r: &LineRecord) {
    use std::fmt::Write;
    let _ = writeln!(out, "l {chunk} {} {} {}", r.size, r.first, r.lines);
}

/// Appends records durably. Called with the category's state lock held.
pub(super) fn append(dir: &Path, records: &[(ChunkName, LineRecord)]) -> Result<(), StorageError> {
    if records.is_empty() {
        return Ok(());
    }
    let mut text = String::new();
    for (chunk, r) in records {
        record_line(&mut text, chunk, r);
    }
    LOG.append(dir, &text)
}

/// Rewrites the log with `live` when a log of `records` records is mostly
/// dead.
pub(super) fn compact(
    dir: &Path,
    records: usize,
    live: &BTreeMap<ChunkName, LineRecord>,
) -> Result<(), StorageError> {
    if !RecordLog::mostly_dead(records, live.len()) {
        return Ok(());
    }
    let mut text = String::new();
    for (chunk, r) in live {
        record_line(&mut text, chunk, r);
    }
    LOG.rewrite(dir, &text)
}

/// Lines (`\n` bytes) in the first `len` bytes of `file`.
pub(super) fn count_lines(file: &File, len: u64) -> std::io::Result<u64> {
    let mut buf = vec![0u8; COUNT_BLOCK_BYTES.min(len as usize)];
    let (mut at, mut lines) = (0u64, 0u64);
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], at)?;
        lines += memchr::memchr_iter(b'\n', &buf[..n]).count() as u64;
        at += n as u64;
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn records_replay_and_a_torn_one_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let a = ChunkName::parse("eu1-chunk000000001").unwrap();
        let b = ChunkName::parse("eu2-chunk000000000").unwrap();
        let rec = |size, first, lines| LineRecord { size, first, lines };
        append(dir.path(), &[(a.clone(), rec(10, 0, 2))]).unwrap();
        append(
            dir.path(),
            &[(b.clone(), rec(20, 5, 3)), (a.clone(), rec(12, 0, 3))],
        )
        .unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(LINES_LOG))
            .unwrap();
        f.write_all(b"l eu1-chunk000000002 4").unwrap();
        let (map, records) = load(dir.path()).unwrap();
        assert_eq!(records, 3);
        assert_eq!(
            map.into_iter().collect::<Vec<_>>(),
            [(a, rec(12, 0, 3)), (b, rec(20, 5, 3))]
        );
    }

    #[test]
    fn bad_records_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        for bad in [
            "l eu1-chunk000000001 1 2\n",
            "l x 1 2 3\n",
            "l eu1-chunk000000001 1 18446744073709551615 1\n",
        ] {
            std::fs::write(
                dir.path().join(LINES_LOG),
                format!("chunkbus-lines 1\n{bad}"),
            )
            .unwrap();
            let e = load(dir.path()).unwrap_err().to_string();
            assert!(e.contains("bad line record"), "{e}");
        }
        std::fs::write(dir.path().join(LINES_LOG), "chunkbus-lines 2\n").unwrap();
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("unknown line log format"), "{e}");
    }

    #[test]
    fn a_mostly_dead_log_is_compacted_to_what_is_live() {
        let dir = tempfile::tempdir().unwrap();
        let recs: Vec<_> = (0..100)
            .map(|i| {
                let r = LineRecord {
                    size: 2,
                    first: i as u64,
                    lines: 1,
                };
                (ChunkName::new("eu1", i), r)
            })
            .collect();
        append(dir.path(), &recs).unwrap();
        let live: BTreeMap<_, _> = recs[99..].iter().cloned().collect();
        compact(dir.path(), 100, &live).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join(LINES_LOG)).unwrap(),
            "chunkbus-lines 1\nl eu1-chunk000000099 2 99 1\n"
        );
        assert_eq!(load(dir.path()).unwrap(), (live, 1));
    }

    #[test]
    fn lines_are_counted_across_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c");
        let mut data = vec![b'x'; 3 * COUNT_BLOCK_BYTES + 7];
        for i in (0..data.len()).step_by(1000) {
            data[i] = b'\n';
        }
        std::fs::write(&p, &data).unwrap();
        let f = File::open(&p).unwrap();
        let want = data.iter().filter(|&&b| b == b'\n').count() as u64;
        assert_eq!(count_lines(&f, data.len() as u64).unwrap(), want);
        assert_eq!(count_lines(&f, 1001).unwrap(), 2);
        assert_eq!(count_lines(&f, 0).unwrap(), 0);
    }
}
