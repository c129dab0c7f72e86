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
use stowage_common::queue::{NatsSettings, Queue, TaskKind};
use stowage_common::state::{collections, uploads};
use stowage_common::storage::S3Clients;
use stowage_common::testing::{StackEnv, fresh_database, unique};
use stowage_operator::controllers::{Context, concurrency_for_pool, reconcile};
use stowage_operator::crd::{IndexCollection, Raw, UploadJob};
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
    let queue = Queue::connect(&NatsSettings::new(env.nats_url(), unique("op")))
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
        s3: S3Clients::new(
            stowage_common::secrets::Secrets::new(
                stowage_common::secrets::SecretSource::Unconfigured("tests".into()),
                stowage_common::secrets::SECRET_TTL,
            ),
            stowage_common::storage::Policy::default(),
        ),
        metrics: Metrics::register(&mut registry),
        resync: Duration::from_secs(60),
        debounce: stowage_operator::watch_uploads::Debounce {
            quiet: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
        },
        concurrency: concurrency_for_pool(4),
        autoscale: None,
        allow_worker_credentials: false,
        allow_private_networks: false,
        failures: Default::default(),
    });
    Fixture {
        ctx,
        handle: Some(handle),
    }
}

/// A resource as the API would serve it to the controller.
fn raw<K>(v: Value) -> Arc<Raw<K>> {
    Arc::new(serde_json::from_value(v).expect("fixture"))
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
    let uj = raw::<UploadJob>(obj);
    let action = reconcile(uj, Arc::clone(&f.ctx)).await.expect("reconcile");
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
    let uj = raw::<UploadJob>(obj);
    let action = reconcile(uj, Arc::clone(&f.ctx)).await.expect("reconcile");
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
            .is_some_and(|m| m.starts_with("spec.partSizeBytes: Invalid value: 1024")),
        "{ready}"
    );
    assert_eq!(bodies[0]["status"]["phase"], "Failed");
    let db = f.ctx.db.get().await.expect("db");
    assert!(
        uploads::find_job(&db, &uid).await.expect("query").is_none(),
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
    let uj = raw::<UploadJob>(obj.clone());
    let action = reconcile(Arc::clone(&uj), Arc::clone(&f.ctx))
        .await
        .expect("reconcile");
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
    reconcile(uj, Arc::clone(&f.ctx))
        .await
        .expect("second reconcile");
    let bodies = api.await.expect("mock");

    let db = f.ctx.db.get().await.expect("db");
    let job = uploads::find_job(&db, &uid)
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
    let uj = raw::<UploadJob>(obj);
    reconcile(uj, Arc::clone(&f.ctx)).await.expect("register");
    let job = {
        let db = f.ctx.db.get().await.expect("db");
        uploads::find_job(&db, &uid)
            .await
            .expect("query")
            .expect("registered")
    };
    let uj = raw::<UploadJob>(deleting);
    let action = reconcile(uj, Arc::clone(&f.ctx)).await.expect("cleanup");
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
    let ic = raw::<IndexCollection>(obj);
    let action = reconcile(ic, Arc::clone(&f.ctx)).await.expect("reconcile");
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
    let uj = raw::<UploadJob>(suspended);
    reconcile(uj, Arc::clone(&f.ctx)).await.expect("register");
    let db = f.ctx.db.get().await.expect("db");
    let job = uploads::find_job(&db, &uid)
        .await
        .expect("query")
        .expect("registered");
    assert_eq!(job.state.as_str(), "suspended", "registered suspended");
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
        uploads::set_suspended(&db, job.id, false)
            .await
            .expect("resume")
    );
    assert_eq!(queued(&f.ctx.queue, &files).await, 0);

    // The next reconcile sees the state already resumed, and still queues
    // the files the resume owes, once.
    let uj = raw::<UploadJob>(resumed);
    reconcile(Arc::clone(&uj), Arc::clone(&f.ctx))
        .await
        .expect("reconcile after the crash");
    assert_eq!(queued(&f.ctx.queue, &files).await, 3, "three files queued");
    reconcile(uj, Arc::clone(&f.ctx))
        .await
        .expect("a later reconcile");
    assert_eq!(queued(&f.ctx.queue, &files).await, 0, "queued once");
    let bodies = api.await.expect("mock");
    assert_eq!(bodies[2]["reason"], "Resumed");
    assert_eq!(bodies[2]["note"], "3 pending files queued");
    assert_eq!(
        uploads::get_job(&db, job.id)
            .await
            .expect("job")
            .state
            .as_str(),
        "pending"
    );
}

