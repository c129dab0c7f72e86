//! PostgreSQL (pool and lock sessions) and NATS over TLS against the stack's
//! real servers (`scripts/stack up` turns TLS on in PostgreSQL and starts a
//! nats-server that requires TLS and a client certificate), with the
//! stack's CA and with a CA of the test's own that signed nothing there.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use stowage_common::db;
use stowage_common::locks::{LockClass, LockKey, LockManager, LockMetrics};
use stowage_common::queue::{ConsumerSettings, NatsSettings, Queue, QueueError, TaskKind};
use stowage_common::testing::{StackEnv, fresh_database, unique};
use stowage_proto::v1::{PlanUpload, Task, task};

struct Tls {
    ca: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    /// A CA the stack's servers have never heard of.
    wrong_ca: PathBuf,
    _dir: tempfile::TempDir,
}

fn tls(env: &StackEnv) -> Tls {
    let dir = tempfile::tempdir().expect("tempdir");
    let wrong_ca = dir.path().join("wrong-ca.crt");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "a CA nobody uses");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("self-signed CA");
    std::fs::write(&wrong_ca, cert.pem()).expect("write CA");
    Tls {
        ca: env.get("STOWAGE_TLS_CA").into(),
        client_cert: env.get("STOWAGE_TLS_CLIENT_CERT").into(),
        client_key: env.get("STOWAGE_TLS_CLIENT_KEY").into(),
        wrong_ca,
        _dir: dir,
    }
}

fn with(url: &str, params: &str) -> String {
    format!("{url}?{params}")
}

/// `(ssl, version, client_dn)` of the connection this query runs on.
async fn ssl_of(client: &tokio_postgres::Client) -> (bool, String, String) {
    let row = client
        .query_one(
            "SELECT ssl, coalesce(version, ''), coalesce(client_dn, '') FROM pg_stat_ssl \
             WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl");
    (row.get(0), row.get(1), row.get(2))
}

#[tokio::test]
async fn postgres_pool_and_lock_sessions_verify_full_with_the_stack_ca() {
    let env = StackEnv::load();
    let tls = tls(&env);
    let url = with(
        &fresh_database(&env).await,
        &format!("sslmode=verify-full&sslrootcert={}", tls.ca.display()),
    );
    let pg = db::parse_url(&url).expect("url");
    let pool = db::pool(&pg, 2).expect("pool");
    let locks = LockManager::new(pg, LockMetrics::default(), Duration::from_secs(1));
    // The start-up path: two probe sessions, then migrations under a lock.
    locks.check_server().await.expect("locks work over TLS");
    db::migrate(&pool, &locks).await.expect("migrate over TLS");

    let client = pool.get().await.expect("pooled connection");
    let (ssl, version, _) = ssl_of(&client).await;
    println!("pooled connection: ssl={ssl} {version}");
    assert!(
        ssl,
        "the server says the pooled connection is not encrypted"
    );

    let lock = locks
        .lock(LockKey::new(LockClass::ObjectKey, "bucket/key"))
        .await
        .expect("lock over TLS");
    // The server's view of the sessions that hold advisory locks here.
    let rows = client
        .query(
            "SELECT s.ssl FROM pg_locks l JOIN pg_stat_ssl s USING (pid) \
             JOIN pg_stat_activity a USING (pid) \
             WHERE l.locktype = 'advisory' AND l.granted AND a.datname = current_database() \
             AND a.application_name = 'stowage-lock'",
            &[],
        )
        .await
        .expect("lock sessions");
    let encrypted: Vec<bool> = rows.iter().map(|r| r.get(0)).collect();
    println!("lock sessions holding advisory locks: ssl={encrypted:?}");
    assert_eq!(encrypted, vec![true], "one lock session, encrypted");
    lock.release().await.expect("release");
}

#[tokio::test]
async fn postgres_refuses_a_server_the_ca_did_not_sign() {
    let env = StackEnv::load();
    let tls = tls(&env);
    let base = fresh_database(&env).await;
    let want = format!(
        "the PostgreSQL server's certificate is not signed by the CA in sslrootcert={}",
        tls.wrong_ca.display()
    );
    for mode in ["verify-full", "verify-ca", "require"] {
        let url = with(
            &base,
            &format!("sslmode={mode}&sslrootcert={}", tls.wrong_ca.display()),
        );
        let pg = db::parse_url(&url).expect("url");
        let pool = db::pool(&pg, 1).expect("pool");
        let e = db::DbError::from(pool.get().await.expect_err("refused")).to_string();
        println!("sslmode={mode}, pool: {e}");
        assert!(e.contains(&want), "{e}");

        let locks = LockManager::new(pg, LockMetrics::default(), Duration::from_secs(1));
        let e = locks
            .try_lock(LockKey::new(LockClass::Probe, "x"))
            .await
            .expect_err("refused")
            .to_string();
        println!("sslmode={mode}, lock session: {e}");
        assert!(e.contains(&want), "{e}");
    }
}

