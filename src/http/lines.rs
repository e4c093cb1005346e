//! Turning a decoded body into whole lines: JSON arrays become one compact
//! line per element, a missing final newline is added, and every line is
//! checked against `--max-line-bytes`.

use axum::http::HeaderMap;
use axum::http::header::CONTENT_TYPE;
use serde_json::value::RawValue;

use bytes::Bytes;

use super::ApiError;
use super::body::Frames;
use crate::config::ByteSize;

/// True when the body must be read as a JSON array: Content-Type
/// `application/json` and `[` as first non-blank byte.
pub fn is_json_array(headers: &HeaderMap, mut body: impl Iterator<Item = u8>) -> bool {
    let json = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"));
    json && body
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| b == b'[')
}

/// One compact JSON line per element of the array in `body`. The elements
/// are streamed into the output as they are parsed (no list of them is
/// built), so the work costs the body and the output, each about the
/// body's size: a `[0,0,...]` body once took 16 bytes more per element.
/// Nesting is bounded by the parser's recursion limit.
pub fn json_array_to_lines(body: &[u8]) -> Result<Vec<u8>, ApiError> {
    let mut out = Vec::with_capacity(body.len() + 1);
    let mut de = serde_json::Deserializer::from_slice(body);
    serde::Deserializer::deserialize_seq(&mut de, ArrayToLines(&mut out))
        .and_then(|()| de.end())
        .map_err(|e| {
            ApiError::BadRequest(format!(
                "the body is sent as application/json and starts with '[' but is not a valid JSON array: {e}"
            ))
        })?;
    Ok(out)
}

/// Writes each element of a JSON array, compact, as one line of `.0`.
struct ArrayToLines<'o>(&'o mut Vec<u8>);

impl<'de> serde::de::Visitor<'de> for ArrayToLines<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON array")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(item) = seq.next_element::<&'de RawValue>()? {
            minify_into(item.get().as_bytes(), self.0);
            self.0.push(b'\n');
        }
        Ok(())
    }
}

/// Copies valid JSON without insignificant whitespace, a run at a time
/// (a run ends at whitespace between tokens); a raw newline cannot occur
/// in valid JSON strings.
pub fn minify_into(json: &[u8], out: &mut Vec<u8>) {
    out.reserve(json.len());
    let mut run = 0;
    let mut i = 0;
    while let Some(&b) = json.get(i) {
        match b {
            b'"' => i = string_end(json, i + 1),
            b' ' | b'\n' | b'\r' | b'\t' => {
                out.extend_from_slice(&json[run..i]);
                i += 1;
                run = i;
            }
            _ => i += 1,
        }
    }
    out.extend_from_slice(&json[run..]);
}

/// Just past the closing quote of the string whose contents start at `i`
/// (the end of `json` if it has none): its first 32 bytes eight at a time
/// (most keys and values are short), the rest from escape to escape
/// (`memchr2`).
fn string_end(json: &[u8], mut i: usize) -> usize {
    let short = i + 32;
    while i < short {
        if let Some(word) = json.get(i..i + 8) {
            let w = u64::from_le_bytes(word.try_into().expect("a slice of eight bytes"));
            let first = first_flagged(equal_bytes(w, b'"') | equal_bytes(w, b'\\'));
            i += first;
            if first == 8 {
                continue;
            }
        }
        match json.get(i) {
            Some(b'"') => return i + 1,
            Some(b'\\') => i += 2,
            Some(_) => i += 1,
            None => return json.len(),
        }
    }
    loop {
        match memchr::memchr2(b'"', b'\\', json.get(i..).unwrap_or_default()) {
            None => return json.len(),
            Some(k) if json[i + k] == b'"' => return i + k + 1,
            Some(k) => i += k + 2,
        }
    }
}

/// Appends `s` as a JSON string, byte for byte as `serde_json` writes it
/// (`"`, `\\` and control characters escaped, `\u00XX` in lowercase hex
/// for those without a short form), straight into `out`.
///
/// Runs without escapes are read eight bytes at a time. Most strings have
/// none (keys, levels, plain text lines) and are appended whole; from the
/// first escape on, the string is staged in a buffer on the stack and
/// appended in blocks: log lines are often JSON themselves, an escape
/// every few bytes, and appending each run and each escape on its own
/// costs about four times as much.
pub fn push_json_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let clean = clean_prefix(bytes);
    out.extend_from_slice(&bytes[..clean]);
    if clean < bytes.len() {
        push_escaped(out, &bytes[clean..]);
    }
    out.push(b'"');
}

