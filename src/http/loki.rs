//! Loki's push API, so that agents with a stock Loki output (Promtail,
//! Grafana Alloy, Fluent Bit `loki`, Vector `loki`, the logging libraries
//! that push to Loki) write to chunkbus by changing a URL.
//!
//! `POST /loki/api/v1/push` takes a `PushRequest` as snappy-compressed
//! protobuf (`application/x-protobuf`, what Promtail and Alloy send) or as
//! JSON (`application/json`, gzip allowed). Every entry becomes one line,
//! `{"ts":..,"labels":{..},"line":"..","metadata":{..}}` (see [`line`]),
//! in the category named by the stream's label `--loki-category-label`
//! (`job`), else `--loki-default-category` (`loki`); with an
//! `X-Scope-OrgID` header, the category is `<org>.<category>`, so that
//! tenants stay apart.
//!
//! Answers as Loki does: 204 when everything was stored; 400 with a text
//! naming the first problem when a body is not a push request, or when
//! some entries could not be stored (a bad category name, a token that may
//! not write there, an entry above `--max-line-bytes`: the others are
//! stored, as Loki stores the valid entries of a batch); 413, and
//! 429/503/504 with `Retry-After`, which agents retry. `GET /ready`
//! answers 200.

use std::borrow::Cow;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chunkbus_client::names::validate_category;
use prost::Message;
use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize};

use super::produce::{ProduceQuery, PushLines, Pushed, count_shed, push_request};
use super::protobuf::{Shape, decoded_bytes};
use super::{ApiError, AppState, body};

/// Loki's `logproto.PushRequest`.
#[derive(Clone, PartialEq, Message)]
pub struct PushRequest {
    /// The streams.
    #[prost(message, repeated, tag = "1")]
    pub streams: Vec<StreamAdapter>,
}

/// One stream: its labels and entries.
#[derive(Clone, PartialEq, Message)]
pub struct StreamAdapter {
    /// Labels as Prometheus writes them: `{job="x", env="prod"}`.
    #[prost(string, tag = "1")]
    pub labels: String,
    /// The entries.
    #[prost(message, repeated, tag = "2")]
    pub entries: Vec<EntryAdapter>,
    /// A hash of the labels (not used).
    #[prost(uint64, tag = "3")]
    pub hash: u64,
}

/// One entry: a time, a line, structured metadata.
#[derive(Clone, PartialEq, Message)]
pub struct EntryAdapter {
    /// When.
    #[prost(message, optional, tag = "1")]
    pub timestamp: Option<Timestamp>,
    /// The log line.
    #[prost(string, tag = "2")]
    pub line: String,
    /// Structured metadata.
    #[prost(message, repeated, tag = "3")]
    pub structured_metadata: Vec<LabelPairAdapter>,
}

/// A name and a value.
#[derive(Clone, PartialEq, Message)]
pub struct LabelPairAdapter {
    /// Its name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Its value.
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `google.protobuf.Timestamp`.
#[derive(Clone, Copy, PartialEq, Message)]
pub struct Timestamp {
    /// Seconds since the epoch.
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    /// Nanoseconds within the second.
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

static PUSH: Shape = Shape::message::<PushRequest>(&[(1, &STREAM)]);
static STREAM: Shape = Shape::message::<StreamAdapter>(&[(2, &ENTRY)]);
static ENTRY: Shape = Shape::message::<EntryAdapter>(&[(1, &TIMESTAMP), (3, &LABEL_PAIR)]);
static LABEL_PAIR: Shape = Shape::message::<LabelPairAdapter>(&[]);
static TIMESTAMP: Shape = Shape::message::<Timestamp>(&[]);

/// Names and values, in the order given (labels, structured metadata).
#[derive(Debug, Default)]
pub struct Pairs<'a>(pub Vec<(Cow<'a, str>, Cow<'a, str>)>);

impl<'de: 'a, 'a> Deserialize<'de> for Pairs<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PairsVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for PairsVisitor<'a> {
            type Value = Pairs<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of strings")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Pairs<'a>, M::Error> {
                let mut pairs = Vec::new();
                while let Some((k, v)) = map.next_entry::<Str<'a>, Str<'a>>()? {
                    pairs.push((k.0, v.0));
                }
                Ok(Pairs(pairs))
            }
        }
        d.deserialize_map(PairsVisitor(std::marker::PhantomData))
    }
}

