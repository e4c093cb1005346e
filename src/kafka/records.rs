//! Record batches (message format v2): the lines in a produce request, and
//! the batch a fetch answers with.
//!
//! Produced batches are read here rather than by the protocol crate (see
//! `wire`): the record count and every length are checked against the
//! bytes that remain, and decompression stops at a bound, so a small
//! compressed batch cannot claim or inflate to more than the node allows.

use std::io::Read;

use bytes::{Buf, Bytes, BytesMut};

use super::producers::Sequence;
use super::wire::{Malformed, Reader, SliceReader};

/// Why a produced batch is refused (each maps to a Kafka error code).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// Not a well-formed v2 batch, or its CRC does not match.
    #[error("corrupt record batch: {0}")]
    Corrupt(String),
    /// Message format v0/v1.
    #[error("record batches of magic {0} are not supported (v2 only)")]
    OldFormat(i8),
    /// A compression codec this node does not know.
    #[error("unknown compression codec {0}")]
    Compression(i16),
    /// A record whose value cannot be a line.
    #[error("{0}")]
    InvalidRecord(String),
    /// The batch holds, or inflates to, more than the node takes at once.
    #[error("the record batch decodes to more than {0} bytes")]
    TooLarge(u64),
}

impl From<Malformed> for BatchError {
    fn from(e: Malformed) -> Self {
        BatchError::Corrupt(e.0)
    }
}

/// What a produce request carries for one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Produced {
    /// Every record's value, then `\n`.
    pub lines: Bytes,
    /// How many records.
    pub count: u64,
    /// Set when an idempotent producer sent the batch.
    pub sequence: Option<Sequence>,
}

/// The values of every record of the batches in `data`, in order, as
/// lines (each value checked to be one line of at most `max_line` bytes,
/// then `\n`), and how many; decoding stops past `max_decoded` bytes of
/// records. An idempotent producer's records must come in one batch (as
/// Kafka requires).
pub fn produced_lines(
    data: Bytes,
    max_decoded: u64,
    max_line: u64,
) -> Result<Produced, BatchError> {
    let mut r = Reader::new(data);
    let mut lines = BytesMut::new();
    let mut count = 0u64;
    let mut decoded = 0u64;
    let mut sequence = None;
    let mut batches = 0;
    while r.remaining() > 0 {
        batches += 1;
        let _base_offset = r.i64()?;
        let len = r.i32()?;
        if len < 0 {
            return Err(BatchError::Corrupt(format!("negative batch length {len}")));
        }
        let mut batch = Reader::new(r.bytes(len as usize)?);
        let _leader_epoch = batch.i32()?;
        let magic = batch.i8()?;
        if magic != 2 {
            return Err(BatchError::OldFormat(magic));
        }
        let crc = batch.i32()? as u32;
        let rest = batch.bytes(batch.remaining())?;
        if crc32c::crc32c(&rest) != crc {
            return Err(BatchError::Corrupt("CRC mismatch".into()));
        }
        let mut batch = Reader::new(rest);
        let attributes = batch.i16()?;
        let _last_offset_delta = batch.i32()?;
        let _first_timestamp = batch.i64()?;
        let _max_timestamp = batch.i64()?;
        let producer_id = batch.i64()?;
        let producer_epoch = batch.i16()?;
        let base_sequence = batch.i32()?;
        let records_claimed = batch.i32()?;
        if attributes & (1 << 5) != 0 {
            // A control batch (transaction markers): no user records.
            continue;
        }
        if producer_id >= 0 {
            if batches > 1 || r.remaining() > 0 {
                return Err(BatchError::InvalidRecord(
                    "an idempotent producer's records come in exactly one batch".into(),
                ));
            }
            if base_sequence < 0 || records_claimed <= 0 {
                return Err(BatchError::Corrupt(format!(
                    "base sequence {base_sequence} of {records_claimed} records"
                )));
            }
            sequence = Some(Sequence::of_batch(
                producer_id,
                producer_epoch,
                base_sequence,
                records_claimed as u64,
            ));
        }
        let budget = max_decoded.saturating_sub(decoded);
        let records = decompress(attributes & 0x7, batch.bytes(batch.remaining())?, budget)?;
        decoded += records.len() as u64;
        // A record takes at least 7 bytes: the count is checked before
        // anything is sized by it.
        if records_claimed < 0 || records_claimed as usize > records.len() / 7 {
            return Err(BatchError::Corrupt(format!(
                "{records_claimed} records claimed in {} bytes",
                records.len()
            )));
        }
        let mut rr = SliceReader::new(&records);
        lines.reserve(rr.remaining());
        let start = lines.len();
        for _ in 0..records_claimed {
            record_line(&mut rr, max_line, &mut lines)?;
        }
        // One newline per record, the one written after its value: any
        // other was in a value (counted once for the batch, not per value).
        if memchr::memchr_iter(b'\n', &lines[start..]).count() != records_claimed as usize {
            return Err(BatchError::InvalidRecord(
                "a record value holds a newline: every record is stored as one line".into(),
            ));
        }
        count += records_claimed as u64;
        if rr.remaining() != 0 {
            return Err(BatchError::Corrupt("bytes past the last record".into()));
        }
    }
    Ok(Produced {
        lines: lines.freeze(),
        count,
        sequence,
    })
}

