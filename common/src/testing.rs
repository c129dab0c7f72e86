//! Support for integration tests that run on the real local stack started by
//! `scripts/stack up`: connection settings, a fresh database per test, a
//! unique queue prefix per test. Enabled by the `testing` feature.

use std::collections::HashMap;
use std::path::PathBuf;

/// The local stack's settings: the `STOWAGE_*` variables of the environment,
/// falling back to the env file `scripts/stack up` writes.
#[derive(Clone, Debug)]
pub struct StackEnv {
    vars: HashMap<String, String>,
}

impl StackEnv {
    pub fn load() -> Self {
        let mut vars: HashMap<String, String> = HashMap::new();
        let file = std::env::var("STOWAGE_STACK_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                let cache = std::env::var("XDG_CACHE_HOME")
                    .map(PathBuf::from)
                    .unwrap_or_else(|_| {
                        PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                            .join(".cache")
                    });
                cache.join("stowage").join("stack")
            })
            .join("env");
        if let Ok(text) = std::fs::read_to_string(&file) {
            for line in text.lines() {
                let line = line.trim().trim_start_matches("export ").trim();
                if let Some((k, v)) = line.split_once('=') {
                    vars.insert(k.to_string(), v.trim_matches(['"', '\'']).to_string());
                }
            }
        }
        for (k, v) in std::env::vars() {
            if k.starts_with("STOWAGE_") {
                vars.insert(k, v);
            }
        }
        StackEnv { vars }
    }

    /// The variable; without it the test process stops with one line saying
    /// how to start the stack.
    pub fn get(&self, key: &str) -> String {
        self.vars.get(key).cloned().unwrap_or_else(|| {
            stack_missing(&format!(
                "{key} is not set (the env file `scripts/stack up` writes is missing or old)"
            ))
        })
    }

    pub fn try_get(&self, key: &str) -> Option<String> {
        self.vars.get(key).cloned()
    }

    pub fn database_url(&self) -> String {
        self.get("STOWAGE_DATABASE_URL")
    }

    pub fn nats_url(&self) -> String {
        self.get("STOWAGE_NATS_URL")
    }

    /// Both S3-compatible servers of the stack; every upload test runs on each.
    pub fn s3_targets(&self) -> Vec<S3Target> {
        ["LOCALSTACK", "GARAGE"]
            .into_iter()
            .map(|name| S3Target {
                name: name.to_lowercase(),
                endpoint: self.get(&format!("STOWAGE_{name}_ENDPOINT")),
                region: self.get(&format!("STOWAGE_{name}_REGION")),
                access_key_id: self.get(&format!("STOWAGE_{name}_ACCESS_KEY_ID")),
                secret_access_key: self.get(&format!("STOWAGE_{name}_SECRET_ACCESS_KEY")),
            })
            .collect()
    }
}

#[derive(Clone, Debug)]
pub struct S3Target {
    pub name: String,
    pub endpoint: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl S3Target {
    /// A client of this server (path-style; checksums only where required).
    pub fn client(&self) -> aws_sdk_s3::Client {
        use aws_sdk_s3::config::{Credentials, Region, RequestChecksumCalculation};
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version_latest()
            .region(Region::new(self.region.clone()))
            .endpoint_url(&self.endpoint)
            .force_path_style(true)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .credentials_provider(Credentials::new(
                &self.access_key_id,
                &self.secret_access_key,
                None,
                None,
                "test",
            ))
            .build();
        aws_sdk_s3::Client::from_conf(conf)
    }

    /// Writes this server's keys as the Secret `secret` under `dir`, the
    /// way Kubernetes mounts it (`<dir>/<secret>/access_key_id`, …).
    /// Writes its credentials as Secret `namespace/secret` under `dir`
    /// (the `--credentials-dir` layout: `<dir>/<namespace>/<secret>/<key>`).
    pub fn write_secret(
        &self,
        dir: &std::path::Path,
        namespace: &str,
        secret: &str,
    ) -> std::io::Result<()> {
        let d = dir.join(namespace).join(secret);
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join("access_key_id"), &self.access_key_id)?;
        std::fs::write(d.join("secret_access_key"), &self.secret_access_key)
    }

