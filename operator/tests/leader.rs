//! Leader election on the real PostgreSQL: one replica leads, the other
//! waits; when the leader's database session dies, the leader stops
//! reconciling at once and the other takes over.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use stowage_common::db;
use stowage_common::locks::{LockClass, LockKey, LockManager, LockMetrics};
use stowage_common::testing::{StackEnv, fresh_database, unique};
use stowage_operator::leader;
use stowage_operator::metrics::Metrics;
use tokio::sync::oneshot;

struct Replica {
    metrics: Metrics,
    /// Lead futures currently running (the controllers, in the operator).
    leading: Arc<AtomicUsize>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

fn replica(url: &str, name: &str) -> Replica {
    let pg = db::parse_url(url).expect("url");
    let mut registry = Registry::default();
    let locks = LockManager::new(
        pg,
        LockMetrics::register(&mut registry),
        Duration::from_millis(500),
    );
    let metrics = Metrics::register(&mut registry);
    let leading = Arc::new(AtomicUsize::new(0));
    let (stop, stopped) = oneshot::channel::<()>();
    let task = {
        let (metrics, leading, name) = (metrics.clone(), Arc::clone(&leading), name.to_string());
        tokio::spawn(async move {
            leader::run(
                &locks,
                &name,
                &metrics,
                || {
                    let leading = Arc::clone(&leading);
                    async move {
                        // Counts itself while it runs; dropping it uncounts.
                        struct Running(Arc<AtomicUsize>);
                        impl Drop for Running {
                            fn drop(&mut self) {
                                self.0.fetch_sub(1, Ordering::SeqCst);
                            }
                        }
                        leading.fetch_add(1, Ordering::SeqCst);
                        let _running = Running(leading);
                        std::future::pending::<()>().await;
                    }
                },
                async {
                    let _ = stopped.await;
                },
            )
            .await;
        })
    };
    Replica {
        metrics,
        leading,
        stop,
        task,
    }
}

async fn eventually(
    what: &str,
    within: Duration,
    mut check: impl AsyncFnMut() -> bool,
) -> Duration {
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

#[tokio::test]
async fn one_replica_leads_and_the_other_takes_over_when_its_session_dies() {
    let env = StackEnv::load();
    let url = fresh_database(&env).await;
    let name = unique("operator");
    let (k1, k2) = LockKey::new(LockClass::Leader, &name).pair();
    let (admin, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("admin");
    tokio::spawn(conn);
    let lock_rows = |granted: bool| {
        let admin = &admin;
        async move {
            admin
                .query(
                    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = $1::int::oid
                     AND objid = $2::int::oid AND objsubid = 2 AND granted = $3",
                    &[&k1, &k2, &granted],
                )
                .await
                .expect("pg_locks")
                .iter()
                .map(|r| r.get::<_, i32>(0))
                .collect::<Vec<_>>()
        }
    };

    let a = replica(&url, &name);
    eventually("A leads", Duration::from_secs(10), async || {
        a.leading.load(Ordering::SeqCst) == 1
    })
    .await;
    let b = replica(&url, &name);
    eventually(
        "B waits for the lock",
        Duration::from_secs(10),
        async || lock_rows(false).await.len() == 1,
    )
    .await;
    assert_eq!(
        b.leading.load(Ordering::SeqCst),
        0,
        "B must not lead while A does"
    );
    assert_eq!(b.metrics.leader.get(), 0);
    assert_eq!(a.metrics.leader.get(), 1);

    // A's database session dies (a network partition, a restarted server).
    let holder = lock_rows(true).await;
    assert_eq!(holder.len(), 1);
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&holder[0]])
        .await
        .expect("terminate");
    eventually("A stops reconciling", Duration::from_secs(5), async || {
        a.leading.load(Ordering::SeqCst) == 0
    })
    .await;
    eventually("B takes over", Duration::from_secs(5), async || {
        b.leading.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(b.metrics.leader.get(), 1);
    assert_eq!(a.metrics.leader.get(), 0);
    // Never two leaders: A campaigns again and waits behind B.
    eventually("A waits again", Duration::from_secs(10), async || {
        lock_rows(false).await.len() == 1
    })
    .await;
    assert_eq!(a.leading.load(Ordering::SeqCst), 0);

    // A graceful stop of the leader hands over at once.
    b.stop.send(()).expect("stop B");
    b.task.await.expect("B ends");
    eventually("A leads again", Duration::from_secs(5), async || {
        a.leading.load(Ordering::SeqCst) == 1
    })
    .await;
    a.stop.send(()).expect("stop A");
    a.task.await.expect("A ends");
    assert!(lock_rows(true).await.is_empty(), "no lock left behind");
}
