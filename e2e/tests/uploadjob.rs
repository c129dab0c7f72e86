//! UploadJob end to end: kubectl → Kubernetes API → operator → JetStream →
//! workers → S3, and back into `.status`. Runs against the cluster that
//! `KUBECONFIG` names, else against the local emulator; no sleeps — every
//! wait is `kubectl wait` or a poll with a deadline.

use std::time::Duration;

use stowage_common::testing::{data, sha256_hex};
use stowage_e2e::{Binaries, SlowFiles, World, eventually};

async fn world() -> World {
    World::new(Binaries {
        operator: env!("CARGO_BIN_EXE_e2e-operator"),
        worker: env!("CARGO_BIN_EXE_e2e-worker"),
    })
    .await
}

fn http_job(w: &World, name: &str, urls: &[String]) -> String {
    let list: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    format!(
        r#"apiVersion: stowage.dev/v1alpha1
kind: UploadJob
metadata: {{name: {name}, namespace: {ns}}}
spec:
  source:
    http: {{urls: [{urls}], allowPrivateNetworks: true}}
  destination:
    bucket: {dst}
    keyPrefix: {name}/
    endpoint: {endpoint}
    region: {region}
    credentialsSecretRef: {{name: s3}}
    allowPrivateNetworks: true
  partSizeBytes: 5242880
  concurrency: 2
"#,
        ns = w.namespace,
        urls = list.join(", "),
        dst = w.bucket,
        endpoint = w.target.endpoint,
        region = w.target.region,
    )
}

/// `n` files of `mib` MiB named `<stem>-<i>.bin`, served at `rate` bytes/s.
async fn slow_files(
    stem: &str,
    n: u64,
    mib: usize,
    rate: usize,
) -> (SlowFiles, Vec<(String, bytes::Bytes)>, Vec<String>) {
    let files: Vec<(String, bytes::Bytes)> = (0..n)
        .map(|i| {
            (
                format!("{stem}-{i}.bin"),
                data(mib * 1024 * 1024, i + mib as u64 * 100),
            )
        })
        .collect();
    let server = SlowFiles::start(files.clone(), rate).await;
    let urls = files
        .iter()
        .map(|(n, _)| format!("{}/{n}", server.base))
        .collect();
    (server, files, urls)
}