#[tokio::test]
async fn postgres_require_without_a_root_certificate_encrypts_without_checking() {
    let env = StackEnv::load();
    // The stack's CA is in no trust store of this machine: only a client
    // that checks nothing gets through.
    let url = with(&fresh_database(&env).await, "sslmode=require");
    let pg = db::parse_url(&url).expect("url");
    let pool = db::pool(&pg, 1).expect("pool");
    let (ssl, version, _) = ssl_of(&pool.get().await.expect("connection")).await;
    println!("sslmode=require: ssl={ssl} {version}");
    assert!(ssl);

    let plain = db::parse_url(&fresh_database(&env).await).expect("url");
    let pool = db::pool(&plain, 1).expect("pool");
    let (ssl, _, _) = ssl_of(&pool.get().await.expect("connection")).await;
    assert!(!ssl, "no sslmode: plaintext, as before");
}

#[tokio::test]
async fn postgres_verify_ca_skips_the_host_name_and_verify_full_does_not() {
    let env = StackEnv::load();
    let tls = tls(&env);
    let db_url = fresh_database(&env).await;
    let (_, dbname) = db_url.rsplit_once('/').expect("database name");
    let port = db_url
        .split(':')
        .nth(2)
        .and_then(|p| p.split('/').next())
        .expect("port");
    // Reached under a name the certificate does not list.
    let conninfo = |mode: &str| {
        format!(
            "host=db.stowage.invalid hostaddr=127.0.0.1 port={port} user=stowage dbname={dbname} \
             sslmode={mode} sslrootcert='{}'",
            tls.ca.display()
        )
    };
    let pool = db::pool(&db::parse_url(&conninfo("verify-ca")).expect("url"), 1).expect("pool");
    let (ssl, _, _) = ssl_of(&pool.get().await.expect("verify-ca ignores the name")).await;
    assert!(ssl);

    let pool = db::pool(&db::parse_url(&conninfo("verify-full")).expect("url"), 1).expect("pool");
    let e = db::DbError::from(pool.get().await.expect_err("refused")).to_string();
    println!("verify-full under another name: {e}");
    assert!(
        e.contains("the PostgreSQL server's certificate does not name the host"),
        "{e}"
    );
}

#[tokio::test]
async fn postgres_client_certificate_reaches_the_server() {
    let env = StackEnv::load();
    let tls = tls(&env);
    let url = with(
        &fresh_database(&env).await,
        &format!(
            "sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
            tls.ca.display(),
            tls.client_cert.display(),
            tls.client_key.display()
        ),
    );
    let pool = db::pool(&db::parse_url(&url).expect("url"), 1).expect("pool");
    let (ssl, _, dn) = ssl_of(&pool.get().await.expect("connection")).await;
    println!("client certificate seen by the server: {dn}");
    assert!(ssl);
    assert!(dn.contains("CN=stowage-client"), "{dn}");
}

fn nats_tls(env: &StackEnv, tls: &Tls, ca: &Path, client_cert: bool) -> NatsSettings {
    NatsSettings {
        tls_ca_file: Some(ca.to_path_buf()),
        tls_cert: client_cert.then(|| tls.client_cert.clone()),
        tls_key: client_cert.then(|| tls.client_key.clone()),
        ..NatsSettings::new(env.get("STOWAGE_NATS_TLS_URL"), unique("tls"))
    }
}

#[tokio::test]
async fn nats_over_tls_with_the_ca_and_a_client_certificate() {
    let env = StackEnv::load();
    let tls = tls(&env);
    let q = Queue::connect(&nats_tls(&env, &tls, &tls.ca, true))
        .await
        .expect("connect over TLS");
    assert!(
        q.client().server_info().tls_required,
        "the server requires TLS"
    );
    q.ensure(&ConsumerSettings::default())
        .await
        .expect("streams over TLS");
    let subject = q.topology().task_subject(TaskKind::UploadPlan, "ns", "job");
    let task = Task {
        task_id: "upload-plan/tls".into(),
        kind: Some(task::Kind::PlanUpload(PlanUpload { job_id: "j".into() })),
    };
    let published = q.publish_task(&subject, &task).await.expect("publish");
    assert!(!published.duplicate);
    assert_eq!(q.backlog().await.expect("backlog"), 1);
}

