//! The index of a collection: embedding generations, documents, chunks, and
//! search over them (vector, keyword, hybrid by reciprocal rank fusion).
//!
//! Each generation has its own HNSW index on `embedding::vector(N)`
//! restricted to its rows (built in bulk, CONCURRENTLY, when it is
//! activated; dropped, CONCURRENTLY, with the generation), so
//! generations of different dimensions live in one table; queries name the
//! generation and the dimension as literals (integers from this table) so
//! that the planner uses that index.

use deadpool_postgres::ClientWrapper as Client;
use pgvector::Vector;
use uuid::Uuid;

use super::StateError;
use crate::spec::index::Embedding;

mod search;
pub use search::{
    Hit, MAX_DEPTH, MAX_TOP_K, Mode, Query, SearchError, Tuning, refresh_keyword_stats, search,
    search_generation,
};

/// A document's state, in a generation (`documents.state`) and in a sync
/// run (`sync_run_documents.state`, where it starts `pending`); parsed where
/// rows are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DocumentState {
    Pending,
    Indexed,
    Skipped,
    Failed,
}

impl DocumentState {
    pub fn as_str(self) -> &'static str {
        match self {
            DocumentState::Pending => "pending",
            DocumentState::Indexed => "indexed",
            DocumentState::Skipped => "skipped",
            DocumentState::Failed => "failed",
        }
    }

    /// A state no migration wrote is a database this version cannot read.
    pub fn parse(s: &str) -> Result<Self, StateError> {
        Ok(match s {
            "pending" => DocumentState::Pending,
            "indexed" => DocumentState::Indexed,
            "skipped" => DocumentState::Skipped,
            "failed" => DocumentState::Failed,
            other => {
                return Err(StateError::Unknown {
                    what: "document state",
                    value: other.to_string(),
                });
            }
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    pub id: i64,
    pub collection_id: Uuid,
    pub model_key: String,
    pub dimensions: i32,
    pub state: String,
    /// What it embeds with (queries against it must use the same model).
    pub embedding: Embedding,
}

const GENERATION_COLUMNS: &str = "id, collection_id, model_key, dimensions, state, embedding";

fn generation_row(r: &tokio_postgres::Row) -> Result<Generation, StateError> {
    let embedding: serde_json::Value = r.get(5);
    Ok(Generation {
        id: r.get(0),
        collection_id: r.get(1),
        model_key: r.get(2),
        dimensions: r.get(3),
        state: r.get(4),
        embedding: serde_json::from_value(embedding)?,
    })
}

pub async fn active_generation(
    client: &Client,
    collection_id: Uuid,
) -> Result<Option<Generation>, StateError> {
    let row = client
        .query_opt(
            &format!(
                "SELECT {GENERATION_COLUMNS} FROM embedding_generations
                 WHERE collection_id = $1 AND state = 'active'"
            ),
            &[&collection_id],
        )
        .await?;
    row.as_ref().map(generation_row).transpose()
}

/// The generations a document change must reach: the active one and the
/// one being built, if any.
pub async fn live_generations(
    client: &Client,
    collection_id: Uuid,
) -> Result<Vec<Generation>, StateError> {
    client
        .query(
            &format!(
                "SELECT {GENERATION_COLUMNS} FROM embedding_generations
                 WHERE collection_id = $1 AND state <> 'retired' ORDER BY id"
            ),
            &[&collection_id],
        )
        .await?
        .iter()
        .map(generation_row)
        .collect()
}

/// The generation to write for `embedding`: the active one if it already
/// uses that model, else the one being built for it (created if missing; a
/// build for another model is dropped, with its vector index if a failed
/// activation left one).
pub async fn generation_for(
    client: &mut Client,
    collection_id: Uuid,
    embedding: &Embedding,
) -> Result<Generation, StateError> {
    let model_key = embedding.generation_key();
    let dimensions = embedding.dimensions as i32;
    let spec = serde_json::to_value(embedding)?;
    let tx = client.transaction().await?;
    // Serialises concurrent callers for this collection.
    tx.execute(
        "SELECT 1 FROM collections WHERE id = $1 FOR UPDATE",
        &[&collection_id],
    )
    .await?;
    let rows = tx
        .query(
            &format!(
                "SELECT {GENERATION_COLUMNS} FROM embedding_generations
                 WHERE collection_id = $1 AND state <> 'retired'"
            ),
            &[&collection_id],
        )
        .await?;
    let existing = rows
        .iter()
        .map(generation_row)
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(g) = existing
        .iter()
        .find(|g| g.model_key == model_key && g.dimensions == dimensions)
    {
        // The same model may have moved (endpoint, Secret): queries follow.
        if g.embedding != *embedding {
            tx.execute(
                "UPDATE embedding_generations SET embedding = $2 WHERE id = $1",
                &[&g.id, &spec],
            )
            .await?;
        }
        tx.commit().await?;
        return Ok(Generation {
            embedding: embedding.clone(),
            ..g.clone()
        });
    }
    // A build for another model is dropped, with its chunks and documents;
    // its vector index (if a failed activation left one) after the commit,
    // CONCURRENTLY.
    let mut dropped = Vec::new();
    for stale in existing.iter().filter(|g| g.state == "building") {
        let n = tx
            .execute(
                "DELETE FROM embedding_generations WHERE id = $1 AND state = 'building'",
                &[&stale.id],
            )
            .await?;
        if n > 0 {
            dropped.push(stale.id);
        }
    }
    let row = tx
        .query_one(
            &format!(
                "INSERT INTO embedding_generations (collection_id, model_key, dimensions, embedding)
                 VALUES ($1, $2, $3, $4) RETURNING {GENERATION_COLUMNS}"
            ),
            &[&collection_id, &model_key, &dimensions, &spec],
        )
        .await?;
    let g = generation_row(&row)?;
    tx.commit().await?;
    // Left, it is dropped as an orphan by the next activation or collection
    // deletion.
    if let Err(e) = drop_vector_indexes(client, &dropped).await {
        tracing::warn!(
            generations = ?dropped, error = %e,
            "cannot drop the vector index of a dropped embedding generation"
        );
    }
    Ok(g)
}

/// The name of generation `generation_id`'s vector index.
pub(crate) fn vector_index_name(generation_id: i64) -> String {
    format!("chunks_hnsw_g{generation_id}")
}

/// Why a generation could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(
        "embedding generation {0} does not exist (its collection was deleted, or a newer \
         generation replaced it)"
    )]
    Gone(i64),
    #[error("embedding generation {0} was replaced by a newer one; it cannot be activated")]
    Retired(i64),
    #[error("building vector index {index} of embedding generation {generation}: {source}")]
    Build {
        generation: i64,
        index: String,
        #[source]
        source: StateError,
    },
    #[error(
        "dropping the INVALID vector index {index} of embedding generation {generation} (left \
         by a build that failed or was interrupted) to build it again: {source}"
    )]
    DropInvalid {
        generation: i64,
        index: String,
        #[source]
        source: StateError,
    },
    #[error(
        "vector index {index} of embedding generation {generation} is still not valid after \
         {attempts} attempts (another session keeps dropping or rebuilding it)"
    )]
    NotBuilt {
        generation: i64,
        index: String,
        attempts: u32,
    },
}

