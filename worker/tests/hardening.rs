//! Workers never lose, leak or loop, on the real stack: a panicking handler
//! dead-letters its task with the panic's message; every task kind's
//! attempts are bounded; files refused at planning can be replayed; the
//! common failures are told in words a person can act on, without the
//! secrets of the URLs involved; hostile gRPC requests are INVALID_ARGUMENT.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use stowage_common::spec::UploadSource;
use stowage_common::state::uploads::ItemState;
use stowage_common::testing::{data, eventually};
use stowage_proto::v1::DeadLetter;
use support::Harness;
use support::source::{FileBehaviour, SourceServer};

fn http_source(urls: Vec<String>) -> UploadSource {
    serde_json::from_value(serde_json::json!({
        "http": {"urls": urls, "allowPrivateNetworks": true}
    }))
    .expect("source")
}

/// The dead letters of this harness's queue.
async fn letters(h: &Harness) -> Vec<(u64, DeadLetter)> {
    h.queue.dead_letters().await.expect("dead letters")
}

async fn letter_for(h: &Harness, needle: &str) -> (u64, DeadLetter) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(found) = letters(h)
            .await
            .into_iter()
            .find(|(_, l)| l.error.contains(needle))
        {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no dead letter mentions {needle:?}: {:?}",
            letters(h).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A handler that panics (here: the test's part hook, inside a single PUT)
/// once came back forever, never settled. Now its task is dead-lettered
/// with the panic's message, its item failed and its job ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_dead_letters_its_task_with_the_message() {
    let h = Harness::new("garage").await;
    let src = SourceServer::start().await;
    src.serve("small.txt", Bytes::from_static(b"a small document"));
    let hook: stowage_worker::upload::multipart::PartHook =
        Arc::new(|_, _, _| panic!("the test hook exploded on purpose"));
    let worker = h.worker(Some(hook)).await;
    let job = h
        .submit(
            "panics",
            h.spec(http_source(vec![src.url("small.txt")]), "p/"),
        )
        .await;
    let done = h.wait_job(job, Duration::from_secs(60)).await;
    assert_eq!(done.state, "failed");
    let (_, letter) = letter_for(&h, "the test hook exploded on purpose").await;
    assert!(
        letter
            .error
            .starts_with("the worker panicked running this task"),
        "{}",
        letter.error
    );
    assert_eq!(letter.error_class, "permanent");
    let items = h.items(job).await;
    assert_eq!(items[0].state, ItemState::Failed);
    assert!(items[0].dead_lettered);
    worker.shutdown().await.expect("shutdown");
}

/// Files refused at planning (a key with a control character, from a
/// percent-encoded URL path) used to get no dead letter, so they could
/// not be replayed. Now each has one, with the reason, and a replay runs it
/// again (and refuses it again, for the same reason).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_refused_at_planning_are_dead_lettered_and_replayable() {
    let h = Harness::new("garage").await;
    let src = SourceServer::start().await;
    src.serve("good.txt", Bytes::from_static(b"fine"));
    let worker = h.worker(None).await;
    let job = h
        .submit(
            "refused",
            h.spec(
                http_source(vec![src.url("good.txt"), src.url("bad%1b%5B31m.txt")]),
                "r/",
            ),
        )
        .await;
    let done = h.wait_job(job, Duration::from_secs(60)).await;
    assert_eq!(done.state, "failed");
    let (seq, letter) = letter_for(&h, "control character").await;
    assert_eq!(letter.error_class, "permanent");
    assert!(
        letter.error.contains("invalid destination key"),
        "{}",
        letter.error
    );
    let refused = h
        .items(job)
        .await
        .into_iter()
        .find(|i| i.state == ItemState::Failed)
        .expect("the refused item");
    assert!(refused.dead_lettered);
    let db = h.pool.get().await.expect("db");
    let task = stowage_common::jobs::replay_dead_letter(&db, &h.queue, seq)
        .await
        .expect("replayable");
    assert!(task.task_id.ends_with(&format!("/replay-{seq}")));
    // The replay runs and fails for the same reason: a new letter.
    eventually(
        "the replay is dead-lettered again",
        Duration::from_secs(60),
        || async {
            letters(&h).await.iter().any(|(s, l)| {
                *s != seq && l.task.as_ref().is_some_and(|t| t.task_id == task.task_id)
            })
        },
    )
    .await;
    worker.shutdown().await.expect("shutdown");
}

