//! The controllers: UploadJob and IndexCollection, sharing one context, one
//! error type and one event recorder. [`run`] drives both until the future
//! is dropped (leadership lost) or the shutdown signal fires.

pub mod index_collection;
pub mod upload_job;

use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use stowage_common::db::Pool;
use stowage_common::jobs::JobError;
use stowage_common::locks::{LockError, LockManager};
use stowage_common::queue::{Queue, QueueError};
use stowage_common::state::StateError;
use stowage_common::storage::{CredentialsError, S3Clients};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::crd::{IndexCollection, UploadJob};
use crate::metrics::{ControllerLabel, ErrorLabels, Metrics, ReconcileLabels};

/// The field manager of every server-side apply the operator makes.
pub const MANAGER: &str = "stowage-operator";

/// Everything a reconcile needs.
pub struct Context {
    pub client: kube::Client,
    pub db: Pool,
    pub queue: Queue,
    pub locks: LockManager,
    pub s3: S3Clients,
    pub recorder: Recorder,
    pub metrics: Metrics,
    /// Safety-net resync of unfinished resources.
    pub resync: Duration,
    /// Object events → document tasks (collections with `watchUploads`).
    pub debounce: crate::watch_uploads::Debounce,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    State(#[from] StateError),
    #[error("queue: {0}")]
    Queue(#[from] QueueError),
    #[error("{0}")]
    Job(#[from] JobError),
    #[error("lock: {0}")]
    Lock(#[from] LockError),
    #[error("credentials: {0}")]
    Credentials(#[from] CredentialsError),
    #[error("aborting multipart upload {upload_id} of {bucket}/{key}: {message}")]
    Abort {
        bucket: String,
        key: String,
        upload_id: String,
        message: String,
    },
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("resource has no {0}")]
    Metadata(&'static str),
}

impl From<stowage_common::db::PoolError> for Error {
    fn from(e: stowage_common::db::PoolError) -> Self {
        Error::State(e.into())
    }
}

impl Error {
    /// The metrics label of the error's class.
    pub fn class(&self) -> &'static str {
        match self {
            Error::Kube(_) | Error::Metadata(_) => "kubernetes",
            Error::State(_) | Error::Lock(_) => "database",
            Error::Queue(_) => "queue",
            Error::Job(JobError::Queue(_)) => "queue",
            Error::Job(_) => "database",
            Error::Credentials(_) => "credentials",
            Error::Abort { .. } => "storage",
            Error::Finalizer(e) => match e.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.class(),
                _ => "kubernetes",
            },
        }
    }
}

/// Patches `.status` with server-side apply, unless it is unchanged (a patch
/// would only wake the controller up again).
pub async fn apply_status<K, S>(
    api: &Api<K>,
    obj: &K,
    current: Option<&S>,
    status: &S,
) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    S: Serialize + PartialEq,
{
    if current == Some(status) {
        return Ok(());
    }
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Publishes a Kubernetes event about `obj`; a failure is logged, not fatal.
pub async fn publish_event<K>(ctx: &Context, obj: &K, type_: EventType, reason: &str, note: String)
where
    K: Resource<DynamicType = ()>,
{
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: reason.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
        warn!(error = %e, reason, "could not publish a Kubernetes event");
    }
}

/// Times a reconcile and counts its result.
pub async fn measured<F, T>(ctx: &Context, controller: &'static str, f: F) -> Result<T, Error>
where
    F: std::future::Future<Output = Result<T, Error>>,
{
    let started = Instant::now();
    let result = f.await;
    ctx.metrics
        .duration
        .get_or_create(&ControllerLabel { controller })
        .observe(started.elapsed().as_secs_f64());
    ctx.metrics
        .reconciles
        .get_or_create(&ReconcileLabels {
            controller,
            result: if result.is_ok() { "ok" } else { "error" },
        })
        .inc();
    if let Err(e) = &result {
        ctx.metrics
            .errors
            .get_or_create(&ErrorLabels {
                controller,
                class: e.class(),
            })
            .inc();
    }
    result
}

/// After a failed reconcile: try again after a pause (the controller's
/// scheduler deduplicates, so this cannot storm).
fn error_policy<K: ResourceExt>(obj: Arc<K>, error: &Error, _ctx: Arc<Context>) -> Action {
    warn!(
        name = obj.name_any(),
        namespace = obj.namespace().unwrap_or_default(),
        error = %error,
        class = error.class(),
        "reconcile failed; retrying in 10s"
    );
    Action::requeue(Duration::from_secs(10))
}

/// Senders of reconcile requests that progress events turn into.
pub struct Triggers {
    pub uploads: mpsc::UnboundedSender<ObjectRef<UploadJob>>,
    pub collections: mpsc::UnboundedSender<ObjectRef<IndexCollection>>,
}

/// Runs both controllers until they end (shutdown) or the future is dropped.
pub async fn run(ctx: Arc<Context>, namespace: Option<String>) {
    let (uploads_tx, uploads_rx) = mpsc::unbounded_channel();
    let (collections_tx, collections_rx) = mpsc::unbounded_channel();
    let events = tokio::spawn(crate::triggers::forward(
        ctx.queue.clone(),
        Triggers {
            uploads: uploads_tx,
            collections: collections_tx,
        },
    ));
    let (jobs, collections): (Api<UploadJob>, Api<IndexCollection>) = match &namespace {
        Some(ns) => (
            Api::namespaced(ctx.client.clone(), ns),
            Api::namespaced(ctx.client.clone(), ns),
        ),
        None => (Api::all(ctx.client.clone()), Api::all(ctx.client.clone())),
    };
    let uploads = Controller::new(jobs, watcher::Config::default())
        .reconcile_on(receiver_stream(uploads_rx))
        .run(upload_job::reconcile, error_policy, Arc::clone(&ctx))
        .for_each(|_| futures::future::ready(()));
    let indexes = Controller::new(collections, watcher::Config::default())
        .reconcile_on(receiver_stream(collections_rx))
        .run(index_collection::reconcile, error_policy, Arc::clone(&ctx))
        .for_each(|_| futures::future::ready(()));
    let routing = tokio::spawn(crate::watch_uploads::run(
        ctx.db.clone(),
        ctx.queue.clone(),
        namespace.clone(),
        ctx.debounce,
    ));
    info!("controllers running");
    futures::join!(uploads, indexes);
    events.abort();
    routing.abort();
}

fn receiver_stream<T: Send + 'static>(
    mut rx: mpsc::UnboundedReceiver<T>,
) -> impl futures::Stream<Item = T> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
