//! IndexCollections and their sync runs. A collection is one row per
//! resource uid that follows the resource's latest generation; a sync run is
//! in progress, completed, completed with errors, failed or abandoned, and
//! at most one per collection is in progress.

use chrono::{DateTime, Utc};
use deadpool_postgres::ClientWrapper as Client;
use tokio_postgres::Row;
use uuid::Uuid;

use super::StateError;
use crate::spec::index::IndexSpec;

pub struct NewCollection {
    pub namespace: String,
    pub name: String,
    pub source_uid: String,
    pub generation: i64,
    pub spec: IndexSpec,
}

#[derive(Clone, Debug)]
pub struct CollectionRecord {
    pub id: Uuid,
    pub namespace: String,
    pub name: String,
    pub generation: i64,
    pub spec: IndexSpec,
}

/// Registers the collection of a resource, or moves it to a newer
/// generation; an older generation never overwrites a newer one. Returns
/// the collection's id.
pub async fn register(client: &Client, c: &NewCollection) -> Result<Uuid, StateError> {
    let spec = serde_json::to_value(&c.spec)?;
    let row = client
        .query_one(
            &client
                .prepare_cached(
                    "INSERT INTO collections (id, namespace, name, source_uid, generation, spec)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (source_uid) DO UPDATE
                        SET generation = greatest(collections.generation, excluded.generation),
                            spec = CASE WHEN excluded.generation > collections.generation
                                        THEN excluded.spec ELSE collections.spec END,
                            updated_at = now()
                     RETURNING id",
                )
                .await?,
            &[
                &Uuid::new_v4(),
                &c.namespace,
                &c.name,
                &c.source_uid,
                &c.generation,
                &spec,
            ],
        )
        .await?;
    Ok(row.get(0))
}

fn record(row: &Row) -> Result<CollectionRecord, StateError> {
    Ok(CollectionRecord {
        id: row.get(0),
        namespace: row.get(1),
        name: row.get(2),
        generation: row.get(3),
        spec: serde_json::from_value(row.get(4))?,
    })
}

/// Collections that index `bucket` and watch uploads (`spec.watchUploads`);
/// the caller matches endpoint, prefix and globs.
pub async fn watching(client: &Client, bucket: &str) -> Result<Vec<CollectionRecord>, StateError> {
    client
        .query(
            &client
                .prepare_cached(
                    "SELECT id, namespace, name, generation, spec FROM collections
                     WHERE spec -> 'source' ->> 'bucket' = $1
                       AND coalesce((spec ->> 'watchUploads')::boolean, false)",
                )
                .await?,
            &[&bucket],
        )
        .await?
        .iter()
        .map(record)
        .collect()
}

pub async fn get(client: &Client, id: Uuid) -> Result<CollectionRecord, StateError> {
    let row = client
        .query_opt(
            &client
                .prepare_cached(
                    "SELECT id, namespace, name, generation, spec FROM collections WHERE id = $1",
                )
                .await?,
            &[&id],
        )
        .await?
        .ok_or_else(|| StateError::NotFound {
            what: "collection",
            id: id.to_string(),
        })?;
    record(&row)
}

pub async fn find(client: &Client, source_uid: &str) -> Result<Option<Uuid>, StateError> {
    let row = client
        .query_opt(
            &client
                .prepare_cached("SELECT id FROM collections WHERE source_uid = $1")
                .await?,
            &[&source_uid],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// Deletes the collection and everything indexed for it.
pub async fn delete(client: &Client, id: Uuid) -> Result<(), StateError> {
    let stmt = client
        .prepare_cached("DELETE FROM collections WHERE id = $1")
        .await?;
    client.execute(&stmt, &[&id]).await?;
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    InProgress,
    Completed,
    CompletedWithErrors,
    Failed,
    Abandoned,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::InProgress => "in_progress",
            RunState::Completed => "completed",
            RunState::CompletedWithErrors => "completed_with_errors",
            RunState::Failed => "failed",
            RunState::Abandoned => "abandoned",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "in_progress" => RunState::InProgress,
            "completed" => RunState::Completed,
            "completed_with_errors" => RunState::CompletedWithErrors,
            "failed" => RunState::Failed,
            "abandoned" => RunState::Abandoned,
            _ => return None,
        })
    }
}

