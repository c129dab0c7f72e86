//! Server-side encryption of what a job writes, on the stack's S3 servers,
//! checked with a reader nobody in this project wrote (the AWS CLI):
//!
//! | kind    | LocalStack | Garage                                        |
//! |---------|------------|-----------------------------------------------|
//! | SSE-C   | applied    | applied                                       |
//! | SSE-S3  | applied    | ignored by the server: the job is refused at  |
//! | SSE-KMS | applied    | planning, nothing written                     |
//!
//! SSE-C objects (single PUT, multipart, dedup copy, preserved version)
//! cannot be read without the key and read back intact with it.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use md5::{Digest as _, Md5};
use stowage_common::spec::{UploadJobSpec, UploadSource};
use stowage_common::testing::{StackEnv, data, sha256_hex};
use support::Harness;
use support::source::SourceServer;

/// The Secret (in namespace `default`) holding the SSE-C key.
const KEY_SECRET: &str = "sse-c-key";

fn http_source(urls: Vec<String>) -> UploadSource {
    serde_json::from_value(serde_json::json!({
        "http": {"urls": urls, "allowPrivateNetworks": true}
    }))
    .expect("source")
}

fn with_encryption(mut spec: UploadJobSpec, encryption: serde_json::Value) -> UploadJobSpec {
    spec.destination.encryption = Some(serde_json::from_value(encryption).expect("encryption"));
    spec
}

/// Writes `key` as the Secret's data, the way a mounted Secret holds it.
fn write_key(h: &Harness, key: &[u8]) {
    let dir = h.creds_dir.path().join("default").join(KEY_SECRET);
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("key"), key).expect("key");
}

/// The AWS CLI on the harness's server.
fn aws(h: &Harness, args: &[&str]) -> Output {
    let t = &h.target;
    Command::new(StackEnv::load().get("STOWAGE_AWS_CLI"))
        .args(["--endpoint-url", &t.endpoint, "--output", "json"])
        .args(args)
        .env("AWS_ACCESS_KEY_ID", &t.access_key_id)
        .env("AWS_SECRET_ACCESS_KEY", &t.secret_access_key)
        .env("AWS_DEFAULT_REGION", &t.region)
        .env("AWS_REGION", &t.region)
        .env("AWS_CONFIG_FILE", support::aws_config_file())
        .env_remove("AWS_PROFILE")
        .output()
        .expect("run aws cli")
}

