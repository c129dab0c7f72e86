//! The end-to-end harness: a Kubernetes API (the cluster `KUBECONFIG` names,
//! else the emulator in `kube-emulator/`), the operator and worker binaries
//! as processes, and buckets, credentials and a database of their own on the
//! local stack. The same tests run against both kinds of API.

pub mod chart;
pub mod rbac;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use stowage_common::testing::{S3Target, StackEnv, fresh_database, unique};

/// Where the repository's `crds/` are.
fn crd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds")
}

/// A Kubernetes API for one test.
pub struct Kube {
    kubeconfig: PathBuf,
    kubectl: String,
    emulator: Option<Child>,
    /// True when the API is the local emulator (no schema validation).
    pub emulated: bool,
    /// The emulator's log of every request it served (JSON lines).
    pub requests: Option<PathBuf>,
    /// The emulator's TokenReview / SubjectAccessReview policy (JSON).
    auth_policy: Option<PathBuf>,
}

impl Kube {
    /// Uses the cluster of `KUBECONFIG` (installing the CRDs), or starts the
    /// emulator with the CRDs and writes a kubeconfig for it into `dir`.
    pub fn start(stack: &StackEnv, dir: &Path) -> Kube {
        let kubectl = stack
            .try_get("STOWAGE_KUBECTL")
            .unwrap_or_else(|| "kubectl".into());
        if let Ok(path) = std::env::var("KUBECONFIG") {
            let kube = Kube {
                kubeconfig: path.into(),
                kubectl,
                emulator: None,
                emulated: false,
                requests: None,
                auth_policy: None,
            };
            kube.ok(&["apply", "--server-side", "-f", &crd_dir().to_string_lossy()]);
            kube.ok(&[
                "wait",
                "--for=condition=Established",
                "crd/uploadjobs.stowage.dev",
                "crd/indexcollections.stowage.dev",
            ]);
            return kube;
        }
        let python = stack.get("STOWAGE_KUBE_EMULATOR_PYTHON");
        let port_file = dir.join("kube-port");
        let requests = dir.join("kube-requests.jsonl");
        let auth_policy = dir.join("kube-auth-policy.json");
        std::fs::write(&auth_policy, r#"{"tokens": {}, "rules": []}"#).expect("auth policy");
        let log = std::fs::File::create(dir.join("kube-emulator.log")).expect("emulator log");
        let child = Command::new(python)
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("kube-emulator/emulator.py"))
            .arg("--crds")
            .arg(crd_dir())
            .arg("--port-file")
            .arg(&port_file)
            .arg("--request-log")
            .arg(&requests)
            .arg("--auth-policy")
            .arg(&auth_policy)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start the Kubernetes API emulator");
        let deadline = Instant::now() + Duration::from_secs(20);
        let port = loop {
            if let Ok(p) = std::fs::read_to_string(&port_file) {
                break p;
            }
            assert!(
                Instant::now() < deadline,
                "the emulator did not start; see {}",
                dir.join("kube-emulator.log").display()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\n\
                 clusters: [{{name: emu, cluster: {{server: 'http://127.0.0.1:{}'}}}}]\n\
                 users: [{{name: emu, user: {{}}}}]\n\
                 contexts: [{{name: emu, context: {{cluster: emu, user: emu}}}}]\n\
                 current-context: emu\n",
                port.trim()
            ),
        )
        .expect("kubeconfig");
        Kube {
            kubeconfig,
            kubectl,
            emulator: Some(child),
            emulated: true,
            requests: Some(requests),
            auth_policy: Some(auth_policy),
        }
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// A bearer token (audience `stowage`) of a new identity that may search
    /// collection `namespace/collection`, and nothing else: on a cluster a
    /// ServiceAccount with a Role on `indexcollections/search`; on the
    /// emulator, the same grant in its review policy.
    pub fn grant_search(&self, namespace: &str, collection: &str) -> Grant {
        self.grant(
            namespace,
            "reader",
            ("get", "indexcollections", "search", Some(collection)),
        )
    }

    /// A token of a new identity that may create UploadJobs in `namespace`
    /// (what the worker's Ingest API asks), and nothing else.
    pub fn grant_upload(&self, namespace: &str) -> Grant {
        self.grant(namespace, "uploader", ("create", "uploadjobs", "", None))
    }

    /// A new identity with one rule: (verb, resource, subresource, name) in
    /// group `stowage.dev`.
    fn grant(
        &self,
        namespace: &str,
        who: &str,
        (verb, resource, subresource, name): (&str, &str, &str, Option<&str>),
    ) -> Grant {
        let account = unique(who).to_lowercase();
        match &self.auth_policy {
            Some(path) => {
                let token = unique("token-");
                let user = format!("system:serviceaccount:{namespace}:{account}");
                let mut policy: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(path).expect("policy"))
                        .expect("policy JSON");
                policy["tokens"][&token] = serde_json::json!({
                    "username": user, "groups": ["system:serviceaccounts"], "audiences": ["stowage"]
                });
                if let Some(rules) = policy["rules"].as_array_mut() {
                    rules.push(serde_json::json!({
                        "user": user, "verb": verb, "group": "stowage.dev",
                        "resource": resource, "subresource": subresource,
                        "namespace": namespace, "names": name.into_iter().collect::<Vec<_>>()
                    }));
                }
                std::fs::write(path, policy.to_string()).expect("write policy");
                Grant {
                    token,
                    namespace: namespace.into(),
                    account,
                }
            }
            None => {
                let resources = if subresource.is_empty() {
                    resource.to_string()
                } else {
                    format!("{resource}/{subresource}")
                };
                let names = name.map_or(String::new(), |n| format!(", resourceNames: [{n}]"));
                let role = format!(
                    "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: {account}, namespace: {namespace}}}\n\
                     rules: [{{apiGroups: [stowage.dev], resources: [{resources}]{names}, verbs: [{verb}]}}]\n"
                );
                let dir = tempfile::tempdir().expect("tempdir");
                let file = dir.path().join("role.yaml");
                std::fs::write(&file, role).expect("role");
                self.ok(&["create", "serviceaccount", &account, "-n", namespace]);
                self.ok(&["apply", "-f", &file.to_string_lossy()]);
                self.ok(&[
                    "create",
                    "rolebinding",
                    &account,
                    "-n",
                    namespace,
                    "--role",
                    &account,
                    "--serviceaccount",
                    &format!("{namespace}:{account}"),
                ]);
                let token = self
                    .ok(&[
                        "create",
                        "token",
                        &account,
                        "-n",
                        namespace,
                        "--audience",
                        "stowage",
                    ])
                    .trim()
                    .to_string();
                Grant {
                    token,
                    namespace: namespace.into(),
                    account,
                }
            }
        }
    }

