//! Upload jobs: registration, their state ([`JobState`], parsed where rows
//! are read) and failure reason, counts, and their life as the operator
//! drives it — found by resource, suspended and resumed (the round of tasks
//! a resume owes), failed on a deadline, cancelled and deleted, and the
//! recent errors its status shows.

use chrono::{DateTime, Utc};
use deadpool_postgres::ClientWrapper as Client;
use uuid::Uuid;

use super::*;
use crate::spec::UploadJobSpec;
use crate::state::StateError;

/// An upload job's state (`upload_jobs.state`), parsed where rows are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobState {
    Pending,
    Running,
    /// Its UploadJob is suspended: no file starts.
    Suspended,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Suspended => "suspended",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// A state no migration wrote is a database this version cannot read.
    pub fn parse(s: &str) -> Result<Self, StateError> {
        Ok(match s {
            "pending" => JobState::Pending,
            "running" => JobState::Running,
            "suspended" => JobState::Suspended,
            "succeeded" => JobState::Succeeded,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            other => {
                return Err(StateError::Unknown {
                    what: "upload job state",
                    value: other.to_string(),
                });
            }
        })
    }

    /// Ended: no file of it runs again (short of a replay).
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

/// `state == "succeeded"`: how logs, tests and people name states.
impl PartialEq<&str> for JobState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a job failed as a whole (`upload_jobs.failure_reason`, V16); a job
/// whose files failed has none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobFailure {
    /// Its UploadJob's `activeDeadlineSeconds` passed.
    DeadlineExceeded,
    /// Listing its source failed for good.
    PlanningFailed,
}

impl JobFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            JobFailure::DeadlineExceeded => "DeadlineExceeded",
            JobFailure::PlanningFailed => "PlanningFailed",
        }
    }

    pub fn parse(s: &str) -> Result<Self, StateError> {
        match s {
            "DeadlineExceeded" => Ok(JobFailure::DeadlineExceeded),
            "PlanningFailed" => Ok(JobFailure::PlanningFailed),
            other => Err(StateError::Unknown {
                what: "job failure reason",
                value: other.to_string(),
            }),
        }
    }
}

pub struct NewJob {
    pub namespace: String,
    pub name: String,
    /// Kubernetes uid for resources; any unique string for stowctl jobs.
    pub source_uid: String,
    pub generation: i64,
    pub spec: UploadJobSpec,
    /// Registered suspended (`spec.suspend` of its UploadJob): no file
    /// starts until it is resumed, not even between registration and the
    /// operator's next look.
    pub suspended: bool,
}

#[derive(Clone, Debug)]
pub struct JobRecord {
    pub id: Uuid,
    pub namespace: String,
    pub name: String,
    pub spec: UploadJobSpec,
    pub state: JobState,
    pub planned: bool,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Why the job failed as a whole (planning failed, deadline exceeded).
    pub last_error: Option<String>,
    pub failure: Option<JobFailure>,
}

/// Registers a job once per `(source_uid, generation)`; registering it again
/// returns the same id.
pub async fn register_job(client: &Client, job: &NewJob) -> Result<Uuid, StateError> {
    let spec = serde_json::to_value(&job.spec)?;
    let row = client
        .query_one(
            &client
                .prepare_cached(
                    "INSERT INTO upload_jobs (id, namespace, name, source_uid, generation, spec, state)
             VALUES ($1, $2, $3, $4, $5, $6, CASE WHEN $7 THEN 'suspended' ELSE 'pending' END)
             ON CONFLICT (source_uid, generation) DO UPDATE SET name = upload_jobs.name
             RETURNING id",
                )
                .await?,
            &[
                &Uuid::new_v4(),
                &job.namespace,
                &job.name,
                &job.source_uid,
                &job.generation,
                &spec,
                &job.suspended,
            ],
        )
        .await?;
    Ok(row.get(0))
}

/// The job's state alone, cheap to poll: [`get_job`] reads the whole spec,
/// which lists every URL of the job.
pub async fn job_state(client: &Client, id: Uuid) -> Result<JobState, StateError> {
    let row = client
        .query_opt(
            &client
                .prepare_cached("SELECT state FROM upload_jobs WHERE id = $1")
                .await?,
            &[&id],
        )
        .await?
        .ok_or_else(|| StateError::NotFound {
            what: "upload job",
            id: id.to_string(),
        })?;
    JobState::parse(row.get(0))
}

pub async fn get_job(client: &Client, id: Uuid) -> Result<JobRecord, StateError> {
    let row = client
        .query_opt(
            &client
                .prepare_cached(
                    "SELECT id, namespace, name, spec, state, planned_at IS NOT NULL,
                    created_at, started_at, finished_at, last_error, failure_reason
             FROM upload_jobs WHERE id = $1",
                )
                .await?,
            &[&id],
        )
        .await?
        .ok_or_else(|| StateError::NotFound {
            what: "upload job",
            id: id.to_string(),
        })?;
    Ok(JobRecord {
        id: row.get(0),
        namespace: row.get(1),
        name: row.get(2),
        spec: serde_json::from_value(row.get(3))?,
        state: JobState::parse(row.get(4))?,
        planned: row.get(5),
        created_at: row.get(6),
        started_at: row.get(7),
        finished_at: row.get(8),
        last_error: row.get(9),
        failure: row
            .get::<_, Option<&str>>(10)
            .map(JobFailure::parse)
            .transpose()?,
    })
}

