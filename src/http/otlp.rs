//! OTLP/HTTP logs, so that the OpenTelemetry Collector's `otlphttp`
//! exporter and the SDKs' OTLP/HTTP log exporters write to chunkbus by
//! changing a URL.
//!
//! `POST /v1/logs` takes an `ExportLogsServiceRequest` as protobuf
//! (`application/x-protobuf`) or in OTLP's JSON mapping
//! (`application/json`), with any `Content-Encoding` the native route
//! takes (gzip, as exporters send it). Every log record becomes one line:
//! a JSON object with its time, severity, body, attributes, trace and span
//! ids, and its resource's and scope's attributes (see [`Line`]), in the
//! category named by the resource attribute `--otlp-category-attribute`
//! (`service.name`), else `--otlp-default-category` (`otlp`).
//!
//! Answers as the OTLP/HTTP specification asks: 200 with an
//! `ExportLogsServiceResponse` in the request's encoding, with
//! `partial_success` naming how many records were refused and why (a
//! category name chunkbus cannot take, a token that may not write there, a
//! record above `--max-line-bytes`); on failure a `google.rpc.Status` with
//! 400 (not retried by exporters), 413, or 429/503/504 with `Retry-After`
//! (retried).

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use chunkbus_client::names::validate_category;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, EntityRef, InstrumentationScope, KeyValue, KeyValueList,
};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;
use serde::Serialize;
use serde::ser::{SerializeMap, SerializeSeq};

use super::produce::{ProduceQuery, PushLines, Pushed, count_shed, push_request};
use super::protobuf::{Shape, decoded_bytes};
use super::{ApiError, AppState, body, lines};

/// The encodings of a request and its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `application/x-protobuf`.
    Protobuf,
    /// `application/json`, OTLP's JSON mapping.
    Json,
}

impl Encoding {
    fn of(headers: &HeaderMap) -> Result<Encoding, ApiError> {
        let (ct, mime) = body::content_type(headers);
        if mime.eq_ignore_ascii_case("application/x-protobuf")
            || mime.eq_ignore_ascii_case("application/protobuf")
        {
            Ok(Encoding::Protobuf)
        } else if mime.eq_ignore_ascii_case("application/json") {
            Ok(Encoding::Json)
        } else {
            Err(ApiError::UnsupportedMediaType(format!(
                "Content-Type {ct:?}: OTLP/HTTP takes application/x-protobuf or application/json"
            )))
        }
    }

    fn content_type(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Encoding::Protobuf => "application/x-protobuf",
            Encoding::Json => "application/json",
        })
    }
}

/// The memory layout of an `ExportLogsServiceRequest`, for the bound of
/// what decoding a body costs.
static REQUEST: Shape = Shape::message::<ExportLogsServiceRequest>(&[(1, &RESOURCE_LOGS)]);
static RESOURCE_LOGS: Shape = Shape::message::<ResourceLogs>(&[(1, &RESOURCE), (2, &SCOPE_LOGS)]);
static RESOURCE: Shape = Shape::message::<Resource>(&[(1, &KEY_VALUE), (3, &ENTITY_REF)]);
static ENTITY_REF: Shape = Shape::message::<EntityRef>(&[(3, &STRING), (4, &STRING)]);
static SCOPE_LOGS: Shape = Shape::message::<ScopeLogs>(&[(1, &SCOPE), (2, &LOG_RECORD)]);
static SCOPE: Shape = Shape::message::<InstrumentationScope>(&[(3, &KEY_VALUE)]);
static LOG_RECORD: Shape = Shape::message::<LogRecord>(&[(5, &ANY_VALUE), (6, &KEY_VALUE)]);
static KEY_VALUE: Shape = Shape::message::<KeyValue>(&[(2, &ANY_VALUE)]);
static ANY_VALUE: Shape = Shape::message::<AnyValue>(&[(5, &ARRAY), (6, &KV_LIST)]);
static ARRAY: Shape = Shape::message::<ArrayValue>(&[(1, &ANY_VALUE)]);
static KV_LIST: Shape = Shape::message::<KeyValueList>(&[(1, &KEY_VALUE)]);
static STRING: Shape = Shape::repeated_string();