/// Answers every API call the way a permissive API server would (the status
/// patches echo a resource, events are accepted), for as long as the
/// reconciles run: for tests where the order of calls is not the point.
fn serve_any(mut handle: Handle) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut served = 0;
        while let Some((req, send)) = handle.next_request().await {
            let answer = if req.uri().path().ends_with("/events") {
                json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e"}, "eventTime": null})
            } else {
                json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "UploadJob", "metadata": {"name": "any", "namespace": "team-a"}})
            };
            send.send_response(
                Response::builder()
                    .body(Body::from(serde_json::to_vec(&answer).expect("json")))
                    .expect("response"),
            );
            served += 1;
        }
        served
    })
}

/// 153 hostile resources once went wrong 34 ways; this is the probe kept.
/// Each case is a spec the operator must refuse by itself (as it would
/// behind an API server without the schema, CEL, or with
/// `--validate=false`): `Ready=False, reason=InvalidSpec` naming the field
/// and the reason, no requeue, no panic, and not one row written.
fn hostile_upload_jobs() -> Vec<(Value, &'static str)> {
    let url = |u: &str| json!({"source": {"http": {"urls": [u]}}});
    let dest = |d: Value| {
        let mut base = json!({"bucket": "docs", "keyPrefix": "in/"});
        merge(&mut base, d);
        json!({"destination": base})
    };
    let many = |n: usize| json!({"source": {"http": {"urls": (0..n).map(|i| format!("https://example.com/{i}")).collect::<Vec<_>>()}}});
    vec![
        (
            json!({"partSizeBytes": "big"}),
            "spec.partSizeBytes: Invalid value: \"big\": must be of type integer, not string",
        ),
        (
            json!({"partSizeBytes": 1024}),
            "spec.partSizeBytes: Invalid value: 1024: must be greater than or equal to 5242880",
        ),
        (
            json!({"partSizeBytes": -1}),
            "spec.partSizeBytes: Invalid value: -1: out of range",
        ),
        (
            json!({"partSizeBytes": 1.5e20}),
            "spec.partSizeBytes: Invalid value: 1.5e+20: must be of type integer, not number",
        ),
        (
            json!({"partSizeBytes": 6_000_000_000u64}),
            "must be less than or equal to 5368709120",
        ),
        (
            json!({"concurrency": 0}),
            "spec.concurrency: Invalid value: 0: must be greater than or equal to 1",
        ),
        (
            json!({"concurrency": 65}),
            "spec.concurrency: Invalid value: 65: must be less than or equal to 64",
        ),
        (
            json!({"concurrency": 4_294_967_296u64}),
            "spec.concurrency: Invalid value: 4294967296: out of range",
        ),
        (
            json!({"conflictPolicy": "clobber"}),
            "spec.conflictPolicy: Unsupported value: \"clobber\"",
        ),
        (
            json!({"checksum": "md5"}),
            "spec.checksum: Unsupported value: \"md5\"",
        ),
        (
            json!({"dedup": "yes"}),
            "spec.dedup: Invalid value: \"yes\": must be of type boolean",
        ),
        (
            json!({"suspend": "true"}),
            "spec.suspend: Invalid value: \"true\": must be of type boolean",
        ),
        (
            json!({"retry": "always"}),
            "spec.retry: Invalid value: \"always\": must be of type object",
        ),
        (
            json!({"retry": {"maxAttempts": 0}}),
            "spec.retry.maxAttempts: Invalid value: 0",
        ),
        (
            json!({"retry": {"maxAttempts": 101}}),
            "spec.retry.maxAttempts: Invalid value: 101: must be less than or equal to 100",
        ),
        (
            json!({"retry": {"backoff": {"baseMillis": 0}}}),
            "spec.retry.backoff.baseMillis: Invalid value: 0",
        ),
        (
            json!({"retry": {"backoff": {"maxMillis": 86_400_001}}}),
            "spec.retry.backoff.maxMillis: Invalid value: 86400001",
        ),
        (
            json!({"retry": {"backoff": {"baseMillis": 5000, "maxMillis": 1000}}}),
            "retry.backoff: baseMillis (5000) must be > 0 and <= maxMillis (1000)",
        ),
        (
            json!({"activeDeadlineSeconds": -5}),
            "spec.activeDeadlineSeconds: Invalid value: -5: must be greater than or equal to 1",
        ),
        (
            json!({"activeDeadlineSeconds": 0}),
            "spec.activeDeadlineSeconds: Invalid value: 0",
        ),
        (
            json!({"activeDeadlineSeconds": i64::MAX}),
            "spec.activeDeadlineSeconds: Invalid value: 9223372036854775807: must be less than or equal to 315360000",
        ),
        (
            json!({"activeDeadlineSeconds": "1h"}),
            "spec.activeDeadlineSeconds: Invalid value: \"1h\": must be of type integer",
        ),
        (
            json!({"ttlSecondsAfterFinished": -1}),
            "spec.ttlSecondsAfterFinished: Invalid value: -1: must be greater than or equal to 0",
        ),
        (
            json!({"ttlSecondsAfterFinished": 99_999_999_999i64}),
            "spec.ttlSecondsAfterFinished: Invalid value: 99999999999: must be less than or equal to 315360000",
        ),
        (json!({"bogus": 1}), "spec.bogus: unknown field"),
        (
            json!({"destination": {"colour": "red"}}),
            "spec.destination.colour: unknown field",
        ),
        (
            json!({"source": {"http": {"urls": ["https://example.com/a"], "follow": true}}}),
            "spec.source.http.follow: unknown field",
        ),
        (
            json!({"source": {"s3": {"bucket": "src"}, "http": {"urls": ["https://example.com/a"]}}}),
            "source: exactly one of `s3` or `http` must be set, found 2",
        ),
        (
            json!({"source": {"s3": {"prefix": "a/"}, "http": null}}),
            "spec.source.s3.bucket: Required value",
        ),
        (
            json!({"source": {"s3": {"bucket": "src", "prefix": "p".repeat(1025)}, "http": null}}),
            "spec.source.s3.prefix: Too long: may not be more than 1024 characters",
        ),
        (
            json!({"source": {"http": {"urls": []}}}),
            "spec.source.http.urls: must have at least 1 items",
        ),
        (
            many(10_001),
            "spec.source.http.urls: Too many: 10001: must have at most 10000 items",
        ),
        (
            many(50_000),
            "spec.source.http.urls: Too many: 50000: must have at most 10000 items",
        ),
        (
            json!({"source": {"http": {"urls": [7]}}}),
            "spec.source.http.urls[0]: Invalid value: 7: must be of type string",
        ),
        (
            json!({"source": {"http": {"urls": [""]}}}),
            "spec.source.http.urls[0]: Invalid value: \"\": must be at least 1 characters",
        ),
        (
            json!({"source": {"http": {"urls": ["x".repeat(8193)]}}}),
            "spec.source.http.urls[0]: Too long: may not be more than 8192 characters",
        ),
        (
            json!({"source": {"http": {"allowPrivateNetworks": 1, "urls": ["https://example.com/a"]}}}),
            "spec.source.http.allowPrivateNetworks: Invalid value: 1: must be of type boolean",
        ),
        (
            url("ftp://example.com/a"),
            "source.http.urls[0]: \"ftp://example.com/a\" is not an http:// or https:// URL",
        ),
        (
            url("http://"),
            "source.http.urls[0]: \"http://\" is not a URL: empty host",
        ),
        (
            url("http://exa mple.com/a"),
            "source.http.urls[0]: \"http://exa mple.com/a\" contains whitespace or a control character",
        ),
        (
            url("https://example.com/a\u{0}b"),
            "source.http.urls[0]: \"https://example.com/a\\\\0b\" contains whitespace or a control character",
        ),
        (
            url("https://example.com/ok\u{7f}"),
            "contains whitespace or a control character",
        ),
        (
            url("example.com/a.txt"),
            "source.http.urls[0]: \"example.com/a.txt\" is not a URL: relative URL without a base",
        ),
        (
            url("https://[::1/a"),
            "source.http.urls[0]: \"https://[::1/a\" is not a URL: invalid IPv6 address",
        ),
        (
            json!({"destination": null}),
            "spec.destination: must not be null",
        ),
        (
            dest(json!({"bucket": "Bad_Bucket"})),
            "destination.bucket: \"Bad_Bucket\" is not a valid bucket name",
        ),
        (
            dest(json!({"bucket": "ab"})),
            "spec.destination.bucket: Invalid value: \"ab\": must be at least 3 characters",
        ),
        (
            dest(json!({"bucket": "b".repeat(64)})),
            "spec.destination.bucket: Too long: may not be more than 63 characters",
        ),
        (
            dest(json!({"bucket": "-docs-"})),
            "destination.bucket: \"-docs-\" is not a valid bucket name",
        ),
        (
            dest(json!({"keyPrefix": "../etc/"})),
            "destination.keyPrefix: object key \"../etc/\" contains a `.` or `..` path segment",
        ),
        (
            dest(json!({"keyPrefix": "/abs/"})),
            "destination.keyPrefix: object key \"/abs/\" starts with `/`",
        ),
        (
            dest(json!({"keyPrefix": "a\\b/"})),
            "destination.keyPrefix: object key \"a\\\\b/\" contains a backslash",
        ),
        (
            dest(json!({"keyPrefix": "a\u{1}b/"})),
            "destination.keyPrefix: object key \"a\\\\u{1}b/\" contains a control character",
        ),
        (
            dest(json!({"keyPrefix": "k".repeat(1025)})),
            "spec.destination.keyPrefix: Too long: may not be more than 1024 characters",
        ),
        (
            dest(json!({"endpoint": "http://"})),
            "destination.endpoint: \"http://\" is not a URL: empty host",
        ),
        (
            dest(json!({"endpoint": "ftp://s3.example.com"})),
            "destination.endpoint: \"ftp://s3.example.com\" is not an http:// or https:// URL",
        ),
        (
            dest(json!({"endpoint": "https://user:pw@s3.example.com"})),
            "destination.endpoint: must not carry credentials",
        ),
        (
            dest(json!({"endpoint": "https://s3 .example.com"})),
            "destination.endpoint: \"https://s3 .example.com\" contains whitespace",
        ),
        (
            dest(json!({"endpoint": ""})),
            "spec.destination.endpoint: Invalid value: \"\": must be at least 1 characters",
        ),
        (
            dest(json!({"region": ""})),
            "spec.destination.region: Invalid value: \"\": must be at least 1 characters",
        ),
        (
            dest(json!({"region": "r".repeat(65)})),
            "spec.destination.region: Too long: may not be more than 64 characters",
        ),
        (
            dest(json!({"forcePathStyle": "no"})),
            "spec.destination.forcePathStyle: Invalid value: \"no\": must be of type boolean",
        ),
        (
            dest(json!({"credentialsSecretRef": {}})),
            "spec.destination.credentialsSecretRef.name: Required value",
        ),
        (
            dest(json!({"credentialsSecretRef": {"name": "Bad Name"}})),
            "spec.destination.credentialsSecretRef.name: Invalid value: \"Bad Name\": must match",
        ),
        (
            dest(json!({"credentialsSecretRef": {"name": "other-ns/creds"}})),
            "spec.destination.credentialsSecretRef.name: Invalid value: \"other-ns/creds\": must match",
        ),
        (
            dest(json!({"credentialsSecretRef": "creds"})),
            "spec.destination.credentialsSecretRef: Invalid value: \"creds\": must be of type object",
        ),
        (
            dest(json!({"allowPrivateNetworks": true})),
            "spec.destination.allowPrivateNetworks: this installation does not let resources reach private networks",
        ),
        (
            json!({"source": {"http": {"urls": ["http://10.0.0.1/a"], "allowPrivateNetworks": true}}}),
            "spec.source.http.allowPrivateNetworks: this installation does not let resources reach private networks",
        ),
        (
            dest(json!({"encryption": {"type": "AES"}})),
            "spec.destination.encryption.type: Unsupported value: \"AES\"",
        ),
        (
            dest(json!({"encryption": {}})),
            "spec.destination.encryption.type: Required value",
        ),
        (
            dest(json!({"encryption": {"type": "SSE-C"}})),
            "destination.encryption: type SSE-C needs customerKeySecretRef",
        ),
        (
            dest(json!({"encryption": {"type": "SSE-S3", "kmsKeyId": "k"}})),
            "destination.encryption: kmsKeyId goes only with type SSE-KMS",
        ),
        (
            dest(json!({"encryption": {"type": "SSE-KMS", "customerKeySecretRef": {"name": "k"}}})),
            "destination.encryption: customerKeySecretRef goes only with type SSE-C",
        ),
        (
            dest(json!({"encryption": {"type": "SSE-KMS", "kmsKeyId": "k".repeat(2049)}})),
            "spec.destination.encryption.kmsKeyId: Too long: may not be more than 2048 characters",
        ),
        (
            dest(json!({"encryption": {"type": "SSE-KMS", "kmsKeyId": "alias/my key"}})),
            "destination.encryption.kmsKeyId: must be 1 to 2048 printable characters without spaces",
        ),
        (
            dest(
                json!({"encryption": {"type": "SSE-C", "customerKeySecretRef": {"name": "other-ns/key"}}}),
            ),
            "spec.destination.encryption.customerKeySecretRef.name: Invalid value: \"other-ns/key\": must match",
        ),
        (
            dest(
                json!({"encryption": {"type": "SSE-C", "customerKeySecretRef": {"name": "k", "key": "a/b"}}}),
            ),
            "spec.destination.encryption.customerKeySecretRef.key: Invalid value: \"a/b\": must match",
        ),
        (
            dest(json!({"useWorkerCredentials": true})),
            "spec.destination.useWorkerCredentials: this installation does not let resources use the workers' own credentials",
        ),
    ]
}