impl From<tokio_postgres::Error> for ActivateError {
    fn from(e: tokio_postgres::Error) -> Self {
        ActivateError::State(e.into())
    }
}

/// Builds, drops or waits for a vector index at most this many times in one
/// activation before giving up.
const INDEX_ATTEMPTS: u32 = 4;
/// How often a wait for another session's index build looks again.
const DDL_POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// A claim on [`claim_index_ddl`] whose backend has been idle this long is
/// stale (its holder's task was dropped mid-way) and may be taken over.
const STALE_CLAIM: &str = "1 minute";

/// Claims the right to run vector-index DDL on `chunks` (CREATE / DROP
/// INDEX CONCURRENTLY) for this session, waiting — by polling, never inside
/// PostgreSQL — while another session holds it. Two such statements on one
/// table must not overlap: the second would wait for the table's lock while
/// holding a snapshot, the first's last phase waits for every older
/// snapshot, and PostgreSQL aborts one of them as a deadlock (a build of
/// minutes lost). A claim whose backend is gone, or idle for a minute, is
/// taken over; the same session may claim again. [`release_index_ddl`]
/// ends it.
async fn claim_index_ddl(client: &Client, what: &str) -> Result<(), StateError> {
    let mut logged = false;
    loop {
        let claimed = client
            .query_opt(
                &format!(
                    "UPDATE vector_index_ddl m SET holder = pg_backend_pid(), what = $1, since = now()
                     WHERE m.holder IS NULL OR m.holder = pg_backend_pid()
                        OR NOT EXISTS (
                            SELECT 1 FROM pg_stat_activity a
                            WHERE a.pid = m.holder
                              AND coalesce(a.state <> 'idle'
                                           OR a.state_change > now() - interval '{STALE_CLAIM}',
                                           true))
                     RETURNING true"
                ),
                &[&what],
            )
            .await?;
        if claimed.is_some() {
            return Ok(());
        }
        if !logged {
            logged = true;
            let holder = client
                .query_opt(
                    "SELECT holder, what, extract(epoch FROM now() - since)::float8
                     FROM vector_index_ddl",
                    &[],
                )
                .await?;
            if let Some(h) = holder {
                tracing::info!(
                    waiting_for = what,
                    holder = h.get::<_, Option<i32>>(0),
                    holder_runs = h.get::<_, Option<String>>(1),
                    holder_seconds = h.get::<_, Option<f64>>(2),
                    "another session runs vector index DDL on chunks; waiting for its turn"
                );
            }
        }
        tokio::time::sleep(DDL_POLL).await;
    }
}

