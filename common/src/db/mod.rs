//! The PostgreSQL connection pool and the embedded schema migrations, which
//! run once across a rolling deploy under the migrations lock. Every
//! connection, pooled or a lock session, is made from a [`PgConfig`], so
//! that both honour the connection string's TLS options ([`tls`]).

pub mod tls;

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, RecyclingMethod};
use tracing::info;

pub use tls::{PgTls, PgTlsStream, SslMode};

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
    #[error("database URL: {0}")]
    Tls(String),
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

/// A parsed connection string: tokio-postgres' settings and the TLS
/// connector its `sslmode`/`sslrootcert`/`sslcert`/`sslkey` ask for. Derefs
/// to [`tokio_postgres::Config`].
#[derive(Clone)]
pub struct PgConfig {
    config: tokio_postgres::Config,
    tls: PgTls,
}

impl PgConfig {
    /// Opens one connection (the caller drives the returned connection).
    pub async fn open(
        &self,
    ) -> Result<
        (
            tokio_postgres::Client,
            tokio_postgres::Connection<tokio_postgres::Socket, PgTlsStream>,
        ),
        tokio_postgres::Error,
    > {
        self.config.connect(self.tls.clone()).await
    }

    pub fn tls(&self) -> &PgTls {
        &self.tls
    }
}

impl std::ops::Deref for PgConfig {
    type Target = tokio_postgres::Config;

    fn deref(&self) -> &tokio_postgres::Config {
        &self.config
    }
}

impl std::ops::DerefMut for PgConfig {
    fn deref_mut(&mut self) -> &mut tokio_postgres::Config {
        &mut self.config
    }
}

/// Parses a `postgres://` URL or key=value connection string, with libpq's
/// TLS options (see [`tls`]); reads the certificate files it names.
pub fn parse_url(url: &str) -> Result<PgConfig, DbError> {
    let (rest, options) = tls::split_ssl_options(url).map_err(DbError::Tls)?;
    let mut config = tokio_postgres::Config::from_str(&rest).map_err(DbError::InvalidUrl)?;
    let (tls, mode) = PgTls::new(&options).map_err(DbError::Tls)?;
    config.ssl_mode(mode);
    Ok(PgConfig { config, tls })
}

pub fn pool(config: &PgConfig, max_size: usize) -> Result<Pool, DbError> {
    let mut config = config.clone();
    config.application_name("stowage");
    let manager = Manager::from_config(
        config.config,
        config.tls,
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
