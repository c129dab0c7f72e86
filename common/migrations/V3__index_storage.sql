-- The index: embedding generations per collection, documents and their
-- chunks with a vector (pgvector) and a full-text vector (tsvector).

CREATE EXTENSION IF NOT EXISTS vector;

-- One generation per embedding model/dimensions of a collection. Search
-- answers from the active one; a new model builds a new generation beside
-- it, which becomes active in one statement when complete.
CREATE TABLE embedding_generations (
    id             bigserial PRIMARY KEY,
    collection_id  uuid NOT NULL REFERENCES collections (id) ON DELETE CASCADE,
    model_key      text NOT NULL,
    dimensions     integer NOT NULL CHECK (dimensions BETWEEN 1 AND 16000),
    state          text NOT NULL DEFAULT 'building'
                   CHECK (state IN ('building', 'active', 'retired')),
    created_at     timestamptz NOT NULL DEFAULT now(),
    activated_at   timestamptz
);
CREATE UNIQUE INDEX embedding_generations_one_active
    ON embedding_generations (collection_id) WHERE state = 'active';
CREATE UNIQUE INDEX embedding_generations_one_building
    ON embedding_generations (collection_id) WHERE state = 'building';

CREATE TABLE documents (
    generation_id  bigint NOT NULL REFERENCES embedding_generations (id) ON DELETE CASCADE,
    object_key     text NOT NULL,
    etag           text,
    sha256_hex     text,
    content_type   text,
    size_bytes     bigint,
    state          text NOT NULL CHECK (state IN ('indexed', 'skipped', 'failed')),
    reason         text,
    chunks         integer NOT NULL DEFAULT 0,
    indexed_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (generation_id, object_key)
);

CREATE TABLE chunks (
    id             bigserial PRIMARY KEY,
    generation_id  bigint NOT NULL REFERENCES embedding_generations (id) ON DELETE CASCADE,
    object_key     text NOT NULL,
    ordinal        integer NOT NULL,
    content        text NOT NULL,
    content_type   text,
    byte_start     integer NOT NULL,
    byte_end       integer NOT NULL,
    char_start     integer NOT NULL,
    char_end       integer NOT NULL,
    heading_path   text[] NOT NULL DEFAULT '{}',
    -- Dimensions vary per generation: each generation gets its own HNSW
    -- index on (embedding::vector(N)) restricted to its rows.
    embedding      vector NOT NULL,
    tsv            tsvector GENERATED ALWAYS AS (to_tsvector('english', content)) STORED
);
CREATE INDEX chunks_by_document ON chunks (generation_id, object_key);
CREATE INDEX chunks_tsv ON chunks USING gin (tsv);
