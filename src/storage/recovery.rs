//! Start-up: rebuild the in-memory view of the data directory.
//!
//! Every chunk file is checked to end with `\n`; a torn tail (a write cut
//! short by a crash) is truncated back to the last whole line. Every chunk of
//! this node found on disk is complete: the chunk that was open when the
//! process stopped is never appended to again, and the next write starts a
//! new chunk. One `pread` of one byte per chunk keeps start-up fast.
//!
//! A chunk marked for a zero runway (see `runway`) ends at its first NUL
//! byte past the mark before the cut, and loses the mark.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use chunkbus_client::ChunkName;
use chunkbus_client::names::validate_category;
use walkdir::WalkDir;

use super::category::ChunkMeta;
use super::numbering::{self, LineRecord};
use super::state::{self, CategoryState};
use super::tier;
use super::{StorageError, runway};

/// Block size of the backwards scan for the last `\n` of a torn chunk.
const TAIL_SCAN_BYTES: u64 = 64 * 1024;

/// What start-up found in one category directory.
#[derive(Debug, Default)]
pub(crate) struct RecoveredCategory {
    pub chunks: BTreeMap<ChunkName, ChunkMeta>,
    /// Index of the next chunk this node will create.
    pub next_index: u32,
    /// The category's durable state (completeness of other owners' chunks).
    pub state: CategoryState,
    /// Number of the next line this node writes to the category.
    pub next_line: u64,
    /// Per owner, the highest end of the numbers recorded, or learned from
    /// its listing (`state::LINE_ENDS_FILE`).
    pub line_ends: BTreeMap<String, u64>,
}

/// Scans `data_dir`; returns every category with its chunks.
pub(crate) fn scan(
    data_dir: &Path,
    node: &str,
) -> Result<BTreeMap<String, RecoveredCategory>, StorageError> {
    let mut out: BTreeMap<String, RecoveredCategory> = BTreeMap::new();
    let walk = WalkDir::new(data_dir)
        .min_depth(1)
        .max_depth(2)
        .sort_by_file_name();
    for entry in walk {
        let entry = entry.map_err(|e| {
            let path = e
                .path()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            StorageError::io(
                format!("cannot scan data directory at {path}"),
                e.into_io_error()
                    .unwrap_or_else(|| std::io::Error::other("file system loop")),
            )
        })?;
        let name = entry.file_name().to_string_lossy();
        if entry.depth() == 1 {
            if entry.file_type().is_dir() && validate_category(&name).is_ok() {
                let state = state::load(entry.path())?;
                let line_ends = state::load_line_ends(entry.path())?;
                out.insert(
                    name.into_owned(),
                    RecoveredCategory {
                        state,
                        line_ends,
                        ..RecoveredCategory::default()
                    },
                );
            }
            continue;
        }
        let Some(category) = entry
            .path()
            .parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
        else {
            continue;
        };
        let Some(recovered) = out.get_mut(category) else {
            continue;
        };
        if !entry.file_type().is_file() || name.starts_with('.') {
            continue;
        }
        let Ok(chunk) = ChunkName::parse(&name) else {
            tracing::warn!(path = %entry.path().display(), "ignoring a file that is not a chunk");
            continue;
        };
        let size = cut_torn_tail(entry.path())?;
        let created_ms = entry
            .metadata()
            .ok()
            .and_then(|m| m.created().or_else(|_| m.modified()).ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64);
        let own = chunk.owner == node;
        let complete = own || recovered.state.is_complete(&chunk.owner, chunk.index);
        if own {
            recovered.next_index = recovered.next_index.max(chunk.index.saturating_add(1));
        }
        recovered.chunks.insert(
            chunk,
            // Replicas learn completeness from the owner and keep it in the
            // category state. The version is stamped when the category is
            // loaded.
            ChunkMeta::local(size, complete, created_ms),
        );
    }
    for (name, rec) in &mut out {
        // Uploaded chunks: flagged when held, listed as remote when evicted.
        for (chunk, up) in tier::load(&data_dir.join(name))? {
            if chunk.owner == node {
                rec.next_index = rec.next_index.max(chunk.index.saturating_add(1));
            }
            match rec.chunks.get_mut(&chunk) {
                Some(m) if m.complete && m.size == up.size => m.uploaded = true,
                Some(m) if !m.complete && chunk.owner != node => {
                    // A partial copy of a chunk its owner has uploaded since.
                    let _ = std::fs::remove_file(data_dir.join(name).join(chunk.to_string()));
                    *m = ChunkMeta {
                        uploaded: true,
                        local: false,
                        ..ChunkMeta::local(up.size, true, up.created_ms)
                    };
                }
                Some(m) => {
                    tracing::warn!(category = %name, chunk = %chunk, held = m.size, uploaded = up.size, "local copy differs from the uploaded chunk; it will be uploaded again");
                }
                None => {
                    rec.chunks.insert(
                        chunk,
                        ChunkMeta {
                            uploaded: true,
                            local: false,
                            ..ChunkMeta::local(up.size, true, up.created_ms)
                        },
                    );
                }
            }
        }
        if let Some(n) = rec.state.next_own_index {
            rec.next_index = rec.next_index.max(n);
        }
        number_chunks(&data_dir.join(name), node, rec)?;
    }
    Ok(out)
}

