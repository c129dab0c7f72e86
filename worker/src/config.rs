//! The worker's configuration: flags, each with an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::index::embed::{BuiltinSource, OnnxOptions, Precision};
use clap::Parser;
use stowage_common::config::{DatabaseArgs, NatsArgs, TelemetryArgs};

/// Stowage worker: pulls upload tasks from NATS JetStream and copies files
/// into S3-compatible storage as verified, resumable multipart uploads, one
/// writer per object key (PostgreSQL advisory locks). Serves gRPC (status,
/// health, reflection) and Prometheus metrics.
#[derive(Parser, Clone, Debug)]
#[command(name = "stowage-worker", version)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    #[command(flatten)]
    pub nats: NatsArgs,

    #[command(flatten)]
    pub telemetry: TelemetryArgs,

    /// Address of the gRPC server (WorkerStatus, health, reflection).
    #[arg(long, env = "STOWAGE_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,

    /// Certificate (PEM, leaf first) of the gRPC server: with
    /// --grpc-tls-key, the whole gRPC port (health included) speaks TLS only.
    /// Both files are read again when they change: new connections get the
    /// new certificate without a restart.
    #[arg(long, env = "STOWAGE_GRPC_TLS_CERT", requires = "grpc_tls_key")]
    pub grpc_tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --grpc-tls-cert.
    #[arg(long, env = "STOWAGE_GRPC_TLS_KEY", requires = "grpc_tls_cert")]
    pub grpc_tls_key: Option<PathBuf>,

    /// CA (PEM) of client certificates: when set, every gRPC client must
    /// present a certificate it signed. Read at start-up.
    #[arg(long, env = "STOWAGE_GRPC_TLS_CLIENT_CA", requires = "grpc_tls_cert")]
    pub grpc_tls_client_ca: Option<PathBuf>,

    /// How gRPC callers are checked: `kubernetes` — every call but health
    /// needs a bearer token (audience `stowage`), authenticated with a
    /// TokenReview and authorized with a SubjectAccessReview; `none` — no
    /// checks at all (demos only; said loudly at start-up).
    #[arg(long, env = "STOWAGE_AUTH_MODE", value_enum, default_value_t = crate::auth::AuthMode::Kubernetes)]
    pub auth_mode: crate::auth::AuthMode,

    /// How long an authentication or authorization decision is reused (a
    /// revoked token is refused after at most this long).
    #[arg(long, env = "STOWAGE_AUTH_CACHE_TTL", value_parser = stowage_common::config::parse_duration, default_value = "10s")]
    pub auth_cache_ttl: Duration,

    /// Tasks this worker runs at once (each file upload also runs its own
    /// parts in parallel, up to the job's `concurrency`).
    #[arg(long, env = "STOWAGE_WORKER_CAPACITY", default_value_t = 4)]
    pub capacity: usize,

    /// Name of this worker in logs and status; defaults to hostname-pid.
    #[arg(long, env = "STOWAGE_WORKER_ID")]
    pub worker_id: Option<String>,

    /// Redelivery deadline of a task without progress acks.
    #[arg(long, env = "STOWAGE_ACK_WAIT", value_parser = stowage_common::config::parse_duration, default_value = "30s")]
    pub ack_wait: Duration,

    /// On SIGTERM, how long in-flight tasks may run before they are stopped
    /// and handed back (NAK) to resume elsewhere from their recorded parts.
    #[arg(long, env = "STOWAGE_DRAIN_TIMEOUT", value_parser = stowage_common::config::parse_duration, default_value = "20s")]
    pub drain_timeout: Duration,

    /// Where the Secrets resources name are read: a resource's Secret is
    /// always `<its namespace>/<name>`.
    #[command(flatten)]
    pub credentials: stowage_common::secrets::CredentialsArgs,

    /// Where the endpoints of resources may go.
    #[command(flatten)]
    pub endpoints: stowage_common::storage::EndpointArgs,

    /// Folder of the built-in embedding model (all-MiniLM-L6-v2:
    /// `config.json`, `tokenizer.json`, `model.safetensors`; `scripts/stack
    /// install model` unpacks it). Loaded on first use; without it,
    /// collections on the `builtin` provider fail with that reason.
    #[arg(long, env = "STOWAGE_EMBEDDING_MODEL_DIR")]
    pub embedding_model_dir: Option<PathBuf>,

    /// Folder of the built-in model as ONNX graphs (`model.onnx`,
    /// `model_int8.onnx`, `tokenizer.json`; `scripts/stack install onnx`
    /// builds it, the worker image has it). When set, the built-in model
    /// runs on ONNX Runtime (about 4× faster than candle) and needs
    /// --onnx-runtime-path; otherwise it runs on candle from
    /// --embedding-model-dir.
    #[arg(long, env = "STOWAGE_EMBEDDING_ONNX_DIR", value_parser = any_path)]
    pub embedding_onnx_dir: Option<PathBuf>,

    /// ONNX Runtime's shared library (`libonnxruntime.so.<version>`, from the
    /// PyPI `onnxruntime` wheel), opened at run time. Used only with
    /// --embedding-onnx-dir.
    #[arg(long, env = "ORT_DYLIB_PATH", value_parser = any_path)]
    pub onnx_runtime_path: Option<PathBuf>,

    /// Which ONNX graph runs: `fp32` (the model's own weights, the reference
    /// vectors) or `int8` (about twice as fast, vectors slightly different:
    /// see bench/README.md; all workers of an installation must agree).
    #[arg(
        long,
        env = "STOWAGE_EMBEDDING_PRECISION",
        value_enum,
        default_value = "fp32"
    )]
    pub embedding_precision: Precision,

    /// Threads of the ONNX Runtime session; 0: one per CPU the worker may
    /// use (its affinity mask and cgroup CPU quota, i.e. the pod's CPU limit).
    #[arg(long, env = "STOWAGE_EMBEDDING_THREADS", default_value_t = 0,
          value_parser = clap::value_parser!(u16).range(0..=1024))]
    pub embedding_threads: u16,

    /// Limits of the Ingest API (streamed uploads).
    #[command(flatten)]
    pub ingest: IngestArgs,

    /// How often the sweeper looks for orphaned multipart uploads.
    #[arg(long, env = "STOWAGE_SWEEP_INTERVAL", value_parser = stowage_common::config::parse_duration, default_value = "10m")]
    pub sweep_interval: Duration,

    /// Multipart uploads older than this that no live item owns are aborted.
    #[arg(long, env = "STOWAGE_ORPHAN_UPLOAD_AGE", value_parser = stowage_common::config::parse_duration, default_value = "24h")]
    pub orphan_upload_age: Duration,

    /// How a multipart object's SHA-256 reaches its metadata (`sha256`).
    /// `always`: the source is hashed in a first pass and the hash goes into
    /// CreateMultipartUpload (checked against the upload's own hash before
    /// completing); costs a second read of the source, which is cheap next
    /// to the upload. `copy`: hashed while uploading, written afterwards by
    /// a server-side self-copy (one read of the source; stores that keep
    /// per-object checksums re-read the whole object; objects up to 5 GiB).
    /// `known`: metadata only where the hash is known up front (single-PUT
    /// objects, dedup jobs); PostgreSQL always has it.
    #[arg(long, env = "STOWAGE_SHA256_METADATA", value_enum, default_value_t = Sha256Metadata::Always)]
    pub sha256_metadata: Sha256Metadata,

    /// Attempts of a planning or sync task (document tasks get twice this)
    /// before it is dead-lettered with its last error. Counted before each
    /// run, so a task that crashes its worker also comes to an end; waits
    /// (a busy key, a run still indexing) are not attempts. Upload tasks
    /// are bounded by their job's `retry.maxAttempts` instead.
    #[arg(long, env = "STOWAGE_TASK_ATTEMPTS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub task_attempts: u32,

    /// The slowest a source may send, in bytes per second, measured over
    /// 30 s spent waiting on it: a stalled or trickling source fails with
    /// that reason instead of holding a worker slot. 0 turns it off.
    #[arg(long, env = "STOWAGE_SOURCE_MIN_RATE", default_value_t = 1024)]
    pub source_min_rate: u64,

    /// Lock session heartbeat: a lost database session is noticed within
    /// about twice this.
    #[arg(long, env = "STOWAGE_LOCK_HEARTBEAT", value_parser = stowage_common::config::parse_duration, default_value = "2s")]
    pub lock_heartbeat: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Sha256Metadata {
    Always,
    Copy,
    Known,
}

