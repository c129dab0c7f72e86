//! IndexCollection sync runs on the real stack (LocalStack bucket, PostgreSQL
//! with pgvector, JetStream) with a local OpenAI-compatible embedder: the
//! incremental behaviour (only new and changed documents are embedded,
//! deleted ones leave the index), every format including malformed and
//! unsupported files, search over the result; a run left in progress by a
//! dead worker is marked abandoned; a collection on the built-in model gets
//! a failed run with the reason.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::routing::post;
use prost::Message as _;
use stowage_common::queue::TaskKind;
use stowage_common::spec::index::IndexSpec;
use stowage_common::state::collections::{self, NewCollection, RunState, SyncRun};
use stowage_common::state::index::{self as store, Mode, Query};
use stowage_proto::v1::search_client::SearchClient;
use stowage_proto::v1::{
    CollectionProgress, SearchMode, SearchRequest, SyncCollection, Task, task,
};
use stowage_worker::index::sync::BUILTIN_UNAVAILABLE;
use support::Harness;
use uuid::Uuid;

const DIMS: usize = 64;

/// A bag-of-words embedding: texts that share words point the same way, so
/// vector search is meaningful without a model.
fn bag_of_words(text: &str) -> Vec<f32> {
    let mut v = vec![0.0f32; DIMS];
    for word in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.len() > 2)
    {
        let h = word
            .to_lowercase()
            .bytes()
            .fold(5381u32, |h, b| h.wrapping_mul(33) ^ u32::from(b));
        v[h as usize % DIMS] += 1.0;
    }
    v
}

