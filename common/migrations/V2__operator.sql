-- What the operator needs: suspended upload jobs, and IndexCollections with
-- their sync runs (documents and chunks come with the index data plane).

ALTER TABLE upload_jobs DROP CONSTRAINT upload_jobs_state_check;
ALTER TABLE upload_jobs ADD CONSTRAINT upload_jobs_state_check
    CHECK (state IN ('pending', 'running', 'suspended', 'succeeded', 'failed', 'cancelled'));
CREATE INDEX upload_jobs_by_source ON upload_jobs (source_uid, generation DESC);

CREATE TABLE collections (
    id          uuid PRIMARY KEY,
    namespace   text NOT NULL,
    name        text NOT NULL,
    -- Kubernetes uid: one collection per resource; `generation` and `spec`
    -- follow the resource's latest generation.
    source_uid  text NOT NULL UNIQUE,
    generation  bigint NOT NULL,
    spec        jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE sync_runs (
    id             bigserial PRIMARY KEY,
    collection_id  uuid NOT NULL REFERENCES collections (id) ON DELETE CASCADE,
    state          text NOT NULL DEFAULT 'in_progress'
                   CHECK (state IN ('in_progress', 'completed', 'completed_with_errors',
                                    'failed', 'abandoned')),
    -- schedule | spec-change | manual | upload
    trigger        text NOT NULL,
    -- The collection generation the run indexed for.
    generation     bigint NOT NULL,
    started_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz,
    seen           bigint NOT NULL DEFAULT 0,
    new            bigint NOT NULL DEFAULT 0,
    changed        bigint NOT NULL DEFAULT 0,
    deleted        bigint NOT NULL DEFAULT 0,
    failed         bigint NOT NULL DEFAULT 0,
    skipped        bigint NOT NULL DEFAULT 0,
    chunks_written bigint NOT NULL DEFAULT 0,
    error          text
);
-- At most one run in progress per collection; a new run marks a stale one
-- abandoned first.
CREATE UNIQUE INDEX sync_runs_one_in_progress ON sync_runs (collection_id)
    WHERE state = 'in_progress';
CREATE INDEX sync_runs_latest ON sync_runs (collection_id, id DESC);
