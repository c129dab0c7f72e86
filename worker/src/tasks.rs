//! The task loop: pull only as many tasks as there are free slots, run each
//! with progress acks, then settle it — the one place where an [`Outcome`]
//! becomes an ack, a delayed NAK or a dead letter for every task kind. A
//! panic in a handler is caught here and dead-letters its task with the
//! panic's message; every kind's attempts are bounded (uploads count on
//! their items, the other kinds in `task_attempts`, counted before they
//! run, so that even a task that kills its worker comes to an end). On
//! shutdown: stop pulling, let in-flight tasks finish for the drain timeout,
//! then stop them and NAK them so another worker resumes them.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use stowage_common::errors::ErrorClass;
use stowage_common::jobs;
use stowage_common::queue::{AckKind, Message, TaskKind, decode_task};
use stowage_common::state::tasks as attempts;
use stowage_proto::v1::{Task, task};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use uuid::Uuid;

use crate::Context;
pub use crate::outcome::Outcome;
use crate::outcome::dead_letter;
use crate::upload;

/// The kind of a task, from its payload.
fn kind_of(task: &Task) -> Option<TaskKind> {
    Some(match task.kind.as_ref()? {
        task::Kind::PlanUpload(_) => TaskKind::UploadPlan,
        task::Kind::UploadFile(_) => TaskKind::Upload,
        task::Kind::SyncCollection(_) => TaskKind::IndexSync,
        task::Kind::IndexDocument(_) => TaskKind::IndexDocument,
    })
}

/// Most attempts of a task whose kind does not count its own, given the
/// worker's `--task-attempts`; `None` for uploads, whose items count theirs
/// (the job's `retry.maxAttempts`).
pub fn max_attempts(kind: TaskKind, configured: u32) -> Option<i32> {
    let configured = i32::try_from(configured.max(1)).unwrap_or(i32::MAX);
    match kind {
        TaskKind::Upload => None,
        TaskKind::UploadPlan | TaskKind::IndexSync => Some(configured),
        // A run's document gives up after its own 5 attempts; this bounds
        // event-driven ones and anything that never reaches that count.
        TaskKind::IndexDocument => Some(configured.saturating_mul(2)),
    }
}

/// Runs until `shutdown` turns true, then drains.
pub async fn run_loop(
    ctx: Arc<Context>,
    mut shutdown: watch::Receiver<bool>,
    drain_timeout: Duration,
) -> anyhow::Result<()> {
    let consumer = ctx.queue.worker_consumer().await?;
    let cancel = CancellationToken::new();
    let mut running = tokio::task::JoinSet::new();
    while !*shutdown.borrow() {
        while running.try_join_next().is_some() {}
        let free = ctx.capacity.saturating_sub(running.len());
        if free == 0 {
            tokio::select! {
                _ = running.join_next() => {}
                _ = shutdown.changed() => {}
            }
            continue;
        }
        let batch = consumer
            .fetch()
            .max_messages(free)
            .expires(Duration::from_secs(2))
            .messages()
            .await;
        let mut batch = match batch {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "fetching tasks failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
        };
        loop {
            tokio::select! {
                m = batch.next() => match m {
                    Some(Ok(msg)) => {
                        let ctx = Arc::clone(&ctx);
                        let cancel = cancel.clone();
                        running.spawn(async move { handle(ctx, msg, cancel).await });
                    }
                    Some(Err(e)) => { warn!(error = %e, "task fetch error"); break; }
                    None => break,
                },
                _ = shutdown.changed() => break,
            }
        }
    }
    ctx.draining.store(true, Ordering::Relaxed);
    info!(
        in_flight = running.len(),
        ?drain_timeout,
        "draining: no new tasks"
    );
    let drained = tokio::time::timeout(drain_timeout, async {
        while running.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            in_flight = running.len(),
            "drain timeout: stopping in-flight tasks; they resume elsewhere"
        );
        cancel.cancel();
        while running.join_next().await.is_some() {}
    }
    Ok(())
}