/// Gives the chunks found their line numbers (see `numbering`): from the
/// line log; by counting the lines of a local chunk without a record; and
/// for this node's own chunks without a first number, from the chunk
/// before them. Records what it learned, and compacts the log.
fn number_chunks(dir: &Path, node: &str, rec: &mut RecoveredCategory) -> Result<(), StorageError> {
    let (records, read) = numbering::load(dir)?;
    let count = |chunk: &ChunkName, size: u64| {
        let path = dir.join(chunk.to_string());
        File::open(&path)
            .and_then(|f| numbering::count_lines(&f, size))
            .map_err(|e| {
                StorageError::io(format!("cannot count the lines of {}", path.display()), e)
            })
    };
    // Own chunks by index, numbered or not, including the records of
    // chunks no longer held (the chain goes on from them).
    let mut own: BTreeMap<u32, (Option<u64>, Option<u64>)> = records
        .iter()
        .filter(|(c, _)| c.owner == node)
        .map(|(c, r)| (c.index, (Some(r.first), Some(r.lines))))
        .collect();
    for (chunk, m) in rec.chunks.iter_mut() {
        if let Some(r) = records.get(chunk) {
            m.first_line = Some(r.first);
            m.lines = (r.size == m.size).then_some(r.lines);
        }
        if m.lines.is_none() && m.local {
            m.lines = Some(count(chunk, m.size)?);
        }
        if chunk.owner != node {
            continue;
        }
        if m.first_line.is_none() {
            // Numbered after the chunk before it; the first chunk ever
            // from 0. A chunk before it with an unknown count (evicted by
            // an earlier version) leaves it unnumbered.
            m.first_line = match own.range(..chunk.index).next_back() {
                Some((_, (Some(first), Some(lines)))) => Some(first + lines),
                Some(_) => None,
                None => Some(0),
            };
        }
        own.insert(chunk.index, (m.first_line, m.lines));
    }
    rec.next_line = own
        .values()
        .filter_map(|&(first, lines)| Some(first? + lines?))
        .max()
        .unwrap_or(0)
        .max(rec.state.next_own_line.unwrap_or(0));
    let mut live: BTreeMap<ChunkName, LineRecord> = BTreeMap::new();
    let mut new = Vec::new();
    for (chunk, m) in &rec.chunks {
        if let Some(r) = m.line_record().filter(|_| m.complete) {
            if records.get(chunk) != Some(&r) {
                new.push((chunk.clone(), r));
            }
            live.insert(chunk.clone(), r);
        } else if let Some(r) = records.get(chunk) {
            // An open copy's record keeps its first number.
            live.insert(chunk.clone(), *r);
        }
    }
    // The highest record of each owner stays: numbering goes on from it
    // (for this node's own chunks; for a peer that lost its disk and asks).
    let mut highest: BTreeMap<&str, (&ChunkName, &LineRecord)> = BTreeMap::new();
    for (chunk, r) in records.iter().chain(live.iter()) {
        let h = highest.entry(chunk.owner.as_str()).or_insert((chunk, r));
        if r.end() > h.1.end() {
            *h = (chunk, r);
        }
    }
    for (owner, (_, r)) in &highest {
        let e = rec.line_ends.entry((*owner).to_owned()).or_insert(0);
        *e = (*e).max(r.end());
    }
    let kept: Vec<_> = highest
        .into_values()
        .map(|(c, r)| (c.clone(), *r))
        .collect();
    for (chunk, r) in kept {
        live.entry(chunk).or_insert(r);
    }
    numbering::append(dir, &new)?;
    numbering::compact(dir, read + new.len(), &live)
}

