//! Reads of complete chunks served from a mapping of the file, not copied
//! out of the page cache: an answer's body is the mapped page-cache pages
//! themselves, and the only copy left is the kernel's into the socket.
//! The mappings of the most recently read chunks are kept ([`MappedChunks`],
//! at most [`MAPPED_CHUNKS`]), so a read costs no `open`, `mmap` or
//! `munmap`: one `stat` (is it still the same file?) and one `madvise`.
//!
//! A complete chunk's bytes never change and its file is never cut (only
//! unlinked, which leaves a mapping intact; a file replaced under the same
//! name is seen by its inode and mapped anew), so a mapping of it stays
//! valid. The range of each read is faulted in with `MADV_POPULATE_READ`
//! before anything touches it: an I/O error or a file shorter than its
//! size comes back as an error there, not as `SIGBUS` on first access.
//! After that, only a process that truncated the file under the node, or
//! a page evicted and then failing to read back, could make an access
//! fault. A deleted chunk's mapping is dropped when the node reclaims it
//! ([`MappedChunks::forget`]), so its disk space is freed once the answers
//! sending from it are done.
//!
//! The only `unsafe` code of the server (mmap, munmap, madvise, mincore),
//! allowed here because `scripts/bench overhead` shows what it pays: see
//! `docs/benchmarks.md`.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Complete chunks kept mapped, the most recently read ones. A mapping
/// costs address space, not memory: its pages are the page cache's.
pub(super) const MAPPED_CHUNKS: usize = 64;
/// A mapping not read for this long is dropped at the next miss, so that
/// a chunk deleted behind the node's back does not keep its disk space.
pub(super) const MAPPING_IDLE_DROP_AFTER: Duration = Duration::from_secs(60);

/// A read-only shared mapping of a whole file, unmapped on drop.
struct Mapping {
    base: NonNull<u8>,
    len: usize,
    /// Newlines in each block of [`COUNT_BLOCK_BYTES`], or [`NOT_COUNTED`]:
    /// a block is counted the first time a read faults it in, so a chunk
    /// read by many readers (or again) is scanned once, and a counted
    /// block is known to have been readable.
    lines: OnceLock<Box<[AtomicU16]>>,
}

/// Blocks of a mapping whose newlines are counted together.
const COUNT_BLOCK_BYTES: usize = 4096;
const NOT_COUNTED: u16 = u16::MAX;

