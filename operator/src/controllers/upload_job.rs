//! UploadJob controller: judges the resource, registers the job, publishes
//! its planning task, acts on suspend / deadline / TTL / replay, rolls
//! progress up into `.status`, and on deletion drops pending work, aborts
//! open multipart uploads and deletes the job's rows before the finalizer
//! goes. The steps of [`apply`] are the pipeline of [`super`].

use std::sync::Arc;

use chrono::Utc;
use kube::api::DeleteParams;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use stowage_common::db::Client;
use stowage_common::jobs;
use stowage_common::queue::TaskKind;
use stowage_common::state::uploads::{self, JobFailure, JobRecord, JobState, NewJob};
use stowage_proto::v1::task;
use tracing::{info, warn};

use super::{Context, Error, Note, Reconciler, apply_status, publish_event, publish_notes};
use crate::crd::condition::Condition;
use crate::crd::judge::validate;
use crate::crd::{RawUploadJob, UploadJob};
use crate::status::upload_job::{self as status, Next, Snapshot};

impl Reconciler for UploadJob {
    const CONTROLLER: &'static str = "uploadjob";

    async fn apply(raw: Arc<RawUploadJob>, ctx: &Context) -> Result<Action, Error> {
        apply(&raw, ctx).await
    }

    async fn cleanup(raw: Arc<RawUploadJob>, ctx: &Context) -> Result<Action, Error> {
        cleanup(&raw, ctx).await
    }

    fn conditions(status: &mut Self::Status) -> &mut Vec<Condition> {
        &mut status.conditions
    }
}

/// Where the resource lives.
struct Ids {
    uid: String,
    ns: String,
    name: String,
}

impl Ids {
    fn of(raw: &RawUploadJob) -> Result<Ids, Error> {
        Ok(Ids {
            uid: raw.uid().ok_or(Error::Metadata("uid"))?,
            ns: raw.namespace().ok_or(Error::Metadata("namespace"))?,
            name: raw.name_any(),
        })
    }
}

async fn apply(raw: &RawUploadJob, ctx: &Context) -> Result<Action, Error> {
    let ids = Ids::of(raw)?;
    let api: Api<RawUploadJob> = Api::namespaced(ctx.client.clone(), &ids.ns);
    // Validate (pure): the schema, the types, the spec's own rules, what
    // this installation allows.
    let uj = match validate::<UploadJob>(raw, ctx.allowed()) {
        Ok(uj) => uj,
        Err(why) => return refuse(raw, &api, ctx, &why).await,
    };
    let now = Utc::now();
    let mut notes = Vec::new();
    // One pooled connection for all the database steps, given back before
    // the API calls.
    let (job, counts, errors, replayed) = {
        let db = ctx.db.get().await?;
        let job = match register(&uj, &ids, &db, ctx, &mut notes).await? {
            Ok(job) => job,
            Err(why) => {
                drop(db);
                return refuse(raw, &api, ctx, why).await;
            }
        };
        let (job, replayed) = drive(&uj, job, &db, ctx, now, &mut notes).await?;
        let counts = uploads::job_counts(&db, job.id).await?;
        let errors = uploads::recent_errors(&db, job.id, status::MAX_ERRORS as i64).await?;
        (job, counts, errors, replayed)
    };
    let current = uj.status.as_ref();
    let mut new = status::compute(
        &uj,
        &Snapshot {
            job: &job,
            counts: &counts,
            errors: &errors,
        },
    );
    if let Some(r) = replayed {
        new.replayed = Some(r);
    }
    publish_notes(ctx, raw, notes).await;
    apply_status(&api, &ids.name, current, &new).await?;
    if let Some(note) = finished_note(&job, current, &new) {
        publish_notes(ctx, raw, vec![note]).await;
    }
    match status::next_action(&uj, &job, &new, Utc::now(), ctx.resync) {
        Next::Delete => {
            info!(
                ns = ids.ns,
                name = ids.name,
                "ttlSecondsAfterFinished passed; deleting the UploadJob"
            );
            api.delete(&ids.name, &DeleteParams::background()).await?;
            Ok(Action::await_change())
        }
        Next::Requeue(d) => Ok(Action::requeue(d)),
        Next::AwaitChange => Ok(Action::await_change()),
    }
}