/// The largest struct a JSON object of a request can become.
const LARGEST_MESSAGE: usize = {
    let sizes = [
        size_of::<ResourceLogs>(),
        size_of::<Resource>(),
        size_of::<EntityRef>(),
        size_of::<ScopeLogs>(),
        size_of::<InstrumentationScope>(),
        size_of::<LogRecord>(),
        size_of::<KeyValue>(),
        size_of::<AnyValue>(),
    ];
    let mut max = 0;
    let mut i = 0;
    while i < sizes.len() {
        if sizes[i] > max {
            max = sizes[i];
        }
        i += 1;
    }
    max
};

/// An upper bound of the memory a JSON request decodes into: every object
/// as the largest message, four times (a `Vec`'s spare room), every string
/// as an element of a `Vec<String>`, and the bytes of the body.
fn json_decoded_bytes(body: &[u8]) -> u64 {
    let objects = memchr::memchr_iter(b'{', body).count() as u64;
    let strings = memchr::memchr_iter(b'"', body).count() as u64 / 2;
    objects * 4 * LARGEST_MESSAGE as u64
        + strings * (4 * size_of::<String>() as u64 + 16)
        + body.len() as u64
}

/// What `--otlp-*` say, and the limits a request's lines are held to.
#[derive(Debug, Clone)]
pub struct Rules {
    /// The resource attribute that names the category.
    pub category_attribute: String,
    /// The category when the resource has no such attribute.
    pub default_category: String,
    /// Longest line (`--max-line-bytes`): a longer record is refused.
    pub max_line: u64,
    /// Most bytes of lines one request may produce (413 above).
    pub max_lines_bytes: u64,
}

/// Decodes a request (protobuf or JSON) and turns its records into lines.
/// `may_write` says whether the request's token may write a category;
/// `reserve` is asked for the memory the decode and the lines will take,
/// before they take it.
pub fn decode(
    raw: &[u8],
    encoding: Encoding,
    rules: &Rules,
    may_write: &dyn Fn(&str) -> bool,
    reserve: &mut dyn FnMut(u64) -> Result<(), ApiError>,
) -> Result<Pushed, ApiError> {
    let mut out = PushLines::new(rules.max_line, rules.max_lines_bytes, reserve);
    let request = match encoding {
        Encoding::Protobuf => {
            let bound = decoded_bytes(raw, &REQUEST)
                .map_err(|e| ApiError::BadRequest(format!("not an OTLP logs request: {e}")))?;
            out.reserve(bound)?;
            ExportLogsServiceRequest::decode(raw)
                .map_err(|e| ApiError::BadRequest(format!("not an OTLP logs request: {e}")))?
        }
        Encoding::Json => {
            out.reserve(json_decoded_bytes(raw))?;
            serde_json::from_slice::<ExportLogsServiceRequest>(raw)
                .map_err(|e| ApiError::BadRequest(format!("not an OTLP/JSON logs request: {e}")))?
        }
    };
    to_lines(&request, rules, may_write, &mut out)?;
    Ok(out.finish())
}

