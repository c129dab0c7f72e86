//! A task of many small files ([`stowage_common::jobs::batches`]): each
//! file in turn through [`item::attempt`], with its own attempts, outcome
//! and dead letter (a one-file task, replayable on its own). The task ends
//! once every file has; otherwise it is handed back for the soonest retry,
//! and its next delivery passes over the files that ended. One progress
//! event says the batch moved.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use stowage_common::jobs;
use stowage_common::queue::TaskKind;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};
use uuid::Uuid;

use super::item::{self, Ended};
use crate::Context;
use crate::outcome::{Outcome, dead_letter};

pub async fn run(
    ctx: &Context,
    job_id: Uuid,
    items: &[i64],
    cancel: &CancellationToken,
    progress: Arc<AtomicU64>,
) -> Outcome {
    let mut again: Option<Outcome> = None;
    let mut last: Option<Ended> = None;
    for &item_id in items {
        if cancel.is_cancelled() {
            again = Some(Outcome::Wait {
                delay: Duration::ZERO,
                reason: "worker shutting down".into(),
            });
            break;
        }
        let ran = item::attempt(ctx, job_id, item_id, cancel, Arc::clone(&progress)).await;
        let outcome = match (ran.outcome, &ran.ended) {
            (
                Outcome::Dead {
                    error,
                    class,
                    attempts,
                },
                Some(end),
            ) => {
                let job = &end.job.record;
                let task = jobs::upload_task(job_id, &[item_id], None);
                let subject =
                    ctx.queue
                        .topology()
                        .task_subject(TaskKind::Upload, &job.namespace, &job.name);
                let letter = dead_letter(&task, &subject, &error, class, attempts);
                ctx.metrics.task(TaskKind::Upload.as_str(), "dead_letter");
                match ctx.queue.dead_letter(&letter).await {
                    Ok(seq) => {
                        warn!(
                            task = task.task_id,
                            seq, error, "file of a batch dead-lettered"
                        );
                        None
                    }
                    Err(e) => {
                        error!(task = task.task_id, error = %e, "dead-lettering failed; the batch is handed back");
                        Some(Outcome::Retry {
                            delay: Duration::from_secs(10),
                            error: format!("dead letter of item {item_id} not stored: {e}"),
                        })
                    }
                }
            }
            (Outcome::Done { .. }, _) => None,
            (other, _) => Some(other),
        };
        if ran.ended.is_some() {
            last = ran.ended;
        }
        if let Some(o) = outcome {
            again = Some(match again {
                Some(a) => sooner(a, o),
                None => o,
            });
        }
    }
    if let Some(end) = &last {
        item::announce(ctx, end).await;
    }
    again.unwrap_or(Outcome::Done { label: "ok" })
}

/// Of two outcomes that hand the batch back, the one due first; a retry
/// (an attempt spent) is kept over a wait of the same delay.
fn sooner(a: Outcome, b: Outcome) -> Outcome {
    let due = |o: &Outcome| match o {
        Outcome::Wait { delay, .. } | Outcome::Retry { delay, .. } => *delay,
        Outcome::Done { .. } | Outcome::Dead { .. } => Duration::MAX,
    };
    match due(&a).cmp(&due(&b)) {
        std::cmp::Ordering::Less => a,
        std::cmp::Ordering::Greater => b,
        std::cmp::Ordering::Equal if matches!(b, Outcome::Retry { .. }) => b,
        std::cmp::Ordering::Equal => a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait(ms: u64) -> Outcome {
        Outcome::Wait {
            delay: Duration::from_millis(ms),
            reason: "busy".into(),
        }
    }

    fn retry(ms: u64) -> Outcome {
        Outcome::Retry {
            delay: Duration::from_millis(ms),
            error: "failed".into(),
        }
    }

    #[test]
    fn the_soonest_hand_back_wins() {
        assert_eq!(sooner(wait(2000), retry(1000)), retry(1000));
        assert_eq!(sooner(retry(3000), wait(0)), wait(0));
        assert_eq!(sooner(wait(1000), retry(1000)), retry(1000));
        assert_eq!(sooner(retry(1000), wait(1000)), retry(1000));
    }
}
