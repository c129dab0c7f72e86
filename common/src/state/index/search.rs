//! Search over one embedding generation: vector (HNSW), keyword (IDF-ranked
//! full text, BM25's shape) and hybrid (weighted reciprocal rank fusion),
//! with filters and a per-document cap, in one statement per query.
//!
//! # The keyword side: ranked in PostgreSQL from per-generation statistics
//!
//! What it ranks: each chunk's `tsv` (migration V14), the document's title at
//! weight A, the chunk's heading path at weight B and its text (D), stemmed
//! by the `english` configuration. A query is never parsed as a query
//! language: its text goes through `to_tsvector` like a document, so `-O`,
//! `or`, quotes, parentheses and any other NUL-free string are words (or
//! nothing), never operators. Its lexemes are OR-ed and each candidate chunk
//! scored:
//!
//! ```text
//! score(c) = Σ_t idf(t) · ts_rank(W, tsv(c), t) / (1 − b + b · len(c) / avglen)
//! idf(t)   = ln(1 + (N − df(t) + 0.5) / (df(t) + 0.5))       (BM25's, as Lucene has it)
//! ```
//!
//! BM25's three parts are there: rarity (IDF from the generation's counts),
//! a saturating, field-weighted term frequency, and length normalisation.
//! The term frequency is PostgreSQL's `ts_rank` on the single term: it sums
//! the term's occurrences weighted by field (`W` = text 1, heading
//! `heading_weight`, title `title_weight`, scaled to ≤ 1) with the j-th
//! occurrence counting 1/j², which saturates like BM25's tf·(k1+1)/(tf+k1)
//! at k1 ≈ 0.65 (1, 2, 3, 5 occurrences: 0.61, 0.76, 0.83, 0.89 of the
//! limit, against 0.61, 0.75, 0.82, 0.88 for that k1). Length enters as
//! pivoted normalisation (Singhal et al., 1996; BM25's `b` outside the
//! saturation), `len` = distinct lexemes of the chunk (`length(tsv)`).
//! `N`, `df(t)`, `avglen` come from the generation's statistics tables
//! (`keyword_stats`, `keyword_terms`), refreshed in one `ts_stat` pass when
//! the generation is activated and when a sync run that changed it ends
//! ([`refresh_keyword_stats`]; 5 s at 100k chunks). Between refreshes a
//! lexeme not counted yet scores as a rare one.
//!
//! Why not BM25's own tf: reading a term's occurrences out of a `tsvector` in
//! SQL means `unnest(tsv)`, measured at ~0.2 ms per candidate chunk (1,344
//! candidates: 315 ms), while one `ts_rank` call is ~1–2 µs (C, binary
//! search in the tsvector): the same candidates ranked in ~12 ms.
//!
//! Why this and not another engine: the index must stay in the one database
//! the rest of the state lives in — a document's chunks, vectors and
//! keyword entries change in one transaction, a generation swaps in one
//! statement, and managed PostgreSQL services (RDS, Cloud SQL, Azure) offer
//! pgvector but none of the BM25 extensions. Those extensions are not to be
//! had here anyway (pg_search, vchord_bm25: neither Debian 12 nor crates;
//! pg_textsearch: PostgreSQL 17+). Debian's `postgresql-15-rum` returns top-k
//! from the index but ranks like `ts_rank` (no IDF), and it would be one
//! more extension for every installation to carry. tantivy (a Rust crate)
//! would be real BM25 with its own index files, but then every worker pod
//! needs a copy of every collection's index kept in step with PostgreSQL
//! across generations and deletions — a second store with its own
//! consistency problem. `ts_rank`/`ts_rank_cd` alone have no IDF: common
//! words outweigh rare ones, which is what the labelled set punished.
//!
//! Cost bound: the GIN index finds candidates, and a term present in more
//! than `common_share` of the chunks (and in more than 1,000 of them) does
//! not fetch candidates (Elasticsearch's old "common terms" query): it still
//! scores, but does not drag thousands of chunks into scoring. A query made only of frequent terms
//! takes chunks that have them all. At most [`MAX_TERMS`] terms (the rarest)
//! count.
//!
//! # Hybrid
//!
//! Each side returns its `depth` best candidates (at least `top_k`);
//! `score = w_v / (k + rank_v) + w_k / (k + rank_k)`. The vector side runs
//! with `hnsw.iterative_scan = relaxed_order` (re-sorted after) and
//! `hnsw.ef_search` ≥ its depth, so filters (key prefix, content type) are
//! applied inside the index scan and do not starve the result. The defaults
//! of [`Tuning`] were chosen on the labelled set in
//! `bench/eval/postgresql-15` (see bench/README.md).
//!
//! # Per-document cap
//!
//! At most `per_document` chunks of one document are placed among the
//! results before any further chunk of a document already seen: a soft
//! cap. Chunks beyond the cap are not dropped but go after every chunk
//! within it, so a collection of few documents still fills `top_k`, and a
//! collection of many shows that many distinct documents.

