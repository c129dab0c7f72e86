//! Upload jobs, items, multipart parts and objects.

use chrono::{DateTime, Utc};
// Statements are prepared once per pooled connection and reused: a file
// costs a dozen statements, and parsing each one every time was a large
// share of PostgreSQL's CPU in the small-file benchmark.
use deadpool_postgres::ClientWrapper as Client;
use tokio_postgres::Row;
use uuid::Uuid;

use super::StateError;
use crate::spec::UploadJobSpec;

/// Terminal and non-terminal states of an item, as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ItemState {
    Pending,
    Running,
    Succeeded,
    SkippedDuplicate,
    SkippedExists,
    Failed,
}

impl ItemState {
    pub fn as_str(self) -> &'static str {
        match self {
            ItemState::Pending => "pending",
            ItemState::Running => "running",
            ItemState::Succeeded => "succeeded",
            ItemState::SkippedDuplicate => "skipped_duplicate",
            ItemState::SkippedExists => "skipped_exists",
            ItemState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => ItemState::Pending,
            "running" => ItemState::Running,
            "succeeded" => ItemState::Succeeded,
            "skipped_duplicate" => ItemState::SkippedDuplicate,
            "skipped_exists" => ItemState::SkippedExists,
            "failed" => ItemState::Failed,
            _ => return None,
        })
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, ItemState::Pending | ItemState::Running)
    }
}

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

pub struct NewItem {
    pub source_ref: String,
    pub dest_key: String,
    pub size_bytes: Option<i64>,
    /// Set when planning already knows the item cannot be uploaded (e.g. an
    /// unsafe destination key): the item is stored as failed with this error.
    pub invalid: Option<String>,
}

/// Inserts the items that are not registered yet (keyed by destination key)
/// and returns every item of the job that still has to run.
pub async fn add_items(
    client: &Client,
    job_id: Uuid,
    items: &[NewItem],
) -> Result<Vec<ItemRecord>, StateError> {
    // One statement for the whole listing: a job of 10,000 files is planned
    // in one round trip, not 10,000.
    let mut refs = Vec::with_capacity(items.len());
    let mut keys = Vec::with_capacity(items.len());
    let mut sizes = Vec::with_capacity(items.len());
    let mut errors = Vec::with_capacity(items.len());
    for item in items {
        refs.push(item.source_ref.as_str());
        keys.push(item.dest_key.as_str());
        sizes.push(item.size_bytes);
        errors.push(item.invalid.as_deref());
    }
    client
        .execute(
            &client
                .prepare_cached(
                    "INSERT INTO upload_items (job_id, source_ref, dest_key, size_bytes, state,
                                       last_error, error_class, finished_at)
             SELECT $1, r, k, s,
                    CASE WHEN e IS NULL THEN 'pending' ELSE 'failed' END,
                    e,
                    CASE WHEN e IS NULL THEN NULL ELSE 'permanent' END,
                    CASE WHEN e IS NULL THEN NULL ELSE now() END
             FROM unnest($2::text[], $3::text[], $4::bigint[], $5::text[]) AS t(r, k, s, e)
             ON CONFLICT (job_id, dest_key) DO NOTHING",
                )
                .await?,
            &[&job_id, &refs, &keys, &sizes, &errors],
        )
        .await?;
    let rows = client
        .query(
            &client.prepare_cached(&format!(
                "{ITEM_SELECT} WHERE i.job_id = $1 AND i.state IN ('pending', 'running') ORDER BY i.id"
            )).await?,
            &[&job_id],
        )
        .await?;
    rows.iter().map(ItemRecord::from_row).collect()
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

#[derive(Clone, Debug)]
pub struct ItemRecord {
    pub id: i64,
    pub job_id: Uuid,
    pub source_ref: String,
    pub dest_key: String,
    pub size_bytes: Option<i64>,
    pub state: ItemState,
    pub attempts: i32,
    pub bytes_done: i64,
    pub sha256_hex: Option<String>,
    pub last_error: Option<String>,
    pub error_class: Option<String>,
    pub dead_lettered: bool,
    /// The state of the item's job: a suspended or cancelled job's files
    /// are not started.
    pub job_state: JobState,
}

const ITEM_SELECT: &str = "SELECT i.id, i.job_id, i.source_ref, i.dest_key, i.size_bytes, i.state,
        i.attempts, i.bytes_done, i.sha256_hex, i.last_error, i.error_class, i.dead_lettered,
        j.state
        FROM upload_items i JOIN upload_jobs j ON j.id = i.job_id";