/// Runs one delivered task to its outcome.
async fn handle(ctx: Arc<Context>, msg: Message, cancel: CancellationToken) {
    let task = match decode_task(&msg) {
        Ok(t) => t,
        Err(e) => {
            error!(error = %e, "undecodable task; terminating it");
            let _ = msg.ack_with(AckKind::Term).await;
            ctx.metrics.task("unknown", "invalid");
            return;
        }
    };
    let kind = kind_of(&task);
    let label = kind.map_or("unknown", TaskKind::as_str);
    let progress = Arc::new(AtomicU64::new(0));
    let entry = ctx
        .in_flight
        .start(&task.task_id, label, Arc::clone(&progress));
    ctx.metrics.in_flight.inc();
    // Progress acks keep the task ours while it runs, however long.
    let ticker = {
        let msg_ack = msg.clone();
        let every = ctx.ack_wait / 3;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                if msg_ack.ack_with(AckKind::Progress).await.is_err() {
                    break;
                }
            }
        })
    };
    let limit = kind.and_then(|k| max_attempts(k, ctx.task_attempts));
    let counted = match limit {
        Some(_) => begin(&ctx, &task).await,
        None => None,
    };
    let mut outcome = match (&counted, limit) {
        (Some(a), Some(limit)) if a.attempts > limit => Outcome::Dead {
            error: format!(
                "gave up after {} attempts{}",
                a.attempts - 1,
                a.last_error
                    .as_deref()
                    .map(|e| format!("; the last failed with: {e}"))
                    .unwrap_or_default()
            ),
            class: ErrorClass::Retryable,
            attempts: u32::try_from(a.attempts - 1).unwrap_or(0),
        },
        _ => AssertUnwindSafe(run_task(&ctx, &task, &cancel, progress))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| {
                let message = stowage_common::errors::panic_message(panic.as_ref());
                error!(
                    task = task.task_id,
                    panic = message,
                    "task handler panicked"
                );
                Outcome::invalid(format!(
                    "the worker panicked running this task (a bug; please report it): {message}"
                ))
            }),
    };
    ticker.abort();
    // Out of attempts: a retry becomes a dead letter that says so.
    if let (Outcome::Retry { error, .. }, Some(a), Some(limit)) = (&outcome, &counted, limit)
        && a.attempts >= limit
    {
        outcome = Outcome::Dead {
            error: format!("gave up after {} attempts: {error}", a.attempts),
            class: ErrorClass::Retryable,
            attempts: u32::try_from(a.attempts).unwrap_or(0),
        };
    }
    if let Outcome::Dead { error, class, .. } = &outcome {
        record_failure(&ctx, &task, error, *class).await;
    }
    ctx.in_flight.finish(&entry);
    ctx.metrics.in_flight.dec();
    if counted.is_some() {
        account(&ctx, &task, &outcome).await;
    }
    settle(&ctx, &msg, &task, label, outcome).await;
}

/// Counts a start of `task`; `None` when the count cannot be read (the
/// database is down: the task then runs and most likely retries).
async fn begin(ctx: &Context, task: &Task) -> Option<attempts::Attempts> {
    let db = ctx.db.get().await.ok()?;
    match attempts::begin(&db, &task.task_id).await {
        Ok(a) => Some(a),
        Err(e) => {
            warn!(task = task.task_id, error = %e, "cannot count the task's attempt");
            None
        }
    }
}

/// Keeps `task_attempts` in step with the outcome.
async fn account(ctx: &Context, task: &Task, outcome: &Outcome) {
    let Ok(db) = ctx.db.get().await else { return };
    let id = task.task_id.as_str();
    let result = match outcome {
        Outcome::Done { .. } | Outcome::Dead { .. } => attempts::ended(&db, id).await,
        Outcome::Wait { .. } => attempts::waited(&db, id).await,
        Outcome::Retry { error, .. } => attempts::failed(&db, id, error).await,
    };
    if let Err(e) = result {
        warn!(task = id, error = %e, "cannot record the task's attempt");
    }
}