use deadpool_postgres::ClientWrapper as Client;
use pgvector::Vector;
use uuid::Uuid;

use super::{Generation, StateError, active_generation};

/// Most results one query returns (`top_k`).
pub const MAX_TOP_K: i64 = 100;
/// Most candidates taken from each side (pgvector's `hnsw.ef_search`
/// maximum).
pub const MAX_DEPTH: i64 = 1000;
/// Most query terms that count (the rarest are kept).
pub const MAX_TERMS: usize = 32;
/// A term in fewer chunks than this always fetches candidates, whatever
/// its share: scoring that many is cheap, and in a small collection every
/// word is in a large share of it.
const MIN_COMMON_CHUNKS: f64 = 1000.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Vector,
    Keyword,
    Hybrid,
}

/// How results are ranked and fused. [`Tuning::default`] is what the worker
/// serves; the evaluation harness sweeps the rest.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tuning {
    /// The RRF constant: `w / (rrf_k + rank)`.
    pub rrf_k: f64,
    /// Candidates from each side (raised to `top_k` when below it).
    pub depth: i64,
    pub vector_weight: f64,
    pub keyword_weight: f64,
    /// Soft cap of chunks per document (see the module doc); 0 = no cap.
    pub per_document: i64,
    /// Length normalisation slope (0 = none, 1 = by length alone).
    pub b: f64,
    /// How much more an occurrence in the title counts than one in the text.
    pub title_weight: f64,
    /// How much more an occurrence in the heading path counts.
    pub heading_weight: f64,
    /// Terms present in more than this share of the chunks do not fetch
    /// candidates (they still score).
    pub common_share: f64,
}

impl Default for Tuning {
    fn default() -> Self {
        // Chosen on the labelled set (bench/README.md, "Search quality"):
        // the best of a grid, taken where its neighbours score alike.
        Tuning {
            rrf_k: 100.0,
            depth: 80,
            vector_weight: 1.0,
            keyword_weight: 0.5,
            per_document: 2,
            b: 0.0,
            title_weight: 0.5,
            heading_weight: 1.0,
            common_share: 0.01,
        }
    }
}

impl Tuning {
    /// ts_rank's weights {D, C, B, A} (each at most 1): text and headings
    /// relative to the title, or to the heading path if it weighs more.
    fn rank_weights(&self) -> Vec<f32> {
        let top = self.title_weight.max(self.heading_weight).max(1.0);
        [1.0, 1.0, self.heading_weight, self.title_weight]
            .iter()
            .map(|w| (w / top) as f32)
            .collect()
    }

    /// Every number finite and within its range, so that none reaches SQL
    /// as NaN or a negative depth.
    fn check(&self) -> Result<(), SearchError> {
        let finite_nonneg = [
            self.rrf_k,
            self.vector_weight,
            self.keyword_weight,
            self.b,
            self.title_weight,
            self.heading_weight,
            self.common_share,
        ]
        .iter()
        .all(|v| v.is_finite() && *v >= 0.0);
        if !finite_nonneg
            || !(1..=MAX_DEPTH).contains(&self.depth)
            || self.per_document < 0
            || self.b > 1.0
            || self.title_weight > 100.0
            || self.heading_weight > 100.0
        {
            return Err(SearchError::Tuning(format!("{self:?}")));
        }
        Ok(())
    }
}

