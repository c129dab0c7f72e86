//! Helpers of the indexing tests: a local OpenAI-compatible embedder,
//! register a collection, run a sync and wait for its end, put a typed
//! object.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::routing::post;

use prost::Message as _;
use stowage_common::queue::TaskKind;
use stowage_common::spec::index::IndexSpec;
use stowage_common::state::collections::{self, NewCollection, SyncRun};
use stowage_proto::v1::{CollectionProgress, SyncCollection, Task, task};
use uuid::Uuid;

use super::Harness;

pub const DIMS: usize = 64;

/// A bag-of-words embedding: texts that share words point the same way, so
/// vector search is meaningful without a model.
pub fn bag_of_words(text: &str, dims: usize) -> Vec<f32> {
    let mut v = vec![0.0f32; dims];
    for word in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.len() > 2)
    {
        let h = word
            .to_lowercase()
            .bytes()
            .fold(5381u32, |h, b| h.wrapping_mul(33) ^ u32::from(b));
        v[h as usize % dims] += 1.0;
    }
    v
}

/// The model that the generation-switch test changes to: 32 dimensions, and
/// slow, so that its generation takes a while to build.
pub const SLOW_MODEL: &str = "slow-32";

/// An OpenAI-compatible `/v1/embeddings` counting the texts it embeds:
/// bag-of-words vectors of 64 dimensions (32, 300 ms late, for
/// [`SLOW_MODEL`]).
pub async fn embedder(embedded: Arc<AtomicUsize>) -> String {
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
                let dims = if req["model"] == SLOW_MODEL {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    32
                } else {
                    DIMS
                };
                let data: Vec<serde_json::Value> = inputs
                    .iter()
                    .enumerate()
                    .map(|(i, t)| serde_json::json!({"index": i, "embedding": bag_of_words(t, dims)}))
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

/// A collection source: the harness bucket under `prefix`, on the
/// harness's S3 server.
pub fn source(h: &Harness, prefix: &str) -> serde_json::Value {
    let mut source = serde_json::to_value(h.endpoint()).expect("endpoint");
    source["bucket"] = h.bucket.clone().into();
    source["prefix"] = prefix.into();
    source
}

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
