//! IndexCollections and their sync runs. A collection is one row per
//! resource uid that follows the resource's latest generation; a sync run is
//! in progress, completed, completed with errors, failed or abandoned, and
//! at most one per collection is in progress.

use chrono::{DateTime, Utc};
use deadpool_postgres::ClientWrapper as Client;
use tokio_postgres::Row;
use uuid::Uuid;

use super::StateError;
use super::index::{self, DocumentState};
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

/// Deletes the collection and everything indexed for it: its generations'
/// vector indexes first (CONCURRENTLY: other collections keep reading and
/// writing `chunks`; it waits its turn if another collection's index is
/// being built; interrupted, the collection is still there and a second
/// call finishes the job), then its rows (generations, documents,
/// chunks, runs: one statement), then any vector index whose generation is
/// gone (one created meanwhile, or left by an earlier version).
pub async fn delete(client: &Client, id: Uuid) -> Result<(), StateError> {
    let generations: Vec<i64> = client
        .query(
            &client
                .prepare_cached("SELECT id FROM embedding_generations WHERE collection_id = $1")
                .await?,
            &[&id],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    index::drop_vector_indexes(client, &generations).await?;
    let stmt = client
        .prepare_cached("DELETE FROM collections WHERE id = $1")
        .await?;
    client.execute(&stmt, &[&id]).await?;
    index::drop_orphan_vector_indexes(client).await
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

    /// A state no migration wrote is a database this version cannot read.
    pub fn parse(s: &str) -> Result<Self, StateError> {
        Ok(match s {
            "in_progress" => RunState::InProgress,
            "completed" => RunState::Completed,
            "completed_with_errors" => RunState::CompletedWithErrors,
            "failed" => RunState::Failed,
            "abandoned" => RunState::Abandoned,
            other => {
                return Err(StateError::Unknown {
                    what: "sync run state",
                    value: other.to_string(),
                });
            }
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
    fn from_row(r: &Row) -> Result<Self, StateError> {
        Ok(SyncRun {
            id: r.get(0),
            collection_id: r.get(1),
            state: RunState::parse(r.get(2))?,
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
        })
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
    row.as_ref().map(SyncRun::from_row).transpose()
}

/// The collection's run in progress, if any, and whether it is alive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveRun {
    pub id: i64,
    /// The collection generation it indexes for.
    pub generation: i64,
    /// Its documents' tasks are all published.
    pub dispatched: bool,
    /// Time since its last sign of life (dispatch or a document finished).
    pub idle: std::time::Duration,
    /// Documents not finished yet.
    pub pending: i64,
}

pub async fn run_in_progress(
    client: &Client,
    collection_id: Uuid,
) -> Result<Option<LiveRun>, StateError> {
    let row = client
        .query_opt(
            &client
                .prepare_cached(
                    "SELECT r.id, r.generation, r.dispatched_at IS NOT NULL,
                            extract(epoch FROM now() - r.updated_at)::float8,
                            (SELECT count(*) FROM sync_run_documents d
                              WHERE d.run_id = r.id AND d.state = 'pending')
                     FROM sync_runs r WHERE r.collection_id = $1 AND r.state = 'in_progress'",
                )
                .await?,
            &[&collection_id],
        )
        .await?;
    Ok(row.map(|r| LiveRun {
        id: r.get(0),
        generation: r.get(1),
        dispatched: r.get(2),
        idle: std::time::Duration::from_secs_f64(r.get::<_, f64>(3).max(0.0)),
        pending: r.get(4),
    }))
}

/// Starts a run; a run still marked in progress (its planner died, or it
/// stopped making progress) is marked abandoned first. The caller holds the
/// collection's sync lock.
pub async fn begin_run(
    client: &mut Client,
    collection_id: Uuid,
    trigger: &str,
    generation: i64,
) -> Result<i64, StateError> {
    let tx = client.transaction().await?;
    tx.execute(
        "UPDATE sync_runs SET state = 'abandoned', finished_at = now(),
                error = coalesce(error, 'abandoned: it stopped making progress (a worker died, its \
                         tasks were lost, or a newer spec replaced it)')
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

/// An object a run indexes, as its plan found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedDocument {
    pub key: String,
    pub etag: String,
    pub size: i64,
    /// New to the generation (else changed, or failed last time).
    pub new: bool,
}

/// Records a run's plan: the generation it writes, what it saw and deleted,
/// and one pending row per document to index (their tasks are published
/// next, then [`mark_dispatched`]).
pub async fn record_plan(
    client: &mut Client,
    run_id: i64,
    generation_id: i64,
    counts: &RunCounts,
    documents: &[PlannedDocument],
) -> Result<(), StateError> {
    let tx = client.transaction().await?;
    tx.execute(
        "UPDATE sync_runs SET generation_id = $2, seen = $3, deleted = $4, updated_at = now()
         WHERE id = $1",
        &[&run_id, &generation_id, &counts.seen, &counts.deleted],
    )
    .await?;
    for batch in documents.chunks(1000) {
        let keys: Vec<&str> = batch.iter().map(|d| d.key.as_str()).collect();
        let etags: Vec<&str> = batch.iter().map(|d| d.etag.as_str()).collect();
        let sizes: Vec<i64> = batch.iter().map(|d| d.size).collect();
        let changes: Vec<&str> = batch
            .iter()
            .map(|d| if d.new { "new" } else { "changed" })
            .collect();
        tx.execute(
            "INSERT INTO sync_run_documents (run_id, object_key, etag, size_bytes, change)
             SELECT $1, * FROM unnest($2::text[], $3::text[], $4::int8[], $5::text[])
             ON CONFLICT DO NOTHING",
            &[&run_id, &keys, &etags, &sizes, &changes],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Every document task of the run is published: documents may now close it.
pub async fn mark_dispatched(client: &Client, run_id: i64) -> Result<(), StateError> {
    client
        .execute(
            "UPDATE sync_runs SET dispatched_at = now(), updated_at = now() WHERE id = $1",
            &[&run_id],
        )
        .await?;
    Ok(())
}

/// One document of a run, with its run's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunDocument {
    pub run_state: RunState,
    pub generation_id: Option<i64>,
    pub document: PlannedDocument,
    /// `Pending` until a worker finished it.
    pub state: DocumentState,
    pub attempts: i32,
}

/// Document `key` of run `run_id` of collection `collection_id`.
pub async fn run_document(
    client: &Client,
    collection_id: Uuid,
    run_id: i64,
    key: &str,
) -> Result<Option<RunDocument>, StateError> {
    let row = client
        .query_opt(
            &client
                .prepare_cached(
                    "SELECT r.state, r.generation_id, d.etag, d.size_bytes, d.change, d.state,
                            d.attempts
                     FROM sync_run_documents d JOIN sync_runs r ON r.id = d.run_id
                     WHERE d.run_id = $1 AND d.object_key = $2 AND r.collection_id = $3",
                )
                .await?,
            &[&run_id, &key, &collection_id],
        )
        .await?;
    row.map(|r| {
        Ok(RunDocument {
            run_state: RunState::parse(r.get(0))?,
            generation_id: r.get(1),
            document: PlannedDocument {
                key: key.to_string(),
                etag: r.get(2),
                size: r.get(3),
                new: r.get::<_, &str>(4) == "new",
            },
            state: DocumentState::parse(r.get(5))?,
            attempts: r.get(6),
        })
    })
    .transpose()
}

/// A document of the run started: a sign of life, so that a run of slow
/// documents is not taken for a stalled one.
pub async fn touch_run(client: &Client, run_id: i64) -> Result<(), StateError> {
    client
        .execute(
            &client
                .prepare_cached("UPDATE sync_runs SET updated_at = now() WHERE id = $1")
                .await?,
            &[&run_id],
        )
        .await?;
    Ok(())
}

/// Counts a failed attempt at a document's task; returns the attempts so far.
pub async fn count_document_attempt(
    client: &Client,
    run_id: i64,
    key: &str,
) -> Result<i32, StateError> {
    let row = client
        .query_one(
            "UPDATE sync_run_documents SET attempts = attempts + 1
             WHERE run_id = $1 AND object_key = $2 RETURNING attempts",
            &[&run_id, &key],
        )
        .await?;
    Ok(row.get(0))
}

/// How a run's document ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DocumentEnd {
    Indexed { chunks: i32 },
    Skipped { reason: String },
    Failed { reason: String },
}

/// Finishes a pending document of a run (a second finish changes nothing)
/// and counts as the run's sign of life.
pub async fn finish_document(
    client: &Client,
    run_id: i64,
    key: &str,
    end: &DocumentEnd,
    worker: &str,
) -> Result<(), StateError> {
    let (state, chunks, reason) = match end {
        DocumentEnd::Indexed { chunks } => (DocumentState::Indexed, *chunks, None),
        DocumentEnd::Skipped { reason } => (DocumentState::Skipped, 0, Some(reason.as_str())),
        DocumentEnd::Failed { reason } => (DocumentState::Failed, 0, Some(reason.as_str())),
    };
    client
        .execute(
            &client
                .prepare_cached(
                    "WITH done AS (
                        UPDATE sync_run_documents
                           SET state = $3, chunks = $4, reason = $5, worker = $6,
                               finished_at = now()
                         WHERE run_id = $1 AND object_key = $2 AND state = 'pending'
                         RETURNING run_id)
                     UPDATE sync_runs SET updated_at = now() WHERE id IN (SELECT run_id FROM done)",
                )
                .await?,
            &[&run_id, &key, &state.as_str(), &chunks, &reason, &worker],
        )
        .await?;
    Ok(())
}

/// Where a run stands, from its documents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunProgress {
    pub state: RunState,
    pub dispatched: bool,
    pub generation_id: Option<i64>,
    pub pending: i64,
    /// Seen and deleted from the plan; the rest from the finished documents.
    pub counts: RunCounts,
}

impl RunProgress {
    /// In progress, dispatched, and no document pending: time to close it.
    pub fn complete(&self) -> bool {
        self.state == RunState::InProgress && self.dispatched && self.pending == 0
    }
}

pub async fn run_progress(client: &Client, run_id: i64) -> Result<RunProgress, StateError> {
    let row = client
        .query_opt(
            &client
                .prepare_cached(
                    "SELECT r.state, r.dispatched_at IS NOT NULL, r.generation_id, r.seen,
                            r.deleted,
                            count(d.*) FILTER (WHERE d.state = 'pending'),
                            count(d.*) FILTER (WHERE d.state = 'indexed' AND d.change = 'new'),
                            count(d.*) FILTER (WHERE d.state = 'indexed' AND d.change = 'changed'),
                            count(d.*) FILTER (WHERE d.state = 'failed'),
                            count(d.*) FILTER (WHERE d.state = 'skipped'),
                            coalesce(sum(d.chunks), 0)::int8
                     FROM sync_runs r LEFT JOIN sync_run_documents d ON d.run_id = r.id
                     WHERE r.id = $1 GROUP BY r.id",
                )
                .await?,
            &[&run_id],
        )
        .await?
        .ok_or_else(|| StateError::NotFound {
            what: "sync run",
            id: run_id.to_string(),
        })?;
    Ok(RunProgress {
        state: RunState::parse(row.get(0))?,
        dispatched: row.get(1),
        generation_id: row.get(2),
        pending: row.get(5),
        counts: RunCounts {
            seen: row.get(3),
            deleted: row.get(4),
            new: row.get(6),
            changed: row.get(7),
            failed: row.get(8),
            skipped: row.get(9),
            chunks_written: row.get(10),
        },
    })
}
