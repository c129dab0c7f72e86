//! Durable state in PostgreSQL: upload jobs and items, multipart progress (the
//! resume point after a crash), the history of objects Stowage wrote, and
//! IndexCollections with their sync runs. All SQL about that state lives here.

pub mod collections;
pub mod index;
pub mod lifecycle;
pub mod uploads;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("database query failed: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("cannot get a database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("a stored spec is not valid JSON for this version: {0}")]
    Spec(#[from] serde_json::Error),
    #[error("{what} {id} does not exist")]
    NotFound { what: &'static str, id: String },
}
