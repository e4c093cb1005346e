//! The web console (`/ui`) in a real browser, its JSON, and `chunkbus top`.

use std::time::Duration;

use chunkbus::auth::{Role, TokenSpec};
use chunkbus_client::{Client, ProduceOptions};
use fantoccini::Locator;
use tokio_util::sync::CancellationToken;

use crate::browser::Browser;
use crate::cluster::TestCluster;
use crate::harness::TestNode;
use crate::s3_server::TestS3;

/// Produces a few lines to each of `categories` through `client` every
/// 100 ms until `stop`.
fn keep_producing(
    client: Client,
    categories: &'static [&'static str],
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut n = 0u64;
        while !stop.is_cancelled() {
            for c in categories {
                let lines: String = (0..5)
                    .map(|i| format!("{{\"n\":{n},\"i\":{i}}}\n"))
                    .collect();
                // A node being killed may refuse; the next round goes on.
                let _ = client.produce(c, lines, &ProduceOptions::default()).await;
            }
            n += 1;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = stop.cancelled() => {}
            }
        }
    })
}

/// Describes the console page for failure messages.
const DESCRIBE: &str = "return document.body.innerText.slice(0, 3000);";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_nodes_rates_lagging_consumers_and_a_dead_node_in_a_browser() {
    let s3 = TestS3::start().await;
    let env = s3
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    let mut cluster = TestCluster::start_with(
        3,
        &["--max-chunk-bytes", "64KiB", "--rotate-after", "2s"],
        vec![s3.args(); 3],
        env,
    )
    .await;
    let n1 = cluster.client(0);
    let stop = CancellationToken::new();
    let producer = keep_producing(n1.clone(), &["app", "web.access"], stop.clone());
    // A consumer that never acks while lines keep coming.
    n1.produce("app", "first\n", &ProduceOptions::default())
        .await
        .unwrap();
    n1.set_position("app", "laggard", "earliest").await.unwrap();

    let browser = Browser::start().await;
    // A browser asking for `/` is sent to the console.
    browser.client.goto(&cluster.url(2)).await.unwrap();
    let here = browser.client.current_url().await.unwrap();
    assert_eq!(here.path(), "/ui", "{here}");

    browser
        .wait_for(
            "three nodes up",
            "return document.querySelectorAll('#nodes tr[data-node][data-state=up]').length === 3 \
             && document.getElementById('nodes-up').textContent === '3 up';",
            DESCRIBE,
        )
        .await;
    browser
        .wait_for(
            "both categories with lines arriving",
            "const rate = (c) => Number(document.querySelector(`#categories tr[data-category='${c}']`)?.dataset.linesPerSecond || 0); \
             return rate('app') > 0 && rate('web.access') > 0 && Number(document.getElementById('lines-in').textContent.replace(/[^0-9.]/g, '')) > 0;",
            DESCRIBE,
        )
        .await;
    browser
        .wait_for(
            "the lagging consumer marked stalled",
            "const r = document.querySelector(\"#consumers tr[data-consumer='app/laggard']\"); \
             return !!r && r.dataset.stalled === 'true' && r.innerText.includes('stalled');",
            DESCRIBE,
        )
        .await;
    // The uploads show: chunks in S3 and no error beside S3 (n3 uploads
    // nothing of its own; its backlog is 0).
    browser
        .wait_for(
            "uploaded chunks counted",
            "const r = document.querySelector(\"#categories tr[data-category='app']\"); \
             return !!r && /^\\d+: \\d+ \\/ \\d+ \\/ [1-9]\\d* \\//.test(r.cells[4].innerText) \
             && document.getElementById('s3-backlog').textContent.startsWith('0 chunks') \
             && document.getElementById('under-replicated').textContent === '0 (replicas: all)';",
            DESCRIBE,
        )
        .await;
    if std::env::var_os("UPDATE_SCREENSHOTS").is_some_and(|v| v == "1") {
        let png = browser.client.screenshot().await.unwrap();
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/console.png");
        std::fs::write(path, png).unwrap();
    }

    // A killed node shows as down within a few refreshes.
    cluster.kill(1).await;
    browser
        .wait_for(
            "n2 shown down",
            "const r = document.querySelector(\"#nodes tr[data-node='n2']\"); \
             return !!r && r.dataset.state === 'down' && r.innerText.includes('down') \
             && document.getElementById('nodes-up').textContent === '2 up, 1 down';",
            DESCRIBE,
        )
        .await;

    // The category view: its chunks with their state, and a tail that
    // follows new lines (written on n1, shown on n3 once copied).
    let app = format!("{}/ui#/category/app", cluster.url(2));
    browser.client.goto(&app).await.unwrap();
    browser
        .wait_for(
            "the chunks of app",
            "return document.getElementById('category-title').textContent === 'app' \
             && document.querySelectorAll('#chunks tr[data-chunk]').length > 0 \
             && [...document.querySelectorAll('#chunks tr[data-chunk]')].some((r) => r.innerText.includes('S3'));",
            DESCRIBE,
        )
        .await;
    // Give the tail its first listing, then write a line it must show.
    browser
        .wait_for(
            "the tail following",
            "return document.getElementById('tail').textContent.length > 0;",
            DESCRIBE,
        )
        .await;
    let marker = format!("tail-marker-{}", std::process::id());
    n1.produce("app", format!("{marker}\n"), &ProduceOptions::default())
        .await
        .unwrap();
    browser
        .wait_for(
            "the new line in the tail",
            &format!("return document.getElementById('tail').textContent.includes('{marker}');"),
            DESCRIBE,
        )
        .await;

    stop.cancel();
    producer.await.unwrap();
    browser.close().await;
}

