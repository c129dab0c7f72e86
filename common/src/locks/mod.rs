//! PostgreSQL advisory locks: the one place in Stowage that calls `pg_*advisory*`.
//!
//! A lock key is two 32-bit integers: a [`LockClass`] and a stable hash of the
//! resource id (see [`LockKey`]). Two kinds of lock exist:
//!
//! - **Session locks** ([`LockManager::try_lock`], [`LockManager::lock`],
//!   [`LockManager::lock_with_timeout`]) each hold a dedicated connection for as
//!   long as the returned [`SessionLock`] lives. The lock dies with that session:
//!   dropping the guard closes the connection, so nothing can leak; an explicit
//!   [`SessionLock::release`] unlocks and keeps the now lock-free session for
//!   the next acquisition (locks taken per file would otherwise pay a new
//!   connection each). The session
//!   is watched (connection task + heartbeat); when it is lost, the guard's
//!   [`SessionLock::lost`] future resolves and the holder must stop (fencing).
//! - **Transaction locks** ([`xact_lock`], [`try_xact_lock`]) for critical
//!   sections that are a single transaction; they end with the transaction.
//!
//! **Waiting and the heartbeat.** The heartbeat (`SELECT 1` every heartbeat,
//! the session counted lost when one gets no answer within a heartbeat) runs
//! on the session's own connection, because what it proves is that this
//! session is alive. PostgreSQL answers a connection's queries in order, so a
//! single `pg_advisory_lock` blocking for minutes would starve it. A wait is
//! therefore a series of tries: each is `pg_advisory_lock` bounded by
//! `lock_timeout` to half a heartbeat (at least 50 ms, at most the time left
//! of the caller's timeout); a try that runs out withdraws its request, the
//! heartbeat's query queued behind it is answered, and the next try asks
//! again. A wait of any length thus keeps one session that is known to be
//! alive, and a session that dies while waiting — killed, or a server that
//! stops answering — fails the wait within about two heartbeats. A wait the
//! caller abandons (drops the future) closes its session instead of keeping
//! it for reuse; the server forgets the request when the current try ends.
//! The metrics count a wait, not its tries: one `contended` when it finds
//! the lock taken, one `timed_out` when it gives up, and one wait time from
//! the call to the lock.
//!
//! [`LockManager::check_server`] refuses databases where advisory locks would
//! be silently ineffective (a pooler in transaction mode, a fake server).

mod metrics;

pub use metrics::LockMetrics;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;
use tracing::{debug, warn};

/// What a lock protects. The discriminant is the first key of the advisory lock,
/// so the values are part of the on-database contract: never renumber them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum LockClass {
    /// Schema migrations: run once across a rolling deploy.
    Migrations = 1,
    /// The single active operator replica.
    Leader = 2,
    /// One writer per destination `bucket/key`.
    ObjectKey = 3,
    /// One indexer per document.
    Document = 4,
    /// One sync run per collection.
    CollectionSync = 5,
    /// One sweeper of orphaned multipart uploads per bucket.
    Sweeper = 6,
    /// The start-up probe of [`LockManager::check_server`].
    Probe = 7,
}

impl LockClass {
    /// The label used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            LockClass::Migrations => "migrations",
            LockClass::Leader => "leader",
            LockClass::ObjectKey => "object_key",
            LockClass::Document => "document",
            LockClass::CollectionSync => "collection_sync",
            LockClass::Sweeper => "sweeper",
            LockClass::Probe => "probe",
        }
    }
}

/// A fully qualified advisory lock key: `(class, hash(resource))`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LockKey {
    class: LockClass,
    id: i32,
    resource: String,
}

impl LockKey {
    /// The key for `resource` (e.g. `bucket/key`) in `class`. The hash is the
    /// first four bytes of SHA-256, so it is stable across processes, builds
    /// and versions (unlike `std`'s `Hasher`).
    pub fn new(class: LockClass, resource: impl Into<String>) -> Self {
        let resource = resource.into();
        let digest = Sha256::digest(resource.as_bytes());
        let id = i32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
        LockKey {
            class,
            id,
            resource,
        }
    }