/// Truncates `path` back to just past its last `\n` (for a chunk marked
/// for a zero runway: the last one before its first NUL byte past the
/// mark); returns the new size.
pub(super) fn cut_torn_tail(path: &Path) -> Result<u64, StorageError> {
    let ctx = |what: &str| format!("cannot {what} chunk {}", path.display());
    let file = File::open(path).map_err(|e| StorageError::io(ctx("open"), e))?;
    let len = file
        .metadata()
        .map_err(|e| StorageError::io(ctx("stat"), e))?
        .len();
    let marked = runway::marked_from(&file).map_err(|e| StorageError::io(ctx("read"), e))?;
    let data = match marked {
        Some(from) => {
            runway::data_len(&file, from, len).map_err(|e| StorageError::io(ctx("read"), e))?
        }
        None => len,
    };
    let keep = whole_lines_len(&file, data).map_err(|e| StorageError::io(ctx("read"), e))?;
    if keep != data {
        tracing::warn!(path = %path.display(), size = data, kept = keep, "cutting a torn tail back to the last whole line");
    }
    if keep != len || marked.is_some() {
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| StorageError::io(ctx("open for truncation"), e))?;
        // The cut is durable before the mark goes: a crash in between
        // leaves a marked file that is cut again, to the same size.
        file.set_len(keep)
            .and_then(|()| file.sync_all())
            .and_then(|()| match marked {
                Some(_) => runway::clear_mark(&file).and_then(|()| file.sync_all()),
                None => Ok(()),
            })
            .map_err(|e| StorageError::io(ctx("truncate"), e))?;
    }
    Ok(keep)
}

/// Length of the prefix of `file` (of `len` bytes) that ends with `\n`.
fn whole_lines_len(file: &File, len: u64) -> std::io::Result<u64> {
    if len == 0 {
        return Ok(0);
    }
    // The common case, a clean file, costs one 1-byte read.
    let mut last = [0u8; 1];
    file.read_exact_at(&mut last, len - 1)?;
    if last[0] == b'\n' {
        return Ok(len);
    }
    let mut end = len;
    let mut buf = vec![0u8; TAIL_SCAN_BYTES as usize];
    while end > 0 {
        let start = end.saturating_sub(TAIL_SCAN_BYTES);
        let block = &mut buf[..(end - start) as usize];
        file.read_exact_at(block, start)?;
        if let Some(pos) = memchr::memrchr(b'\n', block) {
            return Ok(start + pos as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_tails_are_cut_to_the_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("n-chunk000000000");
        for (content, want) in [
            (&b""[..], 0u64),
            (b"a\n", 2),
            (b"a\nbc", 2),
            (b"partial", 0),
            (b"a\nb\n\n", 5),
        ] {
            std::fs::write(&p, content).unwrap();
            assert_eq!(cut_torn_tail(&p).unwrap(), want);
            assert_eq!(std::fs::metadata(&p).unwrap().len(), want);
        }
        // A torn line longer than one scan block.
        let mut big = b"first\n".to_vec();
        big.extend(std::iter::repeat_n(b'x', 3 * TAIL_SCAN_BYTES as usize));
        std::fs::write(&p, &big).unwrap();
        assert_eq!(cut_torn_tail(&p).unwrap(), 6);
    }

    #[test]
    fn marked_chunks_end_at_the_first_nul_past_the_mark() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("n-chunk000000000");
        let file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        // Before the mark a NUL byte is data; past it, a page that never
        // reached the disk (zeros) ends the data even though whole lines
        // follow it.
        file.write_all_at(b"bin\0ary\n", 0).unwrap();
        runway::mark(&file, 8).unwrap();
        runway::extend(&file, 8, 3 * 4096).unwrap();
        file.write_all_at(b"synced\nhalf", 8).unwrap();
        file.write_all_at(b"lost\nlines\n", 2 * 4096).unwrap();
        assert_eq!(cut_torn_tail(&p).unwrap(), 15);
        assert_eq!(std::fs::read(&p).unwrap(), b"bin\0ary\nsynced\n");
        assert_eq!(runway::marked_from(&file).unwrap(), None);
        // Unmarked, the same bytes are kept up to the last line.
        file.write_all_at(b"\0\0\0\0tail\n", 15).unwrap();
        assert_eq!(cut_torn_tail(&p).unwrap(), 24);
    }

    #[test]
    fn scan_finds_categories_and_completes_own_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let cat = dir.path().join("app");
        std::fs::create_dir(&cat).unwrap();
        std::fs::create_dir(dir.path().join(".hidden")).unwrap();
        std::fs::write(cat.join("me-chunk000000000"), b"1\n2\n").unwrap();
        std::fs::write(cat.join("me-chunk000000003"), b"3\n4").unwrap();
        std::fs::write(cat.join("peer-chunk000000007"), b"x\n").unwrap();
        std::fs::write(cat.join("notes.txt"), b"?").unwrap();
        let found = scan(dir.path(), "me").unwrap();
        assert_eq!(found.keys().collect::<Vec<_>>(), ["app"]);
        let app = &found["app"];
        assert_eq!(app.next_index, 4);
        let metas: Vec<_> = app
            .chunks
            .iter()
            .map(|(n, m)| (n.to_string(), m.size, m.complete))
            .collect();
        assert_eq!(
            metas,
            [
                ("me-chunk000000000".to_string(), 4, true),
                ("me-chunk000000003".to_string(), 2, true),
                ("peer-chunk000000007".to_string(), 2, false),
            ]
        );
    }
}