/// What a dead task leaves behind in PostgreSQL, so that its job or run
/// still ends: an upload's item fails (its multipart upload aborted), a
/// planning task fails its job, a run's document fails and the run closes.
/// Kinds that decide their own dead letters have recorded it already; this
/// covers panics and exhausted attempts.
async fn record_failure(ctx: &Context, task: &Task, error: &str, class: ErrorClass) {
    let result: Result<(), String> = match &task.kind {
        Some(task::Kind::UploadFile(u)) => {
            let mut result = Ok(());
            for item_id in jobs::items_of(u) {
                if let Err(e) = upload::item::fail_dead(ctx, item_id, error, class).await {
                    result = Err(e.to_string());
                }
            }
            result
        }
        Some(task::Kind::PlanUpload(p)) => match Uuid::parse_str(&p.job_id) {
            Ok(job_id) => match ctx.db.get().await {
                Ok(db) => stowage_common::state::uploads::fail_job(&db, job_id, error)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
            Err(_) => Ok(()),
        },
        Some(task::Kind::IndexDocument(d)) if d.run_id > 0 => {
            match Uuid::parse_str(&d.collection_id) {
                Ok(id) => crate::index::document::fail_in_run(ctx, id, d.run_id, &d.key, error)
                    .await
                    .map_err(|e| e.to_string()),
                Err(_) => Ok(()),
            }
        }
        // A sync run left in progress by a dead planner is abandoned by the
        // next sync; an event-driven document keeps what it had.
        _ => Ok(()),
    };
    if let Err(e) = result {
        warn!(task = task.task_id, error = %e, "could not record the dead task's failure");
    }
}

async fn run_task(
    ctx: &Context,
    task: &Task,
    cancel: &CancellationToken,
    progress: Arc<AtomicU64>,
) -> Outcome {
    match &task.kind {
        Some(task::Kind::PlanUpload(p)) => {
            let Ok(job_id) = Uuid::parse_str(&p.job_id) else {
                return Outcome::invalid(format!("job id {:?} is not a UUID", p.job_id));
            };
            match upload::plan::run(ctx, job_id).await {
                Ok(Some(n)) => {
                    info!(%job_id, items = n, "job planned");
                    Outcome::Done { label: "ok" }
                }
                Ok(None) => {
                    info!(%job_id, "job cancelled or deleted; nothing to plan");
                    Outcome::Done { label: "cancelled" }
                }
                Err(e) => {
                    warn!(%job_id, error = %e, "planning failed");
                    Outcome::from_error(&e, Duration::from_secs(5))
                }
            }
        }
        Some(task::Kind::UploadFile(u)) => {
            let Ok(job_id) = Uuid::parse_str(&u.job_id) else {
                return Outcome::invalid(format!("job id {:?} is not a UUID", u.job_id));
            };
            match jobs::items_of(u).as_slice() {
                [item_id] => upload::item::run(ctx, job_id, *item_id, cancel, progress).await,
                items => upload::batch::run(ctx, job_id, items, cancel, progress).await,
            }
        }
        Some(task::Kind::SyncCollection(s)) => {
            let Ok(collection_id) = Uuid::parse_str(&s.collection_id) else {
                return Outcome::invalid(format!(
                    "collection id {:?} is not a UUID",
                    s.collection_id
                ));
            };
            crate::index::sync(ctx, collection_id, &s.trigger).await
        }
        Some(task::Kind::IndexDocument(d)) => {
            let Ok(collection_id) = Uuid::parse_str(&d.collection_id) else {
                return Outcome::invalid(format!(
                    "collection id {:?} is not a UUID",
                    d.collection_id
                ));
            };
            crate::index::document::run(ctx, collection_id, &d.key, d.run_id).await
        }
        None => Outcome::invalid("task has no kind (sent by a newer version?)"),
    }
}

/// The one place an outcome becomes an ack, a NAK or a dead letter.
async fn settle(ctx: &Context, msg: &Message, task: &Task, kind: &'static str, outcome: Outcome) {
    let acked = match &outcome {
        Outcome::Done { label } => {
            ctx.metrics.task(kind, label);
            msg.ack().await
        }
        Outcome::Wait { delay, reason } => {
            ctx.metrics.task(kind, "wait");
            info!(task = task.task_id, ?delay, reason, "task waits");
            msg.ack_with(AckKind::Nak(Some(*delay))).await
        }
        Outcome::Retry { delay, error } => {
            ctx.metrics.task(kind, "retry");
            info!(
                task = task.task_id,
                ?delay,
                error,
                "task handed back for a retry"
            );
            msg.ack_with(AckKind::Nak(Some(*delay))).await
        }
        Outcome::Dead {
            error,
            class,
            attempts,
        } => {
            ctx.metrics.task(kind, "dead_letter");
            let letter = dead_letter(task, &msg.subject, error, *class, *attempts);
            match ctx.queue.dead_letter(&letter).await {
                Ok(seq) => {
                    warn!(task = task.task_id, seq, error, "task dead-lettered");
                    msg.ack_with(AckKind::Term).await
                }
                Err(e) => {
                    // Not stored as a dead letter: keep the task to try again.
                    error!(task = task.task_id, error = %e, "dead-lettering failed; NAKing");
                    msg.ack_with(AckKind::Nak(Some(Duration::from_secs(10))))
                        .await
                }
            }
        }
    };
    if let Err(e) = acked {
        warn!(task = task.task_id, error = %e, "ack failed; the task will be redelivered");
    }
}

/// What each running task is doing, for the Status RPC.
#[derive(Default)]
pub struct InFlight {
    tasks: std::sync::Mutex<std::collections::HashMap<u64, InFlightTask>>,
    next: AtomicU64,
}

#[derive(Clone)]
pub struct InFlightTask {
    pub task_id: String,
    pub kind: &'static str,
    pub started: Instant,
    pub bytes_done: Arc<AtomicU64>,
}

impl InFlight {
    fn start(&self, task_id: &str, kind: &'static str, bytes_done: Arc<AtomicU64>) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut t) = self.tasks.lock() {
            t.insert(
                id,
                InFlightTask {
                    task_id: task_id.to_string(),
                    kind,
                    started: Instant::now(),
                    bytes_done,
                },
            );
        }
        id
    }

    fn finish(&self, id: &u64) {
        if let Ok(mut t) = self.tasks.lock() {
            t.remove(id);
        }
    }

    pub fn snapshot(&self) -> Vec<InFlightTask> {
        self.tasks
            .lock()
            .map(|t| t.values().cloned().collect())
            .unwrap_or_default()
    }
}
