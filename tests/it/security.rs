//! Tokens, roles, category patterns and the cluster secret, through HTTP.

use std::time::Duration;

use chunkbus::auth::{Role, TokenSpec};
use reqwest::StatusCode;

use crate::harness::{BinNode, CONDITION_DEADLINE, TestNode, serve_command};

const PRODUCER: &str = "producer-secret-0123456789";
const CONSUMER: &str = "consumer-secret-0123456789";
const ADMIN: &str = "admin-secret-0123456789";
const APP_ONLY: &str = "app-only-secret-0123456789";
const CLUSTER: &str = "cluster-secret-0123456789";

fn token(name: &str, secret: &str, roles: &[Role], categories: Option<&[&str]>) -> TokenSpec {
    TokenSpec {
        name: Some(name.into()),
        secret: secret.into(),
        roles: roles.to_vec(),
        categories: categories.map(|c| c.iter().map(|s| s.to_string()).collect()),
    }
}

async fn secured() -> TestNode {
    TestNode::start_with(|cfg| {
        cfg.auth.tokens = vec![
            token("shippers", PRODUCER, &[Role::Produce], None),
            token("readers", CONSUMER, &[Role::Consume], None),
            token("ops", ADMIN, &[Role::Admin], None),
            token(
                "app-team",
                APP_ONLY,
                &[Role::Produce, Role::Consume],
                Some(&["app*"]),
            ),
        ];
        cfg.auth.cluster_secret = Some(CLUSTER.into());
    })
    .await
}

/// Writes a tokens file at `path` with one token `name` holding `secret`
/// and `roles` (e.g. `["admin"]`).
pub(crate) fn write_tokens_file(path: &std::path::Path, name: &str, secret: &str, roles: &[&str]) {
    let roles: Vec<String> = roles.iter().map(|r| format!("{r:?}")).collect();
    std::fs::write(
        path,
        format!(
            "[[token]]\nname = \"{name}\"\nsecret = \"{secret}\"\nroles = [{}]\n",
            roles.join(", ")
        ),
    )
    .unwrap();
}

/// Every role.
const ALL_ROLES: &[&str] = &["produce", "consume", "admin"];

/// Method, path, body, and the status expected with each secret.
type Case<'a> = (&'a str, &'a str, &'a str, &'a [(&'a str, u16)]);

/// Sends `method path` with `secret` as a bearer token (none when empty).
async fn call(node: &TestNode, method: &str, path: &str, secret: &str, body: &str) -> StatusCode {
    let mut req = node
        .http
        .request(method.parse().unwrap(), node.url(path))
        .body(body.to_owned());
    if !secret.is_empty() {
        req = req.bearer_auth(secret);
    }
    req.send().await.unwrap().status()
}