impl ItemRecord {
    fn from_row(row: &Row) -> Result<Self, StateError> {
        Ok(ItemRecord {
            id: row.get(0),
            job_id: row.get(1),
            source_ref: row.get(2),
            dest_key: row.get(3),
            size_bytes: row.get(4),
            state: ItemState::parse(row.get(5)).unwrap_or(ItemState::Failed),
            attempts: row.get(6),
            bytes_done: row.get(7),
            sha256_hex: row.get(8),
            last_error: row.get(9),
            error_class: row.get(10),
            dead_lettered: row.get(11),
            job_state: JobState::parse(row.get(12))?,
        })
    }
}

pub async fn get_item(client: &Client, item_id: i64) -> Result<ItemRecord, StateError> {
    client
        .query_opt(
            &client
                .prepare_cached(&format!("{ITEM_SELECT} WHERE i.id = $1"))
                .await?,
            &[&item_id],
        )
        .await?
        .map(|r| ItemRecord::from_row(&r))
        .transpose()?
        .ok_or_else(|| StateError::NotFound {
            what: "upload item",
            id: item_id.to_string(),
        })
}

pub async fn list_items(client: &Client, job_id: Uuid) -> Result<Vec<ItemRecord>, StateError> {
    let rows = client
        .query(
            &client
                .prepare_cached(&format!("{ITEM_SELECT} WHERE i.job_id = $1 ORDER BY i.id"))
                .await?,
            &[&job_id],
        )
        .await?;
    rows.iter().map(ItemRecord::from_row).collect()
}

/// Marks the item running (and its job, the first time); true when an
/// earlier attempt recorded a multipart upload to resume. Called under the
/// destination key's lock, so it sees what the lock's last holder recorded.
pub async fn start_item(client: &Client, item: &ItemRecord) -> Result<bool, StateError> {
    // Three tables, one round trip: the updates touch different rows, so
    // their order does not matter.
    let stmt = client
        .prepare_cached(
            "WITH item AS (UPDATE upload_items SET state = 'running', updated_at = now()
                           WHERE id = $1 RETURNING job_id),
             job AS (UPDATE upload_jobs SET state = 'running', started_at = coalesce(started_at, now())
                     WHERE id = (SELECT job_id FROM item) AND state = 'pending')
             SELECT EXISTS (SELECT 1 FROM multipart_uploads WHERE item_id = $1)",
        )
        .await?;
    Ok(client.query_one(&stmt, &[&item.id]).await?.get(0))
}

