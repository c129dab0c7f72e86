//! An upload job's life as the operator drives it: found by its resource,
//! suspended and resumed, failed on a deadline, cancelled and deleted, and
//! what its status shows (errors, dead letters, open multipart uploads).

use deadpool_postgres::ClientWrapper as Client;
use uuid::Uuid;

use super::StateError;
use super::uploads::{self, JobRecord};

/// The latest job registered for a resource uid, if any.
pub async fn find_job(client: &Client, source_uid: &str) -> Result<Option<JobRecord>, StateError> {
    let row = client
        .query_opt(
            &client
                .prepare_cached(
                    "SELECT id FROM upload_jobs WHERE source_uid = $1
                     ORDER BY generation DESC LIMIT 1",
                )
                .await?,
            &[&source_uid],
        )
        .await?;
    match row {
        Some(r) => Ok(Some(uploads::get_job(client, r.get(0)).await?)),
        None => Ok(None),
    }
}

/// Suspends a pending or running job (workers stop starting its files), or
/// resumes a suspended one, which then owes a round of tasks for its pending
/// files (see [`resume_owed`]). Returns whether the state changed.
pub async fn set_suspended(
    client: &Client,
    job_id: Uuid,
    suspend: bool,
) -> Result<bool, StateError> {
    let sql = if suspend {
        "UPDATE upload_jobs SET state = 'suspended'
         WHERE id = $1 AND state IN ('pending', 'running')"
    } else {
        // A new round of task ids: the earlier ones were consumed (dropped
        // while suspended) and may still be in the deduplication window.
        "UPDATE upload_jobs SET
             state = CASE WHEN started_at IS NULL THEN 'pending' ELSE 'running' END,
             resume_round = 'resume-' || floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint
         WHERE id = $1 AND state = 'suspended'"
    };
    let changed = client
        .execute(&client.prepare_cached(sql).await?, &[&job_id])
        .await?
        > 0;
    if changed && !suspend {
        // Its last files may have finished while it was suspended, when no
        // finish could end it: nothing else would.
        uploads::refresh_job_state(client, job_id).await?;
    }
    Ok(changed)
}

/// The round of tasks a resume owes and the pending files to queue in it,
/// if a resume has not been queued yet (the operator that resumed the job
/// may have died before queuing it).
pub async fn resume_owed(
    client: &Client,
    job_id: Uuid,
) -> Result<Option<(String, Vec<i64>)>, StateError> {
    let Some(row) = client
        .query_opt(
            &client
                .prepare_cached(
                    "SELECT resume_round FROM upload_jobs
                     WHERE id = $1 AND resume_round IS NOT NULL AND state <> 'suspended'",
                )
                .await?,
            &[&job_id],
        )
        .await?
    else {
        return Ok(None);
    };
    let rows = client
        .query(
            &client
                .prepare_cached(
                    "SELECT id FROM upload_items WHERE job_id = $1 AND state = 'pending' ORDER BY id",
                )
                .await?,
            &[&job_id],
        )
        .await?;
    Ok(Some((row.get(0), rows.iter().map(|r| r.get(0)).collect())))
}

/// Records that the resume's round of tasks was published.
pub async fn resume_queued(client: &Client, job_id: Uuid, round: &str) -> Result<(), StateError> {
    client
        .execute(
            &client
                .prepare_cached(
                    "UPDATE upload_jobs SET resume_round = NULL WHERE id = $1 AND resume_round = $2",
                )
                .await?,
            &[&job_id, &round],
        )
        .await?;
    Ok(())
}

/// Ends an unfinished job as failed with `reason` (deadline exceeded): its
/// pending files fail with it; files in flight finish.
pub async fn fail_unfinished(
    client: &Client,
    job_id: Uuid,
    failure: uploads::JobFailure,
    message: &str,
) -> Result<bool, StateError> {
    let stmt = client
        .prepare_cached(
            "WITH items AS (UPDATE upload_items SET state = 'failed', last_error = $2,
                                   error_class = 'permanent', updated_at = now(), finished_at = now()
                            WHERE job_id = $1 AND state = 'pending')
             UPDATE upload_jobs SET state = 'failed', last_error = $2, failure_reason = $3,
                                    finished_at = now()
             WHERE id = $1 AND state IN ('pending', 'running', 'suspended')",
        )
        .await?;
    let reason = failure.as_str();
    Ok(client.execute(&stmt, &[&job_id, &message, &reason]).await? > 0)
}

/// Marks the job cancelled: workers drop its tasks from now on.
pub async fn cancel(client: &Client, job_id: Uuid) -> Result<(), StateError> {
    let stmt = client
        .prepare_cached(
            "UPDATE upload_jobs SET state = 'cancelled', finished_at = now() WHERE id = $1",
        )
        .await?;
    client.execute(&stmt, &[&job_id]).await?;
    Ok(())
}

/// A multipart upload the job has open: what to abort when it is deleted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenUpload {
    pub item_id: i64,
    pub bucket: String,
    pub object_key: String,
    pub upload_id: String,
}

/// First step of deleting a job, inside `tx`: locks its items (a worker
/// recording a new multipart upload for one of them waits, then fails and
/// aborts its own upload) and returns the multipart uploads it has open, to
/// abort before [`delete`] in the same transaction.
pub async fn lock_for_delete(
    tx: &tokio_postgres::Transaction<'_>,
    job_id: Uuid,
) -> Result<Vec<OpenUpload>, StateError> {
    tx.execute(
        "SELECT 1 FROM upload_items WHERE job_id = $1 FOR UPDATE",
        &[&job_id],
    )
    .await?;
    let rows = tx
        .query(
            "SELECT m.item_id, m.bucket, m.object_key, m.upload_id
             FROM multipart_uploads m JOIN upload_items i ON i.id = m.item_id
             WHERE i.job_id = $1 ORDER BY m.item_id",
            &[&job_id],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| OpenUpload {
            item_id: r.get(0),
            bucket: r.get(1),
            object_key: r.get(2),
            upload_id: r.get(3),
        })
        .collect())
}

/// Deletes the job with its items, parts and multipart records (the object
/// history stays: those objects exist).
pub async fn delete(tx: &tokio_postgres::Transaction<'_>, job_id: Uuid) -> Result<(), StateError> {
    tx.execute("DELETE FROM upload_jobs WHERE id = $1", &[&job_id])
        .await?;
    Ok(())
}

/// One failed file, for the status's bounded list of recent errors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ItemError {
    pub dest_key: String,
    pub error: String,
    pub attempts: i32,
    pub dead_lettered: bool,
}

/// The `limit` most recent errors of the job's files (failed for good or
/// waiting for a retry).
pub async fn recent_errors(
    client: &Client,
    job_id: Uuid,
    limit: i64,
) -> Result<Vec<ItemError>, StateError> {
    let rows = client
        .query(
            &client
                .prepare_cached(
                    "SELECT dest_key, last_error, attempts, dead_lettered FROM upload_items
                     WHERE job_id = $1 AND last_error IS NOT NULL
                     ORDER BY updated_at DESC, id DESC LIMIT $2",
                )
                .await?,
            &[&job_id, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| ItemError {
            dest_key: r.get(0),
            error: r.get(1),
            attempts: r.get(2),
            dead_lettered: r.get(3),
        })
        .collect())
}
