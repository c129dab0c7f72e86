//! The Stowage operator.
//!
//! - [`crd`]: the UploadJob and IndexCollection custom resources.
//! - [`controllers`]: their reconcilers (finalizers, registration, tasks).
//! - [`status`]: status computation as pure functions.
//! - [`leader`]: leader election on a PostgreSQL advisory lock.
//! - [`triggers`]: worker progress events turned into prompt reconciles.
//! - [`watch_uploads`]: landed objects turned into debounced document tasks.
//! - [`autoscale`]: the worker Deployment's replicas from the task backlog.

pub mod autoscale;
pub mod config;
pub mod controllers;
pub mod crd;
pub mod leader;
pub mod metrics;
pub mod status;
pub mod triggers;
pub mod watch_uploads;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;
use kube::runtime::events::{Recorder, Reporter};
use prometheus_client::registry::Registry;
use stowage_common::db;
use stowage_common::locks::LockMetrics;
use stowage_common::queue::Queue;
use stowage_common::secrets::{SECRET_TTL, SecretSource, Secrets};
use stowage_common::storage::S3Clients;
use stowage_common::telemetry::{Readiness, serve_http};
use tokio::sync::watch;
use tracing::info;

use crate::config::OperatorArgs;
use crate::controllers::Context;
use crate::metrics::Metrics;

/// Connects to PostgreSQL, NATS and the Kubernetes API, then campaigns for
/// leadership and reconciles while leading, until `shutdown` resolves.
pub async fn run(args: OperatorArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    // Both rustls back ends are linked (kube, AWS SDK); TLS to the API
    // server needs one chosen for the process. Already chosen is fine.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut registry = Registry::default();
    let lock_metrics = LockMetrics::register(&mut registry);
    let metrics = Metrics::register(&mut registry);
    let (pool, locks) = db::connect(&args.database, lock_metrics, args.lock_heartbeat).await?;
    let queue = Queue::connect(&args.nats.settings()).await?;
    queue.ensure_streams().await?;
    let mut kube_config = kube::Config::infer()
        .await
        .context("finding the Kubernetes API (in-cluster or KUBECONFIG)")?;
    // Says who calls in the API server's audit log (and the e2e suite's).
    kube_config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static(concat!("stowage-operator/", env!("CARGO_PKG_VERSION"))),
    ));
    let client = kube::Client::try_from(kube_config)
        .context("connecting to the Kubernetes API (in-cluster or KUBECONFIG)")?;
    let instance = args.instance.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "operator".into());
        format!("{}-{}", host.trim(), std::process::id())
    });
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "stowage-operator".into(),
            instance: Some(instance.clone()),
        },
    );
    let secrets = Secrets::new(
        match &args.credentials.credentials_dir {
            Some(dir) => SecretSource::Layered(vec![
                SecretSource::Directory(dir.clone()),
                SecretSource::Kubernetes(client.clone()),
            ]),
            None => SecretSource::Kubernetes(client.clone()),
        },
        SECRET_TTL,
    );
    let ctx = Arc::new(Context {
        client,
        db: pool,
        queue,
        locks: locks.clone(),
        s3: S3Clients::new(
            secrets,
            args.endpoints
                .policy(args.credentials.allow_worker_credentials)
                .map_err(anyhow::Error::msg)?,
        ),
        allow_private_networks: args.endpoints.allow_private_networks,
        allow_worker_credentials: args.credentials.allow_worker_credentials,
        recorder,
        metrics: metrics.clone(),
        resync: args.resync,
        debounce: watch_uploads::Debounce {
            quiet: args.index_debounce,
            max_delay: args.index_max_delay,
        },
        concurrency: controllers::concurrency_for_pool(args.database.database_pool_size),
        autoscale: args.autoscale.settings(),
        failures: Default::default(),
    });
    let (stop, stopped) = watch::channel(false);
    let ready = Readiness::default();
    let http_addr = serve_http(
        args.telemetry.metrics_addr,
        Arc::new(registry),
        ready.clone(),
        stopped,
    )
    .await?;
    ready.set(true);
    let namespaces: Vec<String> = args
        .watch_namespaces
        .iter()
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .collect();
    info!(
        %instance,
        %http_addr,
        namespaces = if namespaces.is_empty() { "(all)".to_string() } else { namespaces.join(",") },
        "operator started"
    );
    leader::run(
        &locks,
        &args.leader_lock,
        &metrics,
        || controllers::run(Arc::clone(&ctx), namespaces.clone()),
        shutdown,
    )
    .await;
    let _ = stop.send(true);
    info!("operator stopped");
    Ok(())
}