#[tokio::test]
async fn every_hostile_upload_job_gets_a_precise_invalid_spec_and_no_rows() {
    let mut f = fixture().await;
    let cases = hostile_upload_jobs();
    assert!(cases.len() >= 50, "the probe keeps at least 50 cases");
    let mut script = Vec::new();
    let mut objects = Vec::new();
    for (i, (spec, _)) in cases.iter().enumerate() {
        let obj = upload_job(&format!("hostile-{i}"), json!({"spec": spec}));
        script.extend([job_status(&obj), event("InvalidSpec")]);
        objects.push(obj);
    }
    // Not even deserializable into the types: no spec, a spec that is not
    // an object, an unknown enum value at the top.
    let mut no_spec = upload_job("no-spec", json!({}));
    no_spec.as_object_mut().expect("object").remove("spec");
    let null_spec = upload_job("null-spec", json!({"spec": null}));
    let mut text_spec = upload_job("text-spec", json!({}));
    text_spec["spec"] = json!("copy everything");
    let untyped = [
        (no_spec, "spec: Required value"),
        (null_spec, "spec: Required value"),
        (
            text_spec,
            "spec: Invalid value: \"copy everything\": must be of type object",
        ),
    ];
    for (obj, _) in &untyped {
        script.extend([job_status(obj), event("InvalidSpec")]);
    }
    let api = serve(f.handle.take().expect("handle"), script);
    let expected: Vec<&str> = cases
        .iter()
        .map(|(_, want)| *want)
        .chain(untyped.iter().map(|(_, want)| *want))
        .collect();
    for obj in objects
        .into_iter()
        .chain(untyped.into_iter().map(|(o, _)| o))
    {
        let action = reconcile(raw::<UploadJob>(obj.clone()), Arc::clone(&f.ctx))
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", obj["spec"]));
        assert_eq!(action, Action::await_change(), "{}", obj["spec"]);
    }
    let bodies = api.await.expect("mock");
    for (i, want) in expected.iter().enumerate() {
        let (status, event) = (&bodies[2 * i], &bodies[2 * i + 1]);
        let ready = condition(status, "Ready");
        let message = ready["message"].as_str().unwrap_or_default();
        assert_eq!(ready["reason"], "InvalidSpec", "case {i}");
        assert!(
            message.contains(want),
            "case {i}: expected {want:?} in {message:?}"
        );
        assert!(message.len() < 2048, "case {i}: a bounded message");
        assert_eq!(condition(status, "Failed")["status"], "True");
        assert_eq!(event["reason"], "InvalidSpec");
        assert_eq!(event["note"], ready["message"]);
    }
    let db = f.ctx.db.get().await.expect("db");
    let rows: i64 = db
        .query_one("SELECT count(*) FROM upload_jobs", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 0, "a refused resource writes nothing");
}

