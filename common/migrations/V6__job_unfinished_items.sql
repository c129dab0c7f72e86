-- A job's unfinished (pending or running) items, counted on the job's row by
-- triggers, so that whether a job is done is read off one row. It used to be a
-- scan of the job's pending and running items after every finished file; while
-- a large job runs, that scan walks the dead index entries of every item
-- finished so far (each finish leaves two), so a job of n files cost O(n²).

ALTER TABLE upload_jobs ADD COLUMN unfinished_items bigint NOT NULL DEFAULT 0;

UPDATE upload_jobs j SET unfinished_items = (
    SELECT count(*) FROM upload_items i
    WHERE i.job_id = j.id AND i.state IN ('pending', 'running'));

-- Ends a planned, active job with no unfinished item: failed if any item
-- failed, else succeeded. A no-op otherwise, so safe to call at any time.
CREATE FUNCTION stowage_finish_upload_job(job uuid) RETURNS void
LANGUAGE sql AS $$
    UPDATE upload_jobs j SET
        state = CASE WHEN EXISTS (SELECT 1 FROM upload_items i
                                  WHERE i.job_id = j.id AND i.state = 'failed')
                     THEN 'failed' ELSE 'succeeded' END,
        started_at = coalesce(started_at, now()),
        finished_at = now()
    WHERE j.id = job AND j.planned_at IS NOT NULL AND j.state IN ('pending', 'running')
      AND j.unfinished_items = 0;
$$;

-- Items are inserted in bulk (a job's whole plan in one statement): count them
-- once per statement.
CREATE FUNCTION stowage_count_inserted_items() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE upload_jobs j SET unfinished_items = j.unfinished_items + n.added
    FROM (SELECT job_id, count(*) AS added FROM inserted_items
          WHERE state IN ('pending', 'running') GROUP BY job_id) n
    WHERE j.id = n.job_id;
    RETURN NULL;
END $$;

CREATE TRIGGER upload_items_count_inserted AFTER INSERT ON upload_items
    REFERENCING NEW TABLE AS inserted_items
    FOR EACH STATEMENT EXECUTE FUNCTION stowage_count_inserted_items();

-- Items change state one at a time: count a row that starts or stops being
-- unfinished, and end the job when its last unfinished item finishes. (Items
-- are only deleted with their job, so deletions need no counting.)
CREATE FUNCTION stowage_count_item_state() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    remaining bigint;
BEGIN
    UPDATE upload_jobs
    SET unfinished_items = unfinished_items
        + CASE WHEN NEW.state IN ('pending', 'running') THEN 1 ELSE -1 END
    WHERE id = NEW.job_id RETURNING unfinished_items INTO remaining;
    IF remaining = 0 THEN
        PERFORM stowage_finish_upload_job(NEW.job_id);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER upload_items_count_state AFTER UPDATE OF state ON upload_items
    FOR EACH ROW
    WHEN ((OLD.state IN ('pending', 'running')) IS DISTINCT FROM (NEW.state IN ('pending', 'running')))
    EXECUTE FUNCTION stowage_count_item_state();