async fn release_index_ddl(client: &Client) -> Result<(), StateError> {
    client
        .execute(
            "UPDATE vector_index_ddl SET holder = NULL, what = NULL, since = NULL
             WHERE holder = pg_backend_pid()",
            &[],
        )
        .await?;
    Ok(())
}

/// Releases the claim after `result`, keeping the first error. A release
/// that fails leaves a claim that goes stale with its session.
async fn released<T, E: From<StateError>>(client: &Client, result: Result<T, E>) -> Result<T, E> {
    match (result, release_index_ddl(client).await) {
        (Ok(v), Ok(())) => Ok(v),
        (Ok(_), Err(e)) => Err(e.into()),
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(release)) => {
            tracing::warn!(error = %release, "cannot release the vector index DDL claim");
            Err(e)
        }
    }
}

/// Where a generation's vector index stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IndexState {
    Missing,
    Valid,
    /// Not valid (yet): being built CONCURRENTLY by backend `builder`, or —
    /// no builder — left behind by a concurrent build that failed or was
    /// interrupted. PostgreSQL keeps such an index up to date on every write
    /// to `chunks` but never reads it.
    Invalid {
        oid: i64,
        builder: Option<i32>,
    },
}

async fn vector_index_state(client: &Client, generation_id: i64) -> Result<IndexState, StateError> {
    let row = client
        .query_opt(
            "SELECT i.indisvalid, i.indexrelid::int8,
                    (SELECT p.pid FROM pg_stat_progress_create_index p
                      WHERE p.index_relid = i.indexrelid AND p.pid <> pg_backend_pid() LIMIT 1)
             FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
             WHERE i.indrelid = 'chunks'::regclass AND c.relname = $1",
            &[&vector_index_name(generation_id)],
        )
        .await?;
    Ok(match row {
        None => IndexState::Missing,
        Some(r) if r.get::<_, bool>(0) => IndexState::Valid,
        Some(r) => IndexState::Invalid {
            oid: r.get(1),
            builder: r.get(2),
        },
    })
}

/// Waits until backend `pid` no longer builds index `oid`.
async fn wait_for_build(client: &Client, oid: i64, pid: i32) -> Result<(), StateError> {
    loop {
        let building: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_progress_create_index
                                WHERE pid = $1 AND index_relid::int8 = $2)",
                &[&pid, &oid],
            )
            .await?
            .get(0);
        if !building {
            return Ok(());
        }
        tokio::time::sleep(DDL_POLL).await;
    }
}

