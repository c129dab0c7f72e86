//! IndexCollection end to end, on the built-in embedding model: kubectl
//! apply → the operator schedules a sync run → a worker indexes the bucket
//! (extract, chunk, embed, store) → `.status` and `kubectl get` say so →
//! `Search.Query` over gRPC finds the right document; then an UploadJob
//! lands a new object and, the collection watching uploads, it is searchable
//! within seconds, with no resync; deletion removes the collection's data.

use std::time::Duration;

use stowage_e2e::{Binaries, World, eventually};
use stowage_proto::v1::search_client::SearchClient;
use stowage_proto::v1::{SearchMode, SearchRequest};

const POSTGRES: &str = "# Restoring PostgreSQL\n\nTo restore the database, fetch the latest \
base backup, replay the write-ahead log archive up to the target time, then promote the \
server and point the connection pooler at it.\n";
const BREAD: &str = "# Sourdough\n\nMix flour, water and salt with an active starter. Let \
the dough rise overnight, shape the loaf and bake it in a hot oven until the crust is dark.\n";
const GARDEN: &str = "# Tomatoes\n\nPlant tomato seedlings after the last frost, water them \
deeply twice a week and tie the stems to stakes as the plants grow.\n";
const NATS: &str = "# Message queues\n\nNATS JetStream keeps every task in a stream; \
consumers acknowledge each message explicitly and redeliveries happen after the ack wait.\n";

async fn keys(
    grpc: &str,
    token: &str,
    namespace: &str,
    query: &str,
    mode: SearchMode,
) -> Vec<String> {
    let Ok(mut client) = SearchClient::connect(format!("http://{grpc}")).await else {
        return Vec::new();
    };
    let mut request = tonic::Request::new(SearchRequest {
        namespace: namespace.into(),
        collection: "kb".into(),
        query: query.into(),
        mode: mode as i32,
        top_k: 3,
        ..Default::default()
    });
    if let Ok(value) = format!("Bearer {token}").parse() {
        request.metadata_mut().insert("authorization", value);
    }
    match client.query(request).await {
        Ok(r) => r.into_inner().hits.into_iter().map(|h| h.key).collect(),
        Err(_) => Vec::new(),
    }
}

/// `stowctl search` as a user runs it: no database, a token from a file or
/// from the kubeconfig's current user, and a plain refusal without one.
fn stowctl_search_sends_the_callers_token(w: &World, grpc: &str, token: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).expect("token file");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: c\ncontexts:\n- name: c\n  context: \
             {{cluster: x, user: reader}}\nusers:\n- name: reader\n  user: {{token: {token}}}\n"
        ),
    )
    .expect("kubeconfig");
    let search = |args: &[&str], kubeconfig: &std::path::Path| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_e2e-stowctl"))
            .args([
                "search",
                "kb",
                "how do I recover my SQL server from a backup?",
            ])
            .args([
                "--namespace",
                &w.namespace,
                "--worker",
                &format!("http://{grpc}"),
            ])
            .args(["--mode", "vector", "--top-k", "1"])
            .args(args)
            // Nothing but what a laptop has: no database URL, no NATS.
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("KUBECONFIG", kubeconfig)
            .output()
            .expect("run stowctl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let found = format!("s3://{}/docs/postgres.md", w.bucket);
    let nowhere = dir.path().join("absent");
    let (ok, out, err) = search(&["--token-file", &token_file.to_string_lossy()], &nowhere);
    assert!(ok && out.contains(&found), "--token-file: {out}{err}");
    let (ok, out, err) = search(&[], &kubeconfig);
    assert!(ok && out.contains(&found), "kubeconfig user: {out}{err}");
    let (ok, out, err) = search(&["--no-token"], &kubeconfig);
    assert!(!ok && !out.contains(&found), "{out}");
    assert!(
        err.contains("bearer token is required") && err.contains("no token was sent"),
        "{err}"
    );
}

