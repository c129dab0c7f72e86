//! Durable state in PostgreSQL: upload jobs and items, multipart progress (the
//! resume point after a crash), the history of objects Stowage wrote, and
//! IndexCollections with their sync runs. All SQL about that state lives here.

pub mod collections;
pub mod index;
pub mod ingest;
pub mod tasks;
pub mod uploads;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The server's own message (and detail, hint) rather than "db error".
    #[error("database query failed: {}", crate::errors::chain(.0))]
    Query(#[from] tokio_postgres::Error),
    #[error("cannot get a database connection: {}", pool_message(.0))]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("a stored spec is not valid JSON for this version: {0}")]
    Spec(#[from] serde_json::Error),
    #[error("{what} {id} does not exist")]
    NotFound { what: &'static str, id: String },
    /// A value in a row that this version does not know (a newer version
    /// wrote it, or the row was edited by hand).
    #[error("{what} {value:?} is unknown to this version")]
    Unknown { what: &'static str, value: String },
}

/// Why no pooled connection was to be had, and what to do about it.
pub fn pool_message(e: &deadpool_postgres::PoolError) -> String {
    use deadpool_postgres::{PoolError, TimeoutType};
    match e {
        PoolError::Timeout(TimeoutType::Wait) => "every connection of the pool stayed busy \
            (timed out waiting for one); raise --database-pool-size or look for slow queries"
            .into(),
        PoolError::Timeout(_) => "PostgreSQL did not accept a connection in time: \
            is it up and reachable?"
            .into(),
        PoolError::Backend(e) => format!(
            "cannot connect to PostgreSQL: {}",
            crate::redact::text(&crate::errors::chain(e))
        ),
        PoolError::Closed => "the connection pool is closed (shutting down)".into(),
        other => other.to_string(),
    }
}
