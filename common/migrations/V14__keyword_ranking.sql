-- The keyword side ranks (issue 15): IDF-weighted, field-weighted and
-- length-normalised scores over a tsvector, from per-generation term
-- statistics. See common/src/state/index/search.rs for the formula and why
-- it is computed in PostgreSQL.

-- What gets keyword-indexed: the document's title (weight A), the chunk's
-- heading path (weight B), then its text (no weight: D). The stored text
-- stays what the source said; title and headings are added here, so every
-- writer of chunks gets the same indexing by filling `title` and
-- `heading_path`. IMMUTABLE is true of this body for a fixed configuration
-- ('english' is named, not taken from default_text_search_config), which a
-- generated column requires (array_to_string alone is only STABLE because
-- of other element types).
CREATE FUNCTION stowage_keyword_tsv(title text, heading_path text[], content text)
RETURNS tsvector
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN setweight(to_tsvector('english'::regconfig, coalesce(title, '')), 'A')
    || setweight(to_tsvector('english'::regconfig,
                             coalesce(array_to_string(heading_path, ' '), '')), 'B')
    || to_tsvector('english'::regconfig, content);

DROP INDEX IF EXISTS chunks_tsv;
ALTER TABLE chunks DROP COLUMN tsv;
ALTER TABLE chunks ADD COLUMN tsv tsvector
    GENERATED ALWAYS AS (stowage_keyword_tsv(title, heading_path, content)) STORED;
CREATE INDEX chunks_tsv ON chunks USING gin (tsv);

-- Per-generation statistics: how many chunks, their mean length (distinct
-- lexemes), the bytes their rows store (text, vector, tsvector, headings:
-- the index size a collection's status reports, with its HNSW index's), and
-- for each lexeme how many chunks contain it. Refreshed from the
-- generation's rows when it is activated and when a sync run that changed
-- it ends (a full recount, one statement: ts_stat); between refreshes a
-- lexeme not counted yet ranks as a rare one.
CREATE TABLE keyword_stats (
    generation_id  bigint PRIMARY KEY
                   REFERENCES embedding_generations (id) ON DELETE CASCADE,
    chunks         bigint NOT NULL CHECK (chunks >= 0),
    avg_length     float8 NOT NULL CHECK (avg_length >= 0),
    stored_bytes   bigint NOT NULL DEFAULT 0 CHECK (stored_bytes >= 0),
    refreshed_at   timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE keyword_terms (
    generation_id  bigint NOT NULL
                   REFERENCES embedding_generations (id) ON DELETE CASCADE,
    lexeme         text NOT NULL,
    chunks         integer NOT NULL CHECK (chunks >= 0),
    PRIMARY KEY (generation_id, lexeme)
);

-- Existing generations get their statistics now (the next activation or
-- changing sync run recounts them).
INSERT INTO keyword_terms (generation_id, lexeme, chunks)
SELECT g.id, s.word, s.ndoc
FROM embedding_generations g
CROSS JOIN LATERAL ts_stat(format('SELECT tsv FROM chunks WHERE generation_id = %s', g.id)) s;
INSERT INTO keyword_stats (generation_id, chunks, avg_length, stored_bytes)
SELECT g.id, n.n, CASE WHEN n.n > 0 THEN coalesce(t.total, 0)::float8 / n.n ELSE 0 END, n.bytes
FROM embedding_generations g
CROSS JOIN LATERAL (SELECT count(*) AS n, coalesce(sum(pg_column_size(c.*)), 0) AS bytes
                    FROM chunks c WHERE c.generation_id = g.id) n
CROSS JOIN LATERAL (SELECT sum(k.chunks) AS total FROM keyword_terms k
                    WHERE k.generation_id = g.id) t;
