//! Entry points for the fuzz targets in `fuzz/` (not part of the API).
//!
//! Each takes arbitrary bytes and checks the properties that must hold for
//! any input, panicking when one does not: the fuzzer reports panics, and
//! the inputs that once failed are kept as regression tests
//! (`tests/fuzz_regressions.rs` replays them).

use std::io::Write;

use crate::http::body::{Encoding, Frames, Inflight, decode_blocking};
use crate::http::lines::{finish_lines, json_array_to_lines};

/// The line splitter: a body (or a JSON array body) becomes lines, each at
/// most `max_line` bytes, the whole ending with `\n`, counted exactly.
pub fn lines(data: &[u8]) {
    let Some((&limit, body)) = data.split_first() else {
        return;
    };
    let max_line = u64::from(limit);
    let mut candidates = vec![body.to_vec()];
    if let Ok(lines) = json_array_to_lines(body) {
        assert!(lines.is_empty() || lines.ends_with(b"\n"));
        candidates.push(lines);
    }
    for original in candidates {
        // The body as frames, cut where the limit byte says, so that lines
        // span frames too.
        let mut frames = Frames::default();
        let step = usize::from(limit % 7) + 1;
        for part in original.chunks(step * 3) {
            frames.push(bytes::Bytes::copy_from_slice(part));
        }
        let result = finish_lines(&mut frames, max_line);
        let body: Vec<u8> = frames.bytes().collect();
        match result {
            Ok(count) => {
                assert!(body.starts_with(&original));
                assert!(body.is_empty() || body.ends_with(b"\n"));
                assert_eq!(count, memchr::memchr_iter(b'\n', &body).count() as u64);
                assert!(
                    body.split(|&b| b == b'\n')
                        .all(|l| l.len() as u64 <= max_line)
                );
            }
            Err(_) => assert!(
                original
                    .split(|&b| b == b'\n')
                    .any(|l| l.len() as u64 > max_line)
            ),
        }
    }
}

/// The body decoders (gzip, zlib, zstd): never more than the limit, never a
/// panic, and what was compressed comes back.
pub fn decoders(data: &[u8]) {
    let Some((&which, raw)) = data.split_first() else {
        return;
    };
    let enc = match which % 3 {
        0 => Encoding::Gzip,
        1 => Encoding::Deflate,
        _ => Encoding::Zstd,
    };
    let max = 1 << 20;
    let budget = Inflight::new(4 << 20, Default::default());
    let mut res = budget.reservation();
    if let Ok(out) = decode_blocking(enc, raw, max, &mut res) {
        assert!(out.len() as u64 <= max);
    }
    // Round trip of the input as plain data.
    let packed = match enc {
        Encoding::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(raw).unwrap();
            e.finish().unwrap()
        }
        Encoding::Deflate => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(raw).unwrap();
            e.finish().unwrap()
        }
        _ => zstd::encode_all(raw, 1).unwrap(),
    };
    let mut res = budget.reservation();
    let back = decode_blocking(enc, &packed, max, &mut res).unwrap();
    assert_eq!(back, raw);
}

/// Name validation: what is accepted is a plain file name, and chunk names
/// print back exactly as parsed.
pub fn names(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    for ok in [
        chunkbus_client::names::validate_category(s).is_ok(),
        chunkbus_client::names::validate_consumer(s).is_ok(),
        chunkbus_client::names::validate_node(s).is_ok(),
    ] {
        if ok {
            assert!(!s.is_empty() && s.len() <= 128);
            assert!(!s.contains('/') && !s.contains('\0') && s != "." && s != "..");
            assert!(!s.starts_with('.'));
        }
    }
    if let Ok(c) = chunkbus_client::ChunkName::parse(s) {
        assert_eq!(c.to_string(), s);
    }
    let node = chunkbus_client::names::sanitize_node(s);
    assert!(
        chunkbus_client::names::validate_node(&node).is_ok(),
        "{node:?}"
    );
}