// SAFETY: the mapping is read-only and owned by this value; the pointer is
// only read through `as_ref` and unmapped once, in `drop`.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the first `len` bytes of `file` (`len` > 0).
    fn new(file: &File, len: usize) -> std::io::Result<Self> {
        // SAFETY: a new mapping at an address of the kernel's choice;
        // nothing else refers to it.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ,
                rustix::mm::MapFlags::SHARED,
                file,
                0,
            )?
        };
        let base =
            NonNull::new(ptr.cast()).ok_or_else(|| std::io::Error::other("mmap gave null"))?;
        Ok(Mapping {
            base,
            len,
            lines: OnceLock::new(),
        })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `base..base+len` is mapped readable while self lives.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr(), self.len) }
    }

    fn counts(&self) -> &[AtomicU16] {
        self.lines.get_or_init(|| {
            (0..self.len.div_ceil(COUNT_BLOCK_BYTES))
                .map(|_| AtomicU16::new(NOT_COUNTED))
                .collect()
        })
    }

    /// Makes sure the blocks of `offset..offset+len` were faulted in and
    /// counted: faults in and counts those that were not.
    fn ensure_counted(&self, offset: usize, len: usize) -> std::io::Result<()> {
        let counts = self.counts();
        let blocks = offset / COUNT_BLOCK_BYTES..(offset + len).div_ceil(COUNT_BLOCK_BYTES);
        let Some(first) = blocks
            .clone()
            .find(|&b| counts[b].load(Ordering::Acquire) == NOT_COUNTED)
        else {
            return Ok(());
        };
        let from = first * COUNT_BLOCK_BYTES;
        let to = (blocks.end * COUNT_BLOCK_BYTES).min(self.len);
        self.populate(from, to - from)?;
        let bytes = &self.bytes()[from..to];
        for (count, block) in counts[first..blocks.end]
            .iter()
            .zip(bytes.chunks(COUNT_BLOCK_BYTES))
        {
            if count.load(Ordering::Acquire) == NOT_COUNTED {
                let n = memchr::memchr_iter(b'\n', block).count();
                count.store(n as u16, Ordering::Release);
            }
        }
        Ok(())
    }

    /// Whether every block of `offset..offset+len` is counted.
    fn counted(&self, offset: usize, len: usize) -> bool {
        let counts = self.counts();
        (offset / COUNT_BLOCK_BYTES..(offset + len).div_ceil(COUNT_BLOCK_BYTES))
            .all(|b| counts[b].load(Ordering::Acquire) != NOT_COUNTED)
    }

    /// Whether every page of `offset..offset+len` is in memory now
    /// (`mincore`), so that touching it cannot wait for the disk.
    fn resident(&self, offset: usize, len: usize) -> bool {
        const PAGES_PER_CALL: usize = 1024;
        let page = rustix::param::page_size();
        let mut at = offset - offset % page;
        let end = offset + len;
        let mut vec = [0u8; PAGES_PER_CALL];
        while at < end {
            let n = (end - at).div_ceil(page).min(PAGES_PER_CALL);
            // SAFETY: `at` is page-aligned within the mapping, the length
            // within it, and `vec` holds one byte per page asked about.
            let r = unsafe {
                libc::mincore(
                    self.base.as_ptr().add(at).cast(),
                    (n * page).min(self.len - at),
                    vec.as_mut_ptr(),
                )
            };
            if r != 0 || vec[..n].iter().any(|v| v & 1 == 0) {
                return false;
            }
            at += n * page;
        }
        true
    }

    /// Newlines in `offset..offset+len`, all of whose blocks are counted.
    fn count(&self, offset: usize, len: usize) -> u64 {
        let counts = self.counts();
        let end = offset + len;
        let mut n = 0u64;
        let mut at = offset;
        while at < end {
            let b = at / COUNT_BLOCK_BYTES;
            let block_end = ((b + 1) * COUNT_BLOCK_BYTES).min(self.len);
            let upto = block_end.min(end);
            let whole = at == b * COUNT_BLOCK_BYTES && upto == block_end;
            let c = counts[b].load(Ordering::Acquire);
            n += if whole && c != NOT_COUNTED {
                u64::from(c)
            } else {
                memchr::memchr_iter(b'\n', &self.bytes()[at..upto]).count() as u64
            };
            at = upto;
        }
        n
    }

    /// Faults `range` in (here, on a blocking thread): a read error or a
    /// file shorter than the mapping is an errno, never a signal later.
    fn populate(&self, offset: usize, len: usize) -> std::io::Result<()> {
        let page = rustix::param::page_size();
        let start = offset - offset % page;
        // SAFETY: `start..offset+len` lies within the mapping.
        let r = unsafe {
            rustix::mm::madvise(
                self.base.as_ptr().add(start).cast(),
                offset + len - start,
                rustix::mm::Advice::LinuxPopulateRead,
            )
        };
        match r {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::FAULT) => Err(std::io::ErrorKind::UnexpectedEof.into()),
            Err(e) => Err(e.into()),
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: mapped in `Mapping::new` with this base and length.
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// A shared mapping as the owner of a [`Bytes`].
struct Whole(Arc<Mapping>);

impl AsRef<[u8]> for Whole {
    fn as_ref(&self) -> &[u8] {
        self.0.bytes()
    }
}

struct Entry {
    map: Arc<Mapping>,
    /// Identity of the file mapped: a chunk file replaced under the same
    /// name (deleted, copied again) is mapped anew.
    dev: u64,
    ino: u64,
    used: Instant,
}

/// The mappings of recently read complete chunks, by path.
#[derive(Default)]
pub(super) struct MappedChunks {
    entries: Mutex<HashMap<PathBuf, Entry>>,
}

impl std::fmt::Debug for MappedChunks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.entries.lock().map(|e| e.len()).unwrap_or(0);
        f.debug_struct("MappedChunks").field("mapped", &n).finish()
    }
}

/// A complete chunk as mapped, to read from.
pub(super) struct MappedChunk {
    map: Arc<Mapping>,
    /// Whether reads may fault in pages (block on the disk). When not, a
    /// read of a range not all counted and resident fails with
    /// `WouldBlock`.
    may_block: bool,
}

impl MappedChunk {
    /// Exactly `len` bytes from `offset`, sharing the mapping. Blocks
    /// (faults in what was never read): call on a blocking thread.
    pub fn read(&self, len: usize, offset: u64) -> std::io::Result<Bytes> {
        let offset = self.check(len, offset)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        self.ready(offset, len)?;
        Ok(Bytes::from_owner(Whole(self.map.clone())).slice(offset..offset + len))
    }