/// Registers the job once per uid (its planning task id is deterministic,
/// so publishing it again is deduplicated) or finds it; refuses a spec that
/// changed since (the CRD's transition rule refuses it at the API server;
/// an API server without CEL, or an old CRD, still gets a clear answer).
async fn register(
    uj: &UploadJob,
    ids: &Ids,
    db: &Client,
    ctx: &Context,
    notes: &mut Vec<Note>,
) -> Result<Result<JobRecord, &'static str>, Error> {
    match uploads::find_job(db, &ids.uid).await? {
        Some(j) if j.spec != uj.spec.upload => Ok(Err(
            "source, destination and upload settings cannot change once the job started: \
             create a new UploadJob",
        )),
        Some(j) => {
            if !j.planned {
                // The task may have been lost with an operator that died
                // between registering and publishing.
                jobs::publish_plan(&ctx.queue, j.id, &ids.ns, &ids.name).await?;
            }
            Ok(Ok(j))
        }
        None => {
            let id = jobs::submit_upload(
                db,
                &ctx.queue,
                &NewJob {
                    namespace: ids.ns.clone(),
                    name: ids.name.clone(),
                    source_uid: ids.uid.clone(),
                    generation: uj.metadata.generation.unwrap_or(1),
                    spec: uj.spec.upload.clone(),
                    suspended: uj.spec.suspend,
                },
            )
            .await?;
            info!(ns = ids.ns, name = ids.name, job = %id, "upload job registered");
            notes.push(Note::normal(
                "Registered",
                format!(
                    "job {id} registered{}; planning task published",
                    if uj.spec.suspend { " suspended" } else { "" }
                ),
            ));
            Ok(Ok(uploads::get_job(db, id).await?))
        }
    }
}

/// Drives the job where the spec says: suspend or resume, fail it past its
/// deadline, replay its dead letters on request. Returns the job as it is
/// now and the replay request acted on.
async fn drive(
    uj: &UploadJob,
    job: JobRecord,
    db: &Client,
    ctx: &Context,
    now: chrono::DateTime<Utc>,
    notes: &mut Vec<Note>,
) -> Result<(JobRecord, Option<String>), Error> {
    let mut job = suspend_or_resume(uj, job, db, ctx, notes).await?;
    if let Some(deadline) = status::deadline(uj, &job)
        && now >= deadline
        && uploads::fail_unfinished(
            db,
            job.id,
            JobFailure::DeadlineExceeded,
            &format!(
                "the job ran longer than activeDeadlineSeconds ({} s)",
                uj.spec.active_deadline_seconds.unwrap_or_default()
            ),
        )
        .await?
    {
        drop_tasks(ctx, &job.namespace, &job.name).await?;
        notes.push(Note::warning(
            "DeadlineExceeded",
            "activeDeadlineSeconds passed; pending files failed",
        ));
        job = uploads::get_job(db, job.id).await?;
    }
    let mut replayed = None;
    if let Some(request) = status::replay_request(uj) {
        let n = replay(db, ctx, &job).await?;
        notes.push(Note::normal(
            "Replayed",
            format!("{n} dead-lettered files queued again"),
        ));
        replayed = Some(request.to_string());
        job = uploads::get_job(db, job.id).await?;
    }
    Ok((job, replayed))
}

/// The event of a job that just finished, if it did.
fn finished_note(
    job: &JobRecord,
    current: Option<&crate::crd::UploadJobStatus>,
    new: &crate::crd::UploadJobStatus,
) -> Option<Note> {
    let finished_now = new.phase.is_some_and(|p| p.is_finished())
        && !current
            .and_then(|s| s.phase)
            .is_some_and(|p| p.is_finished());
    if !finished_now {
        return None;
    }
    let message = new
        .conditions
        .iter()
        .find(|c| c.type_ == crate::status::PROGRESSING)
        .map(|c| c.message.clone())
        .unwrap_or_default();
    Some(if job.state == JobState::Succeeded {
        Note::normal("Completed", message)
    } else {
        Note::warning("Failed", message)
    })
}

/// Refuses the spec: InvalidSpec condition, an event, and no requeue until
/// the resource changes.
async fn refuse(
    raw: &RawUploadJob,
    api: &Api<RawUploadJob>,
    ctx: &Context,
    message: &str,
) -> Result<Action, Error> {
    let prev = crate::crd::judge::previous_status(raw);
    let new = status::invalid(prev.as_ref(), raw.metadata.generation, message);
    if prev.as_ref() != Some(&new) {
        warn!(
            ns = raw.namespace().unwrap_or_default(),
            name = raw.name_any(),
            reason = message,
            "UploadJob refused: invalid spec"
        );
        apply_status(api, &raw.name_any(), prev.as_ref(), &new).await?;
        publish_event(
            ctx,
            raw,
            EventType::Warning,
            crate::status::INVALID_SPEC,
            message.to_string(),
        )
        .await;
    }
    Ok(Action::await_change())
}