/// Reads one record and appends its value and `\n` to `out` (a null value
/// is an empty line); the caller checks the value held no newline.
fn record_line(r: &mut SliceReader, max_line: u64, out: &mut BytesMut) -> Result<(), BatchError> {
    let len = r.varint()?;
    if len < 0 {
        return Err(BatchError::Corrupt("negative record length".into()));
    }
    let mut rec = SliceReader::new(r.take(len as usize)?);
    let _attributes = rec.i8()?;
    let _timestamp_delta = rec.varlong()?;
    let _offset_delta = rec.varint()?;
    let key_len = rec.varint()?;
    if key_len >= 0 {
        rec.take(key_len as usize)?;
    }
    let value_len = rec.varint()?;
    let value: &[u8] = if value_len >= 0 {
        rec.take(value_len as usize)?
    } else {
        &[]
    };
    // Headers are not stored; they are read to check the record is whole.
    let headers = rec.varint()?;
    if headers < 0 || headers as usize > rec.remaining() {
        return Err(BatchError::Corrupt("bad header count".into()));
    }
    for _ in 0..headers {
        let k = rec.varint()?;
        rec.take(usize::try_from(k).map_err(|_| BatchError::Corrupt("bad header".into()))?)?;
        let v = rec.varint()?;
        if v >= 0 {
            rec.take(v as usize)?;
        }
    }
    if value.len() as u64 > max_line {
        return Err(BatchError::InvalidRecord(format!(
            "a record value of {} bytes is longer than --max-line-bytes ({max_line})",
            value.len()
        )));
    }
    out.extend_from_slice(value);
    out.extend_from_slice(b"\n");
    Ok(())
}

/// The records section of a batch, decompressed into at most `budget`
/// bytes.
fn decompress(codec: i16, data: Bytes, budget: u64) -> Result<Bytes, BatchError> {
    let too_large = || BatchError::TooLarge(budget);
    let corrupt = |e: std::io::Error| BatchError::Corrupt(format!("cannot decompress: {e}"));
    let bounded = |reader: &mut dyn Read| -> Result<Bytes, BatchError> {
        let mut out = Vec::new();
        reader
            .take(budget.saturating_add(1))
            .read_to_end(&mut out)
            .map_err(corrupt)?;
        if out.len() as u64 > budget {
            return Err(too_large());
        }
        Ok(Bytes::from(out))
    };
    match codec {
        0 if data.len() as u64 > budget => Err(too_large()),
        0 => Ok(data),
        1 => bounded(&mut flate2::read::GzDecoder::new(data.reader())),
        2 => snappy(data, budget),
        3 => bounded(&mut lz4_flex::frame::FrameDecoder::new(data.reader())),
        4 => bounded(&mut zstd::stream::read::Decoder::new(data.reader()).map_err(corrupt)?),
        other => Err(BatchError::Compression(other)),
    }
}

/// Java clients frame snappy as xerial's stream (a magic header, then
/// blocks each with a 4-byte length); librdkafka sends it raw.
fn snappy(data: Bytes, budget: u64) -> Result<Bytes, BatchError> {
    const XERIAL: &[u8] = b"\x82SNAPPY\x00";
    let corrupt = |e: snap::Error| BatchError::Corrupt(format!("cannot decompress: {e}"));
    let mut out = Vec::new();
    let block = |compressed: &[u8], out: &mut Vec<u8>| -> Result<(), BatchError> {
        let n = snap::raw::decompress_len(compressed).map_err(corrupt)?;
        if (out.len() + n) as u64 > budget {
            return Err(BatchError::TooLarge(budget));
        }
        let at = out.len();
        out.resize(at + n, 0);
        snap::raw::Decoder::new()
            .decompress(compressed, &mut out[at..])
            .map_err(corrupt)?;
        Ok(())
    };
    if data.starts_with(XERIAL) {
        let mut r = Reader::new(data.slice(16.min(data.len())..));
        while r.remaining() > 0 {
            let len = r.i32()?;
            let b = r.bytes(
                usize::try_from(len)
                    .map_err(|_| BatchError::Corrupt("negative snappy block length".into()))?,
            )?;
            block(&b, &mut out)?;
        }
    } else {
        block(&data, &mut out)?;
    }
    Ok(Bytes::from(out))
}