    /// Newlines in `offset..offset+len`, a range read before (through
    /// [`MappedChunk::read`]), mostly from the counts of its blocks.
    pub fn count_lines(&self, offset: u64, len: usize) -> u64 {
        let Ok(o) = self.check(len, offset) else {
            return 0;
        };
        // After a read of the range its blocks are counted: no system call.
        if self.map.counted(o, len) || self.ready(o, len).is_ok() {
            self.map.count(o, len)
        } else {
            0
        }
    }

    /// Copies `buf.len()` bytes from `offset`.
    pub fn read_into(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let offset = self.check(buf.len(), offset)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.ready(offset, buf.len())?;
        buf.copy_from_slice(&self.map.bytes()[offset..offset + buf.len()]);
        Ok(())
    }

    /// Makes the range safe to touch: counted (so faulted in once without
    /// error) and, when this read may not block, resident now.
    fn ready(&self, offset: usize, len: usize) -> std::io::Result<()> {
        if self.may_block {
            self.map.ensure_counted(offset, len)
        } else if self.map.counted(offset, len) && self.map.resident(offset, len) {
            Ok(())
        } else {
            Err(std::io::ErrorKind::WouldBlock.into())
        }
    }

    fn check(&self, len: usize, offset: u64) -> std::io::Result<usize> {
        match usize::try_from(offset) {
            Ok(o) if o.checked_add(len).is_some_and(|end| end <= self.map.len) => Ok(o),
            _ => Err(std::io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

impl MappedChunks {
    /// The complete chunk file at `path`, which holds `size` (> 0) bytes
    /// that never change, mapped (or as mapped before, when it is the same
    /// file).
    /// Blocks: call on a blocking thread.
    pub fn get(&self, path: &Path, size: u64) -> std::io::Result<MappedChunk> {
        self.mapping(path, size).map(|map| MappedChunk {
            map,
            may_block: true,
        })
    }

    /// The chunk at `path` if it is mapped already, for reads that must not
    /// block (on a runtime thread): they fail with `WouldBlock` unless what
    /// they touch was read before and is still in memory.
    pub fn cached(&self, path: &Path, size: u64) -> Option<MappedChunk> {
        let meta = std::fs::metadata(path).ok()?;
        self.lookup(path, &meta, size, Instant::now())
            .map(|map| MappedChunk {
                map,
                may_block: false,
            })
    }

    /// The mapping kept for `path` if it maps the file `meta` describes,
    /// `size` bytes long; marks it used at `now`.
    fn lookup(
        &self,
        path: &Path,
        meta: &std::fs::Metadata,
        size: u64,
        now: Instant,
    ) -> Option<Arc<Mapping>> {
        let mut entries = self.entries.lock().unwrap();
        let e = entries.get_mut(path)?;
        if (e.dev, e.ino) != (meta.dev(), meta.ino()) || e.map.len as u64 != size {
            return None;
        }
        e.used = now;
        Some(e.map.clone())
    }

    /// The mapping of `path` as it is now, made if needed.
    fn mapping(&self, path: &Path, size: u64) -> std::io::Result<Arc<Mapping>> {
        let meta = std::fs::metadata(path)?;
        let now = Instant::now();
        if let Some(map) = self.lookup(path, &meta, size, now) {
            return Ok(map);
        }
        let len = usize::try_from(size).map_err(std::io::Error::other)?;
        let file = File::open(path)?;
        let opened = file.metadata()?;
        if opened.len() < size {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let map = Arc::new(Mapping::new(&file, len)?);
        let mut entries = self.entries.lock().unwrap();
        entries.retain(|_, e| now.duration_since(e.used) < MAPPING_IDLE_DROP_AFTER);
        while entries.len() >= MAPPED_CHUNKS {
            let oldest = entries
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(p, _)| p.clone());
            match oldest {
                Some(p) => entries.remove(&p),
                None => break,
            };
        }
        entries.insert(
            path.to_owned(),
            Entry {
                map: map.clone(),
                dev: opened.dev(),
                ino: opened.ino(),
                used: now,
            },
        );
        Ok(map)
    }

    /// Drops the mapping of `path` (its chunk was deleted or evicted), so
    /// that the file's space is freed once no answer still sends from it.
    pub fn forget(&self, path: &Path) {
        self.entries.lock().unwrap().remove(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_of(len: usize) -> (tempfile::TempDir, PathBuf, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c");
        let data: Vec<u8> = (0..len as u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        (dir, p, data)
    }

    #[test]
    fn reads_exactly_the_range_at_any_offset() {
        let (_d, p, data) = file_of(300_000);
        let m = MappedChunks::default();
        for (off, len) in [
            (0, 1),
            (0, 300_000),
            (4095, 2),
            (4096, 8192),
            (123_457, 150_000),
        ] {
            let b = m.get(&p, 300_000).unwrap().read(len, off as u64).unwrap();
            assert_eq!(&b[..], &data[off..off + len], "offset {off} len {len}");
            assert_eq!(&b.slice(1..)[..], &data[off + 1..off + len]);
        }
        assert_eq!(
            m.entries.lock().unwrap().len(),
            1,
            "one mapping for every read"
        );
    }

    #[test]
    fn counts_the_lines_of_any_range_once_per_block() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c");
        let mut data = Vec::new();
        for i in 0..20_000u32 {
            data.extend_from_slice(&vec![b'a'; (i % 97) as usize]);
            data.push(b'\n');
        }
        std::fs::write(&p, &data).unwrap();
        let m = MappedChunks::default();
        let c = m.get(&p, data.len() as u64).unwrap();
        let n = data.len();
        for (off, len) in [
            (0, n),
            (1, 5000),
            (4095, 4098),
            (8192, 4096),
            (n - 10, 10),
            (12_345, 0),
        ] {
            let want = memchr::memchr_iter(b'\n', &data[off..off + len]).count() as u64;
            let b = c.read(len, off as u64).unwrap();
            assert_eq!(&b[..], &data[off..off + len]);
            assert_eq!(b.len(), len);
            assert_eq!(
                c.count_lines(off as u64, len),
                want,
                "offset {off} len {len}"
            );
        }
        // Read before and in memory: served without blocking; never read:
        // not.
        let m2 = MappedChunks::default();
        m2.get(&p, n as u64).unwrap().read(100, 0).unwrap();
        let cached = m2.cached(&p, n as u64).unwrap();
        assert_eq!(&cached.read(100, 0).unwrap()[..], &data[..100]);
        assert_eq!(
            cached.read(100, 40_000).unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock
        );
        assert!(
            m2.cached(&p, n as u64 + 1).is_none(),
            "another size is another file"
        );
        // Blocks never read are counted when asked.
        let c = m.get(&p, n as u64).unwrap();
        let fresh = MappedChunks::default().get(&p, n as u64).unwrap();
        assert_eq!(fresh.count_lines(100, 70_000), c.count_lines(100, 70_000));
    }

    #[test]
    fn a_file_shorter_than_its_size_is_an_error_not_a_signal() {
        let (_d, p, _) = file_of(10_000);
        let m = MappedChunks::default();
        // A file shorter than the size known is not mapped.
        let err = m.get(&p, 40_000).err().unwrap();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        let c = m.get(&p, 10_000).unwrap();
        let err = c.read(100, 9_950).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        assert_eq!(c.read(100, 9_900).unwrap().len(), 100);
        let mut one = [0u8; 1];
        c.read_into(&mut one, 9_999).unwrap();
        assert_eq!(one[0], (9_999 % 251) as u8);
    }

    #[test]
    fn a_replaced_file_is_mapped_anew_and_answers_outlive_their_mapping() {
        let (_d, p, data) = file_of(50_000);
        let m = MappedChunks::default();
        let before = m.get(&p, 50_000).unwrap().read(1_000, 0).unwrap();
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, vec![b'y'; 50_000]).unwrap();
        assert_eq!(&m.get(&p, 50_000).unwrap().read(3, 10).unwrap()[..], b"yyy");
        m.forget(&p);
        assert!(m.entries.lock().unwrap().is_empty());
        // The first answer still holds the old file's bytes.
        assert_eq!(&before[..], &data[..1_000]);
    }

    #[test]
    fn keeps_at_most_the_most_recent_mappings() {
        let dir = tempfile::tempdir().unwrap();
        let m = MappedChunks::default();
        for i in 0..MAPPED_CHUNKS + 5 {
            let p = dir.path().join(format!("c{i}"));
            std::fs::write(&p, b"line\n").unwrap();
            assert_eq!(&m.get(&p, 5).unwrap().read(5, 0).unwrap()[..], b"line\n");
        }
        assert_eq!(m.entries.lock().unwrap().len(), MAPPED_CHUNKS);
        assert!(
            !m.entries
                .lock()
                .unwrap()
                .contains_key(&dir.path().join("c0"))
        );
    }
}
