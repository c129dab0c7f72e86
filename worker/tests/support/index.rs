//! Helpers of the indexing tests: register a collection, run a sync and
//! wait for its end, put a typed object.

use std::time::Duration;

use prost::Message as _;
use stowage_common::queue::TaskKind;
use stowage_common::spec::index::IndexSpec;
use stowage_common::state::collections::{self, NewCollection, SyncRun};
use stowage_proto::v1::{CollectionProgress, SyncCollection, Task, task};
use uuid::Uuid;

use super::Harness;

pub async fn register(h: &Harness, spec: serde_json::Value) -> Uuid {
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
pub async fn sync(h: &Harness, id: Uuid, round: &str) -> SyncRun {
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

pub async fn put(h: &Harness, key: &str, content_type: &str, body: &[u8]) {
    h.s3.put_object()
        .bucket(&h.bucket)
        .key(key)
        .content_type(content_type)
        .body(body.to_vec().into())
        .send()
        .await
        .expect("put");
}