/// Source objects under `prefix`: sizes from a few KiB to 12 MiB (multipart).
async fn seed(w: &World, prefix: &str, n: usize) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for i in 0..n {
        let len = if i == 0 {
            12 * 1024 * 1024 + 17
        } else {
            3000 * (i + 1)
        };
        let body = data(len, i as u64 + 1);
        let rel = format!("doc-{i}.bin");
        w.put(&w.source_bucket, &format!("{prefix}{rel}"), body.clone())
            .await;
        out.push((rel, sha256_hex(&body)));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_job_completes_with_verified_objects_and_counts() {
    let w = world().await;
    let operator = w.operator();
    let _workers = [w.worker(2), w.worker(2)];
    let files = seed(&w, "in/", 5).await;
    w.apply_ok(&w.s3_job("docs", "in/"));

    w.wait_for("uj/docs", "Complete", "120s");
    for (rel, sha) in &files {
        let got = w.sha256(&w.bucket, &format!("docs/{rel}")).await;
        assert_eq!(got.as_deref(), Some(sha.as_str()), "docs/{rel}");
    }
    assert_eq!(w.field("uj/docs", "{.status.phase}"), "Succeeded");
    assert_eq!(w.field("uj/docs", "{.status.files.uploaded}"), "5");
    assert_eq!(w.field("uj/docs", "{.status.files.total}"), "5");
    let bytes: i64 = w
        .field("uj/docs", "{.status.bytes.done}")
        .parse()
        .expect("bytes");
    assert!(bytes > 12 * 1024 * 1024, "bytes done {bytes}");
    // What a person sees: the printer columns.
    let table = w.kube.ok(&["get", "uj", "-n", &w.namespace]);
    let row = table
        .lines()
        .find(|l| l.starts_with("docs"))
        .expect("a row for docs");
    assert!(row.contains("Succeeded") && row.contains("5/5"), "{table}");
    let all = w.kube.ok(&["get", "stowage", "-n", &w.namespace]);
    assert!(all.contains("uploadjob.stowage.dev/docs"), "{all}");
    // The story in events, from one recorder.
    let reasons = w.kube.ok(&[
        "get",
        "events.events.k8s.io",
        "-n",
        &w.namespace,
        "-o",
        "jsonpath={.items[*].reason}",
    ]);
    assert!(
        reasons.contains("Registered") && reasons.contains("Completed"),
        "{reasons}"
    );
    // And in metrics.
    let metrics = operator
        .http_get("/metrics")
        .await
        .expect("operator /metrics");
    assert!(
        metrics
            .contains(r#"stowage_operator_reconciles_total{controller="uploadjob",result="ok"}"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_only_the_operator_can_judge_gets_invalid_spec() {
    let w = world().await;
    let _operator = w.operator();
    // A key prefix that escapes with `..`: the schema admits the string, the
    // operator refuses it.
    let manifest = w
        .s3_job("bad", "in/")
        .replace("keyPrefix: bad/", "keyPrefix: ../escape/");
    w.apply_ok(&manifest);
    w.wait_for("uj/bad", "Failed", "60s");
    let ready = w.field(
        "uj/bad",
        r#"{.status.conditions[?(@.type=="Ready")].reason}"#,
    );
    assert_eq!(ready, "InvalidSpec");
    let message = w.field(
        "uj/bad",
        r#"{.status.conditions[?(@.type=="Ready")].message}"#,
    );
    assert!(
        message.starts_with("destination.keyPrefix:") && message.contains(".."),
        "{message}"
    );
    assert_eq!(w.job_rows("bad").await, 0, "nothing registered");

    // Out-of-range values are the schema's job on a real API server.
    if !w.kube.emulated {
        let manifest = w
            .s3_job("tiny-parts", "in/")
            .replace("partSizeBytes: 5242880", "partSizeBytes: 1024");
        let out = w.kube.apply(w.dir.path(), &manifest);
        assert!(
            !out.status.success(),
            "the API server must refuse partSizeBytes 1024"
        );
    }
}

/// A resource the Rust types cannot even read (a string where a number
/// belongs) was once silently ignored, and after an operator restart it
/// held back every other UploadJob. Now it gets InvalidSpec naming the
/// field, and the others are reconciled as usual, before and after a
/// restart. (A real API server refuses such a manifest: the emulator,
/// like an API server without the schema, lets it through.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_resource_is_refused_and_holds_back_no_other() {
    let w = world().await;
    let files = seed(&w, "in/", 2).await;
    if w.kube.emulated {
        let broken = w
            .s3_job("broken", "in/")
            .replace("partSizeBytes: 5242880", "partSizeBytes: huge")
            .replace("  retry:", "  colour: blue\n  retry:");
        w.apply_ok(&broken);
    }
    let mut operator = w.operator();
    let _worker = w.worker(2);
    w.apply_ok(&w.s3_job("first", "in/"));
    w.wait_for("uj/first", "Complete", "120s");
    if w.kube.emulated {
        w.wait_for("uj/broken", "Failed", "60s");
        let message = w.field(
            "uj/broken",
            r#"{.status.conditions[?(@.type=="Ready")].message}"#,
        );
        assert!(
            message
                .contains("spec.partSizeBytes: Invalid value: \"huge\": must be of type integer")
                && message.contains("spec.colour: unknown field"),
            "{message}"
        );
        assert_eq!(w.job_rows("broken").await, 0);
    }
    // A restart lists every resource again, the unreadable one among them.
    operator.kill();
    let _operator = w.operator();
    w.apply_ok(&w.s3_job("second", "in/"));
    w.wait_for("uj/second", "Complete", "120s");
    for (rel, sha) in &files {
        let got = w.sha256(&w.bucket, &format!("second/{rel}")).await;
        assert_eq!(got.as_deref(), Some(sha.as_str()), "second/{rel}");
    }
}

/// 50 UploadJobs applied at once once took 402 s with 263 reconciles
/// failing on "Timeout occurred while waiting for a slot": each reconcile
/// held a pooled connection while waiting for another. With the default
/// pool every one is registered, and no reconcile fails on the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_jobs_applied_at_once_are_all_registered() {
    let w = world().await;
    let operator = w.operator();
    let manifests: Vec<String> = (0..50)
        .map(|i| {
            http_job(
                &w,
                &format!("burst-{i}"),
                &["https://example.com/never-fetched".into()],
            )
            .replace("  concurrency: 2", "  concurrency: 2\n  suspend: true")
        })
        .collect();
    w.apply_ok(&manifests.join("---\n"));
    eventually(
        "all 50 jobs registered",
        Duration::from_secs(90),
        || async {
            let ids = w.kube.ok(&[
                "get",
                "uj",
                "-n",
                &w.namespace,
                "-o",
                "jsonpath={.items[*].status.jobId}",
            ]);
            ids.split_whitespace().count() == 50
        },
    )
    .await;
    let metrics = operator.http_get("/metrics").await.expect("metrics");
    let database_errors: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("stowage_operator_reconcile_errors_total")
                && l.contains(r#"class="database""#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(database_errors, 0.0, "{metrics}");
}

/// A presigned-style URL that fails: no copy of its password, signature,
/// credential or token in the job's status, its events, its dead letter, or
/// the operator's and the worker's logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_presigned_url_leaves_no_secret_anywhere() {
    let w = world().await;
    let operator = w.operator();
    let worker = w.worker(2);
    let server = SlowFiles::start(Vec::new(), 1 << 20).await;
    let host = server.base.trim_start_matches("http://");
    let url = format!(
        "http://alice:hunter2@{host}/report.pdf?X-Amz-Algorithm=AWS4-HMAC-SHA256&\
         X-Amz-Credential=AKIDSECRETCRED&X-Amz-Signature=deadbeefSIGNATURE&token=TOKENSECRET"
    );
    let manifest = http_job(&w, "presigned", &[url]).replace(
        "  concurrency: 2",
        "  concurrency: 2\n  retry: {maxAttempts: 1}",
    );
    w.apply_ok(&manifest);
    w.wait_for("uj/presigned", "Failed", "120s");
    let status = w.field("uj/presigned", "{.status}");
    assert!(status.contains("answered HTTP 404"), "{status}");
    let events = w.kube.ok(&[
        "get",
        "events.events.k8s.io",
        "-n",
        &w.namespace,
        "-o",
        "json",
    ]);
    let queue = stowage_common::queue::Queue::connect(&stowage_common::queue::NatsSettings::new(
        w.stack.nats_url(),
        &w.prefix,
    ))
    .await
    .expect("nats");
    let letters = format!("{:?}", queue.dead_letters().await.expect("dead letters"));
    assert!(letters.contains("answered HTTP 404"), "{letters}");
    let logs: String = [&operator.log, &worker.log]
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect();
    for secret in [
        "hunter2",
        "deadbeefSIGNATURE",
        "AKIDSECRETCRED",
        "TOKENSECRET",
    ] {
        for (what, text) in [
            ("status", &status),
            ("events", &events),
            ("dead letters", &letters),
            ("logs", &logs),
        ] {
            assert!(!text.contains(secret), "{secret} leaked into the {what}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_running_job_drops_its_work_and_aborts_its_uploads() {
    let w = world().await;
    let _operator = w.operator();
    let _worker = w.worker(2);
    // Three 24 MiB files at 6 MiB/s: minutes of work, multipart in flight.
    let (_server, files, urls) = slow_files("big", 3, 24, 6 * 1024 * 1024).await;
    w.apply_ok(&http_job(&w, "slow", &urls));
    eventually(
        "a multipart upload in flight",
        Duration::from_secs(60),
        || async { w.open_uploads(&w.bucket).await > 0 },
    )
    .await;

    w.kube.ok(&[
        "delete",
        "uj/slow",
        "-n",
        &w.namespace,
        "--wait=true",
        "--timeout=60s",
    ]);
    let gone = w.kube.run(&["get", "uj/slow", "-n", &w.namespace]);
    assert!(
        !gone.status.success(),
        "the resource is gone (finalizer removed)"
    );
    eventually(
        "every multipart upload aborted",
        Duration::from_secs(30),
        || async { w.open_uploads(&w.bucket).await == 0 },
    )
    .await;
    assert_eq!(w.job_rows("slow").await, 0, "job rows deleted");
    for (name, _) in &files {
        assert_eq!(
            w.sha256(&w.bucket, &format!("slow/{name}")).await,
            None,
            "{name} never completed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_job_does_not_stop_the_job() {
    let w = world().await;
    let _operator = w.operator();
    let mut doomed = w.worker(1);
    let _survivor = w.worker(1);
    let (_server, files, urls) = slow_files("f", 4, 12, 8 * 1024 * 1024).await;
    w.apply_ok(&http_job(&w, "killed", &urls));
    eventually(
        "both workers uploading",
        Duration::from_secs(60),
        || async { w.open_uploads(&w.bucket).await >= 2 },
    )
    .await;
    doomed.kill();

    w.wait_for("uj/killed", "Complete", "180s");
    for (name, body) in &files {
        let got = w.sha256(&w.bucket, &format!("killed/{name}")).await;
        assert_eq!(got.as_deref(), Some(sha256_hex(body).as_str()), "{name}");
    }
    assert_eq!(w.field("uj/killed", "{.status.files.uploaded}"), "4");
    assert_eq!(
        w.open_uploads(&w.bucket).await,
        0,
        "no multipart upload left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_operator_takes_over_when_the_leader_is_killed() {
    let w = world().await;
    let _worker = w.worker(2);
    let mut first = w.operator();
    eventually(
        "the first replica leads",
        Duration::from_secs(30),
        || async { first.metric("stowage_operator_leader").await == Some(1.0) },
    )
    .await;
    assert_eq!(first.http_get("/healthz").await.as_deref(), Some("ok"));
    assert_eq!(first.http_get("/readyz").await.as_deref(), Some("ready"));
    let second = w.operator();
    eventually(
        "the second replica is up, standing by",
        Duration::from_secs(30),
        || async { second.metric("stowage_operator_leader").await == Some(0.0) },
    )
    .await;
    seed(&w, "one/", 2).await;
    w.apply_ok(&w.s3_job("one", "one/"));
    w.wait_for("uj/one", "Complete", "120s");
    assert_eq!(
        second.metric("stowage_operator_leader").await,
        Some(0.0),
        "one leader at a time"
    );

    first.kill();
    eventually(
        "the standby takes over within seconds",
        Duration::from_secs(10),
        || async { second.metric("stowage_operator_leader").await == Some(1.0) },
    )
    .await;
    seed(&w, "two/", 2).await;
    w.apply_ok(&w.s3_job("two", "two/"));
    w.wait_for("uj/two", "Complete", "120s");
    assert_eq!(w.field("uj/two", "{.status.files.uploaded}"), "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_job_starts_no_file_until_resumed() {
    let w = world().await;
    let _operator = w.operator();
    let _worker = w.worker(2);
    let files = seed(&w, "held/", 3).await;
    let manifest = w
        .s3_job("held", "held/")
        .replace("  partSizeBytes:", "  suspend: true\n  partSizeBytes:");
    w.apply_ok(&manifest);
    w.wait_for("uj/held", "Suspended", "60s");
    // Planned (the workers listed the source) but not one file started.
    eventually("the files are planned", Duration::from_secs(30), || async {
        w.field("uj/held", "{.status.files.total}") == "3"
    })
    .await;
    assert_eq!(w.field("uj/held", "{.status.phase}"), "Suspended");
    assert_eq!(w.field("uj/held", "{.status.files.uploaded}"), "0");
    for (rel, _) in &files {
        assert_eq!(
            w.sha256(&w.bucket, &format!("held/{rel}")).await,
            None,
            "{rel} uploaded while suspended"
        );
    }
    w.kube.ok(&[
        "patch",
        "uj/held",
        "-n",
        &w.namespace,
        "--type=merge",
        "-p",
        r#"{"spec":{"suspend":false}}"#,
    ]);
    w.wait_for("uj/held", "Complete", "120s");
    for (rel, sha) in &files {
        assert_eq!(
            w.sha256(&w.bucket, &format!("held/{rel}")).await.as_deref(),
            Some(sha.as_str())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replay_annotation_brings_dead_letters_back() {
    let w = world().await;
    let _operator = w.operator();
    let _worker = w.worker(2);
    let here = data(40_000, 5);
    let late = data(50_000, 6);
    let server = SlowFiles::start(vec![("here.bin".into(), here.clone())], 64 * 1024 * 1024).await;
    let urls = [
        format!("{}/here.bin", server.base),
        format!("{}/late.bin", server.base),
    ];
    w.apply_ok(&http_job(&w, "replay", &urls));
    // late.bin answers 404: permanent, dead-lettered at once, the job fails.
    w.wait_for("uj/replay", "Failed", "60s");
    assert_eq!(w.field("uj/replay", "{.status.files.deadLettered}"), "1");
    let failed = w.field(
        "uj/replay",
        r#"{.status.conditions[?(@.type=="Failed")].message}"#,
    );
    assert!(
        failed.contains("replay/late.bin") && failed.contains("404"),
        "{failed}"
    );

    server.put("late.bin", late.clone());
    w.kube.ok(&[
        "annotate",
        "uj/replay",
        "-n",
        &w.namespace,
        "stowage.dev/replay=1",
    ]);
    w.wait_for("uj/replay", "Complete", "60s");
    assert_eq!(w.field("uj/replay", "{.status.replayed}"), "1");
    assert_eq!(w.field("uj/replay", "{.status.files.deadLettered}"), "0");
    assert_eq!(
        w.sha256(&w.bucket, "replay/late.bin").await,
        Some(sha256_hex(&late))
    );
    assert_eq!(
        w.sha256(&w.bucket, "replay/here.bin").await,
        Some(sha256_hex(&here))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_fails_a_slow_job_and_ttl_deletes_a_finished_one() {
    let w = world().await;
    let _operator = w.operator();
    let _worker = w.worker(1);
    let (_server, _files, urls) = slow_files("s", 3, 16, 2 * 1024 * 1024).await;
    let manifest = http_job(&w, "late", &urls).replace(
        "  concurrency: 2",
        "  concurrency: 2\n  activeDeadlineSeconds: 3",
    );
    w.apply_ok(&manifest);
    w.wait_for("uj/late", "Failed", "60s");
    assert_eq!(
        w.field(
            "uj/late",
            r#"{.status.conditions[?(@.type=="Failed")].reason}"#
        ),
        "DeadlineExceeded"
    );

    seed(&w, "brief/", 1).await;
    let manifest = w.s3_job("brief", "brief/").replace(
        "  partSizeBytes:",
        "  ttlSecondsAfterFinished: 1\n  partSizeBytes:",
    );
    w.apply_ok(&manifest);
    w.kube.ok(&[
        "wait",
        "uj/brief",
        "-n",
        &w.namespace,
        "--for=delete",
        "--timeout=60s",
    ]);
    assert_eq!(
        w.job_rows("brief").await,
        0,
        "deleted through the finalizer"
    );
    assert!(
        w.sha256(&w.bucket, "brief/doc-0.bin").await.is_some(),
        "the object stays"
    );
}

/// The same data plane without Kubernetes: `stowctl upload --wait` submits a
/// job, follows it to its end on progress events and prints every file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stowctl_upload_waits_for_the_job_and_lists_its_files() {
    let w = world().await;
    let _worker = w.worker(4);
    let files = seed(&w, "cli/", 4).await;
    let stowctl = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_e2e-stowctl"))
            .arg(format!("--database-url={}", w.database_url))
            .arg(format!("--nats-url={}", w.stack.nats_url()))
            .arg(format!("--queue-prefix={}", w.prefix))
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run stowctl")
    };
    let from = format!("s3://{}/cli/", w.source_bucket);
    let to = format!("s3://{}/from-cli/", w.bucket);
    let endpoint = w.target.endpoint.as_str();
    let out = stowctl(&[
        "upload",
        "--name=cli",
        // Its Secrets are those of this namespace.
        &format!("--namespace={}", w.namespace),
        &format!("--from={from}"),
        &format!("--from-endpoint={endpoint}"),
        "--from-credentials=s3",
        &format!("--to={to}"),
        &format!("--to-endpoint={endpoint}"),
        "--to-credentials=s3",
        &format!("--region={}", w.target.region),
        "--allow-private-networks",
        "--wait",
        "--timeout=120",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // The job's line, then one line per file with its SHA-256.
    assert!(
        stdout.contains("succeeded — 4 uploaded, 0 skipped (duplicate)"),
        "{stdout}"
    );
    for (rel, sha) in &files {
        let key = format!("from-cli/{rel}");
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("succeeded") && l.contains(sha) && l.ends_with(&key)),
            "{key} in\n{stdout}"
        );
        assert_eq!(
            w.sha256(&w.bucket, &key).await.as_deref(),
            Some(sha.as_str())
        );
    }
    // Progress went to stderr while it waited.
    assert!(stderr.contains("4/4 files done"), "{stderr}");

    // `status --summary`: the job's line alone.
    let id = stdout
        .lines()
        .find_map(|l| l.strip_prefix("job ")?.strip_suffix(" submitted"))
        .expect("job id")
        .to_string();
    let out = stowctl(&["status", "--summary", &id]);
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{summary}");
    assert_eq!(summary.lines().count(), 1, "{summary}");
    assert!(summary.contains(": succeeded — 4 uploaded"), "{summary}");
}
