//! Test harness: nodes on `127.0.0.1:0`, in-process ([`TestNode`]) or as the
//! real binary ([`BinNode`]), and polling helpers with named deadlines.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use chunkbus::config::ServeConfig;
use chunkbus::storage::SyncPolicy;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

/// How long a node may take to start.
pub const START_DEADLINE: Duration = Duration::from_secs(30);

/// A node's configuration with test defaults (small, fast, on a temp dir).
pub fn config(dir: &Path) -> ServeConfig {
    ServeConfig {
        data_dir: dir.to_owned(),
        node: "t1".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        max_chunk_bytes: 64 << 20,
        rotate_after: Duration::from_secs(3600),
        sync: SyncPolicy::Always,
        preallocate: chunkbus::config::Preallocate::Auto,
        drop_behind: chunkbus::config::DEFAULT_DROP_BEHIND,
        max_line_bytes: 1 << 20,
        max_body_bytes: 8 << 20,
        max_inflight_bytes: 64 << 20,
        disk_high_water_percent: 100,
        peers: Vec::new(),
        advertise_addr: None,
        owner_lost_after: None,
        replicas: None,
        first_start: false,
        replication_wait: Duration::from_secs(30),
        peer_timeout: Duration::from_secs(10),
        s3: None,
        retention: chunkbus::upload::RetentionConfig {
            local_retention: chunkbus::upload::DEFAULT_LOCAL_RETENTION,
            retention: None,
        },
        auth: Default::default(),
        tls: None,
        request_timeout: Duration::from_secs(60),
        idle_timeout: Duration::from_secs(30),
        max_connections: 10_000,
        max_categories: 10_000,
        kafka: None,
        kafka_allow_anonymous: false,
        ingest: Default::default(),
    }
}

/// A node running in this process.
pub struct TestNode {
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), chunkbus::server::ServeError>>,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl TestNode {
    /// A node with the test defaults on a fresh temp dir.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A node whose config `tweak` adjusts.
    pub async fn start_with(tweak: impl FnOnce(&mut ServeConfig)) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = config(tmp.path());
        tweak(&mut cfg);
        let mut node = Self::start_config(cfg).await;
        node._tmp = Some(tmp);
        node
    }

    /// A node with exactly `cfg` (its data dir is not removed afterwards).
    pub async fn start_config(cfg: ServeConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let dir = cfg.data_dir.clone();
        let task = tokio::spawn(chunkbus::server::run(cfg, listener, stop.clone()));
        let node = Self {
            addr,
            http: reqwest::Client::new(),
            stop,
            task,
            dir,
            _tmp: None,
        };
        wait_healthy(&node.http, &node.url("/healthz")).await;
        node
    }

    /// `http://ADDR{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops the node gracefully and waits for it.
    pub async fn stop(self) -> Option<tempfile::TempDir> {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
        self._tmp
    }

    /// POSTs `body` to `/v1/categories/{cat}/lines{query}`.
    pub async fn post(
        &self,
        cat: &str,
        query: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        self.http
            .post(self.url(&format!("/v1/categories/{cat}/lines{query}")))
            .body(body)
            .send()
            .await
            .unwrap()
    }

    /// GETs `path` and returns the response.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.unwrap()
    }

    /// Concatenation of every chunk of `cat` as files on disk, in list order.
    pub fn files(&self, cat: &str) -> Vec<(String, Vec<u8>)> {
        chunk_files(&self.dir.join(cat))
    }
}