    pub fn class(&self) -> LockClass {
        self.class
    }

    /// The two integers passed to `pg_advisory_lock(int4, int4)`.
    pub fn pair(&self) -> (i32, i32) {
        (self.class as i32, self.id)
    }

    pub fn resource(&self) -> &str {
        &self.resource
    }
}

impl fmt::Display for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.class.as_str(), self.resource)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "cannot open a lock session to PostgreSQL: {}",
        crate::redact::text(&crate::errors::chain(.0))
    )]
    Connect(#[source] tokio_postgres::Error),
    #[error(
        "advisory lock query for {key} failed: {}",
        crate::errors::chain(source)
    )]
    Query {
        key: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("timed out after {timeout:?} waiting for lock {key}")]
    Timeout { key: String, timeout: Duration },
    #[error("lock {key} was released by the server before release() was called")]
    NotHeld { key: String },
    #[error("advisory locks do not work on this database: {0}")]
    Ineffective(String),
}

impl LockError {
    fn query(key: &LockKey) -> impl FnOnce(tokio_postgres::Error) -> LockError + '_ {
        move |source| LockError::Query {
            key: key.to_string(),
            source,
        }
    }
}

/// Hands out advisory locks. Cheap to clone.
#[derive(Clone)]
pub struct LockManager {
    config: Arc<crate::db::PgConfig>,
    metrics: LockMetrics,
    heartbeat: Duration,
    idle: IdleSessions,
}

/// Sessions that hold no lock, kept for the next acquisition: opening a
/// connection costs more than the lock itself when locks are taken per file.
type IdleSessions = Arc<std::sync::Mutex<Vec<Session>>>;

/// Most idle lock sessions kept open per manager.
const MAX_IDLE_SESSIONS: usize = 16;

/// The shortest try of a wait (see [`LockManager::try_length`]).
const MIN_TRY: Duration = Duration::from_millis(50);

