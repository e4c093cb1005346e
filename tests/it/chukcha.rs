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