/// Any path, the empty one included: clap's own path parser refuses it, and
/// a chart gives it to switch a setting of the image off
/// ([`WorkerArgs::builtin_source`] reads it as unset).
fn any_path(s: &str) -> Result<PathBuf, std::convert::Infallible> {
    Ok(PathBuf::from(s))
}

impl WorkerArgs {
    /// Where the built-in model comes from: ONNX Runtime when given the ONNX
    /// folder, candle when given only the model folder, none without either.
    /// Refuses half an ONNX configuration rather than quietly falling back.
    pub fn builtin_source(&self) -> Result<Option<BuiltinSource>, String> {
        // An empty value (an unset variable in a manifest) is no value.
        let given = |p: &Option<PathBuf>| p.clone().filter(|p| !p.as_os_str().is_empty());
        match (
            given(&self.embedding_onnx_dir),
            given(&self.onnx_runtime_path),
        ) {
            (Some(dir), Some(runtime)) => Ok(Some(BuiltinSource::Onnx(OnnxOptions {
                runtime,
                dir,
                precision: self.embedding_precision,
                threads: usize::from(self.embedding_threads),
            }))),
            (Some(_), None) => Err(
                "--embedding-onnx-dir needs ONNX Runtime's library: --onnx-runtime-path \
                 (ORT_DYLIB_PATH), e.g. libonnxruntime.so.1.32.0 from the PyPI onnxruntime wheel"
                    .into(),
            ),
            (None, _) if self.embedding_precision != Precision::Fp32 => Err(format!(
                "--embedding-precision {} needs the ONNX graphs (--embedding-onnx-dir); \
                 candle computes in fp32",
                self.embedding_precision.as_str()
            )),
            (None, _) => Ok(self.embedding_model_dir.clone().map(BuiltinSource::Candle)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> WorkerArgs {
        let mut all = vec![
            "stowage-worker",
            "--database-url=postgres://x@127.0.0.1/x",
            "--nats-url=nats://127.0.0.1:4222",
        ];
        all.extend_from_slice(extra);
        WorkerArgs::try_parse_from(all).expect("flags parse")
    }

    #[test]
    fn the_builtin_model_runs_on_onnx_runtime_when_given_its_graphs() {
        let a = args(&[
            "--embedding-model-dir=/m",
            "--embedding-onnx-dir=/o",
            "--onnx-runtime-path=/lib/libonnxruntime.so",
            "--embedding-precision=int8",
            "--embedding-threads=3",
        ]);
        assert_eq!(
            a.builtin_source(),
            Ok(Some(BuiltinSource::Onnx(OnnxOptions {
                runtime: "/lib/libonnxruntime.so".into(),
                dir: "/o".into(),
                precision: Precision::Int8,
                threads: 3,
            })))
        );
        let a = args(&["--embedding-model-dir=/m", "--embedding-onnx-dir="]);
        assert_eq!(
            a.builtin_source(),
            Ok(Some(BuiltinSource::Candle("/m".into())))
        );
    }

    #[test]
    fn half_an_onnx_configuration_is_refused() {
        // Empty, as an unset variable in a manifest gives.
        let no_runtime = args(&["--embedding-onnx-dir=/o", "--onnx-runtime-path="]);
        assert!(
            no_runtime
                .builtin_source()
                .is_err_and(|e| e.contains("--onnx-runtime-path"))
        );
        let int8 = args(&[
            "--embedding-model-dir=/m",
            "--embedding-onnx-dir=",
            "--embedding-precision=int8",
        ]);
        assert!(
            int8.builtin_source()
                .is_err_and(|e| e.contains("--embedding-onnx-dir"))
        );
        assert!(
            WorkerArgs::try_parse_from([
                "stowage-worker",
                "--database-url=x",
                "--nats-url=y",
                "--embedding-threads=5000"
            ])
            .is_err()
        );
    }
}

/// Limits and settings of `Ingest.Upload`.
#[derive(clap::Args, Clone, Debug)]
pub struct IngestArgs {
    /// Largest object a client may stream (bytes; at most 5 TiB, S3's limit).
    #[arg(long = "ingest-max-object-bytes", env = "STOWAGE_INGEST_MAX_OBJECT_BYTES",
          default_value_t = 100 << 30,
          value_parser = clap::value_parser!(u64).range(1..=(5u64 << 40)))]
    pub max_object_bytes: u64,

    /// Largest data message of a stream (bytes).
    #[arg(long = "ingest-max-message-bytes", env = "STOWAGE_INGEST_MAX_MESSAGE_BYTES",
          default_value_t = 4 << 20,
          value_parser = clap::value_parser!(u32).range(1024..=(64 << 20)))]
    pub max_message_bytes: u32,

    /// Streams one worker takes at once; one more is RESOURCE_EXHAUSTED.
    #[arg(long = "ingest-max-streams", env = "STOWAGE_INGEST_MAX_STREAMS", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_streams: u32,

    /// A stream that sends nothing for this long is ended
    /// (DEADLINE_EXCEEDED); its stored parts are kept for a resume.
    #[arg(long = "ingest-idle-timeout", env = "STOWAGE_INGEST_IDLE_TIMEOUT",
          value_parser = stowage_common::config::parse_duration, default_value = "60s")]
    pub idle_timeout: Duration,

    /// Part size of streamed objects (raised for objects that would need
    /// more than 10,000 parts).
    #[arg(long = "ingest-part-size", env = "STOWAGE_INGEST_PART_SIZE", default_value_t = 16 << 20,
          value_parser = clap::value_parser!(u64).range(stowage_common::spec::MIN_PART_SIZE..=stowage_common::spec::MAX_PART_SIZE))]
    pub part_size: u64,

    /// Parts of one streamed object sent to the store at once (each holds
    /// a part in memory).
    #[arg(long = "ingest-concurrency", env = "STOWAGE_INGEST_CONCURRENCY", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub concurrency: u32,

    /// An interrupted request nobody resumes for this long is given up:
    /// its multipart upload is aborted and the request failed.
    #[arg(long = "ingest-resume-window", env = "STOWAGE_INGEST_RESUME_WINDOW",
          value_parser = stowage_common::config::parse_duration, default_value = "24h")]
    pub resume_window: Duration,
}