    /// Revokes a grant's token (the ServiceAccount goes; on the emulator,
    /// the token).
    pub fn revoke(&self, grant: &Grant) {
        match &self.auth_policy {
            Some(path) => {
                let mut policy: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(path).expect("policy"))
                        .expect("policy JSON");
                if let Some(tokens) = policy["tokens"].as_object_mut() {
                    tokens.remove(&grant.token);
                }
                std::fs::write(path, policy.to_string()).expect("write policy");
            }
            None => {
                self.ok(&[
                    "delete",
                    "serviceaccount",
                    &grant.account,
                    "-n",
                    &grant.namespace,
                ]);
            }
        }
    }

    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(&self.kubectl)
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(Stdio::null())
            .output()
            .expect("run kubectl")
    }

    /// Runs kubectl and returns its stdout; fails the test with its stderr.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "kubectl {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl apply --server-side` of a manifest.
    pub fn apply(&self, dir: &Path, manifest: &str) -> Output {
        let file = dir.join(format!("{}.yaml", unique("manifest")));
        std::fs::write(&file, manifest).expect("manifest");
        let path = file.to_string_lossy().into_owned();
        let mut args = vec!["apply", "--server-side", "-f", &path];
        if self.emulated {
            args.push("--validate=false"); // the emulator serves no OpenAPI
        }
        self.run(&args)
    }
}

/// A token that may search one collection.
pub struct Grant {
    pub token: String,
    namespace: String,
    account: String,
}

