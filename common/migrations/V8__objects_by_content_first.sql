-- The content index was (bucket, sha256_hex), and objects_one_current is
-- (bucket, object_key): on a table without statistics (a new installation,
-- before autovacuum's first ANALYZE) both cost the same to the planner, and
-- it could pick the content index for "the current object at this key" — a
-- scan of every current object in the bucket, filtered by key, once per
-- uploaded file. A first job of n files into one bucket cost O(n²) (2 ms of
-- PostgreSQL CPU per file at 10,000 files). Keyed by the content hash
-- alone, the index offers that query nothing; the dedup lookup uses it and
-- filters by bucket (the same content in many buckets is rare).
DROP INDEX objects_by_content;
CREATE INDEX objects_by_content ON objects (sha256_hex) WHERE current;
