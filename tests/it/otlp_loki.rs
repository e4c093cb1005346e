//! Stock agent outputs (docs/ingest.md), continued: OTLP/HTTP logs with the
//! OpenTelemetry Python SDK's exporter and raw OTLP/JSON, Loki push with
//! python-logging-loki (JSON) and a snappy protobuf push built here from
//! Loki's message definitions.

use std::io::Write;

use chunkbus::auth::{Role, TokenSpec};
use prost::Message;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{TestNode, node_lines, run_python};

fn parse(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

/// The lines of a category's chunk files (for a node with tokens, which
/// the reading client does not hold).
fn stored(node: &TestNode, category: &str) -> Vec<Value> {
    let text: Vec<String> = node
        .files(category)
        .into_iter()
        .flat_map(|(_, data)| {
            String::from_utf8(data)
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    parse(&text)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_opentelemetry_sdk_exporter_delivers_records_with_their_attributes() {
    const RECORDS: usize = 3000;
    let node = TestNode::start().await;
    let url = node.url("");
    let count = RECORDS.to_string();
    let got = run_python(
        "otlp_logs.py",
        &["--url", &url, "--service", "checkout", "--count", &count],
    )
    .await;
    assert_eq!(got["flushed"], true, "{got}");
    assert_eq!(got["failure"], 0, "{got}");
    assert!(got["success"].as_u64().unwrap() >= 1, "{got}");
    let lines = parse(&node_lines(&node, "checkout").await);
    assert_eq!(lines.len(), RECORDS);
    let mut ns: Vec<u64> = lines
        .iter()
        .map(|l| l["attributes"]["n"].as_u64().unwrap())
        .collect();
    ns.sort_unstable();
    assert_eq!(ns, (0..RECORDS as u64).collect::<Vec<_>>(), "each once");
    let first = lines.iter().find(|l| l["attributes"]["n"] == 0).unwrap();
    assert_eq!(first["body"], "record 0");
    assert_eq!(first["time_unix_nano"], 1_700_000_000_000_000_000u64);
    assert_eq!(first["severity_number"], 13);
    assert_eq!(first["severity_text"], "WARN");
    assert_eq!(
        first["attributes"],
        json!({"n": 0, "ok": true, "ratio": 0.5, "tags": ["a", "b"]})
    );
    assert_eq!(first["resource"]["service.name"], "checkout");
    assert_eq!(first["resource"]["host.name"], "test-host");
    assert_eq!(
        first["scope"],
        json!({"name": "shipper.test", "version": "1.2.3"})
    );
    node.stop().await;
}

/// A hand-written OTLP/JSON request: one resource with `service`, one log
/// record per body.
fn otlp_json(service: &str, bodies: &[&str]) -> Vec<u8> {
    let records: Vec<Value> = bodies
        .iter()
        .map(|b| {
            json!({
                "timeUnixNano": "1700000000000000001",
                "severityNumber": 9,
                "body": {"stringValue": b},
                "attributes": [{"key": "big", "value": {"intValue": "9007199254740993"}}],
                "traceId": "5b8efff798038103d269b633813fc60c",
                "spanId": "eee19b7ec3c1b174"
            })
        })
        .collect();
    serde_json::to_vec(&json!({
        "resourceLogs": [{
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
            "scopeLogs": [{"scope": {"name": "s"}, "logRecords": records}]
        }]
    }))
    .unwrap()
}

async fn post_otlp(
    node: &TestNode,
    content_type: &str,
    body: Vec<u8>,
    token: Option<&str>,
) -> (StatusCode, String, Vec<u8>) {
    let mut req = node
        .http
        .post(node.url("/v1/logs"))
        .header("content-type", content_type)
        .body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (r.status(), ct, r.bytes().await.unwrap().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_json_gzip_partial_success_and_bad_bodies_are_answered_as_the_spec_says() {
    use opentelemetry_proto::tonic::collector::logs::v1::{
        ExportLogsServiceRequest, ExportLogsServiceResponse,
    };
    const APP: &str = "app-team-secret-0123456789";
    let node = TestNode::start_with(|cfg| {
        cfg.max_body_bytes = 256 << 10;
        cfg.max_inflight_bytes = 16 << 20;
        cfg.auth.tokens = vec![TokenSpec {
            name: Some("app".into()),
            secret: APP.into(),
            roles: vec![Role::Produce],
            categories: Some(vec!["app*".into()]),
        }];
    })
    .await;
    // JSON, gzip: stored, answered in JSON without partial success.
    let r = node
        .http
        .post(node.url("/v1/logs"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .bearer_auth(APP)
        .body(gzip(&otlp_json("app.web", &["one", "two"])))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "application/json");
    let answer: Value = r.json().await.unwrap();
    assert!(answer.get("partialSuccess").is_none(), "{answer}");
    let lines = stored(&node, "app.web");
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["body"], "two");
    assert_eq!(lines[0]["attributes"]["big"], 9_007_199_254_740_993u64);
    assert_eq!(lines[0]["trace_id"], "5b8efff798038103d269b633813fc60c");
    assert_eq!(lines[0]["span_id"], "eee19b7ec3c1b174");

    // Protobuf with a category the token may not write and one that is
    // not a name: 200 with partial success counting them; the rest stored.
    let mut req: ExportLogsServiceRequest =
        serde_json::from_slice(&otlp_json("billing", &["x", "y"])).unwrap();
    let ok: ExportLogsServiceRequest =
        serde_json::from_slice(&otlp_json("app.api", &["kept"])).unwrap();
    let bad: ExportLogsServiceRequest =
        serde_json::from_slice(&otlp_json("no/slash", &["z"])).unwrap();
    req.resource_logs.extend(ok.resource_logs);
    req.resource_logs.extend(bad.resource_logs);
    let (status, ct, body) = post_otlp(
        &node,
        "application/x-protobuf",
        req.encode_to_vec(),
        Some(APP),
    )
    .await;
    assert_eq!(
        (status, ct.as_str()),
        (StatusCode::OK, "application/x-protobuf")
    );
    let answer = ExportLogsServiceResponse::decode(body.as_slice()).unwrap();
    let partial = answer.partial_success.expect("partial success");
    assert_eq!(partial.rejected_log_records, 3);
    assert!(partial.error_message.contains("billing"), "{partial:?}");
    assert_eq!(stored(&node, "app.api").len(), 1);
    assert!(node.files("billing").is_empty());

    // Not a request: 400 with a google.rpc.Status (code 3), nothing stored.
    let mut truncated = ok_request("app.bad").encode_to_vec();
    truncated.truncate(truncated.len() - 3);
    let (status, ct, body) = post_otlp(&node, "application/x-protobuf", truncated, Some(APP)).await;
    assert_eq!(
        (status, ct.as_str()),
        (StatusCode::BAD_REQUEST, "application/x-protobuf")
    );
    let st = RpcStatus::decode(body.as_slice()).unwrap();
    assert_eq!(st.code, 3);
    assert!(st.message.contains("not an OTLP logs request"), "{st:?}");
    let (status, _, body) = post_otlp(
        &node,
        "application/json",
        b"{\"resourceLogs\":[{".to_vec(),
        Some(APP),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let st: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(st["code"], 3);
    // A type OTLP does not know: 415.
    let (status, _, _) = post_otlp(&node, "text/plain", b"x".to_vec(), Some(APP)).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // Larger than the body limit: 413, not retried by exporters.
    let big = otlp_json("app.big", &[&"x".repeat(300 << 10)]);
    let (status, _, _) = post_otlp(&node, "application/json", big, Some(APP)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    // Empty records that would decode to far more memory than the node's
    // in-flight budget allows: refused before they are decoded.
    let many = ExportLogsServiceRequest {
        resource_logs: vec![opentelemetry_proto::tonic::logs::v1::ResourceLogs {
            scope_logs: vec![opentelemetry_proto::tonic::logs::v1::ScopeLogs {
                log_records: vec![Default::default(); 100_000],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let wire = many.encode_to_vec();
    assert!(wire.len() < 256 << 10);
    let (status, _, body) = post_otlp(&node, "application/x-protobuf", wire, Some(APP)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let st = RpcStatus::decode(body.as_slice()).unwrap();
    assert!(st.message.contains("--max-inflight-bytes"), "{st:?}");
    for cat in ["app.bad", "app.big", "otlp"] {
        assert!(node.files(cat).is_empty(), "{cat}");
    }
    assert_eq!(node.get("/healthz").await.status(), StatusCode::OK);
    node.stop().await;
}

fn ok_request(
    service: &str,
) -> opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest {
    serde_json::from_slice(&otlp_json(service, &["a", "b", "c"])).unwrap()
}

/// `google.rpc.Status`, as exporters decode it.
#[derive(Clone, PartialEq, Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

/// Loki's push messages, from its `push.proto`.
#[derive(Clone, PartialEq, Message)]
struct PushRequest {
    #[prost(message, repeated, tag = "1")]
    streams: Vec<Stream>,
}

#[derive(Clone, PartialEq, Message)]
struct Stream {
    #[prost(string, tag = "1")]
    labels: String,
    #[prost(message, repeated, tag = "2")]
    entries: Vec<Entry>,
}

#[derive(Clone, PartialEq, Message)]
struct Entry {
    #[prost(message, optional, tag = "1")]
    timestamp: Option<Timestamp>,
    #[prost(string, tag = "2")]
    line: String,
    #[prost(message, repeated, tag = "3")]
    structured_metadata: Vec<LabelPair>,
}

#[derive(Clone, PartialEq, Message)]
struct LabelPair {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    value: String,
}

#[derive(Clone, PartialEq, Message)]
struct Timestamp {
    #[prost(int64, tag = "1")]
    seconds: i64,
    #[prost(int32, tag = "2")]
    nanos: i32,
}

/// A push as Promtail sends it: snappy-compressed protobuf.
fn snappy_push(streams: &[(&str, &[&str])]) -> Vec<u8> {
    let push = PushRequest {
        streams: streams
            .iter()
            .map(|(labels, lines)| Stream {
                labels: (*labels).into(),
                entries: lines
                    .iter()
                    .enumerate()
                    .map(|(i, l)| Entry {
                        timestamp: Some(Timestamp {
                            seconds: 1_700_000_000,
                            nanos: i as i32,
                        }),
                        line: (*l).into(),
                        structured_metadata: vec![LabelPair {
                            name: "trace_id".into(),
                            value: format!("t{i}"),
                        }],
                    })
                    .collect(),
            })
            .collect(),
    };
    snap::raw::Encoder::new()
        .compress_vec(&push.encode_to_vec())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loki_pushes_from_python_logging_loki_and_snappy_protobuf_are_stored() {
    const ENTRIES: usize = 200;
    let node = TestNode::start().await;
    assert_eq!(node.get("/ready").await.status(), StatusCode::OK);
    let url = node.url("");
    let count = ENTRIES.to_string();
    let got = run_python(
        "loki_push.py",
        &["--url", &url, "--job", "pyloki", "--count", &count],
    )
    .await;
    assert_eq!(got["failed"], 0, "{got}");
    let lines = parse(&node_lines(&node, "pyloki").await);
    assert_eq!(lines.len(), ENTRIES);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["line"], format!("entry {i}"));
        assert_eq!(l["labels"]["job"], "pyloki");
        assert_eq!(l["labels"]["n"], (i % 3).to_string());
        assert!(l["ts"].as_u64().unwrap() > 1_600_000_000_000_000_000);
    }

    // Promtail's encoding, with a tenant: the category is <org>.<job>.
    let r = node
        .http
        .post(node.url("/loki/api/v1/push"))
        .header("content-type", "application/x-protobuf")
        .header("x-scope-orgid", "acme")
        .body(snappy_push(&[
            (r#"{job="api", env="prod"}"#, &["GET /", "multi\nline"]),
            (r#"{env="dev"}"#, &["no job"]),
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let api = parse(&node_lines(&node, "acme.api").await);
    assert_eq!(
        api,
        [
            json!({"ts": 1_700_000_000_000_000_000u64, "labels": {"job": "api", "env": "prod"},
                   "line": "GET /", "metadata": {"trace_id": "t0"}}),
            json!({"ts": 1_700_000_000_000_000_001u64, "labels": {"job": "api", "env": "prod"},
                   "line": "multi\nline", "metadata": {"trace_id": "t1"}}),
        ]
    );
    assert_eq!(node_lines(&node, "acme.loki").await.len(), 1);

    // An empty X-Scope-OrgID is no tenant (as Loki takes it).
    let r = node
        .http
        .post(node.url("/loki/api/v1/push"))
        .header("content-type", "application/x-protobuf")
        .header("x-scope-orgid", "")
        .body(snappy_push(&[(r#"{job="untenanted"}"#, &["plain"])]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(node_lines(&node, "untenanted").await.len(), 1);

    // A stream whose job is not a category name: 400 naming it, the
    // other stream stored (as Loki keeps the valid entries of a batch).
    let r = node
        .http
        .post(node.url("/loki/api/v1/push"))
        .header("content-type", "application/x-protobuf")
        .body(snappy_push(&[
            (r#"{job="bad name"}"#, &["x"]),
            (r#"{job="fine"}"#, &["y"]),
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.text().await.unwrap().contains("\"bad name\""));
    assert_eq!(node_lines(&node, "fine").await.len(), 1);

    // Not snappy, not protobuf, not JSON: 400, nothing stored.
    for (ct, body) in [
        ("application/x-protobuf", b"plain text".to_vec()),
        (
            "application/x-protobuf",
            snap::raw::Encoder::new()
                .compress_vec(b"\x0a\x09{job=\"z\"")
                .unwrap(),
        ),
        (
            "application/json",
            br#"{"streams":[{"stream":{"job":"z"},"values":[[1,"x"]]}]}"#.to_vec(),
        ),
    ] {
        let r = node
            .http
            .post(node.url("/loki/api/v1/push"))
            .header("content-type", ct)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{ct}");
    }
    assert!(node.files("z").is_empty());
    assert_eq!(node.get("/healthz").await.status(), StatusCode::OK);
    node.stop().await;
}
