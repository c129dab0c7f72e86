//! The lock library against the stack's real PostgreSQL.

use std::time::{Duration, Instant};

use stowage_common::db;
use stowage_common::locks::{
    LockClass, LockError, LockKey, LockManager, LockMetrics, try_xact_lock, xact_lock,
};
use stowage_common::testing::{StackEnv, fresh_database, unique};

async fn manager() -> (LockManager, tokio_postgres::Client) {
    let url = fresh_database(&StackEnv::load()).await;
    let pg = db::parse_url(&url).expect("url");
    let (admin, conn) = pg.connect(tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(conn);
    (
        LockManager::new(pg, LockMetrics::default(), Duration::from_millis(500)),
        admin,
    )
}

fn key(class: LockClass) -> LockKey {
    LockKey::new(class, unique("res-"))
}

async fn advisory_locks_held(admin: &tokio_postgres::Client, k: &LockKey) -> i64 {
    let (a, b) = k.pair();
    admin
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted
             AND classid = $1::int::oid AND objid = $2::int::oid",
            &[&a, &b],
        )
        .await
        .expect("pg_locks")
        .get(0)
}

#[tokio::test]
async fn server_check_accepts_real_postgres() {
    let (locks, _) = manager().await;
    locks
        .check_server()
        .await
        .expect("PostgreSQL has working advisory locks");
}