/// One batch holding `lines` (each ending with `\n`, which is not part
/// of the record's value) as records `first_offset`, `first_offset + 1`...,
/// all stamped `timestamp_ms`, uncompressed, without producer id; returns
/// how many records it holds.
///
/// Written here in one pass over the lines rather than through the
/// protocol crate's encoder, which builds a record struct per line: that
/// cost about 4.5 CPU-seconds per GiB fetched (`scripts/bench kafka`). The
/// tests read what is written here back with the crate's decoder.
pub fn encode_batch(out: &mut BytesMut, first_offset: i64, timestamp_ms: i64, lines: &[u8]) -> u64 {
    use bytes::BufMut;
    if lines.is_empty() {
        return 0;
    }
    let start = out.len();
    out.reserve(61 + lines.len() + lines.len() / 8 + 16);
    out.put_i64(first_offset);
    out.put_i32(0); // batch length, below
    out.put_i32(0); // partition leader epoch
    out.put_i8(2); // magic
    let crc_at = out.len();
    out.put_u32(0); // CRC-32C of the rest, below
    out.put_i16(0); // attributes: no compression, create time
    let last_delta_at = out.len();
    out.put_i32(0); // last offset delta, below
    out.put_i64(timestamp_ms); // first timestamp
    out.put_i64(timestamp_ms); // max timestamp
    out.put_i64(-1); // producer id
    out.put_i16(-1); // producer epoch
    out.put_i32(-1); // base sequence
    let count_at = out.len();
    out.put_i32(0); // record count, below
    let mut count: i32 = 0;
    let mut at = 0;
    for end in memchr::memchr_iter(b'\n', lines) {
        let value = &lines[at..end];
        at = end + 1;
        // attributes, timestamp delta 0, offset delta, key -1 (null),
        // value length, value, no headers.
        let mut head = [0u8; 12];
        let mut n = 0;
        head[n] = 0;
        n += 1;
        head[n] = 0;
        n += 1;
        n += put_varint(&mut head[n..], i64::from(count));
        n += put_varint(&mut head[n..], -1);
        n += put_varint(&mut head[n..], value.len() as i64);
        let body = n + value.len() + 1;
        let mut len = [0u8; 10];
        let l = put_varint(&mut len, body as i64);
        out.put_slice(&len[..l]);
        out.put_slice(&head[..n]);
        out.put_slice(value);
        out.put_u8(0);
        count += 1;
    }
    let batch_len = (out.len() - start - 12) as i32;
    out[start + 8..start + 12].copy_from_slice(&batch_len.to_be_bytes());
    out[last_delta_at..last_delta_at + 4].copy_from_slice(&(count - 1).to_be_bytes());
    out[count_at..count_at + 4].copy_from_slice(&count.to_be_bytes());
    let crc = crc32c::crc32c(&out[crc_at + 4..]);
    out[crc_at..crc_at + 4].copy_from_slice(&crc.to_be_bytes());
    count as u64
}

