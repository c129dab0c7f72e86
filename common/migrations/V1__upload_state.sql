-- Upload jobs, their items, multipart progress (the resume point after a
-- crash) and the history of objects Stowage wrote (dedup and versions).

CREATE TABLE upload_jobs (
    id            uuid PRIMARY KEY,
    namespace     text NOT NULL,
    name          text NOT NULL,
    -- Kubernetes uid + generation for jobs from the operator; stowctl sets its own.
    source_uid    text NOT NULL,
    generation    bigint NOT NULL DEFAULT 1,
    spec          jsonb NOT NULL,
    state         text NOT NULL DEFAULT 'pending'
                  CHECK (state IN ('pending', 'running', 'succeeded', 'failed', 'cancelled')),
    planned_at    timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    started_at    timestamptz,
    finished_at   timestamptz,
    last_error    text,
    UNIQUE (source_uid, generation)
);

CREATE TABLE upload_items (
    id               bigserial PRIMARY KEY,
    job_id           uuid NOT NULL REFERENCES upload_jobs (id) ON DELETE CASCADE,
    -- The S3 key or URL the bytes come from.
    source_ref       text NOT NULL,
    dest_key         text NOT NULL,
    size_bytes       bigint,
    state            text NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'running', 'succeeded', 'skipped_duplicate',
                                      'skipped_exists', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    bytes_done       bigint NOT NULL DEFAULT 0,
    sha256_hex       text,
    last_error       text,
    error_class      text,
    dead_lettered    boolean NOT NULL DEFAULT false,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    UNIQUE (job_id, dest_key)
);
CREATE INDEX upload_items_job_state ON upload_items (job_id, state);

CREATE TABLE multipart_uploads (
    item_id            bigint PRIMARY KEY REFERENCES upload_items (id) ON DELETE CASCADE,
    endpoint           text NOT NULL,
    bucket             text NOT NULL,
    object_key         text NOT NULL,
    upload_id          text NOT NULL,
    part_size_bytes    bigint NOT NULL,
    checksum_algorithm text NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE upload_parts (
    item_id      bigint NOT NULL REFERENCES multipart_uploads (item_id) ON DELETE CASCADE,
    part_number  integer NOT NULL CHECK (part_number BETWEEN 1 AND 10000),
    etag         text NOT NULL,
    -- Base64 checksum sent with the part and verified by the server.
    checksum     text NOT NULL,
    size_bytes   bigint NOT NULL,
    uploaded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (item_id, part_number)
);

CREATE TABLE objects (
    bucket       text NOT NULL,
    object_key   text NOT NULL,
    version      integer NOT NULL,
    sha256_hex   text NOT NULL,
    size_bytes   bigint NOT NULL,
    etag         text,
    -- Where an overwritten version was preserved (conflict policy `version`).
    archived_key text,
    current      boolean NOT NULL DEFAULT true,
    job_id       uuid,
    written_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (bucket, object_key, version)
);
CREATE UNIQUE INDEX objects_one_current ON objects (bucket, object_key) WHERE current;
CREATE INDEX objects_by_content ON objects (bucket, sha256_hex) WHERE current;
