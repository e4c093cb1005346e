//! Stock agent outputs (docs/ingest.md): the Elasticsearch bulk API, with
//! raw requests, the official Python client and syslog-ng's
//! `elasticsearch-http()` destination.

use std::collections::BTreeSet;
use std::io::Write;

use chunkbus::auth::{Role, TokenSpec};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{
    CONDITION_DEADLINE, SyslogNg, TestNode, documented_block, eventually, node_lines, run_python,
};

async fn bulk(node: &TestNode, path: &str, body: &str) -> (StatusCode, Value) {
    let r = node
        .http
        .post(node.url(path))
        .header("content-type", "application/x-ndjson")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()
            .get("x-elastic-product")
            .map(|v| v.to_str().unwrap()),
        Some("Elasticsearch"),
        "{path}"
    );
    (r.status(), r.json().await.unwrap())
}

/// `(action, status)` of every item of a bulk answer.
fn statuses(answer: &Value) -> Vec<(String, u64)> {
    answer["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| {
            let (action, body) = item.as_object().unwrap().iter().next().unwrap();
            (action.clone(), body["status"].as_u64().unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elasticsearch_bulk_stores_documents_and_answers_per_item() {
    let node = TestNode::start().await;
    let body = concat!(
        "{\"index\":{\"_index\":\"web\"}}\n",
        "{ \"message\" : \"GET / 200\", \"n\": 1.50 }\n",
        "{\"create\":{\"_index\":\"web\",\"_id\":\"b7c1\"}}\n",
        "{\"message\":\"GET /a 404\"}\n",
        "{\"delete\":{\"_index\":\"web\",\"_id\":\"1\"}}\n",
        "{\"index\":{\"_index\":\"bad name\"}}\n",
        "{\"a\":1}\n",
        "{\"index\":{}}\n",
        "{\"to\":\"path index\"}\n",
        "{\"index\":{\"_index\":\"web\"}}\n",
        "[\"not an object\"]\n",
    );
    let (status, answer) = bulk(&node, "/api/_bulk", body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["errors"], true);
    assert_eq!(
        statuses(&answer),
        [
            ("index".into(), 201),
            ("create".into(), 201),
            ("delete".into(), 400),
            ("index".into(), 400),
            ("index".into(), 201),
            ("index".into(), 400),
        ]
    );
    let first = &answer["items"][0]["index"];
    assert_eq!(first["_index"], "web");
    assert_eq!(first["result"], "created");
    let id = first["_id"].as_str().unwrap();
    assert!(id.ends_with("@0"), "{id}: where the line starts");
    assert_eq!(answer["items"][1]["create"]["_id"], "b7c1");
    assert_eq!(answer["items"][1]["create"]["_seq_no"], 33);
    assert_eq!(
        answer["items"][3]["index"]["error"]["type"],
        "invalid_index_name_exception"
    );
    assert_eq!(
        node_lines(&node, "web").await,
        [
            r#"{"message":"GET / 200","n":1.50}"#,
            r#"{"message":"GET /a 404"}"#
        ]
    );
    assert_eq!(node_lines(&node, "api").await, [r#"{"to":"path index"}"#]);

    // The same creates again: 409, nothing stored; an index without an id
    // is stored again, as Elasticsearch would.
    let again = concat!(
        "{\"create\":{\"_index\":\"web\",\"_id\":\"b7c1\"}}\n",
        "{\"message\":\"GET /a 404\"}\n",
        "{\"create\":{\"_index\":\"other\",\"_id\":\"b7c1\"}}\n",
        "{\"message\":\"same id, another index\"}\n",
        "{\"index\":{\"_index\":\"web\"}}\n",
        "{\"message\":\"GET / 200\"}",
    );
    let (status, answer) = bulk(&node, "/_bulk", again).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        statuses(&answer),
        [
            ("create".into(), 409),
            ("create".into(), 201),
            ("index".into(), 201)
        ]
    );
    assert_eq!(
        answer["items"][0]["create"]["error"]["type"],
        "version_conflict_engine_exception"
    );
    assert_eq!(node_lines(&node, "web").await.len(), 3);
    assert_eq!(node_lines(&node, "other").await.len(), 1);

    // A body refused whole stores nothing and takes no id: the same
    // create in a good body is then stored.
    let refused =
        "{\"create\":{\"_index\":\"web\",\"_id\":\"c9\"}}\n{\"m\":1}\nnot an action\n{}\n";
    let (status, _) = bulk(&node, "/_bulk", refused).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (_, answer) = bulk(&node, "/_bulk", &refused[..refused.find("not").unwrap()]).await;
    assert_eq!(statuses(&answer), [("create".into(), 201)]);
    assert_eq!(node_lines(&node, "web").await.len(), 4);

    // A gzip body, as Filebeat and Logstash send.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(b"{\"index\":{\"_index\":\"gz\"}}\n{\"z\":1}\n")
        .unwrap();
    let r = node
        .http
        .post(node.url("/_bulk"))
        .header("content-encoding", "gzip")
        .body(gz.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(node_lines(&node, "gz").await, [r#"{"z":1}"#]);

    // What agents ask first.
    let info: Value = node.get("/").await.json().await.unwrap();
    assert_eq!(
        info["version"]["number"],
        chunkbus::http::es::ES_VERSION,
        "{info}"
    );
    let head = node.http.head(node.url("/")).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(head.headers()["x-elastic-product"], "Elasticsearch");
    let license: Value = node.get("/_license").await.json().await.unwrap();
    assert_eq!(license["license"]["status"], "active");
    let health: Value = node.get("/_cluster/health").await.json().await.unwrap();
    assert_eq!(health["status"], "green");
    for path in [
        "/_index_template/logs",
        "/_template/logs",
        "/_ilm/policy/logs",
        "/_ingest/pipeline/logs",
    ] {
        assert_eq!(
            node.get(path).await.status(),
            StatusCode::NOT_FOUND,
            "{path}"
        );
        let r = node
            .http
            .put(node.url(path))
            .json(&json!({"index_patterns": ["logs-*"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        assert_eq!(
            r.json::<Value>().await.unwrap(),
            json!({"acknowledged": true})
        );
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_answer_keeps_what_filter_path_asks_for_and_errors_whole() {
    let node = TestNode::start().await;
    let body = concat!(
        "{\"index\":{\"_index\":\"fp\"}}\n",
        "{\"m\":1}\n",
        "{\"create\":{\"_index\":\"fp\",\"_id\":\"k1\"}}\n",
        "{\"m\":2}\n",
        "{\"index\":{\"_index\":\"bad name\"}}\n",
        "{\"m\":3}\n",
    );
    // Filebeat's, Logstash's and Elastic Agent's filter: a status per
    // item, the error of those that failed, nothing else.
    let filebeat = "/_bulk?filter_path=errors,items.*.error,items.*.status";
    let (status, answer) = bulk(&node, filebeat, body).await;
    assert_eq!(status, StatusCode::OK);
    let reason = answer["items"][2]["index"]["error"]["reason"].clone();
    assert!(reason.as_str().unwrap().contains("bad name"), "{answer}");
    assert_eq!(
        answer,
        json!({"errors": true, "items": [
            {"index": {"status": 201}},
            {"create": {"status": 201}},
            {"index": {"status": 400, "error": {"type": "invalid_index_name_exception", "reason": reason}}},
        ]})
    );
    assert_eq!(node_lines(&node, "fp").await, [r#"{"m":1}"#, r#"{"m":2}"#]);

    // Only the errors: stored items leave the answer; a repeated create is
    // the one error (and is not stored again).
    let again = concat!(
        "{\"create\":{\"_index\":\"fp\",\"_id\":\"k1\"}}\n",
        "{\"m\":2}\n",
        "{\"index\":{\"_index\":\"fp\"}}\n",
        "{\"m\":4}\n",
    );
    let (_, answer) = bulk(&node, "/fp/_bulk?filter_path=items.*.error.type", again).await;
    assert_eq!(
        answer,
        json!({"items": [{"create": {"error": {"type": "version_conflict_engine_exception"}}}]})
    );
    let (_, answer) = bulk(
        &node,
        "/_bulk?filter_path=errors,items.*.error",
        "{\"index\":{\"_index\":\"fp\"}}\n{\"m\":5}\n",
    )
    .await;
    assert_eq!(answer, json!({"errors": false}));
    // Excluding paths.
    let (_, answer) = bulk(
        &node,
        "/_bulk?filter_path=-items.*._shards,-items.*._index,-items.*._version,-took",
        "{\"index\":{\"_index\":\"fp\"}}\n{\"m\":6}\n",
    )
    .await;
    let item = &answer["items"][0]["index"];
    assert_eq!(answer["errors"], false);
    assert!(answer.get("took").is_none(), "{answer}");
    assert_eq!(item["status"], 201);
    assert_eq!(item["result"], "created");
    assert!(item["_id"].as_str().unwrap().contains('@'), "{answer}");
    for gone in ["_shards", "_index", "_version"] {
        assert!(item.get(gone).is_none(), "{gone}: {answer}");
    }
    assert_eq!(node_lines(&node, "fp").await.len(), 5);

    // A request refused whole is answered whole: the agent reads why.
    let (status, answer) = bulk(&node, filebeat, "not an action\n").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(answer["error"]["type"], "illegal_argument_exception");
    assert_eq!(answer["status"], 400);
    // A filter beyond the bounds is refused before the body is read.
    let long = format!("/_bulk?filter_path={}", vec!["a"; 33].join(","));
    let (status, answer) = bulk(&node, &long, "{\"index\":{\"_index\":\"fp\"}}\n{}\n").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        answer["error"]["reason"]
            .as_str()
            .unwrap()
            .contains("32 paths"),
        "{answer}"
    );
    assert_eq!(node_lines(&node, "fp").await.len(), 5);

    // The calls agents make first take the filter too.
    let version: Value = node
        .get("/?filter_path=version.number")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        version,
        json!({"version": {"number": chunkbus::http::es::ES_VERSION}})
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_is_not_a_bulk_request_stores_nothing() {
    let node = TestNode::start_with(|cfg| cfg.max_body_bytes = 64 << 10).await;
    for body in [
        // The first pair is fine; the second action has no document.
        "{\"index\":{\"_index\":\"bad\"}}\n{\"a\":1}\n{\"index\":{\"_index\":\"bad\"}}\n",
        "{\"index\":{\"_index\":\"bad\"}}\n{\"a\":1}\nnot json\n{\"b\":2}\n",
        "{\"index\":{\"_index\":\"bad\"}}\n{\"a\":1}\n{\"upsert\":{}}\n{\"b\":2}\n",
        "{\"index\":{\"_index\":\"bad\"},\"create\":{}}\n{\"a\":1}\n",
    ] {
        let (status, answer) = bulk(&node, "/_bulk", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body:?}");
        assert_eq!(answer["status"], 400);
        assert_eq!(answer["error"]["type"], "illegal_argument_exception");
        assert!(answer["error"]["reason"].as_str().unwrap().len() > 10);
    }
    assert!(node.files("bad").is_empty(), "nothing stored");
    // Too large: 413 before anything is parsed, and the connection is
    // closed (it says so: the next request goes on a new one).
    let doc = format!(
        "{{\"index\":{{}}}}\n{{\"a\":\"{}\"}}\n",
        "x".repeat(70 << 10)
    );
    let r = node
        .http
        .post(node.url("/bad/_bulk"))
        .body(doc)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.headers()["x-elastic-product"], "Elasticsearch");
    assert_eq!(r.headers()["connection"], "close");
    // Bad gzip: 415.
    let r = node
        .http
        .post(node.url("/bad/_bulk"))
        .header("content-encoding", "gzip")
        .body("not gzip at all")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(node.files("bad").is_empty(), "nothing stored");
    assert_eq!(node.get("/healthz").await.status(), StatusCode::OK);
    node.stop().await;
}

/// A client that leaves while its bulk request is parsed (off the runtime,
/// for a large body) takes no `_id`: a retry of its `create` is stored,
/// never answered 409 for a document that is not there. A request whose
/// appends had started when its client left stores all of it and keeps its
/// ids: the retry is answered 409, and no document is stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_request_whose_client_left_takes_no_id() {
    use tokio::io::AsyncWriteExt;
    let node = TestNode::start().await;
    let filler = "{\"index\":{\"_index\":\"gone\"}}\n{\"filler\":true}\n".repeat(50_000);
    let mut gone = 0;
    for round in 0..3 {
        let create = format!(
            "{{\"create\":{{\"_index\":\"left\",\"_id\":\"r{round}\"}}}}\n{{\"id\":\"r{round}\"}}\n"
        );
        // The create first: its id is taken as the parse starts.
        let body = format!("{create}{filler}");
        let mut s = tokio::net::TcpStream::connect(node.addr).await.unwrap();
        let head = format!(
            "POST /_bulk HTTP/1.1\r\nhost: t\r\ncontent-type: application/x-ndjson\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(body.as_bytes()).await.unwrap();
        // Leaves once the node has read the body and holds it for the
        // parse (the body and twice it for its lines).
        eventually(CONDITION_DEADLINE, "the body is read", || async {
            let text = node.get("/metrics").await.text().await.unwrap();
            let held: f64 = text
                .lines()
                .find_map(|l| l.strip_prefix("chunkbus_inflight_bytes ")?.parse().ok())
                .expect("chunkbus_inflight_bytes");
            (held >= 3.0 * body.len() as f64).then_some(())
        })
        .await;
        drop(s);
        // The retry is stored (201) once the left request's parse is over,
        // or answered 409 only if that request's document is there.
        let stored = format!("{{\"id\":\"r{round}\"}}");
        let status = eventually(CONDITION_DEADLINE, "the retried create is stored", || {
            let (create, stored) = (&create, &stored);
            let node = &node;
            async move {
                let (_, answer) = bulk(node, "/_bulk", create).await;
                let status = statuses(&answer)[0].1;
                let there = node_lines(node, "left").await.contains(stored);
                (status == 201 || there).then_some(status)
            }
        })
        .await;
        if status == 409 {
            // Its appends had started: every line of it is stored.
            gone += 50_000;
            eventually(
                CONDITION_DEADLINE,
                "the request that left to be stored",
                || async { (node_lines(&node, "gone").await.len() >= gone).then_some(()) },
            )
            .await;
        }
        // Nothing of it, or all of it.
        assert_eq!(node_lines(&node, "gone").await.len(), gone, "round {round}");
    }
    // Each round's document once.
    assert_eq!(node_lines(&node, "left").await.len(), 3);
    node.stop().await;
}

/// A client that leaves while its bulk request waits for `min_replicas`
/// copies (its lines are stored) leaves its ids taken: a retry of its
/// `create` is answered 409, and the document is stored once. Before, the
/// ids went back when the client left, and the retry stored it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_request_whose_client_left_after_storing_keeps_its_ids() {
    use tokio::io::AsyncWriteExt;
    let cluster = crate::cluster::TestCluster::start(2, &[]).await;
    cluster.set_cut(1, true);
    let create = "{\"create\":{\"_index\":\"left\",\"_id\":\"k1\"}}\n{\"id\":\"k1\"}\n";
    let addr = cluster.url(0);
    let addr = addr.trim_start_matches("http://").trim_end_matches('/');
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /_bulk?min_replicas=1&timeout=60s HTTP/1.1\r\nhost: t\r\ncontent-type: application/x-ndjson\r\ncontent-length: {}\r\n\r\n",
        create.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(create.as_bytes()).await.unwrap();
    let client = cluster.client(0);
    eventually(
        CONDITION_DEADLINE,
        "the document stored, its copy awaited",
        || async {
            let lines = crate::harness::all_lines(&client, "left").await;
            (lines.len() == 1).then_some(())
        },
    )
    .await;
    drop(s);
    let r = reqwest::Client::new()
        .post(format!("{}/_bulk", cluster.url(0)))
        .header("content-type", "application/x-ndjson")
        .body(create)
        .send()
        .await
        .unwrap();
    let answer: Value = r.json().await.unwrap();
    assert_eq!(statuses(&answer), [("create".to_owned(), 409)], "{answer}");
    assert_eq!(
        crate::harness::all_lines(&client, "left").await,
        ["{\"id\":\"k1\"}"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_writes_only_the_indexes_it_may() {
    let token = |name: &str, secret: &str, roles: &[Role], cats: Option<&[&str]>| TokenSpec {
        name: Some(name.into()),
        secret: secret.into(),
        roles: roles.to_vec(),
        categories: cats.map(|c| c.iter().map(|s| s.to_string()).collect()),
    };
    const APP: &str = "app-team-secret-0123456789";
    const READER: &str = "reader-secret-0123456789";
    let node = TestNode::start_with(|cfg| {
        cfg.auth.tokens = vec![
            token("app", APP, &[Role::Produce], Some(&["app*"])),
            token("reader", READER, &[Role::Consume], None),
        ];
    })
    .await;
    let body = "{\"index\":{\"_index\":\"app.web\"}}\n{\"a\":1}\n{\"index\":{\"_index\":\"billing\"}}\n{\"b\":2}\n";
    let send = |secret: Option<&str>| {
        let mut req = node.http.post(node.url("/_bulk")).body(body);
        if let Some(s) = secret {
            // As agents send it: Basic, the token as password.
            req = req.basic_auth("chunkbus", Some(s));
        }
        req.send()
    };
    assert_eq!(send(None).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        send(Some(READER)).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    let r = send(Some(APP)).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(
        statuses(&answer),
        [("index".into(), 201), ("index".into(), 403)]
    );
    let stored = node.files("app.web");
    assert!(stored[0].1.starts_with(b"{\"a\":1}\n"), "{stored:?}");
    assert!(node.files("billing").is_empty());
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_elasticsearch_client_bulk_helper_delivers() {
    let node = TestNode::start().await;
    let url = node.url("");
    let got = run_python(
        "es_bulk.py",
        &["--url", &url, "--index", "pyes", "--count", "2000"],
    )
    .await;
    assert_eq!(got["version"], chunkbus::http::es::ES_VERSION);
    assert_eq!(got["indexed"], 2000, "{got}");
    assert_eq!(got["errors"], 0);
    assert_eq!(got["created"], 10);
    assert_eq!(got["again"], 0, "{got}");
    assert_eq!(got["again_statuses"], json!([409]));
    assert_eq!(got["filtered"], 50, "{got}");
    assert_eq!(
        got["filtered_errors"],
        json!(vec![json!([409, "version_conflict_engine_exception"]); 5]),
        "{got}"
    );
    let stored = node_lines(&node, "pyes").await;
    assert_eq!(stored.len(), 2060);
    let ns: BTreeSet<u64> = stored
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).unwrap()["n"].as_u64())
        .collect();
    assert_eq!(ns.len(), 2000);
    let filtered = stored
        .iter()
        .filter(|l| l.contains("\"filtered\":"))
        .count();
    assert_eq!(filtered, 50);
    let first: Value = serde_json::from_str(&stored[0]).unwrap();
    assert_eq!(first["tags"], json!(["a", "b"]));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syslog_ng_elasticsearch_http_delivers_every_message_with_the_documented_config() {
    const MESSAGES: usize = 10_000;
    let node = TestNode::start().await;
    // The `destination d_elastic { ... };` block of docs/ingest.md.
    let destination = documented_block("ingest.md", "destination d_elastic {")
        .replace("http://127.0.0.1:8080", &node.url(""));
    let mut syslog = SyslogNg::start(&destination, "d_elastic", true).await;
    let mut payload = String::new();
    for i in 0..MESSAGES {
        payload.push_str(&format!(
            "app[42]: message {i:05} through elasticsearch-http\n"
        ));
    }
    let got = syslog.deliver(&payload, &node, "syslog-ng", MESSAGES).await;
    let mut seen = BTreeSet::new();
    for l in &got {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}"));
        assert!(v["@timestamp"].is_string(), "{l}");
        let msg = v["MESSAGE"]
            .as_str()
            .unwrap_or_else(|| panic!("no MESSAGE in {l}"));
        let n: usize = msg
            .split_whitespace()
            .nth(2)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected MESSAGE in {l}"));
        seen.insert(n);
    }
    assert_eq!(seen.len(), MESSAGES, "every message arrived");
    assert_eq!(got.len(), MESSAGES, "none twice");
    syslog.child.kill().await.unwrap();
    node.stop().await;
}

async fn hec_post(
    node: &TestNode,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (StatusCode, Value) {
    let mut req = node.http.post(node.url(path)).body(body.to_owned());
    if let Some(t) = token {
        req = req.header("authorization", format!("Splunk {t}"));
    }
    let r = req.send().await.unwrap();
    (r.status(), r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splunk_hec_events_and_raw_lines_are_stored_with_a_splunk_token() {
    const TOKEN: &str = "hec-token-0123456789abcdef";
    const WEB_ONLY: &str = "web-only-0123456789abcdef";
    let node = TestNode::start_with(|cfg| {
        cfg.auth.tokens = vec![
            TokenSpec {
                name: Some("forwarder".into()),
                secret: TOKEN.into(),
                roles: vec![Role::Produce, Role::Consume],
                categories: None,
            },
            TokenSpec {
                name: Some("web".into()),
                secret: WEB_ONLY.into(),
                roles: vec![Role::Produce],
                categories: Some(vec!["web".into()]),
            },
        ];
    })
    .await;
    let client = chunkbus_client::Client::with_token(&node.url(""), Some(TOKEN)).unwrap();
    let read = |category: &'static str| {
        let client = client.clone();
        async move { crate::harness::all_lines(&client, category).await }
    };

    // Events one after another, as forwarders send them.
    let body = concat!(
        "{\"time\": 1700000000.5, \"host\": \"h1\", \"event\": \"plain text\"}\n",
        "{\"event\": {\"msg\": \"GET /\", \"status\": 200}, \"index\": \"web\", \"fields\": {\"dc\": \"eu\"}}",
        "{\"event\": \"third\", \"sourcetype\": \"app\"}",
    );
    let (status, answer) = hec_post(&node, "/services/collector/event", Some(TOKEN), body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer, json!({"text": "Success", "code": 0}));
    assert_eq!(
        read("hec").await,
        [
            r#"{"time":1700000000.5,"host":"h1","event":"plain text"}"#,
            r#"{"event":"third","sourcetype":"app"}"#
        ]
    );
    assert_eq!(
        read("web").await,
        [r#"{"event":{"msg":"GET /","status":200},"index":"web","fields":{"dc":"eu"}}"#]
    );

    // Raw lines, the index from the query.
    let (status, answer) = hec_post(
        &node,
        "/services/collector/raw?index=raw&sync=true&channel=00000000-0000-0000-0000-000000000000",
        Some(TOKEN),
        "line one\nline two",
    )
    .await;
    assert_eq!((status, answer["code"].clone()), (StatusCode::OK, json!(0)));
    assert_eq!(read("raw").await, ["line one", "line two"]);
    // The native durability parameters are read, and checked.
    let (status, answer) = hec_post(
        &node,
        "/services/collector/raw?index=raw&sync=maybe",
        Some(TOKEN),
        "line three",
    )
    .await;
    assert_eq!(
        (status, answer["code"].clone()),
        (StatusCode::BAD_REQUEST, json!(6))
    );
    assert!(
        answer["text"].as_str().unwrap().contains("sync"),
        "{answer}"
    );

    // The events before the first invalid one are stored, as HEC does.
    let body = "{\"event\":\"kept 1\"}{\"event\":\"kept 2\"}{\"time\":1}{\"event\":\"after\"}";
    let (status, answer) = hec_post(&node, "/services/collector", Some(TOKEN), body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        answer,
        json!({"text": "Event field is required", "code": 12, "invalid-event-number": 2})
    );
    let hec = read("hec").await;
    assert_eq!(
        &hec[2..],
        [r#"{"event":"kept 1"}"#, r#"{"event":"kept 2"}"#]
    );
    for (body, code) in [
        ("", 5),
        ("{\"event\":\"\"}", 13),
        ("{\"event\":\"x\",\"index\":\"no/slash\"}", 7),
        ("not json", 6),
    ] {
        let (status, answer) =
            hec_post(&node, "/services/collector/event", Some(TOKEN), body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body:?}");
        assert_eq!(answer["code"], code, "{body:?}: {answer}");
    }
    assert_eq!(read("hec").await.len(), 4, "nothing more stored");

    // HEC's answers to tokens, and a token limited to one category.
    let (status, answer) =
        hec_post(&node, "/services/collector/event", None, "{\"event\":1}").await;
    assert_eq!(
        (status, answer["code"].clone()),
        (StatusCode::UNAUTHORIZED, json!(2))
    );
    let (status, answer) = hec_post(
        &node,
        "/services/collector/event",
        Some("wrong-token-0123456789"),
        "{\"event\":1}",
    )
    .await;
    assert_eq!(
        (status, answer["code"].clone()),
        (StatusCode::UNAUTHORIZED, json!(3))
    );
    let body = "{\"event\":\"ok\",\"index\":\"web\"}{\"event\":\"not mine\"}";
    let (status, answer) = hec_post(&node, "/services/collector/event", Some(WEB_ONLY), body).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(answer["invalid-event-number"], 1, "{answer}");
    assert_eq!(read("web").await.len(), 2);
    assert_eq!(read("hec").await.len(), 4);

    // Health needs no token.
    let health = node.get("/services/collector/health").await;
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(health.json::<Value>().await.unwrap()["code"], 17);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_turned_off_is_not_served() {
    let node = TestNode::start_with(|cfg| {
        cfg.ingest.apis = [chunkbus::config::IngestApi::Es].into_iter().collect();
    })
    .await;
    for path in ["/services/collector/event", "/v1/logs", "/loki/api/v1/push"] {
        let r = node
            .http
            .post(node.url(path))
            .body("{\"event\":1}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
    }
    let (status, _) = bulk(&node, "/_bulk", "{\"index\":{\"_index\":\"on\"}}\n{}\n").await;
    assert_eq!(status, StatusCode::OK);
    node.stop().await;
}