fn to_lines(
    request: &ExportLogsServiceRequest,
    rules: &Rules,
    may_write: &dyn Fn(&str) -> bool,
    out: &mut PushLines,
) -> Result<(), ApiError> {
    for rl in &request.resource_logs {
        let resource: &[KeyValue] = rl.resource.as_ref().map_or(&[], |r| &r.attributes);
        let records: usize = rl.scope_logs.iter().map(|s| s.log_records.len()).sum();
        let category = match resource
            .iter()
            .find(|kv| kv.key == rules.category_attribute)
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        {
            None => rules.default_category.clone(),
            Some(Value::StringValue(s)) => s.clone(),
            Some(_) => {
                out.refuse(records, || {
                    format!(
                        "the resource attribute {:?} is not a string",
                        rules.category_attribute
                    )
                });
                continue;
            }
        };
        if let Err(e) = validate_category(&category) {
            out.refuse(records, || {
                format!(
                    "the resource attribute {:?} is not a category name: {e}",
                    rules.category_attribute
                )
            });
            continue;
        }
        if !may_write(&category) {
            out.refuse(records, || {
                format!("this token may not write to the category {category:?}")
            });
            continue;
        }
        for sl in &rl.scope_logs {
            // The resource and the scope, the same in each line: written once.
            let tail = Tail::new(resource, sl.scope.as_ref()).to_bytes()?;
            for record in &sl.log_records {
                out.push(&category, "a log record", |line| {
                    write_line(line, &Line::new(record, resource, sl.scope.as_ref()), &tail);
                    Ok(())
                })?;
            }
        }
    }
    Ok(())
}

/// The line stored for one log record. Fields at their default (zero,
/// empty) are left out.
#[derive(Serialize)]
pub struct Line<'a> {
    #[serde(skip_serializing_if = "is_zero")]
    time_unix_nano: u64,
    #[serde(skip_serializing_if = "is_zero")]
    observed_time_unix_nano: u64,
    #[serde(skip_serializing_if = "is_zero_i32")]
    severity_number: i32,
    #[serde(skip_serializing_if = "str::is_empty")]
    severity_text: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    event_name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<Any<'a>>,
    #[serde(skip_serializing_if = "Attributes::is_empty")]
    attributes: Attributes<'a>,
    #[serde(skip_serializing_if = "is_zero_u32")]
    dropped_attributes_count: u32,
    #[serde(skip_serializing_if = "Hex::is_empty")]
    trace_id: Hex<'a>,
    #[serde(skip_serializing_if = "Hex::is_empty")]
    span_id: Hex<'a>,
    #[serde(skip_serializing_if = "is_zero_u32")]
    flags: u32,
    #[serde(skip_serializing_if = "Attributes::is_empty")]
    resource: Attributes<'a>,
    #[serde(skip_serializing_if = "Scope::is_empty")]
    scope: Scope<'a>,
}

impl<'a> Line<'a> {
    /// The line of `record`, from a resource with `resource` attributes,
    /// in `scope`.
    pub fn new(
        record: &'a LogRecord,
        resource: &'a [KeyValue],
        scope: Option<&'a InstrumentationScope>,
    ) -> Self {
        Line {
            time_unix_nano: record.time_unix_nano,
            observed_time_unix_nano: record.observed_time_unix_nano,
            severity_number: record.severity_number,
            severity_text: &record.severity_text,
            event_name: &record.event_name,
            body: record.body.as_ref().map(Any),
            attributes: Attributes(&record.attributes),
            dropped_attributes_count: record.dropped_attributes_count,
            trace_id: Hex(&record.trace_id),
            span_id: Hex(&record.span_id),
            flags: record.flags,
            resource: Attributes(resource),
            scope: Scope {
                name: scope.map_or("", |s| &s.name),
                version: scope.map_or("", |s| &s.version),
                attributes: Attributes(scope.map_or(&[], |s| &s.attributes)),
            },
        }
    }
}

/// The end of every line of one scope: its resource's and its scope's
/// attributes, as [`Line`] writes them.
#[derive(Serialize)]
struct Tail<'a> {
    #[serde(skip_serializing_if = "Attributes::is_empty")]
    resource: Attributes<'a>,
    #[serde(skip_serializing_if = "Scope::is_empty")]
    scope: Scope<'a>,
}

impl<'a> Tail<'a> {
    fn new(resource: &'a [KeyValue], scope: Option<&'a InstrumentationScope>) -> Self {
        Tail {
            resource: Attributes(resource),
            scope: Scope {
                name: scope.map_or("", |s| &s.name),
                version: scope.map_or("", |s| &s.version),
                attributes: Attributes(scope.map_or(&[], |s| &s.attributes)),
            },
        }
    }