#[tokio::test]
async fn each_endpoint_family_needs_its_role() {
    let node = secured().await;
    // Data to read.
    assert_eq!(
        call(&node, "POST", "/v1/categories/app/lines", PRODUCER, "a\n").await,
        200
    );
    let chunk = "t1-chunk000000000";
    let read = format!("/v1/categories/app/chunks/{chunk}?offset=0");
    let cases: &[Case] = &[
        // (method, path, body, [(secret, status)])
        (
            "POST",
            "/v1/categories/app/lines",
            "b\n",
            &[
                ("", 401),
                ("wrong-secret-0123456789", 401),
                (PRODUCER, 200),
                (CONSUMER, 403),
                (ADMIN, 403),
                (CLUSTER, 403),
            ],
        ),
        // The same route through the router (a category that needs
        // percent-decoding is not served before it: `http::App`).
        (
            "POST",
            "/v1/categories/ap%70/lines",
            "b\n",
            &[("", 401), (PRODUCER, 200), (CONSUMER, 403), (APP_ONLY, 200)],
        ),
        (
            "POST",
            "/v1/categories/ot%68er/lines",
            "b\n",
            &[(PRODUCER, 200), (APP_ONLY, 403)],
        ),
        (
            "POST",
            "/write?category=app",
            "c\n",
            &[("", 401), (PRODUCER, 200), (CONSUMER, 403)],
        ),
        (
            "GET",
            "/v1/categories/app/chunks",
            "",
            &[("", 401), (PRODUCER, 403), (CONSUMER, 200), (CLUSTER, 200)],
        ),
        (
            "GET",
            &read,
            "",
            &[("", 401), (PRODUCER, 403), (CONSUMER, 200)],
        ),
        (
            "GET",
            "/v1/categories",
            "",
            &[("", 401), (PRODUCER, 403), (CONSUMER, 200)],
        ),
        (
            "GET",
            "/v1/categories/app/consumers/c1/next?wait=0s",
            "",
            &[("", 401), (PRODUCER, 403), (CONSUMER, 200)],
        ),
        (
            "PUT",
            "/v1/categories/app/consumers/c1/position",
            r#"{"to":"earliest"}"#,
            &[("", 401), (PRODUCER, 403)],
        ),
        (
            "GET",
            &format!("/read?category=app&chunk={chunk}&off=0&max_size=100"),
            "",
            &[("", 401), (PRODUCER, 403), (CONSUMER, 200)],
        ),
        (
            "GET",
            "/listChunks?category=app",
            "",
            &[("", 401), (CONSUMER, 200)],
        ),
        (
            "POST",
            "/v1/admin/forget-node/t9",
            "",
            &[("", 401), (PRODUCER, 403), (CONSUMER, 403), (ADMIN, 200)],
        ),
        (
            "POST",
            "/v1/internal/changes",
            r#"{"node":"t2","since":0,"wait_ms":0}"#,
            &[("", 401), (ADMIN, 401), (CONSUMER, 401)],
        ),
        (
            "GET",
            "/v1/status",
            "",
            &[("", 401), (PRODUCER, 200), (CLUSTER, 200)],
        ),
        ("GET", "/metrics", "", &[("", 401), (CONSUMER, 200)]),
        ("GET", "/healthz", "", &[("", 200)]),
    ];
    for (method, path, body, expect) in cases {
        for (secret, status) in expect.iter() {
            let got = call(&node, method, path, secret, body).await;
            let who = if secret.is_empty() {
                "no token"
            } else {
                &secret[..8]
            };
            assert_eq!(got.as_u16(), *status, "{method} {path} with {who}");
        }
    }
    // A 401 says how to authenticate; every refusal is a JSON sentence.
    let resp = node
        .http
        .get(node.url("/v1/categories"))
        .send()
        .await
        .unwrap();
    assert!(
        resp.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("Bearer")
    );
    let body: chunkbus_client::ErrorBody = resp.json().await.unwrap();
    assert!(body.error.contains("requires a token"), "{}", body.error);
    let resp = node
        .http
        .post(node.url("/v1/categories/app/lines"))
        .bearer_auth(CONSUMER)
        .body("x\n")
        .send()
        .await
        .unwrap();
    let body: chunkbus_client::ErrorBody = resp.json().await.unwrap();
    assert!(body.error.contains("produce role"), "{}", body.error);
    node.stop().await;
}

/// Every route of the router, as declared with its access: no token gets
/// 401 (but the health check), the cluster secret reads and answers peers
/// but never changes a consumer, produces or administers (it once carried
/// the whole consume role), and a token without the role gets 403.
#[tokio::test]
async fn every_route_of_the_router_checks_its_declared_access() {
    use chunkbus::http::Access;
    let node = secured().await;
    assert_eq!(
        call(&node, "POST", "/v1/categories/app/lines", PRODUCER, "a\n").await,
        200
    );
    let table = chunkbus::http::route_table();
    assert!(table.len() >= 20, "{} routes", table.len());
    for (method, pattern, access) in table {
        let path = pattern
            .replace("{category}", "app")
            .replace("{chunk}", "t1-chunk000000000")
            .replace("{consumer}", "c1")
            .replace("{node}", "t9");
        let path = match path.as_str() {
            "/read" | "/listChunks" | "/write" | "/ack" => format!("{path}?category=app"),
            _ => path,
        };
        let method = method.as_str();
        let denied = |s: StatusCode| s == StatusCode::UNAUTHORIZED || s == StatusCode::FORBIDDEN;
        let anonymous = call(&node, method, &path, "", "").await;
        if access == Access::Open {
            assert_eq!(anonymous, StatusCode::OK, "{method} {pattern}");
        } else {
            assert_eq!(anonymous, StatusCode::UNAUTHORIZED, "{method} {pattern}");
        }
        let peer = call(&node, method, &path, CLUSTER, "").await;
        let peer_allowed = matches!(
            access,
            Access::Open | Access::Anyone | Access::Read | Access::Peer
        );
        assert_eq!(
            !denied(peer),
            peer_allowed,
            "{method} {pattern}: cluster secret got {peer}"
        );
        // A token with none of the route's roles is refused.
        let other = match access {
            Access::Produce => Some(CONSUMER),
            Access::Read | Access::Consume | Access::Admin => Some(PRODUCER),
            Access::Peer => Some(ADMIN),
            Access::Open | Access::Anyone => None,
        };
        if let Some(other) = other {
            let got = call(&node, method, &path, other, "").await;
            assert!(
                denied(got),
                "{method} {pattern}: a token without the role got {got}"
            );
        }
    }
    node.stop().await;
}

