//! The index of a collection: embedding generations, documents, chunks, and
//! search over them (vector, keyword, hybrid by reciprocal rank fusion).
//!
//! Each generation has its own HNSW index on `embedding::vector(N)`
//! restricted to its rows (built in bulk when it is activated), so
//! generations of different dimensions live in one table; queries name the
//! generation and the dimension as literals (integers from this table) so
//! that the planner uses that index.

use deadpool_postgres::ClientWrapper as Client;
use pgvector::Vector;
use uuid::Uuid;

use super::StateError;
use crate::spec::index::Embedding;

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
/// uses that model, else the one being built for it (created, with its
/// vector index, if missing; a build for another model is dropped).
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
    for stale in existing.iter().filter(|g| g.state == "building") {
        drop_generation(&tx, stale.id).await?;
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
    Ok(g)
}

/// The generation's HNSW index (cosine) on `embedding::vector(N)`, limited
/// to its rows. Built when the generation is activated, once its rows are
/// in: one bulk build is much faster than growing the graph row by row.
async fn create_vector_index(client: &Client, g: &Generation) -> Result<(), StateError> {
    client
        .batch_execute(&format!(
            "CREATE INDEX IF NOT EXISTS chunks_hnsw_g{id} ON chunks
             USING hnsw ((embedding::vector({dims})) vector_cosine_ops) WHERE generation_id = {id}",
            id = g.id,
            dims = g.dimensions
        ))
        .await?;
    Ok(())
}

async fn drop_generation(tx: &tokio_postgres::Transaction<'_>, id: i64) -> Result<(), StateError> {
    tx.batch_execute(&format!(
        "DROP INDEX IF EXISTS chunks_hnsw_g{id};
         DELETE FROM chunks WHERE generation_id = {id};
         DELETE FROM embedding_generations WHERE id = {id};"
    ))
    .await?;
    Ok(())
}

/// Makes `generation_id` the one search answers from — its vector index
/// built first, then the switch in one transaction — and removes the
/// generation it replaces.
pub async fn activate(client: &mut Client, generation_id: i64) -> Result<(), StateError> {
    let g = client
        .query_one(
            &format!("SELECT {GENERATION_COLUMNS} FROM embedding_generations WHERE id = $1"),
            &[&generation_id],
        )
        .await?;
    create_vector_index(client, &generation_row(&g)?).await?;
    let tx = client.transaction().await?;
    let old: Vec<i64> = tx
        .query(
            "UPDATE embedding_generations SET state = 'retired'
             WHERE state = 'active' AND id <> $1 AND collection_id =
                   (SELECT collection_id FROM embedding_generations WHERE id = $1)
             RETURNING id",
            &[&generation_id],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    tx.execute(
        "UPDATE embedding_generations SET state = 'active', activated_at = now() WHERE id = $1",
        &[&generation_id],
    )
    .await?;
    tx.commit().await?;
    let tx = client.transaction().await?;
    for id in old {
        drop_generation(&tx, id).await?;
    }
    tx.commit().await?;
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
                 byte_start, byte_end, char_start, char_end, heading_path, embedding)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
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
        "indexed",
        None,
        chunks.len() as i32,
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
    state: &str,
    reason: &str,
) -> Result<(), StateError> {
    let tx = client.transaction().await?;
    tx.execute(
        "DELETE FROM chunks WHERE generation_id = $1 AND object_key = $2",
        &[&generation_id, &source.object_key],
    )
    .await?;
    upsert_document(&tx, generation_id, source, state, Some(reason), 0).await?;
    tx.commit().await?;
    Ok(())
}

