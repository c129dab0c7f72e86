//! The lock library against the stack's real PostgreSQL.

use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
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
    let (locks, admin) = manager().await;
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
    waiting_backend(&admin, &k).await;
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

// ---------------------------------------------------------------------------
// Waits longer than the heartbeat. A lock session's heartbeat runs on the
// connection that also waits for the lock; these tests hold a lock for many
// heartbeats and check that waiting is still waiting, not a lost session.

/// How long to look for a condition on the server before failing the test.
const WITHIN: Duration = Duration::from_secs(5);

/// A lock manager with `heartbeat` whose metrics are registered in the
/// returned registry, plus an admin connection and the database's URL.
async fn setup(heartbeat: Duration) -> (LockManager, tokio_postgres::Client, Registry, String) {
    let url = fresh_database(&StackEnv::load()).await;
    let pg = db::parse_url(&url).expect("url");
    let (admin, conn) = pg.connect(tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(conn);
    let mut registry = Registry::default();
    let metrics = LockMetrics::register(&mut registry);
    (
        LockManager::new(pg, metrics, heartbeat),
        admin,
        registry,
        url,
    )
}

/// The backend whose request for `k` is in pg_locks and not granted, as soon
/// as there is one. A waiter asks again and again, so poll often.
async fn waiting_backend(admin: &tokio_postgres::Client, k: &LockKey) -> i32 {
    let (a, b) = k.pair();
    let deadline = Instant::now() + WITHIN;
    loop {
        let rows = admin
            .query(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
                 AND classid = $1::int::oid AND objid = $2::int::oid",
                &[&a, &b],
            )
            .await
            .expect("pg_locks");
        if let Some(row) = rows.first() {
            return row.get(0);
        }
        assert!(
            Instant::now() < deadline,
            "nobody is waiting for {k} after {WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Requests for `k` that are waiting on the server.
async fn waiting_requests(admin: &tokio_postgres::Client, k: &LockKey) -> i64 {
    let (a, b) = k.pair();
    admin
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
             AND classid = $1::int::oid AND objid = $2::int::oid",
            &[&a, &b],
        )
        .await
        .expect("pg_locks")
        .get(0)
}

/// The backend that holds `k`, if any.
async fn holding_backend(admin: &tokio_postgres::Client, k: &LockKey) -> Option<i32> {
    let (a, b) = k.pair();
    admin
        .query_opt(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted
             AND classid = $1::int::oid AND objid = $2::int::oid",
            &[&a, &b],
        )
        .await
        .expect("pg_locks")
        .map(|r| r.get(0))
}

/// The backends of this database's lock sessions, sorted.
async fn lock_backends(admin: &tokio_postgres::Client) -> Vec<i32> {
    admin
        .query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'stowage-lock'
             AND datname = current_database() ORDER BY pid",
            &[],
        )
        .await
        .expect("pg_stat_activity")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Watches `waiter` for `period` and fails the test if it stops waiting.
async fn still_waiting_for<T: std::fmt::Debug>(
    waiter: &mut tokio::task::JoinHandle<T>,
    period: Duration,
) {
    let until = Instant::now() + period;
    while Instant::now() < until {
        if waiter.is_finished() {
            let result = waiter.await;
            panic!("the waiter stopped waiting while the lock was still held: {result:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A sample of the registry, e.g. `stowage_lock_wait_seconds_sum{class="document"}`.
fn sample(registry: &Registry, series: &str) -> f64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).expect("encode metrics");
    text.lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in\n{text}"))
}

/// (a) A wait of several heartbeats ends with the lock when the holder lets
/// go — on the session that waited, which is alive and stays so.
#[tokio::test]
async fn a_wait_of_several_heartbeats_ends_with_the_lock() {
    let heartbeat = Duration::from_millis(200);
    let (locks, admin, registry, _) = setup(heartbeat).await;
    let k = key(LockClass::Document);
    let holder = locks
        .try_lock(k.clone())
        .await
        .expect("query")
        .expect("free");
    let started = Instant::now();
    let mut waiter = {
        let (locks, k) = (locks.clone(), k.clone());
        // As an indexer waits for a document (DOCUMENT_LOCK_WAIT).
        tokio::spawn(async move { locks.lock_with_timeout(k, Duration::from_secs(60)).await })
    };
    let waiting_pid = waiting_backend(&admin, &k).await;
    still_waiting_for(&mut waiter, 4 * heartbeat).await;
    holder.release().await.expect("release");
    let got = tokio::time::timeout(WITHIN, &mut waiter)
        .await
        .expect("the waiter takes the lock soon after its release")
        .expect("join")
        .expect("a wait of four heartbeats ends with the lock");
    let waited = started.elapsed();
    eprintln!("took the lock after waiting {waited:?}");
    assert!(got.is_held());
    assert_eq!(
        holding_backend(&admin, &k).await,
        Some(waiting_pid),
        "the lock belongs to the session that waited for it"
    );
    // Its heartbeat still gets answers: nothing reports it lost.
    assert!(
        tokio::time::timeout(3 * heartbeat, got.lost())
            .await
            .is_err(),
        "the session that waited is reported lost"
    );
    assert!(got.is_held());
    assert!(got.ensure_held().is_ok());
    // One contention, no time-out, and the wait measured whole.
    assert_eq!(locks.metrics().contended_total(LockClass::Document), 1);
    assert_eq!(locks.metrics().timed_out_total(LockClass::Document), 0);
    let class = r#"{class="document"}"#;
    assert_eq!(
        sample(
            &registry,
            &format!("stowage_lock_wait_seconds_count{class}")
        ),
        2.0
    );
    let wait_sum = sample(&registry, &format!("stowage_lock_wait_seconds_sum{class}"));
    assert!(
        wait_sum >= (4 * heartbeat).as_secs_f64() && wait_sum <= waited.as_secs_f64(),
        "wait time {wait_sum}s recorded for a wait of {waited:?}"
    );
    got.release().await.expect("release");
    assert_eq!(locks.metrics().held_now(LockClass::Document), 0);
}

/// (b) An operator standby (`lock()`, no timeout) waits a full minute behind
/// the leader on one session — no reconnects — and leads when the leader goes.
#[tokio::test]
async fn a_standby_keeps_one_session_for_a_minute() {
    let heartbeat = Duration::from_millis(250);
    let (locks, admin, _, _) = setup(heartbeat).await;
    let k = key(LockClass::Leader);
    let leader = locks
        .try_lock(k.clone())
        .await
        .expect("query")
        .expect("free");
    let mut standby = {
        let (locks, k) = (locks.clone(), k.clone());
        tokio::spawn(async move { locks.lock(k).await })
    };
    let standby_pid = waiting_backend(&admin, &k).await;
    let sessions = lock_backends(&admin).await;
    assert_eq!(
        sessions.len(),
        2,
        "the leader's and the standby's: {sessions:?}"
    );
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        still_waiting_for(&mut standby, Duration::from_millis(500)).await;
        assert_eq!(
            lock_backends(&admin).await,
            sessions,
            "lock sessions changed after {:?} of waiting",
            started.elapsed()
        );
    }
    assert_eq!(waiting_backend(&admin, &k).await, standby_pid);
    leader.release().await.expect("release");
    let lead = tokio::time::timeout(WITHIN, &mut standby)
        .await
        .expect("the standby leads soon after the leader goes")
        .expect("join")
        .expect("the standby takes the lock");
    assert!(lead.is_held());
    assert_eq!(holding_backend(&admin, &k).await, Some(standby_pid));
    assert_eq!(
        lock_backends(&admin).await,
        sessions,
        "still the same sessions"
    );
    assert_eq!(locks.metrics().contended_total(LockClass::Leader), 1);
}

/// (c) A time-out several heartbeats long is reached — not cut short by the
/// heartbeat — and reported as a time-out, once.
#[tokio::test]
async fn a_long_wait_times_out_at_its_timeout() {
    let heartbeat = Duration::from_millis(200);
    let (locks, admin, _, _) = setup(heartbeat).await;
    let k = key(LockClass::CollectionSync);
    let holder = locks
        .try_lock(k.clone())
        .await
        .expect("query")
        .expect("free");
    // Not a multiple of the waiter's tries: the last one is cut to fit.
    let timeout = Duration::from_millis(1_130);
    let started = Instant::now();
    let err = locks
        .lock_with_timeout(k.clone(), timeout)
        .await
        .expect_err("held elsewhere");
    let waited = started.elapsed();
    eprintln!("timed out after {waited:?} with a {timeout:?} timeout: {err}");
    match &err {
        LockError::Timeout { timeout: t, .. } => assert_eq!(*t, timeout),
        other => panic!("expected a time-out after {timeout:?}, got after {waited:?}: {other}"),
    }
    assert!(waited >= timeout, "gave up after {waited:?}");
    assert!(
        waited < timeout + Duration::from_millis(400),
        "gave up {waited:?} after a {timeout:?} timeout"
    );
    assert_eq!(
        locks.metrics().timed_out_total(LockClass::CollectionSync),
        1
    );
    assert_eq!(
        locks.metrics().contended_total(LockClass::CollectionSync),
        1
    );
    assert_eq!(locks.metrics().held_now(LockClass::CollectionSync), 1);
    assert_eq!(
        waiting_requests(&admin, &k).await,
        0,
        "no request left behind"
    );
    assert!(holder.is_held());
}

/// (d) A waiting session killed on the server fails the wait at once, and
/// the dead session is not handed out again.
#[tokio::test]
async fn a_waiting_session_killed_by_the_server_fails_the_wait() {
    let heartbeat = Duration::from_millis(200);
    let (locks, admin, _, _) = setup(heartbeat).await;
    let k = key(LockClass::ObjectKey);
    let holder = locks
        .try_lock(k.clone())
        .await
        .expect("query")
        .expect("free");
    let mut waiter = {
        let (locks, k) = (locks.clone(), k.clone());
        tokio::spawn(async move { locks.lock(k).await })
    };
    waiting_backend(&admin, &k).await;
    still_waiting_for(&mut waiter, 3 * heartbeat).await;
    let pid = waiting_backend(&admin, &k).await;
    let killed = Instant::now();
    let terminated: bool = admin
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("terminate")
        .get(0);
    assert!(terminated);
    let err = tokio::time::timeout(Duration::from_secs(1), &mut waiter)
        .await
        .expect("the wait fails within a second of the kill")
        .expect("join")
        .expect_err("a killed session cannot take the lock");
    assert!(matches!(err, LockError::Query { .. }), "{err}");
    eprintln!("killed after {:?}: {err}", killed.elapsed());
    assert!(holder.is_held(), "the holder is not affected");
    holder.release().await.expect("release");
    let again = locks
        .lock_with_timeout(k.clone(), WITHIN)
        .await
        .expect("the next wait gets a live session");
    assert!(again.is_held());
}

/// (e) A server that stops answering during a wait (a partition, not a
/// closed socket) is noticed by the heartbeat, which goes on between tries.
#[tokio::test]
async fn a_silent_server_is_noticed_during_a_wait() {
    let heartbeat = Duration::from_millis(200);
    let (locks, admin, _, url) = setup(heartbeat).await;
    let pg = db::parse_url(&url).expect("url");
    let tokio_postgres::config::Host::Tcp(host) = &pg.get_hosts()[0] else {
        panic!("the stack's PostgreSQL is reached over TCP")
    };
    let upstream = format!("{host}:{}", pg.get_ports()[0]);
    let (port, freeze) = freezable_proxy(upstream.clone()).await;
    let proxied =
        db::parse_url(&url.replace(&upstream, &format!("127.0.0.1:{port}"))).expect("proxied url");
    let behind_proxy = LockManager::new(proxied, LockMetrics::default(), heartbeat);
    let k = key(LockClass::ObjectKey);
    let holder = locks
        .try_lock(k.clone())
        .await
        .expect("query")
        .expect("free");
    let mut waiter = {
        let k = k.clone();
        tokio::spawn(async move { behind_proxy.lock(k).await })
    };
    waiting_backend(&admin, &k).await;
    still_waiting_for(&mut waiter, 3 * heartbeat).await;
    freeze.send_replace(true);
    let frozen = Instant::now();
    let err = tokio::time::timeout(10 * heartbeat, &mut waiter)
        .await
        .expect("a silent server is noticed within a few heartbeats")
        .expect("join")
        .expect_err("no lock from a silent server");
    eprintln!("noticed after {:?}: {err}", frozen.elapsed());
    assert!(holder.is_held());
}

/// (f) A wait the caller gives up (a standby shutting down in
/// `tokio::select!`) leaves no request and no session behind: the server
/// drops the request within one try, so nobody takes the lock for a caller
/// that is gone.
#[tokio::test]
async fn a_wait_given_up_by_the_caller_leaves_nothing_behind() {
    let heartbeat = Duration::from_millis(200);
    let (locks, admin, _, _) = setup(heartbeat).await;
    let k = key(LockClass::Leader);
    let holder = locks
        .try_lock(k.clone())
        .await
        .expect("query")
        .expect("free");
    let holder_pid = holding_backend(&admin, &k).await.expect("held");
    let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
    let standby = {
        let (locks, k) = (locks.clone(), k.clone());
        tokio::spawn(async move {
            tokio::select! {
                l = locks.lock(k) => Some(l),
                _ = stop => None,
            }
        })
    };
    waiting_backend(&admin, &k).await;
    shutdown.send(()).expect("standby running");
    assert!(
        standby.await.expect("join").is_none(),
        "shut down while waiting"
    );
    let given_up = Instant::now();
    let deadline = given_up + Duration::from_secs(2);
    while waiting_requests(&admin, &k).await > 0 || lock_backends(&admin).await != [holder_pid] {
        assert!(
            Instant::now() < deadline,
            "2s after the wait was given up: {} request(s) waiting, lock sessions {:?}",
            waiting_requests(&admin, &k).await,
            lock_backends(&admin).await
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!(
        "request gone {:?} after the wait was given up",
        given_up.elapsed()
    );
    holder.release().await.expect("release");
    let next = locks
        .try_lock(k.clone())
        .await
        .expect("query")
        .expect("nobody took the lock for the caller that left");
    assert_eq!(
        holding_backend(&admin, &k).await,
        Some(holder_pid),
        "a parked session, reused"
    );
    next.release().await.expect("release");
}

/// A TCP proxy to `upstream` that stops passing bytes (both ways, sockets
/// open) once `true` is sent on the returned channel.
async fn freezable_proxy(upstream: String) -> (u16, tokio::sync::watch::Sender<bool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pipe(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        mut frozen: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if frozen.wait_for(|f| !f).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind proxy");
    let port = listener.local_addr().expect("proxy address").port();
    let (freeze, frozen) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                continue;
            };
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::spawn(pipe(client_read, server_write, frozen.clone()));
            tokio::spawn(pipe(server_read, client_write, frozen.clone()));
        }
    });
    (port, freeze)
}