pub async fn set_progress(
    client: &Client,
    item_id: i64,
    bytes_done: i64,
    size: Option<i64>,
) -> Result<(), StateError> {
    client
        .execute(
            &client.prepare_cached("UPDATE upload_items SET bytes_done = $2, size_bytes = coalesce($3, size_bytes),
                    updated_at = now() WHERE id = $1").await?,
            &[&item_id, &bytes_done, &size],
        )
        .await?;
    Ok(())
}

/// Ends the item (succeeded or skipped) and, when it wrote an object,
/// appends that object's version to the history and makes it current, in
/// one statement: an item never ends without the object row it wrote, nor
/// the other way round. Returns the object's version.
pub async fn finish_item(
    client: &Client,
    item: &ItemRecord,
    state: ItemState,
    sha256_hex: &str,
    size: i64,
    object: Option<&ObjectWrite<'_>>,
) -> Result<Option<i32>, StateError> {
    const FINISH: &str = "UPDATE upload_items SET state = $2, sha256_hex = $3, size_bytes = $4,
            bytes_done = $4, last_error = NULL, error_class = NULL, updated_at = now(), finished_at = now()
         WHERE id = $1";
    let state = state.as_str();
    let version = match object {
        None => {
            client
                .execute(
                    &client.prepare_cached(FINISH).await?,
                    &[&item.id, &state, &sha256_hex, &size],
                )
                .await?;
            None
        }
        Some(w) => {
            // The INSERT reads `prev`, so the old current row is no longer
            // current when the new one is checked against objects_one_current.
            let stmt = client
                .prepare_cached(&format!(
                    "WITH item AS ({FINISH}),
                     prev AS (UPDATE objects SET current = false, archived_key = coalesce($9, archived_key)
                              WHERE bucket = $5 AND object_key = $6 AND current RETURNING version)
                     INSERT INTO objects (bucket, object_key, version, sha256_hex, size_bytes, etag, job_id)
                     SELECT $5, $6, coalesce((SELECT version FROM prev), 0) + 1, $3, $4, $7, $8
                     RETURNING version"
                ))
                .await?;
            let row = client
                .query_one(
                    &stmt,
                    &[
                        &item.id,
                        &state,
                        &sha256_hex,
                        &size,
                        &w.bucket,
                        &w.key,
                        &w.etag,
                        &item.job_id,
                        &w.archived_previous_to,
                    ],
                )
                .await?;
            Some(row.get(0))
        }
    };
    // The last item's update ends the job (trigger, migration V6).
    Ok(version)
}

/// Hands a running item back (worker shutting down): no attempt is counted.
pub async fn hand_back_item(client: &Client, item_id: i64) -> Result<(), StateError> {
    let stmt = client
        .prepare_cached(
            "UPDATE upload_items SET state = 'pending', updated_at = now()
             WHERE id = $1 AND state = 'running'",
        )
        .await?;
    client.execute(&stmt, &[&item_id]).await?;
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

/// Destinations of the jobs registered in the last `days` days.
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

/// Counts a failed attempt that will be retried; returns the attempts so far.
pub async fn record_retry(client: &Client, item_id: i64, error: &str) -> Result<i32, StateError> {
    let row = client
        .query_one(
            &client.prepare_cached("UPDATE upload_items SET state = 'pending', attempts = attempts + 1, last_error = $2,
                    error_class = 'retryable', updated_at = now()
             WHERE id = $1 RETURNING attempts").await?,
            &[&item_id, &error],
        )
        .await?;
    Ok(row.get(0))
}

/// Fails the item for good; `dead_lettered` says its task went to STOWAGE_DEAD.
pub async fn fail_item(
    client: &Client,
    item: &ItemRecord,
    error: &str,
    class: &str,
    dead_lettered: bool,
) -> Result<i32, StateError> {
    let row = client
        .query_one(
            &client.prepare_cached("UPDATE upload_items SET state = 'failed', attempts = attempts + 1, last_error = $2,
                    error_class = $3, dead_lettered = $4, updated_at = now(), finished_at = now()
             WHERE id = $1 RETURNING attempts").await?,
            &[&item.id, &error, &class, &dead_lettered],
        )
        .await?;
    // The last item's update ends the job (trigger, migration V6).
    Ok(row.get(0))
}

/// Puts a failed item back to pending for a replay of its dead letter.
pub async fn reset_for_replay(client: &Client, item_id: i64) -> Result<(), StateError> {
    let row = client
        .query_one(
            &client.prepare_cached("UPDATE upload_items SET state = 'pending', attempts = 0, dead_lettered = false,
                    finished_at = NULL, updated_at = now()
             WHERE id = $1 RETURNING job_id").await?,
            &[&item_id],
        )
        .await?;
    let job_id: Uuid = row.get(0);
    client
        .execute(
            &client
                .prepare_cached(
                    "UPDATE upload_jobs SET state = 'running', finished_at = NULL WHERE id = $1",
                )
                .await?,
            &[&job_id],
        )
        .await?;
    Ok(())
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

/// A multipart upload in progress for an item: the resume point.
#[derive(Clone, Debug, PartialEq)]
pub struct MultipartRecord {
    pub endpoint: String,
    pub bucket: String,
    pub object_key: String,
    pub upload_id: String,
    pub part_size_bytes: i64,
    pub checksum_algorithm: String,
    /// The SHA-256 set in the object's metadata at creation, if any.
    pub metadata_sha256: Option<String>,
    /// What the hashing pass behind `metadata_sha256` read (migration V12),
    /// when there was one: a resume reads only the parts still to send.
    pub source: Option<SourceVersion>,
}

/// The source bytes a multipart upload's hashing pass read.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceVersion {
    pub size_bytes: i64,
    /// Checksum (the upload's algorithm, base64) of each part-sized slice.
    pub part_checksums: Vec<String>,
    /// `etag:<value>` or `last-modified:<value>`, if the source sent one.
    pub validator: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PartRecord {
    pub part_number: i32,
    pub etag: String,
    pub checksum: String,
    pub size_bytes: i64,
    /// The whole object's running SHA-256 after this part (the serialized
    /// hasher, migration V15), where the transfer keeps it: a stream can
    /// resume after this part without the bytes before it.
    pub sha256_state: Option<Vec<u8>>,
}

pub async fn get_multipart(
    client: &Client,
    item_id: i64,
) -> Result<Option<(MultipartRecord, Vec<PartRecord>)>, StateError> {
    let Some(r) = client
        .query_opt(
            &client.prepare_cached("SELECT endpoint, bucket, object_key, upload_id, part_size_bytes, checksum_algorithm,
                    metadata_sha256, source_size, source_part_checksums, source_validator
             FROM multipart_uploads WHERE item_id = $1").await?,
            &[&item_id],
        )
        .await?
    else {
        return Ok(None);
    };
    let upload = MultipartRecord {
        endpoint: r.get(0),
        bucket: r.get(1),
        object_key: r.get(2),
        upload_id: r.get(3),
        part_size_bytes: r.get(4),
        checksum_algorithm: r.get(5),
        metadata_sha256: r.get(6),
        source: match (
            r.get::<_, Option<i64>>(7),
            r.get::<_, Option<Vec<String>>>(8),
        ) {
            (Some(size_bytes), Some(part_checksums)) => Some(SourceVersion {
                size_bytes,
                part_checksums,
                validator: r.get(9),
            }),
            _ => None,
        },
    };
    let parts = client
        .query(
            &client
                .prepare_cached(
                    "SELECT part_number, etag, checksum, size_bytes, sha256_state FROM upload_parts
             WHERE item_id = $1 ORDER BY part_number",
                )
                .await?,
            &[&item_id],
        )
        .await?
        .iter()
        .map(|r| PartRecord {
            part_number: r.get(0),
            etag: r.get(1),
            checksum: r.get(2),
            size_bytes: r.get(3),
            sha256_state: r.get(4),
        })
        .collect();
    Ok(Some((upload, parts)))
}

pub async fn save_multipart(
    client: &Client,
    item_id: i64,
    upload: &MultipartRecord,
) -> Result<(), StateError> {
    client
        .execute(
            &client.prepare_cached("INSERT INTO multipart_uploads (item_id, endpoint, bucket, object_key, upload_id,
                                            part_size_bytes, checksum_algorithm, metadata_sha256,
                                            source_size, source_part_checksums, source_validator)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)").await?,
            &[
                &item_id,
                &upload.endpoint,
                &upload.bucket,
                &upload.object_key,
                &upload.upload_id,
                &upload.part_size_bytes,
                &upload.checksum_algorithm,
                &upload.metadata_sha256,
                &upload.source.as_ref().map(|v| v.size_bytes),
                &upload.source.as_ref().map(|v| &v.part_checksums),
                &upload.source.as_ref().and_then(|v| v.validator.as_ref()),
            ],
        )
        .await?;
    Ok(())
}

pub async fn save_part(client: &Client, item_id: i64, part: &PartRecord) -> Result<(), StateError> {
    client
        .execute(
            &client
                .prepare_cached(
                    "INSERT INTO upload_parts (item_id, part_number, etag, checksum, size_bytes,
                                       sha256_state)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (item_id, part_number) DO UPDATE
               SET etag = excluded.etag, checksum = excluded.checksum,
                   size_bytes = excluded.size_bytes, sha256_state = excluded.sha256_state,
                   uploaded_at = now()",
                )
                .await?,
            &[
                &item_id,
                &part.part_number,
                &part.etag,
                &part.checksum,
                &part.size_bytes,
                &part.sha256_state,
            ],
        )
        .await?;
    Ok(())
}

pub async fn delete_part(
    client: &Client,
    item_id: i64,
    part_number: i32,
) -> Result<(), StateError> {
    client
        .execute(
            &client
                .prepare_cached("DELETE FROM upload_parts WHERE item_id = $1 AND part_number = $2")
                .await?,
            &[&item_id, &part_number],
        )
        .await?;
    Ok(())
}

/// Forgets an item's multipart upload (and its parts).
pub async fn delete_multipart(client: &Client, item_id: i64) -> Result<(), StateError> {
    client
        .execute(
            &client
                .prepare_cached("DELETE FROM multipart_uploads WHERE item_id = $1")
                .await?,
            &[&item_id],
        )
        .await?;
    Ok(())
}

/// Upload ids the database still considers live for `bucket`: the sweeper
/// leaves those alone.
pub async fn live_upload_ids(
    client: &Client,
    bucket: &str,
) -> Result<std::collections::HashSet<String>, StateError> {
    let rows = client
        .query(
            &client.prepare_cached("SELECT m.upload_id FROM multipart_uploads m JOIN upload_items i ON i.id = m.item_id
             WHERE m.bucket = $1 AND i.state IN ('pending', 'running')").await?,
            &[&bucket],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

#[derive(Clone, Debug, PartialEq)]
pub struct ObjectRecord {
    pub bucket: String,
    pub object_key: String,
    pub version: i32,
    pub sha256_hex: String,
    pub size_bytes: i64,
}

pub(crate) fn object_from_row(r: &Row) -> ObjectRecord {
    ObjectRecord {
        bucket: r.get(0),
        object_key: r.get(1),
        version: r.get(2),
        sha256_hex: r.get(3),
        size_bytes: r.get(4),
    }
}

pub async fn current_object(
    client: &Client,
    bucket: &str,
    key: &str,
) -> Result<Option<ObjectRecord>, StateError> {
    Ok(client
        .query_opt(
            &client
                .prepare_cached(
                    "SELECT bucket, object_key, version, sha256_hex, size_bytes FROM objects
             WHERE bucket = $1 AND object_key = $2 AND current",
                )
                .await?,
            &[&bucket, &key],
        )
        .await?
        .map(|r| object_from_row(&r)))
}

/// A current object in `bucket` with this content, to copy instead of upload.
pub async fn object_with_content(
    client: &Client,
    bucket: &str,
    sha256_hex: &str,
) -> Result<Option<ObjectRecord>, StateError> {
    Ok(client
        .query_opt(
            &client
                .prepare_cached(
                    "SELECT bucket, object_key, version, sha256_hex, size_bytes FROM objects
             WHERE bucket = $1 AND sha256_hex = $2 AND current
             ORDER BY written_at LIMIT 1",
                )
                .await?,
            &[&bucket, &sha256_hex],
        )
        .await?
        .map(|r| object_from_row(&r)))
}

pub async fn all_versions(
    client: &Client,
    bucket: &str,
    key: &str,
) -> Result<Vec<(ObjectRecord, Option<String>)>, StateError> {
    let rows = client
        .query(
            &client.prepare_cached("SELECT bucket, object_key, version, sha256_hex, size_bytes, archived_key FROM objects
             WHERE bucket = $1 AND object_key = $2 ORDER BY version").await?,
            &[&bucket, &key],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (object_from_row(r), r.get(5)))
        .collect())
}

pub struct ObjectWrite<'a> {
    pub bucket: &'a str,
    pub key: &'a str,
    pub etag: Option<&'a str>,
    /// Where the previous current version was preserved, if it was.
    pub archived_previous_to: Option<&'a str>,
}

/// Items of a job that failed without a dead letter (refused at planning,
/// e.g. for an unsafe destination key): `(id, error)`.
pub async fn failed_without_dead_letter(
    client: &Client,
    job_id: Uuid,
) -> Result<Vec<(i64, String)>, StateError> {
    let rows = client
        .query(
            &client
                .prepare_cached(
                    "SELECT id, coalesce(last_error, '') FROM upload_items
                     WHERE job_id = $1 AND state = 'failed' AND NOT dead_lettered ORDER BY id",
                )
                .await?,
            &[&job_id],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Records that these items' tasks are in the dead-letter stream.
pub async fn mark_dead_lettered(client: &Client, item_ids: &[i64]) -> Result<(), StateError> {
    client
        .execute(
            &client
                .prepare_cached(
                    "UPDATE upload_items SET dead_lettered = true, updated_at = now()
                     WHERE id = ANY($1)",
                )
                .await?,
            &[&item_ids],
        )
        .await?;
    Ok(())
}

/// The current object at `bucket`/`key` was deleted: its history keeps
/// every version, none current. Returns whether one was current.
pub async fn object_deleted(client: &Client, bucket: &str, key: &str) -> Result<bool, StateError> {
    let n = client
        .execute(
            &client
                .prepare_cached(
                    "UPDATE objects SET current = false
                     WHERE bucket = $1 AND object_key = $2 AND current",
                )
                .await?,
            &[&bucket, &key],
        )
        .await?;
    Ok(n > 0)
}