/// An OpenAI-compatible `/v1/embeddings` counting the texts it embeds.
async fn embedder(embedded: Arc<AtomicUsize>) -> String {
    let app = axum::Router::new().route(
        "/v1/embeddings",
        post(move |body: Bytes| {
            let embedded = Arc::clone(&embedded);
            async move {
                let req: serde_json::Value = serde_json::from_slice(&body).expect("JSON request");
                let inputs: Vec<String> = req["input"]
                    .as_array()
                    .expect("input array")
                    .iter()
                    .map(|v| v.as_str().unwrap_or_default().to_string())
                    .collect();
                embedded.fetch_add(inputs.len(), Ordering::SeqCst);
                let data: Vec<serde_json::Value> = inputs
                    .iter()
                    .enumerate()
                    .map(|(i, t)| serde_json::json!({"index": i, "embedding": bag_of_words(t)}))
                    .collect();
                (
                    [("content-type", "application/json")],
                    serde_json::json!({"data": data}).to_string(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

async fn register(h: &Harness, spec: serde_json::Value) -> Uuid {
    let spec: IndexSpec = serde_json::from_value(spec).expect("spec");
    let db = h.pool.get().await.expect("db");
    collections::register(
        &db,
        &NewCollection {
            namespace: "team-a".into(),
            name: "kb".into(),
            source_uid: stowage_common::testing::unique("uid"),
            generation: 1,
            spec,
        },
    )
    .await
    .expect("register")
}

/// Queues a sync run and waits for its end (its progress event).
async fn sync(h: &Harness, id: Uuid, round: &str) -> SyncRun {
    let mut events = h
        .queue
        .client()
        .subscribe(h.queue.topology().progress_wildcard())
        .await
        .expect("subscribe");
    let subject = h
        .queue
        .topology()
        .task_subject(TaskKind::IndexSync, "team-a", "kb");
    h.queue
        .publish_task(
            &subject,
            &Task {
                task_id: format!("index-sync/{id}/{round}"),
                kind: Some(task::Kind::SyncCollection(SyncCollection {
                    collection_id: id.to_string(),
                    trigger: "manual".into(),
                })),
            },
        )
        .await
        .expect("publish");
    let run_id = tokio::time::timeout(Duration::from_secs(60), async {
        use futures::StreamExt;
        loop {
            let msg = events.next().await.expect("event stream");
            if let Ok(p) = CollectionProgress::decode(msg.payload.as_ref())
                && p.collection_id == id.to_string()
                && p.run_state != "in_progress"
            {
                return p.run_id;
            }
        }
    })
    .await
    .expect("the run ends");
    let db = h.pool.get().await.expect("db");
    let run = collections::latest_run(&db, id)
        .await
        .expect("query")
        .expect("a run");
    assert_eq!(run.id, run_id);
    run
}

async fn put(h: &Harness, key: &str, content_type: &str, body: &[u8]) {
    h.s3.put_object()
        .bucket(&h.bucket)
        .key(key)
        .content_type(content_type)
        .body(body.to_vec().into())
        .send()
        .await
        .expect("put");
}

async fn document_state(h: &Harness, key: &str) -> Option<(String, Option<String>, i32)> {
    let db = h.pool.get().await.expect("db");
    db.query_opt(
        "SELECT d.state, d.reason, d.chunks FROM documents d
         JOIN embedding_generations g ON g.id = d.generation_id AND g.state = 'active'
         WHERE d.object_key = $1",
        &[&key],
    )
    .await
    .expect("query")
    .map(|r| (r.get(0), r.get(1), r.get(2)))
}

async fn search(h: &Harness, id: Uuid, mode: Mode, text: &str) -> Vec<String> {
    let db = h.pool.get().await.expect("db");
    let vector = bag_of_words(text);
    let q = Query {
        mode,
        vector: Some(&vector),
        text,
        top_k: 3,
        key_prefix: None,
        content_type: None,
    };
    store::search(&db, id, &q)
        .await
        .expect("search")
        .into_iter()
        .map(|h| h.object_key)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_runs_index_incrementally_and_search_finds_the_documents() {
    let h = Harness::new("localstack").await;
    let worker = h.worker(None).await;
    let embedded = Arc::new(AtomicUsize::new(0));
    let url = embedder(Arc::clone(&embedded)).await;
    let mut source = serde_json::to_value(h.endpoint()).expect("endpoint");
    source["bucket"] = h.bucket.clone().into();
    source["prefix"] = "kb/".into();
    source["exclude"] = serde_json::json!(["drafts/**"]);
    let id = register(
        &h,
        serde_json::json!({
            "source": source,
            "chunking": {"strategy": "markdown", "size": 200, "overlap": 0},
            "embedding": {"provider": "openai", "model": "bag-of-words", "dimensions": DIMS, "endpoint": url},
        }),
    )
    .await;
    put(&h, "kb/postgres.md", "text/markdown", b"# Runbook\n\n## Failover\n\nPromote the standby replica, then repoint the pooler at the new primary.\n").await;
    put(
        &h,
        "kb/nats.txt",
        "text/plain",
        b"JetStream streams hold the task queue; consumers ack explicitly.",
    )
    .await;
    put(
        &h,
        "kb/page.html",
        "text/html",
        b"<html><body><h1>Retention</h1><p>Invoices are kept for seven years.</p></body></html>",
    )
    .await;
    put(
        &h,
        "kb/broken.pdf",
        "application/pdf",
        b"%PDF-1.4\nnot really a pdf",
    )
    .await;
    put(&h, "kb/photo.png", "image/png", b"\x89PNG\r\n").await;
    put(&h, "kb/drafts/wip.md", "text/markdown", b"# Draft").await;

    let first = sync(&h, id, "one").await;
    assert_eq!(first.state, RunState::CompletedWithErrors, "{first:?}");
    let c = &first.counts;
    assert_eq!(
        (c.seen, c.new, c.changed, c.deleted, c.failed, c.skipped),
        (5, 3, 0, 0, 1, 1),
        "{c:?}"
    );
    assert_eq!(
        c.chunks_written as usize,
        embedded.load(Ordering::SeqCst),
        "every chunk embedded once"
    );
    let (state, reason, _) = document_state(&h, "kb/broken.pdf").await.expect("pdf row");
    assert_eq!(state, "failed");
    assert!(reason.is_some_and(|r| r.contains("malformed pdf")));
    let (state, reason, _) = document_state(&h, "kb/photo.png").await.expect("png row");
    assert_eq!(state, "skipped");
    assert!(reason.is_some_and(|r| r.contains("image/png")));
    assert_eq!(
        document_state(&h, "kb/drafts/wip.md").await,
        None,
        "excluded by the glob"
    );

    assert_eq!(
        search(&h, id, Mode::Keyword, "failover standby")
            .await
            .first()
            .map(String::as_str),
        Some("kb/postgres.md")
    );
    assert_eq!(
        search(&h, id, Mode::Vector, "invoices kept seven years")
            .await
            .first()
            .map(String::as_str),
        Some("kb/page.html")
    );
    assert_eq!(
        search(&h, id, Mode::Hybrid, "jetstream consumers")
            .await
            .first()
            .map(String::as_str),
        Some("kb/nats.txt")
    );

    // The same over gRPC, the query embedded with the collection's model.
    let mut client = SearchClient::connect(format!("http://{}", worker.grpc_addr))
        .await
        .expect("gRPC");
    let request = |query: &str, mode: SearchMode| SearchRequest {
        namespace: "team-a".into(),
        collection: "kb".into(),
        query: query.into(),
        mode: mode as i32,
        top_k: 2,
        ..Default::default()
    };
    let hits = client
        .query(request("promote the standby replica", SearchMode::Hybrid))
        .await
        .expect("hybrid query")
        .into_inner()
        .hits;
    assert_eq!(hits[0].key, "kb/postgres.md");
    assert_eq!(hits[0].bucket, h.bucket);
    assert_eq!(
        hits[0].heading_path,
        ["Runbook"],
        "one chunk, starting at the top heading"
    );
    assert!(
        hits[0].text.contains("Promote the standby")
            && hits[0].vector_rank > 0
            && hits[0].keyword_rank > 0
    );
    assert!(hits.len() <= 2);
    let mut filtered = request("standby", SearchMode::Keyword);
    filtered.content_type = "text/plain".into();
    let none = client
        .query(filtered)
        .await
        .expect("filtered")
        .into_inner()
        .hits;
    assert!(none.is_empty(), "the only match is Markdown: {none:?}");
    let missing = client
        .query(SearchRequest {
            collection: "nope".into(),
            ..request("x", SearchMode::Keyword)
        })
        .await
        .expect_err("unknown collection");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let bad = client
        .query(SearchRequest {
            top_k: 1000,
            ..request("x", SearchMode::Keyword)
        })
        .await
        .expect_err("top_k");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);

    // Change one, delete one, add one: only those are embedded.
    put(
        &h,
        "kb/nats.txt",
        "text/plain",
        b"JetStream work queues dead-letter after the last attempt.",
    )
    .await;
    h.s3.delete_object()
        .bucket(&h.bucket)
        .key("kb/page.html")
        .send()
        .await
        .expect("delete");
    put(
        &h,
        "kb/new.md",
        "text/markdown",
        b"# Locks\n\nAdvisory locks fence writers per key.",
    )
    .await;
    let before = embedded.load(Ordering::SeqCst);
    let second = sync(&h, id, "two").await;
    assert_eq!(second.state, RunState::Completed, "{second:?}");
    let c = &second.counts;
    assert_eq!(
        (c.new, c.changed, c.deleted, c.failed),
        (1, 1, 1, 0),
        "{c:?}"
    );
    let (_, _, nats_chunks) = document_state(&h, "kb/nats.txt").await.expect("nats");
    let (_, _, new_chunks) = document_state(&h, "kb/new.md").await.expect("new");
    assert_eq!(
        embedded.load(Ordering::SeqCst) - before,
        (nats_chunks + new_chunks) as usize,
        "only the changed and the new document were embedded"
    );
    assert_eq!(
        document_state(&h, "kb/page.html").await,
        None,
        "a deleted object leaves the index"
    );
    assert!(search(&h, id, Mode::Keyword, "invoices").await.is_empty());
    assert_eq!(
        search(&h, id, Mode::Keyword, "dead-letter").await,
        ["kb/nats.txt"]
    );
    assert!(
        search(&h, id, Mode::Keyword, "explicitly").await.is_empty(),
        "the old text of a changed document is gone"
    );
}

#[tokio::test]
async fn a_stale_run_is_abandoned_and_the_builtin_model_is_reported_missing() {
    let h = Harness::new("localstack").await;
    let _worker = h.worker(None).await;
    let id = register(&h, serde_json::json!({"source": {"bucket": h.bucket}})).await;
    // A run left in progress by a worker that died.
    let stale = {
        let mut db = h.pool.get().await.expect("db");
        collections::begin_run(&mut db, id, "schedule", 1)
            .await
            .expect("stale run")
    };
    let run = sync(&h, id, "one").await;
    assert_ne!(run.id, stale);
    assert_eq!(run.state, RunState::Failed);
    assert_eq!(run.trigger, "manual");
    assert_eq!(run.error.as_deref(), Some(BUILTIN_UNAVAILABLE));
    let db = h.pool.get().await.expect("db");
    let abandoned = db
        .query_one(
            "SELECT state, error FROM sync_runs WHERE id = $1",
            &[&stale],
        )
        .await
        .expect("stale run");
    assert_eq!(abandoned.get::<_, &str>(0), "abandoned");
    assert!(
        abandoned
            .get::<_, Option<String>>(1)
            .is_some_and(|e| e.contains("stopped before finishing"))
    );
}