fn hostile_collections() -> Vec<(Value, &'static str)> {
    vec![
        (
            json!({"resyncInterval": "18446744073709551615s1s"}),
            "resyncInterval: \"18446744073709551615s1s\" is too long a duration",
        ),
        (
            json!({"resyncInterval": "5s"}),
            "resyncInterval: \"5s\" is shorter than the 10s minimum",
        ),
        (
            json!({"resyncInterval": "400d"}),
            "resyncInterval: \"400d\" is longer than the 365d maximum",
        ),
        (
            json!({"resyncInterval": "10 minutes"}),
            "spec.resyncInterval: Invalid value: \"10 minutes\": must match",
        ),
        (
            json!({"resyncInterval": 600}),
            "spec.resyncInterval: Invalid value: 600: must be of type string",
        ),
        (
            json!({"chunking": {"size": 10}}),
            "spec.chunking.size: Invalid value: 10: must be greater than or equal to 64",
        ),
        (
            json!({"chunking": {"size": 100, "overlap": 100}}),
            "chunking: size 100 must be within [64, 32768] and overlap 100 smaller than size",
        ),
        (
            json!({"chunking": {"strategy": "semantic"}}),
            "spec.chunking.strategy: Unsupported value: \"semantic\"",
        ),
        (
            json!({"embedding": {"provider": "cohere"}}),
            "spec.embedding.provider: Unsupported value: \"cohere\"",
        ),
        (
            json!({"embedding": {"provider": "openai", "model": "m", "dimensions": 8}}),
            "embedding.endpoint: required for the openai, ollama and tei providers",
        ),
        (
            json!({"embedding": {"provider": "tei", "endpoint": "http://"}}),
            "embedding.endpoint: \"http://\" is not a URL: empty host",
        ),
        (
            json!({"embedding": {"provider": "ollama", "endpoint": "http://a b"}}),
            "embedding.endpoint: \"http://a b\" contains whitespace",
        ),
        (
            json!({"embedding": {"dimensions": 0}}),
            "spec.embedding.dimensions: Invalid value: 0: must be greater than or equal to 1",
        ),
        (
            json!({"embedding": {"dimensions": 768}}),
            "embedding.dimensions: the builtin model has 384 dimensions, not 768",
        ),
        (
            json!({"source": {"bucket": "docs", "include": ["a[b"]}}),
            "source.include: \"a[b\" is not a valid glob",
        ),
        (
            json!({"source": {"bucket": "docs", "include": vec!["*.md"; 101]}}),
            "spec.source.include: Too many: 101: must have at most 100 items",
        ),
        (
            json!({"source": {"bucket": 5}}),
            "spec.source.bucket: Invalid value: 5: must be of type string",
        ),
        (
            json!({"source": {"bucket": "docs", "endpoint": "http://exa mple"}}),
            "source.endpoint: \"http://exa mple\" contains whitespace",
        ),
        (
            json!({"watchUploads": "yes"}),
            "spec.watchUploads: Invalid value: \"yes\": must be of type boolean",
        ),
        (json!({"reindex": true}), "spec.reindex: unknown field"),
    ]
}

