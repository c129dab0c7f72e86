//! The task loop: pull only as many tasks as there are free slots, run each
//! with progress acks, then ack, NAK with a delay, or dead-letter it. On
//! shutdown: stop pulling, let in-flight tasks finish for the drain timeout,
//! then stop them and NAK them so another worker resumes them.

pub mod plan;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use stowage_common::errors::ErrorClass;
use stowage_common::queue::{AckKind, Message, decode_task};
use stowage_proto::v1::{DeadLetter, Task, task};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use uuid::Uuid;

use crate::Context;
use crate::upload;

/// What becomes of a task after one run.
#[derive(Debug)]
pub enum Outcome {
    /// Ack. `label` is the metrics outcome (`ok`, `skipped`).
    Done { label: &'static str },
    /// NAK: redeliver after `delay`.
    Retry { delay: Duration, reason: String },
    /// Move to the dead-letter stream and stop redelivery.
    Dead {
        error: String,
        class: ErrorClass,
        attempts: u32,
    },
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
    let kind = match &task.kind {
        Some(task::Kind::PlanUpload(_)) => "upload-plan",
        Some(task::Kind::UploadFile(_)) => "upload",
        Some(task::Kind::SyncCollection(_)) => "index-sync",
        Some(task::Kind::IndexDocument(_)) => "index-doc",
        None => "unknown",
    };
    let progress = Arc::new(AtomicU64::new(0));
    let entry = ctx
        .in_flight
        .start(&task.task_id, kind, Arc::clone(&progress));
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
    let outcome = run_task(&ctx, &task, &cancel, progress).await;
    ticker.abort();
    ctx.in_flight.finish(&entry);
    ctx.metrics.in_flight.dec();
    settle(&ctx, &msg, &task, kind, outcome).await;
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
                return invalid(format!("job id {:?} is not a UUID", p.job_id));
            };
            match plan::run(ctx, job_id).await {
                Ok(Some(n)) => {
                    info!(%job_id, items = n, "job planned");
                    Outcome::Done { label: "ok" }
                }
                Ok(None) => {
                    info!(%job_id, "job cancelled or deleted; nothing to plan");
                    Outcome::Done { label: "cancelled" }
                }
                Err(e) => planning_failed(ctx, job_id, e).await,
            }
        }
        Some(task::Kind::UploadFile(u)) => {
            let Ok(job_id) = Uuid::parse_str(&u.job_id) else {
                return invalid(format!("job id {:?} is not a UUID", u.job_id));
            };
            upload::item::run(ctx, job_id, u.item_id, cancel, progress).await
        }
        Some(task::Kind::SyncCollection(s)) => {
            let Ok(collection_id) = Uuid::parse_str(&s.collection_id) else {
                return invalid(format!("collection id {:?} is not a UUID", s.collection_id));
            };
            crate::index::sync(ctx, collection_id, &s.trigger).await
        }
        Some(task::Kind::IndexDocument(d)) => {
            let Ok(collection_id) = Uuid::parse_str(&d.collection_id) else {
                return invalid(format!("collection id {:?} is not a UUID", d.collection_id));
            };
            crate::index::document::run(ctx, collection_id, &d.key, d.run_id).await
        }
        None => invalid("task has no kind (sent by a newer version?)".into()),
    }
}

fn invalid(error: String) -> Outcome {
    Outcome::Dead {
        error,
        class: ErrorClass::Permanent,
        attempts: 1,
    }
}

async fn planning_failed(ctx: &Context, job_id: Uuid, e: upload::UploadError) -> Outcome {
    use stowage_common::errors::Classify;
    let class = e.class();
    if class == ErrorClass::Retryable {
        warn!(%job_id, error = %e, "planning failed; will retry");
        return Outcome::Retry {
            delay: Duration::from_secs(5),
            reason: e.to_string(),
        };
    }
    if let Ok(db) = ctx.db.get().await
        && let Err(state_err) =
            stowage_common::state::uploads::fail_job(&db, job_id, &e.to_string()).await
    {
        warn!(%job_id, error = %state_err, "could not mark the job failed");
    }
    Outcome::Dead {
        error: e.to_string(),
        class,
        attempts: 1,
    }
}

async fn settle(ctx: &Context, msg: &Message, task: &Task, kind: &'static str, outcome: Outcome) {
    let acked = match &outcome {
        Outcome::Done { label } => {
            ctx.metrics.task(kind, label);
            msg.ack().await
        }
        Outcome::Retry { delay, reason } => {
            ctx.metrics.task(kind, "retry");
            info!(
                task = task.task_id,
                ?delay,
                reason,
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
            let letter = DeadLetter {
                task: Some(task.clone()),
                subject: msg.subject.to_string(),
                error: error.clone(),
                error_class: class.as_str().into(),
                attempts: *attempts,
                failed_at: Some(now()),
            };
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

fn now() -> stowage_proto::Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    stowage_proto::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
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
