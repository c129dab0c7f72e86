//! Sync runs across the fleet, on the real stack: a run's documents are
//! indexed by every worker and the run closes when the last one is done; a
//! new sync waits while a run is alive and abandons one that stalled; a
//! document that keeps failing before it can be recorded is failed after
//! its last attempt, dead-lettered, and the run still ends; replayed, its
//! task brings the document up to date.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use stowage_common::jobs::{DocumentOrigin, index_document_task};
use stowage_common::queue::TaskKind;
use stowage_common::spec::index::Embedding;
use stowage_common::state::collections::{self, PlannedDocument, RunCounts, RunState};
use stowage_common::state::index as store;
use stowage_common::testing::eventually;
use support::Harness;
use support::index::{SLOW_MODEL, embedder, put, register, source, sync};
use uuid::Uuid;

/// A run recorded the way a planner records one — `keys` pending, all
/// dispatched — without publishing its tasks. Returns the run id.
async fn planned_run(h: &Harness, id: Uuid, embedding: &Embedding, keys: &[&str]) -> i64 {
    let mut db = h.pool.get().await.expect("db");
    let generation = store::generation_for(&mut db, id, embedding)
        .await
        .expect("generation");
    let run = collections::begin_run(&mut db, id, "schedule", 1)
        .await
        .expect("run");
    let documents: Vec<PlannedDocument> = keys
        .iter()
        .map(|k| PlannedDocument {
            key: k.to_string(),
            etag: "e1".into(),
            size: 10,
            new: true,
        })
        .collect();
    let counts = RunCounts {
        seen: keys.len() as i64,
        ..RunCounts::default()
    };
    collections::record_plan(&mut db, run, generation.id, &counts, &documents)
        .await
        .expect("plan");
    collections::mark_dispatched(&db, run)
        .await
        .expect("dispatched");
    run
}

