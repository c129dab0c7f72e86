//! IndexCollection sync runs on the real stack (LocalStack bucket, PostgreSQL
//! with pgvector, JetStream) with a local OpenAI-compatible embedder: the
//! incremental behaviour (only new and changed documents are embedded,
//! deleted ones leave the index), every format including malformed and
//! unsupported files, search over the result; a run left in progress by a
//! dead worker is marked abandoned; a collection on the built-in model, on a
//! worker whose model folder is missing, gets a failed run that says so; the
//! queries that run while the embedding model changes are all answered, each
//! by one complete generation.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use stowage_common::spec::index::IndexSpec;
use stowage_common::state::collections::{self, NewCollection, RunState};
use stowage_common::state::index::{self as store, Mode, Query};
use stowage_common::testing::eventually;
use stowage_proto::v1::search_client::SearchClient;
use stowage_proto::v1::{SearchMode, SearchRequest};
use support::Harness;
use support::index::{
    DIMS, SLOW_MODEL, bag_of_words, embedder, etag, put, put_multipart, put_single,
    record_stowage_write, register, source, stowage_upload, sync,
};
use uuid::Uuid;

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
    let mut db = h.pool.get().await.expect("db");
    let vector = bag_of_words(text, DIMS);
    let q = Query {
        mode,
        vector: Some(&vector),
        text,
        top_k: 3,
        key_prefix: None,
        content_type: None,
        tuning: Default::default(),
    };
    store::search(&mut db, id, &q)
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
    let mut source = source(&h, "kb/");
    source["exclude"] = serde_json::json!(["drafts/**"]);
    let id = register(
        &h,
        serde_json::json!({
            "source": source,
            "chunking": {"strategy": "markdown", "size": 200, "overlap": 0},
            "embedding": {"provider": "openai", "model": "bag-of-words", "dimensions": DIMS, "endpoint": url, "allowPrivateNetworks": true},
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
    // The malformed PDF is tried again (a failure may have been transient)
    // and fails again: the run still has errors.
    assert_eq!(second.state, RunState::CompletedWithErrors, "{second:?}");
    let c = &second.counts;
    assert_eq!(
        (c.new, c.changed, c.deleted, c.failed, c.skipped),
        (1, 1, 1, 1, 0),
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
async fn a_stale_run_is_abandoned_and_a_missing_builtin_model_is_reported() {
    let h = Harness::new("localstack").await;
    let _worker = h
        .worker_with(&["--embedding-model-dir=/nonexistent/minilm"], None)
        .await;
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
    let error = run.error.as_deref().unwrap_or_default();
    assert!(
        error.starts_with("builtin embedding model at /nonexistent/minilm: reading config.json"),
        "{error}"
    );
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
            .is_some_and(|e| e.contains("stopped making progress"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_during_a_model_change_are_answered_by_one_complete_generation() {
    const DOCS: usize = 24;
    let h = Harness::new("localstack").await;
    let worker = h.worker(None).await;
    let url = embedder(Arc::new(AtomicUsize::new(0))).await;
    for i in 0..DOCS {
        let text = format!("Stowage document {i} covers topic{i}.");
        put(
            &h,
            &format!("kb/doc-{i:02}.txt"),
            "text/plain",
            text.as_bytes(),
        )
        .await;
    }
    let uid = stowage_common::testing::unique("uid");
    let spec_for = |model: &str, dims: u32| -> IndexSpec {
        let source = source(&h, "kb/");
        serde_json::from_value(serde_json::json!({
            "source": source,
            "embedding": {"provider": "openai", "model": model, "dimensions": dims, "endpoint": url, "allowPrivateNetworks": true},
        }))
        .expect("spec")
    };
    let apply = |generation: i64, spec: IndexSpec| {
        let uid = uid.clone();
        let pool = h.pool.clone();
        async move {
            let db = pool.get().await.expect("db");
            collections::register(
                &db,
                &NewCollection {
                    namespace: "team-a".into(),
                    name: "kb".into(),
                    source_uid: uid,
                    generation,
                    spec,
                },
            )
            .await
            .expect("register")
        }
    };
    let id = apply(1, spec_for("bow-64", 64)).await;
    assert_eq!(sync(&h, id, "one").await.state, RunState::Completed);
    let active = move |pool: stowage_common::db::Pool| async move {
        let db = pool.get().await.expect("db");
        store::active_generation(&db, id)
            .await
            .expect("query")
            .expect("an active generation")
    };
    let old = active(h.pool.clone()).await;

    // The model changes (and its dimensions); queries run all along.
    assert_eq!(apply(2, spec_for(SLOW_MODEL, 32)).await, id);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let querier = {
        let (stop, answered, pool) = (Arc::clone(&stop), Arc::clone(&answered), h.pool.clone());
        let addr = format!("http://{}", worker.grpc_addr);
        tokio::spawn(async move {
            let mut client = SearchClient::connect(addr).await.expect("gRPC");
            let mut answers = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                for mode in [SearchMode::Vector, SearchMode::Keyword, SearchMode::Hybrid] {
                    let hits = client
                        .query(SearchRequest {
                            namespace: "team-a".into(),
                            collection: "kb".into(),
                            query: "stowage document".into(),
                            mode: mode as i32,
                            top_k: 100,
                            ..Default::default()
                        })
                        .await
                        .unwrap_or_else(|e| panic!("a {mode:?} query failed mid-change: {e}"))
                        .into_inner()
                        .hits;
                    let generation = active(pool.clone()).await.id;
                    answers.push((generation, mode, hits.len()));
                    answered.fetch_add(1, Ordering::SeqCst);
                }
            }
            answers
        })
    };
    let second = sync(&h, id, "two").await;
    assert_eq!(second.state, RunState::Completed, "{second:?}");
    let after_switch = answered.load(Ordering::SeqCst);
    eventually(
        "queries after the switch",
        Duration::from_secs(30),
        || async { answered.load(Ordering::SeqCst) >= after_switch + 6 },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let answers = querier.await.expect("querier");

    let new = active(h.pool.clone()).await;
    assert_ne!(new.id, old.id);
    assert_eq!(
        (new.embedding.model.as_str(), new.dimensions),
        (SLOW_MODEL, 32)
    );
    for (generation, mode, hits) in &answers {
        assert_eq!(
            *hits, DOCS,
            "{mode:?} answered with {hits} documents (generation {generation}): \
             only complete generations answer"
        );
    }
    let from_old = answers.iter().filter(|a| a.0 == old.id).count();
    let from_new = answers.iter().filter(|a| a.0 == new.id).count();
    assert!(
        from_old >= 3 && from_new >= 3,
        "queries ran while the new generation was built ({from_old}) and after the switch ({from_new})"
    );
    let db = h.pool.get().await.expect("db");
    let left: i64 = db
        .query_one(
            "SELECT count(*) FROM chunks WHERE generation_id = $1",
            &[&old.id],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(left, 0, "the old generation is removed after the switch");
}

/// An `IndexDocument` task (what the operator publishes for a landed object).
async fn document_task(h: &Harness, id: Uuid, key: &str, sequence: u64) {
    use stowage_common::jobs::{DocumentOrigin, index_document_task};
    let subject = h.queue.topology().task_subject(
        stowage_common::queue::TaskKind::IndexDocument,
        "team-a",
        "kb",
    );
    h.queue
        .publish_task(
            &subject,
            &index_document_task(id, key, DocumentOrigin::Event { sequence }),
        )
        .await
        .expect("publish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn document_tasks_update_and_remove_single_documents_between_runs() {
    let h = Harness::new("localstack").await;
    let _worker = h.worker(None).await;
    let embedded = Arc::new(AtomicUsize::new(0));
    let url = embedder(Arc::clone(&embedded)).await;
    put(&h, "kb/a.txt", "text/plain", b"Alpha notes about buckets.").await;
    put(&h, "kb/b.txt", "text/plain", b"Beta notes about queues.").await;
    let source = source(&h, "kb/");
    let id = register(
        &h,
        serde_json::json!({"source": source, "embedding": {
            "provider": "openai", "model": "bow", "dimensions": DIMS, "endpoint": url,
            "allowPrivateNetworks": true}}),
    )
    .await;
    assert_eq!(sync(&h, id, "one").await.state, RunState::Completed);
    let after_sync = embedded.load(Ordering::SeqCst);

    put(
        &h,
        "kb/a.txt",
        "text/plain",
        b"Alpha notes, rewritten: lifecycle rules.",
    )
    .await;
    h.s3.delete_object()
        .bucket(&h.bucket)
        .key("kb/b.txt")
        .send()
        .await
        .expect("delete");
    document_task(&h, id, "kb/a.txt", 1).await;
    document_task(&h, id, "kb/b.txt", 1).await;
    eventually(
        "a re-indexed, b removed",
        Duration::from_secs(30),
        || async {
            search(&h, id, Mode::Keyword, "lifecycle").await == ["kb/a.txt"]
                && document_state(&h, "kb/b.txt").await.is_none()
        },
    )
    .await;
    assert!(search(&h, id, Mode::Keyword, "queues").await.is_empty());
    assert_eq!(
        embedded.load(Ordering::SeqCst),
        after_sync + 1,
        "only the changed document was embedded"
    );
    // The same task again: nothing changed, nothing embedded.
    document_task(&h, id, "kb/a.txt", 2).await;
    eventually("the repeat is handled", Duration::from_secs(30), || async {
        h.queue.backlog().await.is_ok_and(|b| b == 0)
    })
    .await;
    assert_eq!(embedded.load(Ordering::SeqCst), after_sync + 1);
    let runs: i64 = h
        .pool
        .get()
        .await
        .expect("db")
        .query_one("SELECT count(*) FROM sync_runs", &[])
        .await
        .expect("runs")
        .get(0);
    assert_eq!(runs, 1, "no sync run was needed");
}

/// What the active generation records for `key`: (ETag, chunk ids).
async fn indexed_version(h: &Harness, key: &str) -> (Option<String>, Vec<i64>) {
    let db = h.pool.get().await.expect("db");
    let row = db
        .query_one(
            "SELECT d.etag, coalesce((SELECT array_agg(c.id ORDER BY c.id) FROM chunks c
                     WHERE c.generation_id = d.generation_id AND c.object_key = d.object_key),
                     '{}')
             FROM documents d
             JOIN embedding_generations g ON g.id = d.generation_id AND g.state = 'active'
             WHERE d.object_key = $1",
            &[&key],
        )
        .await
        .expect("document row");
    (row.get(0), row.get(1))
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Another store's endpoint: a record of writing there says nothing about
/// the harness's bucket of the same name.
fn elsewhere(h: &Harness) -> stowage_common::spec::Endpoint {
    stowage_common::spec::Endpoint {
        endpoint: Some("http://elsewhere.example:9000".into()),
        ..h.endpoint()
    }
}

/// Identical bytes written again get a new ETag when the upload's shape
/// changes (a single PUT's ETag is the bytes' MD5, a multipart one the MD5
/// of the parts' MD5s with `-N`, on LocalStack and Garage alike). A second
/// run embeds none of them: Stowage's UploadJob wrote one (its `sha256`
/// metadata says so, found by a HEAD), Stowage's history has another (same
/// store, that exact ETag), and the plain multipart uploads nobody vouches
/// for are read, hashed and found identical. Their documents keep their
/// chunks and record the new ETags, so a third run looks nothing up.
/// Changed bytes are embedded as before.
async fn identical_bytes_written_again_are_not_embedded_again(target: &str) {
    let h = Harness::new(target).await;
    let _worker = h.worker(None).await;
    let embedded = Arc::new(AtomicUsize::new(0));
    let url = embedder(Arc::clone(&embedded)).await;
    let job: &[u8] = b"Stowage copied this runbook: promote the standby replica.";
    let recorded: &[u8] = b"Stowage recorded this one without metadata: lifecycle rules.";
    let foreign: &[u8] = b"Recorded as written to another store: retention periods.";
    let plain: &[u8] = b"Plain uploads by anyone: buckets, prefixes and keys.";
    let same: &[u8] = b"Never written again: queues and consumers.";
    // Untyped like Stowage's own writes (the same bytes under another type
    // would be another document).
    put_multipart(&h, "kb/job.txt", None, job).await;
    put_single(&h, "kb/recorded.txt", None, recorded).await;
    put_single(&h, "kb/foreign.txt", None, foreign).await;
    put_single(&h, "kb/plain.txt", Some("text/plain"), plain).await;
    put_single(&h, "kb/same.txt", Some("text/plain"), same).await;
    put_single(
        &h,
        "kb/edited.txt",
        Some("text/plain"),
        b"Edited: version one.",
    )
    .await;
    put_single(&h, "src/job.txt", None, job).await; // the UploadJob's source
    let id = register(
        &h,
        serde_json::json!({"source": source(&h, "kb/"), "embedding": {
            "provider": "openai", "model": "bow", "dimensions": DIMS, "endpoint": url,
            "allowPrivateNetworks": true}}),
    )
    .await;
    let first = sync(&h, id, "one").await;
    assert_eq!(first.state, RunState::Completed, "{first:?}");
    assert_eq!((first.counts.new, first.counts.chunks_written), (6, 6));
    assert_eq!(embedded.load(Ordering::SeqCst), 6);
    let rewritten = [
        "kb/job.txt",
        "kb/recorded.txt",
        "kb/foreign.txt",
        "kb/plain.txt",
    ];
    let mut before = std::collections::HashMap::new();
    for key in rewritten {
        before.insert(key, indexed_version(&h, key).await);
    }

    // The same bytes again, each under a new ETag.
    stowage_upload(&h, "same-bytes", "src/", "kb/").await;
    let e = put_multipart(&h, "kb/recorded.txt", None, recorded).await;
    record_stowage_write(
        &h,
        "kb/recorded.txt",
        &e,
        &sha256_hex(recorded),
        recorded.len() as i64,
        h.endpoint(),
    )
    .await;
    let e = put_multipart(&h, "kb/foreign.txt", None, foreign).await;
    record_stowage_write(
        &h,
        "kb/foreign.txt",
        &e,
        &sha256_hex(foreign),
        foreign.len() as i64,
        elsewhere(&h),
    )
    .await;
    put_multipart(&h, "kb/plain.txt", Some("text/plain"), plain).await;
    put_single(
        &h,
        "kb/edited.txt",
        Some("text/plain"),
        b"Edited: version two, rewritten.",
    )
    .await;
    for key in rewritten {
        assert_ne!(
            before[key].0.as_deref(),
            Some(etag(&h, key).await.as_str()),
            "{key} has a new ETag"
        );
    }
    assert_eq!(
        h.object_sha256_metadata("kb/job.txt").await,
        Some(sha256_hex(job)),
        "the UploadJob wrote the hash in the metadata"
    );

    let embedded_before = embedded.load(Ordering::SeqCst);
    let second = sync(&h, id, "two").await;
    assert_eq!(second.state, RunState::Completed, "{second:?}");
    let c = &second.counts;
    assert_eq!(
        embedded.load(Ordering::SeqCst) - embedded_before,
        1,
        "only the edited document's one chunk is embedded ({c:?})"
    );
    // The planner knew job.txt and recorded.txt unchanged; foreign.txt and
    // plain.txt were read to learn it; edited.txt changed.
    assert_eq!(
        (
            c.seen,
            c.new,
            c.changed,
            c.deleted,
            c.failed,
            c.skipped,
            c.chunks_written
        ),
        (6, 0, 3, 0, 0, 0, 1),
        "{c:?}"
    );
    for key in rewritten {
        let (recorded_etag, chunks) = indexed_version(&h, key).await;
        assert_eq!(
            recorded_etag,
            Some(etag(&h, key).await),
            "{key}: its new ETag is recorded"
        );
        assert_eq!(chunks, before[key].1, "{key}: its chunks are untouched");
    }
    assert_eq!(
        search(&h, id, Mode::Keyword, "rewritten").await,
        ["kb/edited.txt"],
        "changed bytes are indexed"
    );

    // Every ETag is the one recorded: nothing to look up or read.
    let third = sync(&h, id, "three").await;
    assert_eq!(
        (
            third.counts.seen,
            third.counts.changed,
            third.counts.chunks_written
        ),
        (6, 0, 0),
        "{third:?}"
    );
    assert_eq!(embedded.load(Ordering::SeqCst) - embedded_before, 1);
}
on_each_s3!(identical_bytes_written_again_are_not_embedded_again);

/// The event-driven path: after an UploadJob (and others) wrote identical
/// bytes under new ETags, their `IndexDocument` tasks embed nothing and
/// record the new ETags; changed bytes are embedded.
async fn document_tasks_embed_nothing_for_identical_bytes(target: &str) {
    let h = Harness::new(target).await;
    let _worker = h.worker(None).await;
    let embedded = Arc::new(AtomicUsize::new(0));
    let url = embedder(Arc::clone(&embedded)).await;
    let job: &[u8] = b"Stowage copied this runbook: promote the standby replica.";
    let recorded: &[u8] = b"Stowage recorded this one without metadata: lifecycle rules.";
    let plain: &[u8] = b"Plain uploads by anyone: buckets, prefixes and keys.";
    put_multipart(&h, "kb/job.txt", None, job).await;
    put_single(&h, "kb/recorded.txt", None, recorded).await;
    put_single(&h, "kb/plain.txt", Some("text/plain"), plain).await;
    put_single(
        &h,
        "kb/edited.txt",
        Some("text/plain"),
        b"Edited: version one.",
    )
    .await;
    put_single(&h, "src/job.txt", None, job).await;
    let id = register(
        &h,
        serde_json::json!({"source": source(&h, "kb/"), "embedding": {
            "provider": "openai", "model": "bow", "dimensions": DIMS, "endpoint": url,
            "allowPrivateNetworks": true}}),
    )
    .await;
    assert_eq!(sync(&h, id, "one").await.state, RunState::Completed);
    assert_eq!(embedded.load(Ordering::SeqCst), 4);
    let rewritten = ["kb/job.txt", "kb/recorded.txt", "kb/plain.txt"];
    let mut before = std::collections::HashMap::new();
    for key in rewritten {
        before.insert(key, indexed_version(&h, key).await);
    }

    stowage_upload(&h, "same-bytes", "src/", "kb/").await;
    let e = put_multipart(&h, "kb/recorded.txt", None, recorded).await;
    record_stowage_write(
        &h,
        "kb/recorded.txt",
        &e,
        &sha256_hex(recorded),
        recorded.len() as i64,
        h.endpoint(),
    )
    .await;
    put_multipart(&h, "kb/plain.txt", Some("text/plain"), plain).await;
    put_single(
        &h,
        "kb/edited.txt",
        Some("text/plain"),
        b"Edited: version two, rewritten.",
    )
    .await;
    for key in rewritten.iter().chain(&["kb/edited.txt"]) {
        document_task(&h, id, key, 1).await;
    }
    eventually(
        "the edited document is re-indexed",
        Duration::from_secs(30),
        || async { search(&h, id, Mode::Keyword, "rewritten").await == ["kb/edited.txt"] },
    )
    .await;
    eventually("every task is handled", Duration::from_secs(30), || async {
        h.queue.backlog().await.is_ok_and(|b| b == 0)
    })
    .await;
    assert_eq!(
        embedded.load(Ordering::SeqCst),
        4 + 1,
        "only the edited document's chunk is embedded"
    );
    for key in rewritten {
        let (recorded_etag, chunks) = indexed_version(&h, key).await;
        assert_eq!(
            recorded_etag,
            Some(etag(&h, key).await),
            "{key}: its new ETag is recorded"
        );
        assert_eq!(chunks, before[key].1, "{key}: its chunks are untouched");
    }
    // The same tasks again: every ETag is the one recorded.
    for key in rewritten.iter().chain(&["kb/edited.txt"]) {
        document_task(&h, id, key, 2).await;
    }
    eventually(
        "the repeats are handled",
        Duration::from_secs(30),
        || async { h.queue.backlog().await.is_ok_and(|b| b == 0) },
    )
    .await;
    assert_eq!(embedded.load(Ordering::SeqCst), 4 + 1);
    let runs: i64 = h
        .pool
        .get()
        .await
        .expect("db")
        .query_one("SELECT count(*) FROM sync_runs", &[])
        .await
        .expect("runs")
        .get(0);
    assert_eq!(runs, 1, "no sync run was needed");
}
on_each_s3!(document_tasks_embed_nothing_for_identical_bytes);