/// How many bytes `bytes` starts with that a JSON string does not escape.
fn clean_prefix(bytes: &[u8]) -> usize {
    let mut i = 0;
    while let Some(word) = bytes.get(i..i + 8) {
        let first = first_escape(u64::from_le_bytes(
            word.try_into().expect("a slice of eight bytes"),
        ));
        i += first;
        if first < 8 {
            return i;
        }
    }
    i + bytes[i..]
        .iter()
        .position(|&b| b < 0x20 || b == b'"' || b == b'\\')
        .unwrap_or(bytes.len() - i)
}

/// [`push_json_str`] from its first escape on, through the stack buffer.
fn push_escaped(out: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    /// Room for an eight-byte run and the longest escape (`\u00XX`).
    const ROOM: usize = 8 + 6;
    let mut buf = [0u8; 256];
    let mut n = 0;
    let mut i = 0;
    while i < bytes.len() {
        if n > buf.len() - ROOM {
            out.extend_from_slice(&buf[..n]);
            n = 0;
        }
        if let Some(word) = bytes.get(i..i + 8) {
            buf[n..n + 8].copy_from_slice(word);
            let first = first_escape(u64::from_le_bytes(
                word.try_into().expect("a slice of eight bytes"),
            ));
            n += first;
            i += first;
            if first == 8 {
                continue;
            }
        }
        let b = bytes[i];
        i += 1;
        let short = match b {
            b'"' => b'"',
            b'\\' => b'\\',
            0x20.. => {
                buf[n] = b;
                n += 1;
                continue;
            }
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            0x08 => b'b',
            0x0c => b'f',
            _ => 0,
        };
        if short != 0 {
            buf[n..n + 2].copy_from_slice(&[b'\\', short]);
            n += 2;
        } else {
            buf[n..n + 6].copy_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]);
            n += 6;
        }
    }
    out.extend_from_slice(&buf[..n]);
}

