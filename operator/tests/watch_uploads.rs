//! Object-landed events → document tasks, on the real NATS and PostgreSQL:
//! a burst of writes to one key becomes one task; only the collections that
//! watch uploads, in the operator's namespace, on the same store, whose
//! prefix and globs select the key, get one; events are acked once routed.

use std::time::Duration;

use futures::StreamExt;
use stowage_common::db;
use stowage_common::queue::{NatsSettings, Queue};
use stowage_common::state::collections::{self, NewCollection};
use stowage_common::testing::{StackEnv, eventually, fresh_schema, unique};
use stowage_operator::watch_uploads::{self, Debounce};
use stowage_proto::v1::{ObjectLanded, task};
use uuid::Uuid;

const ENDPOINT: &str = "http://127.0.0.1:13900";

async fn collection(pool: &db::Pool, namespace: &str, spec: serde_json::Value) -> Uuid {
    let db = pool.get().await.expect("db");
    collections::register(
        &db,
        &NewCollection {
            namespace: namespace.into(),
            name: unique("kb"),
            source_uid: unique("uid"),
            generation: 1,
            spec: serde_json::from_value(spec).expect("spec"),
        },
    )
    .await
    .expect("register")
}

fn landed(endpoint: &str, key: &str, version: u32) -> ObjectLanded {
    ObjectLanded {
        endpoint: endpoint.into(),
        bucket: "docs".into(),
        key: key.into(),
        sha256_hex: format!("{version:064x}"),
        size: 10,
        job_id: Uuid::new_v4().to_string(),
        version,
    }
}

#[tokio::test]
async fn bursts_collapse_into_one_task_per_key_and_collection() {
    let env = StackEnv::load();
    let (pool, _) = fresh_schema(&env).await;
    let queue = Queue::connect(&NatsSettings::new(env.nats_url(), unique("op")))
        .await
        .expect("nats");
    queue.ensure_streams().await.expect("streams");

    let source = |extra: serde_json::Value| {
        let mut s = serde_json::json!({"bucket": "docs", "prefix": "kb/", "endpoint": ENDPOINT});
        if let (Some(o), Some(e)) = (s.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        s
    };
    let watching = collection(
        &pool,
        "team-a",
        serde_json::json!({"source": source(serde_json::json!({"include": ["**/*.md"]})), "watchUploads": true}),
    )
    .await;
    // Not watching; another namespace; another prefix.
    collection(
        &pool,
        "team-a",
        serde_json::json!({"source": source(serde_json::json!({}))}),
    )
    .await;
    collection(
        &pool,
        "team-b",
        serde_json::json!({"source": source(serde_json::json!({})), "watchUploads": true}),
    )
    .await;
    collection(
        &pool,
        "team-a",
        serde_json::json!({"source": source(serde_json::json!({"prefix": "other/"})), "watchUploads": true}),
    )
    .await;

    let router = tokio::spawn(watch_uploads::run(
        pool.clone(),
        queue.clone(),
        vec!["team-a".into()],
        Debounce {
            quiet: Duration::from_millis(500),
            max_delay: Duration::from_secs(10),
        },
    ));
    for version in 1..=5 {
        queue
            .publish_object_landed(&landed(ENDPOINT, "kb/guide.md", version))
            .await
            .expect("publish");
    }
    for event in [
        landed(ENDPOINT, "kb/deep/notes.md", 1),
        landed(ENDPOINT, "kb/image.png", 1), // excluded by the include glob
        landed(ENDPOINT, "elsewhere/x.md", 1), // outside the prefix
        landed("http://other:9000", "kb/x.md", 1), // another store
    ] {
        queue.publish_object_landed(&event).await.expect("publish");
    }

    // The tasks: read them back from the task stream.
    let js = async_nats::jetstream::new(queue.client().clone());
    let stream = js
        .get_stream(queue.topology().tasks_stream())
        .await
        .expect("tasks stream");
    eventually("two document tasks", Duration::from_secs(20), || async {
        stream.get_info().await.is_ok_and(|i| i.state.messages >= 2)
    })
    .await;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config::default())
        .await
        .expect("consumer");
    let mut batch = consumer
        .fetch()
        .max_messages(10)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .expect("fetch");
    let mut keys = Vec::new();
    while let Some(msg) = batch.next().await {
        let msg = msg.expect("message");
        let task = stowage_common::queue::decode_task(&msg).expect("task");
        let Some(task::Kind::IndexDocument(d)) = task.kind else {
            panic!("not a document task: {task:?}");
        };
        assert_eq!(d.collection_id, watching.to_string());
        assert!(
            msg.subject.contains(".task.index-doc.team-a."),
            "{}",
            msg.subject
        );
        keys.push(d.key);
    }
    keys.sort();
    assert_eq!(
        keys,
        ["kb/deep/notes.md", "kb/guide.md"],
        "one task per key"
    );

    // Every event was acked: nothing is left for a next leader.
    let objects = js
        .get_stream(queue.topology().objects_stream())
        .await
        .expect("objects stream");
    let indexer = objects
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>(
            stowage_common::queue::INDEXER_CONSUMER,
        )
        .await
        .expect("indexer consumer");
    eventually("all events acked", Duration::from_secs(10), || async {
        indexer
            .get_info()
            .await
            .is_ok_and(|i| i.num_ack_pending == 0 && i.num_pending == 0)
    })
    .await;
    router.abort();
}
