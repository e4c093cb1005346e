//! The Chukcha-compatible routes, as Chukcha's Go client uses them.

use chunkbus_client::ChukchaChunk;
use reqwest::StatusCode;

use crate::harness::TestNode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_list_and_read_like_chukcha() {
    let node = TestNode::start_with(|c| c.max_chunk_bytes = 12).await;
    for body in ["hello\n", "world\n", "again\n"] {
        let r = node
            .http
            .post(node.url("/write?category=events"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    let cats: Vec<String> = node.get("/listCategories").await.json().await.unwrap();
    assert_eq!(cats, ["events"]);
    let chunks: Vec<ChukchaChunk> = node
        .get("/listChunks?category=events")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        chunks,
        [
            ChukchaChunk {
                name: "t1-chunk000000000".into(),
                complete: true,
                size: 12
            },
            ChukchaChunk {
                name: "t1-chunk000000001".into(),
                complete: false,
                size: 6
            },
        ]
    );
    // The raw JSON uses Chukcha's field names.
    let raw = node
        .get("/listChunks?category=events")
        .await
        .text()
        .await
        .unwrap();
    assert!(
        raw.starts_with("[{\"name\":\"t1-chunk000000000\",\"complete\":true,\"size\":12}"),
        "{raw}"
    );

    let r = node
        .get("/read?category=events&chunk=t1-chunk000000000&off=0&max_size=8")
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.text().await.unwrap(), "hello\n");
    let r = node
        .get("/read?category=events&chunk=t1-chunk000000000&off=6&max_size=100")
        .await;
    assert_eq!(r.text().await.unwrap(), "world\n");
    let r = node
        .get("/read?category=events&chunk=t1-chunk000000000&off=12&max_size=100")
        .await;
    assert_eq!(
        (r.status(), r.text().await.unwrap().as_str()),
        (StatusCode::OK, "")
    );
    // A chunk this node does not hold is 404, as in Chukcha.
    let r = node
        .get("/read?category=events&chunk=other-chunk000000000&off=0&max_size=100")
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // An unknown category lists no chunks.
    let none: Vec<ChukchaChunk> = node
        .get("/listChunks?category=nothing")
        .await
        .json()
        .await
        .unwrap();
    assert!(none.is_empty());
    node.stop().await;
}

/// Chukcha's client reads each time from a random node: a replica whose
/// copy lags the node read before is asked for an offset past its copy.
/// That is "nothing new yet" (200, empty) on the Chukcha route, as Chukcha
/// answers it, while `/v1` keeps its 416.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_replica_answers_chukchas_reader_with_nothing_new() {
    use rand::Rng;
    let cluster = crate::cluster::TestCluster::start(2, &[]).await;
    let http = reqwest::Client::new();
    let first = cluster
        .client(0)
        .produce("ev", "one\n", &Default::default())
        .await
        .unwrap();
    let chunk = first.chunk.unwrap();
    cluster.wait_converged(&["ev"]).await;
    // The replica stops copying; the owner takes more lines.
    cluster.link(1, 0).set_cut(true);
    let mut want = String::from("one\n");
    for i in 0..20 {
        let line = format!("line {i}\n");
        cluster
            .client(0)
            .produce("ev", line.clone(), &Default::default())
            .await
            .unwrap();
        want.push_str(&line);
    }
    let read = |node: usize, off: usize| {
        let url = format!(
            "{}/read?category=ev&chunk={chunk}&off={off}&max_size=1024",
            cluster.url(node)
        );
        let http = http.clone();
        async move {
            let r = http.get(url).send().await.unwrap();
            (r.status(), r.text().await.unwrap())
        }
    };
    let (status, body) = read(0, 4).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.starts_with("line 0\n"), "{body}");
    let (status, body) = read(1, 4 + body.len()).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, ""));
    let v1 = http
        .get(format!(
            "{}/v1/categories/ev/chunks/{chunk}?offset=20",
            cluster.url(1)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(v1.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    // Chukcha's pattern: a random node each time, until everything came;
    // the copy catches up once the link is healed.
    let mut got = String::new();
    let mut rng = rand::rng();
    let deadline = tokio::time::Instant::now() + crate::harness::CONDITION_DEADLINE;
    for round in 0.. {
        if round == 10 {
            cluster.link(1, 0).set_cut(false);
        }
        let (status, body) = read(rng.random_range(0..2), got.len()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        got.push_str(&body);
        if got.len() >= want.len() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "read {got:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(got, want);
}