pub struct Query<'a> {
    pub mode: Mode,
    /// The query's embedding (vector and hybrid modes).
    pub vector: Option<&'a [f32]>,
    /// The query's words (keyword and hybrid modes): plain text, no syntax.
    pub text: &'a str,
    /// 1..=[`MAX_TOP_K`].
    pub top_k: i64,
    pub key_prefix: Option<&'a str>,
    pub content_type: Option<&'a str>,
    pub tuning: Tuning,
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
    /// Fused score in hybrid mode, cosine similarity in vector mode, the
    /// keyword score (see the module doc) in keyword mode.
    pub score: f64,
    pub vector_rank: Option<i64>,
    pub keyword_rank: Option<i64>,
}

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
    #[error("top_k {0} is not within [1, {MAX_TOP_K}]")]
    TopK(i64),
    #[error("search tuning out of range: {0}")]
    Tuning(String),
}

impl From<tokio_postgres::Error> for SearchError {
    fn from(e: tokio_postgres::Error) -> Self {
        SearchError::State(e.into())
    }
}

/// Searches the active generation of a collection.
pub async fn search(
    client: &mut Client,
    collection_id: Uuid,
    q: &Query<'_>,
) -> Result<Vec<Hit>, SearchError> {
    let g = active_generation(client, collection_id)
        .await?
        .ok_or(SearchError::NoIndex)?;
    search_generation(client, &g, q).await
}

/// The query's terms as the keyword side uses them.
#[derive(Debug, Default, PartialEq)]
struct Terms {
    lexemes: Vec<String>,
    /// Each lexeme as a tsquery (text form).
    operands: Vec<String>,
    idf: Vec<f64>,
    /// A tsquery (text form) of the terms that fetch candidates.
    matching: String,
    avg_length: f64,
}

/// A lexeme as a quoted tsquery operand: never read as an operator.
fn tsquery_operand(lexeme: &str) -> String {
    format!("'{}'", lexeme.replace('\\', "\\\\").replace('\'', "''"))
}

/// Lucene's BM25 IDF (never negative).
fn idf(chunks: i64, df: i64) -> f64 {
    let (n, df) = (chunks.max(df) as f64, df.max(0) as f64);
    (1.0 + (n - df + 0.5) / (df + 0.5)).ln()
}

/// Chooses the terms that count and those that fetch candidates from
/// `(lexeme, df)` pairs and the generation's chunk count.
fn choose_terms(mut found: Vec<(String, i64)>, chunks: i64, avg_length: f64, t: &Tuning) -> Terms {
    // Rarest first; ties by lexeme for a stable choice.
    found.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
    found.truncate(MAX_TERMS);
    if found.is_empty() {
        return Terms::default();
    }
    let common = (t.common_share * chunks as f64).max(MIN_COMMON_CHUNKS);
    let rare: Vec<&str> = found
        .iter()
        .filter(|(_, df)| (*df as f64) <= common)
        .map(|(l, _)| l.as_str())
        .collect();
    let matching = if rare.is_empty() {
        // Only frequent terms: chunks that have them all.
        found
            .iter()
            .map(|(l, _)| tsquery_operand(l))
            .collect::<Vec<_>>()
            .join(" & ")
    } else {
        rare.iter()
            .map(|l| tsquery_operand(l))
            .collect::<Vec<_>>()
            .join(" | ")
    };
    Terms {
        idf: found.iter().map(|(_, df)| idf(chunks, *df)).collect(),
        operands: found.iter().map(|(l, _)| tsquery_operand(l)).collect(),
        lexemes: found.into_iter().map(|(l, _)| l).collect(),
        matching,
        avg_length,
    }
}