    /// Its members without the braces: empty when it has none.
    fn to_bytes(&self) -> Result<Vec<u8>, ApiError> {
        let mut tail = serde_json::to_vec(self)
            .map_err(|e| ApiError::Internal(format!("cannot write a resource as JSON: {e}")))?;
        tail.pop();
        tail.remove(0);
        Ok(tail)
    }
}

/// Writes `r`, byte for byte what it serializes to, without `serde`'s
/// escaping of every key (most of a line's cost): the keys are constants,
/// the strings written with [`lines::push_json_str`], and the resource and
/// the scope are `tail` (from [`Tail::to_bytes`]), written once per scope.
fn write_line(out: &mut Vec<u8>, r: &Line<'_>, tail: &[u8]) {
    let mut o = Members::open(out);
    if r.time_unix_nano != 0 {
        o.key("time_unix_nano").u64(r.time_unix_nano);
    }
    if r.observed_time_unix_nano != 0 {
        o.key("observed_time_unix_nano")
            .u64(r.observed_time_unix_nano);
    }
    if r.severity_number != 0 {
        o.key("severity_number").i64(r.severity_number.into());
    }
    if !r.severity_text.is_empty() {
        o.key("severity_text").str(r.severity_text);
    }
    if !r.event_name.is_empty() {
        o.key("event_name").str(r.event_name);
    }
    if let Some(body) = &r.body {
        write_any(o.key("body").0, body.0);
    }
    if !r.attributes.is_empty() {
        write_attributes(o.key("attributes").0, r.attributes.0);
    }
    if r.dropped_attributes_count != 0 {
        o.key("dropped_attributes_count")
            .u64(r.dropped_attributes_count.into());
    }
    if !r.trace_id.is_empty() {
        o.key("trace_id").hex(r.trace_id.0);
    }
    if !r.span_id.is_empty() {
        o.key("span_id").hex(r.span_id.0);
    }
    if r.flags != 0 {
        o.key("flags").u64(r.flags.into());
    }
    if !tail.is_empty() {
        o.comma();
        o.out.extend_from_slice(tail);
    }
    o.out.push(b'}');
}

/// A JSON object being written: `{` written, a comma before every member
/// but the first.
struct Members<'o> {
    out: &'o mut Vec<u8>,
    first: bool,
}

/// Where one member's value goes.
struct ValueAt<'o>(&'o mut Vec<u8>);

impl<'o> Members<'o> {
    fn open(out: &'o mut Vec<u8>) -> Self {
        out.push(b'{');
        Members { out, first: true }
    }

    fn comma(&mut self) {
        if !std::mem::take(&mut self.first) {
            self.out.push(b',');
        }
    }

    /// `key` needs no escaping (a constant).
    fn key(&mut self, key: &str) -> ValueAt<'_> {
        self.comma();
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
        ValueAt(self.out)
    }
}

impl ValueAt<'_> {
    fn u64(self, v: u64) {
        self.0
            .extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
    }

    fn i64(self, v: i64) {
        self.0
            .extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
    }

    fn str(self, v: &str) {
        lines::push_json_str(self.0, v);
    }

    fn hex(self, v: &[u8]) {
        self.0.push(b'"');
        self.0.extend_from_slice(const_hex::encode(v).as_bytes());
        self.0.push(b'"');
    }
}

/// Writes what [`Any`] serializes to.
fn write_any(out: &mut Vec<u8>, v: &AnyValue) {
    match &v.value {
        None | Some(Value::StringValueStrindex(_)) => out.extend_from_slice(b"null"),
        Some(Value::StringValue(s)) => lines::push_json_str(out, s),
        Some(Value::BoolValue(b)) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Some(Value::IntValue(i)) => ValueAt(out).i64(*i),
        Some(Value::DoubleValue(d)) => {
            serde_json::to_writer(&mut *out, d).expect("a number serializes")
        }
        Some(Value::BytesValue(b)) => {
            out.push(b'"');
            out.extend_from_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(b)
                    .as_bytes(),
            );
            out.push(b'"');
        }
        Some(Value::ArrayValue(a)) => {
            out.push(b'[');
            for (i, v) in a.values.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_any(out, v);
            }
            out.push(b']');
        }
        Some(Value::KvlistValue(kv)) => write_attributes(out, &kv.values),
    }
}