impl Drop for Kube {
    fn drop(&mut self) {
        if let Some(c) = &mut self.emulator {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A child process (operator or worker), SIGKILLed when dropped.
pub struct Proc {
    child: Child,
    pub log: PathBuf,
    /// Its `/metrics` address.
    pub metrics: String,
    /// A worker's gRPC address (`Search`, `WorkerStatus`).
    pub grpc: Option<String>,
}

impl Proc {
    /// SIGKILL: no drain, no lock release; the session dies with the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The body of `GET path` on its telemetry server, if it answers.
    pub async fn http_get(&self, path: &str) -> Option<String> {
        let url = format!("http://{}{path}", self.metrics);
        reqwest::get(url).await.ok()?.text().await.ok()
    }

    /// The value of a metric without labels, if exposed.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let body = self.http_get("/metrics").await?;
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One test's world: database, queue prefix, buckets, credentials, API.
pub struct World {
    pub stack: StackEnv,
    pub dir: tempfile::TempDir,
    pub kube: Kube,
    pub namespace: String,
    pub database_url: String,
    pub prefix: String,
    pub target: S3Target,
    pub s3: aws_sdk_s3::Client,
    pub source_bucket: String,
    pub bucket: String,
    binaries: Binaries,
}

/// The operator and worker executables (`env!("CARGO_BIN_EXE_…")` of the test).
#[derive(Clone, Copy)]
pub struct Binaries {
    pub operator: &'static str,
    pub worker: &'static str,
}

/// The credentials Secret the manifests name.
pub const SECRET: &str = "s3";

impl World {
    pub async fn new(binaries: Binaries) -> World {
        let stack = StackEnv::load();
        let dir = tempfile::tempdir().expect("tempdir");
        let kube = Kube::start(&stack, dir.path());
        let namespace = unique("e2e").to_lowercase().replace('_', "-");
        if !kube.emulated {
            // (The emulator takes any namespace; kubectl would send it a
            // protobuf Namespace, which it does not speak.)
            kube.ok(&["create", "namespace", &namespace]);
        }
        let database_url = fresh_database(&stack).await;
        let target = stack
            .s3_targets()
            .into_iter()
            .find(|t| t.name == "garage")
            .expect("garage in the stack");
        let s3 = target.client();
        let source_bucket = unique("e2e-src").to_lowercase().replace('_', "-");
        let bucket = unique("e2e-dst").to_lowercase().replace('_', "-");
        for b in [&source_bucket, &bucket] {
            s3.create_bucket()
                .bucket(b)
                .send()
                .await
                .expect("create bucket");
        }
        // The credentials Secret the manifests name, in the test's
        // namespace: operator and workers read it through the API.
        let out = kube.apply(dir.path(), &target.secret_manifest(&namespace, SECRET));
        assert!(
            out.status.success(),
            "create Secret {namespace}/{SECRET}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        World {
            prefix: unique("e2e"),
            stack,
            dir,
            kube,
            namespace,
            database_url,
            target,
            s3,
            source_bucket,
            bucket,
            binaries,
        }
    }

    fn spawn(&self, exe: &str, name: &str, args: Vec<String>) -> Proc {
        let log = self.dir.path().join(format!("{}.log", unique(name)));
        let port = free_port();
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(exe)
            .args(&args)
            .arg(format!("--metrics-addr=127.0.0.1:{port}"))
            .env("KUBECONFIG", self.kube.kubeconfig())
            .env("RUST_LOG", "info,kube=warn,refinery_core=warn")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("start {exe}: {e}"));
        Proc {
            child,
            log,
            metrics: format!("127.0.0.1:{port}"),
            grpc: None,
        }
    }

    fn common_args(&self) -> Vec<String> {
        vec![
            format!("--database-url={}", self.database_url),
            format!("--nats-url={}", self.stack.nats_url()),
            format!("--queue-prefix={}", self.prefix),
            "--lock-heartbeat=500ms".into(),
            // The stack and the test sources listen on loopback.
            "--allow-private-networks=true".into(),
        ]
    }

    /// Starts an operator replica watching this test's namespace.
    pub fn operator(&self) -> Proc {
        self.operator_with(&[])
    }

    /// An operator replica with `extra` flags.
    pub fn operator_with(&self, extra: &[String]) -> Proc {
        let mut args = self.common_args();
        args.extend([
            format!("--namespace={}", self.namespace),
            format!("--leader-lock={}", self.prefix),
            "--resync=5s".into(),
        ]);
        args.extend(extra.iter().cloned());
        self.spawn(self.binaries.operator, "operator", args)
    }

    /// Starts a worker with `capacity` slots (and the built-in embedding
    /// model, where the stack has it).
    pub fn worker(&self, capacity: usize) -> Proc {
        self.worker_with(capacity, &[])
    }

    /// A worker with `extra` flags.
    pub fn worker_with(&self, capacity: usize, extra: &[String]) -> Proc {
        let grpc = format!("127.0.0.1:{}", free_port());
        let mut args = self.common_args();
        args.extend([
            format!("--grpc-addr={grpc}"),
            format!("--capacity={capacity}"),
            "--ack-wait=4s".into(),
            "--drain-timeout=1s".into(),
        ]);
        if let Some(dir) = self.stack.try_get("STOWAGE_EMBEDDING_MODEL_DIR") {
            args.push(format!("--embedding-model-dir={dir}"));
        }
        // The built-in model on ONNX Runtime, as the image runs it, when the stack has it.
        if let (Some(dir), Some(runtime)) = (
            self.stack.try_get("STOWAGE_ONNX_MODEL_DIR"),
            self.stack.try_get("STOWAGE_ONNX_RUNTIME"),
        ) {
            args.push(format!("--embedding-onnx-dir={dir}"));
            args.push(format!("--onnx-runtime-path={runtime}"));
        }
        args.extend(extra.iter().cloned());
        let mut proc = self.spawn(self.binaries.worker, "worker", args);
        proc.grpc = Some(grpc);
        proc
    }

    /// An UploadJob `name` copying `source_bucket/<prefix>` to `bucket/<name>/`.
    pub fn s3_job(&self, name: &str, prefix: &str) -> String {
        format!(
            r#"apiVersion: stowage.dev/v1alpha1
kind: UploadJob
metadata: {{name: {name}, namespace: {ns}}}
spec:
  source:
    s3:
      bucket: {src}
      prefix: {prefix}
      endpoint: {endpoint}
      region: {region}
      credentialsSecretRef: {{name: s3}}
      allowPrivateNetworks: true
  destination:
    bucket: {dst}
    keyPrefix: {name}/
    endpoint: {endpoint}
    region: {region}
    credentialsSecretRef: {{name: s3}}
    allowPrivateNetworks: true
  partSizeBytes: 5242880
  retry: {{maxAttempts: 3, backoff: {{baseMillis: 200, maxMillis: 1000}}}}
"#,
            ns = self.namespace,
            src = self.source_bucket,
            dst = self.bucket,
            endpoint = self.target.endpoint,
            region = self.target.region,
        )
    }

    /// The `destination` (and S3 source) endpoint fields of a manifest.
    pub fn endpoint_yaml(&self) -> String {
        format!(
            "endpoint: {}\n      region: {}\n      credentialsSecretRef: {{name: {SECRET}}}\n      allowPrivateNetworks: true",
            self.target.endpoint, self.target.region
        )
    }

    pub async fn put(&self, bucket: &str, key: &str, data: Bytes) {
        self.s3
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(data.into())
            .send()
            .await
            .expect("put object");
    }

    /// SHA-256 of an object's bytes as read back, or None if it is missing.
    pub async fn sha256(&self, bucket: &str, key: &str) -> Option<String> {
        let out = self
            .s3
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .ok()?;
        let bytes = out.body.collect().await.ok()?.into_bytes();
        Some(hex::encode(Sha256::digest(&bytes)))
    }

    /// Multipart uploads open in `bucket`.
    pub async fn open_uploads(&self, bucket: &str) -> usize {
        self.s3
            .list_multipart_uploads()
            .bucket(bucket)
            .send()
            .await
            .expect("list multipart uploads")
            .uploads()
            .len()
    }

    /// Rows of upload jobs for `name` in this test's namespace.
    pub async fn job_rows(&self, name: &str) -> i64 {
        let (client, conn) = tokio_postgres::connect(&self.database_url, tokio_postgres::NoTls)
            .await
            .expect("db");
        tokio::spawn(conn);
        client
            .query_one(
                "SELECT count(*) FROM upload_jobs WHERE namespace = $1 AND name = $2",
                &[&self.namespace, &name],
            )
            .await
            .expect("count")
            .get(0)
    }

    /// Applies a manifest; fails the test if the API refuses it.
    pub fn apply_ok(&self, manifest: &str) {
        let out = self.kube.apply(self.dir.path(), manifest);
        assert!(
            out.status.success(),
            "kubectl apply refused the manifest: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A field of a resource, through kubectl's JSONPath.
    pub fn field(&self, resource: &str, jsonpath: &str) -> String {
        self.kube.ok(&[
            "get",
            resource,
            "-n",
            &self.namespace,
            "-o",
            &format!("jsonpath={jsonpath}"),
        ])
    }

    /// `kubectl wait` for a condition (the operator's status drives it).
    pub fn wait_for(&self, resource: &str, condition: &str, timeout: &str) {
        let out = self.kube.run(&[
            "wait",
            resource,
            "-n",
            &self.namespace,
            &format!("--for=condition={condition}"),
            &format!("--timeout={timeout}"),
        ]);
        assert!(
            out.status.success(),
            "kubectl wait {resource} --for=condition={condition}: {}\nstatus: {}",
            String::from_utf8_lossy(&out.stderr),
            self.field(resource, "{.status}"),
        );
    }
}

pub use stowage_common::testing::eventually;

/// An HTTP server on 127.0.0.1 that serves files slowly (`bytes_per_sec`),
/// so that uploads are still running when a test deletes or kills something.
/// Files can be added while it runs (a source that comes back).
pub struct SlowFiles {
    pub base: String,
    files: Files,
    task: tokio::task::JoinHandle<()>,
}

type Files = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Bytes>>>;

impl SlowFiles {
    pub async fn start(files: Vec<(String, Bytes)>, bytes_per_sec: usize) -> SlowFiles {
        use axum::extract::{Path as UrlPath, State};
        use axum::http::StatusCode;
        use axum::response::IntoResponse;
        async fn serve(
            State((files, rate)): State<(Files, usize)>,
            UrlPath(name): UrlPath<String>,
        ) -> axum::response::Response {
            let Some(data) = files.lock().ok().and_then(|f| f.get(&name).cloned()) else {
                return StatusCode::NOT_FOUND.into_response();
            };
            let len = data.len();
            let chunk = (rate / 20).max(1);
            let stream = futures::stream::unfold(0usize, move |at| {
                let data = data.clone();
                async move {
                    if at >= data.len() {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let end = (at + chunk).min(data.len());
                    Some((Ok::<_, std::io::Error>(data.slice(at..end)), end))
                }
            });
            (
                [(axum::http::header::CONTENT_LENGTH, len.to_string())],
                axum::body::Body::from_stream(stream),
            )
                .into_response()
        }
        let files: Files = std::sync::Arc::new(std::sync::Mutex::new(files.into_iter().collect()));
        let app = axum::Router::new()
            .route("/{name}", axum::routing::get(serve))
            .with_state((std::sync::Arc::clone(&files), bytes_per_sec));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        SlowFiles {
            base: format!("http://{addr}"),
            files,
            task,
        }
    }

    /// Serves `name` from now on.
    pub fn put(&self, name: &str, data: Bytes) {
        if let Ok(mut f) = self.files.lock() {
            f.insert(name.to_string(), data);
        }
    }
}

impl Drop for SlowFiles {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Drop for World {
    /// A failed test keeps its logs (operator, workers, emulator, manifests).
    fn drop(&mut self) {
        if std::thread::panicking() {
            let keep = std::env::temp_dir().join(format!("stowage-e2e-{}", self.namespace));
            if std::fs::rename(self.dir.path(), &keep).is_ok() {
                eprintln!("logs of the failed test kept in {}", keep.display());
            }
        }
    }
}
