//! Reconcile against a scripted mock of the Kubernetes API (tower-test, the
//! pattern of kube-rs's controller-rs), with the real PostgreSQL and NATS of
//! the local stack behind the context: each test scripts the API calls a
//! reconcile must make, in order, and asserts on what it sent and on rows.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use stowage_common::db;
use stowage_common::locks::{LockManager, LockMetrics};
use stowage_common::queue::{Queue, TaskKind};
use stowage_common::state::{collections, lifecycle, uploads};
use stowage_common::storage::S3Clients;
use stowage_common::testing::{StackEnv, fresh_database, unique};
use stowage_operator::controllers::{Context, index_collection, upload_job};
use stowage_operator::crd::{IndexCollection, UploadJob};
use stowage_operator::metrics::Metrics;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// One expected API call: method, a path suffix, and the JSON to answer.
struct Expect {
    method: &'static str,
    path_ends: String,
    answer: Value,
}

/// Serves `script` in order; returns every request body it saw.
fn serve(mut handle: Handle, script: Vec<Expect>) -> tokio::task::JoinHandle<Vec<Value>> {
    tokio::spawn(async move {
        let mut bodies = Vec::new();
        for e in script {
            let (req, send) = handle
                .next_request()
                .await
                .expect("the reconcile made the next call");
            assert_eq!(req.method().as_str(), e.method, "method of {}", req.uri());
            assert!(
                req.uri().path().ends_with(&e.path_ends),
                "expected a call to …{}, got {} {}",
                e.path_ends,
                req.method(),
                req.uri()
            );
            let bytes = req.into_body().collect_bytes().await.expect("request body");
            bodies.push(serde_json::from_slice(&bytes).unwrap_or(Value::Null));
            send.send_response(
                Response::builder()
                    .body(Body::from(serde_json::to_vec(&e.answer).expect("json")))
                    .expect("response"),
            );
        }
        bodies
    })
}

struct Fixture {
    ctx: Arc<Context>,
    handle: Option<Handle>,
}

async fn fixture() -> Fixture {
    let env = StackEnv::load();
    let url = fresh_database(&env).await;
    let pg = db::parse_url(&url).expect("url");
    let mut registry = Registry::default();
    let locks = LockManager::new(
        pg.clone(),
        LockMetrics::register(&mut registry),
        Duration::from_secs(1),
    );
    let pool = db::pool(&pg, 4).expect("pool");
    db::migrate(&pool, &locks).await.expect("migrate");
    let queue = Queue::connect(&env.nats_url(), &unique("op"))
        .await
        .expect("nats");
    queue.ensure_streams().await.expect("streams");
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let ctx = Arc::new(Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "stowage-operator".into(),
                instance: Some("test".into()),
            },
        ),
        client,
        db: pool,
        queue,
        locks,
        s3: S3Clients::new(None),
        metrics: Metrics::register(&mut registry),
        resync: Duration::from_secs(60),
        debounce: stowage_operator::watch_uploads::Debounce {
            quiet: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
        },
    });
    Fixture {
        ctx,
        handle: Some(handle),
    }
}

fn upload_job(uid: &str, extra: Value) -> Value {
    let mut v = json!({
        "apiVersion": "stowage.dev/v1alpha1",
        "kind": "UploadJob",
        "metadata": {
            "name": "docs", "namespace": "team-a", "uid": uid, "generation": 1,
            "resourceVersion": "1", "finalizers": ["stowage.dev/cleanup"],
        },
        "spec": {
            "source": {"http": {"urls": ["https://example.com/a.txt", "https://example.com/b.txt"]}},
            "destination": {"bucket": "docs", "keyPrefix": "in/"},
        },
    });
    merge(&mut v, extra);
    v
}

fn merge(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

fn condition<'a>(status_patch: &'a Value, type_: &str) -> &'a Value {
    status_patch["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("no {type_} condition in {status_patch}"))
}

