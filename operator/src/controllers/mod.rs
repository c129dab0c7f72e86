//! The controllers: UploadJob and IndexCollection, sharing one context, one
//! error type and one event recorder. [`run`] drives both until the future
//! is dropped (leadership lost) or the shutdown signal fires.
//!
//! Every reconcile is the same pipeline, whose steps live in each
//! controller's module: **judge** the raw resource (pure: schema, types,
//! the spec's own rules) → **register** it in PostgreSQL → **drive** it
//! (suspend/resume, deadline, replay) → **observe** what the workers did →
//! **compute** the status (pure, in [`crate::status`]) → **publish** status
//! and events → the **next action** (pure). [`reconcile`] wraps it: the
//! finalizer, metrics, and a panic caught as a failed reconcile of that one
//! resource. A reconcile holds at most one pooled database connection at a
//! time, and the controllers run at most as many reconciles as the pool can
//! serve, so a burst of resources cannot starve one another.

pub mod index_collection;
pub mod upload_job;

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use stowage_common::db::Pool;
use stowage_common::jobs::JobError;
use stowage_common::locks::{LockError, LockManager};
use stowage_common::queue::{Queue, QueueError};
use stowage_common::state::StateError;
use stowage_common::storage::{ClientError, S3Clients};
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;
use tracing::{error, info, warn};

use crate::crd::condition::{self, Condition};
use crate::crd::{FINALIZER, IndexCollection, Judged, Raw, UploadJob};
use crate::metrics::{ControllerLabel, ErrorLabels, Metrics, ReconcileLabels};
use crate::triggers::Triggers;

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
    /// Reconciles each controller runs at once (see [`concurrency_for_pool`]).
    pub concurrency: u16,
    /// May resources use the processes' own S3 credentials?
    pub allow_worker_credentials: bool,
    /// May resources reach private networks where they ask to?
    pub allow_private_networks: bool,
    /// The worker fleet's autoscaling, when the operator does it.
    pub autoscale: Option<crate::autoscale::Settings>,
    /// Consecutive failed reconciles per resource, for the backoff.
    pub failures: Failures,
}

impl Context {
    /// What resources may ask for here.
    pub fn allowed(&self) -> crate::crd::judge::Allowed {
        crate::crd::judge::Allowed {
            private_networks: self.allow_private_networks,
            worker_credentials: self.allow_worker_credentials,
        }
    }
}

/// How many reconciles each of the two controllers may run at once with a
/// pool of `pool_size` connections: every reconcile holds at most one, and
/// two are left for the object-event router and the odd extra caller.
pub fn concurrency_for_pool(pool_size: usize) -> u16 {
    u16::try_from((pool_size.saturating_sub(2) / 2).max(1)).unwrap_or(u16::MAX)
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
    #[error("S3 client: {0}")]
    Storage(#[from] ClientError),
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
    #[error("internal error (a bug; please report it): {0}")]
    Panic(String),
}

impl From<stowage_common::db::PoolError> for Error {
    fn from(e: stowage_common::db::PoolError) -> Self {
        Error::State(e.into())
    }
}

/// What [`error_policy`] does about an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Category {
    /// A service was unavailable or busy: try again with a growing backoff.
    Transient,
    /// Nothing a retry can change (a resource without a uid): wait for the
    /// resource to change.
    Permanent,
    /// A panic: try again, slowly, and let a person look.
    Bug,
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
            Error::Storage(_) => "credentials",
            Error::Abort { .. } => "storage",
            Error::Panic(_) => "panic",
            Error::Finalizer(e) => match e.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.class(),
                _ => "kubernetes",
            },
        }
    }

    pub fn category(&self) -> Category {
        match self {
            Error::Metadata(_) => Category::Permanent,
            Error::Panic(_) => Category::Bug,
            Error::Finalizer(e) => match e.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.category(),
                _ => Category::Transient,
            },
            _ => Category::Transient,
        }
    }
}

/// A controller's part of the pipeline; [`reconcile`] runs it.
pub trait Reconciler: Judged + Clone + std::fmt::Debug + Send + Sync + 'static {
    /// Its name in metrics and logs.
    const CONTROLLER: &'static str;

    /// Everything but deletion.
    fn apply(
        raw: Arc<Raw<Self>>,
        ctx: &Context,
    ) -> impl Future<Output = Result<Action, Error>> + Send;

    /// Deletion, before the finalizer goes.
    fn cleanup(
        raw: Arc<Raw<Self>>,
        ctx: &Context,
    ) -> impl Future<Output = Result<Action, Error>> + Send;

    /// The conditions of a status (to report a failed reconcile).
    fn conditions(status: &mut Self::Status) -> &mut Vec<Condition>;
}

