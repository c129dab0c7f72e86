//! The index store on the real PostgreSQL + pgvector: vector, keyword and
//! hybrid search with filters; a document rewritten while searches run is
//! never seen missing or doubled; a new embedding generation is built beside
//! the active one and replaces it atomically.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use stowage_common::db::Pool;
use stowage_common::spec::index::{Embedding, EmbeddingProvider, IndexSpec};
use stowage_common::state::collections::{self, NewCollection};
use stowage_common::state::index::{self, Mode, NewChunk, Query, SearchError, Source};
use stowage_common::testing::{StackEnv, fresh_schema, unique};
use uuid::Uuid;

async fn setup() -> (Pool, Uuid) {
    let (pool, _) = fresh_schema(&StackEnv::load()).await;
    let spec: IndexSpec =
        serde_json::from_value(serde_json::json!({"source": {"bucket": "docs"}})).expect("spec");
    let db = pool.get().await.expect("db");
    let id = collections::register(
        &db,
        &NewCollection {
            namespace: "team-a".into(),
            name: "kb".into(),
            source_uid: unique("uid"),
            generation: 1,
            spec,
        },
    )
    .await
    .expect("collection");
    (pool, id)
}

fn source(key: &str, content_type: &str) -> Source {
    Source {
        object_key: key.into(),
        etag: Some("\"e\"".into()),
        sha256_hex: Some("00".repeat(32)),
        content_type: Some(content_type.into()),
        size_bytes: Some(100),
    }
}

fn chunk(content: &str, embedding: [f32; 3], heading: &[&str]) -> NewChunk {
    NewChunk {
        content: content.into(),
        byte_start: 0,
        byte_end: content.len() as i32,
        char_start: 0,
        char_end: content.chars().count() as i32,
        heading_path: heading.iter().map(|s| s.to_string()).collect(),
        embedding: embedding.to_vec(),
    }
}

fn query<'a>(mode: Mode, vector: Option<&'a [f32]>, text: &'a str) -> Query<'a> {
    Query {
        mode,
        vector,
        text,
        top_k: 5,
        key_prefix: None,
        content_type: None,
    }
}

/// A 3-dimensional model of a (never called) remote provider.
fn model(name: &str) -> Embedding {
    Embedding {
        provider: EmbeddingProvider::Ollama,
        model: name.into(),
        dimensions: 3,
        endpoint: Some("http://127.0.0.1:9".into()),
        credentials_secret_ref: None,
    }
}

async fn corpus(pool: &Pool, collection: Uuid, model_name: &str) -> i64 {
    let mut db = pool.get().await.expect("db");
    let g = index::generation_for(&mut db, collection, &model(model_name))
        .await
        .expect("generation");
    let docs = [
        (
            "runbooks/postgres.md",
            "text/markdown",
            chunk(
                "Postgres failover: promote the standby and repoint the pooler.",
                [1.0, 0.0, 0.0],
                &["Runbook", "Failover"],
            ),
        ),
        (
            "runbooks/nats.md",
            "text/markdown",
            chunk(
                "NATS JetStream streams keep the task queue.",
                [0.0, 1.0, 0.0],
                &["Runbook"],
            ),
        ),
        (
            "policies/retention.txt",
            "text/plain",
            chunk(
                "Retention: documents are kept seven years.",
                [0.0, 0.0, 1.0],
                &[],
            ),
        ),
        (
            "policies/postgres-backups.txt",
            "text/plain",
            chunk("Backups of Postgres run nightly.", [0.7, 0.0, 0.7], &[]),
        ),
    ];
    for (key, ct, c) in docs {
        index::write_document(&mut db, g.id, &source(key, ct), &[c])
            .await
            .expect("write");
    }
    index::activate(&mut db, g.id).await.expect("activate");
    g.id
}

#[tokio::test]
async fn vector_keyword_and_hybrid_search_with_filters() {
    let (pool, collection) = setup().await;
    corpus(&pool, collection, "m1").await;
    let db = pool.get().await.expect("db");

    let near_nats = [0.1f32, 0.9, 0.0];
    let hits = index::search(&db, collection, &query(Mode::Vector, Some(&near_nats), ""))
        .await
        .expect("vector");
    assert_eq!(hits[0].object_key, "runbooks/nats.md");
    assert_eq!(hits[0].vector_rank, Some(1));
    assert!(hits[0].score > 0.9, "cosine similarity {}", hits[0].score);

    let hits = index::search(
        &db,
        collection,
        &query(Mode::Keyword, None, "postgres failover"),
    )
    .await
    .expect("keyword");
    assert_eq!(hits.len(), 1, "both words only in the runbook: {hits:?}");
    assert_eq!(hits[0].object_key, "runbooks/postgres.md");
    assert_eq!(hits[0].heading_path, ["Runbook", "Failover"]);

    // Hybrid: "postgres" matches two documents by keyword; the vector leans
    // to backups; fusion puts the document found by both first.
    let toward_backups = [0.6f32, 0.0, 0.8];
    let hits = index::search(
        &db,
        collection,
        &query(Mode::Hybrid, Some(&toward_backups), "postgres"),
    )
    .await
    .expect("hybrid");
    assert_eq!(
        hits[0].object_key, "policies/postgres-backups.txt",
        "{hits:#?}"
    );
    assert!(hits[0].vector_rank.is_some() && hits[0].keyword_rank.is_some());
    assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));

    let mut q = query(Mode::Hybrid, Some(&toward_backups), "postgres");
    q.key_prefix = Some("runbooks/");
    let hits = index::search(&db, collection, &q).await.expect("prefix");
    assert!(
        !hits.is_empty() && hits.iter().all(|h| h.object_key.starts_with("runbooks/")),
        "{hits:?}"
    );
    let mut q = query(Mode::Vector, Some(&toward_backups), "");
    q.content_type = Some("text/markdown");
    let hits = index::search(&db, collection, &q)
        .await
        .expect("content type");
    assert!(
        hits.iter()
            .all(|h| h.content_type.as_deref() == Some("text/markdown"))
    );

    let e = index::search(&db, collection, &query(Mode::Vector, Some(&[1.0, 0.0]), ""))
        .await
        .expect_err("dims");
    assert!(
        matches!(e, SearchError::Dimensions { got: 2, want: 3 }),
        "{e}"
    );
}