/// The status patch of the `docs` UploadJob, answered with `answer`.
fn job_status(answer: &Value) -> Expect {
    Expect {
        method: "PATCH",
        path_ends: "/namespaces/team-a/uploadjobs/docs/status".into(),
        answer: answer.clone(),
    }
}

fn event(reason: &str) -> Expect {
    Expect {
        method: "POST",
        path_ends: "/namespaces/team-a/events".into(),
        answer: json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": format!("e-{reason}")}, "eventTime": null}),
    }
}

#[tokio::test]
async fn a_new_upload_job_gets_the_finalizer_first() {
    let mut f = fixture().await;
    let mut obj = upload_job(&unique("uid"), json!({}));
    obj["metadata"]["finalizers"] = Value::Null;
    let mut with_finalizer = obj.clone();
    with_finalizer["metadata"]["finalizers"] = json!(["stowage.dev/cleanup"]);
    let api = serve(
        f.handle.take().expect("handle"),
        vec![Expect {
            method: "PATCH",
            path_ends: "/namespaces/team-a/uploadjobs/docs".into(),
            answer: with_finalizer,
        }],
    );
    let uj: UploadJob = serde_json::from_value(obj).expect("fixture");
    let action = upload_job::reconcile(Arc::new(uj), Arc::clone(&f.ctx))
        .await
        .expect("reconcile");
    assert_eq!(action, Action::await_change());
    let bodies = api.await.expect("mock");
    let ops = bodies[0].as_array().expect("a JSON patch");
    assert!(
        ops.iter()
            .any(|op| op["op"] == "add" && op["value"] == json!(["stowage.dev/cleanup"])),
        "{ops:?}"
    );
}

#[tokio::test]
async fn an_invalid_spec_becomes_a_condition_without_requeue() {
    let mut f = fixture().await;
    let uid = unique("uid");
    let obj = upload_job(&uid, json!({"spec": {"partSizeBytes": 1024}}));
    let api = serve(
        f.handle.take().expect("handle"),
        vec![job_status(&obj), event("InvalidSpec")],
    );
    let uj: UploadJob = serde_json::from_value(obj).expect("fixture");
    let action = upload_job::reconcile(Arc::new(uj), Arc::clone(&f.ctx))
        .await
        .expect("reconcile");
    assert_eq!(
        action,
        Action::await_change(),
        "no requeue for a spec only a person can fix"
    );
    let bodies = api.await.expect("mock");
    assert_eq!(bodies[1]["reason"], "InvalidSpec");
    let ready = condition(&bodies[0], "Ready");
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "InvalidSpec");
    assert!(
        ready["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("partSizeBytes: 1024")),
        "{ready}"
    );
    assert_eq!(bodies[0]["status"]["phase"], "Failed");
    let db = f.ctx.db.get().await.expect("db");
    assert!(
        lifecycle::find_job(&db, &uid)
            .await
            .expect("query")
            .is_none(),
        "nothing registered"
    );
}

#[tokio::test]
async fn a_valid_job_is_registered_once_and_planned_once() {
    let mut f = fixture().await;
    let uid = unique("uid");
    let obj = upload_job(&uid, json!({}));
    // The second reconcile sees the same object again (status not yet
    // echoed back): it must not register or publish anything new.
    let api = serve(
        f.handle.take().expect("handle"),
        vec![event("Registered"), job_status(&obj), job_status(&obj)],
    );
    let uj: UploadJob = serde_json::from_value(obj.clone()).expect("fixture");
    let uj = Arc::new(uj);
    let action = upload_job::reconcile(Arc::clone(&uj), Arc::clone(&f.ctx))
        .await
        .expect("reconcile");
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
    upload_job::reconcile(uj, Arc::clone(&f.ctx))
        .await
        .expect("second reconcile");
    let bodies = api.await.expect("mock");

    let db = f.ctx.db.get().await.expect("db");
    let job = lifecycle::find_job(&db, &uid)
        .await
        .expect("query")
        .expect("registered");
    assert_eq!(
        (
            job.namespace.as_str(),
            job.name.as_str(),
            job.state.as_str()
        ),
        ("team-a", "docs", "pending")
    );
    assert_eq!(bodies[1]["status"]["jobId"], job.id.to_string());
    assert_eq!(bodies[1]["status"]["phase"], "Pending");
    assert_eq!(condition(&bodies[1], "Progressing")["reason"], "Planning");
    assert_eq!(condition(&bodies[1], "Complete")["status"], "False");
    // Exactly one planning task queued for the resource.
    let subject = f
        .ctx
        .queue
        .topology()
        .task_subject(TaskKind::UploadPlan, "team-a", "docs");
    assert_eq!(
        queued(&f.ctx.queue, &subject).await,
        1,
        "one planning task on {subject}"
    );
}

