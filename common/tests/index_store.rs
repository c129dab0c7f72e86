//! The index store on the real PostgreSQL + pgvector: vector, keyword and
//! hybrid search with filters; a document rewritten while searches run is
//! never seen missing or doubled; a new embedding generation is built beside
//! the active one and replaces it atomically. Index storage neither leaks nor
//! blocks: every generation's HNSW index goes with it (replaced, abandoned,
//! collection deleted, leftovers of interrupted work), an activation's build
//! never holds up another collection's writes, builds and drops of several
//! collections at once all succeed, and an INVALID index left by a failed
//! build is rebuilt.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use stowage_common::db::Pool;
use stowage_common::spec::index::{Embedding, EmbeddingProvider, IndexSpec};
use stowage_common::state::collections::{self, NewCollection};
use stowage_common::state::index::{self, Mode, NewChunk, Query, SearchError, Source};
use stowage_common::testing::{StackEnv, fresh_collection, unique};
use uuid::Uuid;

async fn setup() -> (Pool, Uuid) {
    fresh_collection(&StackEnv::load()).await
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
        tuning: Default::default(),
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
        allow_private_networks: false,
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
    let mut db = pool.get().await.expect("db");

    let near_nats = [0.1f32, 0.9, 0.0];
    let hits = index::search(
        &mut db,
        collection,
        &query(Mode::Vector, Some(&near_nats), ""),
    )
    .await
    .expect("vector");
    assert_eq!(hits[0].object_key, "runbooks/nats.md");
    assert_eq!(hits[0].vector_rank, Some(1));
    assert!(hits[0].score > 0.9, "cosine similarity {}", hits[0].score);

    let hits = index::search(
        &mut db,
        collection,
        &query(Mode::Keyword, None, "postgres failover"),
    )
    .await
    .expect("keyword");
    // Terms are OR-ed and ranked: the chunk with both words first, the one
    // with only "postgres" after it.
    assert_eq!(hits.len(), 2, "{hits:?}");
    assert_eq!(hits[0].object_key, "runbooks/postgres.md");
    assert_eq!(hits[1].object_key, "policies/postgres-backups.txt");
    assert!(hits[0].score > hits[1].score, "{hits:?}");
    assert_eq!(hits[0].heading_path, ["Runbook", "Failover"]);

    // Hybrid: "postgres" matches two documents by keyword; the vector leans
    // to backups; fusion puts the document found by both first.
    let toward_backups = [0.6f32, 0.0, 0.8];
    let hits = index::search(
        &mut db,
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
    let hits = index::search(&mut db, collection, &q)
        .await
        .expect("prefix");
    assert!(
        !hits.is_empty() && hits.iter().all(|h| h.object_key.starts_with("runbooks/")),
        "{hits:?}"
    );
    let mut q = query(Mode::Vector, Some(&toward_backups), "");
    q.content_type = Some("text/markdown");
    let hits = index::search(&mut db, collection, &q)
        .await
        .expect("content type");
    assert!(
        hits.iter()
            .all(|h| h.content_type.as_deref() == Some("text/markdown"))
    );

    let e = index::search(
        &mut db,
        collection,
        &query(Mode::Vector, Some(&[1.0, 0.0]), ""),
    )
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
    let hits = index::search(
        &mut db,
        collection,
        &query(Mode::Keyword, None, "JetStream"),
    )
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
    let hits = index::search(
        &mut db,
        collection,
        &query(Mode::Keyword, None, "JetStream"),
    )
    .await
    .expect("old");
    assert_eq!(
        hits.len(),
        1,
        "search answers from the complete old generation while the new one builds"
    );
    let hits = index::search(
        &mut db,
        collection,
        &query(Mode::Keyword, None, "generation"),
    )
    .await
    .expect("old");
    assert!(
        hits.is_empty(),
        "nothing of the building generation is visible"
    );

    index::activate(&mut db, new.id).await.expect("activate");
    let hits = index::search(
        &mut db,
        collection,
        &query(Mode::Keyword, None, "generation"),
    )
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
    let counts = index::counts(&db, collection).await.expect("counts");
    assert_eq!(counts.generation, Some(new.id));
    let (rows, vector_index): (i64, i64) = {
        let r = db
            .query_one(
                "SELECT sum(pg_column_size(c.*))::int8, pg_relation_size($2::text::regclass)
                 FROM chunks c WHERE generation_id = $1",
                &[&new.id, &format!("chunks_hnsw_g{}", new.id)],
            )
            .await
            .expect("sizes");
        (r.get(0), r.get(1))
    };
    assert!(rows > 0 && vector_index > 0, "{rows} {vector_index}");
    assert_eq!(
        counts.bytes,
        rows + vector_index,
        "the index size is the generation's rows and its vector index"
    );
}

// ---------------------------------------------------------------------------
// Index storage neither leaks nor blocks: every generation's HNSW index goes
// with it, and building one never holds up another collection's writes.

async fn register(pool: &Pool, name: &str) -> Uuid {
    let spec: IndexSpec =
        serde_json::from_value(serde_json::json!({"source": {"bucket": "docs"}})).expect("spec");
    let db = pool.get().await.expect("db");
    collections::register(
        &db,
        &NewCollection {
            namespace: "team-a".into(),
            name: name.into(),
            source_uid: unique("uid"),
            generation: 1,
            spec,
        },
    )
    .await
    .expect("collection")
}

/// Every generation vector index on `chunks`: (name, valid), by name.
async fn vector_indexes(pool: &Pool) -> Vec<(String, bool)> {
    let db = pool.get().await.expect("db");
    db.query(
        "SELECT c.relname::text, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
         WHERE c.relname LIKE 'chunks_hnsw_g%' ORDER BY 1",
        &[],
    )
    .await
    .expect("pg_index")
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

async fn vector_index_count(pool: &Pool) -> i64 {
    let db = pool.get().await.expect("db");
    db.query_one(
        "SELECT count(*) FROM pg_indexes WHERE indexname LIKE 'chunks_hnsw_g%'",
        &[],
    )
    .await
    .expect("pg_indexes")
    .get(0)
}

fn index_name(generation: i64) -> String {
    format!("chunks_hnsw_g{generation}")
}

/// The statement an activation builds a generation's vector index with,
/// plain (as a version before CONCURRENTLY did, or a build that completed
/// before its activation died).
fn plain_index_sql(generation: i64, dims: i32) -> String {
    format!(
        "CREATE INDEX {} ON chunks USING hnsw ((embedding::vector({dims})) vector_cosine_ops)
         WHERE generation_id = {generation}",
        index_name(generation)
    )
}

async fn one_document(pool: &Pool, generation: i64, key: &str, text: &str) {
    let mut db = pool.get().await.expect("db");
    index::write_document(
        &mut db,
        generation,
        &source(key, "text/plain"),
        &[chunk(text, [0.0, 1.0, 0.0], &[])],
    )
    .await
    .expect("write");
}

async fn generation_ids(pool: &Pool, collection: Uuid) -> Vec<(i64, String)> {
    let db = pool.get().await.expect("db");
    db.query(
        "SELECT id, state FROM embedding_generations WHERE collection_id = $1 ORDER BY id",
        &[&collection],
    )
    .await
    .expect("generations")
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

#[tokio::test]
async fn deleting_a_collection_drops_its_vector_indexes_and_no_others() {
    let (pool, collection) = setup().await;
    let other = register(&pool, "other").await;
    let other_g = corpus(&pool, other, "m1").await;
    let g1 = corpus(&pool, collection, "m1").await;
    let mut db = pool.get().await.expect("db");

    // Replaced by a newer generation: its index goes with it.
    let g2 = index::generation_for(&mut db, collection, &model("m2"))
        .await
        .expect("g2");
    one_document(&pool, g2.id, "a.txt", "second generation").await;
    index::activate(&mut db, g2.id).await.expect("activate g2");
    assert!(
        !vector_indexes(&pool)
            .await
            .iter()
            .any(|(n, _)| *n == index_name(g1)),
        "the replaced generation's index is dropped"
    );

    // A generation being built whose activation died after building its
    // index, replaced by a build for yet another model: its index goes too.
    let g3 = index::generation_for(&mut db, collection, &model("m3"))
        .await
        .expect("g3");
    one_document(&pool, g3.id, "a.txt", "third generation").await;
    db.batch_execute(&plain_index_sql(g3.id, 3))
        .await
        .expect("g3 index");
    let g4 = index::generation_for(&mut db, collection, &model("m4"))
        .await
        .expect("g4");
    assert_ne!(g4.id, g3.id);
    assert!(
        !vector_indexes(&pool)
            .await
            .iter()
            .any(|(n, _)| *n == index_name(g3.id)),
        "a dropped build's index is dropped"
    );
    one_document(&pool, g4.id, "a.txt", "fourth generation").await;
    // The collection now has an active generation (g2) with its index and
    // one being built (g4) with an index a failed activation left.
    db.batch_execute(&plain_index_sql(g4.id, 3))
        .await
        .expect("g4 index");
    assert_eq!(vector_index_count(&pool).await, 3);

    collections::delete(&db, collection).await.expect("delete");
    assert_eq!(
        vector_indexes(&pool).await,
        vec![(index_name(other_g), true)],
        "none of the deleted collection's indexes is left; the other collection keeps its own"
    );
    assert_eq!(vector_index_count(&pool).await, 1);
    let hits = index::search(&mut db, other, &query(Mode::Keyword, None, "JetStream"))
        .await
        .expect("the other collection still answers");
    assert_eq!(hits.len(), 1);
}

#[tokio::test]
async fn a_replacement_interrupted_before_the_old_generation_went_is_finished_next_time() {
    let (pool, collection) = setup().await;
    let g1 = corpus(&pool, collection, "m1").await;
    let mut db = pool.get().await.expect("db");
    let g2 = index::generation_for(&mut db, collection, &model("m2"))
        .await
        .expect("g2");
    one_document(&pool, g2.id, "a.txt", "second generation").await;
    // An activation of g2 that died between the switch and removing g1.
    db.batch_execute(&plain_index_sql(g2.id, 3))
        .await
        .expect("g2 index");
    db.batch_execute(&format!(
        "UPDATE embedding_generations SET state = 'retired' WHERE id = {g1};
         UPDATE embedding_generations SET state = 'active' WHERE id = {};",
        g2.id
    ))
    .await
    .expect("switch");

    let g3 = index::generation_for(&mut db, collection, &model("m3"))
        .await
        .expect("g3");
    one_document(&pool, g3.id, "a.txt", "third generation").await;
    index::activate(&mut db, g3.id).await.expect("activate g3");

    assert_eq!(
        generation_ids(&pool, collection).await,
        vec![(g3.id, "active".to_string())],
        "every generation g3 replaced is gone, also the one an earlier activation left retired"
    );
    let left: i64 = db
        .query_one(
            "SELECT count(*) FROM chunks WHERE generation_id = ANY($1)",
            &[&vec![g1, g2.id]],
        )
        .await
        .expect("chunks")
        .get(0);
    assert_eq!(left, 0, "their chunks are gone");
    assert_eq!(
        vector_indexes(&pool).await,
        vec![(index_name(g3.id), true)],
        "and so are their indexes"
    );
}

/// A 384-dimensional model of a (never called) remote provider.
fn model_384(name: &str) -> Embedding {
    Embedding {
        dimensions: 384,
        ..model(name)
    }
}

/// `rows` chunks with random 384-dimensional vectors in generation `g`.
async fn random_chunks(pool: &Pool, g: i64, rows: i32) {
    let db = pool.get().await.expect("db");
    db.execute(
        "INSERT INTO chunks (generation_id, object_key, ordinal, content, byte_start, byte_end,
             char_start, char_end, embedding)
         SELECT $1, 'bulk/' || (i / 4), i % 4, 'bulk text ' || i, 0, 10, 0, 10,
                -- (correlated, so that each row gets its own vector)
                (SELECT array_agg(random())::real[] FROM generate_series(1, 384) d
                  WHERE i >= 0)::vector
         FROM generate_series(0, $2 - 1) i",
        &[&g, &rows],
    )
    .await
    .expect("random chunks");
}

async fn backend_pid(db: &stowage_common::db::Client) -> i32 {
    db.query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0)
}

/// What backend `pid` is doing: (state, wait_event_type, query), if it is
/// connected.
async fn activity(pool: &Pool, pid: i32) -> Option<(String, Option<String>, String)> {
    let db = pool.get().await.expect("db");
    db.query_opt(
        "SELECT state, wait_event_type, query FROM pg_stat_activity WHERE pid = $1",
        &[&pid],
    )
    .await
    .expect("pg_stat_activity")
    .map(|r| (r.get(0), r.get(1), r.get(2)))
}

/// Backends that `pid`'s lock wait is behind (pg_blocking_pids).
async fn blockers(pool: &Pool, pid: i32) -> Vec<i32> {
    let db = pool.get().await.expect("db");
    db.query_one("SELECT pg_blocking_pids($1)", &[&pid])
        .await
        .expect("pg_blocking_pids")
        .get(0)
}

/// The phase of the index build backend `pid` runs, if any.
async fn build_phase(pool: &Pool, pid: i32) -> Option<String> {
    let db = pool.get().await.expect("db");
    db.query_opt(
        "SELECT phase FROM pg_stat_progress_create_index WHERE pid = $1",
        &[&pid],
    )
    .await
    .expect("pg_stat_progress_create_index")
    .map(|r| r.get(0))
}

#[tokio::test]
async fn activating_a_generation_never_blocks_another_collections_writes() {
    const ROWS: i32 = 4000;
    let (pool, a) = setup().await;
    let b = register(&pool, "b").await;
    let gb = corpus(&pool, b, "m1").await;
    let ga = {
        let mut db = pool.get().await.expect("db");
        index::generation_for(&mut db, a, &model_384("big"))
            .await
            .expect("generation")
    };
    random_chunks(&pool, ga.id, ROWS).await;

    // A writer of chunks whose transaction is still open when A's activation
    // starts: the build cannot finish before it commits, which keeps A's
    // activation running for as long as this test needs.
    let holder = pool.get().await.expect("db");
    holder
        .batch_execute("BEGIN; LOCK TABLE chunks IN ROW EXCLUSIVE MODE")
        .await
        .expect("hold");

    let mut adb = pool.get().await.expect("db");
    let a_pid = backend_pid(&adb).await;
    let started = std::time::Instant::now();
    let activation = tokio::spawn(async move {
        let r = index::activate(&mut adb, ga.id).await;
        (r, started.elapsed())
    });
    // A's activation is building and waiting for the open writer.
    stowage_common::testing::eventually(
        "A's activation waits on the open writer",
        std::time::Duration::from_secs(60),
        || {
            let pool = pool.clone();
            async move {
                matches!(activity(&pool, a_pid).await,
                    Some((state, Some(wait), query))
                        if state == "active" && wait == "Lock" && query.contains("CREATE INDEX"))
            }
        },
    )
    .await;

    // B writes meanwhile.
    let mut bdb = pool.get().await.expect("db");
    let b_pid = backend_pid(&bdb).await;
    let b_started = std::time::Instant::now();
    let write = tokio::spawn(async move {
        let r = index::write_document(
            &mut bdb,
            gb,
            &source("b/during.txt", "text/plain"),
            &[chunk("written during A's activation", [0.0, 1.0, 0.0], &[])],
        )
        .await;
        (r, b_started.elapsed())
    });
    loop {
        if write.is_finished() {
            break;
        }
        if blockers(&pool, b_pid).await.contains(&a_pid) {
            holder.batch_execute("COMMIT").await.expect("release");
            panic!(
                "B's write waits behind A's activation ({:?})",
                activity(&pool, b_pid).await
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (r, b_took) = write.await.expect("write task");
    r.expect("B's write");
    assert!(
        !activation.is_finished(),
        "B's write finished while A's activation was still running"
    );
    assert!(
        matches!(activity(&pool, a_pid).await, Some((_, _, q)) if q.contains("CREATE INDEX")),
        "A is still building its index"
    );
    eprintln!("B's write while A's activation waited: {b_took:?}");

    // Let A's build go on; B keeps writing while A's build is in its
    // building phase.
    holder.batch_execute("COMMIT").await.expect("release");
    let mut during_build = Vec::new();
    let mut round: i64 = 0;
    while !activation.is_finished() {
        let building = |p: Option<String>| p.is_some_and(|p| p.starts_with("building index"));
        if round < 20 && building(build_phase(&pool, a_pid).await) {
            round += 1;
            let mut bdb = pool.get().await.expect("db");
            let t = std::time::Instant::now();
            index::write_document(
                &mut bdb,
                gb,
                &source(&format!("b/build-{round}.txt"), "text/plain"),
                &[chunk("written during A's build", [0.0, 1.0, 0.0], &[])],
            )
            .await
            .expect("B's write during the build");
            let took = t.elapsed();
            if building(build_phase(&pool, a_pid).await) {
                during_build.push(took);
            }
        } else {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    let (r, a_took) = activation.await.expect("activation task");
    r.expect("A's activation");
    eprintln!(
        "A's activation ({ROWS} x 384-d): {a_took:?}; B's writes begun and ended within A's \
         build phase: {during_build:?}"
    );
    assert!(
        !during_build.is_empty(),
        "B wrote (start to end) while A's index was being built"
    );

    let db = pool.get().await.expect("db");
    let active = index::active_generation(&db, a)
        .await
        .expect("active")
        .expect("one");
    assert_eq!(active.id, ga.id);
    assert!(
        vector_indexes(&pool)
            .await
            .contains(&(index_name(ga.id), true)),
        "A's index is valid"
    );
    let written: i64 = db
        .query_one(
            "SELECT count(*) FROM chunks WHERE generation_id = $1 AND object_key LIKE 'b/%'",
            &[&gb],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(written, 1 + round, "every write of B is in");
}

#[tokio::test]
async fn an_invalid_index_left_by_an_interrupted_build_is_rebuilt_by_the_next_activation() {
    let (pool, collection) = setup().await;
    let mut db = pool.get().await.expect("db");
    let g = index::generation_for(&mut db, collection, &model("m1"))
        .await
        .expect("generation");
    one_document(&pool, g.id, "a.txt", "Postgres failover runbook").await;
    // A concurrent build that failed (here: a vector of the wrong
    // dimensions) leaves its index behind, INVALID.
    db.execute(
        "INSERT INTO chunks (generation_id, object_key, ordinal, content, byte_start, byte_end,
             char_start, char_end, embedding)
         VALUES ($1, 'bad.txt', 0, 'bad', 0, 3, 0, 3, '[1,2,3,4]')",
        &[&g.id],
    )
    .await
    .expect("bad row");
    let e = db
        .batch_execute(&format!(
            "CREATE INDEX CONCURRENTLY {} ON chunks
             USING hnsw ((embedding::vector(3)) vector_cosine_ops) WHERE generation_id = {}",
            index_name(g.id),
            g.id
        ))
        .await
        .expect_err("the build fails");
    assert!(
        format!("{e:?}").contains("dimensions"),
        "fails on the bad vector: {e:?}"
    );
    assert_eq!(vector_indexes(&pool).await, vec![(index_name(g.id), false)]);
    db.execute("DELETE FROM chunks WHERE object_key = 'bad.txt'", &[])
        .await
        .expect("fix");

    index::activate(&mut db, g.id).await.expect("activate");
    assert_eq!(
        vector_indexes(&pool).await,
        vec![(index_name(g.id), true)],
        "the next activation rebuilt it"
    );
    let plan: Vec<String> = {
        let tx = db.transaction().await.expect("tx");
        tx.batch_execute("SET LOCAL enable_seqscan = off")
            .await
            .expect("set");
        let rows = tx
            .query(
                &format!(
                    "EXPLAIN SELECT id FROM chunks WHERE generation_id = {}
                     ORDER BY embedding::vector(3) <=> '[0,1,0]' LIMIT 5",
                    g.id
                ),
                &[],
            )
            .await
            .expect("explain");
        rows.iter().map(|r| r.get(0)).collect()
    };
    assert!(
        plan.iter().any(|l| l.contains(&index_name(g.id))),
        "vector search uses it: {plan:#?}"
    );
    let hits = index::search(
        &mut db,
        collection,
        &query(Mode::Vector, Some(&[0.0, 1.0, 0.0]), ""),
    )
    .await
    .expect("search");
    assert_eq!(hits.len(), 1);

    // A build that fails during an activation: the error says which index
    // and why, the generation stays unactivated, and no INVALID index stays
    // behind to slow every write.
    let g2 = index::generation_for(&mut db, collection, &model("m2"))
        .await
        .expect("g2");
    one_document(&pool, g2.id, "a.txt", "second generation").await;
    db.execute(
        "INSERT INTO chunks (generation_id, object_key, ordinal, content, byte_start, byte_end,
             char_start, char_end, embedding)
         VALUES ($1, 'bad.txt', 0, 'bad', 0, 3, 0, 3, '[1,2,3,4]')",
        &[&g2.id],
    )
    .await
    .expect("bad row");
    let e = index::activate(&mut db, g2.id)
        .await
        .expect_err("the build fails");
    let msg = e.to_string();
    assert!(
        msg.contains(&index_name(g2.id)) && msg.contains("dimensions"),
        "names the index and the cause: {msg}"
    );
    assert_eq!(
        generation_ids(&pool, collection).await,
        vec![(g.id, "active".into()), (g2.id, "building".into())]
    );
    assert_eq!(
        vector_indexes(&pool).await,
        vec![(index_name(g.id), true)],
        "the failed build left no index"
    );
}

#[tokio::test]
async fn two_activations_of_one_generation_both_succeed_with_one_index() {
    let (pool, collection) = setup().await;
    let g = {
        let mut db = pool.get().await.expect("db");
        index::generation_for(&mut db, collection, &model_384("big"))
            .await
            .expect("generation")
    };
    random_chunks(&pool, g.id, 2000).await;
    let id = g.id;
    let run = |pool: Pool| async move {
        let mut db = pool.get().await.expect("db");
        index::activate(&mut db, id).await
    };
    let (x, y) = tokio::join!(
        tokio::spawn(run(pool.clone())),
        tokio::spawn(run(pool.clone()))
    );
    x.expect("task").expect("first activation");
    y.expect("task").expect("second activation");
    assert_eq!(
        generation_ids(&pool, collection).await,
        vec![(g.id, "active".into())]
    );
    assert_eq!(vector_indexes(&pool).await, vec![(index_name(g.id), true)]);
}

/// The last statement backend `pid` ran or runs.
async fn last_query(pool: &Pool, pid: i32) -> String {
    activity(pool, pid)
        .await
        .map(|(_, _, q)| q)
        .unwrap_or_default()
}

#[tokio::test]
async fn activations_and_a_deletion_of_different_collections_at_once_all_succeed() {
    let (pool, a) = setup().await;
    let b = register(&pool, "b").await;
    let c = register(&pool, "c").await;
    let (ga, gb) = {
        let mut db = pool.get().await.expect("db");
        let ga = index::generation_for(&mut db, a, &model_384("big"))
            .await
            .expect("ga");
        let gb = index::generation_for(&mut db, b, &model_384("big"))
            .await
            .expect("gb");
        (ga.id, gb.id)
    };
    random_chunks(&pool, ga, 3000).await;
    random_chunks(&pool, gb, 300).await;
    let gc = corpus(&pool, c, "m1").await;

    // A's build is held in its first wait (an open writer) until B's
    // activation and C's deletion have started too: all three then run at
    // once.
    let holder = pool.get().await.expect("db");
    holder
        .batch_execute("BEGIN; LOCK TABLE chunks IN ROW EXCLUSIVE MODE")
        .await
        .expect("hold");
    let mut adb = pool.get().await.expect("db");
    let a_pid = backend_pid(&adb).await;
    let activate_a = tokio::spawn(async move { index::activate(&mut adb, ga).await });
    stowage_common::testing::eventually(
        "A's activation builds",
        std::time::Duration::from_secs(60),
        || {
            let pool = pool.clone();
            async move { last_query(&pool, a_pid).await.contains("CREATE INDEX") }
        },
    )
    .await;
    let mut bdb = pool.get().await.expect("db");
    let b_pid = backend_pid(&bdb).await;
    let activate_b = tokio::spawn(async move { index::activate(&mut bdb, gb).await });
    let cdb = pool.get().await.expect("db");
    let c_pid = backend_pid(&cdb).await;
    let delete_c = tokio::spawn(async move { collections::delete(&cdb, c).await });
    for (pid, what) in [(b_pid, "CREATE INDEX"), (c_pid, "DROP INDEX")] {
        stowage_common::testing::eventually(
            "B's activation and C's deletion reach their index statements",
            std::time::Duration::from_secs(60),
            || {
                let pool = pool.clone();
                async move {
                    let q = last_query(&pool, pid).await;
                    q.contains(what) || q.contains("vector_index_ddl")
                }
            },
        )
        .await;
    }
    holder.batch_execute("COMMIT").await.expect("release");

    let (ra, rb, rc) = tokio::join!(activate_a, activate_b, delete_c);
    ra.expect("task").expect("A's activation");
    rb.expect("task").expect("B's activation");
    rc.expect("task").expect("C's deletion");
    assert_eq!(
        vector_indexes(&pool).await,
        vec![(index_name(ga), true), (index_name(gb), true)],
        "A and B have their indexes, C's ({}) is gone",
        index_name(gc)
    );
}

#[tokio::test]
async fn a_claim_on_index_ddl_left_by_a_session_that_is_gone_does_not_hold_anyone_up() {
    let (pool, collection) = setup().await;
    // A session that claimed the right to run index DDL and died (its
    // claim still in place).
    let gone_pid = {
        let db = pool.get().await.expect("db");
        let other = pool.get().await.expect("db");
        let pid = backend_pid(&other).await;
        db.execute(
            "UPDATE vector_index_ddl SET holder = $1, what = 'build', since = now()",
            &[&pid],
        )
        .await
        .expect("claim");
        let _: bool = db
            .query_one("SELECT pg_terminate_backend($1, 10000)", &[&pid])
            .await
            .expect("terminate")
            .get(0);
        drop(other);
        pid
    };
    // (Bounded only so that a regression fails instead of hanging.)
    let g = tokio::time::timeout(
        std::time::Duration::from_secs(300),
        corpus(&pool, collection, "m1"),
    )
    .await
    .expect("the activation took the stale claim over");
    assert_eq!(vector_indexes(&pool).await, vec![(index_name(g), true)]);
    let db = pool.get().await.expect("db");
    let holder: Option<i32> = db
        .query_one("SELECT holder FROM vector_index_ddl", &[])
        .await
        .expect("claim")
        .get(0);
    assert_eq!(holder, None, "released (it was {gone_pid}'s)");
}

#[tokio::test]
async fn the_migration_removes_what_earlier_versions_left() {
    let (pool, collection) = setup().await;
    let other = register(&pool, "other").await;
    let kept = corpus(&pool, other, "m1").await;
    let g1 = corpus(&pool, collection, "m1").await;
    let db = pool.get().await.expect("db");
    // Left by an earlier version: a retired generation with its chunks and
    // index, and the index of a generation whose collection was deleted.
    db.batch_execute(&format!(
        "UPDATE embedding_generations SET state = 'retired' WHERE id = {g1};
         {};",
        plain_index_sql(g1 + 1000, 3)
    ))
    .await
    .expect("leftovers");
    assert_eq!(vector_index_count(&pool).await, 3);

    db.batch_execute(include_str!("../migrations/V10__vector_index_ddl.sql"))
        .await
        .expect("V10 (idempotent)");
    assert_eq!(generation_ids(&pool, collection).await, vec![]);
    assert_eq!(vector_indexes(&pool).await, vec![(index_name(kept), true)]);
}