async fn query_terms(
    tx: &tokio_postgres::Transaction<'_>,
    g: &Generation,
    text: &str,
    tuning: &Tuning,
) -> Result<Terms, SearchError> {
    let rows = tx
        .query(
            "SELECT q.l, coalesce(t.chunks, 0)::int8, s.chunks, s.avg_length
             FROM unnest(tsvector_to_array(to_tsvector('english'::regconfig, $1))) AS q(l)
             LEFT JOIN keyword_terms t ON t.generation_id = $2 AND t.lexeme = q.l
             LEFT JOIN keyword_stats s ON s.generation_id = $2",
            &[&text, &g.id],
        )
        .await?;
    let chunks = rows
        .first()
        .and_then(|r| r.get::<_, Option<i64>>(2))
        .unwrap_or(0);
    let avg_length = rows
        .first()
        .and_then(|r| r.get::<_, Option<f64>>(3))
        .unwrap_or(0.0);
    let found = rows
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
        .collect();
    Ok(choose_terms(found, chunks, avg_length, tuning))
}

/// Searches one generation (the query vector must come from its model).
/// One statement: it sees the generation whole, or — if the generation was
/// replaced and dropped meanwhile — not at all; callers that embedded the
/// query for `g` check that `g` is still active and else ask again.
pub async fn search_generation(
    client: &mut Client,
    g: &Generation,
    q: &Query<'_>,
) -> Result<Vec<Hit>, SearchError> {
    if !(1..=MAX_TOP_K).contains(&q.top_k) {
        return Err(SearchError::TopK(q.top_k));
    }
    let t = q.tuning;
    t.check()?;
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
    let depth = t.depth.max(q.top_k);
    let tx = client.transaction().await?;
    let terms = if q.mode == Mode::Vector {
        Terms::default()
    } else {
        query_terms(&tx, g, q.text, &t).await?
    };
    if q.mode == Mode::Keyword && terms.lexemes.is_empty() {
        // Only stop words, or no word at all: nothing to look for.
        return Ok(Vec::new());
    }
    if q.mode != Mode::Keyword {
        // Filters inside the index scan; candidates at least the depth.
        tx.batch_execute(&format!(
            "SET LOCAL hnsw.iterative_scan = relaxed_order; SET LOCAL hnsw.ef_search = {}",
            depth.max(40)
        ))
        .await?;
    }
    // $1 vector, $2 key prefix, $3 content type, $4 top k, $5 one tsquery
    // per term, $6 their idf, $7 the tsquery fetching candidates, $8 mean
    // length, then the tuning.
    let filter = format!(
        "c.generation_id = {} AND ($2::text IS NULL OR starts_with(c.object_key, $2))
         AND ($3::text IS NULL OR c.content_type = $3)",
        g.id
    );
    let distance = format!(
        "(c.embedding::vector({d}) <=> $1::vector({d}))",
        d = g.dimensions
    );
    // Relaxed order: re-sorted after the (materialized) index scan.
    let vector_side = format!(
        "SELECT id, row_number() OVER (ORDER BY distance, id) AS rank, 1 - distance AS score
         FROM (SELECT c.id, {distance} AS distance FROM chunks c WHERE {filter}
               ORDER BY distance LIMIT {depth}) v"
    );
    let keyword_side = if terms.lexemes.is_empty() {
        "SELECT NULL::int8 AS id, NULL::int8 AS rank, NULL::float8 AS score WHERE false".to_string()
    } else {
        // One ts_rank per term (indexes into the arrays: no text of the
        // query reaches the statement's text).
        let per_term = (1..=terms.lexemes.len())
            .map(|i| format!("q.idf[{i}] * ts_rank(q.w, c.tsv, q.qs[{i}])"))
            .collect::<Vec<_>>()
            .join(" + ");
        format!(
            "SELECT id, row_number() OVER (ORDER BY score DESC, id) AS rank, score FROM (
               SELECT c.id,
                      ({per_term}) / (1 - $9::float8 + $9::float8
                        * CASE WHEN $8::float8 > 0 THEN length(c.tsv) / $8::float8 ELSE 1 END)
                        AS score
               FROM chunks c,
                    (SELECT $5::text[]::tsquery[] AS qs, $6::float8[] AS idf, $10::float4[] AS w) q
               WHERE {filter} AND c.tsv @@ ($7::text)::tsquery
               ORDER BY score DESC, c.id LIMIT {depth}) k"
        )
    };
    let ranked = match q.mode {
        Mode::Vector => {
            format!("SELECT id, score, rank AS vrank, NULL::int8 AS krank FROM ({vector_side}) v")
        }
        Mode::Keyword => {
            format!("SELECT id, score, NULL::int8 AS vrank, rank AS krank FROM ({keyword_side}) k")
        }
        Mode::Hybrid => format!(
            "SELECT coalesce(v.id, k.id) AS id,
                    coalesce($11::float8 / ($13::float8 + v.rank), 0)
                    + coalesce($12::float8 / ($13::float8 + k.rank), 0) AS score,
                    v.rank AS vrank, k.rank AS krank
             FROM ({vector_side}) v FULL OUTER JOIN ({keyword_side}) k ON v.id = k.id"
        ),
    };
    // Every parameter is named with its type whatever the mode uses.
    let sql = format!(
        "SELECT object_key, content, content_type, byte_start, byte_end, char_start, char_end,
                heading_path, score, vrank, krank
         FROM (
           SELECT c.object_key, c.content, c.content_type, c.byte_start, c.byte_end,
                  c.char_start, c.char_end, c.heading_path, r.score::float8 AS score, r.vrank,
                  r.krank, c.id,
                  row_number() OVER (PARTITION BY c.object_key ORDER BY r.score DESC, c.id)
                    AS doc_rank
           FROM ({ranked}) r JOIN chunks c ON c.id = r.id
           WHERE ($1::vector({d}) IS NULL OR TRUE) AND ($2::text IS NULL OR TRUE)
             AND ($3::text IS NULL OR TRUE) AND ($4::int8 IS NULL OR TRUE)
             AND ($5::text[] IS NULL OR TRUE) AND ($6::float8[] IS NULL OR TRUE)
             AND ($7::text IS NULL OR TRUE) AND ($8::float8 IS NULL OR TRUE)
             AND ($9::float8 IS NULL OR TRUE) AND ($10::float4[] IS NULL OR TRUE)
             AND ($11::float8 IS NULL OR TRUE) AND ($12::float8 IS NULL OR TRUE)
             AND ($13::float8 IS NULL OR TRUE)
         ) x
         ORDER BY ($14::int8 > 0 AND doc_rank > $14), score DESC, id
         LIMIT $4",
        d = g.dimensions
    );
    let rows = tx
        .query(
            &sql,
            &[
                &vector,
                &q.key_prefix,
                &q.content_type,
                &q.top_k,
                &terms.operands,
                &terms.idf,
                &terms.matching,
                &terms.avg_length,
                &t.b,
                &t.rank_weights(),
                &t.vector_weight,
                &t.keyword_weight,
                &t.rrf_k,
                &t.per_document,
            ],
        )
        .await?;
    tx.commit().await?;
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

