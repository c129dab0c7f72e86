//! IndexCollection end to end: registered, a sync run scheduled and run by a
//! worker, its outcome in `.status` — for a collection on the built-in model,
//! which this version does not ship yet, a failed run with that reason, never
//! a fake success — and deletion that removes the collection's data.

use stowage_e2e::{Binaries, World};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_reports_its_sync_run_and_is_cleaned_up() {
    let w = World::new(Binaries {
        operator: env!("CARGO_BIN_EXE_e2e-operator"),
        worker: env!("CARGO_BIN_EXE_e2e-worker"),
    })
    .await;
    let _operator = w.operator();
    let _worker = w.worker(1);
    let manifest = format!(
        r#"apiVersion: stowage.dev/v1alpha1
kind: IndexCollection
metadata: {{name: kb, namespace: {ns}}}
spec:
  source:
    bucket: {bucket}
    prefix: docs/
    endpoint: {endpoint}
    region: {region}
    credentialsSecretRef: {{name: s3}}
  resyncInterval: 1h
"#,
        ns = w.namespace,
        bucket = w.bucket,
        endpoint = w.target.endpoint,
        region = w.target.region,
    );
    w.apply_ok(&manifest);
    w.wait_for("ic/kb", "Failed", "60s");
    assert_eq!(w.field("ic/kb", "{.status.lastSyncRun.state}"), "Failed");
    let error = w.field("ic/kb", "{.status.lastSyncRun.error}");
    assert!(
        error.starts_with("the builtin embedding model is not available yet"),
        "{error}"
    );
    let ready = w.field(
        "ic/kb",
        r#"{.status.conditions[?(@.type=="Ready")].reason}"#,
    );
    assert_eq!(ready, "SyncFailed");
    assert!(!w.field("ic/kb", "{.status.nextSyncTime}").is_empty());
    let table = w.kube.ok(&["get", "ic", "-n", &w.namespace]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("kb") && l.contains("Failed")),
        "{table}"
    );

    w.kube.ok(&[
        "delete",
        "ic/kb",
        "-n",
        &w.namespace,
        "--wait=true",
        "--timeout=60s",
    ]);
    let (client, conn) = tokio_postgres::connect(&w.database_url, tokio_postgres::NoTls)
        .await
        .expect("db");
    tokio::spawn(conn);
    let left: i64 = client
        .query_one("SELECT count(*) FROM collections", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(left, 0, "the collection and its runs are gone");
}