/// Drops and counts the tasks queued on `subject`.
async fn queued(queue: &Queue, subject: &str) -> u64 {
    queue
        .purge_tasks(subject)
        .await
        .expect("purge counts what it dropped")
}

#[tokio::test]
async fn deleting_a_job_drops_its_tasks_and_rows_then_the_finalizer() {
    let mut f = fixture().await;
    let uid = unique("uid");
    let obj = upload_job(&uid, json!({}));
    // Register it as the controller would.
    let handle = f.handle.take().expect("handle");
    let mut deleting = obj.clone();
    deleting["metadata"]["deletionTimestamp"] = json!("2026-11-23T00:00:00Z");
    let mut gone = deleting.clone();
    gone["metadata"]["finalizers"] = json!([]);
    let api = serve(
        handle,
        vec![
            event("Registered"),
            job_status(&obj),
            event("CleanedUp"),
            Expect {
                method: "PATCH",
                path_ends: "/namespaces/team-a/uploadjobs/docs".into(),
                answer: gone,
            },
        ],
    );
    let uj: UploadJob = serde_json::from_value(obj).expect("fixture");
    upload_job::reconcile(Arc::new(uj), Arc::clone(&f.ctx))
        .await
        .expect("register");
    let job = {
        let db = f.ctx.db.get().await.expect("db");
        lifecycle::find_job(&db, &uid)
            .await
            .expect("query")
            .expect("registered")
    };
    let uj: UploadJob = serde_json::from_value(deleting).expect("fixture");
    let action = upload_job::reconcile(Arc::new(uj), Arc::clone(&f.ctx))
        .await
        .expect("cleanup");
    assert_eq!(action, Action::await_change());
    let bodies = api.await.expect("mock");
    assert_eq!(bodies[2]["reason"], "CleanedUp");
    assert!(
        bodies[2]["note"]
            .as_str()
            .is_some_and(|n| n.starts_with("1 queued tasks dropped")),
        "{}",
        bodies[2]
    );
    let ops = bodies[3].as_array().expect("a JSON patch");
    assert!(
        ops.iter().any(|op| op["op"] == "remove"),
        "finalizer removed: {ops:?}"
    );
    let db = f.ctx.db.get().await.expect("db");
    assert!(matches!(
        uploads::get_job(&db, job.id).await,
        Err(stowage_common::state::StateError::NotFound { .. })
    ));
    let subject = f
        .ctx
        .queue
        .topology()
        .task_subject(TaskKind::UploadPlan, "team-a", "docs");
    assert_eq!(queued(&f.ctx.queue, &subject).await, 0, "no task left");
}