async fn upsert_document(
    tx: &tokio_postgres::Transaction<'_>,
    generation_id: i64,
    s: &Source,
    state: &str,
    reason: Option<&str>,
    chunks: i32,
) -> Result<(), StateError> {
    tx.execute(
        "INSERT INTO documents (generation_id, object_key, etag, sha256_hex, content_type,
             size_bytes, state, reason, chunks)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
         ON CONFLICT (generation_id, object_key) DO UPDATE SET etag = excluded.etag,
             sha256_hex = excluded.sha256_hex, content_type = excluded.content_type,
             size_bytes = excluded.size_bytes, state = excluded.state, reason = excluded.reason,
             chunks = excluded.chunks, indexed_at = now()",
        &[
            &generation_id,
            &s.object_key,
            &s.etag,
            &s.sha256_hex,
            &s.content_type,
            &s.size_bytes,
            &state,
            &reason,
            &chunks,
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Vector,
    Keyword,
    Hybrid,
}

pub struct Query<'a> {
    pub mode: Mode,
    /// The query's embedding (vector and hybrid modes).
    pub vector: Option<&'a [f32]>,
    /// The query's words (keyword and hybrid modes), web-search syntax.
    pub text: &'a str,
    pub top_k: i64,
    pub key_prefix: Option<&'a str>,
    pub content_type: Option<&'a str>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Hit {
    pub object_key: String,
    pub content: String,
    pub content_type: Option<String>,
    pub byte_start: i32,
    pub byte_end: i32,
    pub char_start: i32,
    pub char_end: i32,
    pub heading_path: Vec<String>,
    /// RRF score in hybrid mode, cosine similarity in vector mode, ts_rank_cd
    /// in keyword mode.
    pub score: f64,
    pub vector_rank: Option<i64>,
    pub keyword_rank: Option<i64>,
}

/// Candidates taken from each side before fusion.
const CANDIDATES: i64 = 40;
/// The RRF constant: score = Σ 1 / (K + rank).
const RRF_K: f64 = 60.0;

#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error("{0}")]
    State(#[from] StateError),
    #[error("the collection has no complete index yet")]
    NoIndex,
    #[error("the query vector has {got} dimensions, the index {want}")]
    Dimensions { got: usize, want: i32 },
    #[error("{0} search needs a query vector")]
    NoVector(&'static str),
}

impl From<tokio_postgres::Error> for SearchError {
    fn from(e: tokio_postgres::Error) -> Self {
        SearchError::State(e.into())
    }
}

/// Searches the active generation of a collection.
pub async fn search(
    client: &Client,
    collection_id: Uuid,
    q: &Query<'_>,
) -> Result<Vec<Hit>, SearchError> {
    let g = active_generation(client, collection_id)
        .await?
        .ok_or(SearchError::NoIndex)?;
    search_generation(client, &g, q).await
}

/// Searches one generation (the query vector must come from its model).
/// One statement: it sees the generation whole, or — if the generation was
/// replaced and dropped meanwhile — not at all; callers that embedded the
/// query for `g` check that `g` is still active and else ask again.
pub async fn search_generation(
    client: &Client,
    g: &Generation,
    q: &Query<'_>,
) -> Result<Vec<Hit>, SearchError> {
    let vector = match (q.mode, q.vector) {
        (Mode::Keyword, _) => None,
        (_, Some(v)) if v.len() != g.dimensions as usize => {
            return Err(SearchError::Dimensions {
                got: v.len(),
                want: g.dimensions,
            });
        }
        (_, Some(v)) => Some(Vector::from(v.to_vec())),
        (Mode::Vector, None) => return Err(SearchError::NoVector("vector")),
        (Mode::Hybrid, None) => return Err(SearchError::NoVector("hybrid")),
    };
    // $1 vector, $2 text, $3 key prefix, $4 content type, $5 top k.
    let filter = format!(
        "generation_id = {} AND ($3::text IS NULL OR starts_with(object_key, $3))
         AND ($4::text IS NULL OR content_type = $4)",
        g.id
    );
    let distance = format!(
        "(embedding::vector({d}) <=> $1::vector({d}))",
        d = g.dimensions
    );
    let vector_side = format!(
        "SELECT id, row_number() OVER (ORDER BY {distance}) AS rank, 1 - {distance} AS similarity
         FROM chunks WHERE {filter} ORDER BY {distance} LIMIT {CANDIDATES}"
    );
    let keyword_side = format!(
        "SELECT id, row_number() OVER (ORDER BY ts_rank_cd(tsv, q) DESC, id) AS rank,
                ts_rank_cd(tsv, q) AS relevance
         FROM chunks, websearch_to_tsquery('english', $2) q
         WHERE {filter} AND tsv @@ q ORDER BY relevance DESC, id LIMIT {CANDIDATES}"
    );
    let ranked = match q.mode {
        Mode::Vector => format!(
            "SELECT id, similarity::float8 AS score, rank AS vrank, NULL::bigint AS krank FROM ({vector_side}) v"
        ),
        Mode::Keyword => format!(
            "SELECT id, relevance::float8 AS score, NULL::bigint AS vrank, rank AS krank FROM ({keyword_side}) k"
        ),
        Mode::Hybrid => format!(
            "SELECT coalesce(v.id, k.id) AS id,
                    coalesce(1.0 / ({RRF_K} + v.rank), 0) + coalesce(1.0 / ({RRF_K} + k.rank), 0) AS score,
                    v.rank AS vrank, k.rank AS krank
             FROM ({vector_side}) v FULL OUTER JOIN ({keyword_side}) k ON v.id = k.id"
        ),
    };
    // A mode that does not use $1 or $2 still names their types.
    let unused = match q.mode {
        Mode::Vector => "($2::text IS NULL OR TRUE)".to_string(),
        Mode::Keyword => format!("($1::vector({}) IS NULL OR TRUE)", g.dimensions),
        Mode::Hybrid => "TRUE".to_string(),
    };
    let sql = format!(
        "SELECT c.object_key, c.content, c.content_type, c.byte_start, c.byte_end, c.char_start,
                c.char_end, c.heading_path, r.score::float8, r.vrank, r.krank
         FROM ({ranked}) r JOIN chunks c ON c.id = r.id
         WHERE {unused}
         ORDER BY r.score DESC, c.id LIMIT $5"
    );
    let rows = client
        .query(
            &sql,
            &[&vector, &q.text, &q.key_prefix, &q.content_type, &q.top_k],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Hit {
            object_key: r.get(0),
            content: r.get(1),
            content_type: r.get(2),
            byte_start: r.get(3),
            byte_end: r.get(4),
            char_start: r.get(5),
            char_end: r.get(6),
            heading_path: r.get(7),
            score: r.get(8),
            vector_rank: r.get(9),
            keyword_rank: r.get(10),
        })
        .collect())
}

