//! Upload data plane on the real stack: NATS JetStream, PostgreSQL and both
//! S3 servers (LocalStack and Garage). Every test checks bytes through a
//! client nobody here wrote, plus the rows Stowage keeps.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use stowage_common::spec::{ConflictPolicy, HttpSource, UploadSource};
use stowage_common::state::uploads::{self, ItemState};
use stowage_common::testing::{data, sha256_hex};
use support::Harness;
use support::source::{FileBehaviour, SourceServer};

const MIB: usize = 1024 * 1024;

fn http(urls: Vec<String>) -> UploadSource {
    UploadSource {
        ingest: None,
        s3: None,
        http: Some(HttpSource {
            urls,
            // The test source listens on loopback: allowed explicitly.
            allow_private_networks: true,
        }),
    }
}

async fn big_file_in_8_mib_parts(target: &str) {
    let h = Harness::new(target).await;
    let src = SourceServer::start().await;
    let bytes = data(200 * MIB, 1);
    let expected = sha256_hex(&bytes);
    src.serve("big.bin", bytes);
    let worker = h.worker(None).await;
    let mut spec = h.spec(http(vec![src.url("big.bin")]), "in/");
    spec.part_size_bytes = 8 * MIB as u64;
    let job = h.submit("big", spec).await;
    let done = h.wait_job(job, Duration::from_secs(300)).await;
    assert_eq!(done.state, "succeeded");

    let items = h.items(job).await;
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].state, ItemState::Succeeded);
    assert_eq!(items[0].sha256_hex.as_deref(), Some(expected.as_str()));
    assert_eq!(items[0].size_bytes, Some(200 * MIB as i64));
    // 200 MiB / 8 MiB = 25 parts, each sent once.
    let m = &worker.context.metrics;
    assert_eq!(m.parts_uploaded.get(), 25);
    assert_eq!(m.bytes_uploaded.get(), 200 * MIB as u64);
    let head =
        h.s3.head_object()
            .bucket(&h.bucket)
            .key("in/big.bin")
            .send()
            .await
            .expect("head");
    assert_eq!(head.content_length(), Some(200 * MIB as i64));
    assert_eq!(
        h.object_sha256_metadata("in/big.bin").await.as_deref(),
        Some(expected.as_str())
    );
    assert_eq!(h.peer_sha256("in/big.bin"), expected);
    let db = h.pool.get().await.expect("db");
    let obj = uploads::current_object(&db, &h.bucket, "in/big.bin")
        .await
        .expect("q")
        .expect("row");
    assert_eq!(
        (obj.version, obj.sha256_hex.as_str(), obj.size_bytes),
        (1, expected.as_str(), 200 * MIB as i64)
    );
    // No multipart bookkeeping is left behind.
    let left: i64 = db
        .query_one("SELECT count(*) FROM multipart_uploads", &[])
        .await
        .expect("q")
        .get(0);
    assert_eq!(left, 0);
    worker.shutdown().await.expect("shutdown");
}
on_each_s3!(big_file_in_8_mib_parts);

async fn corrupted_part_is_rejected_and_sent_again(target: &str) {
    let h = Harness::new(target).await;
    let src = SourceServer::start().await;
    let bytes = data(12 * MIB, 2);
    let expected = sha256_hex(&bytes);
    src.serve("f.bin", bytes);
    // Part 2 has a byte flipped on its first attempt, after its checksum was
    // computed: in-flight corruption the server must catch.
    let corrupted = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&corrupted);
    let hook: stowage_worker::upload::multipart::PartHook = Arc::new(move |part, attempt, b| {
        if part == 2 && attempt == 1 {
            seen.fetch_add(1, Ordering::SeqCst);
            let mut v = b.to_vec();
            v[100] ^= 0xff;
            bytes::Bytes::from(v)
        } else {
            b
        }
    });
    let worker = h.worker(Some(hook)).await;
    let mut spec = h.spec(http(vec![src.url("f.bin")]), "");
    spec.part_size_bytes = 5 * MIB as u64;
    let job = h.submit("corrupt", spec).await;
    assert_eq!(
        h.wait_job(job, Duration::from_secs(120)).await.state,
        "succeeded"
    );
    assert_eq!(
        corrupted.load(Ordering::SeqCst),
        1,
        "the corrupted part was sent"
    );
    let m = &worker.context.metrics;
    assert!(m.part_retries.get() >= 1, "the rejected part was retried");
    assert_eq!(m.parts_uploaded.get(), 3);
    assert_eq!(h.peer_sha256("f.bin"), expected);
    worker.shutdown().await.expect("shutdown");
}
on_each_s3!(corrupted_part_is_rejected_and_sent_again);