/// Planning against an endpoint nobody answers used to retry forever. Now
/// it stops after `--task-attempts` with a dead letter that says why, and
/// the job fails with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planning_attempts_are_bounded_and_the_dead_letter_says_why() {
    let h = Harness::new("garage").await;
    let worker = h.worker_with(&["--task-attempts=2"], None).await;
    let mut endpoint = h.endpoint();
    endpoint.endpoint = Some("http://127.0.0.1:9".into()); // discard: nothing listens
    let source: UploadSource = serde_json::from_value(serde_json::json!({
        "s3": {"bucket": "nowhere", "prefix": "", "endpoint": endpoint.endpoint,
               "region": endpoint.region, "credentialsSecretRef": {"name": support::SECRET},
               "allowPrivateNetworks": true}
    }))
    .expect("source");
    let job = h.submit("unreachable", h.spec(source, "u/")).await;
    let (_, letter) = letter_for(&h, "gave up after 2 attempts").await;
    assert!(
        letter.error.contains("cannot reach the S3 endpoint"),
        "{}",
        letter.error
    );
    assert!(
        !letter.error.contains("DispatchFailure"),
        "no debug dumps: {}",
        letter.error
    );
    let done = h.wait_job(job, Duration::from_secs(30)).await;
    assert_eq!(done.state, "failed");
    assert!(
        done.last_error
            .as_deref()
            .is_some_and(|e| e.contains("cannot reach the S3 endpoint")),
        "{:?}",
        done.last_error
    );
    worker.shutdown().await.expect("shutdown");
}

/// What a person reads when a file fails: what failed, why, what to do —
/// and never a URL's password, signature or token, nor the worker's paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn common_failures_are_told_plainly_and_without_secrets() {
    let h = Harness::new("garage").await;
    let src = SourceServer::start().await;
    src.put(
        "cut.bin",
        FileBehaviour {
            data: data(3 << 20, 7),
            cut_after: Some(1 << 20),
            ..Default::default()
        },
    );
    src.put(
        "slow.bin",
        FileBehaviour {
            data: data(8 << 20, 8),
            trickle: Some(Duration::from_secs(60)),
            ..Default::default()
        },
    );
    let worker = h.worker_with(&["--source-min-rate=1000000"], None).await;
    let base = src.url("");
    let authority = base.trim_start_matches("http://").trim_end_matches('/');
    let presigned = format!(
        "http://alice:hunter2@{authority}/missing.pdf?X-Amz-Algorithm=AWS4-HMAC-SHA256&\
         X-Amz-Credential=AKIDSECRETCRED%2F20261201&X-Amz-Signature=deadbeefSIGNATURE&token=TOKENSECRET"
    );
    let mut spec = h.spec(
        http_source(vec![presigned, src.url("cut.bin"), src.url("slow.bin")]),
        "m/",
    );
    spec.retry.max_attempts = 1;
    let job = h.submit("messages", spec).await;
    let done = h.wait_job(job, Duration::from_secs(120)).await;
    assert_eq!(done.state, "failed");
    let items = h.items(job).await;
    let error_of = |key: &str| {
        items
            .iter()
            .find(|i| i.dest_key.ends_with(key))
            .and_then(|i| i.last_error.clone())
            .unwrap_or_default()
    };
    let missing = error_of("missing.pdf");
    assert!(missing.contains("answered HTTP 404"), "{missing}");
    let cut = error_of("cut.bin");
    // How much of the cut-off megabyte reached the reader before the error
    // depends on buffering; never more than the server sent, never nothing.
    let came = cut
        .rsplit_once("after ")
        .and_then(|(_, rest)| rest.split_once(" of 3145728 bytes"))
        .and_then(|(n, _)| n.parse::<u64>().ok());
    assert!(
        cut.contains("the connection broke while reading the body")
            && came.is_some_and(|n| n > 0 && n <= 1 << 20),
        "a body cut short says how much came: {cut}"
    );
    assert!(!cut.contains("error decoding response body"), "{cut}");
    let slow = error_of("slow.bin");
    assert!(
        slow.contains("below the minimum of 1000000 bytes/s (--source-min-rate)"),
        "{slow}"
    );
    // Everything that is shown: item errors (status, stowctl) and letters.
    let all_text = format!(
        "{:?} {:?} {:?}",
        items.iter().map(|i| &i.last_error).collect::<Vec<_>>(),
        done.last_error,
        letters(&h)
            .await
            .iter()
            .map(|(_, l)| &l.error)
            .collect::<Vec<_>>()
    );
    for secret in [
        "hunter2",
        "deadbeefSIGNATURE",
        "AKIDSECRETCRED",
        "TOKENSECRET",
    ] {
        assert!(
            !all_text.contains(secret),
            "{secret} leaked into {all_text}"
        );
    }
    worker.shutdown().await.expect("shutdown");
}