/// Writes what [`Attributes`] serializes to.
fn write_attributes(out: &mut Vec<u8>, kvs: &[KeyValue]) {
    out.push(b'{');
    for (i, kv) in kvs.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        lines::push_json_str(out, &kv.key);
        out.push(b':');
        match &kv.value {
            Some(v) => write_any(out, v),
            None => out.extend_from_slice(b"null"),
        }
    }
    out.push(b'}');
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

fn is_zero_i32(v: &i32) -> bool {
    *v == 0
}

#[derive(Serialize)]
struct Scope<'a> {
    #[serde(skip_serializing_if = "str::is_empty")]
    name: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    version: &'a str,
    #[serde(skip_serializing_if = "Attributes::is_empty")]
    attributes: Attributes<'a>,
}

impl Scope<'_> {
    fn is_empty(&self) -> bool {
        self.name.is_empty() && self.version.is_empty() && self.attributes.is_empty()
    }
}

/// Bytes as lowercase hex (trace and span ids, as OTLP/JSON writes them).
struct Hex<'a>(&'a [u8]);

impl Hex<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for Hex<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&const_hex::encode(self.0))
    }
}

/// Attributes as one JSON object.
struct Attributes<'a>(&'a [KeyValue]);

impl Attributes<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for Attributes<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for kv in self.0 {
            map.serialize_entry(&kv.key, &kv.value.as_ref().map(Any))?;
        }
        map.end()
    }
}

/// An attribute value or a body as plain JSON: strings, booleans, numbers
/// (64-bit integers exactly; a double that is not finite is `null`),
/// arrays, objects (key-value lists), bytes as base64, an empty value as
/// `null`.
struct Any<'a>(&'a AnyValue);

impl Serialize for Any<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.0.value {
            None | Some(Value::StringValueStrindex(_)) => s.serialize_unit(),
            Some(Value::StringValue(v)) => s.serialize_str(v),
            Some(Value::BoolValue(v)) => s.serialize_bool(*v),
            Some(Value::IntValue(v)) => s.serialize_i64(*v),
            Some(Value::DoubleValue(v)) => s.serialize_f64(*v),
            Some(Value::BytesValue(v)) => {
                s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
            }
            Some(Value::ArrayValue(a)) => {
                let mut seq = s.serialize_seq(Some(a.values.len()))?;
                for v in &a.values {
                    seq.serialize_element(&Any(v))?;
                }
                seq.end()
            }
            Some(Value::KvlistValue(kv)) => Attributes(&kv.values).serialize(s),
        }
    }
}

/// `google.rpc.Status`, the body of OTLP/HTTP's failure answers.
#[derive(Clone, PartialEq, Message, Serialize)]
struct Status {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

/// A failure as OTLP/HTTP answers it: the status (with the native
/// answer's `Retry-After` and `Connection`) and a `Status` in the
/// request's encoding.
fn failure(e: ApiError, encoding: Encoding) -> Response {
    let status = e.status();
    // The gRPC code nearest to the HTTP status, as the spec maps them.
    let code = match status.as_u16() {
        400 | 413 | 415 => 3,
        401 => 16,
        403 => 7,
        404 => 5,
        408 | 504 => 4,
        429 | 507 => 8,
        503 => 14,
        _ => 13,
    };
    let status_msg = Status {
        code,
        message: e.to_string(),
    };
    let body = match encoding {
        Encoding::Protobuf => status_msg.encode_to_vec(),
        Encoding::Json => serde_json::to_vec(&status_msg).unwrap_or_default(),
    };
    let mut resp = (status, body).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, encoding.content_type());
    e.with_headers_on(resp)
}