async fn source_failures_are_classified(target: &str) {
    let h = Harness::new(target).await;
    let src = SourceServer::start().await;
    let good = data(64 * 1024, 3);
    src.put(
        "flaky.txt",
        FileBehaviour {
            data: good.clone(),
            fail_first: 2,
            ..Default::default()
        },
    );
    src.put(
        "down.txt",
        FileBehaviour {
            always: Some(503),
            ..Default::default()
        },
    );
    let worker = h.worker(None).await;
    let mut spec = h.spec(
        http(vec![
            src.url("missing.txt"),
            src.url("flaky.txt"),
            src.url("down.txt"),
        ]),
        "",
    );
    spec.retry.max_attempts = 3;
    let job = h.submit("failures", spec).await;
    assert_eq!(
        h.wait_job(job, Duration::from_secs(120)).await.state,
        "failed"
    );
    let items = h.items(job).await;
    let by_key = |k: &str| {
        items
            .iter()
            .find(|i| i.dest_key == k)
            .expect("item")
            .clone()
    };

    // 404: permanent, one attempt, one request.
    let missing = by_key("missing.txt");
    assert_eq!(missing.state, ItemState::Failed);
    assert_eq!(missing.attempts, 1);
    assert_eq!(missing.error_class.as_deref(), Some("permanent"));
    assert!(
        missing
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("answered HTTP 404"),
        "{missing:?}"
    );
    assert_eq!(src.hits("missing.txt"), 1);

    // Two 503s, then success after backoff.
    let flaky = by_key("flaky.txt");
    assert_eq!(flaky.state, ItemState::Succeeded);
    assert_eq!(flaky.attempts, 2);
    assert_eq!(src.hits("flaky.txt"), 3);
    assert_eq!(h.peer_sha256("flaky.txt"), sha256_hex(&good));

    // Always 503: three attempts, then the dead-letter stream.
    let down = by_key("down.txt");
    assert_eq!(down.state, ItemState::Failed);
    assert_eq!(down.attempts, 3);
    assert!(down.dead_lettered);
    assert_eq!(down.error_class.as_deref(), Some("retryable"));
    assert_eq!(src.hits("down.txt"), 3);
    let letters = h.queue.dead_letters().await.expect("dead letters");
    assert_eq!(
        letters.len(),
        2,
        "404 and exhausted retries are both dead-lettered"
    );
    let (seq, letter) = letters
        .iter()
        .find(|(_, l)| l.error.contains("answered HTTP 503"))
        .expect("dead letter of down.txt")
        .clone();
    assert_eq!(letter.attempts, 3);
    assert_eq!(letter.error_class, "retryable");

    // Once the source recovers, replaying the dead letter finishes the file.
    src.serve("down.txt", good.clone());
    stowage_common::jobs::replay_dead_letter(&h.pool.get().await.expect("db"), &h.queue, seq)
        .await
        .expect("replay");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let item = h
            .items(job)
            .await
            .into_iter()
            .find(|i| i.dest_key == "down.txt")
            .expect("item");
        if item.state == ItemState::Succeeded {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "replayed item still {:?}",
            item.state
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(h.peer_sha256("down.txt"), sha256_hex(&good));
    assert_eq!(h.queue.dead_letters().await.expect("letters").len(), 1);
    worker.shutdown().await.expect("shutdown");
}
on_each_s3!(source_failures_are_classified);

async fn dedup_and_conflict_policies(target: &str) {
    let h = Harness::new(target).await;
    let src = SourceServer::start().await;
    let (x, y, z) = (data(100_000, 10), data(100_000, 11), data(100_000, 12));
    let worker = h.worker(None).await;
    let run = |name: &'static str, path: &'static str, policy: ConflictPolicy, dedup: bool| {
        let h = &h;
        let src = &src;
        async move {
            let mut spec = h.spec(http(vec![src.url(path)]), "");
            spec.conflict_policy = policy;
            spec.dedup = dedup;
            let job = h.submit(name, spec).await;
            h.wait_job(job, Duration::from_secs(60)).await;
            h.items(job).await.remove(0)
        }
    };
    src.serve("a.txt", x.clone());
    src.serve("b.txt", x.clone());
    assert_eq!(
        run("first", "a.txt", ConflictPolicy::Overwrite, false)
            .await
            .state,
        ItemState::Succeeded
    );
    let uploaded_before = worker.context.metrics.bytes_uploaded.get();

    // dedup: same content under another key is copied server-side, not sent.
    let b = run("dedup", "b.txt", ConflictPolicy::Overwrite, true).await;
    assert_eq!(b.state, ItemState::SkippedDuplicate);
    assert_eq!(worker.context.metrics.bytes_uploaded.get(), uploaded_before);
    assert_eq!(h.peer_sha256("b.txt"), sha256_hex(&x));
    // dedup: identical content already at the key is left alone.
    assert_eq!(
        run("same", "a.txt", ConflictPolicy::Overwrite, true)
            .await
            .state,
        ItemState::SkippedExists
    );

    // skip: an existing key is not touched.
    src.serve("a.txt", y.clone());
    assert_eq!(
        run("skip", "a.txt", ConflictPolicy::Skip, false)
            .await
            .state,
        ItemState::SkippedExists
    );
    assert_eq!(h.peer_sha256("a.txt"), sha256_hex(&x));

    // overwrite: replaced.
    assert_eq!(
        run("overwrite", "a.txt", ConflictPolicy::Overwrite, false)
            .await
            .state,
        ItemState::Succeeded
    );
    assert_eq!(h.peer_sha256("a.txt"), sha256_hex(&y));

    // version: the previous content is preserved, then replaced.
    src.serve("a.txt", z.clone());
    assert_eq!(
        run("version", "a.txt", ConflictPolicy::Version, false)
            .await
            .state,
        ItemState::Succeeded
    );
    assert_eq!(h.peer_sha256("a.txt"), sha256_hex(&z));
    assert_eq!(h.peer_sha256("a.txt.stowage-v2"), sha256_hex(&y));
    let db = h.pool.get().await.expect("db");
    let history = uploads::all_versions(&db, &h.bucket, "a.txt")
        .await
        .expect("history");
    let summary: Vec<_> = history
        .iter()
        .map(|(o, archived)| (o.version, o.sha256_hex.clone(), archived.clone()))
        .collect();
    assert_eq!(
        summary,
        vec![
            (1, sha256_hex(&x), None),
            (2, sha256_hex(&y), Some("a.txt.stowage-v2".to_string())),
            (3, sha256_hex(&z), None),
        ]
    );
    worker.shutdown().await.expect("shutdown");
}
on_each_s3!(dedup_and_conflict_policies);

async fn hostile_sources_and_keys_are_refused(target: &str) {
    let h = Harness::new(target).await;
    let src = SourceServer::start().await;
    src.serve("ok.txt", data(1000, 5));
    let worker = h.worker(None).await;

    // Loopback without allowPrivateNetworks: refused, permanent, no request made.
    let mut spec = h.spec(http(vec![src.url("ok.txt")]), "");
    if let Some(http) = spec.source.http.as_mut() {
        http.allow_private_networks = false;
    }
    let job = h.submit("private", spec).await;
    assert_eq!(
        h.wait_job(job, Duration::from_secs(60)).await.state,
        "failed"
    );
    let item = h.items(job).await.remove(0);
    assert_eq!(item.error_class.as_deref(), Some("permanent"));
    let err = item.last_error.unwrap_or_default();
    assert!(
        err.contains("loopback") && err.contains("allowPrivateNetworks"),
        "{err}"
    );
    assert_eq!(src.hits("ok.txt"), 0);

    // Keys that climb out of their prefix or carry control characters.
    let job = h
        .submit(
            "keys",
            h.spec(
                http(vec![
                    src.url("x/..%2F..%2Fetc%2Fpasswd"),
                    src.url("bell%07.txt"),
                    src.url("ok.txt"),
                ]),
                "in/",
            ),
        )
        .await;
    assert_eq!(
        h.wait_job(job, Duration::from_secs(60)).await.state,
        "failed"
    );
    let items = h.items(job).await;
    let find = |needle: &str| {
        items
            .iter()
            .find(|i| i.dest_key.contains(needle))
            .expect("item")
            .clone()
    };
    let dots = find("passwd");
    assert_eq!(dots.state, ItemState::Failed);
    assert!(
        dots.last_error
            .unwrap_or_default()
            .contains("`..` path segment")
    );
    let bell = find("bell");
    assert!(
        bell.last_error
            .unwrap_or_default()
            .contains("control character")
    );
    assert_eq!(find("ok.txt").state, ItemState::Succeeded);
    assert_eq!(src.hits("x/..%2F..%2Fetc%2Fpasswd"), 0);
    worker.shutdown().await.expect("shutdown");
}
on_each_s3!(hostile_sources_and_keys_are_refused);

async fn two_workers_one_writer_per_key(target: &str) {
    let h = Harness::new(target).await;
    // Two sources with different content under the same path: two jobs
    // that both write destination key "shared.bin".
    let (src1, src2) = (SourceServer::start().await, SourceServer::start().await);
    let (a, b) = (data(12 * MIB, 20), data(12 * MIB, 21));
    // Slow sources keep both uploads in flight at the same time.
    let slow = Some(Duration::from_millis(150));
    src1.put(
        "shared.bin",
        FileBehaviour {
            data: a.clone(),
            trickle: slow,
            ..Default::default()
        },
    );
    src2.put(
        "shared.bin",
        FileBehaviour {
            data: b.clone(),
            trickle: slow,
            ..Default::default()
        },
    );
    let w1 = h.worker(None).await;
    let w2 = h.worker(None).await;
    let mut jobs = Vec::new();
    for src in [&src1, &src2] {
        let mut spec = h.spec(http(vec![src.url("shared.bin")]), "");
        spec.part_size_bytes = 5 * MIB as u64;
        jobs.push(h.submit("same-key", spec).await);
    }
    for job in &jobs {
        assert_eq!(
            h.wait_job(*job, Duration::from_secs(120)).await.state,
            "succeeded"
        );
    }
    let contended: u64 = [&w1, &w2]
        .iter()
        .map(|w| {
            w.context
                .locks
                .metrics()
                .contended_total(stowage_common::locks::LockClass::ObjectKey)
        })
        .sum();
    assert!(contended >= 1, "the second writer found the key locked");
    // One write after the other: two complete versions, and the object is
    // exactly the current one (interleaved parts would match neither).
    let db = h.pool.get().await.expect("db");
    let history = uploads::all_versions(&db, &h.bucket, "shared.bin")
        .await
        .expect("history");
    let shas: Vec<String> = history.iter().map(|(o, _)| o.sha256_hex.clone()).collect();
    assert_eq!(shas.len(), 2);
    let mut expected = vec![sha256_hex(&a), sha256_hex(&b)];
    let mut got = shas.clone();
    expected.sort();
    got.sort();
    assert_eq!(got, expected);
    assert_eq!(h.peer_sha256("shared.bin"), shas[1]);
    let uploads =
        h.s3.list_multipart_uploads()
            .bucket(&h.bucket)
            .send()
            .await
            .expect("list");
    assert!(
        uploads.uploads().is_empty(),
        "no multipart upload left open"
    );
    w1.shutdown().await.expect("shutdown");
    w2.shutdown().await.expect("shutdown");
}
on_each_s3!(two_workers_one_writer_per_key);

async fn s3_source_prefix_is_copied(target: &str) {
    let h = Harness::new(target).await;
    let worker = h.worker(None).await;
    let files = [
        ("src/docs/a.md", data(1000, 50)),
        ("src/docs/deep/b.txt", data(7 * MIB, 51)),
        ("src/docs/c.html", data(0, 52)),
        ("src/other/skip.txt", data(10, 53)),
    ];
    for (key, body) in &files {
        h.s3.put_object()
            .bucket(&h.bucket)
            .key(*key)
            .body(body.clone().into())
            .send()
            .await
            .expect("stage source object");
    }
    let source = UploadSource {
        ingest: None,
        s3: Some(stowage_common::spec::S3Source {
            bucket: h.bucket.clone(),
            prefix: "src/docs/".into(),
            endpoint: h.endpoint(),
        }),
        http: None,
    };
    let mut spec = h.spec(source, "copied/");
    spec.part_size_bytes = 5 * MIB as u64;
    let job = h.submit("s3-copy", spec).await;
    assert_eq!(
        h.wait_job(job, Duration::from_secs(120)).await.state,
        "succeeded"
    );
    let mut keys: Vec<String> = h.items(job).await.into_iter().map(|i| i.dest_key).collect();
    keys.sort();
    assert_eq!(keys, ["copied/a.md", "copied/c.html", "copied/deep/b.txt"]);
    for (src_key, body) in &files[..3] {
        let dest = src_key.replace("src/docs/", "copied/");
        assert_eq!(h.peer_sha256(&dest), sha256_hex(body), "{dest}");
        assert_eq!(
            h.object_sha256_metadata(&dest).await,
            Some(sha256_hex(body)),
            "{dest}"
        );
    }
    worker.shutdown().await.expect("shutdown");
}
on_each_s3!(s3_source_prefix_is_copied);

async fn final_failure_aborts_the_multipart_upload(target: &str) {
    let h = Harness::new(target).await;
    let src = SourceServer::start().await;
    // Every attempt gets 12 MiB of a 30 MiB file, then the connection drops:
    // two parts are stored each time, and the file can never complete.
    let bytes = data(30 * MIB, 60);
    src.put(
        "cut.bin",
        FileBehaviour {
            data: bytes,
            cut_after: Some(12 * MIB),
            ..Default::default()
        },
    );
    // Hashed while uploading (no hashing pass first, which the cut would
    // stop before any part is sent).
    let worker = h.worker_with(&["--sha256-metadata=copy"], None).await;
    let mut spec = h.spec(http(vec![src.url("cut.bin")]), "");
    spec.part_size_bytes = 5 * MIB as u64;
    spec.retry.max_attempts = 2;
    let job = h.submit("cut", spec).await;
    assert_eq!(
        h.wait_job(job, Duration::from_secs(120)).await.state,
        "failed"
    );
    let item = h.items(job).await.remove(0);
    assert_eq!(item.attempts, 2);
    assert!(item.dead_lettered);
    assert!(
        item.last_error
            .unwrap_or_default()
            .contains("reading source")
    );
    assert!(
        worker.context.metrics.parts_uploaded.get() >= 2,
        "parts were stored before the failure"
    );
    let open =
        h.s3.list_multipart_uploads()
            .bucket(&h.bucket)
            .send()
            .await
            .expect("list");
    assert!(
        open.uploads().is_empty(),
        "the multipart upload was aborted"
    );
    let db = h.pool.get().await.expect("db");
    let rows: i64 = db
        .query_one("SELECT count(*) FROM multipart_uploads", &[])
        .await
        .expect("q")
        .get(0);
    assert_eq!(rows, 0, "its rows were cleaned");
    let head =
        h.s3.head_object()
            .bucket(&h.bucket)
            .key("cut.bin")
            .send()
            .await;
    assert!(head.is_err(), "no object was created");
    worker.shutdown().await.expect("shutdown");
}
on_each_s3!(final_failure_aborts_the_multipart_upload);

async fn sha256_kept_in_postgres_only_when_asked(target: &str) {
    let h = Harness::new(target).await;
    let src = SourceServer::start().await;
    let (multi, single) = (data(12 * MIB, 70), data(1000, 71));
    src.serve("multi.bin", multi.clone());
    src.serve("single.bin", single.clone());
    let worker = h.worker_with(&["--sha256-metadata=known"], None).await;
    let mut spec = h.spec(http(vec![src.url("multi.bin"), src.url("single.bin")]), "");
    spec.part_size_bytes = 5 * MIB as u64;
    let job = h.submit("known", spec).await;
    assert_eq!(
        h.wait_job(job, Duration::from_secs(120)).await.state,
        "succeeded"
    );
    // No self-copy for the multipart object: its hash lives in PostgreSQL.
    assert_eq!(h.object_sha256_metadata("multi.bin").await, None);
    let items = h.items(job).await;
    let multi_item = items
        .iter()
        .find(|i| i.dest_key == "multi.bin")
        .expect("item");
    assert_eq!(
        multi_item.sha256_hex.as_deref(),
        Some(sha256_hex(&multi).as_str())
    );
    assert_eq!(h.peer_sha256("multi.bin"), sha256_hex(&multi));
    // A single PUT knows its hash up front and still carries it.
    assert_eq!(
        h.object_sha256_metadata("single.bin").await,
        Some(sha256_hex(&single))
    );
    worker.shutdown().await.expect("shutdown");
}
on_each_s3!(sha256_kept_in_postgres_only_when_asked);

async fn a_source_rewritten_between_hashing_and_upload_is_never_completed(target: &str) {
    let h = Harness::new(target).await;
    let src = SourceServer::start().await;
    let (before, after) = (data(12 * MIB, 80), data(12 * MIB, 81));
    // The hashing pass reads `before`; the upload, and everything after,
    // reads `after`.
    src.put(
        "moving.bin",
        FileBehaviour {
            data: before.clone(),
            rewritten_after: Some((1, after.clone())),
            ..Default::default()
        },
    );
    let worker = h.worker(None).await;
    let mut spec = h.spec(http(vec![src.url("moving.bin")]), "");
    spec.part_size_bytes = 5 * MIB as u64;
    let job = h.submit("moving", spec).await;
    assert_eq!(
        h.wait_job(job, Duration::from_secs(120)).await.state,
        "succeeded"
    );
    let items = h.items(job).await;
    // The first upload carried the earlier hash: aborted, not completed
    // (one failed attempt); the second hashed and uploaded the new content.
    assert_eq!(items[0].attempts, 1, "{:?}", items[0]);
    assert_eq!(src.hits("moving.bin"), 4);
    let expected = sha256_hex(&after);
    assert_eq!(items[0].sha256_hex.as_deref(), Some(expected.as_str()));
    assert_eq!(
        h.object_sha256_metadata("moving.bin").await.as_deref(),
        Some(expected.as_str())
    );
    assert_eq!(h.peer_sha256("moving.bin"), expected);
    let open =
        h.s3.list_multipart_uploads()
            .bucket(&h.bucket)
            .send()
            .await
            .expect("list uploads");
    assert!(open.uploads().is_empty(), "the first upload was aborted");
    worker.shutdown().await.expect("shutdown");
}
on_each_s3!(a_source_rewritten_between_hashing_and_upload_is_never_completed);

/// CRC-32C of `data` as S3 reports it (base64 of the big-endian value).
fn crc32c_b64(data: &[u8]) -> String {
    use base64::Engine;
    let crc = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, data) as u32;
    base64::engine::general_purpose::STANDARD.encode(crc.to_be_bytes())
}