/// A credentials Secret that is not there is named, and the worker's own
/// mount paths stay out of the message (it reaches the job's status).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_secret_is_named_without_the_workers_paths() {
    let h = Harness::new("garage").await;
    let src = SourceServer::start().await;
    src.serve("a.txt", Bytes::from_static(b"a"));
    let worker = h.worker(None).await;
    let mut spec = h.spec(http_source(vec![src.url("a.txt")]), "s/");
    spec.destination.endpoint.credentials_secret_ref = Some(stowage_common::spec::SecretRef {
        name: "nope".into(),
    });
    let job = h.submit("secret", spec).await;
    let done = h.wait_job(job, Duration::from_secs(60)).await;
    assert_eq!(done.state, "failed");
    let error = h.items(job).await[0].last_error.clone().unwrap_or_default();
    assert!(error.contains("Secret default/nope"), "{error}");
    let dir = h.creds_dir.path().display().to_string();
    assert!(!error.contains(&dir), "the worker's path leaked: {error}");
    worker.shutdown().await.expect("shutdown");
}

/// A NUL byte, or a string that is not UTF-8, in a Search request is the
/// caller's mistake: INVALID_ARGUMENT, not UNAVAILABLE or INTERNAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_search_requests_are_invalid_arguments() {
    let h = Harness::new("garage").await;
    let worker = h.worker(None).await;
    let url = format!("http://{}", worker.grpc_addr);
    let mut search = stowage_proto::v1::search_client::SearchClient::connect(url.clone())
        .await
        .expect("connect");
    let e = search
        .query(stowage_proto::v1::SearchRequest {
            namespace: "team-a".into(),
            collection: "kb\0".into(),
            query: "hello".into(),
            ..Default::default()
        })
        .await
        .expect_err("NUL");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

    /// The same message as `SearchRequest`, with `query` as raw bytes.
    #[derive(Clone, PartialEq, prost::Message)]
    struct RawQuery {
        #[prost(string, tag = "1")]
        namespace: String,
        #[prost(string, tag = "2")]
        collection: String,
        #[prost(bytes = "vec", tag = "3")]
        query: Vec<u8>,
    }
    let channel = tonic::transport::Endpoint::from_shared(url)
        .expect("endpoint")
        .connect()
        .await
        .expect("channel");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/stowage.v1.Search/Query");
    let codec = tonic_prost::ProstCodec::<RawQuery, RawQuery>::default();
    let e = grpc
        .unary(
            tonic::Request::new(RawQuery {
                namespace: "team-a".into(),
                collection: "kb".into(),
                query: vec![b'o', b'k', 0xff, 0xfe],
            }),
            path,
            codec,
        )
        .await
        .expect_err("not UTF-8");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("failed to decode"), "{}", e.message());
    worker.shutdown().await.expect("shutdown");
}