/// The generation's HNSW index (cosine) on `embedding::vector(N)`, limited
/// to its rows, built CONCURRENTLY: writes to `chunks` — every
/// collection's — go on while it builds (a plain CREATE INDEX would hold
/// them all until it is done). Built when the generation is activated, once
/// its rows are in: one bulk build is much faster than growing the graph
/// row by row. Cannot run inside a transaction block.
async fn build_vector_index(client: &Client, g: &Generation) -> Result<(), StateError> {
    client
        .batch_execute(&format!(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON chunks
             USING hnsw ((embedding::vector({dims})) vector_cosine_ops) WHERE generation_id = {id}",
            name = vector_index_name(g.id),
            dims = g.dimensions,
            id = g.id
        ))
        .await?;
    Ok(())
}

/// Drops generation `generation_id`'s vector index, if it has one,
/// CONCURRENTLY (a plain DROP INDEX would lock `chunks` against every read
/// and write). Cannot run inside a transaction block; the caller holds the
/// DDL claim.
async fn drop_vector_index(client: &Client, generation_id: i64) -> Result<(), StateError> {
    client
        .batch_execute(&format!(
            "DROP INDEX CONCURRENTLY IF EXISTS {}",
            vector_index_name(generation_id)
        ))
        .await?;
    Ok(())
}

/// Drops the vector indexes of generations `generation_ids` that have one
/// (CONCURRENTLY, under the DDL claim: it may wait for another collection's
/// index build to end).
pub(crate) async fn drop_vector_indexes(
    client: &Client,
    generation_ids: &[i64],
) -> Result<(), StateError> {
    if generation_ids.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = generation_ids
        .iter()
        .map(|&id| vector_index_name(id))
        .collect();
    let existing: Vec<i64> = client
        .query(
            "SELECT substring(c.relname FROM '^chunks_hnsw_g([0-9]{1,18})$')::int8
             FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
             WHERE i.indrelid = 'chunks'::regclass AND c.relname = ANY($1::text[])",
            &[&names],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if existing.is_empty() {
        return Ok(());
    }
    claim_index_ddl(client, "drop vector indexes").await?;
    let result = async {
        for &id in &existing {
            drop_vector_index(client, id).await?;
        }
        Ok(())
    }
    .await;
    released(client, result).await
}

/// Drops every generation vector index whose generation no longer exists
/// (left by an interrupted removal, or by a version that did not drop them
/// with their collection).
pub(crate) async fn drop_orphan_vector_indexes(client: &Client) -> Result<(), StateError> {
    let orphans: Vec<i64> = client
        .query(
            "SELECT x.g FROM (
                 SELECT substring(c.relname FROM '^chunks_hnsw_g([0-9]{1,18})$')::int8 AS g
                 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                 WHERE i.indrelid = 'chunks'::regclass) x
             WHERE x.g IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM embedding_generations e WHERE e.id = x.g)",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !orphans.is_empty() {
        tracing::info!(
            generations = ?orphans,
            "dropping the vector indexes of generations that no longer exist"
        );
    }
    drop_vector_indexes(client, &orphans).await
}

/// Makes sure generation `g` has a valid vector index: waits for a build
/// another session runs, drops an INVALID one that a failed or interrupted
/// build left, and builds it (CONCURRENTLY, IF NOT EXISTS).
async fn ensure_vector_index(client: &Client, g: &Generation) -> Result<(), ActivateError> {
    if vector_index_state(client, g.id).await? == IndexState::Valid {
        return Ok(());
    }
    claim_index_ddl(client, &format!("build {}", vector_index_name(g.id))).await?;
    let result = build_under_claim(client, g).await;
    released(client, result).await
}

