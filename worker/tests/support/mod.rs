//! Shared harness of the worker's integration tests: a fresh database, a
//! unique queue prefix, a bucket on the chosen S3 server, credentials
//! mounted the way Kubernetes mounts a Secret, a scriptable HTTP source, and
//! a reader nobody in this project wrote (the AWS CLI) to check objects.
#![allow(dead_code)]

pub mod index;
pub mod source;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use clap::Parser;
use stowage_common::db::{self, Pool};
use stowage_common::locks::{LockManager, LockMetrics};
use stowage_common::queue::{NatsSettings, Queue};
use stowage_common::spec::{Destination, Endpoint, SecretRef, UploadJobSpec, UploadSource};
use stowage_common::state::uploads::{self, JobRecord, NewJob};
use stowage_common::testing::{S3Target, StackEnv, fresh_database, unique};
use stowage_worker::config::WorkerArgs;
use stowage_worker::upload::multipart::PartHook;
use uuid::Uuid;

pub const SECRET: &str = "s3-test";

pub struct Harness {
    pub env: StackEnv,
    pub target: S3Target,
    pub database_url: String,
    pub prefix: String,
    pub bucket: String,
    pub creds_dir: tempfile::TempDir,
    pub s3: aws_sdk_s3::Client,
    pub pool: Pool,
    pub queue: Queue,
}

impl Harness {
    pub async fn new(target_name: &str) -> Harness {
        let env = StackEnv::load();
        let target = env
            .s3_targets()
            .into_iter()
            .find(|t| t.name == target_name)
            .unwrap_or_else(|| panic!("no S3 target {target_name}"));
        let database_url = fresh_database(&env).await;
        let prefix = unique("t");
        let creds_dir = tempfile::tempdir().expect("tempdir");
        // Jobs run in `default`, collections in `team-a`: each namespace
        // has its own copy, as Secrets are never shared between them.
        for namespace in ["default", "team-a"] {
            target
                .write_secret(creds_dir.path(), namespace, SECRET)
                .expect("credentials Secret");
        }
        let s3 = target.client();
        let bucket = unique("b-");
        s3.create_bucket()
            .bucket(&bucket)
            .send()
            .await
            .unwrap_or_else(|e| panic!("create bucket on {}: {e:?}", target.name));
        let pg = db::parse_url(&database_url).expect("url");
        let pool = db::pool(&pg, 8).expect("pool");
        let locks = LockManager::new(pg, LockMetrics::default(), Duration::from_secs(2));
        db::migrate(&pool, &locks).await.expect("migrate");
        let queue = Queue::connect(&NatsSettings::new(env.nats_url(), &prefix))
            .await
            .expect("nats");
        queue
            .ensure(&stowage_common::queue::ConsumerSettings {
                ack_wait: Duration::from_secs(5),
            })
            .await
            .expect("streams");
        Harness {
            env,
            target,
            database_url,
            prefix,
            bucket,
            creds_dir,
            s3,
            pool,
            queue,
        }
    }

    /// Arguments of a worker on this harness (ports picked by the OS).
    pub fn worker_args(&self, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "stowage-worker".into(),
            format!("--database-url={}", self.database_url),
            format!("--nats-url={}", self.env.nats_url()),
            format!("--queue-prefix={}", self.prefix),
            "--grpc-addr=127.0.0.1:0".into(),
            "--metrics-addr=127.0.0.1:0".into(),
            format!("--credentials-dir={}", self.creds_dir.path().display()),
            "--ack-wait=5s".into(),
            "--drain-timeout=2s".into(),
            "--lock-heartbeat=1s".into(),
            // No Kubernetes API here: gRPC auth is the e2e suite's.
            "--auth-mode=none".into(),
            // The stack (and the test sources) listen on loopback.
            "--allow-private-networks=true".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    pub async fn worker(&self, hook: Option<PartHook>) -> stowage_worker::Worker {
        self.worker_with(&[], hook).await
    }

    pub async fn worker_with(
        &self,
        extra: &[&str],
        hook: Option<PartHook>,
    ) -> stowage_worker::Worker {
        let args = WorkerArgs::parse_from(self.worker_args(extra));
        stowage_worker::start(args, hook)
            .await
            .expect("worker starts")
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            endpoint: Some(self.target.endpoint.clone()),
            region: self.target.region.clone(),
            force_path_style: true,
            credentials_secret_ref: Some(SecretRef {
                name: SECRET.into(),
            }),
            use_worker_credentials: false,
            // The stack's S3 servers listen on loopback.
            allow_private_networks: true,
        }
    }