#[tokio::test]
async fn a_rewritten_document_is_never_missing_or_doubled() {
    let (pool, collection) = setup().await;
    let g = corpus(&pool, collection, "m1").await;
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (pool, stop) = (pool.clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            let db = pool.get().await.expect("db");
            let mut seen = std::collections::BTreeSet::new();
            while !stop.load(Ordering::SeqCst) {
                let n: i64 = db
                    .query_one(
                        "SELECT count(*) FROM chunks WHERE generation_id = $1 AND object_key = 'runbooks/nats.md'",
                        &[&g],
                    )
                    .await
                    .expect("count")
                    .get(0);
                seen.insert(n);
            }
            seen
        })
    };
    let mut db = pool.get().await.expect("db");
    for round in 0..60 {
        let n = 2 + round % 2; // 2 or 3 chunks, alternating
        let chunks: Vec<NewChunk> = (0..n)
            .map(|i| {
                chunk(
                    &format!("JetStream round {round} part {i}"),
                    [0.0, 1.0, 0.0],
                    &[],
                )
            })
            .collect();
        index::write_document(
            &mut db,
            g,
            &source("runbooks/nats.md", "text/markdown"),
            &chunks,
        )
        .await
        .expect("rewrite");
    }
    stop.store(true, Ordering::SeqCst);
    let seen = reader.await.expect("reader");
    // 1 before the first rewrite, then 2 or 3: never 0 (missing) nor 4-5 (doubled).
    assert!(
        seen.iter().all(|n| (1..=3).contains(n)),
        "a reader saw {seen:?} chunks"
    );

    index::delete_document(&mut db, g, "runbooks/nats.md")
        .await
        .expect("delete");
    let hits = index::search(&db, collection, &query(Mode::Keyword, None, "JetStream"))
        .await
        .expect("search");
    assert!(
        hits.is_empty(),
        "deleted documents leave the index: {hits:?}"
    );
    let docs: i64 = db
        .query_one(
            "SELECT count(*) FROM documents WHERE object_key = 'runbooks/nats.md'",
            &[],
        )
        .await
        .expect("docs")
        .get(0);
    assert_eq!(docs, 0);
}

#[tokio::test]
async fn a_new_generation_replaces_the_old_only_when_activated() {
    let (pool, collection) = setup().await;
    let old = corpus(&pool, collection, "m1").await;
    let mut db = pool.get().await.expect("db");
    // Same model: the active generation is reused, nothing is rebuilt.
    assert_eq!(
        index::generation_for(&mut db, collection, &model("m1"))
            .await
            .expect("same")
            .id,
        old
    );

    let new = index::generation_for(&mut db, collection, &model("m2"))
        .await
        .expect("new");
    assert_ne!(new.id, old);
    assert_eq!(new.state, "building");
    assert_eq!(new.embedding, model("m2"), "a generation keeps its model");
    let live: Vec<i64> = index::live_generations(&db, collection)
        .await
        .expect("live")
        .iter()
        .map(|g| g.id)
        .collect();
    assert_eq!(live, vec![old, new.id], "document changes reach both");
    index::write_document(
        &mut db,
        new.id,
        &source("runbooks/nats.md", "text/markdown"),
        &[chunk("Generation two text", [0.0, 1.0, 0.0], &[])],
    )
    .await
    .expect("write");
    let hits = index::search(&db, collection, &query(Mode::Keyword, None, "JetStream"))
        .await
        .expect("old");
    assert_eq!(
        hits.len(),
        1,
        "search answers from the complete old generation while the new one builds"
    );
    let hits = index::search(&db, collection, &query(Mode::Keyword, None, "generation"))
        .await
        .expect("old");
    assert!(
        hits.is_empty(),
        "nothing of the building generation is visible"
    );

    index::activate(&mut db, new.id).await.expect("activate");
    let hits = index::search(&db, collection, &query(Mode::Keyword, None, "generation"))
        .await
        .expect("new");
    assert_eq!(hits.len(), 1);
    let active = index::active_generation(&db, collection)
        .await
        .expect("active")
        .expect("one");
    assert_eq!(active.id, new.id);
    assert_eq!(active.embedding.model, "m2");
    let left: i64 = db
        .query_one(
            "SELECT count(*) FROM chunks WHERE generation_id = $1",
            &[&old],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(left, 0, "the old generation is removed");
    let index_left: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_indexes WHERE indexname = $1",
            &[&format!("chunks_hnsw_g{old}")],
        )
        .await
        .expect("pg_indexes")
        .get(0);
    assert_eq!(index_left, 0, "with its vector index");
    let new_index: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_indexes WHERE indexname = $1",
            &[&format!("chunks_hnsw_g{}", new.id)],
        )
        .await
        .expect("pg_indexes")
        .get(0);
    assert_eq!(new_index, 1, "the active generation has its vector index");
}