/// What a generation holds for each key: the planner's view of the index.
pub async fn documents(
    client: &Client,
    generation_id: i64,
) -> Result<std::collections::HashMap<String, IndexedDocument>, StateError> {
    let rows = client
        .query(
            "SELECT object_key, etag, sha256_hex, state FROM documents WHERE generation_id = $1",
            &[&generation_id],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                IndexedDocument {
                    etag: r.get(1),
                    sha256_hex: r.get(2),
                    failed: r.get::<_, &str>(3) == "failed",
                },
            )
        })
        .collect())
}

/// What a generation holds for one object key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IndexedDocument {
    pub etag: Option<String>,
    pub sha256_hex: Option<String>,
    /// Its last indexing failed (recorded with the reason).
    pub failed: bool,
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

/// The ETag a generation holds for `object_key`, if it has the document.
pub async fn document_etag(
    client: &Client,
    generation_id: i64,
    object_key: &str,
) -> Result<Option<String>, StateError> {
    Ok(client
        .query_opt(
            "SELECT etag FROM documents WHERE generation_id = $1 AND object_key = $2",
            &[&generation_id, &object_key],
        )
        .await?
        .and_then(|r| r.get(0)))
}

/// Documents by state and chunks in a collection's active generation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexCounts {
    pub generation: Option<i64>,
    pub indexed: i64,
    pub skipped: i64,
    pub failed: i64,
    pub chunks: i64,
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
                    coalesce(sum(chunks), 0)::bigint
             FROM documents WHERE generation_id = $1",
            &[&g.id],
        )
        .await?;
    Ok(IndexCounts {
        generation: Some(g.id),
        indexed: r.get(0),
        skipped: r.get(1),
        failed: r.get(2),
        chunks: r.get(3),
    })
}
