//! A namespace is a tenant, end to end: a resource can use the Secrets of
//! its own namespace only, and search is granted with ordinary Kubernetes
//! RBAC — a token (TokenReview, audience `stowage`) and a Role on
//! `indexcollections/search` (SubjectAccessReview).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use stowage_e2e::{Binaries, World, eventually};
use stowage_proto::v1::SearchRequest;
use stowage_proto::v1::search_client::SearchClient;

async fn world() -> World {
    World::new(Binaries {
        operator: env!("CARGO_BIN_EXE_e2e-operator"),
        worker: env!("CARGO_BIN_EXE_e2e-worker"),
    })
    .await
}

/// An embedding server of tenant A's choosing that records every
/// Authorization header it is sent (and answers like OpenAI).
async fn recording_embedder() -> (String, Arc<Mutex<Vec<String>>>) {
    use axum::http::HeaderMap;
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = Arc::clone(&seen);
    let app = axum::Router::new().route(
        "/v1/embeddings",
        axum::routing::post(move |headers: HeaderMap, body: String| {
            let log = Arc::clone(&log);
            async move {
                if let Some(a) = headers.get("authorization").and_then(|h| h.to_str().ok())
                    && let Ok(mut l) = log.lock()
                {
                    l.push(a.to_string());
                }
                let n = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["input"].as_array().map(Vec::len))
                    .unwrap_or(0);
                let data: Vec<serde_json::Value> = (0..n)
                    .map(|i| serde_json::json!({"index": i, "embedding": [1.0, 0.0, 0.0, 0.0]}))
                    .collect();
                (
                    [("content-type", "application/json")],
                    serde_json::json!({"data": data}).to_string(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), seen)
}

/// A collection in the test's namespace naming the API key Secret of
/// another namespace — the one Secret of that name exists only there —
/// fails with an error naming its own namespace, and the other tenant's key
/// never reaches the embedding server the collection chose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_of_another_namespace_is_never_used() {
    let w = world().await;
    let _operator = w.operator();
    let _worker = w.worker(2);
    let other = format!("{}-b", w.namespace);
    if !w.kube.emulated {
        w.kube.ok(&["create", "namespace", &other]);
    }
    let secret = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: embedder-key, namespace: {other}}}\n\
         stringData: {{api_key: sk-tenant-b-secret}}\n"
    );
    w.apply_ok(&secret);
    let (endpoint, seen) = recording_embedder().await;
    w.put(&w.bucket, "kb/a.md", b"# A\n\nSome text.\n".to_vec().into())
        .await;
    w.apply_ok(&format!(
        r#"apiVersion: stowage.dev/v1alpha1
kind: IndexCollection
metadata: {{name: kb, namespace: {ns}}}
spec:
  source: {{bucket: {bucket}, prefix: kb/, endpoint: {s3}, region: {region}, credentialsSecretRef: {{name: s3}}, allowPrivateNetworks: true}}
  embedding:
    provider: openai
    model: m
    dimensions: 4
    endpoint: {endpoint}
    credentialsSecretRef: {{name: embedder-key}}
    allowPrivateNetworks: true
  resyncInterval: 1h
"#,
        ns = w.namespace,
        bucket = w.bucket,
        s3 = w.target.endpoint,
        region = w.target.region,
    ));
    w.wait_for("ic/kb", "Failed", "120s");
    let message = w.field("ic/kb", "{.status.lastSyncRun.error}");
    let want = format!("Secret {}/embedder-key was not found", w.namespace);
    assert!(message.contains(&want), "{message}");
    assert!(
        !message.contains(&other),
        "nothing of the other namespace: {message}"
    );
    let headers = seen.lock().map(|s| s.clone()).unwrap_or_default();
    assert!(
        headers.iter().all(|h| !h.contains("sk-tenant-b-secret")),
        "tenant B's key reached tenant A's server: {headers:?}"
    );
}

async fn search(grpc: &str, token: Option<&str>, namespace: &str, collection: &str) -> tonic::Code {
    let Ok(mut client) = SearchClient::connect(format!("http://{grpc}")).await else {
        return tonic::Code::Unavailable;
    };
    let mut request = tonic::Request::new(SearchRequest {
        namespace: namespace.into(),
        collection: collection.into(),
        query: "anything".into(),
        mode: stowage_proto::v1::SearchMode::Keyword as i32,
        ..Default::default()
    });
    if let Some(t) = token
        && let Ok(v) = format!("Bearer {t}").parse()
    {
        request.metadata_mut().insert("authorization", v);
    }
    match client.query(request).await {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    }
}