#[tokio::test]
async fn every_hostile_collection_gets_a_precise_invalid_spec_and_no_rows() {
    let mut f = fixture().await;
    let cases = hostile_collections();
    let mut script = Vec::new();
    let mut objects = Vec::new();
    for (i, (spec, _)) in cases.iter().enumerate() {
        let mut base =
            json!({"source": {"bucket": "docs", "prefix": "kb/"}, "resyncInterval": "5m"});
        merge(&mut base, spec.clone());
        let obj = json!({
            "apiVersion": "stowage.dev/v1alpha1",
            "kind": "IndexCollection",
            "metadata": {"name": "kb", "namespace": "team-a", "uid": format!("hostile-{i}"),
                         "generation": 1, "resourceVersion": "1", "finalizers": ["stowage.dev/cleanup"]},
            "spec": base,
        });
        script.extend([
            Expect {
                method: "PATCH",
                path_ends: "/namespaces/team-a/indexcollections/kb/status".into(),
                answer: obj.clone(),
            },
            event("InvalidSpec"),
        ]);
        objects.push(obj);
    }
    let api = serve(f.handle.take().expect("handle"), script);
    for obj in objects {
        let action = reconcile(raw::<IndexCollection>(obj), Arc::clone(&f.ctx))
            .await
            .expect("reconcile");
        assert_eq!(action, Action::await_change());
    }
    let bodies = api.await.expect("mock");
    for (i, (_, want)) in cases.iter().enumerate() {
        let ready = condition(&bodies[2 * i], "Ready");
        let message = ready["message"].as_str().unwrap_or_default();
        assert_eq!(ready["reason"], "InvalidSpec", "case {i}");
        assert!(
            message.contains(want),
            "case {i}: expected {want:?} in {message:?}"
        );
        let suspended = condition(&bodies[2 * i], "Suspended");
        assert_eq!(
            (&suspended["status"], &suspended["reason"]),
            (&json!("False"), &json!("NotSuspended"))
        );
    }
    let db = f.ctx.db.get().await.expect("db");
    let rows: i64 = db
        .query_one("SELECT count(*) FROM collections", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 0, "a refused collection writes nothing");
}