/// One reconcile of `raw`: the finalizer around the controller's steps,
/// timed and counted; a panic anywhere inside is caught and becomes a failed
/// reconcile of this resource (metric, event, `Ready=False,
/// reason=ReconcileError`) instead of the end of the process.
pub async fn reconcile<K: Reconciler>(
    raw: Arc<Raw<K>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let ns = raw.namespace().ok_or(Error::Metadata("namespace"))?;
    let api: Api<Raw<K>> = Api::namespaced(ctx.client.clone(), &ns);
    let started = Instant::now();
    let steps = finalizer(&api, FINALIZER, Arc::clone(&raw), |event| async {
        match event {
            Finalizer::Apply(raw) => K::apply(raw, &ctx).await,
            Finalizer::Cleanup(raw) => K::cleanup(raw, &ctx).await,
        }
    });
    let result = match AssertUnwindSafe(steps).catch_unwind().await {
        Ok(r) => r.map_err(|e| Error::Finalizer(Box::new(e))),
        Err(panic) => Err(Error::Panic(stowage_common::errors::panic_message(
            panic.as_ref(),
        ))),
    };
    let controller = K::CONTROLLER;
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
    let key = ObjectRef::from_obj(raw.as_ref()).to_string();
    match &result {
        Ok(_) => ctx.failures.reset(&key),
        Err(e) => {
            ctx.metrics
                .errors
                .get_or_create(&ErrorLabels {
                    controller,
                    class: e.class(),
                })
                .inc();
            if let Error::Panic(message) = e {
                report_panic::<K>(&raw, &api, &ctx, message).await;
            }
        }
    }
    result
}

/// A panicked reconcile, told where a person looks: the log, an event and
/// the Ready condition.
async fn report_panic<K: Reconciler>(
    raw: &Raw<K>,
    api: &Api<Raw<K>>,
    ctx: &Context,
    message: &str,
) {
    error!(
        name = raw.name_any(),
        namespace = raw.namespace().unwrap_or_default(),
        panic = message,
        "reconcile panicked; the operator carries on with the other resources"
    );
    let note = format!("internal error while reconciling (a bug; please report it): {message}");
    publish_event(ctx, raw, EventType::Warning, "ReconcileError", note.clone()).await;
    let prev = crate::crd::judge::previous_status(raw);
    let mut status = prev.clone().unwrap_or_default();
    let conditions = K::conditions(&mut status);
    let mut ready = vec![Condition::new("Ready", false, "ReconcileError", note)];
    condition::carry_over(conditions, &mut ready, raw.metadata.generation);
    conditions.retain(|c| c.type_ != "Ready");
    conditions.extend(ready);
    if let Err(e) = apply_status::<K, _>(api, &raw.name_any(), prev.as_ref(), &status).await {
        warn!(error = %e, "could not report the failed reconcile in the status");
    }
}

/// Consecutive failures per resource: the backoff of [`error_policy`].
#[derive(Default)]
pub struct Failures(Mutex<HashMap<String, u32>>);

impl Failures {
    /// Counts one more failure of `key`; returns the count.
    fn record(&self, key: &str) -> u32 {
        self.0
            .lock()
            .map(|mut m| {
                let n = m.entry(key.to_string()).or_insert(0);
                *n = n.saturating_add(1);
                *n
            })
            .unwrap_or(1)
    }

    fn reset(&self, key: &str) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(key);
        }
    }
}

/// Delay before retrying a transient failure for the `n`th time in a row:
/// 2 s doubling to 5 minutes.
pub fn retry_delay(n: u32) -> Duration {
    Duration::from_secs(2u64.saturating_pow(n.clamp(1, 9))).min(Duration::from_secs(300))
}

/// After a failed reconcile, by the error's category: a transient error is
/// retried with a growing backoff, a bug after five minutes, a permanent
/// one waits for the resource to change.
fn error_policy<K: Reconciler>(obj: Arc<Raw<K>>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = ObjectRef::from_obj(obj.as_ref()).to_string();
    let (action, wait) = match error.category() {
        Category::Transient => {
            let d = retry_delay(ctx.failures.record(&key));
            (Action::requeue(d), format!("{d:?}"))
        }
        Category::Bug => (Action::requeue(Duration::from_secs(300)), "5m".into()),
        Category::Permanent => (Action::await_change(), "the next change".into()),
    };
    warn!(
        name = obj.name_any(),
        namespace = obj.namespace().unwrap_or_default(),
        error = %error,
        class = error.class(),
        "reconcile failed; retrying after {wait}"
    );
    action
}

