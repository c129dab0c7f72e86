//! Least privilege proven, not asserted: the operator and a worker run
//! through everything they do — UploadJobs registered, refused, completed,
//! deleted by their TTL and deleted mid-upload (its multipart upload
//! aborted with the namespace's credentials), an IndexCollection synced,
//! searched with a token and deleted, the worker fleet scaled up and down
//! with its idle pods marked, an unreadable backlog reported — while the
//! Kubernetes API emulator records every request. Each request must be
//! allowed by the RBAC rules the Helm chart renders for that component's
//! ServiceAccount, and each grant of those rules must have been used.
//!
//! (It needs the emulator's request log: against a real cluster the same
//! proof is `kubectl auth can-i --as` on the audit log, outside this suite.)

use std::time::Duration;

use serde_json::json;
use stowage_common::queue::{ConsumerSettings, NatsSettings, Queue, TaskKind};
use stowage_common::testing::data;
use stowage_e2e::rbac::{attributes, judge, requests, rules_for};
use stowage_e2e::{Binaries, SlowFiles, World, chart, eventually};
use stowage_proto::v1::{PlanUpload, Task, task};

const RELEASE: &str = "stowage";
const WORKERS: &str = "stowage-worker";
const OPERATOR_SA: &str = "stowage-operator";
const WORKER_SA: &str = "stowage-worker";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operator_request_is_granted_by_the_chart_and_every_grant_is_used() {
    let w = World::new(Binaries {
        operator: env!("CARGO_BIN_EXE_e2e-operator"),
        worker: env!("CARGO_BIN_EXE_e2e-worker"),
    })
    .await;
    let Some(log) = w.kube.requests.clone() else {
        eprintln!("skipped: needs the emulator's request log (KUBECONFIG names a cluster)");
        return;
    };
    let ns = w.namespace.clone();
    let docs = chart::render(
        RELEASE,
        &ns,
        &json!({
            "autoscaling": {"mode": "operator", "minReplicas": 1, "maxReplicas": 4},
            "auth": {"mode": "kubernetes"},
            "tenantNamespaces": [ns],
        }),
    );
    let rules = rules_for(&docs, OPERATOR_SA, &ns);
    assert!(!rules.is_empty(), "the chart binds rules to {OPERATOR_SA}");
    let worker_rules = rules_for(&docs, WORKER_SA, &ns);
    assert!(
        !worker_rules.is_empty(),
        "the chart binds rules to {WORKER_SA}"
    );

    // The fleet the chart installs, and two of its pods.
    w.apply_ok(&format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: {WORKERS}, namespace: {ns}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app.kubernetes.io/component: worker}}}}
  template:
    metadata: {{labels: {{app.kubernetes.io/component: worker}}}}
    spec: {{containers: [{{name: worker, image: registry.k8s.io/pause:3.10}}]}}
