//! The files of a job: registered at planning (one statement per listing),
//! started, finished (with the object row, in one statement), retried,
//! failed, dead-lettered and replayed. The last item's end ends its job
//! (triggers, migration V6).

use deadpool_postgres::ClientWrapper as Client;
use tokio_postgres::Row;
use uuid::Uuid;

use super::*;
use crate::state::StateError;

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

    /// A state no migration wrote is a database this version cannot read.
    pub fn parse(s: &str) -> Result<Self, StateError> {
        Ok(match s {
            "pending" => ItemState::Pending,
            "running" => ItemState::Running,
            "succeeded" => ItemState::Succeeded,
            "skipped_duplicate" => ItemState::SkippedDuplicate,
            "skipped_exists" => ItemState::SkippedExists,
            "failed" => ItemState::Failed,
            other => {
                return Err(StateError::Unknown {
                    what: "upload item state",
                    value: other.to_string(),
                });
            }
        })
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, ItemState::Pending | ItemState::Running)
    }
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

/// A file to queue: its item and, when planning learnt it, its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueuedFile {
    pub id: i64,
    pub size: Option<i64>,
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
    pub fn queued(&self) -> QueuedFile {
        QueuedFile {
            id: self.id,
            size: self.size_bytes,
        }
    }

    fn from_row(row: &Row) -> Result<Self, StateError> {
        Ok(ItemRecord {
            id: row.get(0),
            job_id: row.get(1),
            source_ref: row.get(2),
            dest_key: row.get(3),
            size_bytes: row.get(4),
            state: ItemState::parse(row.get(5))?,
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

/// Puts the failed ones of `item_ids` back to pending for a replay of their
/// dead letter (a batch's letter may name files that went on to succeed:
/// those are left alone), and reopens their jobs.
pub async fn reset_for_replay(client: &Client, item_ids: &[i64]) -> Result<(), StateError> {
    client
        .execute(
            &client
                .prepare_cached(
                    "WITH reset AS (
                         UPDATE upload_items SET state = 'pending', attempts = 0,
                                dead_lettered = false, finished_at = NULL, updated_at = now()
                         WHERE id = ANY($1) AND state = 'failed' RETURNING job_id)
                     UPDATE upload_jobs SET state = 'running', finished_at = NULL
                     WHERE id IN (SELECT job_id FROM reset)",
                )
                .await?,
            &[&item_ids],
        )
        .await?;
    Ok(())
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