/// Writes `v` as a zigzag varint; returns the bytes written (at most 10).
fn put_varint(buf: &mut [u8], v: i64) -> usize {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    let mut n = 0;
    loop {
        let b = (z & 0x7f) as u8;
        z >>= 7;
        if z == 0 {
            buf[n] = b;
            return n + 1;
        }
        buf[n] = b | 0x80;
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use kafka_protocol::records::{
        Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
    };

    use super::*;

    fn batch(values: &[&[u8]], compression: Compression) -> Bytes {
        let records: Vec<Record> = values
            .iter()
            .enumerate()
            .map(|(i, v)| Record {
                transactional: false,
                control: false,
                delete_horizon: false,
                partition_leader_epoch: 0,
                producer_id: -1,
                producer_epoch: -1,
                timestamp_type: TimestampType::Creation,
                offset: i as i64,
                sequence: -1,
                timestamp: 0,
                key: Some(Bytes::from_static(b"k")),
                value: Some(Bytes::copy_from_slice(v)),
                headers: Default::default(),
            })
            .collect();
        let mut out = BytesMut::new();
        let options = RecordEncodeOptions {
            version: 2,
            compression,
        };
        RecordBatchEncoder::encode(&mut out, &records, &options).unwrap();
        out.freeze()
    }

    #[test]
    fn values_come_back_in_order_and_fetch_batches_round_trip() {
        let data = batch(&[b"one", b"", b"three"], Compression::None);
        let p = produced_lines(data, 1 << 20, 100).unwrap();
        let (lines, count) = (p.lines, p.count);
        assert_eq!((&lines[..], count), (&b"one\n\nthree\n"[..], 3));
        let mut out = BytesMut::new();
        let long = "x".repeat(300);
        let lines = format!("a\nbc\n\n{long}\n");
        assert_eq!(encode_batch(&mut out, 40, 7, lines.as_bytes()), 4);
        let mut buf = out.freeze();
        let set = kafka_protocol::records::RecordBatchDecoder::decode(&mut buf).unwrap();
        let got: Vec<_> = set
            .records
            .iter()
            .map(|r| (r.offset, r.value.clone().unwrap()))
            .collect();
        let want = [
            (40, Bytes::from_static(b"a")),
            (41, Bytes::from_static(b"bc")),
            (42, Bytes::new()),
            (43, Bytes::from(long)),
        ];
        assert_eq!(got, want);
        assert!(!buf.has_remaining(), "one batch");
        assert!(
            set.records
                .iter()
                .all(|r| r.timestamp == 7 && r.key.is_none())
        );
        assert_eq!(set.records[0].sequence, -1);
    }

    #[test]
    fn values_that_are_not_one_line_refuse_the_batch() {
        let data = batch(&[b"ok", b"two\nlines"], Compression::None);
        let e = produced_lines(data, 1 << 20, 100).unwrap_err();
        assert!(matches!(e, BatchError::InvalidRecord(_)), "{e}");
        let data = batch(&[b"long enough"], Compression::None);
        let e = produced_lines(data, 1 << 20, 4).unwrap_err();
        assert!(matches!(e, BatchError::InvalidRecord(_)), "{e}");
    }

    #[test]
    fn a_batch_claiming_more_records_than_its_bytes_is_corrupt() {
        let data = batch(&[b"x"], Compression::None);
        let mut raw = data.to_vec();
        // Record count: the last field of the 61-byte header.
        raw[57..61].copy_from_slice(&i32::MAX.to_be_bytes());
        let crc = crc32c::crc32c(&raw[21..]);
        raw[17..21].copy_from_slice(&crc.to_be_bytes());
        let e = produced_lines(Bytes::from(raw.clone()), 1 << 20, 100).unwrap_err();
        assert!(e.to_string().contains("records claimed"), "{e}");
        raw[30] ^= 1;
        let e = produced_lines(Bytes::from(raw), 1 << 20, 100).unwrap_err();
        assert_eq!(e, BatchError::Corrupt("CRC mismatch".into()));
    }

    #[test]
    fn a_compressed_bomb_stops_at_the_bound() {
        // A megabyte of one byte gzips to about a kilobyte.
        let big = vec![b'a'; 1 << 20];
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::Write::write_all(&mut gz, &big).unwrap();
        let compressed = Bytes::from(gz.finish().unwrap());
        assert!(compressed.len() < 8 << 10);
        assert_eq!(
            decompress(1, compressed.clone(), 64 << 10).unwrap_err(),
            BatchError::TooLarge(64 << 10)
        );
        assert_eq!(decompress(1, compressed, 2 << 20).unwrap().len(), 1 << 20);
        let raw = Bytes::from(snap::raw::Encoder::new().compress_vec(&big).unwrap());
        assert_eq!(
            snappy(raw.clone(), 1 << 10).unwrap_err(),
            BatchError::TooLarge(1 << 10)
        );
        assert_eq!(snappy(raw, 2 << 20).unwrap().len(), 1 << 20);
        let mut lz = lz4_flex::frame::FrameEncoder::new(Vec::new());
        std::io::Write::write_all(&mut lz, &big).unwrap();
        let lz = Bytes::from(lz.finish().unwrap());
        assert_eq!(
            decompress(3, lz, 1 << 10).unwrap_err(),
            BatchError::TooLarge(1 << 10)
        );
        let zs = Bytes::from(zstd::encode_all(&big[..], 3).unwrap());
        assert_eq!(
            decompress(4, zs, 1 << 10).unwrap_err(),
            BatchError::TooLarge(1 << 10)
        );
    }
}
