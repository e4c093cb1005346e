//! Reading Kafka requests from untrusted bytes.
//!
//! The `kafka-protocol` crate encodes this node's responses, but its
//! decoders size allocations by counts read from the wire
//! (`Vec::with_capacity(n)` for an array, `IndexMap::with_capacity(n)` for
//! record headers), so one frame could make the process abort. Requests
//! are therefore read here, field by field, with every count checked
//! against the bytes that remain before anything is allocated: an element
//! takes at least one byte on the wire.

use bytes::{Buf, Bytes};

/// Why a request could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed request: {0}")]
pub struct Malformed(pub String);

/// A cursor over one request frame.
#[derive(Debug)]
pub struct Reader {
    buf: Bytes,
}

impl Reader {
    pub fn new(buf: Bytes) -> Self {
        Self { buf }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.remaining()
    }

    fn need(&self, n: usize, what: &str) -> Result<(), Malformed> {
        if self.buf.remaining() < n {
            return Err(Malformed(format!("{what} is cut short")));
        }
        Ok(())
    }

    pub fn i8(&mut self) -> Result<i8, Malformed> {
        self.need(1, "an int8")?;
        Ok(self.buf.get_i8())
    }

    pub fn bool(&mut self) -> Result<bool, Malformed> {
        Ok(self.i8()? != 0)
    }

    pub fn i16(&mut self) -> Result<i16, Malformed> {
        self.need(2, "an int16")?;
        Ok(self.buf.get_i16())
    }

    pub fn i32(&mut self) -> Result<i32, Malformed> {
        self.need(4, "an int32")?;
        Ok(self.buf.get_i32())
    }

    pub fn i64(&mut self) -> Result<i64, Malformed> {
        self.need(8, "an int64")?;
        Ok(self.buf.get_i64())
    }

    /// An unsigned LEB128 varint of at most 32 bits.
    pub fn uvarint(&mut self) -> Result<u32, Malformed> {
        let v = self.uvarlong()?;
        u32::try_from(v).map_err(|_| Malformed("a varint is out of range".into()))
    }

    /// An unsigned LEB128 varint of at most 64 bits.
    pub fn uvarlong(&mut self) -> Result<u64, Malformed> {
        let mut v: u64 = 0;
        for shift in (0..70).step_by(7) {
            self.need(1, "a varint")?;
            let b = self.buf.get_u8();
            if shift == 63 && b > 1 {
                break;
            }
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Malformed("a varint is too long".into()))
    }

    /// A zigzag varint of at most 32 bits.
    pub fn varint(&mut self) -> Result<i32, Malformed> {
        let v = self.uvarint()?;
        Ok(((v >> 1) as i32) ^ -((v & 1) as i32))
    }

    /// A zigzag varint of at most 64 bits.
    pub fn varlong(&mut self) -> Result<i64, Malformed> {
        let v = self.uvarlong()?;
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }

