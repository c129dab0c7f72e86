//! Direct ingest on the real stack: objects streamed to a worker's
//! `Ingest.Upload`, checked by the AWS CLI; a stream cut mid-way and
//! resumed; idempotent request ids; refusals that store nothing; and
//! stowctl's upload and sync (with --delete and --watch) against the worker.

mod support;

use std::time::Duration;

use futures::StreamExt;
use sha2::{Digest, Sha256};
use stowage_proto::v1::ingest_client::IngestClient;
use stowage_proto::v1::upload_request::Message;
use stowage_proto::v1::{
    IngestDestination, IngestState, IngestStatusRequest, IngestStatusResponse, UploadHeader,
    UploadRequest, UploadResponse,
};
use support::{Harness, SECRET};
use tonic::Code;
use tonic::transport::Channel;

const MIB: u64 = 1 << 20;

fn body(size: usize, seed: u8) -> Vec<u8> {
    (0..size)
        .map(|i| {
            (i as u64)
                .wrapping_mul(2_654_435_761)
                .rotate_left(seed as u32) as u8
        })
        .collect()
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn header(h: &Harness, request_id: &str, key: &str, data: &[u8]) -> UploadHeader {
    UploadHeader {
        request_id: request_id.into(),
        namespace: "default".into(),
        destination: Some(destination(h, key)),
        size: data.len() as u64,
        content_type: "application/octet-stream".into(),
        sha256: sha(data),
        ..Default::default()
    }
}

fn destination(h: &Harness, key: &str) -> IngestDestination {
    IngestDestination {
        bucket: h.bucket.clone(),
        key: key.into(),
        endpoint: h.target.endpoint.clone(),
        region: h.target.region.clone(),
        credentials_secret: SECRET.into(),
        allow_private_networks: true,
        ..Default::default()
    }
}

/// The header, then `data` in 1 MiB messages.
fn messages(header: UploadHeader, data: Vec<u8>) -> impl futures::Stream<Item = UploadRequest> {
    let first = futures::stream::once(async move {
        UploadRequest {
            message: Some(Message::Header(header)),
        }
    });
    let chunks: Vec<Vec<u8>> = data.chunks(MIB as usize).map(<[u8]>::to_vec).collect();
    first.chain(futures::stream::iter(chunks.into_iter().map(|c| {
        UploadRequest {
            message: Some(Message::Data(c)),
        }
    })))
}

async fn client(worker: &stowage_worker::Worker) -> IngestClient<Channel> {
    IngestClient::connect(format!("http://{}", worker.grpc_addr))
        .await
        .expect("connect")
}

async fn upload(
    c: &mut IngestClient<Channel>,
    header: UploadHeader,
    data: Vec<u8>,
) -> Result<UploadResponse, tonic::Status> {
    c.upload(messages(header, data))
        .await
        .map(tonic::Response::into_inner)
}

async fn status(c: &mut IngestClient<Channel>, request_id: &str) -> IngestStatusResponse {
    c.status(IngestStatusRequest {
        namespace: "default".into(),
        request_id: request_id.into(),
    })
    .await
    .expect("status")
    .into_inner()
}

/// A TCP proxy to `to`; aborting the handle cuts every connection through it.
async fn tcp_proxy(
    to: std::net::SocketAddr,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let handle = tokio::spawn(async move {
        let mut pipes = tokio::task::JoinSet::new();
        while let Ok((mut inbound, _)) = listener.accept().await {
            pipes.spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    (addr, handle)
}

async fn exists(h: &Harness, key: &str) -> bool {
    h.s3.head_object()
        .bucket(&h.bucket)
        .key(key)
        .send()
        .await
        .is_ok()
}

async fn open_multipart_uploads(h: &Harness) -> usize {
    h.s3.list_multipart_uploads()
        .bucket(&h.bucket)
        .send()
        .await
        .expect("list uploads")
        .uploads()
        .len()
}

async fn versions(h: &Harness, key: &str) -> i64 {
    let db = h.pool.get().await.expect("db");
    db.query_one(
        "SELECT count(*) FROM objects WHERE bucket = $1 AND object_key = $2",
        &[&h.bucket, &key],
    )
    .await
    .expect("versions")
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_300_mib_stream_lands_verified() {
    let h = Harness::new("garage").await;
    let worker = h.worker(None).await;
    let mut c = client(&worker).await;
    let data = body(300 * MIB as usize, 3);
    let mut hd = header(&h, "big-1", "ingest/big.bin", &data);
    hd.content_type = "application/x-test".into();
    let r = upload(&mut c, hd, data.clone()).await.expect("upload");
    assert_eq!(r.size, data.len() as u64);
    assert_eq!(r.sha256, sha(&data));
    assert_eq!(r.version, 1);
    assert_eq!(r.bytes_received, data.len() as u64);
    // Read back by a client nobody on the team wrote.
    assert_eq!(h.peer_sha256("ingest/big.bin"), sha(&data));
    let head = h.peer_head("ingest/big.bin");
    assert_eq!(head["ContentType"], "application/x-test");
    assert_eq!(head["Metadata"]["sha256"], sha(&data));
    assert_eq!(open_multipart_uploads(&h).await, 0);
    let s = status(&mut c, "big-1").await;
    assert_eq!(s.state, IngestState::Succeeded as i32);
    assert_eq!(s.result.expect("result").sha256, sha(&data));
    worker.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_stream_resumes_from_its_last_part() {
    let h = Harness::new("garage").await;
    let part = 5 * MIB;
    let worker = h.worker_with(&["--ingest-part-size=5242880"], None).await;
    let data = body(60 * MIB as usize, 5);
    let key = "ingest/cut.bin";
    let hd = header(&h, "cut-1", key, &data);
    // 60% of the bytes, then the connection is cut (a TCP proxy between
    // client and worker is torn down, as a network failure or a killed
    // client would).
    let sent = data.len() * 6 / 10;
    let (proxy, cut_connection) = tcp_proxy(worker.grpc_addr).await;
    let mut through = IngestClient::connect(format!("http://{proxy}"))
        .await
        .expect("connect through the proxy");
    let head = messages(hd.clone(), data[..sent].to_vec());
    let call =
        tokio::spawn(async move { through.upload(head.chain(futures::stream::pending())).await });
    // Until the worker has recorded what it got.
    let mut c = client(&worker).await;
    for _ in 0..200 {
        let asked = IngestStatusRequest {
            namespace: "default".into(),
            request_id: "cut-1".into(),
        };
        // NOT_FOUND until the worker has read the header.
        if let Ok(s) = c.status(asked).await
            && s.get_ref().committed_bytes + part >= sent as u64
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cut_connection.abort();
    let answer = call.await.expect("join");
    assert!(answer.is_err(), "the cut call fails: {answer:?}");
    let mut s = status(&mut c, "cut-1").await;
    for _ in 0..100 {
        if s.state == IngestState::Pending as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        s = status(&mut c, "cut-1").await;
    }
    assert_eq!(s.state, IngestState::Pending as i32, "{s:?}");
    let resume = s.resume_offset;
    assert!(
        resume + part >= sent as u64 && resume <= sent as u64,
        "resume at {resume} after {sent} bytes sent: at most one part is sent again"
    );
    assert_eq!(resume % part, 0);
    assert!(
        !exists(&h, key).await,
        "nothing visible before it completes"
    );

    // The same request, from the resume point.
    let mut again = hd.clone();
    again.offset = resume;
    let r = upload(&mut c, again, data[resume as usize..].to_vec())
        .await
        .expect("resumed upload");
    assert_eq!(r.bytes_resumed, resume);
    assert_eq!(r.bytes_received, data.len() as u64 - resume);
    assert_eq!(r.sha256, sha(&data));
    assert_eq!(h.peer_sha256(key), sha(&data));
    assert_eq!(open_multipart_uploads(&h).await, 0);

    // A resume point ahead of what is stored is refused.
    let mut ahead = header(&h, "cut-2", "ingest/cut2.bin", &data);
    ahead.offset = 10 * part;
    let e = upload(&mut c, ahead, data[(10 * part) as usize..].to_vec())
        .await
        .expect_err("offset ahead");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("resume from byte 0"),
        "{}",
        e.message()
    );
    worker.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_is_one_object_version() {
    let h = Harness::new("localstack").await;
    let worker = h.worker(None).await;
    let mut c = client(&worker).await;
    let data = body(100_000, 7);
    let hd = header(&h, "once", "ingest/once.txt", &data);
    let first = upload(&mut c, hd.clone(), data.clone())
        .await
        .expect("first");
    let second = upload(&mut c, hd.clone(), data.clone())
        .await
        .expect("second");
    assert_eq!(first.version, 1);
    assert_eq!(second.version, 1);
    assert_eq!(second.bytes_received, 0, "answered without reading again");
    assert_eq!(versions(&h, "ingest/once.txt").await, 1);
    assert_eq!(h.peer_sha256("ingest/once.txt"), sha(&data));
    // The same id for another upload is refused.
    let other = body(100, 1);
    let e = upload(&mut c, header(&h, "once", "ingest/once.txt", &other), other)
        .await
        .expect_err("reused id");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    // Dedup: the same content elsewhere in the bucket is copied, not sent.
    let mut dup = header(&h, "dup", "ingest/dup.txt", &data);
    dup.dedup = true;
    let r = c
        .upload(futures::stream::iter(vec![UploadRequest {
            message: Some(Message::Header(dup)),
        }]))
        .await
        .expect("dedup")
        .into_inner();
    assert!(r.deduplicated);
    assert_eq!(h.peer_sha256("ingest/dup.txt"), sha(&data));
    worker.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_store_nothing() {
    let h = Harness::new("localstack").await;
    let worker = h
        .worker_with(
            &[
                "--ingest-part-size=5242880",
                "--ingest-max-object-bytes=20000000",
                "--ingest-max-streams=1",
            ],
            None,
        )
        .await;
    let mut c = client(&worker).await;
    let data = body(12 * MIB as usize, 9);

    let e = upload(
        &mut c,
        header(&h, "trav", "../etc/passwd", &data),
        data.clone(),
    )
    .await
    .expect_err("traversal");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("destination.key"), "{}", e.message());

    // A multipart object whose bytes are not the SHA-256 announced.
    let mut wrong = header(&h, "wrong", "ingest/wrong.bin", &data);
    wrong.sha256 = sha(b"something else");
    let e = upload(&mut c, wrong, data.clone())
        .await
        .expect_err("wrong sha");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("nothing was stored"),
        "{}",
        e.message()
    );
    assert!(!exists(&h, "ingest/wrong.bin").await);
    assert_eq!(open_multipart_uploads(&h).await, 0, "its upload is aborted");
    assert_eq!(
        status(&mut c, "wrong").await.state,
        IngestState::Failed as i32
    );

    // A single PUT with the wrong SHA-256 is refused as well.
    let small = body(1000, 2);
    let mut wrong = header(&h, "wrong-small", "ingest/wrong-small.bin", &small);
    wrong.sha256 = sha(b"x");
    let e = upload(&mut c, wrong, small).await.expect_err("wrong sha");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(!exists(&h, "ingest/wrong-small.bin").await);

    let mut huge = header(&h, "huge", "ingest/huge.bin", &data);
    huge.size = 30_000_000;
    let e = upload(&mut c, huge, Vec::new())
        .await
        .expect_err("oversize");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("maximum object size"),
        "{}",
        e.message()
    );

    // More bytes than announced.
    let mut long = header(&h, "long", "ingest/long.bin", &data[..1000]);
    long.sha256.clear();
    let e = upload(&mut c, long, data[..2000].to_vec())
        .await
        .expect_err("too long");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(!exists(&h, "ingest/long.bin").await);

    // One stream at a time on this worker: a second is told to come back.
    let mut c2 = client(&worker).await;
    let hold = header(&h, "hold", "ingest/hold.bin", &data);
    let held = tokio::spawn(async move {
        let s = messages(hold, Vec::new()).chain(futures::stream::pending());
        let _ = tokio::time::timeout(Duration::from_secs(5), c2.upload(s)).await;
    });
    // The held stream has its permit once its request runs.
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let running = c
            .status(IngestStatusRequest {
                namespace: "default".into(),
                request_id: "hold".into(),
            })
            .await
            .is_ok_and(|s| s.into_inner().state == IngestState::Running as i32);
        if running {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "the held stream never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let e = upload(
        &mut c,
        header(&h, "second", "ingest/second.bin", &data[..10]),
        data[..10].to_vec(),
    )
    .await
    .expect_err("busy");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    held.abort();

    let e = c
        .status(IngestStatusRequest {
            namespace: "default".into(),
            request_id: "never".into(),
        })
        .await
        .expect_err("unknown request");
    assert_eq!(e.code(), Code::NotFound);
    worker.shutdown().await.expect("shutdown");
}

/// Runs stowctl (the library the binary is) with `args`.
async fn stowctl(args: Vec<String>) -> anyhow::Result<()> {
    use clap::Parser;
    let mut all = vec!["stowctl".to_string()];
    all.extend(args);
    stowctl::commands::Cli::try_parse_from(all)?.run().await
}

/// The flags that point stowctl at this harness's worker and store.
fn to_flags(h: &Harness, worker: &stowage_worker::Worker, prefix: &str) -> Vec<String> {
    vec![
        format!("--to=s3://{}/{prefix}", h.bucket),
        format!("--to-endpoint={}", h.target.endpoint),
        format!("--to-credentials={SECRET}"),
        format!("--region={}", h.target.region),
        "--allow-private-networks".into(),
        format!("--worker=http://{}", worker.grpc_addr),
        "--no-token".into(),
    ]
}

async fn object_body(h: &Harness, key: &str) -> Option<Vec<u8>> {
    let o =
        h.s3.get_object()
            .bucket(&h.bucket)
            .key(key)
            .send()
            .await
            .ok()?;
    Some(o.body.collect().await.ok()?.into_bytes().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stowctl_uploads_files_and_folders_and_resumes_nothing_twice() {
    let h = Harness::new("localstack").await;
    let worker = h.worker(None).await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("docs/sub")).expect("mkdir");
    std::fs::write(dir.path().join("docs/a.md"), "# A\n\nalpha").expect("write");
    std::fs::write(dir.path().join("docs/sub/b.txt"), "beta").expect("write");
    std::fs::write(dir.path().join("docs/.b.swp"), "swap").expect("write");
    let big = body(7 * MIB as usize, 4);
    std::fs::write(dir.path().join("big.bin"), &big).expect("write");
    let mut args = vec![
        "upload".to_string(),
        dir.path().join("docs").display().to_string(),
        dir.path().join("big.bin").display().to_string(),
        "--json".into(),
    ];
    args.extend(to_flags(&h, &worker, "up/"));
    stowctl(args.clone()).await.expect("upload");
    assert_eq!(
        object_body(&h, "up/a.md").await.as_deref(),
        Some(&b"# A\n\nalpha"[..])
    );
    assert_eq!(
        object_body(&h, "up/sub/b.txt").await.as_deref(),
        Some(&b"beta"[..])
    );
    assert!(
        object_body(&h, "up/.b.swp").await.is_none(),
        "swap files are left out"
    );
    assert_eq!(h.peer_sha256("up/big.bin"), sha(&big));
    assert_eq!(h.peer_head("up/a.md")["ContentType"], "text/markdown");
    // The same command again: every file answered from its request, none sent.
    stowctl(args).await.expect("again");
    assert_eq!(versions(&h, "up/big.bin").await, 1);
    // A missing file fails the command.
    let mut bad = vec!["upload".to_string(), "/nonexistent/x".into()];
    bad.extend(to_flags(&h, &worker, "up/"));
    assert!(stowctl(bad).await.is_err());
    worker.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_mirrors_a_folder_and_deletes_only_with_delete() {
    let h = Harness::new("localstack").await;
    let worker = h.worker(None).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let state = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("site");
    std::fs::create_dir_all(root.join("guide")).expect("mkdir");
    for (rel, text) in [
        ("index.md", "home"),
        ("guide/one.md", "one"),
        ("guide/two.md", "two"),
    ] {
        std::fs::write(root.join(rel), text).expect("write");
    }
    let sync = |extra: &[&str]| {
        let mut args = vec![
            "sync".to_string(),
            root.display().to_string(),
            format!("--manifest={}", state.path().join("m.json").display()),
        ];
        args.extend(to_flags(&h, &worker, "mirror"));
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    stowctl(sync(&[])).await.expect("first pass");
    assert_eq!(
        object_body(&h, "mirror/guide/two.md").await.as_deref(),
        Some(&b"two"[..])
    );
    // Unchanged files are not sent again; a changed one is.
    std::fs::write(root.join("guide/one.md"), "one, edited").expect("write");
    stowctl(sync(&[])).await.expect("second pass");
    assert_eq!(versions(&h, "mirror/index.md").await, 1);
    assert_eq!(versions(&h, "mirror/guide/one.md").await, 2);
    assert_eq!(
        object_body(&h, "mirror/guide/one.md").await.as_deref(),
        Some(&b"one, edited"[..])
    );
    // A deleted file: kept without --delete, removed with it.
    std::fs::remove_file(root.join("guide/two.md")).expect("rm");
    stowctl(sync(&[])).await.expect("pass without --delete");
    assert!(exists(&h, "mirror/guide/two.md").await);
    stowctl(sync(&["--delete"]))
        .await
        .expect("pass with --delete");
    assert!(!exists(&h, "mirror/guide/two.md").await);
    assert!(exists(&h, "mirror/index.md").await);
    // An emptied folder (an unmounted volume looks the same) deletes nothing.
    std::fs::remove_file(root.join("guide/one.md")).expect("rm");
    std::fs::remove_file(root.join("index.md")).expect("rm");
    let e = stowctl(sync(&["--delete"])).await.expect_err("refused");
    assert!(e.to_string().contains("refusing to delete"), "{e:#}");
    assert!(exists(&h, "mirror/index.md").await);
    assert!(exists(&h, "mirror/guide/one.md").await);
    // A folder that is not there at all neither.
    std::fs::remove_dir_all(&root).expect("rm");
    assert!(stowctl(sync(&["--delete"])).await.is_err());
    assert!(exists(&h, "mirror/index.md").await);
    worker.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_watch_uploads_a_burst_once_and_a_renamed_save_once() {
    let h = Harness::new("localstack").await;
    let worker = h.worker(None).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let state = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    std::fs::write(root.join("keep.md"), "keep").expect("write");
    let mut args = vec![
        "sync".to_string(),
        root.display().to_string(),
        "--watch".into(),
        "--delete".into(),
        "--debounce=400ms".into(),
        format!("--manifest={}", state.path().join("m.json").display()),
    ];
    args.extend(to_flags(&h, &worker, "w"));
    // On a thread of its own (the command's future is not `Send`), until told to stop.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let watching = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            tokio::select! {
                r = stowctl(args) => r,
                _ = stopped => Ok(()),
            }
        })
    });
    let eventually = |what: &'static str, key: &'static str, want: Option<&'static [u8]>| {
        let h = &h;
        async move {
            for _ in 0..150 {
                if object_body(h, key).await.as_deref() == want {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("{what}: {key} never became {want:?}");
        }
    };
    eventually("first pass", "w/keep.md", Some(b"keep")).await;

    // 50 rapid writes to one file: one upload, of the last content.
    for i in 0..50 {
        std::fs::write(root.join("burst.md"), format!("version {i:02}")).expect("write");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eventually("burst", "w/burst.md", Some(b"version 49")).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        versions(&h, "w/burst.md").await,
        1,
        "one upload for the burst"
    );

    // A save through a temporary file and a rename.
    std::fs::write(root.join("notes.md.part"), "final notes").expect("write");
    std::fs::rename(root.join("notes.md.part"), root.join("notes.md")).expect("rename");
    eventually("rename", "w/notes.md", Some(b"final notes")).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(versions(&h, "w/notes.md").await, 1);
    assert_eq!(
        versions(&h, "w/notes.md.part").await,
        0,
        "the temporary name never lands"
    );

    // A deleted file goes (--delete).
    std::fs::remove_file(root.join("burst.md")).expect("rm");
    eventually("delete", "w/burst.md", None).await;
    assert!(!watching.is_finished(), "still watching");
    let _ = stop.send(());
    watching.join().expect("join").expect("sync --watch");
    worker.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_request_is_given_up_and_its_upload_aborted() {
    let h = Harness::new("localstack").await;
    let worker = h
        .worker_with(
            &[
                "--ingest-part-size=5242880",
                "--ingest-resume-window=1s",
                "--sweep-interval=1s",
            ],
            None,
        )
        .await;
    let mut c = client(&worker).await;
    let data = body(12 * MIB as usize, 11);
    // A stream that ends after 6 MiB of 12: one part is stored, the request waits.
    let e = upload(
        &mut c,
        header(&h, "gone", "ingest/gone.bin", &data),
        data[..6 * MIB as usize].to_vec(),
    )
    .await
    .expect_err("short stream");
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    assert!(
        e.message().contains("6291456 of the 12582912 bytes"),
        "{}",
        e.message()
    );
    let s = status(&mut c, "gone").await;
    assert_eq!(s.state, IngestState::Pending as i32);
    assert_eq!(s.resume_offset, 5 * MIB);
    let mut failed = s;
    for _ in 0..100 {
        if failed.state == IngestState::Failed as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        failed = status(&mut c, "gone").await;
    }
    assert_eq!(failed.state, IngestState::Failed as i32, "{failed:?}");
    assert!(failed.error.contains("abandoned"), "{}", failed.error);
    assert_eq!(open_multipart_uploads(&h).await, 0, "its upload is aborted");
    // The same request again starts over and completes.
    let r = upload(
        &mut c,
        header(&h, "gone", "ingest/gone.bin", &data),
        data.clone(),
    )
    .await
    .expect("again");
    assert_eq!(r.bytes_resumed, 0);
    assert_eq!(h.peer_sha256("ingest/gone.bin"), sha(&data));
    worker.shutdown().await.expect("shutdown");
}
