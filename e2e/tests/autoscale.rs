//! The worker fleet follows its backlog, end to end: the operator reads the
//! task consumer's backlog from JetStream and sets the worker Deployment's
//! replicas through its `scale` subresource — up at once for a backlog,
//! back to the minimum after the (shortened) quiet period, idle pods marked
//! to go first, and the count held when the backlog cannot be read.

use std::time::Duration;

use prost::Message as _;
use stowage_common::queue::{ConsumerSettings, NatsSettings, Queue, TaskKind};
use stowage_e2e::{Binaries, World, eventually};
use stowage_proto::v1::{PlanUpload, Task, WorkerHeartbeat, task};

async fn world() -> World {
    World::new(Binaries {
        operator: env!("CARGO_BIN_EXE_e2e-operator"),
        worker: env!("CARGO_BIN_EXE_e2e-worker"),
    })
    .await
}

const DEPLOYMENT: &str = "stowage-worker";

fn replicas(w: &World) -> String {
    w.field(&format!("deploy/{DEPLOYMENT}"), "{.spec.replicas}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_fleet_follows_the_backlog() {
    let w = world().await;
    let ns = w.namespace.clone();
    // The worker Deployment the chart would install (its pods are the
    // test's: no kubelet runs them here), and two of its pods.
    w.apply_ok(&format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: {DEPLOYMENT}, namespace: {ns}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app.kubernetes.io/name: stowage, app.kubernetes.io/component: worker}}}}
  template:
    metadata: {{labels: {{app.kubernetes.io/name: stowage, app.kubernetes.io/component: worker}}}}
    spec: {{containers: [{{name: worker, image: registry.k8s.io/pause:3.10}}]}}
"#
    ));
    if w.kube.emulated {
        for pod in ["worker-a", "worker-b"] {
            w.apply_ok(&format!(
                r#"apiVersion: v1
kind: Pod
metadata:
  name: {pod}
  namespace: {ns}
  labels: {{app.kubernetes.io/name: stowage, app.kubernetes.io/component: worker}}
spec: {{containers: [{{name: worker, image: registry.k8s.io/pause:3.10}}]}}
"#
            ));
        }
    }
    let queue = Queue::connect(&NatsSettings::new(w.stack.nats_url(), &w.prefix))
        .await
        .expect("nats");
    queue
        .ensure(&ConsumerSettings::default())
        .await
        .expect("consumer");
    let operator = w.operator_with(&[
        format!("--autoscale-deployment={DEPLOYMENT}"),
        format!("--autoscale-namespace={ns}"),
        "--autoscale-min=1".into(),
        "--autoscale-max=6".into(),
        "--autoscale-target-per-replica=5".into(),
        "--autoscale-quiet-period=4s".into(),
        "--autoscale-interval=1s".into(),
    ]);

    // 23 tasks nobody takes (no worker runs): ceil(23 / 5) = 5 workers.
    let subject = queue
        .topology()
        .task_subject(TaskKind::UploadPlan, &ns, "backlog");
    for i in 0..23 {
        let t = Task {
            task_id: format!("backlog-{i}"),
            kind: Some(task::Kind::PlanUpload(PlanUpload {
                job_id: uuid_like(i),
            })),
        };
        queue.publish_task(&subject, &t).await.expect("publish");
    }
    eventually("the fleet grows to 5", Duration::from_secs(60), || async {
        replicas(&w) == "5"
    })
    .await;
    let metrics = operator.http_get("/metrics").await.unwrap_or_default();
    assert!(
        metrics.contains("stowage_operator_autoscale_backlog 23"),
        "{metrics}"
    );

    // One pod is busy, one idle; then the backlog drains.
    let beats = tokio::spawn({
        let queue = queue.clone();
        async move {
            loop {
                for (id, in_flight) in [("worker-a", 0), ("worker-b", 3)] {
                    let beat = WorkerHeartbeat {
                        worker_id: id.into(),
                        in_flight,
                        capacity: 4,
                        draining: false,
                    };
                    let subject = queue.topology().worker_subject(id);
                    let _ = queue.publish_event(subject, beat.encode_to_vec()).await;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    queue
        .purge_tasks(&format!("{}.task.>", w.prefix))
        .await
        .expect("drain");
    // Not at once: the quiet period holds the fleet a while.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(replicas(&w), "5", "scaled down before the quiet period");
    eventually("back to the minimum", Duration::from_secs(30), || async {
        replicas(&w) == "1"
    })
    .await;
    beats.abort();
    if w.kube.emulated {
        let cost = |pod: &str| {
            w.field(
                &format!("pod/{pod}"),
                r#"{.metadata.annotations.controller\.kubernetes\.io/pod-deletion-cost}"#,
            )
        };
        assert_eq!(cost("worker-a"), "0", "the idle pod goes first");
        assert_eq!(cost("worker-b"), "3");
    }

    // The backlog cannot be read (its consumer is gone): the count holds,
    // and the operator says so.
    w.kube.ok(&[
        "scale",
        &format!("deploy/{DEPLOYMENT}"),
        "-n",
        &ns,
        "--replicas=2",
    ]);
    queue
        .delete_worker_consumer()
        .await
        .expect("delete consumer");
    eventually("the autoscaler holds", Duration::from_secs(30), || async {
        operator
            .http_get("/metrics")
            .await
            .is_some_and(|m| m.contains("stowage_operator_autoscale_backlog_readable 0"))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(replicas(&w), "2", "held, not moved to min or max");
    let reasons = w.kube.ok(&[
        "get",
        "events.events.k8s.io",
        "-n",
        &ns,
        "-o",
        "jsonpath={.items[*].reason}",
    ]);
    assert!(
        reasons.contains("BacklogUnreadable") && reasons.contains("Scaled"),
        "{reasons}"
    );
}

fn uuid_like(i: u32) -> String {
    format!("00000000-0000-0000-0000-{i:012}")
}