#[tokio::test]
async fn contention_and_release_on_drop() {
    let (locks, admin) = manager().await;
    let k = key(LockClass::ObjectKey);
    let held = locks
        .try_lock(k.clone())
        .await
        .expect("query")
        .expect("free lock is taken");
    assert!(held.is_held());
    assert_eq!(advisory_locks_held(&admin, &k).await, 1);
    assert!(
        locks.try_lock(k.clone()).await.expect("query").is_none(),
        "second holder refused"
    );
    assert_eq!(locks.metrics().contended_total(LockClass::ObjectKey), 1);
    assert_eq!(locks.metrics().held_now(LockClass::ObjectKey), 1);

    drop(held);
    // The server releases the lock when the dropped guard's session closes.
    let deadline = Instant::now() + Duration::from_secs(5);
    let again = loop {
        if let Some(l) = locks.try_lock(k.clone()).await.expect("query") {
            break l;
        }
        assert!(Instant::now() < deadline, "lock not released after drop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    again.release().await.expect("explicit release");
    assert_eq!(advisory_locks_held(&admin, &k).await, 0, "nothing leaked");
    assert_eq!(locks.metrics().held_now(LockClass::ObjectKey), 0);
}

#[tokio::test]
async fn waiting_with_timeout_and_blocking() {
    let (locks, _) = manager().await;
    let k = key(LockClass::CollectionSync);
    let holder = locks.lock(k.clone()).await.expect("free lock");
    let started = Instant::now();
    let err = locks
        .lock_with_timeout(k.clone(), Duration::from_millis(300))
        .await
        .expect_err("held elsewhere");
    assert!(matches!(err, LockError::Timeout { .. }), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        locks.metrics().timed_out_total(LockClass::CollectionSync),
        1
    );

    // A blocking waiter gets the lock as soon as the holder releases it.
    let waiter = {
        let locks = locks.clone();
        let k = k.clone();
        tokio::spawn(async move { locks.lock_with_timeout(k, Duration::from_secs(10)).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !waiter.is_finished(),
        "waiter must wait while the lock is held"
    );
    holder.release().await.expect("release");
    let got = waiter.await.expect("join").expect("acquired after release");
    assert!(got.is_held());
}

#[tokio::test]
async fn lost_session_is_reported_to_the_holder() {
    let (locks, admin) = manager().await;
    let k = key(LockClass::Document);
    let held = locks
        .try_lock(k.clone())
        .await
        .expect("query")
        .expect("free");
    let (a, b) = k.pair();
    let pid: i32 = admin
        .query_one(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = $1::int::oid AND objid = $2::int::oid",
            &[&a, &b],
        )
        .await
        .expect("holder pid")
        .get(0);
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("terminate");
    let reason = tokio::time::timeout(Duration::from_secs(5), held.lost())
        .await
        .expect("the holder is told within seconds");
    assert!(!reason.is_empty());
    assert!(!held.is_held());
    assert!(matches!(held.ensure_held(), Err(LockError::NotHeld { .. })));
    // And the lock is free for someone else.
    assert!(locks.try_lock(k).await.expect("query").is_some());
}

#[tokio::test]
async fn transaction_locks_end_with_the_transaction() {
    let url = fresh_database(&StackEnv::load()).await;
    let pg = db::parse_url(&url).expect("url");
    let pool = db::pool(&pg, 4).expect("pool");
    let k = key(LockClass::Document);
    let mut c1 = pool.get().await.expect("c1");
    let mut c2 = pool.get().await.expect("c2");
    let tx1 = c1.transaction().await.expect("tx1");
    xact_lock(&tx1, &k).await.expect("lock in tx1");
    {
        let tx2 = c2.transaction().await.expect("tx2");
        assert!(
            !try_xact_lock(&tx2, &k).await.expect("query"),
            "held by tx1"
        );
        tx2.rollback().await.expect("rollback");
    }
    tx1.commit().await.expect("commit");
    let tx2 = c2.transaction().await.expect("tx2");
    assert!(
        try_xact_lock(&tx2, &k).await.expect("query"),
        "free after commit"
    );
    tx2.commit().await.expect("commit");
}

/// PgBouncer in transaction mode between Stowage and PostgreSQL: session
/// locks would silently stop protecting anything, so start-up must refuse.
#[tokio::test]
async fn server_check_refuses_a_transaction_mode_pooler() {
    let err = check_through_pgbouncer("transaction")
        .await
        .expect_err("a transaction-mode pooler must be refused");
    assert!(matches!(err, LockError::Ineffective(_)), "{err}");
    assert!(err.to_string().contains("pooler"), "{err}");
}

/// A session-mode pooler keeps one backend per client: locks work there.
#[tokio::test]
async fn server_check_accepts_a_session_mode_pooler() {
    check_through_pgbouncer("session")
        .await
        .expect("session pooling keeps advisory locks working");
}

async fn check_through_pgbouncer(pool_mode: &str) -> Result<(), LockError> {
    use std::os::unix::fs::PermissionsExt;

    let env = StackEnv::load();
    let pgbouncer = env.get("STOWAGE_PGBOUNCER");
    let url = fresh_database(&env).await;
    let pg = db::parse_url(&url).expect("url");
    let tokio_postgres::config::Host::Tcp(host) = &pg.get_hosts()[0] else {
        panic!("the stack's PostgreSQL is reached over TCP")
    };
    let db_port = pg.get_ports()[0];
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let ini = dir.path().join("pgbouncer.ini");
    std::fs::write(dir.path().join("users.txt"), "\"stowage\" \"\"\n").expect("users");
    std::fs::write(
        &ini,
        format!(
            "[databases]\n* = host={host} port={db_port}\n[pgbouncer]\nlisten_addr = 127.0.0.1\n\
             listen_port = {port}\nunix_socket_dir =\nauth_type = trust\nauth_file = {}\n\
             pool_mode = {pool_mode}\nlogfile = {}\npidfile = {}\n",
            dir.path().join("users.txt").display(),
            dir.path().join("pgbouncer.log").display(),
            dir.path().join("pgbouncer.pid").display(),
        ),
    )
    .expect("ini");
    // PgBouncer refuses to run as root; -u drops to the postgres user.
    let mut cmd = std::process::Command::new(&pgbouncer);
    if running_as_root() {
        cmd.args(["-u", "postgres"]);
    }
    let mut child = cmd.arg("-q").arg(&ini).spawn().expect("start pgbouncer");
    let pooled_url = url.replace(&format!("{host}:{db_port}"), &format!("127.0.0.1:{port}"));
    let pooled = db::parse_url(&pooled_url).expect("url");
    let deadline = Instant::now() + Duration::from_secs(10);
    while pooled.connect(tokio_postgres::NoTls).await.is_err() {
        assert!(Instant::now() < deadline, "pgbouncer did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let locks = LockManager::new(pooled, LockMetrics::default(), Duration::from_secs(1));
    let result = locks.check_server().await;
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

async fn lock_sessions(admin: &tokio_postgres::Client) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'stowage-lock' AND datname = current_database()",
            &[],
        )
        .await
        .expect("pg_stat_activity")
        .get(0)
}

#[tokio::test]
async fn released_sessions_are_reused_and_refused_ones_do_not_leak() {
    let (locks, admin) = manager().await;
    let held = locks
        .try_lock(key(LockClass::ObjectKey))
        .await
        .expect("q")
        .expect("free");
    let k = key(LockClass::ObjectKey);
    let busy = locks.lock(k.clone()).await.expect("free");
    // Contention many times over: each refused attempt must not keep a connection.
    for _ in 0..20 {
        assert!(locks.try_lock(k.clone()).await.expect("q").is_none());
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while lock_sessions(&admin).await > 3 {
        assert!(
            Instant::now() < deadline,
            "refused attempts leaked connections"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    busy.release().await.expect("release");
    held.release().await.expect("release");
    let before = lock_sessions(&admin).await;
    // Per-file locking: released sessions are taken again, not reopened.
    for _ in 0..20 {
        let l = locks
            .try_lock(key(LockClass::ObjectKey))
            .await
            .expect("q")
            .expect("free");
        l.release().await.expect("release");
    }
    assert_eq!(lock_sessions(&admin).await, before);
}