/// Every chunk file of a category directory, sorted by name.
pub fn chunk_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = match std::fs::read_dir(dir) {
        // A chunk the node deletes between the listing and the read is
        // left out, as if listed a moment later.
        Ok(rd) => rd
            .map(|e| e.unwrap())
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|e| match std::fs::read(e.path()) {
                Ok(bytes) => Some((e.file_name().to_string_lossy().into_owned(), bytes)),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
                Err(err) => panic!("{}: {err}", e.path().display()),
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    out.sort();
    out
}

/// The text of `GET {base}/metrics`.
pub async fn metrics_text(base: &str) -> String {
    reqwest::get(format!("{}/metrics", base.trim_end_matches('/')))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Polls `/healthz` until it answers, within [`START_DEADLINE`].
pub async fn wait_healthy(http: &reqwest::Client, url: &str) {
    let deadline = tokio::time::Instant::now() + START_DEADLINE;
    loop {
        if let Ok(r) = http.get(url).send().await
            && r.status().is_success()
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node at {url} did not become healthy within {START_DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `chunkbus serve --listen 127.0.0.1:0 --node NODE --data-dir DIR`.
pub fn serve_command(node: &str, dir: &Path) -> Command {
    wrapped_serve_command(&[], node, dir)
}

/// [`serve_command`] run by `wrapper` (a program and its arguments, before
/// the binary's path), e.g. `prlimit --nofile=64:64`; none: run directly.
pub fn wrapped_serve_command(wrapper: &[&str], node: &str, dir: &Path) -> Command {
    let bin = env!("CARGO_BIN_EXE_chunkbus");
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut cmd = Command::new(program);
            cmd.args(args).arg(bin);
            cmd
        }
        None => Command::new(bin),
    };
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--node",
        node,
        "--data-dir",
    ])
    .arg(dir);
    cmd
}

/// The real `chunkbus` binary, running.
pub struct BinNode {
    pub child: Child,
    pub addr: SocketAddr,
    /// Where its Kafka listener listens (`--kafka-listen`), if on.
    pub kafka_addr: Option<SocketAddr>,
    /// Everything the process wrote to stderr so far (also echoed).
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl BinNode {
    /// Runs `chunkbus serve --listen 127.0.0.1:0 --node t1 --data-dir DIR ARGS...`
    /// and waits for its "listening" line.
    pub async fn start(dir: &Path, args: &[&str]) -> Self {
        let mut cmd = serve_command("t1", dir);
        cmd.args(args);
        Self::spawn(cmd).await
    }

    /// Spawns `cmd` (which must run `chunkbus serve`) and waits for it to listen.
    pub async fn spawn(mut cmd: Command) -> Self {
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if cmd.as_std().get_envs().all(|(k, _)| k != "RUST_LOG") {
            cmd.env("RUST_LOG", "warn");
        }
        let mut child = cmd.spawn().expect("spawn chunkbus");
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut errs = BufReader::new(child.stderr.take().unwrap()).lines();
        let log = stderr.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = errs.next_line().await {
                eprintln!("{line}");
                let mut log = log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let mut kafka_addr = None;
        let addr = tokio::time::timeout(START_DEADLINE, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(k) = line.strip_prefix("chunkbus kafka listening on ") {
                    kafka_addr = Some(k.parse::<SocketAddr>().unwrap());
                }
                let rest = line
                    .strip_prefix("chunkbus listening on http://")
                    .or_else(|| line.strip_prefix("chunkbus listening on https://"));
                if let Some(rest) = rest {
                    return rest.parse::<SocketAddr>().unwrap();
                }
            }
            panic!("chunkbus exited before listening");
        })
        .await
        .expect("chunkbus did not start in time");
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self {
            child,
            addr,
            kafka_addr,
            stderr,
        }
    }

    /// `http://ADDR{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Sends `sig` to the process.
    pub fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id().unwrap() as i32).unwrap();
        rustix::process::kill_process(pid, sig).unwrap();
    }

    /// SIGKILLs the process and reaps it.
    pub async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }
}

/// How long a condition may take to become true.
pub const CONDITION_DEADLINE: Duration = Duration::from_secs(20);

