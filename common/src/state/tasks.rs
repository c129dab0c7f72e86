//! Attempts of tasks whose kind does not count its own (planning, sync
//! runs, document tasks; an upload counts on its item). A start is counted
//! before the task runs — a task that crashes its worker every time still
//! comes to an end — a wait gives it back, and the task's end forgets it.

use deadpool_postgres::ClientWrapper as Client;

use super::StateError;

/// What is known of a task's earlier attempts, this start included.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempts {
    pub attempts: i32,
    /// The error of the last failed attempt.
    pub last_error: Option<String>,
}

/// Counts a start of `task_id`.
pub async fn begin(client: &Client, task_id: &str) -> Result<Attempts, StateError> {
    let row = client
        .query_one(
            &client
                .prepare_cached(
                    "INSERT INTO task_attempts (task_id, attempts) VALUES ($1, 1)
                     ON CONFLICT (task_id) DO UPDATE
                         SET attempts = task_attempts.attempts + 1, updated_at = now()
                     RETURNING attempts, last_error",
                )
                .await?,
            &[&task_id],
        )
        .await?;
    Ok(Attempts {
        attempts: row.get(0),
        last_error: row.get(1),
    })
}

/// The start was a wait, not an attempt: give it back.
pub async fn waited(client: &Client, task_id: &str) -> Result<(), StateError> {
    client
        .execute(
            &client
                .prepare_cached(
                    "UPDATE task_attempts SET attempts = greatest(attempts - 1, 0), updated_at = now()
                     WHERE task_id = $1",
                )
                .await?,
            &[&task_id],
        )
        .await?;
    Ok(())
}

/// Records why the attempt failed.
pub async fn failed(client: &Client, task_id: &str, error: &str) -> Result<(), StateError> {
    client
        .execute(
            &client
                .prepare_cached(
                    "UPDATE task_attempts SET last_error = $2, updated_at = now() WHERE task_id = $1",
                )
                .await?,
            &[&task_id, &error],
        )
        .await?;
    Ok(())
}

/// The task ended (acked or dead-lettered).
pub async fn ended(client: &Client, task_id: &str) -> Result<(), StateError> {
    client
        .execute(
            &client
                .prepare_cached("DELETE FROM task_attempts WHERE task_id = $1")
                .await?,
            &[&task_id],
        )
        .await?;
    Ok(())
}

/// Forgets tasks untouched for `days` (purged from the queue, say).
pub async fn forget_older_than(client: &Client, days: i32) -> Result<u64, StateError> {
    Ok(client
        .execute(
            "DELETE FROM task_attempts WHERE updated_at < now() - make_interval(days => $1)",
            &[&days],
        )
        .await?)
}