/// Recounts generation `generation_id`'s keyword statistics (chunks, mean
/// length in distinct lexemes, the bytes its rows store, chunks per lexeme) from its rows, replacing the old ones in one
/// transaction. One pass over the generation's `tsv` (`ts_stat`): run it
/// when a generation is activated or a sync run changed it, not per
/// document.
pub async fn refresh_keyword_stats(
    client: &mut Client,
    generation_id: i64,
) -> Result<(), StateError> {
    let tx = client.transaction().await?;
    // Serialises refreshes of one generation (the row may not exist yet).
    tx.execute(
        "SELECT 1 FROM embedding_generations WHERE id = $1 FOR UPDATE",
        &[&generation_id],
    )
    .await?;
    tx.execute(
        "DELETE FROM keyword_terms WHERE generation_id = $1",
        &[&generation_id],
    )
    .await?;
    // `generation_id` is an integer: a literal in ts_stat's query text.
    tx.execute(
        &format!(
            "WITH s AS MATERIALIZED (
                 SELECT word, ndoc
                 FROM ts_stat('SELECT tsv FROM chunks WHERE generation_id = {generation_id}')),
             terms AS (
                 INSERT INTO keyword_terms (generation_id, lexeme, chunks)
                 SELECT {generation_id}, word, ndoc FROM s)
             INSERT INTO keyword_stats (generation_id, chunks, avg_length, stored_bytes)
             SELECT {generation_id}, c.n,
                    CASE WHEN c.n > 0 THEN coalesce(t.total, 0)::float8 / c.n ELSE 0 END,
                    c.bytes
             FROM (SELECT count(*) AS n, coalesce(sum(pg_column_size(chunks.*)), 0) AS bytes
                   FROM chunks WHERE generation_id = {generation_id}) c,
                  (SELECT sum(ndoc) AS total FROM s) t
             ON CONFLICT (generation_id) DO UPDATE SET chunks = excluded.chunks,
                 avg_length = excluded.avg_length, stored_bytes = excluded.stored_bytes,
                 refreshed_at = now()"
        ),
        &[],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operands_are_quoted_so_nothing_is_an_operator() {
        assert_eq!(tsquery_operand("a:b"), "'a:b'");
        assert_eq!(tsquery_operand("it's"), "'it''s'");
        assert_eq!(tsquery_operand(r"x\y"), r"'x\\y'");
        assert_eq!(tsquery_operand("!&|()"), "'!&|()'");
    }

    #[test]
    fn rarer_terms_weigh_more_and_common_ones_fetch_nothing() {
        assert!(idf(1000, 1) > idf(1000, 100));
        assert!(idf(1000, 1000) > 0.0);
        let t = Tuning::default();
        let terms = choose_terms(
            vec![
                ("tabl".into(), 40_000),
                ("unlog".into(), 3),
                ("set".into(), 30_000),
            ],
            100_000,
            50.0,
            &t,
        );
        assert_eq!(terms.lexemes, ["unlog", "set", "tabl"]);
        assert_eq!(terms.matching, "'unlog'");
        assert!(terms.idf[0] > terms.idf[1] && terms.idf[1] > terms.idf[2]);
        // Only frequent terms: all of them are required.
        let terms = choose_terms(
            vec![("tabl".into(), 40_000), ("set".into(), 30_000)],
            100_000,
            50.0,
            &t,
        );
        assert_eq!(terms.matching, "'set' & 'tabl'");
        // In a small collection every term fetches.
        let terms = choose_terms(
            vec![("tabl".into(), 400), ("set".into(), 300)],
            1000,
            50.0,
            &t,
        );
        assert_eq!(terms.matching, "'set' | 'tabl'");
        // No statistics yet: every term is rare and fetches.
        let terms = choose_terms(vec![("a".into(), 0), ("b".into(), 0)], 0, 0.0, &t);
        assert_eq!(terms.matching, "'a' | 'b'");
    }

    #[test]
    fn a_long_query_keeps_its_rarest_terms() {
        let found = (0..100).map(|i| (format!("w{i:03}"), i)).collect();
        let terms = choose_terms(found, 10_000, 10.0, &Tuning::default());
        assert_eq!(terms.lexemes.len(), MAX_TERMS);
        assert_eq!(terms.lexemes[0], "w000");
    }

    #[test]
    fn tuning_out_of_range_is_refused() {
        assert!(Tuning::default().check().is_ok());
        for bad in [
            Tuning {
                depth: 0,
                ..Tuning::default()
            },
            Tuning {
                depth: MAX_DEPTH + 1,
                ..Tuning::default()
            },
            Tuning {
                rrf_k: f64::NAN,
                ..Tuning::default()
            },
            Tuning {
                b: 1.5,
                ..Tuning::default()
            },
            Tuning {
                per_document: -1,
                ..Tuning::default()
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }
}