impl Serialize for Pairs<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// A JSON string, borrowed unless it has escapes.
struct Str<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct StrVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for StrVisitor<'a> {
            type Value = Str<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Str<'a>, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Str<'a>, E> {
                Ok(Str(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(StrVisitor(std::marker::PhantomData))
    }
}

/// The JSON form of a push.
#[derive(Deserialize)]
struct JsonPush<'a> {
    #[serde(borrow)]
    streams: Vec<JsonStream<'a>>,
}

#[derive(Deserialize)]
struct JsonStream<'a> {
    #[serde(borrow, default)]
    stream: Pairs<'a>,
    #[serde(borrow)]
    values: Vec<JsonEntry<'a>>,
}

/// `["<unix nanoseconds>", "<line>"]`, or with structured metadata as a
/// third element.
#[derive(Deserialize)]
struct JsonEntry<'a>(
    #[serde(borrow)] Str<'a>,
    #[serde(borrow)] Str<'a>,
    #[serde(borrow, default)] Option<Pairs<'a>>,
);

/// The largest struct a JSON object or array of a push becomes.
const LARGEST_JSON_PART: usize = {
    let (a, b) = (size_of::<JsonStream>(), size_of::<JsonEntry>());
    if a > b { a } else { b }
};

/// An upper bound of the memory a JSON push decodes into (see
/// `protobuf::decoded_bytes` for the factor four).
fn json_decoded_bytes(body: &[u8]) -> u64 {
    let parts = memchr::memchr2_iter(b'{', b'[', body).count() as u64;
    let strings = memchr::memchr_iter(b'"', body).count() as u64 / 2;
    parts * 4 * LARGEST_JSON_PART as u64
        + strings * (4 * size_of::<(Cow<str>, Cow<str>)>() as u64 / 2 + 16)
        + body.len() as u64
}

/// What `--loki-*` and the request say, and the limits its lines are
/// held to.
#[derive(Debug, Clone)]
pub struct Rules {
    /// The label that names the category.
    pub category_label: String,
    /// The category of a stream without that label.
    pub default_category: String,
    /// `X-Scope-OrgID`: the prefix of every category.
    pub tenant: Option<String>,
    /// Longest line (`--max-line-bytes`): a longer entry is refused.
    pub max_line: u64,
    /// Most bytes of lines one request may produce (413 above).
    pub max_lines_bytes: u64,
}

/// The request encodings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Snappy-compressed protobuf.
    SnappyProtobuf,
    /// JSON.
    Json,
}

impl Encoding {
    fn of(headers: &HeaderMap) -> Result<Encoding, ApiError> {
        let (ct, mime) = body::content_type(headers);
        if mime.eq_ignore_ascii_case("application/json") {
            Ok(Encoding::Json)
        } else if mime.is_empty() || mime.eq_ignore_ascii_case("application/x-protobuf") {
            // Loki takes any other type as protobuf too; an unknown one
            // here is more likely a mistake, and is named.
            Ok(Encoding::SnappyProtobuf)
        } else {
            Err(ApiError::UnsupportedMediaType(format!(
                "Content-Type {ct:?}: Loki push takes application/x-protobuf (snappy) or application/json"
            )))
        }
    }
}