    /// A spec with defaults, writing under `prefix` in the harness bucket.
    pub fn spec(&self, source: UploadSource, key_prefix: &str) -> UploadJobSpec {
        serde_json::from_value::<UploadJobSpec>(serde_json::json!({
            "source": source,
            "destination": Destination {
                bucket: self.bucket.clone(),
                key_prefix: key_prefix.into(),
                endpoint: self.endpoint(),
                encryption: None,
            },
            "retry": {"maxAttempts": 5, "backoff": {"baseMillis": 100, "maxMillis": 1000}},
        }))
        .expect("spec")
    }

    pub async fn submit(&self, name: &str, spec: UploadJobSpec) -> Uuid {
        stowage_common::jobs::submit_upload(
            &self.pool.get().await.expect("db"),
            &self.queue,
            &NewJob {
                namespace: "default".into(),
                name: name.into(),
                source_uid: unique("uid-"),
                generation: 1,
                spec,
                suspended: false,
            },
        )
        .await
        .expect("submit")
    }

    /// Waits (with a deadline) until the job is finished.
    pub async fn wait_job(&self, id: Uuid, timeout: Duration) -> JobRecord {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut events = self.queue.subscribe_events().await.expect("subscribe");
        loop {
            let db = self.pool.get().await.expect("db");
            let job = uploads::get_job(&db, id).await.expect("job");
            if job.state == "succeeded" || job.state == "failed" {
                return job;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {id} still {} after {timeout:?}: {:?}",
                job.state,
                uploads::list_items(&db, id).await.expect("items")
            );
            // Woken by the next progress event, or re-checked after 500 ms.
            let _ = tokio::time::timeout(
                Duration::from_millis(500),
                futures::StreamExt::next(&mut events),
            )
            .await;
        }
    }

    pub async fn items(&self, id: Uuid) -> Vec<uploads::ItemRecord> {
        let db = self.pool.get().await.expect("db");
        uploads::list_items(&db, id).await.expect("items")
    }

    pub async fn object_sha256_metadata(&self, key: &str) -> Option<String> {
        let h = self
            .s3
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .expect("head");
        h.metadata().and_then(|m| m.get("sha256")).cloned()
    }

    /// SHA-256 of the object as read back by the AWS CLI (not our code).
    pub fn peer_sha256(&self, key: &str) -> String {
        peer_sha256(&self.target, &self.bucket, key)
    }

    /// `aws s3api head-object --checksum-mode ENABLED`, as JSON.
    pub fn peer_head(&self, key: &str) -> serde_json::Value {
        let t = &self.target;
        let env = StackEnv::load();
        let out = Command::new(env.get("STOWAGE_AWS_CLI"))
            .args(["--endpoint-url", &t.endpoint, "s3api", "head-object"])
            .args(["--bucket", &self.bucket, "--key", key])
            .args(["--checksum-mode", "ENABLED", "--output", "json"])
            .env("AWS_ACCESS_KEY_ID", &t.access_key_id)
            .env("AWS_SECRET_ACCESS_KEY", &t.secret_access_key)
            .env("AWS_DEFAULT_REGION", &t.region)
            .env("AWS_REGION", &t.region)
            .env("AWS_CONFIG_FILE", aws_config_file())
            .env_remove("AWS_PROFILE")
            .output()
            .expect("run aws cli");
        assert!(
            out.status.success(),
            "aws cli head-object {key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("head-object JSON")
    }
}

/// Streams the object through `aws s3 cp … -` into SHA-256.
pub fn peer_sha256(t: &S3Target, bucket: &str, key: &str) -> String {
    let env = StackEnv::load();
    let aws = env.get("STOWAGE_AWS_CLI");
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; {aws} --endpoint-url {} s3 cp \"s3://{bucket}/{key}\" - | sha256sum",
            t.endpoint
        ))
        .env("AWS_ACCESS_KEY_ID", &t.access_key_id)
        .env("AWS_SECRET_ACCESS_KEY", &t.secret_access_key)
        .env("AWS_DEFAULT_REGION", &t.region)
        .env("AWS_REGION", &t.region)
        .env("AWS_CONFIG_FILE", aws_config_file())
        .env_remove("AWS_PROFILE")
        .output()
        .expect("run aws cli");
    assert!(
        out.status.success(),
        "aws cli failed reading {bucket}/{key}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

pub fn aws_config_file() -> PathBuf {
    let path = std::env::temp_dir().join("stowage-test-aws-config");
    std::fs::write(
        &path,
        "[default]\ns3 =\n    addressing_style = path\nrequest_checksum_calculation = when_required\nresponse_checksum_validation = when_required\n",
    )
    .expect("write aws config");
    path
}

/// Declares one `#[tokio::test]` per S3 server of the stack.
#[macro_export]
macro_rules! on_each_s3 {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn localstack() {
                super::$name("localstack").await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn garage() {
                super::$name("garage").await
            }
        }
    };
}