#[tokio::test]
async fn category_patterns_limit_a_token_and_hide_other_categories() {
    let node = secured().await;
    let read_billing = "/read?category=billing&chunk=t1-chunk000000000&off=0&max_size=9";
    for (method, path, secret, body, want) in [
        ("POST", "/v1/categories/billing/lines", PRODUCER, "b\n", 200),
        ("POST", "/v1/categories/app.web/lines", APP_ONLY, "a\n", 200),
        ("POST", "/v1/categories/billing/lines", APP_ONLY, "a\n", 403),
        ("GET", "/v1/categories/billing/chunks", APP_ONLY, "", 403),
        ("GET", read_billing, APP_ONLY, "", 403),
    ] {
        assert_eq!(
            call(&node, method, path, secret, body).await,
            want,
            "{method} {path} with {secret}"
        );
    }
    let listed: Vec<String> = node
        .http
        .get(node.url("/v1/categories"))
        .bearer_auth(APP_ONLY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed, ["app.web"]);
    // Path tricks never get past the pattern, and never reach the disk.
    for trick in ["%2e%2e", "..", "..%2Fetc", "app%2F..%2F..", "%00app"] {
        let path = format!("/v1/categories/{trick}/lines");
        for (secret, allowed) in [(APP_ONLY, &[400, 403][..]), (PRODUCER, &[400][..])] {
            let auth = format!("authorization: Bearer {secret}\r\n");
            let (got, body) =
                crate::harness::raw_request_with(node.addr, "POST", &path, &auth, b"x\n").await;
            assert!(
                allowed.contains(&got),
                "{trick} with {}: {got} {body}",
                &secret[..4]
            );
        }
    }
    assert_eq!(
        crate::harness::tree(&node.dir)
            .iter()
            .filter(|e| e.contains("etc"))
            .count(),
        0
    );
    node.stop().await;
}

#[tokio::test]
async fn http_basic_carries_the_token_as_password() {
    let node = secured().await;
    let resp = node
        .http
        .post(node.url("/v1/categories/app/lines"))
        .basic_auth("syslog-ng", Some(PRODUCER))
        .body("from basic\n")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = node
        .http
        .post(node.url("/v1/categories/app/lines"))
        .basic_auth("syslog-ng", Some("wrong-password-0123456789"))
        .body("x\n")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    node.stop().await;
}

