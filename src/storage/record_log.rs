//! Append-only logs of small text records, one per line after a header
//! line naming the format (`.uploads.log`, `.lines.log`).
//!
//! Each record is flushed (`fdatasync`) before it counts. Records are
//! idempotent, so replaying a log rebuilds what it says; a torn last record
//! (a crash while appending) is ignored. A log is rewritten whole (atomically,
//! see [`crate::durable`]) when most of it is dead.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use super::{StorageError, fsync_dir};

/// One kind of log: its file name, its header and how its errors name it.
#[derive(Debug, Clone, Copy)]
pub(super) struct RecordLog {
    /// File name inside a category directory.
    pub file: &'static str,
    /// First line of the file: format name and version.
    pub header: &'static str,
    /// What a record is about, for error messages ("upload").
    pub what: &'static str,
}

impl RecordLog {
    /// Replays the log in `dir`, handing each whole record to `apply` in
    /// order; returns the number of records read (0 when the log is absent).
    pub fn replay(
        &self,
        dir: &Path,
        mut apply: impl FnMut(&str) -> Option<()>,
    ) -> Result<usize, StorageError> {
        let path = dir.join(self.file);
        let text = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => {
                return Err(StorageError::io(
                    format!("cannot read {}", path.display()),
                    e,
                ));
            }
        };
        self.replay_text(&text, &mut apply).map_err(|msg| {
            StorageError::io(
                format!("cannot use {}", path.display()),
                std::io::Error::new(std::io::ErrorKind::InvalidData, msg),
            )
        })
    }

    fn replay_text(
        &self,
        text: &[u8],
        apply: &mut impl FnMut(&str) -> Option<()>,
    ) -> Result<usize, String> {
        let mut lines = text.split(|&b| b == b'\n');
        match lines.next() {
            Some(h) if h == self.header.as_bytes() => {}
            Some(h) if h.is_empty() && text.len() <= 1 => return Ok(0),
            Some(h) => {
                return Err(format!(
                    "unknown {} log format {:?} (this build reads {:?})",
                    self.what,
                    String::from_utf8_lossy(&h[..h.len().min(40)]),
                    self.header
                ));
            }
            None => return Ok(0),
        }
        let whole = if text.ends_with(b"\n") {
            text
        } else {
            // A torn last record: whatever it recorded is done again.
            &text[..text.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1)]
        };
        let mut records = 0;
        for line in whole.split(|&b| b == b'\n').skip(1) {
            if line.is_empty() {
                continue;
            }
            records += 1;
            let line = std::str::from_utf8(line).map_err(|_| "a record is not UTF-8".to_owned())?;
            if apply(line).is_none() {
                return Err(format!("bad {} record {line:?}", self.what));
            }
        }
        Ok(records)
    }

    /// Appends records (each ending with `\n`) durably. Called with the
    /// category's state lock held, so that records of one category never
    /// interleave.
    pub fn append(&self, dir: &Path, records: &str) -> Result<(), StorageError> {
        let path = dir.join(self.file);
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new().append(true).create(true).open(&path)?;
            let new = f.metadata()?.len() == 0;
            if new {
                f.write_all(format!("{}\n{records}", self.header).as_bytes())?;
            } else {
                f.write_all(records.as_bytes())?;
            }
            f.sync_data()?;
            if new { fsync_dir(dir) } else { Ok(()) }
        };
        write().map_err(|e| StorageError::io(format!("cannot append to {}", path.display()), e))
    }

    /// Writes the log afresh with `records` (each ending with `\n`).
    pub fn rewrite(&self, dir: &Path, records: &str) -> Result<(), StorageError> {
        let text = format!("{}\n{records}", self.header);
        crate::durable::write_atomic(&dir.join(self.file), text.as_bytes()).map_err(|e| {
            StorageError::io(
                format!("cannot compact the {} log of {}", self.what, dir.display()),
                e,
            )
        })
    }

    /// True when a log of `records` records of which `live` count is worth
    /// rewriting.
    pub fn mostly_dead(records: usize, live: usize) -> bool {
        records > 2 * live + 64
    }
}
