//! Reading whole lines from a chunk, held in a local file or in the object
//! store.

use std::fs::File;
use std::os::unix::fs::FileExt;

use bytes::Bytes;

use super::StorageError;

/// Positional reads of a chunk's bytes.
pub(super) trait ReadAt {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;

    /// Exactly `len` bytes from `offset`, in a buffer of their own.
    fn read_vec_at(&self, len: usize, offset: u64) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    /// Exactly `len` bytes from `offset`, copied or shared.
    fn read_bytes_at(&self, len: usize, offset: u64) -> std::io::Result<Bytes> {
        self.read_vec_at(len, offset).map(Bytes::from)
    }

    /// Lines in `data`, which was read from `offset`.
    fn count_lines(&self, data: &[u8], _offset: u64) -> u64 {
        memchr::memchr_iter(b'\n', data).count() as u64
    }
}

impl ReadAt for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }

    /// Reads into the buffer's spare capacity: the bytes are not zeroed
    /// first (a pass over a megabyte per read, as long as the read itself
    /// from the page cache).
    fn read_vec_at(&self, len: usize, offset: u64) -> std::io::Result<Vec<u8>> {
        let mut buf = Vec::with_capacity(len);
        while buf.len() < len {
            let at = offset + buf.len() as u64;
            match rustix::io::pread(self, rustix::buffer::spare_capacity(&mut buf), at) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // The capacity may exceed `len`, and a read fill it.
        buf.truncate(len);
        Ok(buf)
    }
}

/// A complete chunk's reads share its mapping's pages.
impl ReadAt for super::mapped::MappedChunk {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.read_into(buf, offset)
    }

    fn read_bytes_at(&self, len: usize, offset: u64) -> std::io::Result<Bytes> {
        self.read(len, offset)
    }

    fn count_lines(&self, data: &[u8], offset: u64) -> u64 {
        super::mapped::MappedChunk::count_lines(self, offset, data.len())
    }
}

/// Reads whole lines of `file` starting at `offset`.
///
/// `size` is the number of bytes known to hold whole lines. At most
/// `max_bytes` are returned, except that a single line longer than that is
/// returned whole. Returns the bytes and the offset just past them.
pub(super) fn read_lines(
    file: &(impl ReadAt + ?Sized),
    chunk: &str,
    offset: u64,
    size: u64,
    max_bytes: u64,
) -> Result<(Bytes, u64), StorageError> {
    if offset > size {
        return Err(StorageError::OffsetPastEnd {
            chunk: chunk.to_owned(),
            offset,
            size,
        });
    }
    let io = |e| StorageError::io(format!("cannot read chunk {chunk}"), e);
    // One extra byte in front tells whether `offset` starts a line.
    let lead = u64::from(offset > 0);
    let start = offset - lead;
    let mut want = (size - offset).min(max_bytes.max(1));
    let mut first_round = true;
    loop {
        let buf = file
            .read_bytes_at((lead + want) as usize, start)
            .map_err(io)?;
        if lead == 1 && buf[0] != b'\n' {
            return Err(StorageError::NotLineBoundary {
                chunk: chunk.to_owned(),
                offset,
            });
        }
        let body = &buf[lead as usize..];
        if body.is_empty() {
            return Ok((Bytes::new(), offset));
        }
        // Within max_bytes: as many whole lines as fit. Beyond it: exactly
        // the one long line that did not fit.
        let found = if first_round {
            memchr::memrchr(b'\n', body)
        } else {
            memchr::memchr(b'\n', body)
        };
        first_round = false;
        if let Some(last) = found {
            let end = lead as usize + last + 1;
            let next = offset + last as u64 + 1;
            return Ok((buf.slice(lead as usize..end), next));
        }
        // A single line longer than max_bytes: read on until its end. The
        // bytes up to `size` always end with a newline, so this terminates.
        if offset + want >= size {
            return Err(StorageError::io(
                format!("chunk {chunk} does not end with a newline"),
                std::io::Error::from(std::io::ErrorKind::InvalidData),
            ));
        }
        want = (want * 2).min(size - offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(content: &[u8]) -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c");
        std::fs::write(&p, content).unwrap();
        (dir, File::open(&p).unwrap())
    }

    #[test]
    fn reads_into_spare_capacity_exactly() {
        let data = b"0123456789";
        let (_d, f) = setup(data);
        assert_eq!(f.read_vec_at(4, 3).unwrap(), b"3456");
        assert_eq!(f.read_vec_at(0, 10).unwrap(), b"");
        let past = f.read_vec_at(5, 8).unwrap_err();
        assert_eq!(past.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn returns_whole_lines_within_max_bytes() {
        let data = b"aa\nbbbb\ncc\n";
        let (_d, p) = setup(data);
        let size = data.len() as u64;
        let (b, next) = read_lines(&p, "c", 0, size, 100).unwrap();
        assert_eq!((&b[..], next), (&data[..], size));
        let (b, next) = read_lines(&p, "c", 0, size, 8).unwrap();
        assert_eq!((&b[..], next), (&b"aa\nbbbb\n"[..], 8));
        let (b, next) = read_lines(&p, "c", 3, size, 6).unwrap();
        assert_eq!((&b[..], next), (&b"bbbb\n"[..], 8));
        let (b, next) = read_lines(&p, "c", size, size, 6).unwrap();
        assert_eq!((&b[..], next), (&b""[..], size));
    }

    #[test]
    fn a_long_line_comes_back_whole() {
        let mut data = vec![b'x'; 10_000];
        data.push(b'\n');
        data.extend_from_slice(b"y\n");
        let (_d, p) = setup(&data);
        let (b, next) = read_lines(&p, "c", 0, data.len() as u64, 10).unwrap();
        assert_eq!(b.len(), 10_001);
        assert_eq!(next, 10_001);
    }

    #[test]
    fn rejects_bad_offsets() {
        let data = b"aa\nbb\n";
        let (_d, p) = setup(data);
        assert!(matches!(
            read_lines(&p, "c", 1, 6, 10),
            Err(StorageError::NotLineBoundary { offset: 1, .. })
        ));
        assert!(matches!(
            read_lines(&p, "c", 7, 6, 10),
            Err(StorageError::OffsetPastEnd {
                offset: 7,
                size: 6,
                ..
            })
        ));
    }
}
