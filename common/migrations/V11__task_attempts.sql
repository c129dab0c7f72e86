-- Attempts of tasks whose kind does not count its own (planning, sync runs,
-- document tasks): a start is counted before the task runs, so a task that
-- crashes its worker spends one too; a wait gives it back; the task's end
-- (ack or dead letter) deletes the row. Bounds every kind's attempts.
CREATE TABLE task_attempts (
    task_id    text PRIMARY KEY,
    attempts   integer NOT NULL DEFAULT 0,
    last_error text,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX task_attempts_updated ON task_attempts (updated_at);