#[tokio::test]
async fn nats_refuses_a_server_the_ca_did_not_sign_at_once() {
    let env = StackEnv::load();
    let tls = tls(&env);
    let started = Instant::now();
    let e = Queue::connect(&nats_tls(&env, &tls, &tls.wrong_ca, true))
        .await
        .err()
        .expect("refused");
    println!("{e} (after {:?})", started.elapsed());
    assert!(matches!(e, QueueError::Tls { .. }), "{e:?}");
    let want = format!(
        "the NATS server's certificate is not signed by the CA in --nats-tls-ca-file {}",
        tls.wrong_ca.display()
    );
    assert!(e.to_string().contains(&want), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a refused certificate is not retried"
    );
}

#[tokio::test]
async fn nats_without_a_client_certificate_is_refused() {
    let env = StackEnv::load();
    let tls = tls(&env);
    let e = Queue::connect(&nats_tls(&env, &tls, &tls.ca, false))
        .await
        .err()
        .expect("refused");
    println!("{e}");
    assert!(e.to_string().contains("client certificate"), "{e}");
}

/// A nats-server of the test's own (the stack's binary), TLS with the
/// stack's server certificate and one user known by its NKey. Killed on drop.
struct NkeyServer {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for NkeyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nkey_server(env: &StackEnv, user_public_key: &str) -> NkeyServer {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let conf = dir.path().join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "listen: 127.0.0.1:{port}\n\
             tls {{ cert_file: \"{}\", key_file: \"{}\" }}\n\
             authorization {{ users = [ {{ nkey: \"{user_public_key}\" }} ] }}\n",
            env.get("STOWAGE_TLS_SERVER_CERT"),
            env.get("STOWAGE_TLS_SERVER_KEY"),
        ),
    )
    .expect("config");
    let child = std::process::Command::new(env.get("STOWAGE_NATS_SERVER"))
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("nats-server starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nats-server did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    NkeyServer {
        child,
        url: format!("tls://localhost:{port}"),
        _dir: dir,
    }
}

#[tokio::test]
async fn nats_nkey_file_authenticates_and_a_wrong_seed_is_refused() {
    let env = StackEnv::load();
    let tls = tls(&env);
    let user = nkeys::KeyPair::new_user();
    let server = nkey_server(&env, &user.public_key());
    let dir = tempfile::tempdir().expect("tempdir");
    let seed_file = |name: &str, seed: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, format!("{seed}\n")).expect("seed file");
        p
    };
    let settings = |nkey_file: PathBuf| NatsSettings {
        tls_ca_file: Some(tls.ca.clone()),
        nkey_file: Some(nkey_file),
        ..NatsSettings::new(&server.url, unique("nk"))
    };

    let good = seed_file("user.nk", user.seed().expect("seed"));
    let q = Queue::connect(&settings(good))
        .await
        .expect("NKey accepted");
    q.client().flush().await.expect("round trip");

    let stranger = seed_file(
        "stranger.nk",
        nkeys::KeyPair::new_user().seed().expect("seed"),
    );
    let e = Queue::connect(&settings(stranger))
        .await
        .err()
        .expect("unknown NKey refused");
    println!("unknown NKey: {e}");
    assert!(e.to_string().contains("authorization violation"), "{e}");

    let junk = seed_file("junk.nk", "not a seed".into());
    let e = Queue::connect(&settings(junk)).await.err().expect("junk");
    println!("junk NKey file: {e}");
    assert!(e.to_string().contains("holds no user seed"), "{e}");
}

#[tokio::test]
async fn nats_credential_files_are_checked_before_connecting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let junk = dir.path().join("junk.creds");
    std::fs::write(&junk, "not a creds file\n").expect("write");
    let settings = NatsSettings {
        creds_file: Some(junk.clone()),
        ..NatsSettings::new("nats://127.0.0.1:1", unique("c"))
    };
    let e = Queue::connect(&settings).await.err().expect("refused");
    println!("{e}");
    assert!(
        e.to_string().contains(&format!(
            "the NATS credentials file {} is not a user JWT and NKey seed",
            junk.display()
        )),
        "{e}"
    );

    let missing = NatsSettings {
        creds_file: Some(dir.path().join("missing.creds")),
        ..NatsSettings::new("nats://127.0.0.1:1", unique("c"))
    };
    let e = Queue::connect(&missing).await.err().expect("refused");
    assert!(
        e.to_string()
            .contains("cannot read the NATS credentials file"),
        "{e}"
    );

    let both = NatsSettings {
        nkey_file: Some(junk),
        ..settings
    };
    let e = Queue::connect(&both).await.err().expect("refused");
    assert!(e.to_string().contains("not both"), "{e}");
}