/// Decodes a push and turns its entries into lines; `reserve` is asked for
/// the memory the decode and the lines take, before they take it.
pub fn decode(
    raw: &[u8],
    encoding: Encoding,
    rules: &Rules,
    may_write: &dyn Fn(&str) -> bool,
    reserve: &mut dyn FnMut(u64) -> Result<(), ApiError>,
) -> Result<Pushed, ApiError> {
    let mut out = PushLines::new(rules.max_line, rules.max_lines_bytes, reserve);
    match encoding {
        Encoding::SnappyProtobuf => {
            let len = snap::raw::decompress_len(raw)
                .map_err(|e| ApiError::BadRequest(format!("not a snappy block: {e}")))?;
            if len as u64 > rules.max_lines_bytes {
                return Err(ApiError::TooLarge(format!(
                    "the push decompresses to {len} bytes, more than --max-body-bytes ({})",
                    rules.max_lines_bytes
                )));
            }
            out.reserve(len as u64)?;
            let proto = snap::raw::Decoder::new()
                .decompress_vec(raw)
                .map_err(|e| ApiError::BadRequest(format!("not a snappy block: {e}")))?;
            let bound = decoded_bytes(&proto, &PUSH)
                .map_err(|e| ApiError::BadRequest(format!("not a Loki push request: {e}")))?;
            out.reserve(bound)?;
            let push = PushRequest::decode(proto.as_slice())
                .map_err(|e| ApiError::BadRequest(format!("not a Loki push request: {e}")))?;
            drop(proto);
            for stream in &push.streams {
                let labels = parse_labels(&stream.labels).map_err(|e| {
                    ApiError::BadRequest(format!("labels {:?}: {e}", stream.labels))
                })?;
                let Some(category) =
                    category_of(rules, may_write, &mut out, &labels, stream.entries.len())
                else {
                    continue;
                };
                let labels = labels_json(&labels)?;
                for entry in &stream.entries {
                    let ts = entry.timestamp.map_or(0, |t| {
                        i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos)
                    });
                    let metadata = Pairs(
                        entry
                            .structured_metadata
                            .iter()
                            .map(|p| (Cow::from(p.name.as_str()), Cow::from(p.value.as_str())))
                            .collect(),
                    );
                    out.push(&category, "an entry", |line| {
                        write_line(line, ts, &labels, &entry.line, &metadata)
                    })?;
                }
            }
        }
        Encoding::Json => {
            out.reserve(json_decoded_bytes(raw))?;
            let push: JsonPush = serde_json::from_slice(raw)
                .map_err(|e| ApiError::BadRequest(format!("not a Loki push request: {e}")))?;
            let no_metadata = Pairs::default();
            for stream in &push.streams {
                let Some(category) = category_of(
                    rules,
                    may_write,
                    &mut out,
                    &stream.stream,
                    stream.values.len(),
                ) else {
                    continue;
                };
                let labels = labels_json(&stream.stream)?;
                for JsonEntry(ts, line, metadata) in &stream.values {
                    let ts: i128 = ts.0.parse().map_err(|_| {
                        ApiError::BadRequest(format!(
                            "the time {:?} is not a number of nanoseconds",
                            ts.0
                        ))
                    })?;
                    let metadata = metadata.as_ref().unwrap_or(&no_metadata);
                    out.push(&category, "an entry", |out| {
                        write_line(out, ts, &labels, &line.0, metadata)
                    })?;
                }
            }
        }
    }
    Ok(out.finish())
}

/// The category of a stream with `labels`, or `None` when its `entries`
/// are refused.
fn category_of(
    rules: &Rules,
    may_write: &dyn Fn(&str) -> bool,
    out: &mut PushLines,
    labels: &Pairs,
    entries: usize,
) -> Option<String> {
    let name = labels
        .0
        .iter()
        .find(|(k, _)| *k == rules.category_label)
        .map_or(rules.default_category.as_str(), |(_, v)| v);
    let category = match &rules.tenant {
        Some(org) => format!("{org}.{name}"),
        None => name.to_owned(),
    };
    if let Err(e) = validate_category(&category) {
        out.refuse(entries, || {
            format!("the stream's category {category:?} is not a category name: {e}")
        });
        return None;
    }
    if !may_write(&category) {
        out.refuse(entries, || {
            format!("this token may not write to the category {category:?}")
        });
        return None;
    }
    Some(category)
}

