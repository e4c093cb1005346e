//! Real and replayed log shippers: syslog-ng with the documented
//! destination, and the exact request shapes of Vector and Fluent Bit.

use std::collections::BTreeSet;
use std::io::Write;

use chunkbus_client::ProduceResponse;
use reqwest::StatusCode;

use crate::harness::{SyslogNg, TestNode, documented_block, node_lines};

const MESSAGES: usize = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syslog_ng_delivers_every_message_with_the_documented_config() {
    let node = TestNode::start().await;
    let destination = documented_block("shippers.md", "destination d_chunkbus {")
        .replace("http://127.0.0.1:8080", &node.url(""));
    let mut syslog = SyslogNg::start(&destination, "d_chunkbus", false).await;
    let mut payload = String::new();
    for i in 0..MESSAGES {
        payload.push_str(&format!(
            "app[42]: message {i:05} from the syslog-ng test\n"
        ));
    }
    let got = syslog.deliver(&payload, &node, "syslog", MESSAGES).await;
    let mut seen = BTreeSet::new();
    for l in &got {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}"));
        let msg = v["MESSAGE"]
            .as_str()
            .unwrap_or_else(|| panic!("no MESSAGE in {l}"));
        let n: usize = msg.split_whitespace().nth(2).unwrap().parse().unwrap();
        seen.insert(n);
    }
    assert_eq!(seen.len(), MESSAGES, "every message arrived");
    syslog.child.kill().await.unwrap();
    node.stop().await;
}

async fn post(
    node: &TestNode,
    cat: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> ProduceResponse {
    let mut req = node
        .http
        .post(node.url(&format!("/v1/categories/{cat}/lines")))
        .body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    r.json().await.unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vector_and_fluent_bit_request_shapes() {
    let node = TestNode::start().await;
    // Vector, http sink, json codec, newline_delimited framing, gzip: no final newline.
    let vector = b"{\"message\":\"v1\",\"host\":\"h\"}\n{\"message\":\"v2\",\"host\":\"h\"}";
    let p = post(
        &node,
        "shapes",
        &[
            ("content-type", "application/x-ndjson"),
            ("content-encoding", "gzip"),
        ],
        gzip(vector),
    )
    .await;
    assert_eq!(p.lines, 2);
    // Vector with zstd.
    let p = post(
        &node,
        "shapes",
        &[
            ("content-type", "application/x-ndjson"),
            ("content-encoding", "zstd"),
        ],
        zstd::encode_all(&b"{\"message\":\"v3\"}"[..], 3).unwrap(),
    )
    .await;
    assert_eq!(p.lines, 1);
    // Fluent Bit, Format json: a JSON array, gzip.
    let fluent =
        br#"[{"date":1700000000.123,"log":"f1"},{"date":1700000000.456,"log":"f2 with spaces"}]"#;
    let p = post(
        &node,
        "shapes",
        &[
            ("content-type", "application/json"),
            ("content-encoding", "gzip"),
        ],
        gzip(fluent),
    )
    .await;
    assert_eq!(p.lines, 2);
    // Fluent Bit, Format json_lines: NDJSON with a final newline.
    let p = post(
        &node,
        "shapes",
        &[("content-type", "application/json")],
        b"{\"log\":\"f3\"}\n".to_vec(),
    )
    .await;
    assert_eq!(p.lines, 1);
    // One message per request (syslog-ng without batching).
    for i in 0..50 {
        post(
            &node,
            "shapes",
            &[],
            format!("<13>one message {i}").into_bytes(),
        )
        .await;
    }
    let got = node_lines(&node, "shapes").await;
    assert_eq!(
        &got[..6],
        [
            r#"{"message":"v1","host":"h"}"#,
            r#"{"message":"v2","host":"h"}"#,
            r#"{"message":"v3"}"#,
            r#"{"date":1700000000.123,"log":"f1"}"#,
            r#"{"date":1700000000.456,"log":"f2 with spaces"}"#,
            r#"{"log":"f3"}"#,
        ]
    );
    assert_eq!(got.len(), 56);
    assert_eq!(got[55], "<13>one message 49");
    node.stop().await;
}
