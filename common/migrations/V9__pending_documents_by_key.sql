-- The index of a run's pending documents was keyed by the run alone. On a
-- table without statistics (a new installation's first sync, before
-- autovacuum's first ANALYZE) the planner costed it the same as the primary
-- key for "this run's pending document at this key" and could pick it: a scan
-- of the run's every pending document (and of the dead entries of those
-- already done) once per indexed document, O(n²) over a first sync. Keyed by
-- run and object key, it finds the one row either way; counting a run's
-- pending documents still reads its leading column.
DROP INDEX sync_run_documents_pending;
CREATE INDEX sync_run_documents_pending ON sync_run_documents (run_id, object_key)
    WHERE state = 'pending';