/// Search is granted with RBAC: no token → UNAUTHENTICATED; a token whose
/// owner has a Role on one collection searches it and nothing else (the
/// same PERMISSION_DENIED for a collection that exists and one that does
/// not); a revoked token is refused once the decision cache expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_is_granted_with_kubernetes_rbac() {
    let w = world().await;
    let _operator = w.operator();
    let worker = w.worker_with(2, &["--auth-cache-ttl=2s".into()]);
    let grpc = worker.grpc.clone().expect("grpc");
    w.put(&w.bucket, "kb/a.md", b"# A\n\nSome text.\n".to_vec().into())
        .await;
    for name in ["kb", "private"] {
        w.apply_ok(&format!(
            r#"apiVersion: stowage.dev/v1alpha1
kind: IndexCollection
metadata: {{name: {name}, namespace: {ns}}}
spec:
  source: {{bucket: {bucket}, prefix: kb/, endpoint: {s3}, region: {region}, credentialsSecretRef: {{name: s3}}, allowPrivateNetworks: true}}
  resyncInterval: 1h
"#,
            ns = w.namespace,
            bucket = w.bucket,
            s3 = w.target.endpoint,
            region = w.target.region,
        ));
    }
    w.wait_for("ic/kb", "Ready", "180s");
    w.wait_for("ic/private", "Ready", "180s");
    let ns = w.namespace.clone();
    assert_eq!(
        search(&grpc, None, &ns, "kb").await,
        tonic::Code::Unauthenticated
    );
    assert_eq!(
        search(&grpc, Some("not-a-token"), &ns, "kb").await,
        tonic::Code::Unauthenticated
    );
    let reader = w.kube.grant_search(&ns, "kb");
    assert_eq!(
        search(&grpc, Some(&reader.token), &ns, "kb").await,
        tonic::Code::Ok
    );
    assert_eq!(
        search(&grpc, Some(&reader.token), &ns, "private").await,
        tonic::Code::PermissionDenied
    );
    assert_eq!(
        search(&grpc, Some(&reader.token), &ns, "no-such-collection").await,
        tonic::Code::PermissionDenied,
        "a collection that does not exist looks like one that is not granted"
    );
    assert_eq!(
        search(&grpc, Some(&reader.token), "elsewhere", "kb").await,
        tonic::Code::PermissionDenied
    );
    w.kube.revoke(&reader);
    eventually(
        "the revoked token is refused",
        Duration::from_secs(30),
        || async {
            search(&grpc, Some(&reader.token), &ns, "kb").await == tonic::Code::Unauthenticated
        },
    )
    .await;
}

/// An embedding endpoint is held to the same address policy as HTTP
/// sources: one on loopback, without `allowPrivateNetworks`, is refused
/// before a single request reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loopback_embedding_endpoint_needs_the_allowance() {
    let w = world().await;
    let _operator = w.operator();
    let _worker = w.worker(2);
    let (endpoint, seen) = recording_embedder().await;
    w.put(&w.bucket, "kb/a.md", b"# A\n\nSome text.\n".to_vec().into())
        .await;
    w.apply_ok(&format!(
        r#"apiVersion: stowage.dev/v1alpha1
kind: IndexCollection
metadata: {{name: kb, namespace: {ns}}}
spec:
  source: {{bucket: {bucket}, prefix: kb/, endpoint: {s3}, region: {region}, credentialsSecretRef: {{name: s3}}, allowPrivateNetworks: true}}
  embedding: {{provider: openai, model: m, dimensions: 4, endpoint: {endpoint}}}
  resyncInterval: 1h
"#,
        ns = w.namespace,
        bucket = w.bucket,
        s3 = w.target.endpoint,
        region = w.target.region,
    ));
    w.wait_for("ic/kb", "Failed", "120s");
    let error = w.field("ic/kb", "{.status.lastSyncRun.error}");
    assert!(
        error.contains("refusing to connect to 127.0.0.1") && error.contains("loopback"),
        "{error}"
    );
    assert!(
        seen.lock().map(|s| s.is_empty()).unwrap_or(false),
        "a request reached the server"
    );
}
