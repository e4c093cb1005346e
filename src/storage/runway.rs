//! Zero runways: group commits that write data only.
//!
//! An `fdatasync` after an append must also make the file's new size
//! durable: an inode write (or a journal commit) after the data, one more
//! device round trip per group commit. When the bytes land inside the file,
//! in blocks already allocated and written, `fdatasync` writes the data and
//! flushes, nothing more.
//!
//! So once an open chunk takes many small synced groups, the writer keeps a
//! short runway of zeros written just past its data (`STEP`, 256 KiB, at a
//! time). The group commit that follows makes the zeros durable together
//! with the data (one contiguous write), and the next groups write over
//! them. The chunk's readable size is tracked in memory as always; readers
//! never see the zeros. When the chunk is completed the zeros are cut off,
//! so a complete chunk holds exactly the posted bytes.
//!
//! # Crash safety
//!
//! Writes over zeros are not ordered by the file system the way appends
//! are: after a power loss, pages written since the last `fdatasync` may
//! read back as zeros anywhere in that stretch. None of it was acknowledged
//! as durable, but start-up must not take a zero page for data. Hence:
//!
//! - before its first runway, a chunk is marked (extended attribute
//!   [`MARKER`], made durable) with the offset `from` where it starts;
//! - from `from` on, the chunk holds no NUL byte: the writer completes the
//!   chunk rather than write a request holding one;
//! - start-up ends a marked chunk's data at its first NUL byte at or past
//!   `from`, cuts back to the last `\n` as for any chunk, and removes the
//!   mark.
//!
//! Everything before the last completed `fdatasync` is whole and, past
//! `from`, NUL-free, so the cut never reaches an acknowledged line.
//!
//! Only ext2/3/4 and XFS are known to overwrite in place without metadata
//! writes; elsewhere (btrfs and ZFS copy on write, tmpfs does not sync) the
//! zeros would be written for nothing, so runways are off.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rustix::fs::XattrFlags;

/// Extended attribute on a chunk file that may hold zeros past its data;
/// its value is the decimal offset from which the data holds no NUL byte.
pub const MARKER: &str = "user.chunkbus.runway";
/// Zeros written ahead at a time. Measured on the project's test machine:
/// 256 KiB to 1 MiB gain the same; 4 MiB makes the group commit that writes
/// them slow enough to lose the gain.
pub(super) const STEP: u64 = 256 * 1024;
/// A new runway is written when less than this is left.
pub(super) const LOW: u64 = STEP / 4;

static ZEROS: [u8; STEP as usize] = [0; STEP as usize];

const EXT_SUPER_MAGIC: u64 = 0xEF53;
const XFS_SUPER_MAGIC: u64 = 0x5846_5342;
/// Read size of the search for the first NUL byte at start-up.
const SCAN_BYTES: usize = 1 << 20;

/// True when `dir` is on a file system where writing over zeros spares the
/// metadata write (ext2/3/4, XFS) and that keeps user extended attributes.
pub fn supported(dir: &Path) -> bool {
    let Ok(st) = rustix::fs::statfs(dir) else {
        return false;
    };
    let magic = st.f_type as u64;
    if magic != EXT_SUPER_MAGIC && magic != XFS_SUPER_MAGIC {
        return false;
    }
    // Mounted without user_xattr, or otherwise refused: no mark, no zeros.
    let probe = dir.join(".xattr-probe");
    let ok = File::create(&probe)
        .and_then(|f| {
            rustix::fs::fsetxattr(&f, MARKER, b"0", XattrFlags::empty()).map_err(io::Error::from)
        })
        .is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

/// Marks `file` as NUL-free from `from` on, durably. Blocking.
pub(super) fn mark(file: &File, from: u64) -> io::Result<()> {
    rustix::fs::fsetxattr(
        file,
        MARKER,
        from.to_string().as_bytes(),
        XattrFlags::empty(),
    )?;
    file.sync_all()
}

/// The offset recorded by [`mark`], if `file` is marked.
pub(super) fn marked_from(file: &File) -> io::Result<Option<u64>> {
    let mut buf = [0u8; 24];
    match rustix::fs::fgetxattr(file, MARKER, &mut buf[..]) {
        Ok(n) => std::str::from_utf8(&buf[..n])
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Some)
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, format!("bad {MARKER} value"))
            }),
        Err(rustix::io::Errno::NODATA | rustix::io::Errno::NOTSUP) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Removes the mark; absent already is fine.
pub(super) fn clear_mark(file: &File) -> io::Result<()> {
    match rustix::fs::fremovexattr(file, MARKER) {
        Ok(()) | Err(rustix::io::Errno::NODATA) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Writes up to [`STEP`] zeros at `at`, not past `limit`; returns the new
/// end of the runway.
pub(super) fn extend(file: &File, at: u64, limit: u64) -> io::Result<u64> {
    let end = (at + STEP).min(limit.max(at));
    file.write_all_at(&ZEROS[..(end - at) as usize], at)?;
    Ok(end)
}

/// Where the data of a file of `len` bytes marked from `from` ends: at its
/// first NUL byte at or past `from` (see the module documentation).
pub(super) fn data_len(file: &File, from: u64, len: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; SCAN_BYTES];
    let mut at = from.min(len);
    while at < len {
        let n = (len - at).min(SCAN_BYTES as u64) as usize;
        file.read_exact_at(&mut buf[..n], at)?;
        if let Some(pos) = memchr::memchr(0, &buf[..n]) {
            return Ok(at + pos as u64);
        }
        at += n as u64;
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_round_trip_and_data_ends_at_the_first_nul_past_the_mark() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(dir.path().join("f"))
            .unwrap();
        assert_eq!(marked_from(&file).unwrap(), None);
        // Data with a NUL before the mark, then NUL-free data, then zeros.
        file.write_all_at(b"a\0b\nccc\n", 0).unwrap();
        mark(&file, 4).unwrap();
        assert_eq!(marked_from(&file).unwrap(), Some(4));
        assert_eq!(extend(&file, 8, u64::MAX).unwrap(), 8 + STEP);
        assert_eq!(file.metadata().unwrap().len(), 8 + STEP);
        assert_eq!(data_len(&file, 4, 8 + STEP).unwrap(), 8);
        // Overwriting the zeros moves the end; a zero page inside ends it.
        file.write_all_at(b"dd\n", 8).unwrap();
        file.write_all_at(b"ee\n", 8 + 4096).unwrap();
        assert_eq!(data_len(&file, 4, 8 + STEP).unwrap(), 11);
        // Without zeros the data runs to the end.
        assert_eq!(data_len(&file, 4, 11).unwrap(), 11);
        clear_mark(&file).unwrap();
        clear_mark(&file).unwrap();
        assert_eq!(marked_from(&file).unwrap(), None);
    }

    #[test]
    fn runways_stop_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let file = File::create(dir.path().join("f")).unwrap();
        assert_eq!(extend(&file, 100, 1000).unwrap(), 1000);
        assert_eq!(extend(&file, 1000, 1000).unwrap(), 1000);
        assert_eq!(file.metadata().unwrap().len(), 1000);
    }

    #[test]
    fn support_follows_the_file_system_and_leaves_no_probe() {
        let dir = tempfile::tempdir().unwrap();
        let magic = rustix::fs::statfs(dir.path()).unwrap().f_type as u64;
        let in_place = magic == EXT_SUPER_MAGIC || magic == XFS_SUPER_MAGIC;
        assert_eq!(supported(dir.path()), in_place);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