async fn build_under_claim(client: &Client, g: &Generation) -> Result<(), ActivateError> {
    let index = vector_index_name(g.id);
    let mut attempts = 0;
    loop {
        let state = vector_index_state(client, g.id).await?;
        if state == IndexState::Valid {
            return Ok(());
        }
        if attempts == INDEX_ATTEMPTS {
            return Err(ActivateError::NotBuilt {
                generation: g.id,
                index,
                attempts,
            });
        }
        attempts += 1;
        match state {
            IndexState::Valid => return Ok(()),
            IndexState::Invalid {
                oid,
                builder: Some(pid),
            } => {
                tracing::info!(%index, pid, "waiting for another session's build of the vector index");
                wait_for_build(client, oid, pid).await?;
            }
            IndexState::Invalid { builder: None, .. } => {
                tracing::warn!(%index, "dropping an INVALID vector index left by a failed or interrupted build, to build it again");
                drop_vector_index(client, g.id).await.map_err(|source| {
                    ActivateError::DropInvalid {
                        generation: g.id,
                        index: index.clone(),
                        source,
                    }
                })?;
            }
            IndexState::Missing => {
                let Err(source) = build_vector_index(client, g).await else {
                    continue;
                };
                // A failed concurrent build leaves its index behind,
                // INVALID — unless another session's build took the name
                // meanwhile, which is then ours too.
                match vector_index_state(client, g.id).await {
                    Ok(
                        IndexState::Valid
                        | IndexState::Invalid {
                            builder: Some(_), ..
                        },
                    ) => {
                        continue;
                    }
                    Ok(IndexState::Invalid { builder: None, .. }) => {
                        // Every write to the generation would keep it up to
                        // date for nothing: drop it now (the next activation
                        // would anyway).
                        if let Err(e) = drop_vector_index(client, g.id).await {
                            tracing::warn!(%index, error = %e, "cannot drop the INVALID vector index a failed build left; the next activation drops it");
                        }
                    }
                    Ok(IndexState::Missing) => {}
                    Err(e) => {
                        tracing::warn!(%index, error = %e, "cannot look at the vector index after a failed build");
                    }
                }
                return Err(ActivateError::Build {
                    generation: g.id,
                    index,
                    source,
                });
            }
        }
    }
}

