//! Leader election on a PostgreSQL advisory lock: the replica holding the
//! `leader` lock reconciles; the others wait in `pg_advisory_lock` and take
//! over the moment the leader's session ends (process killed, connection
//! lost). A leader whose session is lost stops reconciling at once: the
//! controllers' future is dropped, which cancels every reconcile in flight.

use std::future::Future;

use stowage_common::locks::{LockClass, LockError, LockKey, LockManager};
use tracing::{error, info, warn};

use crate::metrics::Metrics;

/// Campaigns for leadership and runs `lead()` while leading, again and
/// again, until `shutdown` resolves (then the lock is released).
pub async fn run<F, Fut>(
    locks: &LockManager,
    name: &str,
    metrics: &Metrics,
    mut lead: F,
    shutdown: impl Future<Output = ()>,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    tokio::pin!(shutdown);
    loop {
        info!(lock = name, "waiting for leadership");
        let lock = tokio::select! {
            l = locks.lock(LockKey::new(LockClass::Leader, name)) => l,
            () = &mut shutdown => return,
        };
        let lock = match lock {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "leader lock unavailable; trying again in 2s");
                tokio::select! {
                    () = tokio::time::sleep(std::time::Duration::from_secs(2)) => continue,
                    () = &mut shutdown => return,
                }
            }
        };
        info!(lock = name, "leading: reconciling");
        metrics.leader.set(1);
        metrics.leader_changes.inc();
        let stop = tokio::select! {
            () = lead() => {
                info!("controllers stopped");
                true
            }
            reason = lock.lost() => {
                error!(reason, "leadership lost: stopped reconciling");
                false
            }
            () = &mut shutdown => true,
        };
        metrics.leader.set(0);
        if stop {
            release(lock).await;
            return;
        }
    }
}

async fn release(lock: stowage_common::locks::SessionLock) {
    match lock.release().await {
        Ok(()) | Err(LockError::NotHeld { .. }) => info!("leadership released"),
        Err(e) => {
            warn!(error = %e, "releasing the leader lock (its session ends with the process)")
        }
    }
}
