//! The Stowage worker: pulls tasks from JetStream and runs them.
//!
//! - [`tasks`]: the pull loop, acks, retries, dead letters, draining.
//! - [`outcome`]: what becomes of a task, as every kind reports it.
//! - [`upload`]: where uploads happen (sources, multipart transfer, policies).
//! - [`index`]: IndexCollection sync runs.
//! - [`sweeper`]: aborts orphaned multipart uploads.
//! - [`ingest`]: the Ingest gRPC service (clients stream objects in).
//! - [`grpc`]: the gRPC server: WorkerStatus, Search, Ingest, health, reflection.
//! - [`tls`]: the gRPC server's TLS (certificate reloaded when its files change).

pub mod auth;
pub mod config;
pub mod grpc;
pub mod index;
pub mod ingest;
pub mod metrics;
pub mod outcome;
pub mod sweeper;
pub mod tasks;
pub mod tls;
pub mod upload;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context as _;
use prometheus_client::registry::Registry;
use stowage_common::db::{self, Pool};
use stowage_common::locks::{LockManager, LockMetrics};
use stowage_common::queue::{ConsumerSettings, Queue};
use stowage_common::telemetry::{Readiness, serve_http};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::WorkerArgs;
use crate::metrics::WorkerMetrics;
use crate::tasks::InFlight;
use crate::upload::multipart::PartHook;
use stowage_common::secrets::{SECRET_TTL, SecretSource, Secrets};
use stowage_common::storage::S3Clients;

/// Everything a task needs, shared by all of them.
pub struct Context {
    pub db: Pool,
    pub locks: LockManager,
    pub queue: Queue,
    pub s3: S3Clients,
    /// Where the built-in embedding model comes from, and the model once
    /// loaded.
    pub builtin_source: Option<index::embed::BuiltinSource>,
    pub builtin_model: tokio::sync::OnceCell<Arc<index::embed::Batcher>>,
    pub http: upload::net::HttpClients,
    pub metrics: WorkerMetrics,
    pub hook: Option<PartHook>,
    pub in_flight: InFlight,
    pub worker_id: String,
    pub capacity: usize,
    pub ack_wait: Duration,
    pub draining: AtomicBool,
    pub sha256_metadata: config::Sha256Metadata,
    /// Who may call the gRPC API.
    pub auth: auth::Auth,
    /// May resources reach private networks where they ask to?
    pub allow_private_networks: bool,
    /// Limits of the Ingest API.
    pub ingest: config::IngestArgs,
    /// Attempts of planning, sync and document tasks (`--task-attempts`).
    pub task_attempts: u32,
    /// The slowest a source may send (uploads and documents).
    pub min_rate: upload::source::MinRate,
    /// Upload jobs by id, so a file does not re-read (or re-validate) its
    /// job's whole spec.
    pub jobs: std::sync::Mutex<std::collections::HashMap<uuid::Uuid, Arc<upload::item::CachedJob>>>,
}

/// The Kubernetes API (in-cluster or KUBECONFIG), if there is one: where
/// Secrets are read without `--credentials-dir`, and callers checked.
async fn kube_client() -> Result<kube::Client, String> {
    let mut config = kube::Config::infer()
        .await
        .map_err(|e| stowage_common::errors::chain(&e))?;
    // Says who calls in the API server's audit log (and the e2e suite's).
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static(concat!("stowage-worker/", env!("CARGO_PKG_VERSION"))),
    ));
    kube::Client::try_from(config).map_err(|e| stowage_common::errors::chain(&e))
}

/// Where this worker reads Secrets: the directory it was given, then the
/// Kubernetes API.
fn secret_source(args: &WorkerArgs, kube: &Result<kube::Client, String>) -> SecretSource {
    match (&args.credentials.credentials_dir, kube) {
        (Some(dir), Ok(client)) => SecretSource::Layered(vec![
            SecretSource::Directory(dir.clone()),
            SecretSource::Kubernetes(client.clone()),
        ]),
        (Some(dir), Err(_)) => SecretSource::Directory(dir.clone()),
        (None, Ok(client)) => SecretSource::Kubernetes(client.clone()),
        (None, Err(e)) => {
            let why = format!("this worker has no --credentials-dir and no Kubernetes API ({e})");
            warn!("{why}: resources that name a Secret will fail");
            SecretSource::Unconfigured(why)
        }
    }
}

/// A started worker.
pub struct Worker {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub context: Arc<Context>,
    stop: watch::Sender<bool>,
    tasks: tokio::task::JoinHandle<anyhow::Result<()>>,
    grpc: tokio::task::JoinHandle<()>,
}

