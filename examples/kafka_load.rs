//! A bare Kafka load generator for `scripts/bench kafka`: the least a
//! client must do, so that the benchmark measures the node rather than a
//! client library's per-record work (kcat spends more CPU per record than
//! the node does). Like `wrk` for HTTP, it sends the same bytes again and
//! again. Not part of the product.
//!
//! ```text
//! kafka_load produce ADDR TOPIC MIB   one batch of 200-byte records (about
//!                                     1 MiB, uncompressed) built once, sent
//!                                     in Produce v3 requests (acks=1) to
//!                                     partition 0, 4 in flight, until MIB
//!                                     MiB are acknowledged
//! kafka_load fetch ADDR TOPIC         Fetch v4 of partition 0 from offset 0
//!                                     (8 MiB per answer) until an answer
//!                                     brings nothing; counts record bytes
//! ```
//!
//! Each prints `MIB MiB in SECONDS s` when done.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};

const IN_FLIGHT: usize = 4;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: kafka_load produce ADDR TOPIC MIB | kafka_load fetch ADDR TOPIC";
    let (mode, addr, topic) = match &args[..] {
        [_, m, a, t, ..] => (m.as_str(), a.as_str(), t.as_str()),
        _ => panic!("{usage}"),
    };
    let mut conn = TcpStream::connect(addr).expect("connect");
    conn.set_nodelay(true).unwrap();
    let start = Instant::now();
    let bytes = match mode {
        "produce" => produce(&mut conn, topic, args[4].parse().expect("MIB")),
        "fetch" => fetch(&mut conn, topic),
        _ => panic!("{usage}"),
    };
    println!(
        "{:.1} MiB in {:.3} s",
        bytes as f64 / 1048576.0,
        start.elapsed().as_secs_f64()
    );
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as i32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn read_frame(conn: &mut TcpStream) -> Bytes {
    let mut len = [0u8; 4];
    conn.read_exact(&mut len).expect("an answer");
    let mut buf = vec![0u8; i32::from_be_bytes(len) as usize];
    conn.read_exact(&mut buf).expect("an answer");
    Bytes::from(buf)
}

/// Sends `mib` MiB of records; returns the record bytes acknowledged.
fn produce(conn: &mut TcpStream, topic: &str, mib: u64) -> u64 {
    let value = Bytes::from(vec![b'k'; 199]);
    let records: Vec<Record> = (0..5242)
        .map(|i| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: 0,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            offset: i,
            // The encoder starts a new batch wherever offset - sequence
            // changes: -1 for the first record and one more per record
            // keeps all of them in one batch with base sequence -1 (not
            // idempotent), as a producer sends them.
            sequence: i as i32 - 1,
            timestamp: 0,
            key: None,
            value: Some(value.clone()),
            headers: Default::default(),
        })
        .collect();
    let mut batch = BytesMut::new();
    let options = RecordEncodeOptions {
        version: 2,
        compression: Compression::None,
    };
    RecordBatchEncoder::encode(&mut batch, &records, &options).unwrap();
    // One batch: a batch header is 61 bytes, a record here about 208.
    assert!(batch.len() < records.len() * 220, "more than one batch");
    let per_request = records.len() as u64 * 200;
    let mut body = BytesMut::new();
    body.put_i16(0); // Produce
    body.put_i16(3);
    body.put_i32(0); // correlation id
    body.put_i16(-1); // client id
    body.put_i16(-1); // transactional id
    body.put_i16(1); // acks
    body.put_i32(30_000);
    body.put_i32(1);
    body.put_i16(topic.len() as i16);
    body.put_slice(topic.as_bytes());
    body.put_i32(1);
    body.put_i32(0);
    body.put_i32(batch.len() as i32);
    body.put_slice(&batch);
    let request = frame(&body);
    let requests = (mib << 20).div_ceil(per_request);
    let (mut sent, mut acked) = (0u64, 0u64);
    while acked < requests {
        while sent < requests && sent - acked < IN_FLIGHT as u64 {
            conn.write_all(&request).expect("send");
            sent += 1;
        }
        let answer = read_frame(conn);
        // Correlation id, 1 topic, its name, 1 partition, index, error.
        let at = 4 + 4 + 2 + topic.len() + 4 + 4;
        let error = i16::from_be_bytes([answer[at], answer[at + 1]]);
        assert_eq!(error, 0, "produce answered error {error}");
        acked += 1;
    }
    acked * per_request
}

/// Fetches partition 0 from offset 0 until an answer brings nothing;
/// returns the record bytes received.
fn fetch(conn: &mut TcpStream, topic: &str) -> u64 {
    let (mut offset, mut total) = (0i64, 0u64);
    loop {
        let mut body = BytesMut::new();
        body.put_i16(1); // Fetch
        body.put_i16(4);
        body.put_i32(0);
        body.put_i16(-1);
        body.put_i32(-1); // replica id
        body.put_i32(0); // max wait
        body.put_i32(0); // min bytes
        body.put_i32(64 << 20); // max bytes
        body.put_i8(0);
        body.put_i32(1);
        body.put_i16(topic.len() as i16);
        body.put_slice(topic.as_bytes());
        body.put_i32(1);
        body.put_i32(0);
        body.put_i64(offset);
        body.put_i32(8 << 20);
        conn.write_all(&frame(&body)).expect("send");
        let mut a = read_frame(conn);
        a.advance(4 + 4 + 4); // correlation id, throttle, 1 topic
        let name = a.get_i16() as usize;
        a.advance(name + 4 + 4); // name, 1 partition, index
        let error = a.get_i16();
        assert_eq!(error, 0, "fetch answered error {error}");
        a.advance(8 + 8); // high watermark, last stable offset
        let aborted = a.get_i32();
        assert!(aborted <= 0);
        let len = a.get_i32();
        if len <= 0 {
            return total;
        }
        let mut records = a.split_to(len as usize);
        total += records.len() as u64;
        while records.remaining() >= 12 {
            let base = records.get_i64();
            let batch_len = records.get_i32() as usize;
            let mut b = records.split_to(batch_len);
            b.advance(4 + 1 + 4 + 2); // leader epoch, magic, crc, attributes
            offset = base + b.get_i32() as i64 + 1;
        }
    }
}