/// Whether the worker's metrics have counted a task of `kind` ending in
/// `outcome`.
async fn counted(worker: &stowage_worker::Worker, kind: &str, outcome: &str) -> bool {
    let Ok(r) = reqwest::get(format!("http://{}/metrics", worker.http_addr)).await else {
        return false;
    };
    r.text().await.is_ok_and(|body| {
        body.lines().any(|l| {
            l.starts_with("stowage_worker_tasks_total")
                && l.contains(&format!("kind=\"{kind}\""))
                && l.contains(&format!("outcome=\"{outcome}\""))
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runs_documents_spread_over_the_workers_and_the_last_one_closes_it() {
    let h = Harness::new("localstack").await;
    // One task at a time each, and a slow model: both must take part.
    let _w1 = h
        .worker_with(&["--worker-id=w1", "--capacity=1"], None)
        .await;
    let _w2 = h
        .worker_with(&["--worker-id=w2", "--capacity=1"], None)
        .await;
    let url = embedder(Arc::new(AtomicUsize::new(0))).await;
    for i in 0..8 {
        let body = format!("Runbook {i}: restart the consumer, then check the lag.");
        put(
            &h,
            &format!("kb/doc-{i}.txt"),
            "text/plain",
            body.as_bytes(),
        )
        .await;
    }
    let source = source(&h, "kb/");
    let id = register(
        &h,
        serde_json::json!({"source": source, "embedding": {
            "provider": "openai", "model": SLOW_MODEL, "dimensions": 32, "endpoint": url,
            "allowPrivateNetworks": true}}),
    )
    .await;

    let run = sync(&h, id, "one").await;
    assert_eq!(run.state, RunState::Completed, "{run:?}");
    assert_eq!((run.counts.seen, run.counts.new), (8, 8), "{run:?}");
    let db = h.pool.get().await.expect("db");
    let rows = db
        .query(
            "SELECT state, worker FROM sync_run_documents WHERE run_id = $1",
            &[&run.id],
        )
        .await
        .expect("documents");
    assert_eq!(rows.len(), 8);
    assert!(rows.iter().all(|r| r.get::<_, &str>(0) == "indexed"));
    let workers: BTreeSet<String> = rows.iter().map(|r| r.get(1)).collect();
    assert_eq!(workers, BTreeSet::from(["w1".into(), "w2".into()]));
    // The first run built the generation; closing it activated it.
    let active = store::active_generation(&db, id)
        .await
        .expect("query")
        .expect("an active generation");
    let indexed: i64 = db
        .query_one(
            "SELECT count(*) FROM documents WHERE generation_id = $1 AND state = 'indexed'",
            &[&active.id],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(indexed, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_sync_waits_for_a_live_run_and_abandons_a_stalled_one() {
    let h = Harness::new("localstack").await;
    let worker = h.worker(None).await;
    let url = embedder(Arc::new(AtomicUsize::new(0))).await;
    put(&h, "kb/a.txt", "text/plain", b"Alpha notes about buckets.").await;
    let source = source(&h, "kb/");
    let spec = serde_json::json!({"source": source, "embedding": {
        "provider": "openai", "model": "bow", "dimensions": 64, "endpoint": url,
            "allowPrivateNetworks": true}});
    let id = register(&h, spec.clone()).await;
    let embedding: Embedding =
        serde_json::from_value(spec["embedding"].clone()).expect("embedding");
    // A run whose only document's task is still queued somewhere.
    let live = planned_run(&h, id, &embedding, &["kb/elsewhere.txt"]).await;

    let (run, ()) = tokio::join!(sync(&h, id, "two"), async {
        eventually(
            "the new sync waits behind the live run",
            Duration::from_secs(30),
            || counted(&worker, "index-sync", "wait"),
        )
        .await;
        let db = h.pool.get().await.expect("db");
        let latest = collections::latest_run(&db, id)
            .await
            .expect("query")
            .expect("run");
        assert_eq!(
            (latest.id, latest.state),
            (live, RunState::InProgress),
            "no second run while the first is alive"
        );
        // No document of it finishes for longer than the stall limit.
        db.execute(
            "UPDATE sync_runs SET updated_at = now() - interval '1 hour' WHERE id = $1",
            &[&live],
        )
        .await
        .expect("age the run");
    });
    let db = h.pool.get().await.expect("db");
    assert_ne!(run.id, live);
    assert_eq!(run.state, RunState::Completed, "{run:?}");
    assert_eq!(run.counts.new, 1);
    let stalled = db
        .query_one("SELECT state, error FROM sync_runs WHERE id = $1", &[&live])
        .await
        .expect("stalled run");
    assert_eq!(stalled.get::<_, &str>(0), "abandoned");
    assert!(
        stalled
            .get::<_, Option<String>>(1)
            .is_some_and(|e| e.contains("stopped making progress"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_out_of_attempts_is_failed_dead_lettered_and_the_run_ends() {
    let h = Harness::new("localstack").await;
    // The run's generation uses the built-in model; this worker has none,
    // so every attempt fails before anything can be recorded.
    let worker = h
        .worker_with(&["--embedding-model-dir=/nonexistent/minilm"], None)
        .await;
    let source = source(&h, "");
    let id = register(&h, serde_json::json!({ "source": source })).await;
    let run = planned_run(&h, id, &Embedding::default(), &["notes.txt"]).await;
    let subject = h
        .queue
        .topology()
        .task_subject(TaskKind::IndexDocument, "team-a", "kb");
    let task = index_document_task(id, "notes.txt", DocumentOrigin::Run { id: run });
    h.queue
        .publish_task(&subject, &task)
        .await
        .expect("publish");

    let db = h.pool.get().await.expect("db");
    eventually("the run ends", Duration::from_secs(90), || async {
        collections::latest_run(&db, id)
            .await
            .ok()
            .flatten()
            .is_some_and(|r| r.state != RunState::InProgress)
    })
    .await;
    let ended = collections::latest_run(&db, id)
        .await
        .expect("query")
        .expect("run");
    assert_eq!(ended.id, run);
    assert_eq!(ended.state, RunState::CompletedWithErrors, "{ended:?}");
    assert_eq!(ended.counts.failed, 1);
    let row = db
        .query_one(
            "SELECT state, attempts, reason FROM sync_run_documents WHERE run_id = $1",
            &[&run],
        )
        .await
        .expect("document");
    assert_eq!(row.get::<_, &str>(0), "failed");
    assert_eq!(row.get::<_, i32>(1), 5);
    let reason: String = row.get(2);
    assert!(
        reason.starts_with("gave up after 5 attempts: builtin embedding model at /nonexistent"),
        "{reason}"
    );
    let letters = h.queue.dead_letters().await.expect("dead letters");
    let letter = letters
        .iter()
        .find(|(_, l)| l.task.as_ref().is_some_and(|t| t.task_id == task.task_id))
        .expect("the task is dead-lettered");
    assert_eq!(letter.1.attempts, 5);

    // Replayed after its run ended, the task brings the document up to date
    // as an object event would: the object does not exist, so it is
    // removed from the index.
    h.queue.replay_dead_letter(letter.0).await.expect("replay");
    eventually("the replayed task runs", Duration::from_secs(30), || {
        counted(&worker, "index-doc", "deleted")
    })
    .await;
}