/// `POST /v1/logs`.
pub(super) async fn export(
    State(st): State<Arc<AppState>>,
    query: Result<Query<ProduceQuery>, QueryRejection>,
    req: Request,
) -> Response {
    // A Content-Type OTLP does not know is answered in JSON.
    let encoding = match Encoding::of(req.headers()) {
        Ok(enc) => enc,
        Err(e) => return failure(e, Encoding::Json),
    };
    match export_records(&st, query, req, encoding).await {
        Ok(resp) => resp,
        Err(e) => {
            count_shed(&st, &e);
            failure(e, encoding)
        }
    }
}

async fn export_records(
    st: &AppState,
    query: Result<Query<ProduceQuery>, QueryRejection>,
    req: Request,
    encoding: Encoding,
) -> Result<Response, ApiError> {
    let Query(q) = query?;
    let opts = q.options()?;
    let rules = Rules {
        category_attribute: st.ingest.otlp_category_attribute.clone(),
        default_category: st.ingest.otlp_default_category.clone(),
        max_line: st.limits.max_line_bytes,
        max_lines_bytes: st.limits.max_body_bytes,
    };
    let decoded = push_request(
        st,
        req,
        opts,
        "OTLP decode",
        Box::new(move |raw, may_write, reserve| decode(raw, encoding, &rules, may_write, reserve)),
    )
    .await?;
    let response = ExportLogsServiceResponse {
        partial_success: decoded.reason.map(|reason| ExportLogsPartialSuccess {
            rejected_log_records: decoded.refused as i64,
            error_message: if decoded.refused > 1 {
                format!(
                    "{} log records refused; the first: {reason}",
                    decoded.refused
                )
            } else {
                reason
            },
        }),
    };
    let body = match encoding {
        Encoding::Protobuf => response.encode_to_vec(),
        // OTLP/JSON leaves out what is not set.
        Encoding::Json if response.partial_success.is_none() => b"{}".to_vec(),
        Encoding::Json => serde_json::to_vec(&response)
            .map_err(|e| ApiError::Internal(format!("cannot write an OTLP answer: {e}")))?,
    };
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, encoding.content_type())],
        body,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: Value) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(value) }),
            ..Default::default()
        }
    }

    fn rules() -> Rules {
        Rules {
            category_attribute: "service.name".into(),
            default_category: "otlp".into(),
            max_line: 1 << 20,
            max_lines_bytes: 1 << 30,
        }
    }

    fn request(resources: Vec<(Vec<KeyValue>, Vec<LogRecord>)>) -> ExportLogsServiceRequest {
        ExportLogsServiceRequest {
            resource_logs: resources
                .into_iter()
                .map(|(attributes, records)| ResourceLogs {
                    resource: Some(Resource {
                        attributes,
                        ..Default::default()
                    }),
                    scope_logs: vec![ScopeLogs {
                        scope: Some(InstrumentationScope {
                            name: "lib".into(),
                            version: "1.2".into(),
                            ..Default::default()
                        }),
                        log_records: records,
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .collect(),
        }
    }

    fn lines_of(d: &Pushed) -> Vec<(String, String)> {
        d.batches
            .lines()
            .map(|(c, l)| (c.to_owned(), String::from_utf8_lossy(l).into_owned()))
            .collect()
    }

    fn unlimited(_: u64) -> Result<(), ApiError> {
        Ok(())
    }

    #[test]
    fn a_record_becomes_a_line_with_everything_a_consumer_needs() {
        let record = LogRecord {
            time_unix_nano: 1_700_000_000_123_456_789,
            observed_time_unix_nano: 1_700_000_000_200_000_000,
            severity_number: 9,
            severity_text: "INFO".into(),
            body: Some(AnyValue {
                value: Some(Value::StringValue("user \"x\" logged in".into())),
            }),
            attributes: vec![
                kv("n", Value::IntValue(i64::MAX)),
                kv("ok", Value::BoolValue(true)),
                kv("ratio", Value::DoubleValue(0.5)),
                kv("raw", Value::BytesValue(vec![0, 1, 2])),
                kv(
                    "list",
                    Value::ArrayValue(ArrayValue {
                        values: vec![
                            AnyValue {
                                value: Some(Value::IntValue(1)),
                            },
                            AnyValue { value: None },
                        ],
                    }),
                ),
                kv(
                    "map",
                    Value::KvlistValue(KeyValueList {
                        values: vec![kv("a", Value::StringValue("b".into()))],
                    }),
                ),
            ],
            trace_id: vec![0xab; 16],
            span_id: vec![0x01; 8],
            flags: 1,
            ..Default::default()
        };
        let req = request(vec![(
            vec![
                kv("service.name", Value::StringValue("checkout".into())),
                kv("host.name", Value::StringValue("h1".into())),
            ],
            vec![record, LogRecord::default()],
        )]);
        for encoding in [Encoding::Protobuf, Encoding::Json] {
            let raw = match encoding {
                Encoding::Protobuf => req.encode_to_vec(),
                Encoding::Json => serde_json::to_vec(&req).unwrap(),
            };
            let d = decode(&raw, encoding, &rules(), &|_| true, &mut unlimited).unwrap();
            assert_eq!(d.refused, 0);
            let lines = lines_of(&d);
            assert_eq!(
                lines[0],
                (
                    "checkout".into(),
                    concat!(
                        r#"{"time_unix_nano":1700000000123456789,"observed_time_unix_nano":1700000000200000000,"#,
                        r#""severity_number":9,"severity_text":"INFO","body":"user \"x\" logged in","#,
                        r#""attributes":{"n":9223372036854775807,"ok":true,"ratio":0.5,"raw":"AAEC","list":[1,null],"map":{"a":"b"}},"#,
                        r#""trace_id":"abababababababababababababababab","span_id":"0101010101010101","flags":1,"#,
                        r#""resource":{"service.name":"checkout","host.name":"h1"},"scope":{"name":"lib","version":"1.2"}}"#
                    )
                    .into()
                ),
                "{encoding:?}"
            );
            assert_eq!(
                lines[1].1,
                r#"{"resource":{"service.name":"checkout","host.name":"h1"},"scope":{"name":"lib","version":"1.2"}}"#
            );
        }
    }

    #[test]
    fn lines_are_written_as_serde_writes_them() {
        let s = |v: &str| Value::StringValue(v.into());
        let records = [
            LogRecord::default(),
            LogRecord {
                time_unix_nano: 1,
                observed_time_unix_nano: u64::MAX,
                severity_number: -3,
                severity_text: "WARN \"x\"".into(),
                event_name: "ev\u{1}\\".into(),
                body: Some(AnyValue {
                    value: Some(Value::KvlistValue(KeyValueList {
                        values: vec![
                            kv("q\"k", s("tab\t é")),
                            KeyValue {
                                key: "none".into(),
                                value: None,
                                ..Default::default()
                            },
                            kv("nan", Value::DoubleValue(f64::NAN)),
                            kv("inf", Value::DoubleValue(f64::INFINITY)),
                            kv("d", Value::DoubleValue(-1.25e-300)),
                            kv("i", Value::IntValue(i64::MIN)),
                            kv("b", Value::BoolValue(false)),
                            kv("bytes", Value::BytesValue(b"\xff\x00zz".to_vec())),
                            kv("idx", Value::StringValueStrindex(3)),
                            kv(
                                "arr",
                                Value::ArrayValue(ArrayValue {
                                    values: vec![
                                        AnyValue { value: None },
                                        AnyValue { value: Some(s("")) },
                                    ],
                                }),
                            ),
                            kv("empty", Value::ArrayValue(ArrayValue { values: vec![] })),
                        ],
                    })),
                }),
                attributes: vec![kv("", s("")), kv("a", Value::IntValue(0))],
                dropped_attributes_count: 7,
                trace_id: vec![0, 255],
                span_id: vec![16],
                flags: u32::MAX,
            },
            LogRecord {
                body: Some(AnyValue { value: None }),
                severity_number: 1,
                ..Default::default()
            },
        ];
        let scope = InstrumentationScope {
            name: "lib\n".into(),
            version: String::new(),
            attributes: vec![kv("scoped", Value::BoolValue(true))],
            ..Default::default()
        };
        let resources = [
            vec![],
            vec![kv("service.name", s("svc")), kv("k\\", s("v"))],
        ];
        for resource in &resources {
            for scope in [None, Some(&scope), Some(&InstrumentationScope::default())] {
                let tail = Tail::new(resource, scope).to_bytes().unwrap();
                for record in &records {
                    let line = Line::new(record, resource, scope);
                    let mut mine = Vec::new();
                    write_line(&mut mine, &line, &tail);
                    assert_eq!(
                        String::from_utf8(mine).unwrap(),
                        serde_json::to_string(&line).unwrap()
                    );
                }
            }
        }
    }

    #[test]
    fn records_that_cannot_be_stored_are_counted_with_the_first_reason() {
        let req = request(vec![
            (vec![], vec![LogRecord::default()]),
            (
                vec![kv("service.name", Value::StringValue("bad/name".into()))],
                vec![LogRecord::default(); 2],
            ),
            (
                vec![kv("service.name", Value::IntValue(3))],
                vec![LogRecord::default()],
            ),
            (
                vec![kv("service.name", Value::StringValue("secret".into()))],
                vec![LogRecord::default()],
            ),
            (
                vec![kv("service.name", Value::StringValue("big".into()))],
                vec![LogRecord {
                    severity_text: "x".repeat(200),
                    ..Default::default()
                }],
            ),
        ]);
        let rules = Rules {
            max_line: 150,
            ..rules()
        };
        let d = decode(
            &req.encode_to_vec(),
            Encoding::Protobuf,
            &rules,
            &|c| c != "secret",
            &mut unlimited,
        )
        .unwrap();
        assert_eq!(d.refused, 5);
        assert!(d.reason.as_ref().unwrap().contains("not a category name"));
        assert_eq!(lines_of(&d).len(), 1);
        assert_eq!(lines_of(&d)[0].0, "otlp");
    }

    #[test]
    fn memory_is_reserved_before_it_is_taken_and_bounded() {
        // Ten thousand empty records: 20 KB on the wire, far more decoded.
        let req = request(vec![(vec![], vec![LogRecord::default(); 10_000])]);
        let raw = req.encode_to_vec();
        let mut asked = 0u64;
        let mut count = |n: u64| {
            asked += n;
            Ok(())
        };
        decode(&raw, Encoding::Protobuf, &rules(), &|_| true, &mut count).unwrap();
        assert!(asked > 10_000 * size_of::<LogRecord>() as u64, "{asked}");
        // A refusal stops the decode.
        let mut refuse = |_: u64| Err(ApiError::Overloaded("busy".into()));
        let err = decode(&raw, Encoding::Protobuf, &rules(), &|_| true, &mut refuse).unwrap_err();
        assert!(matches!(err, ApiError::Overloaded(_)));
        // Lines beyond the request limit: 413.
        let rules = Rules {
            max_lines_bytes: 100_000,
            ..rules()
        };
        let err = decode(&raw, Encoding::Protobuf, &rules, &|_| true, &mut unlimited).unwrap_err();
        assert!(matches!(err, ApiError::TooLarge(_)), "{err:?}");
    }

    #[test]
    fn what_is_not_a_request_is_refused() {
        for (raw, enc) in [
            (&b"\x0a\x05\x01"[..], Encoding::Protobuf),
            (b"\xff", Encoding::Protobuf),
            (b"{\"resourceLogs\":", Encoding::Json),
            (b"[1]", Encoding::Json),
        ] {
            let err = decode(raw, enc, &rules(), &|_| true, &mut unlimited).unwrap_err();
            assert!(matches!(err, ApiError::BadRequest(_)), "{raw:?}: {err:?}");
        }
    }
}