pub async fn mark_planned(client: &Client, job_id: Uuid) -> Result<(), StateError> {
    client
        .execute(
            &client
                .prepare_cached(
                    "UPDATE upload_jobs SET planned_at = coalesce(planned_at, now()) WHERE id = $1",
                )
                .await?,
            &[&job_id],
        )
        .await?;
    refresh_job_state(client, job_id).await?;
    Ok(())
}

/// Fails a whole job whose planning failed for good.
pub async fn fail_job(client: &Client, job_id: Uuid, error: &str) -> Result<(), StateError> {
    let stmt = client
        .prepare_cached(
            "UPDATE upload_jobs SET state = 'failed', last_error = $2,
                    failure_reason = 'PlanningFailed', finished_at = now()
             WHERE id = $1",
        )
        .await?;
    client.execute(&stmt, &[&job_id, &error]).await?;
    Ok(())
}

/// The destinations of the jobs of the last `days`, with the namespace whose
/// credentials reach them.
pub async fn recent_destinations(
    client: &Client,
    days: i32,
) -> Result<Vec<(String, crate::spec::Destination)>, StateError> {
    let stmt = client
        .prepare_cached(
            "SELECT DISTINCT namespace, spec->'destination' FROM upload_jobs
             WHERE created_at > now() - make_interval(days => $1)",
        )
        .await?;
    let rows = client.query(&stmt, &[&days]).await?;
    // A destination this version cannot read is skipped, not fatal.
    Ok(rows
        .iter()
        .filter_map(|r| {
            let dest = serde_json::from_value(r.get::<_, serde_json::Value>(1)).ok()?;
            Some((r.get::<_, String>(0), dest))
        })
        .collect())
}

/// Once the job is planned, active and no item is left to run, the job is
/// finished: failed if any item failed, succeeded otherwise. A no-op
/// otherwise.
pub(crate) async fn refresh_job_state(client: &Client, job_id: Uuid) -> Result<(), StateError> {
    // The trigger that counts unfinished items (migration V6) calls the same
    // function when a job's last item finishes; this call is for a job whose
    // items all finished before its planning did, or while it was suspended.
    client
        .execute(
            &client
                .prepare_cached("SELECT stowage_finish_upload_job($1)")
                .await?,
            &[&job_id],
        )
        .await?;
    Ok(())
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobCounts {
    pub total: i64,
    pub pending: i64,
    pub running: i64,
    pub succeeded: i64,
    pub skipped_duplicate: i64,
    pub skipped_exists: i64,
    pub failed: i64,
    pub dead_lettered: i64,
    pub bytes_total: i64,
    pub bytes_done: i64,
}

pub async fn job_counts(client: &Client, job_id: Uuid) -> Result<JobCounts, StateError> {
    let r = client
        .query_one(
            &client
                .prepare_cached(
                    "SELECT count(*),
                    count(*) FILTER (WHERE state = 'pending'),
                    count(*) FILTER (WHERE state = 'running'),
                    count(*) FILTER (WHERE state = 'succeeded'),
                    count(*) FILTER (WHERE state = 'skipped_duplicate'),
                    count(*) FILTER (WHERE state = 'skipped_exists'),
                    count(*) FILTER (WHERE state = 'failed'),
                    count(*) FILTER (WHERE dead_lettered),
                    coalesce(sum(size_bytes), 0)::bigint,
                    coalesce(sum(bytes_done), 0)::bigint
             FROM upload_items WHERE job_id = $1",
                )
                .await?,
            &[&job_id],
        )
        .await?;
    Ok(JobCounts {
        total: r.get(0),
        pending: r.get(1),
        running: r.get(2),
        succeeded: r.get(3),
        skipped_duplicate: r.get(4),
        skipped_exists: r.get(5),
        failed: r.get(6),
        dead_lettered: r.get(7),
        bytes_total: r.get(8),
        bytes_done: r.get(9),
    })
}

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
        Some(r) => Ok(Some(get_job(client, r.get(0)).await?)),
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
        refresh_job_state(client, job_id).await?;
    }
    Ok(changed)
}

/// The round of tasks a resume owes and the pending files to queue in it,
/// if a resume has not been queued yet (the operator that resumed the job
/// may have died before queuing it).
pub async fn resume_owed(
    client: &Client,
    job_id: Uuid,
) -> Result<Option<(String, Vec<QueuedFile>)>, StateError> {
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
                    "SELECT id, size_bytes FROM upload_items
                     WHERE job_id = $1 AND state = 'pending' ORDER BY id",
                )
                .await?,
            &[&job_id],
        )
        .await?;
    let files = rows
        .iter()
        .map(|r| QueuedFile {
            id: r.get(0),
            size: r.get(1),
        })
        .collect();
    Ok(Some((row.get(0), files)))
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
    failure: JobFailure,
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
