//! The chaos the design promises, in the suite: NATS, then PostgreSQL, is
//! restarted in the middle of an UploadJob of a few hundred files while a
//! collection watches the bucket. Nothing may be lost (every object lands
//! with its bytes, every object-landed event reaches the collection), no
//! object may be written twice (one version per key), and neither the
//! operator nor the workers may need a restart.
//!
//! It restarts the local stack's own services (`scripts/stack down|up`),
//! which every test of this binary shares: so this binary holds one test,
//! and cargo runs test binaries one after another.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use stowage_common::testing::{data, sha256_hex};
use stowage_e2e::{Binaries, World, eventually};

const FILES: usize = 200;

fn stack(args: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/stack");
    let out = Command::new(script)
        .args(args)
        .output()
        .expect("run scripts/stack");
    assert!(
        out.status.success(),
        "scripts/stack {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Stops `service`, keeps it down for `down`, starts it again.
async fn restart(service: &str, down: Duration) {
    stack(&["down", service]);
    tokio::time::sleep(down).await;
    stack(&["up", service]);
}

async fn seed(w: &World, prefix: &str) -> Vec<(String, String)> {
    let mut files = Vec::new();
    for i in 0..FILES {
        // Small documents (a line of text and some bytes), a few multipart.
        let body = if i % 50 == 7 {
            data(6 * 1024 * 1024, i as u64)
        } else {
            format!("Document {i} of the {prefix} batch: stowage chaos test.\n")
                .into_bytes()
                .into()
        };
        let name = if i % 50 == 7 {
            format!("file-{i:03}.bin")
        } else {
            format!("file-{i:03}.txt")
        };
        w.put(&w.source_bucket, &format!("{prefix}{name}"), body.clone())
            .await;
        files.push((name, sha256_hex(&body)));
    }
    files
}

async fn db(w: &World) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&w.database_url, tokio_postgres::NoTls)
        .await
        .expect("db");
    tokio::spawn(conn);
    client
}

/// Every object landed with its bytes, each key written once.
async fn check_job(w: &World, job: &str, files: &[(String, String)]) {
    for (name, sha) in files {
        let got = w.sha256(&w.bucket, &format!("{job}/{name}")).await;
        assert_eq!(got.as_deref(), Some(sha.as_str()), "{job}/{name}");
    }
    let client = db(w).await;
    let rows = client
        .query(
            "SELECT object_key, count(*) FROM objects WHERE bucket = $1 AND object_key LIKE $2
             GROUP BY object_key HAVING count(*) <> 1",
            &[&w.bucket, &format!("{job}/%")],
        )
        .await
        .expect("objects");
    let twice: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert!(twice.is_empty(), "written more than once: {twice:?}");
    assert_eq!(
        w.field(&format!("uj/{job}"), "{.status.files.uploaded}"),
        FILES.to_string()
    );
    assert_eq!(w.field(&format!("uj/{job}"), "{.status.files.failed}"), "0");
}

async fn uploaded(w: &World, job: &str) -> usize {
    w.field(&format!("uj/{job}"), "{.status.files.uploaded}")
        .parse()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_then_postgres_restart_mid_job_and_nothing_is_lost() {
    let w = World::new(Binaries {
        operator: env!("CARGO_BIN_EXE_e2e-operator"),
        worker: env!("CARGO_BIN_EXE_e2e-worker"),
    })
    .await;
    let _operator = w.operator();
    let _workers = [w.worker(4), w.worker(4)];
    // A collection that follows what the first job lands.
    w.apply_ok(&format!(
        r#"apiVersion: stowage.dev/v1alpha1
kind: IndexCollection
metadata: {{name: landed, namespace: {ns}}}
spec:
  source:
    bucket: {bucket}
    prefix: nats/
    include: ["*.txt"]
    endpoint: {endpoint}
    region: {region}
    credentialsSecretRef: {{name: s3}}
    allowPrivateNetworks: true
  watchUploads: true
  resyncInterval: 24h
"#,
        ns = w.namespace,
        bucket = w.bucket,
        endpoint = w.target.endpoint,
        region = w.target.region,
    ));
    w.wait_for("ic/landed", "Ready", "180s");

    // NATS goes away for 6 s while the first job runs.
    let nats_files = seed(&w, "nats-src/").await;
    w.apply_ok(&w.s3_job("nats", "nats-src/"));
    eventually("the job is under way", Duration::from_secs(120), || async {
        uploaded(&w, "nats").await >= 20
    })
    .await;
    restart("nats", Duration::from_secs(6)).await;
    w.wait_for("uj/nats", "Complete", "300s");
    check_job(&w, "nats", &nats_files).await;
    // Every object-landed event reached the collection: all its text
    // documents are indexed, with no resync (the next one is a day away).
    let texts = nats_files
        .iter()
        .filter(|(n, _)| n.ends_with(".txt"))
        .count();
    eventually(
        "every landed document is indexed",
        Duration::from_secs(600),
        || async { w.field("ic/landed", "{.status.documents.indexed}") == texts.to_string() },
    )
    .await;

    // PostgreSQL goes away for 5 s while the second job runs.
    let pg_files = seed(&w, "pg-src/").await;
    w.apply_ok(&w.s3_job("pg", "pg-src/"));
    eventually("the job is under way", Duration::from_secs(120), || async {
        uploaded(&w, "pg").await >= 20
    })
    .await;
    restart("postgres", Duration::from_secs(5)).await;
    w.wait_for("uj/pg", "Complete", "300s");
    check_job(&w, "pg", &pg_files).await;
}