/// `chunkbus_read_waiters` of the node at `base`.
async fn read_waiters(base: &str) -> f64 {
    let text = crate::harness::metrics_text(base).await;
    text.lines()
        .find_map(|l| l.strip_prefix("chunkbus_read_waiters ")?.parse().ok())
        .expect("chunkbus_read_waiters")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_a_category_view_cancels_its_tail_long_polls() {
    use crate::harness::eventually;
    let node = TestNode::start().await;
    let client = Client::new(&node.url("")).unwrap();
    client
        .produce("quiet", "x\n", &ProduceOptions::default())
        .await
        .unwrap();
    let browser = Browser::start().await;
    browser
        .client
        .goto(&format!("{}/ui#/category/quiet", node.url("")))
        .await
        .unwrap();
    // Nothing is written: the tail's read of the owner's chunk is parked.
    let base = node.url("");
    eventually(Duration::from_secs(30), "the tail's long poll", || async {
        (read_waiters(&base).await >= 1.0).then_some(())
    })
    .await;
    // To the overview: the long poll (20 s) ends now, not when it times out.
    browser.eval("location.hash = ''; return true;").await;
    eventually(
        Duration::from_secs(8),
        "the long poll cancelled",
        || async { (read_waiters(&base).await == 0.0).then_some(()) },
    )
    .await;
    browser.close().await;
}

/// Types `secret` into the console's token form, as a person would, and
/// submits it.
async fn submit_token(browser: &Browser, secret: &str) {
    let field = browser.client.find(Locator::Id("token")).await.unwrap();
    field.send_keys(secret).await.unwrap();
    browser
        .client
        .find(Locator::Css("#token-form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

const ALL: &str = "all-secret-0123456789";
const APP_ONLY: &str = "app-only-secret-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_nothing_without_a_token_and_only_what_a_token_may_see() {
    let token = |name: &str, secret: &str, roles: &[Role], cats: Option<&[&str]>| TokenSpec {
        name: Some(name.into()),
        secret: secret.into(),
        roles: roles.to_vec(),
        categories: cats.map(|c| c.iter().map(|s| s.to_string()).collect()),
    };
    let node = TestNode::start_with(|cfg| {
        cfg.auth.tokens = vec![
            token(
                "ops",
                ALL,
                &[Role::Produce, Role::Consume, Role::Admin],
                None,
            ),
            token(
                "app-team",
                APP_ONLY,
                &[Role::Produce, Role::Consume],
                Some(&["app*"]),
            ),
        ];
    })
    .await;
    let all = Client::with_token(&node.url(""), Some(ALL)).unwrap();
    for c in ["app1", "other"] {
        all.produce(c, "x\n", &ProduceOptions::default())
            .await
            .unwrap();
    }
    // The JSON needs a token; the page itself holds no data.
    let status = |path: &str| {
        let url = node.url(path);
        let http = node.http.clone();
        async move { http.get(url).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status("/v1/console").await, 401);
    assert_eq!(status("/ui").await, 200);

    let browser = Browser::start().await;
    browser.client.goto(&node.url("/ui")).await.unwrap();
    browser
        .wait_for(
            "the token form, and nothing else",
            "return !document.getElementById('login').hidden \
             && document.getElementById('overview').hidden \
             && document.querySelectorAll('tr[data-category], tr[data-node]').length === 0;",
            DESCRIBE,
        )
        .await;

    // A wrong token is refused and the form stays.
    submit_token(&browser, "not-a-token").await;
    browser
        .wait_for(
            "the wrong token refused",
            "return document.getElementById('login-error').textContent.includes('refused') \
             && document.getElementById('overview').hidden;",
            DESCRIBE,
        )
        .await;

    // A token limited to app* sees app1, not other, and no error log.
    submit_token(&browser, APP_ONLY).await;
    browser
        .wait_for(
            "only app1 listed",
            "return !document.getElementById('overview').hidden \
             && !!document.querySelector(\"#categories tr[data-category='app1']\") \
             && document.querySelectorAll('#categories tr[data-category]').length === 1 \
             && document.querySelector('#errors li').textContent === 'none' \
             && !document.body.innerText.includes('other');",
            DESCRIBE,
        )
        .await;
    // Its view of a category it may not read says so and shows nothing.
    browser
        .client
        .goto(&node.url("/ui#/category/other"))
        .await
        .unwrap();
    browser
        .wait_for(
            "the refusal of another category",
            "return document.getElementById('problem').textContent.includes('may not see') \
             && document.getElementById('category-view').hidden \
             && document.querySelectorAll('#chunks tr[data-chunk]').length === 0;",
            DESCRIBE,
        )
        .await;
    browser.close().await;
}

/// Runs `chunkbus top --once --server URL` and returns its output.
async fn top_once(url: &str) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_chunkbus"))
        .args(["top", "--once", "--server", url])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The whitespace-separated cells of the row of `out` starting with `first`.
fn row<'a>(out: &'a str, first: &[&str]) -> Option<Vec<&'a str>> {
    out.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.starts_with(first))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_once_prints_the_state_of_a_cluster() {
    let cluster = TestCluster::start(2, &[]).await;
    let n1 = cluster.client(0);
    let lines: String = (0..100).map(|i| format!("line-{i:03}\n")).collect();
    let produced = lines.len() as u64;
    n1.produce("app", lines, &ProduceOptions::default())
        .await
        .unwrap();
    n1.set_position("app", "laggard", "earliest").await.unwrap();
    // n2 shows the cluster once it holds the copy and has sampled it.
    let url = cluster.url(1);
    let out = crate::harness::eventually(
        crate::harness::CONDITION_DEADLINE,
        "top to show the copy and the consumer",
        || async {
            let out = top_once(&url).await;
            let lag = row(&out, &["app", "laggard"])?;
            (lag[2] == produced.to_string()).then_some(out)
        },
    )
    .await;
    assert!(
        out.starts_with("chunkbus ")
            && out.contains("node n2 ·")
            && out.contains("nodes 2 up, 0 down")
            && out.contains("under-replicated 0 ·"),
        "{out}"
    );
    assert_eq!(row(&out, &["n2"]).unwrap()[1..3], ["this", "node"], "{out}");
    assert_eq!(row(&out, &["n1"]).unwrap()[1], "up", "{out}");
    // CATEGORY LINES/S BYTES/S(2 cells) CHUNKS OPEN UPLOADED EVICTED ...
    let app = row(&out, &["app"]).unwrap();
    assert_eq!(app[4..8], ["1", "1", "0", "0"], "{out}");
    assert_eq!(app[9..], [produced.to_string().as_str(), "B"], "{out}");
    let laggard = row(&out, &["app", "laggard"]).unwrap();
    assert_eq!(laggard[3], "B", "{out}");
    assert!(
        laggard.ends_with(&["behind"]) || laggard.ends_with(&["STALLED"]),
        "{out}"
    );
    // Without a terminal and without --once, top says what to do.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_chunkbus"))
        .args(["top", "--server", &url])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("use --once"));
}

/// Runs `sh -c command` with stdin, stdout and stderr on a pseudo-terminal
/// (util-linux `script`) and returns what the terminal showed.
async fn on_a_terminal(command: &str) -> String {
    let out = tokio::process::Command::new("script")
        .args(["-qec", command, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("script (util-linux)");
    assert!(out.status.success(), "{command}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_cli_work_shows_progress_on_a_terminal_and_stays_quiet_otherwise() {
    let node = TestNode::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lines.txt");
    let text: String = (0..200_000).map(|i| format!("{{\"n\":{i}}}\n")).collect();
    std::fs::write(&file, &text).unwrap();
    let bin = env!("CARGO_BIN_EXE_chunkbus");
    let server = node.url("");
    let produce = format!("{bin} produce -c bars --server {server} {}", file.display());

    // Not a terminal: the summary line only.
    let out = tokio::process::Command::new("sh")
        .args(["-c", &produce])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.starts_with("produced ") && stderr.lines().count() == 1,
        "{stderr:?}"
    );
    // A terminal: a bar with the total and an ETA, then the summary.
    let shown = on_a_terminal(&produce).await;
    assert!(
        shown.contains("bars [") && shown.contains("ETA") && shown.contains("produced "),
        "{shown:?}"
    );

    // consume --until-idle into a file, the bar on the terminal's stderr,
    // out of the consumer's lag (it has a position: both files' lines).
    let c = Client::new(&server).unwrap();
    c.set_position("bars", "reader", "earliest").await.unwrap();
    let out_file = dir.path().join("out.txt");
    let shown = on_a_terminal(&format!(
        "{bin} consume -c bars --consumer reader --until-idle 500ms --server {server} > {}",
        out_file.display()
    ))
    .await;
    assert_eq!(
        std::fs::read(&out_file).unwrap().len(),
        2 * text.len(),
        "{shown:?}"
    );
    assert!(
        shown.contains("bars [") && shown.contains("ETA") && shown.contains("consumed "),
        "{shown:?}"
    );
    // ... and nothing on stderr without a terminal.
    let out = tokio::process::Command::new(bin)
        .args([
            "consume",
            "-c",
            "bars",
            "--consumer",
            "reader",
            "--until-idle",
            "200ms",
            "--server",
            &server,
        ])
        .output()
        .await
        .unwrap();
    assert!(out.status.success() && out.stderr.is_empty(), "{out:?}");

    // ship --from beginning: the catching up, then "caught up".
    let registry = dir.path().join("registry.json");
    let mut ship = tokio::process::Command::new("script")
        .args([
            "-qec",
            &format!(
                "RUST_LOG=warn {bin} ship -c shipped --from beginning --registry {} --server {server} {}",
                registry.display(),
                file.display()
            ),
            "/dev/null",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = ship.stdout.take().unwrap();
    let mut shown = Vec::new();
    let caught_up = tokio::time::timeout(crate::harness::CONDITION_DEADLINE, async {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 4096];
        loop {
            let n = stdout.read(&mut buf).await.unwrap();
            assert!(n > 0, "ship ended: {}", String::from_utf8_lossy(&shown));
            shown.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&shown);
            // The whole message, which may arrive in more than one read.
            if let Some(at) = text.find("caught up")
                && text[at..].contains(')')
            {
                return text.into_owned();
            }
        }
    })
    .await
    .expect("ship to say it caught up");
    assert!(
        caught_up.contains("shipped [")
            && caught_up.contains(&format!("caught up ({} bytes shipped)", text.len())),
        "{caught_up:?}"
    );
    ship.kill().await.unwrap();
}

/// `chunkbus top` on a terminal (`script`), what it drew so far, and its pid
/// (the shell says it, then execs top).
struct TopOnTerminal {
    child: tokio::process::Child,
    stdout: tokio::process::ChildStdout,
    shown: Vec<u8>,
}

impl TopOnTerminal {
    fn start(url: &str) -> Self {
        let mut child = tokio::process::Command::new("script")
            .args([
                "-qec",
                &format!(
                    "echo pid=$$; exec {} top --interval 200ms --server {url}",
                    env!("CARGO_BIN_EXE_chunkbus"),
                ),
                "/dev/null",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        Self {
            child,
            stdout,
            shown: Vec::new(),
        }
    }

    /// Reads until what was drawn satisfies `done`.
    async fn read_until(&mut self, what: &str, done: impl Fn(&str) -> bool) {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 4096];
        tokio::time::timeout(crate::harness::CONDITION_DEADLINE, async {
            while !done(&String::from_utf8_lossy(&self.shown)) {
                let n = self.stdout.read(&mut buf).await.unwrap();
                assert!(n > 0, "top ended: {}", String::from_utf8_lossy(&self.shown));
                self.shown.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{what}"));
    }

    /// top's pid, once the shell said it.
    fn pid(&self) -> rustix::process::Pid {
        let text = String::from_utf8_lossy(&self.shown);
        let after = text.split("pid=").nth(1).expect("the shell says the pid");
        let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
        rustix::process::Pid::from_raw(digits.parse().unwrap()).unwrap()
    }

    /// Waits for top to end: its status and everything it drew.
    async fn end(mut self, what: &str) -> (std::process::ExitStatus, String) {
        use tokio::io::AsyncReadExt;
        let status = tokio::time::timeout(crate::harness::CONDITION_DEADLINE, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{what}"))
            .unwrap();
        self.stdout.read_to_end(&mut self.shown).await.unwrap();
        (status, String::from_utf8_lossy(&self.shown).into_owned())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_on_a_terminal_refreshes_until_q() {
    use tokio::io::AsyncWriteExt;
    let node = TestNode::start().await;
    let c = Client::new(&node.url("")).unwrap();
    c.produce("shown", "x\n", &ProduceOptions::default())
        .await
        .unwrap();
    let mut top = TopOnTerminal::start(&node.url(""));
    // Two refreshes (two "q to quit" footers), the category in them.
    top.read_until("top to draw twice", |text| {
        text.matches("q to quit").count() >= 2 && text.contains("shown")
    })
    .await;
    let stdin = top.child.stdin.as_mut().unwrap();
    stdin.write_all(b"q").await.unwrap();
    let (status, text) = top.end("top to quit on q").await;
    assert!(status.success(), "{status:?}");
    // It drew on the alternate screen and gave the terminal back.
    assert!(
        text.contains("\x1b[?1049h") && text.contains("\x1b[?1049l"),
        "{text:?}"
    );
}

#[tokio::test]
async fn top_on_a_terminal_gives_the_terminal_back_when_terminated() {
    let node = TestNode::start().await;
    let mut top = TopOnTerminal::start(&node.url(""));
    top.read_until("top to draw", |text| text.contains("q to quit"))
        .await;
    rustix::process::kill_process(top.pid(), rustix::process::Signal::TERM).unwrap();
    let (status, text) = top.end("top to end on SIGTERM").await;
    assert!(status.success(), "{status:?}");
    // It left the alternate screen and showed the cursor again.
    let tail = &text[text.find("q to quit").unwrap()..];
    assert!(
        tail.contains("\x1b[?1049l") && tail.contains("\x1b[?25h"),
        "{tail:?}"
    );
}

#[tokio::test]
async fn a_browser_asking_for_the_root_is_sent_to_the_console_and_api_clients_are_not() {
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let ask = |node: &TestNode, accept: &'static str| {
        let (http, url) = (no_redirects.clone(), node.url("/"));
        async move {
            let r = http.get(url).header("accept", accept).send().await.unwrap();
            let location = r
                .headers()
                .get("location")
                .map(|v| v.to_str().unwrap().to_owned());
            (r.status().as_u16(), location)
        }
    };
    let browser_accept = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
    // With the Elasticsearch API on (the default), API clients get its
    // root document.
    let node = TestNode::start().await;
    assert_eq!(
        ask(&node, browser_accept).await,
        (303, Some("/ui".to_owned()))
    );
    assert_eq!(ask(&node, "application/json").await, (200, None));
    // With it off, `/` is nothing but the way to the console.
    let node = TestNode::start_with(|cfg| cfg.ingest.apis.clear()).await;
    assert_eq!(
        ask(&node, browser_accept).await,
        (303, Some("/ui".to_owned()))
    );
    assert_eq!(ask(&node, "application/json").await, (404, None));
}