/// What a run saw and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunCounts {
    pub seen: i64,
    pub new: i64,
    pub changed: i64,
    pub deleted: i64,
    pub failed: i64,
    pub skipped: i64,
    pub chunks_written: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncRun {
    pub id: i64,
    pub collection_id: Uuid,
    pub state: RunState,
    pub trigger: String,
    pub generation: i64,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub counts: RunCounts,
    pub error: Option<String>,
}

const RUN_SELECT: &str = "SELECT id, collection_id, state, trigger, generation, started_at,
    finished_at, seen, new, changed, deleted, failed, skipped, chunks_written, error FROM sync_runs";

impl SyncRun {
    fn from_row(r: &Row) -> Self {
        SyncRun {
            id: r.get(0),
            collection_id: r.get(1),
            state: RunState::parse(r.get(2)).unwrap_or(RunState::Failed),
            trigger: r.get(3),
            generation: r.get(4),
            started_at: r.get(5),
            finished_at: r.get(6),
            counts: RunCounts {
                seen: r.get(7),
                new: r.get(8),
                changed: r.get(9),
                deleted: r.get(10),
                failed: r.get(11),
                skipped: r.get(12),
                chunks_written: r.get(13),
            },
            error: r.get(14),
        }
    }
}

pub async fn latest_run(
    client: &Client,
    collection_id: Uuid,
) -> Result<Option<SyncRun>, StateError> {
    let row = client
        .query_opt(
            &client
                .prepare_cached(&format!(
                    "{RUN_SELECT} WHERE collection_id = $1 ORDER BY id DESC LIMIT 1"
                ))
                .await?,
            &[&collection_id],
        )
        .await?;
    Ok(row.as_ref().map(SyncRun::from_row))
}

/// Starts a run; a run still marked in progress (its worker died) is marked
/// abandoned first. The caller holds the collection's sync lock.
pub async fn begin_run(
    client: &mut Client,
    collection_id: Uuid,
    trigger: &str,
    generation: i64,
) -> Result<i64, StateError> {
    let tx = client.transaction().await?;
    tx.execute(
        "UPDATE sync_runs SET state = 'abandoned', finished_at = now(),
                error = coalesce(error, 'abandoned: its worker stopped before finishing')
         WHERE collection_id = $1 AND state = 'in_progress'",
        &[&collection_id],
    )
    .await?;
    let row = tx
        .query_one(
            "INSERT INTO sync_runs (collection_id, trigger, generation) VALUES ($1, $2, $3)
             RETURNING id",
            &[&collection_id, &trigger, &generation],
        )
        .await?;
    tx.commit().await?;
    Ok(row.get(0))
}

/// Ends a run in `state` (not in progress) with its counts and error.
pub async fn finish_run(
    client: &Client,
    run_id: i64,
    state: RunState,
    counts: &RunCounts,
    error: Option<&str>,
) -> Result<(), StateError> {
    let stmt = client
        .prepare_cached(
            "UPDATE sync_runs SET state = $2, finished_at = now(), seen = $3, new = $4,
                    changed = $5, deleted = $6, failed = $7, skipped = $8, chunks_written = $9,
                    error = $10
             WHERE id = $1 AND state = 'in_progress'",
        )
        .await?;
    client
        .execute(
            &stmt,
            &[
                &run_id,
                &state.as_str(),
                &counts.seen,
                &counts.new,
                &counts.changed,
                &counts.deleted,
                &counts.failed,
                &counts.skipped,
                &counts.chunks_written,
                &error,
            ],
        )
        .await?;
    Ok(())
}

/// The collection of resource `namespace/name` (the newest, should an old
/// one still be being deleted).
pub async fn find_by_name(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Option<CollectionRecord>, StateError> {
    let row = client
        .query_opt(
            &client
                .prepare_cached(
                    "SELECT id FROM collections WHERE namespace = $1 AND name = $2
                     ORDER BY created_at DESC LIMIT 1",
                )
                .await?,
            &[&namespace, &name],
        )
        .await?;
    match row {
        Some(r) => Ok(Some(get(client, r.get(0)).await?)),
        None => Ok(None),
    }
}