/// The line of one entry: `{"ts":<unix nanoseconds>,"labels":{..},
/// "line":"..","metadata":{..}}`, `metadata` only when there is some.
/// `labels` is the stream's labels as JSON ([`labels_json`]), the same for
/// each of its entries; the rest is written by hand (serde escapes every
/// key, most of a line's cost), byte for byte as serde writes it.
pub fn write_line(
    out: &mut Vec<u8>,
    ts: i128,
    labels: &[u8],
    line: &str,
    metadata: &Pairs,
) -> serde_json::Result<()> {
    out.extend_from_slice(b"{\"ts\":");
    let mut num = itoa::Buffer::new();
    // Most times fit 64 bits, which format faster.
    out.extend_from_slice(
        match i64::try_from(ts) {
            Ok(ts) => num.format(ts),
            Err(_) => num.format(ts),
        }
        .as_bytes(),
    );
    out.extend_from_slice(b",\"labels\":");
    out.extend_from_slice(labels);
    out.extend_from_slice(b",\"line\":");
    super::lines::push_json_str(out, line);
    if !metadata.0.is_empty() {
        out.extend_from_slice(b",\"metadata\":");
        serde_json::to_writer(&mut *out, metadata)?;
    }
    out.push(b'}');
    Ok(())
}

/// A stream's labels as one JSON object, for [`write_line`].
pub fn labels_json(labels: &Pairs) -> Result<Vec<u8>, ApiError> {
    serde_json::to_vec(labels)
        .map_err(|e| ApiError::Internal(format!("cannot write labels as JSON: {e}")))
}

/// Parses labels as Prometheus writes them, `{name="value", ...}`, the
/// values quoted as Go quotes them.
pub fn parse_labels(s: &str) -> Result<Pairs<'_>, String> {
    let inner = s
        .trim()
        .strip_prefix('{')
        .and_then(|r| r.strip_suffix('}'))
        .ok_or("not in braces")?;
    let mut pairs = Vec::new();
    let mut rest = inner.trim_start();
    while !rest.is_empty() {
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let name = &rest[..end];
        if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(format!("a label name is expected at {rest:?}"));
        }
        rest = rest[end..].trim_start();
        rest = rest
            .strip_prefix('=')
            .ok_or_else(|| format!("'=' is expected after {name:?}"))?
            .trim_start();
        let (value, after) = unquote(rest)?;
        pairs.push((Cow::Borrowed(name), value));
        rest = after.trim_start();
        if let Some(r) = rest.strip_prefix(',') {
            rest = r.trim_start();
        } else if !rest.is_empty() {
            return Err(format!("',' or '}}' is expected at {rest:?}"));
        }
    }
    Ok(Pairs(pairs))
}

/// A Go double-quoted string at the start of `s`, and what follows it.
fn unquote(s: &str) -> Result<(Cow<'_, str>, &str), String> {
    let body = s.strip_prefix('"').ok_or("a quoted value is expected")?;
    let end = body
        .find(['"', '\\'])
        .ok_or("a value without its closing quote")?;
    if body.as_bytes()[end] == b'"' {
        return Ok((Cow::Borrowed(&body[..end]), &body[end + 1..]));
    }
    let mut out: Vec<u8> = body.as_bytes()[..end].to_vec();
    let bytes = body.as_bytes();
    let mut i = end;
    loop {
        match bytes.get(i) {
            None => return Err("a value without its closing quote".into()),
            Some(b'"') => break,
            Some(b'\\') => {
                let esc = *bytes
                    .get(i + 1)
                    .ok_or("a value without its closing quote")?;
                i += 2;
                let simple = match esc {
                    b'a' => Some(7),
                    b'b' => Some(8),
                    b'f' => Some(12),
                    b'n' => Some(b'\n'),
                    b'r' => Some(b'\r'),
                    b't' => Some(b'\t'),
                    b'v' => Some(11),
                    b'\\' | b'"' | b'\'' => Some(esc),
                    _ => None,
                };
                if let Some(b) = simple {
                    out.push(b);
                    continue;
                }
                let (digits, radix) = match esc {
                    b'x' => (2, 16),
                    b'u' => (4, 16),
                    b'U' => (8, 16),
                    b'0'..=b'7' => {
                        i -= 1;
                        (3, 8)
                    }
                    _ => return Err(format!("an unknown escape \\{}", esc as char)),
                };
                let hex = body
                    .get(i..i + digits)
                    .ok_or("a truncated escape in a value")?;
                let n = u32::from_str_radix(hex, radix).map_err(|_| "a bad escape in a value")?;
                i += digits;
                if esc == b'u' || esc == b'U' {
                    let c = char::from_u32(n).ok_or("an escape that is not a character")?;
                    out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                } else {
                    out.push(u8::try_from(n).map_err(|_| "an octal escape above 255")?);
                }
            }
            Some(&b) => {
                out.push(b);
                i += 1;
            }
        }
    }
    let value = String::from_utf8(out).map_err(|_| "a value that is not UTF-8")?;
    Ok((Cow::Owned(value), &body[i + 1..]))
}

