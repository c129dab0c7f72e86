-- Why a job failed as a whole, as a value (`DeadlineExceeded`, `PlanningFailed`),
-- beside `last_error`, the message for people: the operator's Failed condition
-- takes its reason from here instead of reading the message's first word.
ALTER TABLE upload_jobs ADD COLUMN failure_reason text;
UPDATE upload_jobs SET failure_reason = 'DeadlineExceeded'
 WHERE state = 'failed' AND last_error LIKE 'DeadlineExceeded%';
UPDATE upload_jobs SET failure_reason = 'PlanningFailed'
 WHERE state = 'failed' AND last_error IS NOT NULL AND failure_reason IS NULL;
