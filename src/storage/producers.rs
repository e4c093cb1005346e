//! Idempotent produce: the (producer, sequence) of each tagged request this
//! node stored, per category, so that a retry is answered with the
//! original position instead of being stored twice.
//!
//! The writer appends one record per tagged request to the category's
//! `.producers.log` before it writes the request's lines, and the log is
//! flushed in the same group commit as the lines. A record therefore
//! exists for every stored tagged request; one may also exist for a
//! request whose lines never made it (a crash between the two writes, a
//! failed write cut back). So a record carries the CRC-32C of the lines,
//! and a record read back from the log is trusted only once the bytes at
//! its position in its chunk are checked against it ([`Recorded::verified`]);
//! records of this process's own successful appends are trusted as they
//! are.
//!
//! Kept: the last [`KEPT_SEQUENCES`] sequences of each of the
//! [`KEPT_PRODUCERS`] most recently seen producers of a category. The log
//! is rewritten with only those when it has grown past
//! [`COMPACT_AFTER_RECORDS`].

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::path::Path;

use chunkbus_client::ChunkName;

/// Sequences remembered per producer.
pub const KEPT_SEQUENCES: usize = 5;
/// Producers remembered per category.
pub const KEPT_PRODUCERS: usize = 10_000;
/// The log is rewritten with what is kept once it holds this many records.
pub const COMPACT_AFTER_RECORDS: usize = 100_000;
/// Producer ids of the Kafka listener's idempotent producers
/// (`kafka.<producer id>`); the native API refuses them.
pub const KAFKA_PRODUCER_PREFIX: &str = "kafka.";
/// Producer ids of this node's own idempotent writes (the lines it
/// rescues from an object it cannot take as its chunk,
/// `chunkbus.rescue.<chunk>.<read>`); the native API refuses them.
pub const INTERNAL_PRODUCER_PREFIX: &str = "chunkbus.";
/// Longest producer id.
pub const MAX_PRODUCER_LEN: usize = 128;

/// The file, in the category's directory.
pub(super) const LOG_FILE: &str = ".producers.log";
const HEADER: &str = "chunkbus-producers 1";