/// Connects to PostgreSQL and NATS, checks advisory locks, migrates, and
/// starts the servers, the task loop and the sweeper.
pub async fn start(args: WorkerArgs, hook: Option<PartHook>) -> anyhow::Result<Worker> {
    let grpc_tls = tls::ServerTls::from_args(&args)?;
    let mut registry = Registry::default();
    let lock_metrics = LockMetrics::register(&mut registry);
    let metrics = WorkerMetrics::register(&mut registry);
    let (pool, locks) = db::connect(&args.database, lock_metrics, args.lock_heartbeat).await?;
    let queue = Queue::connect(&args.nats.settings()).await?;
    queue
        .ensure(&ConsumerSettings {
            ack_wait: args.ack_wait,
        })
        .await?;
    let worker_id = args.worker_id.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "worker".into());
        format!("{}-{}", host.trim(), std::process::id())
    });
    let kube = kube_client().await;
    let auth = match (args.auth_mode, &kube) {
        (auth::AuthMode::Kubernetes, Err(e)) => anyhow::bail!(
            "--auth-mode kubernetes checks gRPC callers with the Kubernetes API, which this \
             worker cannot reach ({e}); run it in a cluster or with KUBECONFIG, or use \
             --auth-mode none for a local demo"
        ),
        (mode, kube) => auth::Auth::new(mode, kube.as_ref().ok().cloned(), args.auth_cache_ttl),
    };
    let ctx = Arc::new(Context {
        db: pool,
        locks,
        queue,
        s3: S3Clients::new(
            Secrets::new(secret_source(&args, &kube), SECRET_TTL),
            args.endpoints
                .policy(args.credentials.allow_worker_credentials)
                .map_err(anyhow::Error::msg)?,
        ),
        allow_private_networks: args.endpoints.allow_private_networks,
        builtin_source: args.builtin_source().map_err(anyhow::Error::msg)?,
        builtin_model: Default::default(),
        http: upload::net::HttpClients::new(args.endpoints.allow_private_networks),
        metrics,
        hook,
        in_flight: InFlight::default(),
        worker_id,
        capacity: args.capacity.max(1),
        ack_wait: args.ack_wait,
        draining: AtomicBool::new(false),
        sha256_metadata: args.sha256_metadata,
        task_attempts: args.task_attempts,
        ingest: args.ingest.clone(),
        auth,
        min_rate: upload::source::MinRate {
            bytes_per_sec: args.source_min_rate,
            window: Duration::from_secs(30),
        },
        jobs: Default::default(),
    });
    let (stop, stopped) = watch::channel(false);
    let ready = Readiness::default();
    let http_addr = serve_http(
        args.telemetry.metrics_addr,
        Arc::new(registry),
        ready.clone(),
        stopped.clone(),
    )
    .await?;
    let (grpc_addr, grpc) =
        grpc::serve(args.grpc_addr, grpc_tls, Arc::clone(&ctx), stopped.clone()).await?;
    let tasks = tokio::spawn(tasks::run_loop(
        Arc::clone(&ctx),
        stopped.clone(),
        args.drain_timeout,
    ));
    tokio::spawn(heartbeat(Arc::clone(&ctx), stopped.clone()));
    tokio::spawn(sweep_periodically(
        Arc::clone(&ctx),
        args.sweep_interval,
        args.orphan_upload_age,
        stopped,
    ));
    ready.set(true);
    info!(worker = ctx.worker_id, %grpc_addr, %http_addr, capacity = ctx.capacity, "worker started");
    Ok(Worker {
        grpc_addr,
        http_addr,
        context: ctx,
        stop,
        tasks,
        grpc,
    })
}

impl Worker {
    /// Stops pulling, drains in-flight tasks and stops the servers.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        let result = self.tasks.await.context("task loop panicked")?;
        let _ = self.grpc.await;
        info!("worker stopped");
        result
    }
}

/// How often a worker says what it is doing.
const HEARTBEAT: Duration = Duration::from_secs(5);

/// Publishes the worker's load every [`HEARTBEAT`] (the operator's
/// autoscaler prefers idle pods when the fleet scales in), and once more
/// when it starts draining.
async fn heartbeat(ctx: Arc<Context>, mut stop: watch::Receiver<bool>) {
    use prost::Message as _;
    let subject = ctx.queue.topology().worker_subject(&ctx.worker_id);
    loop {
        let beat = stowage_proto::v1::WorkerHeartbeat {
            worker_id: ctx.worker_id.clone(),
            in_flight: u32::try_from(ctx.in_flight.snapshot().len()).unwrap_or(u32::MAX),
            capacity: u32::try_from(ctx.capacity).unwrap_or(u32::MAX),
            draining: *stop.borrow(),
        };
        if let Err(e) = ctx
            .queue
            .publish_event(subject.clone(), beat.encode_to_vec())
            .await
        {
            tracing::debug!(error = %e, "heartbeat not published");
        }
        if *stop.borrow() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(HEARTBEAT) => {}
            _ = stop.changed() => {}
        }
    }
}

async fn sweep_periodically(
    ctx: Arc<Context>,
    every: Duration,
    older_than: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if let Err(e) = sweeper::expire_ingest(&ctx, ctx.ingest.resume_window).await {
            warn!(error = %e, "expiring abandoned ingest requests failed");
        }
        match sweeper::sweep_once(&ctx, older_than).await {
            Ok(0) => {}
            Ok(n) => info!(aborted = n, "sweeper aborted orphaned multipart uploads"),
            Err(e) => warn!(error = %e, "sweeper pass failed"),
        }
    }
}

/// Runs a worker until `signal` resolves, then shuts it down gracefully.
pub async fn run(args: WorkerArgs, signal: impl Future<Output = ()>) -> anyhow::Result<()> {
    let worker = start(args, None).await?;
    signal.await;
    info!("shutdown requested");
    worker.shutdown().await
}

pub use stowage_common::telemetry::shutdown_signal;