fn head(h: &Harness, key: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["s3api", "head-object", "--bucket", &h.bucket, "--key", key];
    args.extend(extra);
    let out = aws(h, &args);
    assert!(
        out.status.success(),
        "head-object {key}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("head JSON")
}

/// GETs `key` with `extra` arguments: the SHA-256 of what came back, or
/// the CLI's error.
fn get(h: &Harness, key: &str, extra: &[&str], dir: &Path) -> Result<String, String> {
    let file = dir.join("object");
    let file_arg = file.to_string_lossy().into_owned();
    let mut args = vec!["s3api", "get-object", "--bucket", &h.bucket, "--key", key];
    args.extend(extra);
    args.push(&file_arg);
    let out = aws(h, &args);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(sha256_hex(&std::fs::read(&file).expect("read object")))
}

fn keys_under(h: &Harness, prefix: &str) -> Vec<String> {
    let out = aws(
        h,
        &[
            "s3api",
            "list-objects-v2",
            "--bucket",
            &h.bucket,
            "--prefix",
            prefix,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    listing["Contents"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["Key"].as_str().map(str::to_string))
        .collect()
}

fn open_uploads(h: &Harness) -> usize {
    let out = aws(
        h,
        &["s3api", "list-multipart-uploads", "--bucket", &h.bucket],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    listing["Uploads"].as_array().map_or(0, Vec::len)
}

/// SSE-C through every way a job writes: a single PUT, a multipart upload,
/// a dedup copy and, on a second run, a preserved version. None of them
/// reads without the key; all read back intact with it.
async fn sse_c_objects_need_their_key(target: &str) {
    let h = Harness::new(target).await;
    let key = data(32, 7);
    write_key(&h, &key);
    let md5 = base64::engine::general_purpose::STANDARD.encode(Md5::digest(&key));
    let key_file = tempfile::NamedTempFile::new().expect("key file");
    std::fs::write(key_file.path(), &key).expect("write key");
    let key_arg = format!("fileb://{}", key_file.path().display());
    let with_key = [
        "--sse-customer-algorithm",
        "AES256",
        "--sse-customer-key",
        key_arg.as_str(),
    ];

    let src = SourceServer::start().await;
    let small = Bytes::from_static(b"a small confidential document\n");
    let big = data(11 * 1024 * 1024, 3);
    src.serve("small.txt", small.clone());
    src.serve("copy.txt", small.clone());
    src.serve("big.bin", big.clone());
    let _worker = h.worker(None).await;
    let spec = |urls: Vec<String>| {
        let mut spec = with_encryption(
            h.spec(http_source(urls), "enc/"),
            serde_json::json!({"type": "SSE-C", "customerKeySecretRef": {"name": KEY_SECRET}}),
        );
        spec.part_size_bytes = 5 * 1024 * 1024;
        spec.dedup = true;
        spec.conflict_policy = stowage_common::spec::ConflictPolicy::Version;
        spec
    };
    // One after the other, so that the second finds the first's content.
    let job = h
        .submit(
            "sse-c",
            spec(vec![src.url("small.txt"), src.url("big.bin")]),
        )
        .await;
    let done = h.wait_job(job, Duration::from_secs(120)).await;
    assert_eq!(done.state, "succeeded", "{:?}", done.last_error);
    let job = h.submit("sse-c-dup", spec(vec![src.url("copy.txt")])).await;
    let done = h.wait_job(job, Duration::from_secs(120)).await;
    assert_eq!(done.state, "succeeded", "{:?}", done.last_error);
    let items = h.items(job).await;
    assert_eq!(
        items[0].state,
        stowage_common::state::uploads::ItemState::SkippedDuplicate,
        "copied server-side from enc/small.txt"
    );
    // small.txt changes: its first version is preserved, encrypted too.
    let changed = Bytes::from_static(b"the second version of the document\n");
    src.serve("small.txt", changed.clone());
    let job = h.submit("sse-c-v2", spec(vec![src.url("small.txt")])).await;
    let done = h.wait_job(job, Duration::from_secs(120)).await;
    assert_eq!(done.state, "succeeded", "{:?}", done.last_error);

    let dir = tempfile::tempdir().expect("tempdir");
    for (key, bytes) in [
        ("enc/small.txt", &changed),
        ("enc/small.txt.stowage-v1", &small),
        ("enc/copy.txt", &small),
        ("enc/big.bin", &big),
    ] {
        let refused = get(&h, key, &[], dir.path()).expect_err("read without the key");
        assert!(
            refused.contains("InvalidRequest") || refused.contains("400"),
            "{key}: {refused}"
        );
        assert_eq!(
            get(&h, key, &with_key, dir.path()).as_deref(),
            Ok(sha256_hex(bytes).as_str()),
            "{key} with its key"
        );
        let head = head(&h, key, &with_key);
        assert_eq!(head["SSECustomerAlgorithm"], "AES256", "{key}: {head}");
        assert_eq!(head["SSECustomerKeyMD5"], md5.as_str(), "{key}: {head}");
    }
    assert_eq!(
        open_uploads(&h),
        0,
        "the encryption check's upload was aborted"
    );
}
on_each_s3!(sse_c_objects_need_their_key);

/// LocalStack applies SSE-S3 and SSE-KMS: HEAD says so for a single PUT and
/// a multipart object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_s3_and_kms_show_on_head() {
    let h = Harness::new("localstack").await;
    let src = SourceServer::start().await;
    src.serve("small.txt", Bytes::from_static(b"small\n"));
    src.serve("big.bin", data(6 * 1024 * 1024, 5));
    let _worker = h.worker(None).await;
    for (name, encryption, algorithm) in [
        ("s3", serde_json::json!({"type": "SSE-S3"}), "AES256"),
        (
            "kms",
            serde_json::json!({"type": "SSE-KMS", "kmsKeyId": "1234abcd-12ab-34cd-56ef-1234567890ab"}),
            "aws:kms",
        ),
    ] {
        let mut spec = with_encryption(
            h.spec(
                http_source(vec![src.url("small.txt"), src.url("big.bin")]),
                &format!("{name}/"),
            ),
            encryption,
        );
        spec.part_size_bytes = 5 * 1024 * 1024;
        let job = h.submit(name, spec).await;
        let done = h.wait_job(job, Duration::from_secs(120)).await;
        assert_eq!(done.state, "succeeded", "{name}: {:?}", done.last_error);
        for key in ["small.txt", "big.bin"] {
            let head = head(&h, &format!("{name}/{key}"), &[]);
            assert_eq!(
                head["ServerSideEncryption"], algorithm,
                "{name}/{key}: {head}"
            );
            if name == "kms" {
                let used = head["SSEKMSKeyId"].as_str().unwrap_or_default();
                assert!(
                    used.ends_with("key/1234abcd-12ab-34cd-56ef-1234567890ab"),
                    "{used}"
                );
            }
        }
    }
}

/// Garage accepts the SSE-S3 and SSE-KMS headers and stores the bytes in
/// clear: such a job is refused at planning, with the reason, and nothing
/// is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_ignores_the_encryption_gets_nothing_written() {
    let h = Harness::new("garage").await;
    let src = SourceServer::start().await;
    src.serve(
        "doc.txt",
        Bytes::from_static(b"must not be stored in clear\n"),
    );
    let _worker = h.worker(None).await;
    for (name, encryption, kind) in [
        ("s3", serde_json::json!({"type": "SSE-S3"}), "SSE-S3"),
        ("kms", serde_json::json!({"type": "SSE-KMS"}), "SSE-KMS"),
    ] {
        let spec = with_encryption(
            h.spec(http_source(vec![src.url("doc.txt")]), &format!("{name}/")),
            encryption,
        );
        let job = h.submit(name, spec).await;
        let done = h.wait_job(job, Duration::from_secs(60)).await;
        assert_eq!(done.state, "failed", "{name}");
        let error = done.last_error.unwrap_or_default();
        assert!(
            error.contains(&format!("the store did not apply {kind}"))
                && error.contains("no server-side encryption"),
            "{name}: {error}"
        );
        assert!(
            keys_under(&h, &format!("{name}/")).is_empty(),
            "{name}: nothing written"
        );
    }
    assert_eq!(open_uploads(&h), 0);
}

/// A Secret that holds no 256-bit key fails the job at planning, saying
/// which Secret and key, never its content; nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_customer_key_fails_the_job_without_showing_it() {
    let h = Harness::new("garage").await;
    write_key(&h, b"only-twenty-six-characters");
    let src = SourceServer::start().await;
    src.serve("doc.txt", Bytes::from_static(b"confidential\n"));
    let _worker = h.worker(None).await;
    let spec = with_encryption(
        h.spec(http_source(vec![src.url("doc.txt")]), "bad/"),
        serde_json::json!({"type": "SSE-C", "customerKeySecretRef": {"name": KEY_SECRET}}),
    );
    let job = h.submit("bad-key", spec).await;
    let done = h.wait_job(job, Duration::from_secs(60)).await;
    assert_eq!(done.state, "failed");
    let error = done.last_error.unwrap_or_default();
    assert!(
        error.contains(&format!("Secret default/{KEY_SECRET}"))
            && error.contains("not an SSE-C key")
            && error.contains("32 bytes"),
        "{error}"
    );
    assert!(!error.contains("only-twenty-six"), "{error}");
    assert!(keys_under(&h, "bad/").is_empty());
}