"#
    ));
    for pod in ["worker-a", "worker-b"] {
        w.apply_ok(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {ns}, labels: {{app.kubernetes.io/component: worker}}}}\nspec: {{containers: [{{name: w, image: registry.k8s.io/pause:3.10}}]}}\n"
        ));
    }
    let queue = Queue::connect(&NatsSettings::new(w.stack.nats_url(), &w.prefix))
        .await
        .expect("nats");
    queue
        .ensure(&ConsumerSettings::default())
        .await
        .expect("consumer");
    let operator = w.operator_with(&[
        format!("--autoscale-deployment={WORKERS}"),
        format!("--autoscale-namespace={ns}"),
        "--autoscale-max=4".into(),
        "--autoscale-quiet-period=2s".into(),
        "--autoscale-interval=1s".into(),
    ]);

    // The fleet: up for a backlog nobody takes, down when it is gone (idle
    // pods marked), held when it cannot be read.
    let subject = queue
        .topology()
        .task_subject(TaskKind::UploadPlan, &ns, "x");
    for i in 0..12 {
        let t = Task {
            task_id: format!("rbac-{i}"),
            kind: Some(task::Kind::PlanUpload(PlanUpload {
                job_id: format!("00000000-0000-0000-0000-{i:012}"),
            })),
        };
        queue.publish_task(&subject, &t).await.expect("publish");
    }
    let replicas = || w.field(&format!("deploy/{WORKERS}"), "{.spec.replicas}");
    eventually("scaled up", Duration::from_secs(60), || async {
        replicas() == "3"
    })
    .await;
    queue
        .purge_tasks(&format!("{}.task.>", w.prefix))
        .await
        .expect("drain");
    eventually("scaled down", Duration::from_secs(60), || async {
        replicas() == "1"
    })
    .await;
    queue.delete_worker_consumer().await.expect("unreadable");
    eventually("held", Duration::from_secs(30), || async {
        operator
            .http_get("/metrics")
            .await
            .is_some_and(|m| m.contains("stowage_operator_autoscale_backlog_readable 0"))
    })
    .await;
    queue
        .ensure(&ConsumerSettings::default())
        .await
        .expect("consumer back");

    // UploadJobs: one completes and is deleted by its TTL, one is refused,
    // one is deleted while its multipart upload is open.
    let worker = w.worker(2);
    let slow = SlowFiles::start(vec![("big.bin".into(), data(12 << 20, 3))], 1 << 20).await;
    w.apply_ok(&format!(
        r#"apiVersion: stowage.dev/v1alpha1
kind: UploadJob
metadata: {{name: slow, namespace: {ns}}}
spec:
  source: {{http: {{urls: ["{url}/big.bin"], allowPrivateNetworks: true}}}}
  destination: {{bucket: {dst}, keyPrefix: slow/, endpoint: {endpoint}, region: {region}, credentialsSecretRef: {{name: s3}}, allowPrivateNetworks: true}}
  partSizeBytes: 5242880
"#,
        url = slow.base,
        dst = w.bucket,
        endpoint = w.target.endpoint,
        region = w.target.region,
    ));
    eventually(
        "a multipart upload is open",
        Duration::from_secs(60),
        || async { w.open_uploads(&w.bucket).await > 0 },
    )
    .await;
    w.kube.ok(&[
        "delete",
        "uj/slow",
        "-n",
        &ns,
        "--wait=true",
        "--timeout=60s",
    ]);
    assert_eq!(w.open_uploads(&w.bucket).await, 0, "aborted on deletion");
    w.put(&w.source_bucket, "rbac/a.txt", data(1000, 1)).await;
    w.apply_ok(&w.s3_job("ttl", "rbac/").replace(
        "  partSizeBytes:",
        "  ttlSecondsAfterFinished: 1\n  partSizeBytes:",
    ));
    w.apply_ok(
        &w.s3_job("refused", "rbac/")
            .replace("keyPrefix: refused/", "keyPrefix: ../refused/"),
    );
    w.wait_for("uj/refused", "Failed", "60s");
    eventually(
        "the finished job is deleted by its TTL",
        Duration::from_secs(120),
        || async {
            !w.kube
                .ok(&["get", "uj", "-n", &ns, "-o", "name"])
                .contains("ttl")
        },
    )
    .await;

    // An IndexCollection: synced twice (the same event repeated), deleted.
    w.apply_ok(&format!(
        r#"apiVersion: stowage.dev/v1alpha1
kind: IndexCollection
metadata: {{name: kb, namespace: {ns}}}
spec:
  source: {{bucket: {bucket}, prefix: none/, endpoint: {endpoint}, region: {region}, credentialsSecretRef: {{name: s3}}, allowPrivateNetworks: true}}
  resyncInterval: 10s
"#,
        bucket = w.bucket,
        endpoint = w.target.endpoint,
        region = w.target.region,
    ));
    w.wait_for("ic/kb", "Ready", "120s");
    // Searched with a token: the worker's TokenReview and SubjectAccessReview.
    let reader = w.kube.grant_search(&ns, "kb");
    let grpc = worker.grpc.clone().expect("grpc");
    let mut client =
        stowage_proto::v1::search_client::SearchClient::connect(format!("http://{grpc}"))
            .await
            .expect("connect");
    let mut request = tonic::Request::new(stowage_proto::v1::SearchRequest {
        namespace: ns.clone(),
        collection: "kb".into(),
        query: "anything".into(),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", reader.token).parse().expect("header"),
    );
    let code = match client.query(request).await {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    };
    assert_eq!(code, tonic::Code::Ok, "the granted search answers");
    let synced = w.field("ic/kb", "{.status.lastSyncRun.id}");
    eventually("a scheduled resync", Duration::from_secs(60), || async {
        w.field("ic/kb", "{.status.lastSyncRun.id}") != synced
    })
    .await;
    w.kube
        .ok(&["delete", "ic/kb", "-n", &ns, "--wait=true", "--timeout=60s"]);
    w.kube.ok(&[
        "delete",
        "uj/refused",
        "-n",
        &ns,
        "--wait=true",
        "--timeout=60s",
    ]);

    let all = requests(&log);
    for (component, agent, rules) in [
        ("operator", "stowage-operator/", &rules),
        ("worker", "stowage-worker/", &worker_rules),
    ] {
        let made: Vec<_> = all
            .iter()
            .filter(|r| r.agent.starts_with(agent))
            .filter_map(attributes)
            .collect();
        assert!(!made.is_empty(), "the {component}'s requests were recorded");
        let verdict = judge(rules, &made);
        assert!(
            verdict.denied.is_empty(),
            "the chart's RBAC denies the {component}: {:#?}",
            verdict.denied
        );
        assert!(
            verdict.unused.is_empty(),
            "the chart grants the {component} what it never used: {:#?}",
            verdict.unused
        );
    }
}
