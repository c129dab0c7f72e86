//! The Kubernetes-free core that every Stowage binary shares.
//!
//! - [`locks`]: PostgreSQL advisory locks — the only place that calls `pg_*advisory*`.
//! - [`db`]: the connection pool and the embedded schema migrations.
//! - [`state`]: jobs, items, multipart progress, object history, collections and sync runs in PostgreSQL.
//! - [`queue`]: the JetStream task queue, dead letters and events.
//! - [`jobs`]: submitting jobs and replaying dead letters (state + queue).
//! - [`spec`]: the UploadJob and IndexCollection specifications shared by the operator, worker and CLI.
//! - [`storage`]: S3 clients per namespace and endpoint, S3 errors and operations.
//! - [`secrets`]: Secrets read in the resource's own namespace (API or directory).
//! - [`telemetry`]: logs, Prometheus metrics and health endpoints.
//! - [`errors`]: the retryable / permanent classification that drives retries.
//! - [`redact`]: secrets out of URLs wherever they are printed.
//! - [`net`]: which addresses a tenant's endpoints may reach.
//! - [`tls`]: TLS for PostgreSQL, NATS and gRPC (PEM files, verification, clear handshake errors).

pub mod config;
pub mod db;
pub mod errors;
pub mod jobs;
pub mod locks;
pub mod net;
pub mod queue;
pub mod redact;
pub mod secrets;
pub mod spec;
pub mod state;
#[cfg(feature = "s3")]
pub mod storage;
pub mod telemetry;
pub mod tls;

#[cfg(any(test, feature = "testing"))]
pub mod testing;