/// A burst of resources once starved the pool: each reconcile held a
/// connection while the functions it called waited for another, until
/// every reconcile waited on every other (402 s for 50 jobs). Now each
/// holds at most one: many more reconciles than connections all finish.
#[tokio::test]
async fn a_burst_of_reconciles_does_not_starve_the_pool() {
    let mut f = fixture().await; // a pool of 4
    let api = serve_any(f.handle.take().expect("handle"));
    let mut running = tokio::task::JoinSet::new();
    let uids: Vec<String> = (0..24).map(|i| unique(&format!("burst-{i}-"))).collect();
    for uid in &uids {
        let obj = upload_job(uid, json!({}));
        let ctx = Arc::clone(&f.ctx);
        running.spawn(async move { reconcile(raw::<UploadJob>(obj), ctx).await });
    }
    let mut results = Vec::new();
    while let Some(r) = running.join_next().await {
        results.push(r.expect("no panic"));
    }
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
        .collect();
    assert!(failed.is_empty(), "reconciles failed: {failed:?}");
    let db = f.ctx.db.get().await.expect("db");
    for uid in &uids {
        assert!(
            uploads::find_job(&db, uid).await.expect("query").is_some(),
            "{uid} registered"
        );
    }
    api.abort();
}

/// A resource kind of the test's own whose reconcile panics, to prove what
/// a panic becomes: a failed reconcile of that one resource.
mod probe {
    use std::sync::Arc;