/// `POST /loki/api/v1/push`.
pub(super) async fn push(
    State(st): State<Arc<AppState>>,
    query: Result<Query<ProduceQuery>, QueryRejection>,
    req: Request,
) -> Response {
    match push_entries(&st, query, req).await {
        Ok(resp) => resp,
        Err(e) => {
            count_shed(&st, &e);
            let resp = (e.status(), e.to_string()).into_response();
            e.with_headers_on(resp)
        }
    }
}

async fn push_entries(
    st: &AppState,
    query: Result<Query<ProduceQuery>, QueryRejection>,
    req: Request,
) -> Result<Response, ApiError> {
    let Query(q) = query?;
    let opts = q.options()?;
    let encoding = Encoding::of(req.headers())?;
    // An empty header is no tenant, as Loki takes it.
    let tenant = match req.headers().get("x-scope-orgid") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::BadRequest("X-Scope-OrgID is not text".into()))?
                .trim()
                .to_owned(),
        )
        .filter(|t| !t.is_empty()),
    };
    let rules = Rules {
        category_label: st.ingest.loki_category_label.clone(),
        default_category: st.ingest.loki_default_category.clone(),
        tenant,
        max_line: st.limits.max_line_bytes,
        max_lines_bytes: st.limits.max_body_bytes,
    };
    let decoded = push_request(
        st,
        req,
        opts,
        "Loki decode",
        Box::new(move |raw, may_write, reserve| decode(raw, encoding, &rules, may_write, reserve)),
    )
    .await?;
    match decoded.reason {
        None => Ok(StatusCode::NO_CONTENT.into_response()),
        Some(reason) => Err(ApiError::BadRequest(format!(
            "{} entries not stored (the others are); the first: {reason}",
            decoded.refused
        ))),
    }
}

