//! Submitting work and replaying dead letters: the steps that touch both the
//! state in PostgreSQL and the queue, shared by the operator and stowctl.

use stowage_proto::v1::{IndexDocument, PlanUpload, Task, UploadFile, task};
use uuid::Uuid;

use crate::db::Client;
use crate::queue::{Queue, QueueError, TaskKind};
use crate::spec::SpecError;
use crate::state::StateError;
use crate::state::uploads::{self, JobRecord, NewJob, QueuedFile};

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

/// Most files in one upload task.
pub const BATCH_FILES: usize = 32;

/// The fewest tasks a job's small files are spread over before they share
/// tasks: a job of a few files keeps a task per file, so the fleet's workers
/// share it.
const SPREAD_TASKS: usize = 64;

/// Groups a job's files into tasks. A file larger than a part (a multipart
/// upload, whose parts already run in parallel) has a task of its own; the
/// others share tasks of up to [`BATCH_FILES`], in listing order, no more
/// per task than spreads them over [`SPREAD_TASKS`] tasks. A batch saves per
/// file the task's publish, delivery and ack and its progress event; each
/// file keeps its own attempts, outcome and dead letter.
pub fn batches(files: &[QueuedFile], part_size: u64) -> Vec<Vec<i64>> {
    let large = |f: &QueuedFile| {
        f.size
            .is_some_and(|s| u64::try_from(s).unwrap_or(0) > part_size)
    };
    let small = files.iter().filter(|f| !large(f)).count();
    let per_task = (small / SPREAD_TASKS).clamp(1, BATCH_FILES);
    let mut out = Vec::new();
    let mut batch = Vec::new();
    for f in files {
        if large(f) {
            out.push(vec![f.id]);
            continue;
        }
        batch.push(f.id);
        if batch.len() == per_task {
            out.push(std::mem::take(&mut batch));
        }
    }
    if !batch.is_empty() {
        out.push(batch);
    }
    out
}

/// The task that uploads `items` (one file, or a batch) of job `job_id`.
/// Its id is deterministic, so publishing the same files again is
/// deduplicated; `round` names a later round (a resume after suspension)
/// whose tasks must not be.
pub fn upload_task(job_id: Uuid, items: &[i64], round: Option<&str>) -> Task {
    let first = items.first().copied().unwrap_or_default();
    let mut task_id = match items.len() {
        0 | 1 => format!("upload/{job_id}/{first}"),
        n => format!("upload/{job_id}/{first}+{n}"),
    };
    if let Some(r) = round {
        task_id = format!("{task_id}/{r}");
    }
    Task {
        task_id,
        kind: Some(task::Kind::UploadFile(UploadFile {
            job_id: job_id.to_string(),
            item_id: first,
            item_ids: if items.len() > 1 {
                items.to_vec()
            } else {
                Vec::new()
            },
        })),
    }
}

/// The items of an upload task: its batch, or its one file.
pub fn items_of(task: &UploadFile) -> Vec<i64> {
    if task.item_ids.is_empty() {
        vec![task.item_id]
    } else {
        task.item_ids.clone()
    }
}

/// Publishes the tasks of the job's files (see [`batches`]).
pub async fn publish_items(
    queue: &Queue,
    job: &JobRecord,
    files: &[QueuedFile],
    round: Option<&str>,
) -> Result<(), QueueError> {
    let subject = queue
        .topology()
        .task_subject(TaskKind::Upload, &job.namespace, &job.name);
    let tasks: Vec<Task> = batches(files, job.spec.part_size_bytes)
        .iter()
        .map(|items| upload_task(job.id, items, round))
        .collect();
    queue.publish_tasks(&subject, &tasks).await
}

/// Replays dead letter `seq`: its failed items go back to pending, then its
/// task is published again under a new id.
pub async fn replay_dead_letter(db: &Client, queue: &Queue, seq: u64) -> Result<Task, JobError> {
    let letters = queue.dead_letters().await?;
    let (_, letter) = letters
        .into_iter()
        .find(|(s, _)| *s == seq)
        .ok_or(QueueError::NoSuchDeadLetter(seq))?;
    if let Some(task::Kind::UploadFile(u)) = letter.task.as_ref().and_then(|t| t.kind.as_ref()) {
        uploads::reset_for_replay(db, &items_of(u)).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn files(sizes: &[Option<i64>]) -> Vec<QueuedFile> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| QueuedFile {
                id: i as i64 + 1,
                size,
            })
            .collect()
    }

    #[test]
    fn a_few_files_keep_a_task_each() {
        let b = batches(&files(&[Some(10), None, Some(10)]), 100);
        assert_eq!(b, vec![vec![1], vec![2], vec![3]]);
    }

    #[test]
    fn many_small_files_share_tasks_and_large_ones_stand_alone() {
        let mut sizes = vec![Some(10); 10_000];
        sizes[5] = Some(101);
        sizes[9_999] = Some(i64::MAX);
        let f = files(&sizes);
        let b = batches(&f, 100);
        // Every file once.
        let mut flat: Vec<i64> = b.iter().flatten().copied().collect();
        flat.sort_unstable();
        assert_eq!(flat, f.iter().map(|f| f.id).collect::<Vec<_>>());
        assert!(b.iter().all(|t| t.len() <= BATCH_FILES));
        assert!(b.contains(&vec![6]) && b.contains(&vec![10_000]));
        assert_eq!(b[1].len(), BATCH_FILES);
        assert_eq!(
            b[1][4..6],
            [5, 7],
            "a large file is left out of its neighbours' batch"
        );
        // 9,998 small files in batches of 32, and the 2 large ones.
        assert_eq!(b.len(), 9_998usize.div_ceil(BATCH_FILES) + 2);
    }

    #[test]
    fn batch_size_spreads_a_middling_job() {
        let b = batches(&files(&vec![None; 640]), 100);
        assert_eq!(b.len(), 64);
        assert!(b.iter().all(|t| t.len() == 10));
    }

    #[test]
    fn task_ids_are_deterministic_per_batch_and_round() {
        let id = Uuid::nil();
        let one = upload_task(id, &[7], None);
        assert_eq!(one.task_id, format!("upload/{id}/7"));
        let batch = upload_task(id, &[7, 8, 9], Some("r2"));
        assert_eq!(batch.task_id, format!("upload/{id}/7+3/r2"));
        let Some(task::Kind::UploadFile(u)) = batch.kind else {
            panic!("an upload task")
        };
        assert_eq!(items_of(&u), vec![7, 8, 9]);
        let Some(task::Kind::UploadFile(u)) = one.kind else {
            panic!("an upload task")
        };
        assert_eq!(items_of(&u), vec![7]);
    }
}
