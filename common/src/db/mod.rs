//! The PostgreSQL connection pool and the embedded schema migrations, which
//! run once across a rolling deploy under the migrations lock.

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, RecyclingMethod};
use tokio_postgres::NoTls;
use tracing::info;

use crate::locks::{LockClass, LockError, LockKey, LockManager};

pub type Pool = deadpool_postgres::Pool;
pub type PoolError = deadpool_postgres::PoolError;
/// A pooled connection, as the state functions take it.
pub type Client = deadpool_postgres::ClientWrapper;

mod embedded {
    refinery::embed_migrations!("migrations");
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid database URL: {}", crate::errors::chain(.0))]
    InvalidUrl(#[source] tokio_postgres::Error),
    #[error("cannot build the connection pool: {0}")]
    Pool(String),
    #[error("cannot get a database connection: {}", crate::state::pool_message(.0))]
    Connection(#[from] PoolError),
    #[error("PostgreSQL advisory locks do not work here: {0}")]
    LocksUnusable(#[source] LockError),
    #[error("taking the migrations lock: {0}")]
    Lock(#[from] LockError),
    #[error("applying schema migrations: {}", crate::errors::chain(.0))]
    Migration(#[from] refinery::Error),
}

/// What every binary does first: checks that advisory locks work on this
/// server (refusing a transaction-mode pooler), builds the pool and applies
/// the migrations. Returns the pool and the lock manager.
pub async fn connect(
    args: &crate::config::DatabaseArgs,
    lock_metrics: crate::locks::LockMetrics,
    lock_heartbeat: Duration,
) -> Result<(Pool, LockManager), DbError> {
    let pg = parse_url(&args.database_url)?;
    let locks = LockManager::new(pg.clone(), lock_metrics, lock_heartbeat);
    locks.check_server().await.map_err(DbError::LocksUnusable)?;
    let pool = pool(&pg, args.database_pool_size)?;
    migrate(&pool, &locks).await?;
    Ok((pool, locks))
}

/// Parses a `postgres://` URL or key=value connection string.
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, DbError> {
    tokio_postgres::Config::from_str(url).map_err(DbError::InvalidUrl)
}

pub fn pool(config: &tokio_postgres::Config, max_size: usize) -> Result<Pool, DbError> {
    let mut config = config.clone();
    config.application_name("stowage");
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(max_size)
        .wait_timeout(Some(Duration::from_secs(30)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| DbError::Pool(e.to_string()))
}

/// Applies the embedded migrations. Every replica calls this at start-up; the
/// migrations lock makes the others wait until the first one is done, after
/// which they find nothing left to apply.
pub async fn migrate(pool: &Pool, locks: &LockManager) -> Result<(), DbError> {
    let lock = locks
        .lock_with_timeout(
            LockKey::new(LockClass::Migrations, "schema"),
            Duration::from_secs(300),
        )
        .await?;
    let mut client = pool.get().await?;
    let report = embedded::migrations::runner()
        .set_grouped(true)
        .run_async(&mut **client)
        .await?;
    for m in report.applied_migrations() {
        info!(version = m.version(), name = m.name(), "applied migration");
    }
    lock.release().await?;
    Ok(())
}