/// Recovery of a chunk directory holding arbitrary bytes: every chunk found
/// ends with a whole line afterwards, its size is its file's, and only bytes
/// past the last `\n` were cut; for an own chunk marked for a zero runway
/// (first byte with its high bit set), past the last `\n` before the first
/// NUL byte past the mark, and the mark is gone.
pub fn recovery(data: &[u8]) {
    let dir = tempfile_dir();
    let cat = dir.join("app");
    std::fs::create_dir_all(&cat).unwrap();
    // Up to four files, split at 0xff bytes; the first byte of each picks
    // its name (own chunk, other owner's chunk, state file, stray file).
    let mut originals = Vec::new();
    let mut marks = std::collections::BTreeMap::new();
    for (i, part) in data.split(|&b| b == 0xff).take(4).enumerate() {
        let (kind, content) = part.split_first().unwrap_or((&0, &[]));
        let name = match kind % 4 {
            0 => format!("me-chunk{i:09}"),
            1 => format!("peer-chunk{i:09}"),
            2 => ".state.json".to_owned(),
            _ => format!("stray{i}"),
        };
        std::fs::write(cat.join(&name), content).unwrap();
        if kind % 4 == 0 && kind & 0x80 != 0 {
            // Marked from an offset the input picks (possibly past the end).
            let from = u64::from((kind >> 2) & 0x1f) * 3;
            let file = std::fs::File::open(cat.join(&name)).unwrap();
            let value = from.to_string();
            let marker = crate::storage::runway::MARKER;
            if rustix::fs::fsetxattr(
                &file,
                marker,
                value.as_bytes(),
                rustix::fs::XattrFlags::empty(),
            )
            .is_ok()
            {
                marks.insert(name.clone(), from as usize);
            }
        }
        originals.push((name, content.to_vec()));
    }
    if let Ok(found) = crate::storage::recovery::scan(&dir, "me") {
        for (name, meta) in found.get("app").map(|r| &r.chunks).into_iter().flatten() {
            let bytes = std::fs::read(cat.join(name.to_string())).unwrap();
            assert_eq!(bytes.len() as u64, meta.size);
            assert!(bytes.is_empty() || bytes.ends_with(b"\n"));
            let (_, before) = originals
                .iter()
                .rev()
                .find(|(n, _)| *n == name.to_string())
                .expect("a chunk that was written");
            assert!(before.starts_with(&bytes));
            let data_end = match marks.get(&name.to_string()) {
                Some(&from) => {
                    let from = from.min(before.len());
                    let file = std::fs::File::open(cat.join(name.to_string())).unwrap();
                    let mut buf = [0u8; 8];
                    let marker = crate::storage::runway::MARKER;
                    assert!(rustix::fs::fgetxattr(&file, marker, &mut buf[..]).is_err());
                    memchr::memchr(0, &before[from..]).map_or(before.len(), |p| from + p)
                }
                None => before.len(),
            };
            assert!(bytes.len() <= data_end);
            assert!(!before[bytes.len()..data_end].contains(&b'\n'));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempfile_dir() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "chunkbus-fuzz-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A Kafka request frame (without its length): read as the listener reads
/// it, never a panic, and whatever a produce request carries comes out as
/// lines within the bounds given; the same bytes read as record batches.
pub fn kafka_frame(data: &[u8]) {
    use crate::kafka::{records, requests, wire::Reader};
    const MAX_DECODED: u64 = 1 << 16;
    const MAX_LINE: u64 = 64;
    let check = |batches: bytes::Bytes| {
        if let Ok(records::Produced { lines, count, .. }) =
            records::produced_lines(batches, MAX_DECODED, MAX_LINE)
        {
            assert!(lines.len() as u64 <= MAX_DECODED + count);
            assert_eq!(memchr::memchr_iter(b'\n', &lines).count() as u64, count);
            assert!(lines.is_empty() || lines.ends_with(b"\n"));
            assert!(
                lines
                    .split(|&b| b == b'\n')
                    .all(|l| l.len() as u64 <= MAX_LINE)
            );
        }
    };
    let frame = bytes::Bytes::copy_from_slice(data);
    check(frame.clone());
    let mut r = Reader::new(frame);
    let Ok(h) = requests::header(&mut r) else {
        return;
    };
    let v = h.api_version;
    match h.api_key {
        0 => {
            if let Ok(p) = requests::produce(&mut r, v) {
                for part in p.topics.into_iter().flat_map(|(_, parts)| parts) {
                    check(part.records.unwrap_or_default());
                }
            }
        }
        1 => drop(requests::fetch(&mut r, v)),
        2 => drop(requests::list_offsets(&mut r, v)),
        3 => drop(requests::metadata(&mut r, v)),
        8 => drop(requests::offset_commit(&mut r, v)),
        9 => drop(requests::offset_fetch(&mut r, v)),
        10 => drop(requests::find_coordinator(&mut r, v)),
        11 => drop(requests::join_group(&mut r, v)),
        12 => drop(requests::heartbeat(&mut r, v)),
        13 => drop(requests::leave_group(&mut r, v)),
        14 => drop(requests::sync_group(&mut r, v)),
        18 => drop(requests::api_versions(&mut r, v)),
        22 => drop(requests::init_producer_id(&mut r, v)),
        _ => {}
    }
}

/// The Elasticsearch bulk parser: any body is either refused whole or
/// parsed into items; every document it would store is one line of valid
/// JSON holding a JSON object, within the line limit, in a valid category.
pub fn es_bulk(data: &[u8]) {
    const MAX_LINE: u64 = 256;
    let Ok((items, batches)) = crate::http::es::parse_bulk(data, Some("fallback"), MAX_LINE) else {
        return;
    };
    let mut stored = 0;
    for (n, category, line) in batches.numbered_lines() {
        let item = &items[n];
        assert!(item.doc.is_ok(), "item {n} is stored and has an error");
        assert_eq!(item.index.as_deref(), Some(category));
        assert!(!line.contains(&b'\n'), "{line:?}");
        assert!(line.len() as u64 <= MAX_LINE);
        // JSON as the grammar has it (numbers of any size: a
        // `Value` would refuse what does not fit an f64).
        let object: std::collections::HashMap<String, &serde_json::value::RawValue> =
            serde_json::from_slice(line).expect("a JSON object");
        drop(object);
        assert!(chunkbus_client::names::validate_category(category).is_ok());
        stored += 1;
    }
    assert_eq!(stored, items.iter().filter(|i| i.doc.is_ok()).count());
}

/// The Splunk HEC event parser: the events it keeps are one line each of
/// valid JSON objects holding an `event`, in valid categories, within the
/// line limit; when it stops at an invalid event, that event's number is
/// the count of those kept.
pub fn hec_events(data: &[u8]) {
    const MAX_LINE: u64 = 256;
    let (events, invalid) = crate::http::hec::parse_events(data, "fallback", MAX_LINE);
    for e in &events {
        assert!(!e.line.contains(&b'\n'), "{:?}", e.line);
        assert!(e.line.len() as u64 <= MAX_LINE);
        // JSON as the grammar has it (numbers of any size).
        let object: std::collections::HashMap<String, &serde_json::value::RawValue> =
            serde_json::from_slice(&e.line).expect("a JSON object");
        assert!(
            object.get("event").is_some_and(|e| e.get() != "null"),
            "{:?}",
            String::from_utf8_lossy(&e.line)
        );
        assert!(chunkbus_client::names::validate_category(&e.category).is_ok());
    }
    if let Some(i) = invalid {
        assert_eq!(i.number, events.len());
    }
}

/// The OTLP logs decoder: never a panic; what it accepts becomes lines
/// that are JSON objects within the line limit, and every record is
/// either a line or counted as refused.
pub fn otlp_logs(data: &[u8]) {
    use crate::http::otlp::{Encoding, Rules, decode};
    let Some((&which, raw)) = data.split_first() else {
        return;
    };
    let encoding = if which % 2 == 0 {
        Encoding::Protobuf
    } else {
        Encoding::Json
    };
    let rules = Rules {
        category_attribute: "service.name".into(),
        default_category: "otlp".into(),
        max_line: u64::from(which) * 8,
        max_lines_bytes: 1 << 20,
    };
    let mut asked = 0u64;
    let mut reserve = |n: u64| {
        asked += n;
        Ok(())
    };
    if let Ok(d) = decode(
        raw,
        encoding,
        &rules,
        &|c| !c.starts_with('x'),
        &mut reserve,
    ) {
        check_json_lines(&d.batches, rules.max_line);
    }
}

/// The Loki push decoder (snappy protobuf and JSON), as [`otlp_logs`].
pub fn loki_push(data: &[u8]) {
    use crate::http::loki::{Encoding, Rules, decode};
    let Some((&which, raw)) = data.split_first() else {
        return;
    };
    let encoding = if which % 2 == 0 {
        Encoding::SnappyProtobuf
    } else {
        Encoding::Json
    };
    let rules = Rules {
        category_label: "job".into(),
        default_category: "loki".into(),
        tenant: (which % 3 == 0).then(|| "t".into()),
        max_line: u64::from(which) * 8,
        max_lines_bytes: 1 << 20,
    };
    let mut reserve = |_: u64| Ok(());
    if let Ok(d) = decode(
        raw,
        encoding,
        &rules,
        &|c| !c.starts_with('x'),
        &mut reserve,
    ) {
        check_json_lines(&d.batches, rules.max_line);
    }
}

fn check_json_lines(batches: &crate::http::produce::Batches, max_line: u64) {
    for (category, line) in batches.lines() {
        assert!(chunkbus_client::names::validate_category(category).is_ok());
        assert!(line.len() as u64 <= max_line);
        assert!(!line.contains(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(line).expect("a line is JSON");
        assert!(v.is_object());
    }
}

#[cfg(test)]
mod tests {
    /// The seeds kept for the OTLP and Loki targets are requests the
    /// decoders accept, so that fuzzing starts from deep inside them.
    #[test]
    fn the_push_seeds_decode() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
        let read = |p: &str| std::fs::read(dir.join(p)).unwrap();
        let mut ok = |_: u64| Ok(());
        for (seed, encoding) in [
            (
                "otlp_logs/seed-protobuf",
                crate::http::otlp::Encoding::Protobuf,
            ),
            ("otlp_logs/seed-json", crate::http::otlp::Encoding::Json),
        ] {
            let rules = crate::http::otlp::Rules {
                category_attribute: "service.name".into(),
                default_category: "otlp".into(),
                max_line: 1 << 20,
                max_lines_bytes: 1 << 20,
            };
            let d =
                crate::http::otlp::decode(&read(seed)[1..], encoding, &rules, &|_| true, &mut ok)
                    .unwrap();
            assert!(d.batches.lines().count() > 0, "{seed}");
        }
        for (seed, encoding) in [
            (
                "loki_push/seed-snappy-protobuf",
                crate::http::loki::Encoding::SnappyProtobuf,
            ),
            ("loki_push/seed-json", crate::http::loki::Encoding::Json),
        ] {
            let rules = crate::http::loki::Rules {
                category_label: "job".into(),
                default_category: "loki".into(),
                tenant: None,
                max_line: 1 << 20,
                max_lines_bytes: 1 << 20,
            };
            let d =
                crate::http::loki::decode(&read(seed)[1..], encoding, &rules, &|_| true, &mut ok)
                    .unwrap();
            assert!(d.batches.lines().count() > 1, "{seed}");
        }
    }
}