/// Follows `spec.suspend`: suspends the job (workers leave its files
/// alone) or resumes it and queues its pending files again. The queuing is
/// owed by the job's row from the moment it resumes, so a reconcile after an
/// operator that died in between still does it.
async fn suspend_or_resume(
    uj: &UploadJob,
    job: JobRecord,
    db: &Client,
    ctx: &Context,
    notes: &mut Vec<Note>,
) -> Result<JobRecord, Error> {
    let changed = uploads::set_suspended(db, job.id, uj.spec.suspend).await?;
    if changed && uj.spec.suspend {
        info!(job = %job.id, "job suspended");
        notes.push(Note::normal("Suspended", "no new files are started"));
    }
    if let Some((round, pending)) = uploads::resume_owed(db, job.id).await? {
        jobs::publish_items(&ctx.queue, &job, &pending, Some(&round)).await?;
        uploads::resume_queued(db, job.id, &round).await?;
        info!(job = %job.id, files = pending.len(), %round, "job resumed");
        notes.push(Note::normal(
            "Resumed",
            format!("{} pending files queued", pending.len()),
        ));
    }
    if !changed {
        return Ok(job);
    }
    Ok(uploads::get_job(db, job.id).await?)
}

/// Replays every dead letter of the job's files.
async fn replay(db: &Client, ctx: &Context, job: &JobRecord) -> Result<usize, Error> {
    let letters = ctx.queue.dead_letters().await?;
    let job_id = job.id.to_string();
    let mut n = 0;
    for (seq, letter) in letters {
        let ours = match letter.task.as_ref().and_then(|t| t.kind.as_ref()) {
            Some(task::Kind::UploadFile(f)) => f.job_id == job_id,
            Some(task::Kind::PlanUpload(p)) => p.job_id == job_id,
            _ => false,
        };
        if ours {
            jobs::replay_dead_letter(db, &ctx.queue, seq).await?;
            n += 1;
        }
    }
    Ok(n)
}

/// Drops the tasks still queued for the resource.
async fn drop_tasks(ctx: &Context, ns: &str, name: &str) -> Result<u64, Error> {
    let topology = ctx.queue.topology();
    let mut dropped = 0;
    for kind in [TaskKind::UploadPlan, TaskKind::Upload] {
        dropped += ctx
            .queue
            .purge_tasks(&topology.task_subject(kind, ns, name))
            .await?;
    }
    Ok(dropped)
}

/// Deletion: cancel the job (workers drop its tasks), drop its queued
/// tasks, abort its open multipart uploads, delete its rows. Needs no valid
/// spec: a refused resource is deleted as easily as any other.
async fn cleanup(raw: &RawUploadJob, ctx: &Context) -> Result<Action, Error> {
    let ids = Ids::of(raw)?;
    let (job, dropped, aborted) = {
        let mut db = ctx.db.get().await?;
        let Some(job) = uploads::find_job(&db, &ids.uid).await? else {
            return Ok(Action::await_change());
        };
        uploads::cancel(&db, job.id).await?;
        let dropped = drop_tasks(ctx, &ids.ns, &ids.name).await?;
        let tx = db
            .transaction()
            .await
            .map_err(stowage_common::state::StateError::from)?;
        let open = uploads::lock_for_delete(&tx, job.id).await?;
        if !open.is_empty() {
            let client = ctx
                .s3
                .client(&job.namespace, &job.spec.destination.endpoint)
                .await?;
            for u in &open {
                stowage_common::storage::abort_upload(
                    &client,
                    &u.bucket,
                    &u.object_key,
                    &u.upload_id,
                )
                .await
                .map_err(|e| {
                    warn!(key = u.object_key, error = %e, "abort failed; will retry");
                    Error::Abort {
                        bucket: u.bucket.clone(),
                        key: u.object_key.clone(),
                        upload_id: u.upload_id.clone(),
                        message: e.to_string(),
                    }
                })?;
            }
        }
        uploads::delete(&tx, job.id).await?;
        tx.commit()
            .await
            .map_err(stowage_common::state::StateError::from)?;
        (job, dropped, open.len())
    };
    info!(ns = ids.ns, name = ids.name, job = %job.id, dropped, aborted, "upload job cleaned up");
    publish_event(
        ctx,
        raw,
        EventType::Normal,
        "CleanedUp",
        format!("{dropped} queued tasks dropped, {aborted} multipart uploads aborted"),
    )
    .await;
    Ok(Action::await_change())
}