/// The switch, in one transaction: `g` becomes active and the generation it
/// replaces retires — only while `g`'s vector index is valid. `false` if the
/// index is not (it went missing since it was built).
async fn switch_to(client: &mut Client, g: &Generation) -> Result<bool, ActivateError> {
    let tx = client.transaction().await?;
    let state: Option<String> = tx
        .query_opt(
            "SELECT state FROM embedding_generations WHERE id = $1 FOR UPDATE",
            &[&g.id],
        )
        .await?
        .map(|r| r.get(0));
    match state.as_deref() {
        None => return Err(ActivateError::Gone(g.id)),
        Some("retired") => return Err(ActivateError::Retired(g.id)),
        Some(_) => {}
    }
    let valid: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                            WHERE i.indrelid = 'chunks'::regclass AND c.relname = $1
                              AND i.indisvalid)",
            &[&vector_index_name(g.id)],
        )
        .await?
        .get(0);
    if !valid {
        return Ok(false);
    }
    tx.execute(
        "UPDATE embedding_generations SET state = 'retired'
         WHERE collection_id = $1 AND state = 'active' AND id <> $2",
        &[&g.collection_id, &g.id],
    )
    .await?;
    tx.execute(
        "UPDATE embedding_generations SET state = 'active', activated_at = now()
         WHERE id = $1 AND state = 'building'",
        &[&g.id],
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// Removes the collection's retired generations — the one an activation
/// just replaced, and any that an interrupted activation left — with their
/// chunks and documents (one statement), then their vector indexes, and any
/// index whose generation is gone.
async fn remove_retired(client: &Client, collection_id: Uuid) -> Result<(), StateError> {
    let retired: Vec<i64> = client
        .query(
            "DELETE FROM embedding_generations WHERE collection_id = $1 AND state = 'retired'
             RETURNING id",
            &[&collection_id],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    drop_vector_indexes(client, &retired).await?;
    drop_orphan_vector_indexes(client).await
}

/// Makes `generation_id` the one search answers from — its vector index
/// built first (CONCURRENTLY: other collections keep writing), then the
/// switch in one transaction, only once the index is valid — and removes
/// the generations it replaces, with their indexes. Idempotent: an active
/// generation stays active (its index is rebuilt if it is not valid), and
/// two sessions activating the same generation both succeed with one
/// index. Search never sees a generation without its index: a generation
/// becomes active only after its index is valid.
pub async fn activate(client: &mut Client, generation_id: i64) -> Result<(), ActivateError> {
    let g = generation(client, generation_id)
        .await?
        .ok_or(ActivateError::Gone(generation_id))?;
    if g.state == "retired" {
        return Err(ActivateError::Retired(g.id));
    }
    let mut attempts = 0;
    loop {
        ensure_vector_index(client, &g).await?;
        attempts += 1;
        if switch_to(client, &g).await? {
            break;
        }
        if attempts == INDEX_ATTEMPTS {
            return Err(ActivateError::NotBuilt {
                generation: g.id,
                index: vector_index_name(g.id),
                attempts,
            });
        }
    }
    // Its keyword statistics, counted once its rows are all in.
    if let Err(e) = refresh_keyword_stats(client, g.id).await {
        tracing::warn!(
            generation = g.id, error = %e,
            "cannot count the new generation's keyword statistics; the next sync run does"
        );
    }
    // The generation is active: failing to remove what it replaced does not
    // undo that. What stays is removed by the next activation or the
    // collection's deletion.
    if let Err(e) = remove_retired(client, g.collection_id).await {
        tracing::warn!(
            generation = g.id, collection = %g.collection_id, error = %e,
            "cannot remove the embedding generations the new one replaced; the next activation \
             or the collection's deletion removes them"
        );
    }
    Ok(())
}

/// One chunk to store.
#[derive(Clone, Debug, PartialEq)]
pub struct NewChunk {
    pub content: String,
    pub byte_start: i32,
    pub byte_end: i32,
    pub char_start: i32,
    pub char_end: i32,
    pub heading_path: Vec<String>,
    pub embedding: Vec<f32>,
}

/// The source object a document was indexed from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub object_key: String,
    pub etag: Option<String>,
    pub sha256_hex: Option<String>,
    pub content_type: Option<String>,
    pub size_bytes: Option<i64>,
}

/// Replaces a document's chunks in one transaction: the new chunks are
/// written, then the old ones deleted, then it commits — a search sees the
/// old set or the new one, never neither nor both.
pub async fn write_document(
    client: &mut Client,
    generation_id: i64,
    source: &Source,
    chunks: &[NewChunk],
) -> Result<(), StateError> {
    write_titled_document(client, generation_id, source, None, chunks).await
}

/// [`write_document`] with the title the document gives itself, kept on
/// the document and on each of its chunks (`''` without one).
pub async fn write_titled_document(
    client: &mut Client,
    generation_id: i64,
    source: &Source,
    title: Option<&str>,
    chunks: &[NewChunk],
) -> Result<(), StateError> {
    let tx = client.transaction().await?;
    let old: Vec<i64> = tx
        .query(
            "SELECT id FROM chunks WHERE generation_id = $1 AND object_key = $2",
            &[&generation_id, &source.object_key],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let insert = tx
        .prepare(
            "INSERT INTO chunks (generation_id, object_key, ordinal, content, content_type,
                 byte_start, byte_end, char_start, char_end, heading_path, embedding, title)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .await?;
    for (i, c) in chunks.iter().enumerate() {
        tx.execute(
            &insert,
            &[
                &generation_id,
                &source.object_key,
                &(i as i32),
                &c.content,
                &source.content_type,
                &c.byte_start,
                &c.byte_end,
                &c.char_start,
                &c.char_end,
                &c.heading_path,
                &Vector::from(c.embedding.clone()),
                &title.unwrap_or_default(),
            ],
        )
        .await?;
    }
    tx.execute("DELETE FROM chunks WHERE id = ANY($1)", &[&old])
        .await?;
    upsert_document(
        &tx,
        generation_id,
        source,
        DocumentState::Indexed,
        None,
        chunks.len() as i32,
        title,
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Records a document that was skipped or failed, with the reason; its
/// chunks from an earlier version go (they no longer match the object).
pub async fn record_unindexed(
    client: &mut Client,
    generation_id: i64,
    source: &Source,
    state: DocumentState,
    reason: &str,
) -> Result<(), StateError> {
    let tx = client.transaction().await?;
    tx.execute(
        "DELETE FROM chunks WHERE generation_id = $1 AND object_key = $2",
        &[&generation_id, &source.object_key],
    )
    .await?;
    upsert_document(&tx, generation_id, source, state, Some(reason), 0, None).await?;
    tx.commit().await?;
    Ok(())
}

async fn upsert_document(
    tx: &tokio_postgres::Transaction<'_>,
    generation_id: i64,
    s: &Source,
    state: DocumentState,
    reason: Option<&str>,
    chunks: i32,
    title: Option<&str>,
) -> Result<(), StateError> {
    tx.execute(
        "INSERT INTO documents (generation_id, object_key, etag, sha256_hex, content_type,
             size_bytes, state, reason, chunks, title)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         ON CONFLICT (generation_id, object_key) DO UPDATE SET etag = excluded.etag,
             sha256_hex = excluded.sha256_hex, content_type = excluded.content_type,
             size_bytes = excluded.size_bytes, state = excluded.state, reason = excluded.reason,
             chunks = excluded.chunks, title = excluded.title, indexed_at = now()",
        &[
            &generation_id,
            &s.object_key,
            &s.etag,
            &s.sha256_hex,
            &s.content_type,
            &s.size_bytes,
            &state.as_str(),
            &reason,
            &chunks,
            &title,
        ],
    )
    .await?;
    Ok(())
}

/// Removes a document (its object is gone) and its chunks.
pub async fn delete_document(
    client: &mut Client,
    generation_id: i64,
    object_key: &str,
) -> Result<(), StateError> {
    let tx = client.transaction().await?;
    tx.execute(
        "DELETE FROM chunks WHERE generation_id = $1 AND object_key = $2",
        &[&generation_id, &object_key],
    )
    .await?;
    tx.execute(
        "DELETE FROM documents WHERE generation_id = $1 AND object_key = $2",
        &[&generation_id, &object_key],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// What a generation holds for each key: the planner's view of the index.
pub async fn documents(
    client: &Client,
    generation_id: i64,
) -> Result<std::collections::HashMap<String, IndexedDocument>, StateError> {
    let rows = client
        .query(
            &format!(
                "SELECT object_key, {DOCUMENT_COLUMNS} FROM documents WHERE generation_id = $1"
            ),
            &[&generation_id],
        )
        .await?;
    rows.iter()
        .map(|r| Ok((r.get(0), indexed_document(r, 1)?)))
        .collect()
}

/// What a generation holds for one object key, if it has the document.
pub async fn document(
    client: &Client,
    generation_id: i64,
    object_key: &str,
) -> Result<Option<IndexedDocument>, StateError> {
    client
        .query_opt(
            &format!(
                "SELECT {DOCUMENT_COLUMNS} FROM documents WHERE generation_id = $1 AND object_key = $2"
            ),
            &[&generation_id, &object_key],
        )
        .await?
        .map(|r| indexed_document(&r, 0))
        .transpose()
}

const DOCUMENT_COLUMNS: &str = "etag, sha256_hex, content_type, state";

fn indexed_document(r: &tokio_postgres::Row, first: usize) -> Result<IndexedDocument, StateError> {
    Ok(IndexedDocument {
        etag: r.get(first),
        sha256_hex: r.get(first + 1),
        content_type: r.get(first + 2),
        state: DocumentState::parse(r.get(first + 3))?,
    })
}

/// What a generation holds for one object key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexedDocument {
    pub etag: Option<String>,
    pub sha256_hex: Option<String>,
    /// The object's content type when it was indexed.
    pub content_type: Option<String>,
    /// How its last indexing ended: indexed (chunks stored), skipped or
    /// failed (recorded with the reason).
    pub state: DocumentState,
}

/// A document whose object was written again with the same content: its
/// recorded ETag becomes the new one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retag {
    pub object_key: String,
    /// The content the document was indexed from, and the object has.
    pub sha256_hex: String,
    pub etag: String,
}

/// Records the new ETags of documents whose content is unchanged, leaving
/// their chunks alone, in one transaction. A document that changed
/// meanwhile (another content hash) or failed is left as it is. Returns how
/// many were updated.
pub async fn retag_documents(
    client: &mut Client,
    generation_id: i64,
    retags: &[Retag],
) -> Result<u64, StateError> {
    if retags.is_empty() {
        return Ok(0);
    }
    let tx = client.transaction().await?;
    // One row at a time, each found by the primary key whatever the
    // table's statistics.
    let update = tx
        .prepare(
            "UPDATE documents SET etag = $3
             WHERE generation_id = $1 AND object_key = $2 AND sha256_hex = $4
               AND state <> 'failed'",
        )
        .await?;
    let mut updated = 0;
    for r in retags {
        updated += tx
            .execute(
                &update,
                &[&generation_id, &r.object_key, &r.etag, &r.sha256_hex],
            )
            .await?;
    }
    tx.commit().await?;
    Ok(updated)
}

/// Stowage's own records (the `objects` history) of writing the current
/// objects at `keys` in `bucket`, kept only where the job that wrote one
/// wrote to the store named by `endpoint_label` (the history is keyed by
/// bucket and key alone) and recorded the ETag it got: key → (ETag, SHA-256).
pub async fn recorded_contents(
    client: &Client,
    endpoint_label: &str,
    bucket: &str,
    keys: &[&str],
) -> Result<std::collections::HashMap<String, (String, String)>, StateError> {
    let mut found = std::collections::HashMap::new();
    if keys.is_empty() {
        return Ok(found);
    }
    // One key at a time: each found through `objects_one_current` on both
    // columns (a list of keys would leave them to a filter over the bucket).
    let select = client
        .prepare_cached(
            "SELECT o.etag, o.sha256_hex, j.spec -> 'destination'
             FROM objects o JOIN upload_jobs j ON j.id = o.job_id
             WHERE o.bucket = $1 AND o.object_key = $2 AND o.current AND o.etag IS NOT NULL",
        )
        .await?;
    for key in keys {
        let Some(row) = client.query_opt(&select, &[&bucket, key]).await? else {
            continue;
        };
        let same_store = row
            .get::<_, Option<serde_json::Value>>(2)
            .and_then(|d| serde_json::from_value::<crate::spec::Endpoint>(d).ok())
            .is_some_and(|e| e.label() == endpoint_label);
        if same_store {
            found.insert(key.to_string(), (row.get(0), row.get(1)));
        }
    }
    Ok(found)
}

/// One generation by id; `None` once it is gone (replaced, or its
/// collection deleted).
pub async fn generation(client: &Client, id: i64) -> Result<Option<Generation>, StateError> {
    let row = client
        .query_opt(
            &format!("SELECT {GENERATION_COLUMNS} FROM embedding_generations WHERE id = $1"),
            &[&id],
        )
        .await?;
    row.as_ref().map(generation_row).transpose()
}

/// Documents by state and chunks in a collection's active generation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexCounts {
    pub generation: Option<i64>,
    pub indexed: i64,
    pub skipped: i64,
    pub failed: i64,
    pub chunks: i64,
    /// What the generation occupies in PostgreSQL: its chunk rows (text,
    /// vector, tsvector, headings; as of the last statistics refresh, see
    /// [`refresh_keyword_stats`]) and its HNSW index. Its share of the shared
    /// keyword (GIN) index is not counted.
    pub bytes: i64,
}

pub async fn counts(client: &Client, collection_id: Uuid) -> Result<IndexCounts, StateError> {
    let Some(g) = active_generation(client, collection_id).await? else {
        return Ok(IndexCounts::default());
    };
    let r = client
        .query_one(
            "SELECT count(*) FILTER (WHERE state = 'indexed'),
                    count(*) FILTER (WHERE state = 'skipped'),
                    count(*) FILTER (WHERE state = 'failed'),
                    coalesce(sum(chunks), 0)::bigint,
                    coalesce((SELECT stored_bytes FROM keyword_stats WHERE generation_id = $1), 0)
                    + coalesce(pg_relation_size(to_regclass($2)), 0)
             FROM documents WHERE generation_id = $1",
            &[&g.id, &vector_index_name(g.id)],
        )
        .await?;
    Ok(IndexCounts {
        generation: Some(g.id),
        indexed: r.get(0),
        skipped: r.get(1),
        failed: r.get(2),
        chunks: r.get(3),
        bytes: r.get(4),
    })
}