/// Polls `check` until it returns `Some`, or fails after `deadline` saying `what`.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "{what} did not happen within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `/metrics` of the node at `base` until it has the line `want`.
pub async fn wait_for_metric_at(http: &reqwest::Client, base: &str, want: &str) {
    let deadline = tokio::time::Instant::now() + CONDITION_DEADLINE;
    loop {
        let text = http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.lines().any(|l| l == want) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metric line {want:?} did not appear within {CONDITION_DEADLINE:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `/metrics` of `node` until it has the line `want`.
pub async fn wait_for_metric(node: &TestNode, want: &str) {
    wait_for_metric_at(&node.http, &node.url(""), want).await;
}

/// Sends one HTTP/1.1 request exactly as written (no URL normalisation, so
/// `..` and `%2e%2e` reach the server) and returns status and body.
pub async fn raw_request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    body: &[u8],
) -> (u16, String) {
    raw_request_with(addr, method, target, "", body).await
}

/// [`raw_request`] with extra header lines (`"name: value\r\n"` each).
pub async fn raw_request_with(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &str,
    body: &[u8],
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{method} {target} HTTP/1.1\r\nhost: test\r\n{headers}content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut resp = Vec::new();
    tokio::time::timeout(CONDITION_DEADLINE, s.read_to_end(&mut resp))
        .await
        .expect("no answer in time")
        .unwrap();
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Every entry under `dir`, relative, sorted (to prove nothing was created).
pub fn tree(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = walkdir::WalkDir::new(dir)
        .min_depth(1)
        .into_iter()
        .map(|e| {
            e.unwrap()
                .path()
                .strip_prefix(dir)
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    out.sort();
    out
}

/// Every line of `category` the node behind `client` holds, chunk by chunk
/// in list order (an unknown category has none).
pub async fn all_lines(client: &chunkbus_client::Client, category: &str) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(chunks) = client.chunks(category).await else {
        return out;
    };
    for chunk in chunks {
        let mut offset = 0;
        while offset < chunk.size {
            let r = client
                .read_chunk(category, &chunk.name, offset, 16 << 20)
                .await
                .unwrap();
            out.extend(
                String::from_utf8(r.data.to_vec())
                    .unwrap()
                    .lines()
                    .map(str::to_owned),
            );
            offset = r.next_offset;
        }
    }
    out
}

/// The Python of the venv `scripts/test` makes in `target/pyvenv` with the
/// client libraries of `tests/python/requirements.txt`, or
/// `CHUNKBUS_TEST_PYTHON`.
pub fn python() -> PathBuf {
    let p = std::env::var_os("CHUNKBUS_TEST_PYTHON").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/pyvenv/bin/python"),
        PathBuf::from,
    );
    assert!(
        p.exists(),
        "{} is missing: scripts/test makes the venv with the Python client libraries",
        p.display()
    );
    p
}

/// Runs `tests/python/<script>` with `args` in the venv (at most two
/// minutes) and returns the JSON object it prints; fails with its stderr
/// when it fails.
pub async fn run_python(script: &str, args: &[&str]) -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(script);
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        Command::new(python())
            .arg(path)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{script} did not finish within two minutes"))
    .unwrap();
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{script} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A real syslog-ng reading messages from a Unix socket and sending them
/// through `destination` (a `destination NAME { ... };` block, with
/// `@include "scl.conf"` when `scl`), with flow control. Killed on drop.
pub struct SyslogNg {
    pub child: Child,
    /// Its source: write messages here, one per line.
    pub input: tokio::net::UnixStream,
    _dir: tempfile::TempDir,
}

impl SyslogNg {
    pub async fn start(destination: &str, name: &str, scl: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("in.sock");
        let include = if scl { "@include \"scl.conf\"\n" } else { "" };
        let conf = format!(
            "@version: 3.38\n\
             {include}\
             options {{ stats_freq(0); }};\n\
             source s_test {{ unix-stream(\"{}\" flags(no-parse)); }};\n\
             {destination}\n\
             log {{ source(s_test); destination({name}); flags(flow-control); }};\n",
            sock.display()
        );
        let conf_path = dir.path().join("syslog-ng.conf");
        std::fs::write(&conf_path, conf).unwrap();
        // Debian installs it in /usr/sbin, which may not be on a user's PATH.
        let bin = ["/usr/sbin/syslog-ng", "/usr/bin/syslog-ng"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("syslog-ng");
        let mut child = Command::new(bin)
            .arg("-F")
            .arg("--no-caps")
            .arg("-f")
            .arg(&conf_path)
            .arg("-R")
            .arg(dir.path().join("persist"))
            .arg("-p")
            .arg(dir.path().join("pid"))
            .arg("-c")
            .arg(dir.path().join("ctl"))
            .kill_on_drop(true)
            .spawn()
            .expect("syslog-ng is installed by scripts/test");
        let deadline = tokio::time::Instant::now() + CONDITION_DEADLINE;
        let input = loop {
            if let Ok(s) = tokio::net::UnixStream::connect(&sock).await {
                break s;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("syslog-ng exited: {status}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "syslog-ng did not open its socket"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Self {
            child,
            input,
            _dir: dir,
        }
    }
}

/// The block of `docs/{doc}` that starts with `start` and ends with the
/// first `};` line after it (a documented syslog-ng destination).
pub fn documented_block(doc: &str, start: &str) -> String {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs").join(doc))
            .unwrap();
    let from = text
        .find(start)
        .unwrap_or_else(|| panic!("docs/{doc} has {start:?}"));
    let end = from + text[from..].find("\n};").expect("the block ends") + 3;
    text[from..end].to_owned()
}

/// Every line of `category` on `node`, read anonymously through its API
/// (none while it has no chunk).
pub async fn node_lines(node: &TestNode, category: &str) -> Vec<String> {
    if node.files(category).is_empty() {
        return Vec::new();
    }
    all_lines(
        &chunkbus_client::Client::new(&node.url("")).unwrap(),
        category,
    )
    .await
}

impl SyslogNg {
    /// Sends `messages` (one per line) and ends the input, then waits (at
    /// most 60 s) until `category` on `node` holds `want` lines; returns
    /// them. Fails if syslog-ng exits first.
    pub async fn deliver(
        &mut self,
        messages: &str,
        node: &TestNode,
        category: &str,
        want: usize,
    ) -> Vec<String> {
        use tokio::io::AsyncWriteExt;
        self.input.write_all(messages.as_bytes()).await.unwrap();
        self.input.shutdown().await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let got = node_lines(node, category).await;
            if got.len() >= want {
                return got;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("syslog-ng exited: {status}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {} of {want} messages arrived",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