/// `chunkbus categories --server SERVER EXTRA...`, with no token from the
/// environment.
async fn cli_categories(server: &str, extra: &[&std::ffi::OsStr]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_chunkbus"))
        .args(["categories", "--server", server])
        .args(extra)
        .env_remove("CHUNKBUS_TOKEN")
        .env_remove("CHUNKBUS_TOKEN_FILE")
        .output()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_client_and_cli_present_tokens() {
    let node = secured().await;
    let client = chunkbus_client::Client::with_token(&node.url(""), Some(PRODUCER)).unwrap();
    client
        .produce("app", "via client\n", &Default::default())
        .await
        .unwrap();
    let anonymous = chunkbus_client::Client::new(&node.url("")).unwrap();
    let err = anonymous
        .produce("app", "x\n", &Default::default())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("401") || err.to_string().contains("token"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{CONSUMER}\n")).unwrap();
    let flag = [std::ffi::OsStr::new("--token-file"), token_file.as_os_str()];
    let out = cli_categories(&node.url(""), &flag).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "app\n");
    let out = cli_categories(&node.url(""), &[]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("token"));
    node.stop().await;
}

/// Writes one line to category `app` on `n1` and waits until `n2` holds it.
async fn replicate_one_line(n1: &chunkbus_client::Client, n2: &chunkbus_client::Client, how: &str) {
    let line = format!("replicated {how}");
    n1.produce("app", format!("{line}\n"), &Default::default())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + CONDITION_DEADLINE;
    while crate::harness::all_lines(n2, "app").await != [line.clone()] {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not replicated {how}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_replicate_with_the_cluster_secret_and_tokens_reload_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    let write_tokens = |secret: &str| write_tokens_file(&tokens, "all", secret, ALL_ROLES);
    write_tokens(ADMIN);
    let secret = dir.path().join("cluster.secret");
    std::fs::write(&secret, CLUSTER).unwrap();
    let mut cluster = crate::cluster::TestCluster::start(
        2,
        &[
            "--tokens-file",
            tokens.to_str().unwrap(),
            "--cluster-secret-file",
            secret.to_str().unwrap(),
        ],
    )
    .await;
    let n1 = chunkbus_client::Client::with_token(&cluster.url(0), Some(ADMIN)).unwrap();
    let n2 = chunkbus_client::Client::with_token(&cluster.url(1), Some(ADMIN)).unwrap();
    replicate_one_line(&n1, &n2, "with the cluster secret").await;
    // A new tokens file takes effect on SIGHUP; the old token stops working.
    const NEW: &str = "rotated-secret-0123456789";
    write_tokens(NEW);
    cluster.nodes[0]
        .as_ref()
        .unwrap()
        .signal(rustix::process::Signal::HUP);
    let rotated = chunkbus_client::Client::with_token(&cluster.url(0), Some(NEW)).unwrap();
    let deadline = tokio::time::Instant::now() + CONDITION_DEADLINE;
    while rotated.status().await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "SIGHUP did not reload the tokens"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(n1.status().await.is_err(), "the old token still works");
    // A broken file keeps the tokens in use.
    std::fs::write(&tokens, "[[token]]\nsecret = 3\n").unwrap();
    cluster.nodes[0]
        .as_ref()
        .unwrap()
        .signal(rustix::process::Signal::HUP);
    let log_deadline = tokio::time::Instant::now() + CONDITION_DEADLINE;
    loop {
        let log = cluster.nodes[0]
            .as_ref()
            .unwrap()
            .stderr
            .lock()
            .unwrap()
            .clone();
        if log.contains("cannot reload the tokens") {
            assert!(
                !log.contains(NEW) && !log.contains(ADMIN),
                "a secret was logged"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < log_deadline,
            "no reload error logged"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(rotated.status().await.is_ok());
    cluster.kill(0).await;
}

#[tokio::test]
async fn without_tokens_a_node_refuses_to_listen_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_chunkbus"))
        .args([
            "serve",
            "--node",
            "t1",
            "--listen",
            "0.0.0.0:0",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("loopback") && err.contains("--allow-anonymous"),
        "{err}"
    );
    let node = BinNode::spawn(serve_command("t1", dir.path())).await;
    let deadline = tokio::time::Instant::now() + CONDITION_DEADLINE;
    while !node.stderr.lock().unwrap().contains("no tokens configured") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no start-up warning"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.kill().await;
}

/// A private CA and a certificate it signed for 127.0.0.1 and localhost, as
/// PEM files in `dir`: (ca, cert, key).
pub(crate) fn test_pki(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "chunkbus test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, ca_cert.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_clients_and_peers() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_pki(dir.path());
    let mut cluster = crate::cluster::TestCluster::start(
        2,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--tls-ca",
            ca.to_str().unwrap(),
        ],
    )
    .await;
    let ca_pem = std::fs::read(&ca).unwrap();
    let https = |i: usize| format!("https://{}", cluster.nodes[i].as_ref().unwrap().addr);
    let n1 = chunkbus_client::Client::with_tls(&https(0), None, Some(&ca_pem)).unwrap();
    let n2 = chunkbus_client::Client::with_tls(&https(1), None, Some(&ca_pem)).unwrap();
    // The peers replicate over HTTPS too.
    replicate_one_line(&n1, &n2, "over TLS").await;
    // Without the CA the certificate is not trusted; plain HTTP gets nowhere.
    let untrusting = chunkbus_client::Client::new(&https(0)).unwrap();
    assert!(untrusting.status().await.is_err());
    let plain = chunkbus_client::Client::new(&https(0).replace("https", "http")).unwrap();
    assert!(plain.status().await.is_err());
    // The CLI takes the CA too.
    let flag = [std::ffi::OsStr::new("--ca-file"), ca.as_os_str()];
    let out = cli_categories(&https(1), &flag).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "app\n");
    cluster.kill(0).await;
    cluster.kill(1).await;
}

/// More sockets than there are TLS handshake slots (1,024), none sending a
/// ClientHello: a real HTTPS client is served at once, because the oldest
/// pending handshake is dropped to make room; before, it waited for the
/// 10 s handshake timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_do_not_hold_every_tls_handshake_slot() {
    // This test holds 1,100 sockets: its own soft limit may be 1,024.
    let mut limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    limit.current = limit.maximum;
    rustix::process::setrlimit(rustix::process::Resource::Nofile, limit).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_pki(dir.path());
    let node = BinNode::start(
        &dir.path().join("data"),
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    )
    .await;
    let mut silent = Vec::new();
    for _ in 0..1100 {
        silent.push(tokio::net::TcpStream::connect(node.addr).await.unwrap());
    }
    let ca_pem = std::fs::read(&ca).unwrap();
    let client =
        chunkbus_client::Client::with_tls(&format!("https://{}", node.addr), None, Some(&ca_pem))
            .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(5), client.status())
        .await
        .expect("an HTTPS client waited behind silent sockets")
        .unwrap();
    assert_eq!(status.node, "t1");
    // The oldest silent sockets were dropped.
    let mut buf = [0u8; 1];
    let closed = tokio::time::timeout(CONDITION_DEADLINE, silent[0].readable()).await;
    assert!(closed.is_ok(), "the oldest silent socket is still held");
    assert!(matches!(silent[0].try_read(&mut buf), Ok(0) | Err(_)));
}

#[tokio::test]
async fn bad_tls_settings_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (_, cert, _) = test_pki(dir.path());
    for (args, says) in [
        (vec!["--tls-cert", cert.to_str().unwrap()], "go together"),
        (
            vec![
                "--tls-cert",
                cert.to_str().unwrap(),
                "--tls-key",
                cert.to_str().unwrap(),
            ],
            "private key",
        ),
    ] {
        let out = serve_command("t1", dir.path())
            .args(&args)
            .output()
            .await
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// Opens a connection that announces a `len`-byte body, sends `sent` bytes
/// of it and stalls.
async fn stalled_sender(
    addr: std::net::SocketAddr,
    len: usize,
    sent: usize,
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/categories/slow/lines HTTP/1.1\r\nhost: t\r\ncontent-length: {len}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&b"x\n".repeat(sent / 2)).await.unwrap();
    s
}

/// The status line a stalled sender finally reads.
async fn answer(mut s: tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(CONDITION_DEADLINE, s.read(&mut buf))
        .await
        .expect("no answer")
        .unwrap_or(0);
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_leave_their_long_polls_hold_nothing() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let node = BinNode::start(dir.path(), &[]).await;
    let http = reqwest::Client::new();
    let put = http
        .post(node.url("/v1/categories/lp/lines"))
        .body("x\n")
        .send()
        .await
        .unwrap();
    let chunk: serde_json::Value = put.json().await.unwrap();
    drop(http);
    let path = format!(
        "/v1/categories/lp/chunks/{}?offset=2&wait=5m",
        chunk["chunk"].as_str().unwrap()
    );
    // Fifty clients each ask for what is not written yet, waiting up to
    // five minutes, and go away.
    let mut polls = Vec::new();
    for _ in 0..50 {
        let mut s = tokio::net::TcpStream::connect(node.addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        polls.push(s);
    }
    let figures = || async {
        let text = crate::harness::metrics_text(&node.url("")).await;
        (
            metric(&text, "chunkbus_read_waiters"),
            metric(&text, "chunkbus_connections"),
        )
    };
    crate::harness::eventually(CONDITION_DEADLINE, "50 long polls parked", || async {
        (figures().await.0 == 50.0).then_some(())
    })
    .await;
    drop(polls);
    // Within seconds, not minutes: no waiter and no connection is left but
    // the one asking for the metrics.
    crate::harness::eventually(Duration::from_secs(10), "the polls released", || async {
        let (waiters, conns) = figures().await;
        (waiters == 0.0 && conns <= 1.0).then_some(())
    })
    .await;
    node.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_slow_senders_hold_neither_memory_nor_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = serve_command("t1", dir.path());
    cmd.args(["--max-inflight-bytes", "16MiB", "--max-body-bytes", "4MiB"])
        .args(["--request-timeout", "8s"]);
    let node = BinNode::spawn(cmd).await;
    let started = tokio::time::Instant::now();
    let mut slow = Vec::new();
    for _ in 0..1000 {
        slow.push(stalled_sender(node.addr, 4 << 20, 2000).await);
    }
    let http = reqwest::Client::new();
    let metrics = || async {
        http.get(node.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let deadline = tokio::time::Instant::now() + CONDITION_DEADLINE;
    loop {
        let open = metric(&metrics().await, "chunkbus_connections");
        if open >= 1000.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {open} connections after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Others are served meanwhile: 4 GiB were announced, 2 MB sent.
    for i in 0..20 {
        let body = format!("{i}\n").repeat(100_000);
        let r = http
            .post(node.url("/v1/categories/fast/lines"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "request {i} while 1,000 senders stall");
    }
    let text = metrics().await;
    assert!(metric(&text, "chunkbus_inflight_bytes") <= (16 << 20) as f64);
    let pid = node.child.id().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert!(
        rss_kib < 200 * 1024,
        "RSS {rss_kib} KiB with 1,000 stalled senders"
    );
    // Each stalled sender gets a 408 once --request-timeout passes.
    let mut answers = Vec::new();
    for s in slow {
        answers.push(answer(s).await);
    }
    let timed_out = answers.iter().filter(|a| a.contains(" 408 ")).count();
    assert_eq!(timed_out, 1000, "{:?}", &answers[..3]);
    let deadline = tokio::time::Instant::now() + CONDITION_DEADLINE;
    while metric(&metrics().await, "chunkbus_inflight_bytes") != 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the budget was not released"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_wait_their_turn() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = serve_command("t1", dir.path());
    cmd.args(["--max-connections", "4", "--request-timeout", "2s"]);
    let node = BinNode::spawn(cmd).await;
    let mut slow = Vec::new();
    for _ in 0..4 {
        slow.push(stalled_sender(node.addr, 100, 10).await);
    }
    // A fifth connection is not served while the four hold their slots...
    let http = reqwest::Client::new();
    let waiting = http.get(node.url("/healthz")).send();
    let early = tokio::time::timeout(Duration::from_millis(500), waiting).await;
    assert!(early.is_err(), "a connection past the cap was served");
    // ... and is once they time out and close.
    for s in slow {
        assert!(answer(s).await.contains(" 408 "));
    }
    let r = http.get(node.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    node.kill().await;
}

#[tokio::test]
async fn oversized_headers_are_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let node = TestNode::start().await;
    let mut s = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let big = "a".repeat(1 << 20);
    let req = format!("GET /healthz HTTP/1.1\r\nhost: t\r\nx-big: {big}\r\n\r\n");
    // The server may close before reading it all.
    let _ = s.write_all(req.as_bytes()).await;
    let mut resp = Vec::new();
    let _ = tokio::time::timeout(CONDITION_DEADLINE, s.read_to_end(&mut resp)).await;
    let text = String::from_utf8_lossy(&resp);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 431"),
        "a 1 MiB header was accepted: {}",
        text.lines().next().unwrap_or("")
    );
    // The node still serves, and a head just within the limit is fine.
    assert_eq!(node.get("/healthz").await.status(), 200);
    let within = "a".repeat(chunkbus::serve::READ_BUFFER_MAX_BYTES - 1024);
    let r = reqwest::Client::new()
        .get(node.url("/healthz"))
        .header("x-big", within)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    node.stop().await;
}

/// A SIGHUP with an emptied tokens file used to turn authentication off:
/// the tokens in use now stay, and the failed reload shows in the status,
/// the metrics and the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_tokens_file_never_turns_authentication_off() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    write_tokens_file(&tokens, "all", ADMIN, ALL_ROLES);
    let node = BinNode::start(
        &dir.path().join("data"),
        &["--tokens-file", tokens.to_str().unwrap()],
    )
    .await;
    let admin = chunkbus_client::Client::with_token(&node.url(""), Some(ADMIN)).unwrap();
    // Refused credentials leave a trace, without the secret presented; the
    // tokens file, readable by everyone here, is warned about.
    let wrong = reqwest::Client::new()
        .get(node.url("/v1/status"))
        .bearer_auth("guessed-secret-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let deadline = tokio::time::Instant::now() + CONDITION_DEADLINE;
    while !node
        .stderr
        .lock()
        .unwrap()
        .contains("refused for their credentials")
    {
        assert!(tokio::time::Instant::now() < deadline, "no refusal logged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = node.stderr.lock().unwrap().clone();
    assert!(!log.contains("guessed-secret"), "{log}");
    assert!(log.contains("readable by every user"), "{log}");
    std::fs::write(&tokens, "").unwrap();
    node.signal(rustix::process::Signal::HUP);
    let deadline = tokio::time::Instant::now() + CONDITION_DEADLINE;
    let error = loop {
        if let Some(e) = admin.status().await.unwrap().tokens_reload_error {
            break e;
        }
        assert!(tokio::time::Instant::now() < deadline, "no reload error");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(error.contains("holds no token"), "{error}");
    let anonymous = reqwest::Client::new()
        .post(node.url("/v1/categories/app/lines"))
        .body("anyone\n")
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let metrics = reqwest::Client::new()
        .get(node.url("/metrics"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("chunkbus_tokens_reload_failures_total 1"),
        "{metrics}"
    );
    assert!(node.stderr.lock().unwrap().contains("holds no token"));
    // Nor does a node start with it.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_chunkbus"))
        .args(["serve", "--listen", "127.0.0.1:0", "--tokens-file"])
        .arg(&tokens)
        .arg("--data-dir")
        .arg(dir.path().join("other"))
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("holds no token"));
}

/// Sockets that never send a request header, and keep-alive connections
/// left idle, are closed after `--idle-timeout`; before, five silent
/// sockets held a `--max-connections 5` node's every slot for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_idle_connections_are_closed_after_the_idle_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let node = BinNode::start(
        dir.path(),
        &["--max-connections", "5", "--idle-timeout", "1s"],
    )
    .await;
    // An idle keep-alive connection: one request answered, then silence.
    let mut idle = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Silent sockets fill the other slots (one is half a header).
    let mut silent = Vec::new();
    for i in 0..4 {
        let mut s = tokio::net::TcpStream::connect(node.addr).await.unwrap();
        if i == 0 {
            s.write_all(b"GET /healthz HTTP/1.1\r\nhos").await.unwrap();
        }
        silent.push(s);
    }
    // A normal client is served once the idle ones are closed.
    let started = tokio::time::Instant::now();
    let r = tokio::time::timeout(
        CONDITION_DEADLINE,
        reqwest::Client::new().get(node.url("/healthz")).send(),
    )
    .await
    .expect("a normal client was kept waiting by idle sockets")
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(started.elapsed() < Duration::from_secs(10));
    for mut s in silent.into_iter().chain([idle]) {
        let closed = tokio::time::timeout(CONDITION_DEADLINE, s.read(&mut buf))
            .await
            .expect("an idle connection stayed open");
        // Closed: end of stream, a reset, or hyper's 408 for a header cut short.
        if let Ok(n) = closed
            && n > 0
        {
            assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 408"));
        }
    }
}

/// A request in progress longer than `--idle-timeout` (a long poll) keeps
/// its connection: its answer arrives whole and the connection takes the
/// next request; it is closed once it has been idle that long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_longer_than_the_idle_timeout_keeps_its_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let node = BinNode::start(dir.path(), &["--idle-timeout", "1s"]).await;
    let produced = produce_line(&node, "first\n").await;
    let mut polling = start_long_poll(&node, &produced).await;
    // Three idle timeouts with the poll parked in the node.
    crate::harness::wait_for_metric_at(
        &reqwest::Client::new(),
        &node.url(""),
        "chunkbus_read_waiters 1",
    )
    .await;
    let mut buf = vec![0u8; 4096];
    let early = tokio::time::timeout(Duration::from_secs(3), polling.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "the long poll's connection was closed or answered early: {early:?}"
    );
    let answer = long_poll_answers_with(&node, &mut polling, "second\n").await;
    // Still open for the next request, which is answered.
    assert!(
        !answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    polling
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    let n = tokio::time::timeout(CONDITION_DEADLINE, polling.read(&mut buf))
        .await
        .expect("the next request was not answered")
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Idle now: closed after the timeout.
    let closed = tokio::time::timeout(CONDITION_DEADLINE, polling.read(&mut buf))
        .await
        .expect("the idle connection stayed open");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
}

/// A socket that sent part of its first request header is closed to make
/// room for a new client at once: it has no request to finish (hyper's
/// graceful shutdown alone would wait for the rest of the header).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_connection_cap_closes_a_header_cut_short_for_a_new_client() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let node = BinNode::start(
        dir.path(),
        &["--max-connections", "2", "--idle-timeout", "10m"],
    )
    .await;
    let mut partial = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(node.addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nhos").await.unwrap();
        partial.push(s);
    }
    a_new_client_is_served_as_one_closes(&node, &mut partial, "sockets with a header cut short")
        .await;
}

/// Writes `line` to `app` on a connection of its own (closed after it).
async fn produce_line(node: &BinNode, line: &str) -> chunkbus_client::ProduceResponse {
    reqwest::Client::new()
        .post(node.url("/v1/categories/app/lines"))
        .header("connection", "close")
        .body(line.to_owned())
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A connection that asks for the lines after `after`, waiting for them.
async fn start_long_poll(
    node: &BinNode,
    after: &chunkbus_client::ProduceResponse,
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut polling = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let chunk = after.chunk.as_deref().unwrap();
    let request = format!(
        "GET /v1/categories/app/chunks/{chunk}?offset={}&wait=5m HTTP/1.1\r\nhost: t\r\n\r\n",
        after.next_offset
    );
    polling.write_all(request.as_bytes()).await.unwrap();
    polling
}

/// Writes `line`, then reads the long poll's answer: 200 with the line.
async fn long_poll_answers_with(
    node: &BinNode,
    polling: &mut tokio::net::TcpStream,
    line: &str,
) -> String {
    use tokio::io::AsyncReadExt;
    produce_line(node, line).await;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(CONDITION_DEADLINE, polling.read(&mut buf))
        .await
        .expect("the long poll never answered")
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with(line), "{answer}");
    answer
}

/// A new client of a node whose connection cap is full of `idle` sockets
/// is served, and at least one of them is closed to make room for it.
async fn a_new_client_is_served_as_one_closes(
    node: &BinNode,
    idle: &mut [tokio::net::TcpStream],
    what: &str,
) {
    use tokio::io::AsyncReadExt;
    let served = tokio::time::timeout(
        CONDITION_DEADLINE,
        reqwest::Client::new()
            .get(node.url("/healthz"))
            .header("connection", "close")
            .send(),
    )
    .await
    .unwrap_or_else(|_| panic!("a new client waited behind {what}"))
    .unwrap();
    assert_eq!(served.status(), StatusCode::OK);
    let mut buf = vec![0u8; 4096];
    let mut closed = 0;
    for s in idle {
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await
        {
            closed += 1;
        }
    }
    assert!(closed >= 1, "none of the {what} was closed");
}

/// With the connection cap full, a new client does not wait for the idle
/// timeout: the connection idle longest (a silent socket, a keep-alive one
/// between requests) is closed to make room. A connection with a request in
/// progress (a long poll) is never chosen, and when every connection is busy
/// a new one waits for a slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_connection_cap_closes_the_longest_idle_connection_for_a_new_client() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    // An idle timeout far beyond the test: only making room can serve it.
    let node = BinNode::start(
        dir.path(),
        &["--max-connections", "3", "--idle-timeout", "10m"],
    )
    .await;
    let produced = produce_line(&node, "first\n").await;
    // Slot 1: a long poll, in progress. Slots 2 and 3: silent sockets.
    let mut polling = start_long_poll(&node, &produced).await;
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(tokio::net::TcpStream::connect(node.addr).await.unwrap());
    }
    // A new client is served: a silent socket made room.
    a_new_client_is_served_as_one_closes(&node, &mut silent, "silent sockets").await;
    // The long poll is still in progress: a write ends it with the line.
    long_poll_answers_with(&node, &mut polling, "second\n").await;
    drop((polling, silent));
    // Every slot busy with a long poll: a new client waits (past the grace
    // after which an idle connection may be closed), and is served as soon
    // as one of them ends.
    let end = produce_line(&node, "third\n").await;
    let mut polls = Vec::new();
    for _ in 0..3 {
        polls.push(start_long_poll(&node, &end).await);
    }
    let mut buf = vec![0u8; 4096];
    let mut waiting = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    waiting
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let early = tokio::time::timeout(Duration::from_millis(1500), waiting.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "a busy connection was closed for a new one: {early:?}"
    );
    for p in &polls {
        let mut probe = [0u8; 1];
        assert!(
            matches!(p.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "a long poll was closed or answered"
        );
    }
    drop(polls.pop());
    let n = tokio::time::timeout(CONDITION_DEADLINE, waiting.read(&mut buf))
        .await
        .expect("the waiting client was never served")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}

/// `forget-node` on a node without tokens used to relay to its peers with
/// the cluster secret, so anyone who reached it could make every peer
/// forget a live node. The relay now carries the caller's own credentials;
/// and a forgotten node that still answers is not treated as lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_node_is_relayed_with_the_callers_authority_only() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    write_tokens_file(&tokens, "ops", ADMIN, &["admin"]);
    let secret = dir.path().join("cluster.secret");
    std::fs::write(&secret, CLUSTER).unwrap();
    let with_tokens = vec![
        "--tokens-file".to_owned(),
        tokens.to_str().unwrap().to_owned(),
    ];
    let cluster = crate::cluster::TestCluster::start_with(
        3,
        &["--cluster-secret-file", secret.to_str().unwrap()],
        vec![Vec::new(), with_tokens.clone(), with_tokens],
        Vec::new(),
    )
    .await;
    let n2 = chunkbus_client::Client::with_token(&cluster.url(1), Some(ADMIN)).unwrap();
    let n3_on = |st: chunkbus_client::NodeStatus| st.peers.into_iter().find(|p| p.name == "n3");
    let deadline = tokio::time::Instant::now() + CONDITION_DEADLINE;
    while !n3_on(n2.status().await.unwrap()).is_some_and(|p| p.connected) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "n2 never reached n3"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Anyone may ask n1 (it has no tokens); n2 checks the caller itself.
    let report: chunkbus_client::ForgetReport = reqwest::Client::new()
        .post(format!("{}/v1/admin/forget-node/n3", cluster.url(0)))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(report.peers["n2"].contains("401"), "{report:?}");
    let peer = n3_on(n2.status().await.unwrap()).unwrap();
    assert!(!peer.forgotten, "n2 forgot a live node: {peer:?}");
    // n1 forgot it, but n3 answers: it is not treated as lost.
    let n1 = chunkbus_client::Client::new(&cluster.url(0)).unwrap();
    while n3_on(n1.status().await.unwrap()).is_some_and(|p| p.forgotten) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "n3 stays forgotten on n1"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // An admin's relay reaches n2.
    let admin = reqwest::Client::new()
        .post(format!("{}/v1/admin/forget-node/n3", cluster.url(0)))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    let report: chunkbus_client::ForgetReport = admin.json().await.unwrap();
    assert_eq!(report.peers["n2"], "ok", "{report:?}");
}

/// A token limited to category patterns learns no other category's name,
/// through `/v1/status` and `/metrics` either (they listed every one).
#[tokio::test]
async fn status_and_metrics_show_a_limited_token_only_its_categories() {
    let node = secured().await;
    for (cat, secret) in [("billing", PRODUCER), ("app.web", APP_ONLY)] {
        let path = format!("/v1/categories/{cat}/lines");
        assert_eq!(call(&node, "POST", &path, secret, "x\n").await, 200);
    }
    let get = |path: &'static str, secret: &'static str| {
        let req = node.http.get(node.url(path)).bearer_auth(secret);
        async move { req.send().await.unwrap().text().await.unwrap() }
    };
    let limited: chunkbus_client::NodeStatus =
        serde_json::from_str(&get("/v1/status", APP_ONLY).await).unwrap();
    assert_eq!(limited.categories, ["app.web"]);
    let metrics = get("/metrics", APP_ONLY).await;
    assert!(metrics.contains("category=\"app.web\""), "{metrics}");
    assert!(!metrics.contains("billing"), "{metrics}");
    // Tokens without patterns see everything.
    let all: chunkbus_client::NodeStatus =
        serde_json::from_str(&get("/v1/status", CONSUMER).await).unwrap();
    assert_eq!(all.categories, ["app.web", "billing"]);
    assert!(get("/metrics", CONSUMER).await.contains("billing"));
    node.stop().await;
}