    /// Its credentials as a Secret manifest `namespace/secret`.
    pub fn secret_manifest(&self, namespace: &str, secret: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: {secret}, namespace: {namespace}}}\n\
             type: Opaque\nstringData: {{access_key_id: \"{}\", secret_access_key: \"{}\"}}\n",
            self.access_key_id, self.secret_access_key
        )
    }
}

/// A short random suffix for names that must not collide between tests.
/// Ends the test process with one line on stderr: what is missing and how
/// to start the local stack. An integration test without the stack cannot
/// say anything more useful, and every other test of the binary would fail
/// the same way (so no panic, no backtrace, no wall of failures).
pub fn stack_missing(what: &str) -> ! {
    use std::io::Write as _;
    // One line, however many tests get here at once: the first holds this
    // until the process is gone.
    static EXITING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _first = EXITING.lock();
    // Straight to the process's stderr: the test harness captures
    // `eprintln!` and would lose it when the process exits.
    let _ = writeln!(
        std::io::stderr(),
        "\nstowage tests: {what}. These tests need the local stack: run `scripts/stack up` \
         (then `eval \"$(scripts/stack env)\"`), or `cargo test --lib` for the tests that need nothing."
    );
    std::process::exit(2)
}

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// Creates an empty database for one test and returns its URL.
pub async fn fresh_database(env: &StackEnv) -> String {
    let admin = env.database_url();
    let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| stack_missing(&format!("cannot reach PostgreSQL at {admin}: {e}")));
    tokio::spawn(conn);
    let name = unique("t_");
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
    match admin.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{name}"),
        None => panic!("STOWAGE_DATABASE_URL must be a postgres:// URL ending in /<database>"),
    }
}

/// Deterministic pseudo-random bytes: test files whose content is known.
pub fn data(len: usize, seed: u64) -> bytes::Bytes {
    use rand::{RngCore, SeedableRng};
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    bytes::Bytes::from(v)
}

/// Lowercase hex SHA-256 of `b`.
pub fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// A fresh database with Stowage's schema: a pool and a lock manager on it.
pub async fn fresh_schema(env: &StackEnv) -> (crate::db::Pool, crate::locks::LockManager) {
    let url = fresh_database(env).await;
    let pg = crate::db::parse_url(&url).expect("database URL");
    let locks = crate::locks::LockManager::new(
        pg.clone(),
        crate::locks::LockMetrics::default(),
        std::time::Duration::from_secs(1),
    );
    let pool = crate::db::pool(&pg, 8).expect("pool");
    crate::db::migrate(&pool, &locks).await.expect("migrate");
    (pool, locks)
}

/// A fresh schema with one registered collection (`team-a/kb`, bucket
/// `docs`, default spec): the pool and the collection's id.
pub async fn fresh_collection(env: &StackEnv) -> (crate::db::Pool, uuid::Uuid) {
    use crate::state::collections::{self, NewCollection};
    let (pool, _) = fresh_schema(env).await;
    let spec: crate::spec::index::IndexSpec =
        serde_json::from_value(serde_json::json!({"source": {"bucket": "docs"}})).expect("spec");
    let db = pool.get().await.expect("db");
    let id = collections::register(
        &db,
        &NewCollection {
            namespace: "team-a".into(),
            name: "kb".into(),
            source_uid: unique("uid"),
            generation: 1,
            spec,
        },
    )
    .await
    .expect("collection");
    (pool, id)
}

/// Polls `check` every 100 ms until it holds; fails the test after `within`.
pub async fn eventually<F, Fut>(what: &str, within: std::time::Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while !check().await {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
