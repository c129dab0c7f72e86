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

/// A single PUT (ETag: the MD5 of the bytes on both servers), without
/// metadata; returns the ETag.
pub async fn put_single(h: &Harness, key: &str, content_type: Option<&str>, body: &[u8]) -> String {
    let out =
        h.s3.put_object()
            .bucket(&h.bucket)
            .key(key)
            .set_content_type(content_type.map(str::to_string))
            .body(body.to_vec().into())
            .send()
            .await
            .expect("put");
    out.e_tag()
        .unwrap_or_default()
        .trim_matches('"')
        .to_string()
}

/// The same bytes as a one-part multipart upload, without metadata: on
/// LocalStack and Garage alike its ETag is the MD5 of the part's MD5 with
/// `-1`, not the single PUT's — a new ETag for identical bytes. Returns it.
pub async fn put_multipart(
    h: &Harness,
    key: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> String {
    use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
    let created =
        h.s3.create_multipart_upload()
            .bucket(&h.bucket)
            .key(key)
            .set_content_type(content_type.map(str::to_string))
            .send()
            .await
            .expect("create multipart upload");
    let upload_id = created.upload_id().expect("upload id");
    let part =
        h.s3.upload_part()
            .bucket(&h.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(1)
            .body(body.to_vec().into())
            .send()
            .await
            .expect("upload part");
    let done =
        h.s3.complete_multipart_upload()
            .bucket(&h.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .parts(
                        CompletedPart::builder()
                            .part_number(1)
                            .e_tag(part.e_tag().unwrap_or_default())
                            .build(),
                    )
                    .build(),
            )
            .send()
            .await
            .expect("complete multipart upload");
    let etag = done
        .e_tag()
        .unwrap_or_default()
        .trim_matches('"')
        .to_string();
    assert!(etag.ends_with("-1"), "a multipart ETag: {etag}");
    etag
}

/// The object's ETag (a HEAD), without quotes.
pub async fn etag(h: &Harness, key: &str) -> String {
    h.s3.head_object()
        .bucket(&h.bucket)
        .key(key)
        .send()
        .await
        .expect("head")
        .e_tag()
        .unwrap_or_default()
        .trim_matches('"')
        .to_string()
}

/// Copies `src_prefix` to `dest_prefix` in the harness bucket with an
/// UploadJob (run by the harness's worker): small files are single PUTs
/// carrying `x-amz-meta-sha256`, recorded in the `objects` history.
pub async fn stowage_upload(h: &Harness, name: &str, src_prefix: &str, dest_prefix: &str) {
    let source = stowage_common::spec::UploadSource {
        ingest: None,
        s3: Some(stowage_common::spec::S3Source {
            bucket: h.bucket.clone(),
            prefix: src_prefix.into(),
            endpoint: h.endpoint(),
        }),
        http: None,
    };
    let job = h.submit(name, h.spec(source, dest_prefix)).await;
    assert_eq!(
        h.wait_job(job, Duration::from_secs(120)).await.state,
        "succeeded"
    );
}

/// Stowage's record of writing `key` (version `etag`, bytes hashing to
/// `sha256_hex`) with a job whose destination is `endpoint`: what an
/// UploadJob leaves in `objects` for a multipart object it wrote without
/// `sha256` metadata (`--sha256-metadata known`).
pub async fn record_stowage_write(
    h: &Harness,
    key: &str,
    etag: &str,
    sha256_hex: &str,
    size: i64,
    endpoint: stowage_common::spec::Endpoint,
) {
    let mut spec = h.spec(
        stowage_common::spec::UploadSource {
            ingest: None,
            s3: None,
            http: Some(stowage_common::spec::HttpSource {
                urls: vec!["https://example.com/a.txt".into()],
                allow_private_networks: false,
            }),
        },
        "",
    );
    spec.destination.endpoint = endpoint;
    let db = h.pool.get().await.expect("db");
    let job_id = Uuid::new_v4();
    db.execute(
        "INSERT INTO upload_jobs (id, namespace, name, source_uid, spec, state)
         VALUES ($1, 'default', 'recorded', $2, $3, 'succeeded')",
        &[
            &job_id,
            &stowage_common::testing::unique("uid-"),
            &serde_json::to_value(&spec).expect("spec"),
        ],
    )
    .await
    .expect("job row");
    db.execute(
        "UPDATE objects SET current = false WHERE bucket = $1 AND object_key = $2 AND current",
        &[&h.bucket, &key],
    )
    .await
    .expect("older versions");
    db.execute(
        "INSERT INTO objects (bucket, object_key, version, sha256_hex, size_bytes, etag, job_id)
         VALUES ($1, $2, (SELECT coalesce(max(version), 0) + 1 FROM objects
                          WHERE bucket = $1 AND object_key = $2), $3, $4, $5, $6)",
        // Quoted, as the S3 API answers and the upload records it.
        &[
            &h.bucket,
            &key,
            &sha256_hex,
            &size,
            &format!("\"{etag}\""),
            &job_id,
        ],
    )
    .await
    .expect("object row");
}
