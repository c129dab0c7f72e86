//! Requests of the `Ingest` gRPC API: each one a job of one item, registered
//! by the worker that first sees it, keyed by its namespace and the client's
//! request id so that a retry finds what the first attempt stored.

use deadpool_postgres::ClientWrapper as Client;
use uuid::Uuid;

use super::StateError;
use super::uploads::{self, ItemRecord, JobRecord, ObjectRecord};
use crate::spec::{IngestSource, UploadJobSpec};

/// The job's `source_uid`: request ids are unique per namespace.
pub fn source_uid(namespace: &str, request_id: &str) -> String {
    format!("ingest/{namespace}/{request_id}")
}

/// A request as stored: its job (whose spec says what the first call asked
/// for) and its one item.
pub struct Request {
    pub job: JobRecord,
    pub item: ItemRecord,
}

/// Registers the request, or finds it when an earlier call did: the caller
/// compares `job.spec` with what it was asked now. One statement writes the
/// job (planned: its one file is known) and its item; a request registered
/// before is left as it is (a retry that names another key gets no second
/// item: it is told the request id was used for another upload).
pub async fn register(
    client: &Client,
    namespace: &str,
    source: &IngestSource,
    spec: &UploadJobSpec,
    key: &str,
) -> Result<Request, StateError> {
    let spec_json = serde_json::to_value(spec)?;
    client
        .execute(
            &client
                .prepare_cached(
                    "WITH job AS (
                         INSERT INTO upload_jobs (id, namespace, name, source_uid, generation,
                                                  spec, state, planned_at)
                         VALUES ($1, $2, $3, $4, 1, $5, 'pending', now())
                         ON CONFLICT (source_uid, generation) DO UPDATE SET name = upload_jobs.name
                         RETURNING id, xmax = 0 AS inserted)
                     INSERT INTO upload_items (job_id, source_ref, dest_key, size_bytes, state)
                     SELECT id, $6, $7, $8, 'pending' FROM job WHERE inserted",
                )
                .await?,
            &[
                &Uuid::new_v4(),
                &namespace,
                &source.request_id,
                &source_uid(namespace, &source.request_id),
                &spec_json,
                &format!("ingest:{}", source.request_id),
                &key,
                &i64::try_from(source.size).ok(),
            ],
        )
        .await?;
    find(client, namespace, &source.request_id)
        .await?
        .ok_or_else(|| StateError::NotFound {
            what: "ingest request",
            id: source.request_id.clone(),
        })
}

/// The request `request_id` of `namespace`, if one was registered.
pub async fn find(
    client: &Client,
    namespace: &str,
    request_id: &str,
) -> Result<Option<Request>, StateError> {
    match uploads::find_job(client, &source_uid(namespace, request_id)).await? {
        Some(job) => Ok(Some(request_of(client, job).await?)),
        None => Ok(None),
    }
}

async fn request_of(client: &Client, job: JobRecord) -> Result<Request, StateError> {
    let item = uploads::list_items(client, job.id)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| StateError::NotFound {
            what: "item of ingest request",
            id: job.id.to_string(),
        })?;
    Ok(Request { job, item })
}

/// The object version a request's job wrote to `bucket`/`key`, if it did.
pub async fn written_object(
    client: &Client,
    job_id: Uuid,
    bucket: &str,
    key: &str,
) -> Result<Option<ObjectRecord>, StateError> {
    Ok(client
        .query_opt(
            &client
                .prepare_cached(uploads::select_objects!(
                    "WHERE job_id = $1 AND bucket = $2 AND object_key = $3
                     ORDER BY version DESC LIMIT 1"
                ))
                .await?,
            &[&job_id, &bucket, &key],
        )
        .await?
        .map(|r| uploads::object_from_row(&r)))
}

/// Requests left unfinished (no call wrote to them) for longer than
/// `older_than`: a client that never came back.
pub async fn abandoned(
    client: &Client,
    older_than: std::time::Duration,
) -> Result<Vec<Request>, StateError> {
    let seconds = older_than.as_secs_f64();
    let rows = client
        .query(
            &client
                .prepare_cached(
                    "SELECT j.id FROM upload_jobs j JOIN upload_items i ON i.job_id = j.id
                     WHERE j.source_uid LIKE 'ingest/%' AND i.state IN ('pending', 'running')
                       AND i.updated_at < now() - make_interval(secs => $1)
                     LIMIT 1000",
                )
                .await?,
            &[&seconds],
        )
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let job = uploads::get_job(client, r.get(0)).await?;
        out.push(request_of(client, job).await?);
    }
    Ok(out)
}
