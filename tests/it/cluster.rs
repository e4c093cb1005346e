//! `TestCluster`: N real `chunkbus` processes on `127.0.0.1:0`, each peer
//! link through its own [`Proxy`] so that a test can cut a node off, kill
//! it and restart it on a new port without the others noticing the address
//! change.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chunkbus_client::{ChunkInfo, Client};

use crate::harness::{BinNode, CONDITION_DEADLINE, chunk_files, serve_command};
use crate::proxy::Proxy;

/// How long a cluster may take to converge after writes stop.
pub const CONVERGE_DEADLINE: Duration = Duration::from_secs(60);

pub struct TestCluster {
    pub names: Vec<String>,
    pub nodes: Vec<Option<BinNode>>,
    pub dirs: Vec<PathBuf>,
    /// `proxies[from][to]`; `None` on the diagonal. With bucket
    /// membership, one proxy per `to` that every `from` shares.
    proxies: Vec<Vec<Option<Arc<Proxy>>>>,
    /// The nodes find each other through the bucket (no `--peers`).
    bucket: bool,
    extra: Vec<String>,
    /// Flags of one node only, and environment of every node.
    node_extra: Vec<Vec<String>>,
    env: Vec<(String, String)>,
    /// What killed processes of each node wrote to stderr.
    pub past_logs: Vec<String>,
    _tmp: tempfile::TempDir,
}

impl TestCluster {
    /// Starts `n` nodes named `n1..`, each with `extra` flags.
    pub async fn start(n: usize, extra: &[&str]) -> Self {
        Self::start_with(n, extra, vec![Vec::new(); n], Vec::new()).await
    }

    /// Like [`TestCluster::start`], with flags per node (`node_extra[i]`)
    /// and environment variables for every node.
    pub async fn start_with(
        n: usize,
        extra: &[&str],
        node_extra: Vec<Vec<String>>,
        env: Vec<(String, String)>,
    ) -> Self {
        Self::launch(n, extra, node_extra, env, false).await
    }

    /// Like [`TestCluster::start_with`], but the nodes find each other
    /// through the S3 bucket that `extra` names, without `--peers`. Each
    /// advertises one proxy that every peer reaches it through, so a cut of
    /// a link to a node cuts every peer's link to it.
    pub async fn start_through_bucket(
        n: usize,
        extra: &[&str],
        env: Vec<(String, String)>,
    ) -> Self {
        Self::launch(n, extra, vec![Vec::new(); n], env, true).await
    }