/// The index of the first byte of `word` (eight bytes, little-endian) that
/// a JSON string escapes (`"`, `\\`, below 0x20), 8 when none does.
fn first_escape(word: u64) -> usize {
    let control = word.wrapping_sub(ONES * 0x20) & !word & HIGH;
    first_flagged(control | equal_bytes(word, b'"') | equal_bytes(word, b'\\'))
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// The high bit of each byte of `word` equal to `b`. Exact up to the first
/// such byte, which is all [`first_flagged`] reads: a borrow runs only
/// upwards, so a false flag can only sit above a true one.
fn equal_bytes(word: u64, b: u8) -> u64 {
    let v = word ^ (ONES * u64::from(b));
    v.wrapping_sub(ONES) & !v & HIGH
}

/// The index of the byte of the lowest flag (8 when none).
fn first_flagged(flags: u64) -> usize {
    (flags.trailing_zeros() / 8) as usize
}

/// Checks line lengths, appends a final `\n` if missing, and counts lines.
/// A line may span frames.
pub fn finish_lines(body: &mut Frames, max_line: u64) -> Result<u64, ApiError> {
    if body.is_empty() {
        return Ok(0);
    }
    if body.last() != Some(b'\n') {
        body.push(Bytes::from_static(b"\n"));
    }
    let mut count = 0u64;
    // Bytes of the line in progress held by earlier frames.
    let mut carried = 0u64;
    for part in body.chunks() {
        let mut start = 0usize;
        for end in memchr::memchr_iter(b'\n', part) {
            count += 1;
            let len = carried + (end - start) as u64;
            if len > max_line {
                return Err(ApiError::TooLarge(format!(
                    "line {count} is {len} bytes long, above the limit of {} (--max-line-bytes); nothing was written",
                    ByteSize(max_line)
                )));
            }
            carried = 0;
            start = end + 1;
        }
        carried += (part.len() - start) as u64;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use proptest::prelude::*;

    /// Byte at a time: what `minify_into` must do, on any input.
    fn minify_reference(json: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let (mut in_string, mut escaped) = (false, false);
        for &b in json {
            if in_string {
                out.push(b);
                if escaped {
                    escaped = false;
                } else if b == b'\\' {
                    escaped = true;
                } else if b == b'"' {
                    in_string = false;
                }
            } else if !matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
                in_string = b == b'"';
                out.push(b);
            }
        }
        out
    }

    proptest! {
        #[test]
        fn minify_copies_strings_and_drops_whitespace_between_tokens(
            json in proptest::collection::vec(
                prop_oneof![
                    Just(b'"'), Just(b'\\'), Just(b' '), Just(b'\n'), Just(b'\t'),
                    Just(b'{'), Just(b':'), any::<u8>()
                ],
                0..80,
            )
        ) {
            let mut out = vec![b'x'];
            minify_into(&json, &mut out);
            prop_assert_eq!(&out[1..], &minify_reference(&json)[..]);
        }

        #[test]
        fn minify_reads_long_strings_from_escape_to_escape(
            json in proptest::collection::vec(
                prop_oneof![
                    1 => Just(b'"'), 1 => Just(b'\\'), 1 => Just(b' '),
                    40 => b'a'..=b'z'
                ],
                0..600,
            )
        ) {
            let mut out = Vec::new();
            minify_into(&json, &mut out);
            prop_assert_eq!(&out[..], &minify_reference(&json)[..]);
        }

        #[test]
        fn any_json_string_is_written_as_serde_writes_it(
            s in proptest::collection::vec(
                prop_oneof![
                    2 => Just('"'), 2 => Just('\\'), 1 => Just('\n'), 1 => Just('\u{1}'),
                    1 => Just('\u{7f}'), 1 => Just('é'), 1 => Just('𝄞'), 1 => any::<char>(),
                    20 => proptest::char::range('a', 'z'),
                ],
                0..700,
            ).prop_map(|cs| cs.into_iter().collect::<String>())
        ) {
            let mut mine = b"x".to_vec();
            push_json_str(&mut mine, &s);
            let mut want = b"x".to_vec();
            serde_json::to_writer(&mut want, &s).unwrap();
            prop_assert_eq!(String::from_utf8(mine).unwrap(), String::from_utf8(want).unwrap());
        }
    }

    #[test]
    fn json_strings_are_written_as_serde_writes_them() {
        for s in [
            "",
            "plain",
            r#"{"ts":"2026","msg":"a \"quoted\" \\ path"}"#,
            "\"",
            "\\\\",
            "ends with \\",
            "tab\tnewline\ncr\rbell\u{7}nul\u{0}esc\u{1b}\u{8}\u{c}del\u{7f}",
            "é ✓ 𝄞 \u{2028}",
            "unit separator \u{1f} alone \"q\"",
            &(0u8..0x80).map(char::from).collect::<String>(),
            // Escapes where the staging buffer fills, and long clean runs.
            &"\"\u{1}".repeat(300),
            &"x".repeat(4000),
            &format!("{}\u{1f}{}", "y".repeat(249), "\\".repeat(40)),
        ] {
            let mut mine = b"x".to_vec();
            push_json_str(&mut mine, s);
            let mut want = b"x".to_vec();
            serde_json::to_writer(&mut want, s).unwrap();
            assert_eq!(
                String::from_utf8(mine).unwrap(),
                String::from_utf8(want).unwrap()
            );
        }
    }

    #[test]
    fn json_arrays_become_compact_lines() {
        let body = br#" [ {"a": 1, "b": "x y\n"} ,
            [1, 2],
            "s \"q\" ",
            null ] "#;
        let out = json_array_to_lines(body).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"a\":1,\"b\":\"x y\\n\"}\n[1,2]\n\"s \\\"q\\\" \"\nnull\n"
        );
        assert!(json_array_to_lines(b"[1,").is_err());
        assert!(json_array_to_lines(b"[]").unwrap().is_empty());
    }

    #[test]
    fn json_detection_needs_both_signals() {
        let mut h = HeaderMap::new();
        assert!(!is_json_array(&h, b"[1]".iter().copied()));
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        assert!(is_json_array(&h, b" \n[1]".iter().copied()));
        assert!(!is_json_array(&h, b"{\"a\":1}\n".iter().copied()));
    }

    fn frames(parts: &[&'static [u8]]) -> Frames {
        let mut f = Frames::default();
        for p in parts {
            f.push(Bytes::from_static(p));
        }
        f
    }

    fn joined(f: &Frames) -> Vec<u8> {
        f.bytes().collect()
    }

    #[test]
    fn lines_are_counted_and_limited() {
        let mut b = frames(&[b"a\nbb\nccc"]);
        assert_eq!(finish_lines(&mut b, 3).unwrap(), 3);
        assert_eq!(joined(&b), b"a\nbb\nccc\n");
        let mut b = frames(&[b"a\n\nbbbb\n"]);
        let err = finish_lines(&mut b, 3).unwrap_err().to_string();
        assert!(err.contains("line 3") && err.contains("4 bytes"), "{err}");
        let mut empty = Frames::default();
        assert_eq!(finish_lines(&mut empty, 3).unwrap(), 0);
    }

    #[test]
    fn lines_across_frames_are_measured_whole() {
        let mut b = frames(&[b"ab", b"c\nd", b"", b"ef", b"\n"]);
        assert_eq!(finish_lines(&mut b, 3).unwrap(), 2);
        assert_eq!(joined(&b), b"abc\ndef\n");
        let mut b = frames(&[b"ab", b"cd", b"\nx"]);
        let err = finish_lines(&mut b, 3).unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("4 bytes"), "{err}");
        let mut b = frames(&[b"ab\n", b"cd"]);
        assert_eq!(finish_lines(&mut b, 3).unwrap(), 2);
        assert_eq!(joined(&b), b"ab\ncd\n");
    }
}
