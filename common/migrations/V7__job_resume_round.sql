-- A resumed job's pending files must be queued again. The operator used to
-- resume the job and then publish their tasks: if it died in between, the
-- job ran with files nobody would ever start. The resume now records the
-- round of tasks it owes, in the same update; the operator publishes that
-- round (task ids are deterministic within it, so publishing twice is
-- deduplicated) and clears it, and any later reconcile finishes the work.
ALTER TABLE upload_jobs ADD COLUMN resume_round text;