async fn a_corrupted_single_put_is_caught_and_uploaded_again(target: &str) {
    let h = Harness::new(target).await;
    let src = SourceServer::start().await;
    let bytes = data(300_000, 90);
    let expected = sha256_hex(&bytes);
    src.serve("small.bin", bytes.clone());
    // The first time the single PUT's body is handed over, a byte is flipped
    // before the checksum sent with it is computed: the server receives
    // bytes that match their checksum and stores them. Only the verifying
    // HEAD (size, full-object CRC-32C of the bytes read, sha256 metadata)
    // can tell.
    let corrupted = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&corrupted);
    let hook: stowage_worker::upload::multipart::PartHook = Arc::new(move |part, attempt, b| {
        if part == 1
            && attempt == stowage_worker::upload::multipart::HOOK_AS_READ
            && seen.fetch_add(1, Ordering::SeqCst) == 0
        {
            let mut v = b.to_vec();
            v[1234] ^= 0x20;
            bytes::Bytes::from(v)
        } else {
            b
        }
    });
    let worker = h.worker(Some(hook)).await;
    let job = h
        .submit(
            "corrupt-single",
            h.spec(http(vec![src.url("small.bin")]), ""),
        )
        .await;
    assert_eq!(
        h.wait_job(job, Duration::from_secs(120)).await.state,
        "succeeded"
    );
    // What a client nobody here wrote reads back.
    assert_eq!(h.peer_sha256("small.bin"), expected);
    let head = h.peer_head("small.bin");
    assert_eq!(head["ContentLength"], 300_000, "{head}");
    assert_eq!(
        head["ChecksumCRC32C"].as_str(),
        Some(crc32c_b64(&bytes).as_str()),
        "{head}"
    );
    assert_eq!(
        head["Metadata"]["sha256"].as_str(),
        Some(expected.as_str()),
        "{head}"
    );
    // The first attempt failed verification; the second uploaded again.
    let item = h.items(job).await.remove(0);
    assert_eq!(
        corrupted.load(Ordering::SeqCst),
        2,
        "one corrupted PUT, then a clean one"
    );
    assert_eq!(item.attempts, 1, "{item:?}");
    assert_eq!(src.hits("small.bin"), 2);
    assert_eq!(item.sha256_hex.as_deref(), Some(expected.as_str()));
    worker.shutdown().await.expect("shutdown");
}
on_each_s3!(a_corrupted_single_put_is_caught_and_uploaded_again);

