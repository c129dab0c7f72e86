-- Sync runs fan out: the run's planner records every new or changed object
-- here and publishes one task per document; any worker indexes it and marks
-- its row; whoever marks the last one activates a freshly built generation
-- and closes the run. A run that stops making progress (its tasks lost) is
-- abandoned by the next one.
ALTER TABLE sync_runs
    -- The embedding generation the run writes.
    ADD COLUMN generation_id bigint REFERENCES embedding_generations (id) ON DELETE SET NULL,
    -- Set once every document's task is published; until then only the
    -- planner (holding the collection's sync lock) may touch the run.
    ADD COLUMN dispatched_at timestamptz,
    -- Last sign of life: the dispatch, or a document finished.
    ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();

CREATE TABLE sync_run_documents (
    run_id       bigint NOT NULL REFERENCES sync_runs (id) ON DELETE CASCADE,
    object_key   text NOT NULL,
    etag         text NOT NULL,
    size_bytes   bigint NOT NULL,
    change       text NOT NULL CHECK (change IN ('new', 'changed')),
    state        text NOT NULL DEFAULT 'pending'
                 CHECK (state IN ('pending', 'indexed', 'skipped', 'failed')),
    chunks       integer NOT NULL DEFAULT 0,
    reason       text,
    -- Failed attempts to run the document's task (database, lock, crash).
    attempts     integer NOT NULL DEFAULT 0,
    -- The worker that finished it.
    worker       text,
    finished_at  timestamptz,
    PRIMARY KEY (run_id, object_key)
);
CREATE INDEX sync_run_documents_pending ON sync_run_documents (run_id) WHERE state = 'pending';

-- The SHA-256 a multipart upload was created with in its metadata (NULL:
-- none). A resume must have the same, or it would complete an object whose
-- metadata describes other bytes.
ALTER TABLE multipart_uploads ADD COLUMN metadata_sha256 text;
