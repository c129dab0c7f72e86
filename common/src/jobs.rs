//! Submitting work and replaying dead letters: the steps that touch both the
//! state in PostgreSQL and the queue, shared by the operator and stowctl.

use stowage_proto::v1::{IndexDocument, PlanUpload, Task, UploadFile, task};
use uuid::Uuid;

use crate::db::Client;
use crate::queue::{Queue, QueueError, TaskKind};
use crate::spec::SpecError;
use crate::state::StateError;
use crate::state::uploads::{self, JobRecord, NewJob};

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("invalid spec: {0}")]
    Spec(#[from] SpecError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// Registers the job (once per source uid + generation) and publishes its
/// planning task (once: the task id is deterministic). Safe to repeat.
pub async fn submit_upload(db: &Client, queue: &Queue, job: &NewJob) -> Result<Uuid, JobError> {
    job.spec.validate()?;
    let id = uploads::register_job(db, job).await?;
    publish_plan(queue, id, &job.namespace, &job.name).await?;
    Ok(id)
}

/// Publishes the planning task of job `id` (deduplicated by its task id).
pub async fn publish_plan(
    queue: &Queue,
    id: Uuid,
    namespace: &str,
    name: &str,
) -> Result<(), QueueError> {
    let task = Task {
        task_id: format!("upload-plan/{id}"),
        kind: Some(task::Kind::PlanUpload(PlanUpload {
            job_id: id.to_string(),
        })),
    };
    let subject = queue
        .topology()
        .task_subject(TaskKind::UploadPlan, namespace, name);
    queue.publish_task(&subject, &task).await?;
    Ok(())
}

/// Publishes one UploadFile task per item. Task ids are deterministic, so
/// publishing the same items again is deduplicated; `round` names a later
/// round (a resume after suspension) whose tasks must not be.
pub async fn publish_items(
    queue: &Queue,
    job: &JobRecord,
    item_ids: &[i64],
    round: Option<&str>,
) -> Result<(), QueueError> {
    let subject = queue
        .topology()
        .task_subject(TaskKind::Upload, &job.namespace, &job.name);
    let tasks: Vec<Task> = item_ids
        .iter()
        .map(|&item_id| Task {
            task_id: match round {
                Some(r) => format!("upload/{}/{item_id}/{r}", job.id),
                None => format!("upload/{}/{item_id}", job.id),
            },
            kind: Some(task::Kind::UploadFile(UploadFile {
                job_id: job.id.to_string(),
                item_id,
            })),
        })
        .collect();
    queue.publish_tasks(&subject, &tasks).await
}

/// Replays dead letter `seq`: its item goes back to pending, then its task is
/// published again under a new id.
pub async fn replay_dead_letter(db: &Client, queue: &Queue, seq: u64) -> Result<Task, JobError> {
    let letters = queue.dead_letters().await?;
    let (_, letter) = letters
        .into_iter()
        .find(|(s, _)| *s == seq)
        .ok_or(QueueError::NoSuchDeadLetter(seq))?;
    if let Some(task::Kind::UploadFile(u)) = letter.task.as_ref().and_then(|t| t.kind.as_ref()) {
        uploads::reset_for_replay(db, u.item_id).await?;
    }
    Ok(queue.replay_dead_letter(seq).await?)
}

/// What asks for a document to be indexed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DocumentOrigin {
    /// Object events, the last of them at this stream sequence.
    Event { sequence: u64 },
    /// A sync run's plan.
    Run { id: i64 },
}

/// The task that indexes `key` of a collection. Its id is deterministic per
/// origin, so a republished task is deduplicated.
pub fn index_document_task(collection_id: Uuid, key: &str, origin: DocumentOrigin) -> Task {
    use sha2::{Digest, Sha256};
    let key_hash = hex::encode(&Sha256::digest(key.as_bytes())[..8]);
    let (instance, run_id) = match origin {
        DocumentOrigin::Event { sequence } => (sequence.to_string(), 0),
        DocumentOrigin::Run { id } => (format!("run-{id}"), id),
    };
    Task {
        task_id: format!("index-doc/{collection_id}/{key_hash}/{instance}"),
        kind: Some(task::Kind::IndexDocument(IndexDocument {
            collection_id: collection_id.to_string(),
            key: key.to_string(),
            run_id,
        })),
    }
}