/// Checks a producer id: 1 to 128 of `A-Z a-z 0-9 . _ : -`.
pub fn validate_producer(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_PRODUCER_LEN {
        return Err(format!(
            "a producer id is 1 to {MAX_PRODUCER_LEN} characters, not {}",
            id.len()
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
    {
        return Err(format!(
            "a producer id holds letters, digits and . _ : - only, not {c:?}"
        ));
    }
    Ok(())
}

/// What a tagged request asks the writer to record with its lines.
#[derive(Debug, Clone)]
pub struct ProducerTag {
    /// The producer's id (validated).
    pub producer: String,
    /// The request's sequence number.
    pub sequence: u64,
    /// CRC-32C of the request's lines.
    pub crc: u32,
}

/// Where a tagged request's lines were stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// Its sequence number.
    pub sequence: u64,
    /// The chunk.
    pub chunk: ChunkName,
    /// Its first byte.
    pub offset: u64,
    /// Past its last byte.
    pub next_offset: u64,
    /// Its lines.
    pub lines: u64,
    /// CRC-32C of its bytes.
    pub crc: u32,
    /// Known to be stored (this process stored it, or its bytes were
    /// checked); a record read back from the log is not, until checked.
    pub verified: bool,
}

/// One log record: `<producer> <sequence> <chunk> <offset> <next_offset>
/// <lines> <crc>`.
pub(super) fn record_line(out: &mut Vec<u8>, producer: &str, r: &Recorded) {
    let _ = writeln!(
        out,
        "{producer} {} {} {} {} {} {:08x}",
        r.sequence, r.chunk, r.offset, r.next_offset, r.lines, r.crc
    );
}

fn parse_record(line: &str) -> Option<(&str, Recorded)> {
    let mut f = line.split(' ');
    let producer = f.next()?;
    validate_producer(producer).ok()?;
    let r = Recorded {
        sequence: f.next()?.parse().ok()?,
        chunk: f.next()?.parse().ok()?,
        offset: f.next()?.parse().ok()?,
        next_offset: f.next()?.parse().ok()?,
        lines: f.next()?.parse().ok()?,
        crc: u32::from_str_radix(f.next()?, 16).ok()?,
        verified: false,
    };
    (f.next().is_none() && r.next_offset > r.offset).then_some((producer, r))
}

#[derive(Debug, Default)]
struct Producer {
    /// Oldest first.
    seqs: VecDeque<Recorded>,
    /// When it was last seen (the index's clock).
    used: u64,
}

/// The producers of one category, as far as they are remembered.
#[derive(Debug, Default)]
pub struct ProducerIndex {
    /// The log has been read.
    pub(super) loaded: bool,
    producers: HashMap<String, Producer>,
    clock: u64,
}

impl ProducerIndex {
    /// What is remembered of `sequence` of `producer`.
    pub fn get(&self, producer: &str, sequence: u64) -> Option<&Recorded> {
        self.producers
            .get(producer)?
            .seqs
            .iter()
            .find(|r| r.sequence == sequence)
    }

    /// The sequences remembered of `producer`, oldest first.
    pub fn sequences(&self, producer: &str) -> Vec<u64> {
        self.producers
            .get(producer)
            .map(|p| p.seqs.iter().map(|r| r.sequence).collect())
            .unwrap_or_default()
    }

    /// Remembers `r` for `producer` (replacing a record of the same
    /// sequence), forgetting its oldest sequences and the least recently
    /// seen producers beyond what is kept.
    pub fn insert(&mut self, producer: &str, r: Recorded) {
        self.clock += 1;
        let p = self.producers.entry(producer.to_owned()).or_default();
        p.used = self.clock;
        p.seqs.retain(|s| s.sequence != r.sequence);
        p.seqs.push_back(r);
        while p.seqs.len() > KEPT_SEQUENCES {
            p.seqs.pop_front();
        }
        if self.producers.len() > KEPT_PRODUCERS {
            // Forget the least recently seen tenth at once: one sort per
            // thousand new producers rather than a scan for each.
            let mut used: Vec<u64> = self.producers.values().map(|p| p.used).collect();
            used.sort_unstable();
            let cut = used[self.producers.len() - KEPT_PRODUCERS * 9 / 10];
            self.producers.retain(|_, p| p.used >= cut);
        }
    }

    /// Marks `sequence` of `producer` as checked against the chunk.
    pub fn mark_verified(&mut self, producer: &str, sequence: u64) {
        if let Some(p) = self.producers.get_mut(producer)
            && let Some(r) = p.seqs.iter_mut().find(|r| r.sequence == sequence)
        {
            r.verified = true;
        }
    }

    /// Forgets `sequence` of `producer` (its record did not check out).
    pub fn remove(&mut self, producer: &str, sequence: u64) {
        if let Some(p) = self.producers.get_mut(producer) {
            p.seqs.retain(|s| s.sequence != sequence);
        }
    }

    /// Producers remembered.
    pub fn len(&self) -> usize {
        self.producers.len()
    }

    /// True when none is.
    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    /// The index a log's text describes (records as not verified); a torn
    /// or unreadable record is skipped.
    pub(super) fn from_log(text: &str) -> ProducerIndex {
        let mut index = ProducerIndex::default();
        let mut lines = text.lines();
        if lines.next() != Some(HEADER) {
            return index;
        }
        for line in lines {
            if let Some((producer, r)) = parse_record(line) {
                index.insert(producer, r);
            }
        }
        index.loaded = true;
        index
    }

    /// The log text of what is kept, most recently seen producers last.
    pub(super) fn to_log(&self) -> Vec<u8> {
        let mut producers: Vec<_> = self.producers.iter().collect();
        producers.sort_by_key(|(_, p)| p.used);
        let mut out = Vec::with_capacity(64 + producers.len() * 100);
        out.extend_from_slice(HEADER.as_bytes());
        out.push(b'\n');
        for (id, p) in producers {
            for r in &p.seqs {
                record_line(&mut out, id, r);
            }
        }
        out
    }
}

/// Reads the index of the category in `dir` (empty when it has no log).
pub(super) fn load(dir: &Path) -> std::io::Result<ProducerIndex> {
    match std::fs::read(dir.join(LOG_FILE)) {
        Ok(bytes) => Ok(ProducerIndex::from_log(&String::from_utf8_lossy(&bytes))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ProducerIndex {
            loaded: true,
            ..Default::default()
        }),
        Err(e) => Err(e),
    }
}

/// The writer's handle on a category's log.
#[derive(Debug)]
pub(super) struct ProducerLog {
    pub file: std::sync::Arc<std::fs::File>,
    /// Records in the file, for compaction.
    pub records: usize,
}

impl ProducerLog {
    /// Opens (creating it with its header, durably) the log in `dir`.
    pub fn open(dir: &Path) -> std::io::Result<ProducerLog> {
        let path = dir.join(LOG_FILE);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)?;
        let len = file.metadata()?.len();
        let records = if len == 0 {
            file.write_all(format!("{HEADER}\n").as_bytes())?;
            file.sync_data()?;
            super::fsync_dir(dir)?;
            0
        } else {
            // A rough count (the lines of the file): only for compaction.
            let text = std::fs::read(&path)?;
            memchr::memchr_iter(b'\n', &text).count().saturating_sub(1)
        };
        Ok(ProducerLog {
            file: std::sync::Arc::new(file),
            records,
        })
    }

    /// Rewrites the log in `dir` with what it keeps, atomically, and opens
    /// the new one.
    pub fn compact(dir: &Path) -> std::io::Result<ProducerLog> {
        let index = load(dir)?;
        crate::durable::write_atomic(&dir.join(LOG_FILE), &index.to_log())?;
        ProducerLog::open(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(sequence: u64, offset: u64) -> Recorded {
        Recorded {
            sequence,
            chunk: "n1-chunk000000003".parse().unwrap(),
            offset,
            next_offset: offset + 10,
            lines: 2,
            crc: 0xdead_beef,
            verified: true,
        }
    }

    #[test]
    fn producer_ids_are_checked() {
        for ok in ["p", "host-1:app.7", &"a".repeat(128)] {
            assert!(validate_producer(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a/b", "é", &"a".repeat(129)] {
            assert!(validate_producer(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_log_keeps_the_last_sequences_of_the_recent_producers() {
        let mut index = ProducerIndex::default();
        for s in 0..8 {
            index.insert("a", rec(s, s * 10));
        }
        index.insert("b", rec(1, 500));
        assert!(index.get("a", 2).is_none(), "older than the last five");
        assert_eq!(index.get("a", 7).unwrap().offset, 70);
        let text = String::from_utf8(index.to_log()).unwrap();
        assert_eq!(text.lines().count(), 1 + 5 + 1);
        // A torn last record and a line of garbage are skipped.
        let torn = format!("{text}garbage line\na 9 n1.app-chunk000000003 1");
        let back = ProducerIndex::from_log(&torn);
        assert!(back.loaded);
        let r = back.get("a", 7).unwrap();
        assert_eq!((r.offset, r.next_offset, r.crc), (70, 80, 0xdead_beef));
        assert!(!r.verified, "read back: not trusted until checked");
        assert!(back.get("a", 9).is_none());
        assert_eq!(back.get("b", 1).unwrap().offset, 500);
        // Not a producer log at all: nothing.
        assert!(ProducerIndex::from_log("other 1\n").is_empty());
    }

    #[test]
    fn producers_beyond_the_kept_number_are_forgotten_least_recent_first() {
        let mut index = ProducerIndex::default();
        for p in 0..KEPT_PRODUCERS + 1 {
            index.insert(&format!("p{p}"), rec(0, 0));
        }
        assert!(index.len() <= KEPT_PRODUCERS);
        assert!(index.get("p0", 0).is_none());
        assert!(index.get(&format!("p{KEPT_PRODUCERS}"), 0).is_some());
    }

    #[test]
    fn a_log_is_created_appended_and_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = ProducerLog::open(dir.path()).unwrap();
        let mut text = Vec::new();
        for s in 0..20 {
            record_line(&mut text, "a", &rec(s, s * 10));
        }
        (&*log.file).write_all(&text).unwrap();
        log = ProducerLog::open(dir.path()).unwrap();
        assert_eq!(log.records, 20);
        let log = ProducerLog::compact(dir.path()).unwrap();
        assert_eq!(log.records, KEPT_SEQUENCES);
        let index = load(dir.path()).unwrap();
        assert_eq!(index.get("a", 19).unwrap().offset, 190);
        assert!(index.get("a", 14).is_none());
    }
}