impl LockManager {
    /// `heartbeat` bounds how long a silently dead session (a network
    /// partition rather than a closed socket) goes unnoticed, also while it
    /// waits for a lock; a wait asks again every half heartbeat.
    /// Sessions connect as `config` says, TLS included (as the pool does).
    pub fn new(config: crate::db::PgConfig, metrics: LockMetrics, heartbeat: Duration) -> Self {
        let mut config = config;
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(5))
            .application_name("stowage-lock");
        LockManager {
            config: Arc::new(config),
            metrics,
            heartbeat,
            idle: IdleSessions::default(),
        }
    }

    pub fn metrics(&self) -> &LockMetrics {
        &self.metrics
    }

    /// Takes `key` if it is free, without waiting.
    pub async fn try_lock(&self, key: LockKey) -> Result<Option<SessionLock>, LockError> {
        let session = self.session().await?;
        if try_on(&session, &key).await? {
            Ok(Some(self.held(session, key, Duration::ZERO)))
        } else {
            self.metrics.contended(key.class());
            park(&self.idle, session);
            Ok(None)
        }
    }

    /// Waits for `key` as long as it takes, on one session whose heartbeat
    /// goes on meanwhile (see the module doc).
    pub async fn lock(&self, key: LockKey) -> Result<SessionLock, LockError> {
        self.acquire(key, None).await
    }

    /// Waits for `key` at most `timeout`, then fails with [`LockError::Timeout`].
    pub async fn lock_with_timeout(
        &self,
        key: LockKey,
        timeout: Duration,
    ) -> Result<SessionLock, LockError> {
        self.acquire(key, Some(timeout)).await
    }

    /// Waits in tries of [`LockManager::try_length`] (see the module doc).
    ///
    /// The session is a local of this future until the lock is taken, so a
    /// caller that drops the future mid-wait (a standby's `select!` with
    /// shutdown) closes the session rather than parking it: no idle session
    /// ever has a lock request pending.
    async fn acquire(
        &self,
        key: LockKey,
        timeout: Option<Duration>,
    ) -> Result<SessionLock, LockError> {
        let started = Instant::now();
        let deadline = timeout.map(|t| started + t);
        let session = self.session().await?;
        if try_on(&session, &key).await? {
            return Ok(self.held(session, key, started.elapsed()));
        }
        self.metrics.contended(key.class());
        let (a, b) = key.pair();
        let lock_sql = format!("SELECT pg_advisory_lock({a}, {b})");
        let mut lock_timeout_ms = None;
        loop {
            let try_for = match deadline {
                None => self.try_length(),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        self.metrics.timed_out(key.class());
                        return Err(LockError::Timeout {
                            key: key.to_string(),
                            timeout: timeout.unwrap_or_default(),
                        });
                    }
                    self.try_length().min(left)
                }
            };
            // `lock_timeout` bounds advisory lock waits too (SQLSTATE 55P03);
            // it is set again only when the try's length changes.
            let millis = try_for.as_micros().div_ceil(1000).max(1);
            if lock_timeout_ms != Some(millis) {
                session
                    .client
                    .batch_execute(&format!("SET lock_timeout = {millis}"))
                    .await
                    .map_err(|e| session.failed(&key, e))?;
                lock_timeout_ms = Some(millis);
            }
            match session.client.simple_query(&lock_sql).await {
                Ok(_) => break,
                // The try ran out: the request is withdrawn, the heartbeat's
                // query (if one came) is answered now, and the next try waits.
                Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {}
                // Killed, closed, or closed by the watchdog because the
                // heartbeat got no answer: the wait fails with the session.
                Err(e) => return Err(session.failed(&key, e)),
            }
        }
        session
            .client
            .batch_execute("SET lock_timeout = 0")
            .await
            .map_err(|e| session.failed(&key, e))?;
        Ok(self.held(session, key, started.elapsed()))
    }

    /// How long one try of a wait may block the session: half a heartbeat,
    /// so that a heartbeat sent during a try is answered well within its own
    /// deadline (one heartbeat), but not so short that a wait turns into a
    /// busy loop when the heartbeat is tiny — which is why heartbeats below
    /// 100 ms leave waits less margin than that.
    fn try_length(&self) -> Duration {
        (self.heartbeat / 2).max(MIN_TRY)
    }

    /// Refuses to run where advisory locks would silently do nothing: a
    /// pooler in transaction mode (statements of one "session" land on
    /// different backends) or a server that accepts the calls as no-ops.
    /// The probe uses the simple query protocol only, so that it runs — and
    /// tells what is wrong — even where prepared statements would break.
    pub async fn check_server(&self) -> Result<(), LockError> {
        let key = LockKey::new(LockClass::Probe, format!("probe-{}", uuid::Uuid::new_v4()));
        let (a, b) = key.pair();
        let holder = self.open_session().await?;
        let other = self.open_session().await?;
        let pooler = |detail: String| {
            LockError::Ineffective(format!(
                "{detail}: a connection pooler in transaction or statement mode is in the way; \
                 point Stowage at PostgreSQL directly or at a session-mode pool"
            ))
        };
        let pid_before = probe(&holder, &key, "SELECT pg_backend_pid()").await?;
        let got = probe(
            &holder,
            &key,
            &format!("SELECT pg_try_advisory_lock({a}, {b})"),
        )
        .await?;
        if got != "t" {
            return Err(LockError::Ineffective(
                "a fresh probe lock could not be taken".into(),
            ));
        }
        let pid_after = probe(&holder, &key, "SELECT pg_backend_pid()").await?;
        if pid_before != pid_after {
            return Err(pooler(format!(
                "consecutive statements of one session ran on backends {pid_before} and {pid_after}"
            )));
        }
        let other_pid = probe(&other, &key, "SELECT pg_backend_pid()").await?;
        if other_pid == pid_after {
            return Err(pooler(format!(
                "two separate connections were served by the same backend ({other_pid})"
            )));
        }
        let visible = probe(
            &holder,
            &key,
            &format!(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = {pid_after} \
                 AND classid = ({a})::int::oid AND objid = ({b})::int::oid AND granted"
            ),
        )
        .await?;
        let stolen = probe(
            &other,
            &key,
            &format!("SELECT pg_try_advisory_lock({a}, {b})"),
        )
        .await?;
        if visible != "1" || stolen == "t" {
            return Err(LockError::Ineffective(format!(
                "a probe lock held by one session was {} in pg_locks and {} by a second session",
                if visible == "1" {
                    "visible"
                } else {
                    "not visible"
                },
                if stolen == "t" {
                    "taken again"
                } else {
                    "refused"
                },
            )));
        }
        Ok(())
    }

    /// An idle session that is still alive, or a new one.
    async fn session(&self) -> Result<Session, LockError> {
        loop {
            let parked = self.idle.lock().ok().and_then(|mut idle| idle.pop());
            match parked {
                Some(s) if s.is_alive() => return Ok(s),
                Some(dead) => drop(dead),
                None => return self.open_session().await,
            }
        }
    }

    async fn open_session(&self) -> Result<Session, LockError> {
        let (client, connection) = self.config.open().await.map_err(LockError::Connect)?;
        let client = Arc::new(client);
        let (lost_tx, lost_rx) = watch::channel(None::<String>);
        let heartbeat = self.heartbeat;
        let pinger = Arc::clone(&client);
        let watchdog = tokio::spawn(async move {
            // The heartbeat runs beside the connection future, which must keep
            // being polled for the heartbeat's own query to complete.
            let heartbeat_loop = async {
                let mut tick = tokio::time::interval(heartbeat);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    match tokio::time::timeout(heartbeat, pinger.simple_query("SELECT 1")).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return format!("lock session heartbeat failed: {e}"),
                        Err(_) => {
                            return format!(
                                "lock session heartbeat got no answer within {heartbeat:?}"
                            );
                        }
                    }
                }
            };
            tokio::pin!(connection);
            let reason = tokio::select! {
                result = &mut connection => match result {
                    Ok(()) => "the lock session's connection closed".to_string(),
                    Err(e) => format!("the lock session's connection failed: {e}"),
                },
                reason = heartbeat_loop => reason,
            };
            // Told before the connection is dropped (when this task ends):
            // whoever sees a query of this session fail for that finds why.
            let _ = lost_tx.send(Some(reason));
        });
        Ok(Session {
            client,
            watchdog,
            lost: lost_rx,
        })
    }

    fn held(&self, session: Session, key: LockKey, waited: Duration) -> SessionLock {
        self.metrics.acquired(key.class(), waited);
        debug!(lock = %key, ?waited, "advisory lock acquired");
        SessionLock {
            key,
            session: Some(session),
            acquired_at: Instant::now(),
            metrics: self.metrics.clone(),
            idle: Arc::clone(&self.idle),
        }
    }
}