/// The worker binary, killed with SIGKILL by the tests that need it.
fn spawn_worker(h: &Harness) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_stowage-worker"))
        .args(h.worker_args(&[]).into_iter().skip(1))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start worker binary")
}

/// Waits until the job's item has at least `n` recorded parts; returns the
/// multipart upload id they belong to.
async fn wait_for_parts(h: &Harness, job: uuid::Uuid, n: i64) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let db = h.pool.get().await.expect("db");
        let row = db
            .query_one(
                "SELECT count(p.part_number), min(m.upload_id)
                 FROM upload_items i JOIN multipart_uploads m ON m.item_id = i.id
                 LEFT JOIN upload_parts p ON p.item_id = i.id
                 WHERE i.job_id = $1",
                &[&job],
            )
            .await
            .expect("parts");
        let (count, upload): (i64, Option<String>) = (row.get(0), row.get(1));
        if count >= n
            && let Some(upload) = upload
        {
            return upload;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {n} parts recorded in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A file of `size` bytes served at 1 MiB per `pause`, uploaded in 5 MiB
/// parts two at a time by worker processes, each SIGKILLed once the item
/// has recorded the next count of parts in `kill_at`; a last worker
/// finishes. Returns the job and the multipart upload id seen at each kill.
async fn upload_with_kills(
    h: &Harness,
    src: &SourceServer,
    path: &str,
    kill_at: &[i64],
    between_kills: impl Fn(usize),
) -> (uuid::Uuid, Vec<String>) {
    let mut spec = h.spec(http(vec![src.url(path)]), "");
    spec.part_size_bytes = 5 * MIB as u64;
    spec.concurrency = 2;
    let job = h.submit("killed", spec).await;
    let mut uploads = Vec::new();
    for (i, &parts) in kill_at.iter().enumerate() {
        let mut worker = spawn_worker(h);
        uploads.push(wait_for_parts(h, job, parts).await);
        worker.kill().expect("SIGKILL");
        worker.wait().expect("reaped");
        between_kills(i);
    }
    let mut last = spawn_worker(h);
    let done = h.wait_job(job, Duration::from_secs(300)).await;
    last.kill().expect("stop the last worker");
    last.wait().expect("reaped");
    assert_eq!(done.state, "succeeded", "{:?}", h.items(job).await);
    (job, uploads)
}

async fn a_resume_reads_only_the_parts_it_still_has_to_send(target: &str) {
    let h = Harness::new(target).await;
    let src = SourceServer::start().await;
    const SIZE: usize = 80 * MIB;
    const PART: u64 = 5 * MIB as u64;
    let bytes = data(SIZE, 91);
    let expected = sha256_hex(&bytes);
    src.put(
        "resumed.bin",
        FileBehaviour {
            data: bytes.clone(),
            // 25 MiB/s: slower than the store even on a busy machine.
            trickle: Some(Duration::from_millis(40)),
            ..Default::default()
        },
    );
    let kills = [2, 5, 8, 11];
    let (job, uploads) = upload_with_kills(&h, &src, "resumed.bin", &kills, |_| {}).await;

    let requests = src.requests("resumed.bin");
    let served = src.bytes_served("resumed.bin");
    let total = SIZE as u64;
    for r in &requests {
        eprintln!(
            "{target}: {} {:?} -> {:?}: {} bytes",
            r.status,
            r.range_header,
            r.span,
            r.bytes()
        );
    }
    eprintln!(
        "{target}: {} requests, {served} bytes served for a {total}-byte file and {} kills \
         ({:.2}x the file; hashing pass and upload read {}, re-read after kills {})",
        requests.len(),
        kills.len(),
        served as f64 / total as f64,
        2 * total,
        served as i64 - 2 * total as i64
    );
    // One hashing pass and one upload read from the first byte; every
    // resume asks for the version hashed, from a part boundary on.
    let whole: Vec<_> = requests
        .iter()
        .filter(|r| r.range_header.is_none())
        .collect();
    assert_eq!(whole.len(), 2, "hashing pass + first upload read only");
    let etag = support::source::etag_of(&bytes);
    for r in requests.iter().filter(|r| r.range_header.is_some()) {
        assert_eq!(r.status, 206, "{r:?}");
        assert_eq!(r.if_match.as_deref(), Some(etag.as_str()), "{r:?}");
        let (start, _) = r.span.expect("span");
        assert_eq!(start % PART, 0, "ranges start at a part boundary: {r:?}");
    }
    // The target: the hashing pass once, the file once, and at most one
    // part more per kill. (The source here is slower than the store, like
    // the HTTP source: what a kill loses is the part being read.
    // Were the store the slower one, up to `concurrency` parts could be in
    // flight at a kill, read but not stored.)
    assert!(
        served <= 2 * total + kills.len() as u64 * PART,
        "served {served} bytes > 2 x {total} + {} kills x {PART}",
        kills.len()
    );
    // One multipart upload from the first part to the last.
    assert!(
        uploads.iter().all(|u| *u == uploads[0]),
        "one multipart upload: {uploads:?}"
    );
    let item = h.items(job).await.remove(0);
    assert_eq!(item.sha256_hex.as_deref(), Some(expected.as_str()));
    assert_eq!(h.peer_sha256("resumed.bin"), expected);
    let head = h.peer_head("resumed.bin");
    assert_eq!(head["ContentLength"], SIZE as u64, "{head}");
    assert_eq!(
        head["Metadata"]["sha256"].as_str(),
        Some(expected.as_str()),
        "{head}"
    );
    let open =
        h.s3.list_multipart_uploads()
            .bucket(&h.bucket)
            .send()
            .await
            .expect("list");
    assert!(open.uploads().is_empty(), "no multipart upload left open");
}
on_each_s3!(a_resume_reads_only_the_parts_it_still_has_to_send);

async fn a_source_changed_between_attempts_starts_over(target: &str) {
    let h = Harness::new(target).await;
    let src = SourceServer::start().await;
    let (before, after) = (data(30 * MIB, 92), data(30 * MIB, 93));
    src.put(
        "moving.bin",
        FileBehaviour {
            data: before.clone(),
            trickle: Some(Duration::from_millis(25)),
            ..Default::default()
        },
    );
    // Killed after 2 parts of `before`; the file is rewritten (a new ETag)
    // before the next worker resumes.
    let (job, uploads) = upload_with_kills(&h, &src, "moving.bin", &[2], |_| {
        src.rewrite("moving.bin", after.clone())
    })
    .await;
    let requests = src.requests("moving.bin");
    let statuses: Vec<_> = requests
        .iter()
        .map(|r| (r.status, r.range_header.is_some()))
        .collect();
    // Hashing pass and upload of `before`; the resume's ranged read asks for
    // `before` and is refused; then `after` is hashed and uploaded whole.
    assert_eq!(
        statuses,
        [
            (200, false),
            (200, false),
            (412, true),
            (200, false),
            (200, false)
        ],
        "{requests:?}"
    );
    let old_etag = support::source::etag_of(&before);
    assert_eq!(requests[2].if_match.as_deref(), Some(old_etag.as_str()));
    let expected = sha256_hex(&after);
    let item = h.items(job).await.remove(0);
    assert_eq!(item.sha256_hex.as_deref(), Some(expected.as_str()));
    assert_eq!(h.peer_sha256("moving.bin"), expected);
    assert_eq!(
        h.peer_head("moving.bin")["Metadata"]["sha256"].as_str(),
        Some(expected.as_str())
    );
    // The upload of `before` was aborted, not completed or left behind.
    assert_eq!(uploads.len(), 1);
    let open =
        h.s3.list_multipart_uploads()
            .bucket(&h.bucket)
            .send()
            .await
            .expect("list");
    assert!(open.uploads().is_empty(), "{:?}", open.uploads());
}
on_each_s3!(a_source_changed_between_attempts_starts_over);

async fn a_resume_by_last_modified_reads_only_what_it_must(target: &str) {
    let h = Harness::new(target).await;
    let src = SourceServer::start().await;
    const SIZE: usize = 40 * MIB;
    let bytes = data(SIZE, 94);
    src.put(
        "dated.bin",
        FileBehaviour {
            data: bytes.clone(),
            trickle: Some(Duration::from_millis(25)),
            validators: support::source::Validators::LastModified,
            ..Default::default()
        },
    );
    let (job, _) = upload_with_kills(&h, &src, "dated.bin", &[3], |_| {}).await;
    let requests = src.requests("dated.bin");
    let ranged: Vec<_> = requests
        .iter()
        .filter(|r| r.range_header.is_some())
        .collect();
    assert!(!ranged.is_empty(), "{requests:?}");
    for r in &ranged {
        assert_eq!(r.status, 206, "{r:?}");
        assert!(r.if_unmodified_since.is_some(), "{r:?}");
    }
    // The hashing pass, the killed attempt (up to what was stored plus the
    // `concurrency` = 2 parts on their way and the one being read when the
    // worker was killed: how far depends on the machine's load), then only
    // the range after what was stored.
    let served = src.bytes_served("dated.bin");
    assert!(
        served <= 2 * SIZE as u64 + 3 * 5 * MIB as u64,
        "served {served}: {requests:?}"
    );
    assert_eq!(ranged.len(), 1, "{requests:?}");
    let (from, _) = ranged[0].span.expect("span");
    assert!(from > 0 && from % (5 * MIB as u64) == 0, "{requests:?}");
    let expected = sha256_hex(&bytes);
    assert_eq!(
        h.items(job).await[0].sha256_hex.as_deref(),
        Some(expected.as_str())
    );
    assert_eq!(h.peer_sha256("dated.bin"), expected);
}
on_each_s3!(a_resume_by_last_modified_reads_only_what_it_must);

async fn a_source_without_ranges_is_read_whole_but_not_hashed_again(target: &str) {
    let h = Harness::new(target).await;
    let src = SourceServer::start().await;
    const SIZE: usize = 40 * MIB;
    let bytes = data(SIZE, 95);
    src.put(
        "plain.bin",
        FileBehaviour {
            data: bytes.clone(),
            trickle: Some(Duration::from_millis(25)),
            no_ranges: true,
            ..Default::default()
        },
    );
    let (job, uploads) = upload_with_kills(&h, &src, "plain.bin", &[3], |_| {}).await;
    let requests = src.requests("plain.bin");
    let shape: Vec<_> = requests
        .iter()
        .map(|r| (r.status, r.range_header.is_some()))
        .collect();
    // Hashing pass, upload; after the kill the ranged read is answered with
    // the whole body (dropped at once) and the source is read whole again —
    // once, with no second hashing pass.
    assert_eq!(
        shape,
        [(200, false), (200, false), (200, true), (200, false)],
        "{requests:?}"
    );
    let expected = sha256_hex(&bytes);
    assert_eq!(
        h.items(job).await[0].sha256_hex.as_deref(),
        Some(expected.as_str())
    );
    assert_eq!(h.peer_sha256("plain.bin"), expected);
    assert_eq!(uploads.len(), 1);
}
on_each_s3!(a_source_without_ranges_is_read_whole_but_not_hashed_again);

async fn an_s3_source_is_read_by_range_only_while_its_etag_holds(target: &str) {
    use stowage_worker::upload::source::{MinRate, Ranged, Source, Validator};
    let h = Harness::new(target).await;
    let worker = h.worker(None).await;
    let (a, b) = (data(12 * MIB, 96), data(12 * MIB, 97));
    let put = |body: bytes::Bytes| {
        h.s3.put_object()
            .bucket(&h.bucket)
            .key("src/x.bin")
            .body(body.into())
            .send()
    };
    put(a.clone()).await.expect("stage source object");
    let spec = UploadSource {
        ingest: None,
        s3: Some(stowage_common::spec::S3Source {
            bucket: h.bucket.clone(),
            prefix: "src/".into(),
            endpoint: h.endpoint(),
        }),
        http: None,
    };
    let ctx = &worker.context;
    let source = Source::new("default", &spec, &ctx.s3, &ctx.http, MinRate::OFF)
        .await
        .expect("source");
    let whole = source.open("src/x.bin").await.expect("open");
    let validator = whole.validator.clone();
    assert!(
        matches!(validator, Some(Validator::ETag(_))),
        "{validator:?}"
    );
    let total = 12 * MIB as u64;
    let (start, end) = (5 * MIB as u64, 10 * MIB as u64 - 1);
    let read = |r: Ranged| async move {
        match r {
            Ranged::Partial(body) => {
                let chunks: Vec<bytes::Bytes> = futures::TryStreamExt::try_collect(body.stream)
                    .await
                    .expect("read the range");
                Ok(chunks.concat())
            }
            Ranged::Changed(reason) => Err(reason),
            Ranged::Unsupported => Err("unsupported".to_string()),
        }
    };
    let got = source
        .open_range("src/x.bin", start, end, total, validator.as_ref())
        .await
        .expect("ranged GET");
    assert_eq!(
        read(got).await.expect("the same version"),
        a[start as usize..=end as usize]
    );
    // A size other than the one recorded is another version.
    let other_size = source
        .open_range("src/x.bin", start, end, total + 1, validator.as_ref())
        .await
        .expect("ranged GET");
    assert!(read(other_size).await.is_err(), "another size");
    // Rewritten: its ETag changed, the ranged read is refused.
    put(b).await.expect("rewrite source object");
    let changed = source
        .open_range("src/x.bin", start, end, total, validator.as_ref())
        .await
        .expect("ranged GET");
    let reason = read(changed).await.expect_err("another version");
    assert!(reason.contains("ETag"), "{reason}");
    worker.shutdown().await.expect("shutdown");
}
on_each_s3!(an_s3_source_is_read_by_range_only_while_its_etag_holds);

async fn a_resume_reads_the_holes_between_stored_parts(target: &str) {
    let h = Harness::new(target).await;
    let src = SourceServer::start().await;
    const SIZE: usize = 50 * MIB;
    const PART: u64 = 5 * MIB as u64;
    let bytes = data(SIZE, 98);
    src.put(
        "holes.bin",
        FileBehaviour {
            data: bytes.clone(),
            trickle: Some(Duration::from_millis(40)),
            ..Default::default()
        },
    );
    let mut spec = h.spec(http(vec![src.url("holes.bin")]), "");
    spec.part_size_bytes = PART;
    spec.concurrency = 2;
    let job = h.submit("holes", spec).await;
    let mut first = spawn_worker(&h);
    wait_for_parts(&h, job, 6).await;
    first.kill().expect("SIGKILL");
    first.wait().expect("reaped");
    // Parts land out of order when several are in flight: as if part 3 had
    // been on its way at the kill while the next ones were recorded, forget
    // its record (the server keeps it; the resume must send it again).
    let db = h.pool.get().await.expect("db");
    db.execute("DELETE FROM upload_parts WHERE part_number = 3", &[])
        .await
        .expect("forget part 3");
    let stored: Vec<i32> = db
        .query("SELECT part_number FROM upload_parts ORDER BY 1", &[])
        .await
        .expect("parts")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        stored.len() >= 5 && !stored.contains(&3) && stored.contains(&4),
        "{stored:?}"
    );
    let served_before = src.bytes_served("holes.bin");
    let mut last = spawn_worker(&h);
    let done = h.wait_job(job, Duration::from_secs(300)).await;
    last.kill().expect("stop the last worker");
    last.wait().expect("reaped");
    assert_eq!(done.state, "succeeded", "{:?}", h.items(job).await);

    // The resume read exactly the parts not stored: part 3, then the tail.
    let ranged: Vec<_> = src
        .requests("holes.bin")
        .into_iter()
        .filter(|r| r.range_header.is_some())
        .collect();
    let parts = (SIZE as u64).div_ceil(PART) as i32;
    let mut expected_spans = Vec::new();
    for n in (1..=parts).filter(|n| !stored.contains(n)) {
        let (start, end) = ((n as u64 - 1) * PART, n as u64 * PART - 1);
        match expected_spans.last_mut() {
            Some((_, e)) if *e + 1 == start => *e = end,
            _ => expected_spans.push((start, end)),
        }
    }
    let spans: Vec<_> = ranged.iter().map(|r| r.span.expect("span")).collect();
    assert_eq!(spans, expected_spans, "{ranged:?}");
    let missing_bytes = (parts as usize - stored.len()) as u64 * PART;
    assert_eq!(
        src.bytes_served("holes.bin") - served_before,
        missing_bytes,
        "read only the missing parts"
    );
    let expected = sha256_hex(&bytes);
    assert_eq!(h.peer_sha256("holes.bin"), expected);
    assert_eq!(
        h.peer_head("holes.bin")["Metadata"]["sha256"].as_str(),
        Some(expected.as_str())
    );
}
on_each_s3!(a_resume_reads_the_holes_between_stored_parts);