    use kube::CustomResource;
    use kube::runtime::controller::Action;
    use schemars::JsonSchema;
    use serde::{Deserialize, Serialize};
    use stowage_operator::controllers::{Context, Error, Reconciler};
    use stowage_operator::crd::condition::Condition;
    use stowage_operator::crd::{Judged, Raw};

    #[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
    #[kube(
        group = "test.stowage.dev",
        version = "v1",
        kind = "Probe",
        namespaced,
        status = "ProbeStatus"
    )]
    pub struct ProbeSpec {
        pub index: usize,
    }

    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
    pub struct ProbeStatus {
        #[serde(default)]
        pub conditions: Vec<Condition>,
    }

    impl Judged for Probe {
        type Status = ProbeStatus;
        fn check(&self) -> Result<(), String> {
            Ok(())
        }
        fn set_status(&mut self, status: Option<ProbeStatus>) {
            self.status = status;
        }
        fn spec_schema() -> &'static serde_json::Value {
            static SCHEMA: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
            SCHEMA.get_or_init(|| {
                serde_json::json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
            })
        }
    }

    impl Reconciler for Probe {
        const CONTROLLER: &'static str = "probe";

        async fn apply(raw: Arc<Raw<Self>>, _: &Context) -> Result<Action, Error> {
            let probe = stowage_operator::crd::judge::<Probe>(&raw).expect("judged");
            let items: Vec<u8> = Vec::new();
            Ok(Action::requeue(std::time::Duration::from_secs(u64::from(
                items[probe.spec.index],
            ))))
        }

        async fn cleanup(_: Arc<Raw<Self>>, _: &Context) -> Result<Action, Error> {
            Ok(Action::await_change())
        }

        fn conditions(status: &mut ProbeStatus) -> &mut Vec<Condition> {
            &mut status.conditions
        }
    }
}