    /// `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<Bytes, Malformed> {
        self.need(n, "a byte string")?;
        Ok(self.buf.split_to(n))
    }

    /// A nullable string with an int16 length (-1: null).
    pub fn nullable_string(&mut self) -> Result<Option<String>, Malformed> {
        let n = self.i16()?;
        if n < 0 {
            return Ok(None);
        }
        self.utf8(n as usize).map(Some)
    }

    /// A string with an int16 length.
    pub fn string(&mut self) -> Result<String, Malformed> {
        self.nullable_string()?
            .ok_or_else(|| Malformed("a string is null".into()))
    }

    /// A nullable compact string (unsigned varint length + 1; 0: null).
    pub fn compact_nullable_string(&mut self) -> Result<Option<String>, Malformed> {
        match self.uvarint()? {
            0 => Ok(None),
            n => self.utf8(n as usize - 1).map(Some),
        }
    }

    /// A compact string.
    pub fn compact_string(&mut self) -> Result<String, Malformed> {
        self.compact_nullable_string()?
            .ok_or_else(|| Malformed("a string is null".into()))
    }

    fn utf8(&mut self, n: usize) -> Result<String, Malformed> {
        let b = self.bytes(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| Malformed("a string is not UTF-8".into()))
    }

    /// Nullable bytes with an int32 length (-1: null).
    pub fn nullable_bytes(&mut self) -> Result<Option<Bytes>, Malformed> {
        let n = self.i32()?;
        if n < 0 {
            return Ok(None);
        }
        self.bytes(n as usize).map(Some)
    }

    /// The element count of an array with an int32 count (-1: null, read
    /// as empty), checked against the bytes left.
    pub fn array_len(&mut self) -> Result<usize, Malformed> {
        Ok(self.nullable_array_len()?.unwrap_or(0))
    }

    /// The element count of a nullable array with an int32 count.
    pub fn nullable_array_len(&mut self) -> Result<Option<usize>, Malformed> {
        let n = self.i32()?;
        if n < 0 {
            return Ok(None);
        }
        self.plausible(n as usize).map(Some)
    }

    /// The element count of a compact array (count + 1; 0: null).
    pub fn compact_array_len(&mut self) -> Result<usize, Malformed> {
        match self.uvarint()? {
            0 => Ok(0),
            n => self.plausible(n as usize - 1),
        }
    }

    /// `n` elements need at least `n` bytes.
    fn plausible(&self, n: usize) -> Result<usize, Malformed> {
        if n > self.remaining() {
            return Err(Malformed(format!(
                "an array claims {n} elements in {} bytes",
                self.remaining()
            )));
        }
        Ok(n)
    }

    /// Skips a tagged-field section (flexible versions).
    pub fn skip_tagged_fields(&mut self) -> Result<(), Malformed> {
        let n = self.uvarint()?;
        self.plausible(n as usize)?;
        for _ in 0..n {
            let _tag = self.uvarint()?;
            let len = self.uvarint()? as usize;
            self.bytes(len)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_read_as_kafka_writes_them() {
        // 300 = 0b1_0010_1100: LEB128 0xac 0x02; zigzag(-1) = 1, zigzag(1) = 2.
        let mut r = Reader::new(Bytes::from_static(&[0xac, 0x02, 0x01, 0x02, 0x00]));
        assert_eq!(r.uvarint().unwrap(), 300);
        assert_eq!(r.varint().unwrap(), -1);
        assert_eq!(r.varint().unwrap(), 1);
        assert_eq!(r.varlong().unwrap(), 0);
        assert!(r.i8().is_err());
        let mut long = Reader::new(Bytes::from(vec![0xff; 11]));
        assert!(long.uvarlong().is_err());
        let mut big = Reader::new(Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 0x1f]));
        assert!(big.uvarint().is_err(), "more than 32 bits");
    }

    #[test]
    fn borrowed_varints_read_as_kafka_writes_them() {
        // One byte (the inline case), two bytes, zigzag, then the end.
        let mut r = SliceReader::new(&[0x05, 0xac, 0x02, 0x01, 0x02, 0x7f]);
        assert_eq!(r.uvarlong().unwrap(), 5);
        assert_eq!(r.uvarlong().unwrap(), 300);
        assert_eq!(r.varint().unwrap(), -1);
        assert_eq!(r.varlong().unwrap(), 1);
        assert_eq!(r.varint().unwrap(), -64);
        assert!(r.uvarlong().is_err(), "nothing left");
        assert!(r.i8().is_err());
        assert!(SliceReader::new(&[0x80]).uvarlong().is_err(), "cut short");
        assert!(
            SliceReader::new(&[0xff; 11]).uvarlong().is_err(),
            "too long"
        );
        let max = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert_eq!(SliceReader::new(&max).uvarlong().unwrap(), u64::MAX);
        let big = [0xff, 0xff, 0xff, 0xff, 0x1f];
        assert!(
            SliceReader::new(&big).varint().is_err(),
            "more than 32 bits"
        );
        let mut t = SliceReader::new(b"abc");
        assert_eq!(t.take(2).unwrap(), b"ab");
        assert!(t.take(2).is_err());
        assert_eq!(t.remaining(), 1);
    }

    #[test]
    fn counts_larger_than_the_frame_are_refused_before_any_allocation() {
        let mut r = Reader::new(Bytes::from_static(&[0x7f, 0xff, 0xff, 0xff, 0, 0]));
        let e = r.array_len().unwrap_err();
        assert!(e.0.contains("claims 2147483647 elements"), "{e}");
        let mut c = Reader::new(Bytes::from_static(&[0x80, 0x80, 0x04]));
        assert!(c.compact_array_len().is_err());
        let mut s = Reader::new(Bytes::from_static(&[0x00, 0x05, b'a']));
        assert!(s.string().is_err());
        let mut null = Reader::new(Bytes::from_static(&[0xff, 0xff, 0xff, 0xff]));
        assert_eq!(null.array_len().unwrap(), 0);
    }
}

/// A cursor over borrowed bytes, for the records of a batch: the same
/// checks as [`Reader`], without a reference count per field.
#[derive(Debug)]
pub struct SliceReader<'a> {
    buf: &'a [u8],
}

impl<'a> SliceReader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// The next `n` bytes.
    #[inline]
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.buf.len() < n {
            return Err(cut_short());
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    #[inline]
    pub fn i8(&mut self) -> Result<i8, Malformed> {
        Ok(self.take(1)?[0] as i8)
    }

    /// An unsigned LEB128 varint of at most 64 bits. Most varints of a
    /// record (attributes, deltas, lengths under 128) are one byte: that
    /// case is read inline, the rest by `long_uvarlong`.
    #[inline]
    pub fn uvarlong(&mut self) -> Result<u64, Malformed> {
        match self.buf.split_first() {
            Some((&b, rest)) if b < 0x80 => {
                self.buf = rest;
                Ok(u64::from(b))
            }
            _ => self.long_uvarlong(),
        }
    }

    fn long_uvarlong(&mut self) -> Result<u64, Malformed> {
        let mut v: u64 = 0;
        for (i, &b) in self.buf.iter().enumerate().take(10) {
            if i == 9 && b > 1 {
                break;
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                self.buf = &self.buf[i + 1..];
                return Ok(v);
            }
        }
        Err(Malformed("a varint is too long or cut short".into()))
    }

    /// A zigzag varint of at most 32 bits.
    #[inline]
    pub fn varint(&mut self) -> Result<i32, Malformed> {
        let v = u32::try_from(self.uvarlong()?).map_err(|_| out_of_range())?;
        Ok(((v >> 1) as i32) ^ -((v & 1) as i32))
    }

    /// A zigzag varint of at most 64 bits.
    #[inline]
    pub fn varlong(&mut self) -> Result<i64, Malformed> {
        let v = self.uvarlong()?;
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }
}

#[cold]
fn cut_short() -> Malformed {
    Malformed("a byte string is cut short".into())
}

#[cold]
fn out_of_range() -> Malformed {
    Malformed("a varint is out of range".into())
}