/// 200 small files share tasks (a batch per few files), yet each keeps its
/// own outcome: a 404 and an always-503 file fail alone, each with its own
/// dead letter (a one-file task), a flaky file succeeds on a later
/// delivery of its batch, and the rest land once with the right bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_files_share_tasks_and_keep_their_own_outcomes() {
    use stowage_proto::v1::task;
    let h = Harness::new("localstack").await;
    let src = SourceServer::start().await;
    let mut urls = Vec::new();
    let mut expected = std::collections::HashMap::new();
    for i in 0..200u64 {
        let name = format!("small/{i:03}.txt");
        let body = data(1024 + i as usize, i);
        expected.insert(name.clone(), sha256_hex(&body));
        match i {
            17 => {}
            42 => src.put(
                &name,
                FileBehaviour {
                    always: Some(503),
                    ..Default::default()
                },
            ),
            99 => src.put(
                &name,
                FileBehaviour {
                    data: body,
                    fail_first: 1,
                    ..Default::default()
                },
            ),
            _ => src.serve(&name, body),
        }
        urls.push(src.url(&name));
    }
    let worker = h.worker(None).await;
    let mut spec = h.spec(http(urls), "");
    spec.retry.max_attempts = 2;
    spec.retry.backoff.base_millis = 100;
    let job = h.submit("batched", spec).await;
    assert_eq!(
        h.wait_job(job, Duration::from_secs(180)).await.state,
        "failed"
    );
    let items = h.items(job).await;
    let failed: Vec<&str> = items
        .iter()
        .filter(|i| i.state == ItemState::Failed)
        .map(|i| i.dest_key.as_str())
        .collect();
    assert_eq!(failed, ["small/017.txt", "small/042.txt"]);
    for i in items.iter().filter(|i| i.state != ItemState::Failed) {
        assert_eq!(i.state, ItemState::Succeeded, "{i:?}");
        assert_eq!(i.sha256_hex.as_ref(), expected.get(&i.dest_key), "{i:?}");
    }
    assert_eq!(
        src.hits("small/099.txt"),
        2,
        "the flaky file was tried again"
    );
    assert_eq!(
        src.hits("small/000.txt"),
        1,
        "a done file is not sent again"
    );

    // Far fewer tasks than files: 200 files in batches of 3.
    let m = &worker.context.metrics;
    let settled = |outcome| {
        m.tasks
            .get_or_create(&stowage_worker::metrics::TaskLabels {
                kind: "upload",
                outcome,
            })
            .get()
    };
    // The job ends with its last file; its batch is acked just after.
    let acked = tokio::time::Instant::now() + Duration::from_secs(30);
    while settled("ok") < 200u64.div_ceil(3) && tokio::time::Instant::now() < acked {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(settled("ok"), 200u64.div_ceil(3), "one ack per batch");
    assert_eq!(settled("dead_letter"), 2);

    // Each failed file has a dead letter of its own, naming it alone.
    let letters = h.queue.dead_letters().await.expect("dead letters");
    assert_eq!(letters.len(), 2, "{letters:?}");
    let mut lettered: Vec<i64> = letters
        .iter()
        .map(
            |(_, l)| match l.task.as_ref().and_then(|t| t.kind.as_ref()) {
                Some(task::Kind::UploadFile(u)) => {
                    let ids = stowage_common::jobs::items_of(u);
                    assert_eq!(ids.len(), 1, "{l:?}");
                    ids[0]
                }
                other => panic!("not an upload task: {other:?}"),
            },
        )
        .collect();
    lettered.sort_unstable();
    let mut failed_ids: Vec<i64> = items
        .iter()
        .filter(|i| i.state == ItemState::Failed)
        .map(|i| i.id)
        .collect();
    failed_ids.sort_unstable();
    assert_eq!(lettered, failed_ids);
    worker.shutdown().await.expect("shutdown");
}