/// `stowctl sync --watch` on a local folder into the collection's prefix:
/// an edited file is searchable seconds later. Uploading needs its own
/// grant (`create` on uploadjobs): none, or a search-only token, is refused.
async fn stowctl_sync_watch_makes_an_edit_searchable(w: &World, grpc: &str, search_token: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let folder = dir.path().join("notes");
    std::fs::create_dir_all(&folder).expect("mkdir");
    std::fs::write(
        folder.join("cellar.md"),
        "# Cellar\n\nThe cellar holds apples.\n",
    )
    .expect("write");
    let token_file = |name: &str, token: &str| {
        let f = dir.path().join(name);
        std::fs::write(&f, token).expect("token file");
        f.to_string_lossy().into_owned()
    };
    let sync = |token_args: Vec<String>, watch: bool| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_e2e-stowctl"));
        c.arg("sync")
            .arg(&folder)
            .arg(format!("--to=s3://{}/docs/notes", w.bucket))
            .arg(format!("--to-endpoint={}", w.target.endpoint))
            .arg(format!("--region={}", w.target.region))
            .args([
                "--to-credentials=s3",
                "--allow-private-networks",
                "--debounce=300ms",
            ])
            .arg(format!("--namespace={}", w.namespace))
            .arg(format!("--worker=http://{grpc}"))
            .arg(format!(
                "--manifest={}",
                dir.path().join("manifest.json").display()
            ))
            .args(token_args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default());
        if watch {
            c.arg("--watch");
        }
        c
    };
    let out = sync(vec!["--no-token".into()], false)
        .output()
        .expect("stowctl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("bearer token is required"),
        "{err}"
    );
    let reader = token_file("reader", search_token);
    let out = sync(vec![format!("--token-file={reader}")], false)
        .output()
        .expect("stowctl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("uploadjobs"), "{err}");

    let uploader = w.kube.grant_upload(&w.namespace);
    let file = token_file("uploader", &uploader.token);
    let mut watching = sync(vec![format!("--token-file={file}")], true)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("stowctl sync --watch");
    eventually(
        "the synced folder is searchable",
        Duration::from_secs(60),
        || async {
            keys(
                grpc,
                search_token,
                &w.namespace,
                "apples in the cellar",
                SearchMode::Keyword,
            )
            .await
            .first()
            .is_some_and(|k| k == "docs/notes/cellar.md")
        },
    )
    .await;
    std::fs::write(
        folder.join("cellar.md"),
        "# Cellar\n\nThe cellar holds apples.\n\nA barometer hangs by the door.\n",
    )
    .expect("edit");
    eventually(
        "the edit is searchable",
        Duration::from_secs(60),
        || async {
            keys(
                grpc,
                search_token,
                &w.namespace,
                "barometer",
                SearchMode::Keyword,
            )
            .await
            .first()
            .is_some_and(|k| k == "docs/notes/cellar.md")
        },
    )
    .await;
    let _ = watching.kill();
    let _ = watching.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_indexes_its_bucket_follows_uploads_and_is_cleaned_up() {
    let w = World::new(Binaries {
        operator: env!("CARGO_BIN_EXE_e2e-operator"),
        worker: env!("CARGO_BIN_EXE_e2e-worker"),
    })
    .await;
    for (key, text) in [
        ("docs/postgres.md", POSTGRES),
        ("docs/bread.md", BREAD),
        ("docs/garden.md", GARDEN),
    ] {
        w.put(&w.bucket, key, text.as_bytes().to_vec().into()).await;
    }
    let _operator = w.operator();
    let worker = w.worker(2);
    let grpc = worker.grpc.clone().expect("worker gRPC address");
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
    allowPrivateNetworks: true
  watchUploads: true
  resyncInterval: 1h
"#,
        ns = w.namespace,
        bucket = w.bucket,
        endpoint = w.target.endpoint,
        region = w.target.region,
    );
    w.apply_ok(&manifest);
    w.wait_for("ic/kb", "Ready", "180s");
    assert_eq!(w.field("ic/kb", "{.status.lastSyncRun.state}"), "Completed");
    assert_eq!(w.field("ic/kb", "{.status.documents.indexed}"), "3");
    assert!(!w.field("ic/kb", "{.status.activeGeneration}").is_empty());
    let chunks: i64 = w
        .field("ic/kb", "{.status.chunks}")
        .parse()
        .expect("chunk count");
    assert!(chunks >= 3, "{chunks} chunks");
    let table = w.kube.ok(&["get", "ic", "-n", &w.namespace]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("kb") && l.contains("Ready")),
        "{table}"
    );

    // Meaning, not words: no query word appears in the document it finds.
    // Search access is a Kubernetes grant: a Role on indexcollections/search.
    let reader = w.kube.grant_search(&w.namespace, "kb");
    let hits = keys(
        &grpc,
        &reader.token,
        &w.namespace,
        "how do I recover my SQL server from a backup?",
        SearchMode::Vector,
    )
    .await;
    assert_eq!(hits.first().map(String::as_str), Some("docs/postgres.md"));
    let hits = keys(
        &grpc,
        &reader.token,
        &w.namespace,
        "baking a loaf",
        SearchMode::Hybrid,
    )
    .await;
    assert_eq!(hits.first().map(String::as_str), Some("docs/bread.md"));
    stowctl_search_sends_the_callers_token(&w, &grpc, &reader.token);

    // An UploadJob lands a new document; the collection watches uploads.
    w.put(
        &w.source_bucket,
        "incoming/queues.md",
        NATS.as_bytes().to_vec().into(),
    )
    .await;
    // Named `docs`, it lands `incoming/*` under `docs/`, the collection's prefix.
    w.apply_ok(&w.s3_job("docs", "incoming/"));
    w.wait_for("uj/docs", "Complete", "60s");
    eventually(
        "the uploaded document is searchable without a resync",
        Duration::from_secs(60),
        || async {
            keys(
                &grpc,
                &reader.token,
                &w.namespace,
                "message queue acknowledgements",
                SearchMode::Hybrid,
            )
            .await
            .first()
            .is_some_and(|k| k == "docs/queues.md")
        },
    )
    .await;
    eventually(
        "status counts the new document",
        Duration::from_secs(30),
        || async { w.field("ic/kb", "{.status.documents.indexed}") == "4" },
    )
    .await;
    let runs = {
        let (client, conn) = tokio_postgres::connect(&w.database_url, tokio_postgres::NoTls)
            .await
            .expect("db");
        tokio::spawn(conn);
        client
            .query_one("SELECT count(*) FROM sync_runs", &[])
            .await
            .expect("runs")
            .get::<_, i64>(0)
    };
    assert_eq!(
        runs, 1,
        "indexed by its object event, not by another sync run"
    );

    stowctl_sync_watch_makes_an_edit_searchable(&w, &grpc, &reader.token).await;

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
    for table in ["collections", "documents", "chunks"] {
        let left: i64 = client
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .expect("count")
            .get(0);
        assert_eq!(left, 0, "{table}: the collection's data is gone");
    }
}
