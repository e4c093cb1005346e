//! Writes the request bodies of `scripts/bench ingest` for the protobuf
//! APIs, encoded as their agents encode them: an OTLP/HTTP logs request
//! (protobuf) and a Loki push (snappy-compressed protobuf), each carrying
//! `DOCS` records. Not part of the product.
//!
//! ```text
//! ingest_bodies DOCS OTLP_FILE LOKI_FILE
//! ```
//!
//! Each record is a log line as the other APIs of the benchmark carry it
//! (`{"ts":..,"lvl":"info","msg":"GET /a 200"}`): the OTLP record has a
//! time, a severity and that body, the Loki entry a time and that line.

use chunkbus::http::loki_push::{EntryAdapter, PushRequest, StreamAdapter, Timestamp};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;

const LINE: &str = r#"{"ts":"2026-11-22T01:00:00Z","lvl":"info","msg":"GET /a 200"}"#;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, docs, otlp_path, loki_path] = &args[..] else {
        eprintln!("usage: ingest_bodies DOCS OTLP_FILE LOKI_FILE");
        std::process::exit(2);
    };
    let docs: usize = docs.parse().expect("DOCS is a number");
    let otlp = ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(Resource {
                attributes: vec![KeyValue {
                    key: "service.name".into(),
                    value: Some(AnyValue {
                        value: Some(Value::StringValue("bench".into())),
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            scope_logs: vec![ScopeLogs {
                log_records: (0..docs)
                    .map(|i| LogRecord {
                        time_unix_nano: 1_795_000_000_000_000_000 + i as u64,
                        severity_number: 9,
                        severity_text: "INFO".into(),
                        body: Some(AnyValue {
                            value: Some(Value::StringValue(LINE.into())),
                        }),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    std::fs::write(otlp_path, otlp.encode_to_vec()).expect("write the OTLP body");
    let push = PushRequest {
        streams: vec![StreamAdapter {
            labels: r#"{job="bench", host="h1"}"#.into(),
            entries: (0..docs)
                .map(|i| EntryAdapter {
                    timestamp: Some(Timestamp {
                        seconds: 1_795_000_000,
                        nanos: i as i32,
                    }),
                    line: LINE.into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
    };
    let snappy = snap::raw::Encoder::new()
        .compress_vec(&push.encode_to_vec())
        .expect("snappy");
    std::fs::write(loki_path, snappy).expect("write the Loki body");
}