/// `pg_try_advisory_lock` on `session`.
async fn try_on(session: &Session, key: &LockKey) -> Result<bool, LockError> {
    let (a, b) = key.pair();
    Ok(session
        .client
        .query_one("SELECT pg_try_advisory_lock($1, $2)", &[&a, &b])
        .await
        .map_err(LockError::query(key))?
        .get(0))
}

/// First column of the first row of a simple-protocol query, as text.
async fn probe(session: &Session, key: &LockKey, sql: &str) -> Result<String, LockError> {
    let messages = session
        .client
        .simple_query(sql)
        .await
        .map_err(LockError::query(key))?;
    Ok(messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap_or_default())
}

struct Session {
    client: Arc<Client>,
    watchdog: JoinHandle<()>,
    lost: watch::Receiver<Option<String>>,
}

impl Session {
    fn is_alive(&self) -> bool {
        self.lost.borrow().is_none() && !self.watchdog.is_finished()
    }

    /// The error for a query on this session that failed; logs why the
    /// watchdog gave the session up, when it did (the query itself then only
    /// says that the connection closed).
    fn failed(&self, key: &LockKey, source: tokio_postgres::Error) -> LockError {
        if let Some(reason) = self.lost.borrow().as_deref() {
            warn!(lock = %key, reason, "lock session lost while waiting for the lock");
        }
        LockError::query(key)(source)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // The watchdog owns the connection: ending it closes the session on
        // the server, and with it every lock the session held.
        self.watchdog.abort();
    }
}