/// `GET /ready`.
pub(super) async fn ready() -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"))],
        "ready\n",
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            category_label: "job".into(),
            default_category: "loki".into(),
            tenant: None,
            max_line: 1 << 20,
            max_lines_bytes: 1 << 30,
        }
    }

    fn unlimited(_: u64) -> Result<(), ApiError> {
        Ok(())
    }

    fn lines_of(d: &Pushed) -> Vec<String> {
        d.batches
            .lines()
            .map(|(c, l)| format!("{c} {}", String::from_utf8_lossy(l)))
            .collect()
    }

    /// An entry: its time in nanoseconds, line, structured metadata.
    type Entry<'a> = (i64, &'a str, Vec<(&'a str, &'a str)>);

    fn snappy_push(streams: Vec<(&str, Vec<Entry>)>) -> Vec<u8> {
        let push = PushRequest {
            streams: streams
                .into_iter()
                .map(|(labels, entries)| StreamAdapter {
                    labels: labels.into(),
                    entries: entries
                        .into_iter()
                        .map(|(ns, line, meta)| EntryAdapter {
                            timestamp: Some(Timestamp {
                                seconds: ns / 1_000_000_000,
                                nanos: (ns % 1_000_000_000) as i32,
                            }),
                            line: line.into(),
                            structured_metadata: meta
                                .into_iter()
                                .map(|(n, v)| LabelPairAdapter {
                                    name: n.into(),
                                    value: v.into(),
                                })
                                .collect(),
                        })
                        .collect(),
                    hash: 0,
                })
                .collect(),
        };
        snap::raw::Encoder::new()
            .compress_vec(&push.encode_to_vec())
            .unwrap()
    }

    #[test]
    fn labels_parse_as_prometheus_writes_them() {
        let p =
            parse_labels(r#"{job="api", env = "prod",msg="a \"b\"\n\u00e9\x41\101", empty=""}"#)
                .unwrap();
        let got: Vec<(&str, &str)> = p.0.iter().map(|(k, v)| (&**k, &**v)).collect();
        assert_eq!(
            got,
            [
                ("job", "api"),
                ("env", "prod"),
                ("msg", "a \"b\"\néAA"),
                ("empty", "")
            ]
        );
        assert!(parse_labels("{}").unwrap().0.is_empty());
        for bad in [
            "",
            "job=\"x\"",
            "{job=x}",
            "{job=\"x}",
            "{1a=\"x\"}",
            "{job=\"x\" env=\"y\"}",
            "{job=\"\\q\"}",
            "{job=\"\\xff\"}",
            "{job=\"\\u12\"}",
        ] {
            assert!(parse_labels(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lines_are_written_as_serde_writes_them() {
        #[derive(Serialize)]
        struct Line<'a> {
            ts: i128,
            labels: &'a Pairs<'a>,
            line: &'a str,
            #[serde(skip_serializing_if = "is_empty")]
            metadata: &'a Pairs<'a>,
        }
        fn is_empty(p: &&Pairs) -> bool {
            p.0.is_empty()
        }
        let pairs = |kv: &[(&'static str, &'static str)]| {
            Pairs(
                kv.iter()
                    .map(|&(k, v)| (Cow::from(k), Cow::from(v)))
                    .collect(),
            )
        };
        let labelsets = [pairs(&[]), pairs(&[("job", "api"), ("q\"k", "v\\\n")])];
        let metadatas = [pairs(&[]), pairs(&[("trace_id", "abc"), ("x", "\u{1}")])];
        for labels in &labelsets {
            let json = labels_json(labels).unwrap();
            for metadata in &metadatas {
                for ts in [0, -1, i128::MAX, i128::MIN, 1_700_000_000_000_000_001] {
                    for line in ["", "plain", "multi\nline \"quoted\" \\", "é\u{7f}\u{1f}"] {
                        let mut mine = Vec::new();
                        write_line(&mut mine, ts, &json, line, metadata).unwrap();
                        let want = Line {
                            ts,
                            labels,
                            line,
                            metadata,
                        };
                        assert_eq!(
                            String::from_utf8(mine).unwrap(),
                            serde_json::to_string(&want).unwrap()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn snappy_protobuf_and_json_pushes_become_the_same_lines() {
        let raw = snappy_push(vec![
            (
                r#"{job="api", env="prod"}"#,
                vec![
                    (1_700_000_000_000_000_001, "first line", vec![]),
                    (
                        1_700_000_000_500_000_000,
                        "multi\nline \"quoted\"",
                        vec![("trace_id", "abc")],
                    ),
                ],
            ),
            (r#"{env="dev"}"#, vec![(5, "no job", vec![])]),
        ]);
        let json = br#"{"streams":[
            {"stream":{"job":"api","env":"prod"},"values":[
                ["1700000000000000001","first line"],
                ["1700000000500000000","multi\nline \"quoted\"",{"trace_id":"abc"}]]},
            {"stream":{"env":"dev"},"values":[["5","no job"]]}]}"#;
        let want = [
            r#"api {"ts":1700000000000000001,"labels":{"job":"api","env":"prod"},"line":"first line"}"#,
            r#"api {"ts":1700000000500000000,"labels":{"job":"api","env":"prod"},"line":"multi\nline \"quoted\"","metadata":{"trace_id":"abc"}}"#,
            r#"loki {"ts":5,"labels":{"env":"dev"},"line":"no job"}"#,
        ];
        for (body, enc) in [
            (raw.as_slice(), Encoding::SnappyProtobuf),
            (&json[..], Encoding::Json),
        ] {
            let d = decode(body, enc, &rules(), &|_| true, &mut unlimited).unwrap();
            assert_eq!(lines_of(&d), want, "{enc:?}");
            assert_eq!(d.refused, 0);
        }
    }

    #[test]
    fn tenants_prefix_categories_and_refusals_keep_the_rest() {
        let raw = snappy_push(vec![
            (r#"{job="api"}"#, vec![(1, "a", vec![])]),
            (
                r#"{job="bad name"}"#,
                vec![(2, "b", vec![]), (3, "c", vec![])],
            ),
            (r#"{job="secret"}"#, vec![(4, "d", vec![])]),
            (r#"{job="api"}"#, vec![(5, &"x".repeat(100), vec![])]),
        ]);
        let rules = Rules {
            tenant: Some("acme".into()),
            max_line: 80,
            ..rules()
        };
        let d = decode(
            &raw,
            Encoding::SnappyProtobuf,
            &rules,
            &|c| c != "acme.secret",
            &mut unlimited,
        )
        .unwrap();
        assert_eq!(
            lines_of(&d),
            [r#"acme.api {"ts":1,"labels":{"job":"api"},"line":"a"}"#]
        );
        assert_eq!(d.refused, 4);
        assert!(d.reason.unwrap().contains("\"acme.bad name\""));
    }

    #[test]
    fn bad_bodies_are_refused_and_memory_is_asked_for_first() {
        let good = snappy_push(vec![(r#"{job="a"}"#, vec![(1, "x", vec![]); 1000])]);
        let proto = snap::raw::Decoder::new().decompress_vec(&good).unwrap();
        // A line that is not UTF-8 (a `string` on the wire).
        let mut not_utf8 = snappy_push(vec![(r#"{job="a"}"#, vec![(1, "caf\u{e9}", vec![])])]);
        not_utf8 = snap::raw::Decoder::new().decompress_vec(&not_utf8).unwrap();
        let at = not_utf8.windows(4).position(|w| w == b"caf\xc3").unwrap();
        not_utf8.splice(at + 3..at + 5, [0xe9, b'!']);
        let not_utf8 = snap::raw::Encoder::new().compress_vec(&not_utf8).unwrap();
        for (body, enc) in [
            (&b"not snappy"[..], Encoding::SnappyProtobuf),
            (&good[..good.len() - 3], Encoding::SnappyProtobuf),
            (
                &snap::raw::Encoder::new()
                    .compress_vec(&proto[..proto.len() - 1])
                    .unwrap()[..],
                Encoding::SnappyProtobuf,
            ),
            (
                &snap::raw::Encoder::new()
                    .compress_vec(br#"{job="a"}"#)
                    .unwrap()[..],
                Encoding::SnappyProtobuf,
            ),
            (
                br#"{"streams":[{"stream":{},"values":[[1,"x"]]}]}"#,
                Encoding::Json,
            ),
            (
                br#"{"streams":[{"stream":{},"values":[["x","x"]]}]}"#,
                Encoding::Json,
            ),
            (br#"{"streams":"#, Encoding::Json),
            (&not_utf8, Encoding::SnappyProtobuf),
        ] {
            let err = decode(body, enc, &rules(), &|_| true, &mut unlimited).unwrap_err();
            assert!(matches!(err, ApiError::BadRequest(_)), "{err:?}");
        }
        let mut asked = 0;
        let mut count = |n| {
            asked += n;
            Ok(())
        };
        decode(
            &good,
            Encoding::SnappyProtobuf,
            &rules(),
            &|_| true,
            &mut count,
        )
        .unwrap();
        assert!(
            asked >= 1000 * size_of::<EntryAdapter>() as u64 + proto.len() as u64,
            "{asked}"
        );
        let small = Rules {
            max_lines_bytes: 1000,
            ..rules()
        };
        let err = decode(
            &good,
            Encoding::SnappyProtobuf,
            &small,
            &|_| true,
            &mut unlimited,
        )
        .unwrap_err();
        assert!(matches!(err, ApiError::TooLarge(_)), "{err:?}");
    }
}