#[tokio::test]
async fn a_collection_is_registered_and_its_first_sync_requested() {
    let mut f = fixture().await;
    let uid = unique("uid");
    let obj = json!({
        "apiVersion": "stowage.dev/v1alpha1",
        "kind": "IndexCollection",
        "metadata": {
            "name": "kb", "namespace": "team-a", "uid": uid, "generation": 1,
            "resourceVersion": "1", "finalizers": ["stowage.dev/cleanup"],
        },
        "spec": {"source": {"bucket": "docs", "prefix": "kb/"}, "resyncInterval": "5m"},
    });
    let api = serve(
        f.handle.take().expect("handle"),
        vec![
            event("SyncRequested"),
            Expect {
                method: "PATCH",
                path_ends: "/namespaces/team-a/indexcollections/kb/status".into(),
                answer: obj.clone(),
            },
        ],
    );
    let ic: IndexCollection = serde_json::from_value(obj).expect("fixture");
    let action = index_collection::reconcile(Arc::new(ic), Arc::clone(&f.ctx))
        .await
        .expect("reconcile");
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
    let bodies = api.await.expect("mock");
    let status = &bodies[1]["status"];
    assert_eq!(status["phase"], "Pending");
    assert!(status["nextSyncTime"].is_string());
    let db = f.ctx.db.get().await.expect("db");
    let id = collections::find(&db, &uid)
        .await
        .expect("query")
        .expect("registered");
    assert_eq!(status["collectionId"], id.to_string());
    let subject = f
        .ctx
        .queue
        .topology()
        .task_subject(TaskKind::IndexSync, "team-a", "kb");
    assert_eq!(queued(&f.ctx.queue, &subject).await, 1, "one sync task");
}

#[tokio::test]
async fn a_resume_whose_files_were_not_queued_is_finished_by_the_next_reconcile() {
    let mut f = fixture().await;
    let uid = unique("uid");
    let suspended = upload_job(&uid, json!({"spec": {"suspend": true}}));
    let resumed = upload_job(&uid, json!({"spec": {"suspend": false}}));
    let api = serve(
        f.handle.take().expect("handle"),
        vec![
            event("Registered"),
            job_status(&resumed),
            event("Resumed"),
            job_status(&resumed),
            job_status(&resumed),
        ],
    );
    let uj: UploadJob = serde_json::from_value(suspended).expect("fixture");
    upload_job::reconcile(Arc::new(uj), Arc::clone(&f.ctx))
        .await
        .expect("register");
    let db = f.ctx.db.get().await.expect("db");
    let job = lifecycle::find_job(&db, &uid)
        .await
        .expect("query")
        .expect("registered");
    assert_eq!(job.state, "suspended", "registered suspended");
    let items: Vec<uploads::NewItem> = ["a.txt", "b.txt", "c.txt"]
        .iter()
        .map(|name| uploads::NewItem {
            source_ref: format!("https://example.com/{name}"),
            dest_key: format!("in/{name}"),
            size_bytes: None,
            invalid: None,
        })
        .collect();
    uploads::add_items(&db, job.id, &items)
        .await
        .expect("items");
    uploads::mark_planned(&db, job.id).await.expect("planned");
    let files = f
        .ctx
        .queue
        .topology()
        .task_subject(TaskKind::Upload, "team-a", "docs");

    // An operator resumed the job and died before queuing its files.
    assert!(
        lifecycle::set_suspended(&db, job.id, false)
            .await
            .expect("resume")
    );
    assert_eq!(queued(&f.ctx.queue, &files).await, 0);

    // The next reconcile sees the state already resumed, and still queues
    // the files the resume owes, once.
    let uj: Arc<UploadJob> = Arc::new(serde_json::from_value(resumed).expect("fixture"));
    upload_job::reconcile(Arc::clone(&uj), Arc::clone(&f.ctx))
        .await
        .expect("reconcile after the crash");
    assert_eq!(queued(&f.ctx.queue, &files).await, 3, "three files queued");
    upload_job::reconcile(uj, Arc::clone(&f.ctx))
        .await
        .expect("a later reconcile");
    assert_eq!(queued(&f.ctx.queue, &files).await, 0, "queued once");
    let bodies = api.await.expect("mock");
    assert_eq!(bodies[2]["reason"], "Resumed");
    assert_eq!(bodies[2]["note"], "3 pending files queued");
    assert_eq!(
        uploads::get_job(&db, job.id).await.expect("job").state,
        "pending"
    );
}