    async fn launch(
        n: usize,
        extra: &[&str],
        node_extra: Vec<Vec<String>>,
        env: Vec<(String, String)>,
        bucket: bool,
    ) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let names: Vec<String> = (1..=n).map(|i| format!("n{i}")).collect();
        let dirs: Vec<PathBuf> = names.iter().map(|n| tmp.path().join(n)).collect();
        let mut inbound = Vec::new();
        if bucket {
            for _ in 0..n {
                inbound.push(Arc::new(Proxy::start().await));
            }
        }
        let mut proxies = Vec::new();
        for from in 0..n {
            let mut row = Vec::new();
            for to in 0..n {
                row.push(if from == to {
                    None
                } else if let Some(shared) = inbound.get(to) {
                    Some(Arc::clone(shared))
                } else {
                    Some(Arc::new(Proxy::start().await))
                });
            }
            proxies.push(row);
        }
        let mut cluster = Self {
            names,
            nodes: (0..n).map(|_| None).collect(),
            dirs,
            proxies,
            bucket,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            node_extra,
            env,
            past_logs: vec![String::new(); n],
            _tmp: tmp,
        };
        for i in 0..n {
            cluster.start_node(i).await;
        }
        // New data directories take writes once every peer has said which
        // of their chunks it holds.
        for i in 0..n {
            cluster.wait_writes_open(i).await;
        }
        cluster
    }

    /// Waits until node `i` holds no writes (`writes_held` is empty). A node
    /// whose status this plain client cannot read (tokens, TLS) is not
    /// waited for: its writes wait for the gate a few seconds themselves.
    pub async fn wait_writes_open(&self, i: usize) {
        let deadline = tokio::time::Instant::now() + CONDITION_DEADLINE;
        loop {
            let Ok(st) = self.client(i).status().await else {
                return;
            };
            if st.writes_held.is_empty() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {i} still holds writes: {:?}",
                st.writes_held
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until node `i` says it restores nothing from its peers
    /// (`restoring_chunks` absent from its status).
    pub async fn wait_restored(&self, i: usize) {
        let client = self.client(i);
        crate::harness::eventually(CONDITION_DEADLINE, "the end of the restore", || async {
            let st = client.status().await.ok()?;
            st.restoring_chunks.is_none().then_some(())
        })
        .await;
    }

    /// Starts (or restarts) node `i` and points its inbound proxies at it.
    /// With `--kafka-listen` among the flags, `--peers` names every node,
    /// this one too (at its own `--listen`), in the same order everywhere:
    /// partition numbers come from that list.
    pub async fn start_node(&mut self, i: usize) {
        let kafka = self.extra.iter().any(|a| a == "--kafka-listen");
        let peers: Vec<String> = (0..self.names.len())
            .filter(|&j| j != i || kafka)
            .map(|j| match &self.proxies[i][j] {
                Some(p) => format!("{}={}", self.names[j], p.addr),
                None => format!("{}=127.0.0.1:0", self.names[j]),
            })
            .collect();
        let mut cmd = serve_command(&self.names[i], &self.dirs[i]);
        if self.bucket {
            let j = (i + 1) % self.names.len();
            let inbound = self.proxies[j][i].as_ref().expect("a peer's proxy");
            cmd.args(["--advertise-addr", &inbound.addr.to_string()]);
        } else {
            cmd.args(["--peers", &peers.join(",")]);
        }
        cmd.args(["--replication-wait", "2s", "--peer-timeout", "1s"])
            .args(&self.extra)
            .args(&self.node_extra[i])
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        let node = BinNode::spawn(cmd).await;
        for from in 0..self.names.len() {
            if let Some(p) = &self.proxies[from][i] {
                p.set_target(node.addr);
            }
        }
        self.nodes[i] = Some(node);
    }

    /// Where node `i`'s Kafka listener listens.
    pub fn kafka_addr(&self, i: usize) -> String {
        let node = self.nodes[i].as_ref().expect("node running");
        node.kafka_addr.expect("--kafka-listen is on").to_string()
    }

    /// SIGKILLs node `i`.
    pub async fn kill(&mut self, i: usize) {
        if let Some(node) = self.nodes[i].take() {
            let log = node.stderr.clone();
            node.kill().await;
            self.past_logs[i].push_str(&log.lock().unwrap());
        }
    }

    /// Everything every process of node `i` wrote to stderr so far.
    pub fn logs(&self, i: usize) -> String {
        let mut out = self.past_logs[i].clone();
        if let Some(node) = &self.nodes[i] {
            out.push_str(&node.stderr.lock().unwrap());
        }
        out
    }

    /// Cuts node `i` off from every other node (both directions), or heals it.
    pub fn set_cut(&self, i: usize, cut: bool) {
        for j in 0..self.names.len() {
            for p in [&self.proxies[i][j], &self.proxies[j][i]]
                .into_iter()
                .flatten()
            {
                p.set_cut(cut);
            }
        }
    }

    /// The proxy that carries node `from`'s connections to node `to` (with
    /// bucket membership, every node's connections to `to`).
    pub fn link(&self, from: usize, to: usize) -> &Proxy {
        self.proxies[from][to]
            .as_ref()
            .expect("no link from a node to itself")
    }

    /// Sends `sig` to node `i` (SIGSTOP pauses it, SIGCONT resumes it).
    pub fn signal(&self, i: usize, sig: rustix::process::Signal) {
        self.nodes[i].as_ref().expect("node is running").signal(sig);
    }

    pub fn url(&self, i: usize) -> String {
        self.nodes[i].as_ref().expect("node is running").url("")
    }

    pub fn client(&self, i: usize) -> Client {
        Client::new(&self.url(i)).unwrap()
    }

    /// Chunk lists of `category` as each running node reports them.
    pub async fn chunk_lists(&self, category: &str) -> Vec<Vec<ChunkInfo>> {
        let mut out = Vec::new();
        for i in 0..self.names.len() {
            if self.nodes[i].is_some() {
                out.push(self.client(i).chunks(category).await.unwrap());
            }
        }
        out
    }

    /// Waits until every running node lists the same chunks of each
    /// category (names, sizes, completeness, line numbers), then checks
    /// that the chunk files hold the same bytes on every node (an owner's
    /// open chunk may also hold zeros past its data: a zero runway), and
    /// that each owner's lines are numbered 0, 1, 2, ... across its chunks.
    pub async fn wait_converged(&self, categories: &[&str]) {
        let deadline = tokio::time::Instant::now() + CONVERGE_DEADLINE;
        for cat in categories {
            let sizes: BTreeMap<String, u64> = loop {
                let lists = self.chunk_lists(cat).await;
                type Key = (String, u64, bool, Option<u64>, Option<u64>);
                let key = |l: &Vec<ChunkInfo>| -> Vec<Key> {
                    l.iter()
                        .map(|c| (c.name.clone(), c.size, c.complete, c.first_line, c.lines))
                        .collect()
                };
                if lists.windows(2).all(|w| key(&w[0]) == key(&w[1])) && !lists[0].is_empty() {
                    check_numbering(cat, &lists[0]);
                    break lists[0].iter().map(|c| (c.name.clone(), c.size)).collect();
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "category {cat} did not converge within {CONVERGE_DEADLINE:?}: {:#?}",
                    lists.iter().map(key).collect::<Vec<_>>()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            let files: Vec<BTreeMap<String, Vec<u8>>> = (0..self.names.len())
                .filter(|&i| self.nodes[i].is_some())
                .map(|i| {
                    chunk_files(&self.dirs[i].join(cat))
                        .into_iter()
                        .map(|(name, mut data)| {
                            let size = sizes[&name] as usize;
                            assert!(
                                data.len() >= size && data[size..].iter().all(|&b| b == 0),
                                "chunk {name} of {cat} on node {i}: {} bytes on disk, {size} listed",
                                data.len()
                            );
                            data.truncate(size);
                            (name, data)
                        })
                        .collect()
                })
                .collect();
            for (i, f) in files.iter().enumerate().skip(1) {
                assert_eq!(
                    f.keys().collect::<Vec<_>>(),
                    files[0].keys().collect::<Vec<_>>(),
                    "chunk files of {cat} differ between nodes"
                );
                for (name, data) in f {
                    assert!(
                        data == &files[0][name],
                        "chunk {name} of {cat} differs on node {i}"
                    );
                }
            }
            let lists = self.chunk_lists(cat).await;
            for (name, data) in files.first().into_iter().flatten() {
                let listed = lists[0].iter().find(|c| c.name == *name).unwrap();
                let lines = data.iter().filter(|&&b| b == b'\n').count() as u64;
                if listed.size == data.len() as u64 {
                    assert_eq!(listed.lines, Some(lines), "lines of chunk {name} of {cat}");
                }
            }
        }
    }

    /// Waits until `/v1/status` of node `i` says whether peer `peer` is connected.
    pub async fn wait_peer_connected(&self, i: usize, peer: &str, connected: bool) {
        let deadline = tokio::time::Instant::now() + CONDITION_DEADLINE;
        loop {
            let st = self.client(i).status().await.unwrap();
            if st
                .peers
                .iter()
                .any(|p| p.name == peer && p.connected == connected)
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "peer {peer} never became connected={connected} on node {i}: {st:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Checks that every chunk of `list` is numbered and that each owner's
/// chunks number their lines one after the other (from 0 when the owner's
/// first chunk is listed).
pub fn check_numbering(category: &str, list: &[ChunkInfo]) {
    let mut next: BTreeMap<&str, u64> = BTreeMap::new();
    for c in list {
        let (Some(first), Some(lines)) = (c.first_line, c.lines) else {
            panic!("chunk {} of {category} is not numbered: {c:?}", c.name);
        };
        let want = match next.get(c.owner.as_str()) {
            Some(&n) => n,
            None if c.index == 0 => 0,
            None => first,
        };
        assert_eq!(first, want, "first line of chunk {} of {category}", c.name);
        next.insert(&c.owner, first + lines);
    }
}