/// Patches `.status` with server-side apply, unless it is unchanged (a patch
/// would only wake the controller up again).
pub async fn apply_status<K, S>(
    api: &Api<Raw<K>>,
    name: &str,
    current: Option<&S>,
    status: &S,
) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
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
        name,
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

/// An event to publish once the database work of a reconcile is done.
pub struct Note {
    pub type_: EventType,
    pub reason: &'static str,
    pub message: String,
}

impl Note {
    pub fn normal(reason: &'static str, message: impl Into<String>) -> Self {
        Note {
            type_: EventType::Normal,
            reason,
            message: message.into(),
        }
    }

    pub fn warning(reason: &'static str, message: impl Into<String>) -> Self {
        Note {
            type_: EventType::Warning,
            reason,
            message: message.into(),
        }
    }
}

/// Publishes `notes` about `obj`, in order.
pub async fn publish_notes<K>(ctx: &Context, obj: &K, notes: Vec<Note>)
where
    K: Resource<DynamicType = ()>,
{
    for n in notes {
        publish_event(ctx, obj, n.type_, n.reason, n.message).await;
    }
}

/// Runs both controllers for `namespaces` (empty: all of them) until they
/// end (shutdown) or the future is dropped.
pub async fn run(ctx: Arc<Context>, namespaces: Vec<String>) {
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.iter().cloned().map(Some).collect()
    };
    let mut triggers = Triggers::default();
    let mut controllers = Vec::new();
    for scope in &scopes {
        let (tx, rx) = mpsc::unbounded_channel();
        triggers.follow_uploads(scope.clone(), tx);
        controllers.push(run_one::<UploadJob>(Arc::clone(&ctx), scope.as_deref(), rx).boxed());
        let (tx, rx) = mpsc::unbounded_channel();
        triggers.follow_collections(scope.clone(), tx);
        controllers
            .push(run_one::<IndexCollection>(Arc::clone(&ctx), scope.as_deref(), rx).boxed());
    }
    // Tied to this future: a leader that loses its lock drops it, and with
    // it every task it started.
    let _events = AbortOnDropHandle::new(tokio::spawn(crate::triggers::forward(
        ctx.queue.clone(),
        triggers,
    )));
    let _routing = AbortOnDropHandle::new(tokio::spawn(crate::watch_uploads::run(
        ctx.db.clone(),
        ctx.queue.clone(),
        namespaces,
        ctx.debounce,
    )));
    let _scaling = ctx.autoscale.clone().map(|s| {
        let fleet = crate::autoscale::Fleet {
            client: ctx.client.clone(),
            queue: ctx.queue.clone(),
            recorder: ctx.recorder.clone(),
            metrics: ctx.metrics.autoscale.clone(),
        };
        AbortOnDropHandle::new(tokio::spawn(crate::autoscale::run(fleet, s)))
    });
    info!(concurrency = ctx.concurrency, "controllers running");
    futures::future::join_all(controllers).await;
}

/// One controller of kind `K` over one namespace (or all).
async fn run_one<K: Reconciler>(
    ctx: Arc<Context>,
    namespace: Option<&str>,
    triggers: mpsc::UnboundedReceiver<ObjectRef<Raw<K>>>,
) {
    let api: Api<Raw<K>> = match namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    Controller::new(api, watcher::Config::default())
        .with_config(controller::Config::default().concurrency(ctx.concurrency))
        .reconcile_on(receiver_stream(triggers))
        .run(reconcile::<K>, error_policy::<K>, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

fn receiver_stream<T: Send + 'static>(
    mut rx: mpsc::UnboundedReceiver<T>,
) -> impl futures::Stream<Item = T> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_bounds_concurrent_reconciles() {
        assert_eq!(concurrency_for_pool(16), 7);
        assert_eq!(concurrency_for_pool(1), 1);
        assert_eq!(concurrency_for_pool(0), 1);
        assert_eq!(concurrency_for_pool(usize::MAX), u16::MAX);
    }

    #[test]
    fn transient_retries_back_off_to_five_minutes() {
        assert_eq!(retry_delay(0), Duration::from_secs(2));
        assert_eq!(retry_delay(1), Duration::from_secs(2));
        assert_eq!(retry_delay(3), Duration::from_secs(8));
        assert_eq!(retry_delay(u32::MAX), Duration::from_secs(300));
    }
}