#[tokio::test]
async fn a_panicking_reconcile_fails_that_resource_and_nothing_else() {
    use stowage_operator::controllers::{Category, Error};
    use stowage_operator::metrics::ErrorLabels;
    let mut f = fixture().await;
    let obj = json!({
        "apiVersion": "test.stowage.dev/v1",
        "kind": "Probe",
        "metadata": {"name": "p", "namespace": "team-a", "uid": "p1", "generation": 4,
                     "resourceVersion": "1", "finalizers": ["stowage.dev/cleanup"]},
        "spec": {"index": 3},
    });
    let api = serve(
        f.handle.take().expect("handle"),
        vec![
            event("ReconcileError"),
            Expect {
                method: "PATCH",
                path_ends: "/namespaces/team-a/probes/p/status".into(),
                answer: obj.clone(),
            },
        ],
    );
    let result = reconcile(raw::<probe::Probe>(obj), Arc::clone(&f.ctx)).await;
    let Err(e @ Error::Panic(_)) = result else {
        panic!("expected a caught panic, got {result:?}");
    };
    assert!(e.to_string().contains("index out of bounds"), "{e}");
    assert_eq!(e.category(), Category::Bug);
    let bodies = api.await.expect("mock");
    assert!(
        bodies[0]["note"]
            .as_str()
            .is_some_and(|n| n.contains("index out of bounds")),
        "{}",
        bodies[0]
    );
    let ready = condition(&bodies[1], "Ready");
    assert_eq!(
        (
            &ready["status"],
            &ready["reason"],
            &ready["observedGeneration"]
        ),
        (&json!("False"), &json!("ReconcileError"), &json!(4))
    );
    let panics = f
        .ctx
        .metrics
        .errors
        .get_or_create(&ErrorLabels {
            controller: "probe",
            class: "panic",
        })
        .get();
    assert_eq!(panics, 1);
    // The process carries on: the next resource is reconciled as usual.
    let mut g = fixture().await;
    let api = serve_any(g.handle.take().expect("handle"));
    reconcile(
        raw::<UploadJob>(upload_job(&unique("uid"), json!({}))),
        Arc::clone(&g.ctx),
    )
    .await
    .expect("the operator still works");
    api.abort();
}
