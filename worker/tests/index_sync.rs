//! IndexCollection sync runs on the real stack: a run abandoned by a dead
//! worker is marked so when the next starts, and — until the index data
//! plane exists — every run is recorded as failed with its reason, never as
//! a success.

mod support;

use std::time::Duration;

use prost::Message as _;
use stowage_common::queue::TaskKind;
use stowage_common::spec::index::IndexSpec;
use stowage_common::state::collections::{self, NewCollection, RunState};
use stowage_proto::v1::{CollectionProgress, SyncCollection, Task, task};
use support::Harness;

#[tokio::test]
async fn a_sync_run_is_recorded_failed_and_a_stale_one_abandoned() {
    let h = Harness::new("localstack").await;
    let worker = h.worker(None).await;
    let spec: IndexSpec =
        serde_json::from_value(serde_json::json!({"source": {"bucket": h.bucket}})).expect("spec");
    let id = {
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
    };
    // A run left in progress by a worker that died.
    let stale = {
        let mut db = h.pool.get().await.expect("db");
        collections::begin_run(&mut db, id, "schedule", 1)
            .await
            .expect("stale run")
    };
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
                task_id: format!("index-sync/{id}/test"),
                kind: Some(task::Kind::SyncCollection(SyncCollection {
                    collection_id: id.to_string(),
                    trigger: "manual".into(),
                })),
            },
        )
        .await
        .expect("publish");
    let progress = tokio::time::timeout(Duration::from_secs(30), async {
        use futures::StreamExt;
        loop {
            let msg = events.next().await.expect("event stream");
            if let Ok(p) = CollectionProgress::decode(msg.payload.as_ref())
                && p.collection_id == id.to_string()
            {
                return p;
            }
        }
    })
    .await
    .expect("a progress event for the collection");
    assert_eq!(
        (progress.namespace.as_str(), progress.name.as_str()),
        ("team-a", "kb")
    );
    assert_eq!(progress.run_state, "failed");

    let db = h.pool.get().await.expect("db");
    let latest = collections::latest_run(&db, id)
        .await
        .expect("query")
        .expect("a run");
    assert_eq!(latest.id, progress.run_id);
    assert_ne!(latest.id, stale);
    assert_eq!(latest.state, RunState::Failed);
    assert_eq!(latest.trigger, "manual");
    assert_eq!(
        latest.error.as_deref(),
        Some(stowage_worker::index::NOT_AVAILABLE)
    );
    assert!(latest.finished_at.is_some());
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
    worker.shutdown().await.expect("shutdown");
}
