//! The worker process: killed mid-upload, stopped with SIGTERM, observed
//! over gRPC and /metrics, sweeping orphaned uploads.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use stowage_common::spec::{HttpSource, UploadSource};
use stowage_common::state::uploads::ItemState;
use stowage_common::testing::{data, sha256_hex};
use support::Harness;
use support::source::{FileBehaviour, SourceServer};
use uuid::Uuid;

const MIB: usize = 1024 * 1024;

fn http(url: String) -> UploadSource {
    UploadSource {
        ingest: None,
        s3: None,
        http: Some(HttpSource {
            urls: vec![url],
            allow_private_networks: true,
        }),
    }
}

fn spawn_worker(h: &Harness) -> Child {
    Command::new(env!("CARGO_BIN_EXE_stowage-worker"))
        .args(h.worker_args(&[]).into_iter().skip(1))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start worker binary")
}

/// Waits until the item has at least `n` recorded parts; returns their numbers.
async fn wait_for_parts(h: &Harness, job: Uuid, n: i64) -> Vec<i32> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let db = h.pool.get().await.expect("db");
        let rows = db
            .query(
                "SELECT p.part_number FROM upload_parts p JOIN upload_items i ON i.id = p.item_id
                 WHERE i.job_id = $1 ORDER BY 1",
                &[&job],
            )
            .await
            .expect("parts");
        if rows.len() as i64 >= n {
            return rows.iter().map(|r| r.get(0)).collect();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {n} parts recorded in time"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A job whose source sends 1 MiB every `pause`.
async fn slow_job(h: &Harness, src: &SourceServer, bytes: &bytes::Bytes, pause: Duration) -> Uuid {
    src.put(
        "slow.bin",
        FileBehaviour {
            data: bytes.clone(),
            trickle: Some(pause),
            ..Default::default()
        },
    );
    let mut spec = h.spec(http(src.url("slow.bin")), "");
    spec.part_size_bytes = 5 * MIB as u64;
    spec.concurrency = 2;
    h.submit("slow", spec).await
}

async fn sigkill_mid_upload_resumes_from_recorded_parts(target: &str) {
    let h = Harness::new(target).await;
    let src = SourceServer::start().await;
    let bytes = data(40 * MIB, 30);
    let job = slow_job(&h, &src, &bytes, Duration::from_millis(60)).await;
    let mut first = spawn_worker(&h);
    let recorded = wait_for_parts(&h, job, 3).await;
    first.kill().expect("SIGKILL");
    first.wait().expect("reaped");

    // Another worker picks the task up after the ack deadline and resumes.
    let second = h.worker(None).await;
    let done = h.wait_job(job, Duration::from_secs(180)).await;
    assert_eq!(done.state, "succeeded");
    let m = &second.context.metrics;
    let resumed = m.parts_resumed.get();
    assert!(
        resumed >= recorded.len() as u64,
        "resumed {resumed} < {} recorded before the kill",
        recorded.len()
    );
    assert_eq!(
        m.parts_uploaded.get() + resumed,
        8,
        "every part stored exactly once by the second worker or before"
    );
    let expected = sha256_hex(&bytes);
    assert_eq!(
        h.items(job).await[0].sha256_hex.as_deref(),
        Some(expected.as_str())
    );
    assert_eq!(h.peer_sha256("slow.bin"), expected);
    let open =
        h.s3.list_multipart_uploads()
            .bucket(&h.bucket)
            .send()
            .await
            .expect("list");
    assert!(open.uploads().is_empty());
    second.shutdown().await.expect("shutdown");
}
on_each_s3!(sigkill_mid_upload_resumes_from_recorded_parts);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_hands_work_back() {
    let h = Harness::new("localstack").await;
    let src = SourceServer::start().await;
    let bytes = data(40 * MIB, 31);
    // 40 MiB at 1 MiB / 200 ms: far longer than the 2 s drain timeout.
    let job = slow_job(&h, &src, &bytes, Duration::from_millis(200)).await;
    let mut worker = spawn_worker(&h);
    wait_for_parts(&h, job, 1).await;
    let pid = worker.id().to_string();
    let stopped = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(stopped.success());
    // Drain timeout is 2 s: the process stops the upload, NAKs it and exits 0.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = worker.try_wait().expect("wait") {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "worker did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "graceful exit, got {status:?}");
    let item = h.items(job).await.remove(0);
    assert_eq!(item.state, ItemState::Pending, "handed back, not failed");
    assert_eq!(item.attempts, 0, "a shutdown does not burn an attempt");

    let next = h.worker(None).await;
    assert_eq!(
        h.wait_job(job, Duration::from_secs(120)).await.state,
        "succeeded"
    );
    assert!(next.context.metrics.parts_resumed.get() >= 1);
    assert_eq!(h.peer_sha256("slow.bin"), sha256_hex(&bytes));
    next.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_health_and_metrics_are_served() {
    use stowage_proto::v1::GetStatusRequest;
    use stowage_proto::v1::worker_status_client::WorkerStatusClient;

    let h = Harness::new("localstack").await;
    let src = SourceServer::start().await;
    let worker = h.worker(None).await;
    let job = slow_job(&h, &src, &data(20 * MIB, 32), Duration::from_millis(60)).await;
    wait_for_parts(&h, job, 1).await;

    let url = format!("http://{}", worker.grpc_addr);
    let mut client = WorkerStatusClient::connect(url.clone())
        .await
        .expect("grpc");
    let status = client
        .get_status(GetStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.capacity, 4);
    assert!(!status.draining);
    assert!(!status.worker_id.is_empty());
    let upload = status
        .in_flight
        .iter()
        .find(|t| t.kind == "upload")
        .expect("the upload is in flight");
    assert!(upload.task_id.starts_with(&format!("upload/{job}/")));
    assert!(
        upload.bytes_done >= 5 * MIB as u64,
        "at least one part stored"
    );

    let channel = tonic::transport::Endpoint::from_shared(url)
        .expect("url")
        .connect()
        .await
        .expect("grpc");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let served = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "stowage.v1.WorkerStatus".into(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        served.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let base = format!("http://{}", worker.http_addr);
    let body = reqwest::get(format!("{base}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    for name in [
        "stowage_worker_parts_uploaded_total",
        "stowage_lock_acquired_total",
        "stowage_worker_in_flight",
    ] {
        assert!(body.contains(name), "/metrics lacks {name}");
    }
    assert_eq!(
        reqwest::get(format!("{base}/readyz"))
            .await
            .expect("readyz")
            .status(),
        200
    );
    assert_eq!(
        reqwest::get(format!("{base}/healthz"))
            .await
            .expect("healthz")
            .status(),
        200
    );
    h.wait_job(job, Duration::from_secs(120)).await;
    worker.shutdown().await.expect("shutdown");
}

async fn sweeper_aborts_orphans_and_keeps_live_uploads(target: &str) {
    let h = Harness::new(target).await;
    let src = SourceServer::start().await;
    src.serve("a.txt", data(1000, 40));
    let worker = h.worker(None).await;
    // A job makes the bucket one of Stowage's destinations.
    let job = h.submit("sweep", h.spec(http(src.url("a.txt")), "")).await;
    assert_eq!(
        h.wait_job(job, Duration::from_secs(60)).await.state,
        "succeeded"
    );

    let create = |key: &'static str| {
        let s3 = h.s3.clone();
        let bucket = h.bucket.clone();
        async move {
            s3.create_multipart_upload()
                .bucket(bucket)
                .key(key)
                .send()
                .await
                .expect("create")
                .upload_id()
                .expect("id")
                .to_string()
        }
    };
    let orphan = create("orphan.bin").await;
    let live = create("live.bin").await;
    // `live` belongs to a pending item, as after a crash before the resume.
    let db = h.pool.get().await.expect("db");
    let item: i64 = db
        .query_one(
            "INSERT INTO upload_items (job_id, source_ref, dest_key) VALUES ($1, 'u', 'live.bin') RETURNING id",
            &[&job],
        )
        .await
        .expect("item")
        .get(0);
    db.execute(
        "INSERT INTO multipart_uploads (item_id, endpoint, bucket, object_key, upload_id, part_size_bytes, checksum_algorithm)
         VALUES ($1, 'e', $2, 'live.bin', $3, 5242880, 'crc32c')",
        &[&item, &h.bucket, &live],
    )
    .await
    .expect("multipart row");

    let aborted = stowage_worker::sweeper::sweep_once(&worker.context, Duration::ZERO)
        .await
        .expect("sweep");
    assert_eq!(aborted, 1);
    let open =
        h.s3.list_multipart_uploads()
            .bucket(&h.bucket)
            .send()
            .await
            .expect("list");
    let ids: Vec<&str> = open
        .uploads()
        .iter()
        .filter_map(|u| u.upload_id())
        .collect();
    assert_eq!(
        ids,
        vec![live.as_str()],
        "orphan {orphan} aborted, live upload kept"
    );
    worker.shutdown().await.expect("shutdown");
}
on_each_s3!(sweeper_aborts_orphans_and_keeps_live_uploads);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_acks_keep_long_tasks_from_redelivery() {
    let h = Harness::new("localstack").await;
    let src = SourceServer::start().await;
    let worker = h.worker(None).await;
    // 20 MiB at 1 MiB / 500 ms ≈ 10 s, twice the 5 s ack deadline, read
    // twice: the hashing pass, then the upload.
    let job = slow_job(&h, &src, &data(20 * MIB, 33), Duration::from_millis(500)).await;
    assert_eq!(
        h.wait_job(job, Duration::from_secs(120)).await.state,
        "succeeded"
    );
    let mut consumer = h.queue.worker_consumer().await.expect("consumer");
    let info = consumer.info().await.expect("consumer info");
    assert_eq!(
        info.num_redelivered, 0,
        "no task was redelivered while it ran"
    );
    assert_eq!(
        src.hits("slow.bin"),
        2,
        "the source was read twice (hashed, then uploaded) and never again"
    );
    worker.shutdown().await.expect("shutdown");
}
