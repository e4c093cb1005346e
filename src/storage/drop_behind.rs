//! Drop-behind: chunk data a category wrote leaves the OS page cache once
//! it is on disk and more than a window behind the category's newest write.
//!
//! Appending to a file fills page-cache pages the kernel takes from free
//! memory. Pages that were free for a while are cold on virtual machines
//! that hand free memory back to their host, and the first touch of each
//! costs several microseconds: here that made writes four to six times
//! slower than writes into pages just freed (docs/benchmarks.md). Dropping
//! what is behind the window hands the writer warm pages again, and keeps
//! recent data, which tailing readers want, in memory. PostgreSQL does the
//! same with WAL segments, BookKeeper with its journal.
//!
//! The writer records every range it writes and takes the ranges that fell
//! out of the window with the next flush it queues; the group-commit thread
//! advises the kernel to drop them after that flush, when they are clean.
//! Ranges are named by path, not by an open file, so a chunk deleted in the
//! meantime is not kept alive and is simply skipped.

use std::collections::VecDeque;
use std::fs::File;
use std::num::NonZeroU64;
use std::path::PathBuf;

/// Ranges are dropped in steps of at least this many bytes.
const STEP_BYTES: u64 = 4 << 20;
/// Page size assumed when rounding: a range ends on a page boundary unless
/// it ends where its chunk ends, so no page is left half-dropped.
const PAGE_BYTES: u64 = 4096;

/// Written bytes of one chunk that may still be in the page cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct CachedRange {
    pub path: PathBuf,
    pub start: u64,
    pub end: u64,
}

/// What one category wrote recently, oldest first.
#[derive(Debug)]
pub(super) struct DropBehind {
    /// Bytes kept cached behind the newest write; `None`: drop nothing.
    window: Option<u64>,
    ranges: VecDeque<CachedRange>,
    cached: u64,
}

impl DropBehind {
    pub fn new(window: Option<u64>) -> Self {
        Self {
            window,
            ranges: VecDeque::new(),
            cached: 0,
        }
    }

    /// Records that `start..end` of the chunk at `path` was written.
    pub fn written(&mut self, path: &std::path::Path, start: u64, end: u64) {
        if self.window.is_none() || end <= start {
            return;
        }
        self.cached += end - start;
        if let Some(last) = self.ranges.back_mut()
            && last.end == start
            && last.path == path
        {
            last.end = end;
            return;
        }
        self.ranges.push_back(CachedRange {
            path: path.to_owned(),
            start,
            end,
        });
    }

    /// The ranges now more than the window behind, once they add up to a
    /// step; they are forgotten here.
    pub fn take_due(&mut self) -> Vec<CachedRange> {
        let Some(window) = self.window else {
            return Vec::new();
        };
        if self.cached < window.saturating_add(STEP_BYTES) {
            return Vec::new();
        }
        let mut excess = self.cached - window;
        let mut due = Vec::new();
        while excess > 0 {
            let Some(front) = self.ranges.front_mut() else {
                break;
            };
            let len = front.end - front.start;
            if len <= excess {
                excess -= len;
                self.cached -= len;
                due.extend(self.ranges.pop_front());
                continue;
            }
            // Part of this range: up to a page boundary.
            let cut = (front.start + excess) / PAGE_BYTES * PAGE_BYTES;
            if cut > front.start {
                due.push(CachedRange {
                    path: front.path.clone(),
                    start: front.start,
                    end: cut,
                });
                self.cached -= cut - front.start;
                front.start = cut;
            }
            break;
        }
        due
    }
}

/// Advises the kernel to drop each range from the page cache and returns
/// the bytes advised. Pages still dirty stay; a chunk gone from disk is
/// skipped.
pub(super) fn drop_cached(ranges: &[CachedRange]) -> u64 {
    let mut dropped = 0;
    let mut open: Option<(&std::path::Path, File)> = None;
    for range in ranges {
        let Some(len) = NonZeroU64::new(range.end - range.start) else {
            continue;
        };
        if open.as_ref().is_none_or(|(p, _)| *p != range.path) {
            open = File::open(&range.path)
                .ok()
                .map(|f| (range.path.as_path(), f));
        }
        let Some((_, file)) = &open else {
            continue;
        };
        match rustix::fs::fadvise(file, range.start, Some(len), rustix::fs::Advice::DontNeed) {
            Ok(()) => dropped += len.get(),
            Err(e) => {
                tracing::debug!(path = %range.path.display(), error = %e, "cannot drop written chunk data from the page cache")
            }
        }
    }
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn range(path: &str, start: u64, end: u64) -> CachedRange {
        CachedRange {
            path: PathBuf::from(path),
            start,
            end,
        }
    }

    #[test]
    fn nothing_is_due_within_the_window_and_a_step() {
        let mut d = DropBehind::new(Some(64 * MIB));
        d.written("a".as_ref(), 0, 64 * MIB + STEP_BYTES - 1);
        assert!(d.take_due().is_empty());
        d.written(
            "a".as_ref(),
            64 * MIB + STEP_BYTES - 1,
            64 * MIB + STEP_BYTES,
        );
        assert_eq!(d.take_due(), vec![range("a", 0, STEP_BYTES)]);
        assert!(d.take_due().is_empty());
    }

    #[test]
    fn due_ranges_span_chunks_and_stop_on_a_page_boundary() {
        let mut d = DropBehind::new(Some(8 * MIB - 50));
        d.written("a".as_ref(), 0, 3 * MIB);
        d.written("a".as_ref(), 3 * MIB, 5 * MIB + 100);
        d.written("b".as_ref(), 0, 10 * MIB);
        // 15 MiB + 100 cached, 8 MiB - 50 kept: all of a, then b up to the
        // page boundary at or below 2 MiB + 50.
        assert_eq!(
            d.take_due(),
            vec![range("a", 0, 5 * MIB + 100), range("b", 0, 2 * MIB)]
        );
        assert_eq!(d.cached, 8 * MIB);
        d.written("b".as_ref(), 10 * MIB, 20 * MIB);
        assert_eq!(d.take_due(), vec![range("b", 2 * MIB, 12 * MIB)]);
    }

    #[test]
    fn no_window_keeps_nothing() {
        let mut d = DropBehind::new(None);
        d.written("a".as_ref(), 0, 1 << 40);
        assert!(d.take_due().is_empty());
        assert!(d.ranges.is_empty());
    }

    #[test]
    fn a_zero_window_drops_everything_written_in_steps() {
        let mut d = DropBehind::new(Some(0));
        d.written("a".as_ref(), 0, MIB);
        assert!(d.take_due().is_empty());
        d.written("a".as_ref(), MIB, 4 * MIB);
        assert_eq!(d.take_due(), vec![range("a", 0, 4 * MIB)]);
    }

    #[test]
    fn dropping_leaves_the_data_and_skips_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        std::fs::write(&path, vec![b'x'; 3 * PAGE_BYTES as usize]).unwrap();
        File::open(&path).unwrap().sync_all().unwrap();
        let dropped = drop_cached(&[
            CachedRange {
                path: dir.path().join("gone"),
                start: 0,
                end: PAGE_BYTES,
            },
            CachedRange {
                path: path.clone(),
                start: 0,
                end: 3 * PAGE_BYTES,
            },
        ]);
        assert_eq!(dropped, 3 * PAGE_BYTES);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            vec![b'x'; 3 * PAGE_BYTES as usize]
        );
    }
}