/// Keeps a session that holds no lock for reuse, or closes it.
fn park(idle: &IdleSessions, session: Session) {
    if session.is_alive()
        && let Ok(mut idle) = idle.lock()
        && idle.len() < MAX_IDLE_SESSIONS
    {
        idle.push(session);
    }
}

/// A held session lock. Dropping it closes its connection, which releases the
/// lock on the server; [`SessionLock::release`] does it explicitly and checks.
pub struct SessionLock {
    key: LockKey,
    session: Option<Session>,
    acquired_at: Instant,
    metrics: LockMetrics,
    idle: IdleSessions,
}

impl SessionLock {
    pub fn key(&self) -> &LockKey {
        &self.key
    }

    /// False once the session that holds the lock is gone.
    pub fn is_held(&self) -> bool {
        self.session
            .as_ref()
            .is_some_and(|s| s.lost.borrow().is_none())
    }

    /// Resolves, with the reason, once the session holding the lock is lost.
    /// A holder races its work against this and stops when it fires.
    pub async fn lost(&self) -> String {
        let Some(session) = &self.session else {
            return "the lock was released".into();
        };
        let mut lost = session.lost.clone();
        match lost.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => "the lock session watchdog stopped".into(),
        }
    }

    /// Fails with [`LockError::NotHeld`] when the lock was already lost.
    pub fn ensure_held(&self) -> Result<(), LockError> {
        if self.is_held() {
            Ok(())
        } else {
            self.metrics.lost(self.key.class());
            Err(LockError::NotHeld {
                key: self.key.to_string(),
            })
        }
    }

    /// Releases the lock; its session, now holding nothing, is kept for reuse.
    pub async fn release(mut self) -> Result<(), LockError> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let (a, b) = self.key.pair();
        let result = session
            .client
            .query_one("SELECT pg_advisory_unlock($1, $2)", &[&a, &b])
            .await;
        self.metrics
            .released(self.key.class(), self.acquired_at.elapsed());
        match result {
            Ok(row) if row.get::<_, bool>(0) => {
                park(&self.idle, session);
                Ok(())
            }
            Ok(_) => Err(LockError::NotHeld {
                key: self.key.to_string(),
            }),
            Err(e) => Err(LockError::query(&self.key)(e)),
        }
    }
}

impl Drop for SessionLock {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            // Dropping the session closes its connection (see `Session`'s Drop).
            self.metrics
                .released(self.key.class(), self.acquired_at.elapsed());
            if session.lost.borrow().is_some() {
                warn!(lock = %self.key, "dropping a lock whose session was already lost");
            }
        }
    }
}

impl fmt::Debug for SessionLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionLock")
            .field("key", &self.key)
            .field("held", &self.is_held())
            .finish()
    }
}

/// Takes `key` for the rest of `tx`, waiting as long as it takes.
pub async fn xact_lock(
    tx: &tokio_postgres::Transaction<'_>,
    key: &LockKey,
) -> Result<(), LockError> {
    let (a, b) = key.pair();
    tx.execute("SELECT pg_advisory_xact_lock($1, $2)", &[&a, &b])
        .await
        .map_err(LockError::query(key))?;
    Ok(())
}

/// Takes `key` for the rest of `tx` if it is free.
pub async fn try_xact_lock(
    tx: &tokio_postgres::Transaction<'_>,
    key: &LockKey,
) -> Result<bool, LockError> {
    let (a, b) = key.pair();
    let row = tx
        .query_one("SELECT pg_try_advisory_xact_lock($1, $2)", &[&a, &b])
        .await
        .map_err(LockError::query(key))?;
    Ok(row.get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_and_class_scoped() {
        let a = LockKey::new(LockClass::ObjectKey, "bucket/a.txt");
        let b = LockKey::new(LockClass::ObjectKey, "bucket/a.txt");
        let c = LockKey::new(LockClass::Document, "bucket/a.txt");
        assert_eq!(a.pair(), b.pair());
        assert_eq!(a.pair().1, c.pair().1);
        assert_ne!(a.pair().0, c.pair().0);
        // Pinned: the hash is part of the contract between versions.
        assert_eq!(
            LockKey::new(LockClass::Leader, "stowage").pair(),
            (2, 264_906_849)
        );
    }
}
