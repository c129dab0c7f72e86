//! UploadJob controller: registers the job, publishes its planning task,
//! acts on suspend / deadline / TTL / replay, rolls progress up into
//! `.status`, and on deletion drops pending work, aborts open multipart
//! uploads and deletes the job's rows before the finalizer goes.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use kube::api::DeleteParams;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, ResourceExt};
use stowage_common::jobs;
use stowage_common::queue::TaskKind;
use stowage_common::state::lifecycle;
use stowage_common::state::uploads::{self, JobRecord, NewJob};
use stowage_proto::v1::task;
use tracing::{info, warn};

use super::{Context, Error, apply_status, measured, publish_event};
use crate::crd::{FINALIZER, UploadJob};
use crate::status::upload_job::{self as status, Snapshot};

const CONTROLLER: &str = "uploadjob";

pub async fn reconcile(uj: Arc<UploadJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = uj.namespace().ok_or(Error::Metadata("namespace"))?;
    let api: Api<UploadJob> = Api::namespaced(ctx.client.clone(), &ns);
    measured(&ctx, CONTROLLER, async {
        finalizer(&api, FINALIZER, uj, |event| async {
            match event {
                Finalizer::Apply(uj) => apply(&uj, &api, &ctx).await,
                Finalizer::Cleanup(uj) => cleanup(&uj, &ctx).await,
            }
        })
        .await
        .map_err(|e| Error::Finalizer(Box::new(e)))
    })
    .await
}

async fn apply(uj: &UploadJob, api: &Api<UploadJob>, ctx: &Context) -> Result<Action, Error> {
    let uid = uj.uid().ok_or(Error::Metadata("uid"))?;
    let ns = uj.namespace().ok_or(Error::Metadata("namespace"))?;
    let name = uj.name_any();
    let current = uj.status.as_ref();

    if let Err(e) = uj.spec.upload.validate() {
        return refuse(uj, api, ctx, &e.to_string()).await;
    }
    let db = ctx.db.get().await?;
    let job = lifecycle::find_job(&db, &uid).await?;
    if let Some(j) = &job
        && j.spec != uj.spec.upload
    {
        // The CRD's transition rule refuses this at the API server; an API
        // server without CEL (or an old CRD) still gets a clear answer.
        return refuse(
            uj,
            api,
            ctx,
            "source, destination and upload settings cannot change once the job started: \
             create a new UploadJob",
        )
        .await;
    }
    let job = match job {
        None => {
            // Registered once per uid + generation; the planning task id is
            // deterministic, so publishing it again is deduplicated.
            let id = jobs::submit_upload(
                &ctx.db,
                &ctx.queue,
                &NewJob {
                    namespace: ns.clone(),
                    name: name.clone(),
                    source_uid: uid.clone(),
                    generation: uj.metadata.generation.unwrap_or(1),
                    spec: uj.spec.upload.clone(),
                    suspended: uj.spec.suspend,
                },
            )
            .await?;
            info!(%ns, %name, job = %id, "upload job registered");
            publish_event(
                ctx,
                uj,
                EventType::Normal,
                "Registered",
                format!(
                    "job {id} registered{}; planning task published",
                    if uj.spec.suspend { " suspended" } else { "" }
                ),
            )
            .await;
            uploads::get_job(&db, id).await?
        }
        Some(j) => {
            if !j.planned {
                // The task may have been lost with an operator that died
                // between registering and publishing.
                jobs::publish_plan(&ctx.queue, j.id, &ns, &name).await?;
            }
            j
        }
    };

    let mut job = suspend_or_resume(uj, job, ctx).await?;
    let now = Utc::now();
    if let Some(deadline) = status::deadline(uj, &job)
        && now >= deadline
        && lifecycle::fail_unfinished(
            &db,
            job.id,
            &format!(
                "DeadlineExceeded: the job ran longer than activeDeadlineSeconds ({} s)",
                uj.spec.active_deadline_seconds.unwrap_or_default()
            ),
        )
        .await?
    {
        drop_tasks(ctx, &ns, &name).await?;
        publish_event(
            ctx,
            uj,
            EventType::Warning,
            "DeadlineExceeded",
            "activeDeadlineSeconds passed; pending files failed".into(),
        )
        .await;
        job = uploads::get_job(&db, job.id).await?;
    }

    let mut replayed = current.and_then(|s| s.replayed.clone());
    if let Some(request) = status::replay_request(uj) {
        let n = replay(ctx, &job).await?;
        publish_event(
            ctx,
            uj,
            EventType::Normal,
            "Replayed",
            format!("{n} dead-lettered files queued again"),
        )
        .await;
        replayed = Some(request.to_string());
        job = uploads::get_job(&db, job.id).await?;
    }

    let counts = uploads::job_counts(&db, job.id).await?;
    let errors = lifecycle::recent_errors(&db, job.id, status::MAX_ERRORS as i64).await?;
    let mut new = status::compute(
        uj,
        &Snapshot {
            job: &job,
            counts: &counts,
            errors: &errors,
        },
    );
    new.replayed = replayed;
    let finished_now = new.phase.is_some_and(|p| p.is_finished())
        && !current
            .and_then(|s| s.phase)
            .is_some_and(|p| p.is_finished());
    apply_status(api, uj, current, &new).await?;
    if finished_now {
        let (type_, reason) = if job.state == "succeeded" {
            (EventType::Normal, "Completed")
        } else {
            (EventType::Warning, "Failed")
        };
        let note = new
            .conditions
            .iter()
            .find(|c| c.type_ == "Progressing")
            .map(|c| c.message.clone())
            .unwrap_or_default();
        publish_event(ctx, uj, type_, reason, note).await;
    }

    // What happens next, and when.
    if let Some(expires) = status::expiry(uj, &new) {
        if now >= expires {
            info!(%ns, %name, "ttlSecondsAfterFinished passed; deleting the UploadJob");
            api.delete(&name, &DeleteParams::background()).await?;
            return Ok(Action::await_change());
        }
        return Ok(Action::requeue(until(expires)));
    }
    if new.phase.is_some_and(|p| p.is_finished()) {
        return Ok(Action::await_change());
    }
    let mut next = ctx.resync;
    if let Some(deadline) = status::deadline(uj, &job) {
        next = next.min(until(deadline));
    }
    Ok(Action::requeue(next))
}

/// Refuses the spec: InvalidSpec condition, an event, and no requeue until
/// the resource changes.
async fn refuse(
    uj: &UploadJob,
    api: &Api<UploadJob>,
    ctx: &Context,
    message: &str,
) -> Result<Action, Error> {
    let new = status::invalid(uj, message);
    let was_refused = uj.status.as_ref() == Some(&new);
    apply_status(api, uj, uj.status.as_ref(), &new).await?;
    if !was_refused {
        publish_event(
            ctx,
            uj,
            EventType::Warning,
            "InvalidSpec",
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
    ctx: &Context,
) -> Result<JobRecord, Error> {
    let db = ctx.db.get().await?;
    let changed = lifecycle::set_suspended(&db, job.id, uj.spec.suspend).await?;
    if changed && uj.spec.suspend {
        info!(job = %job.id, "job suspended");
        publish_event(
            ctx,
            uj,
            EventType::Normal,
            "Suspended",
            "no new files are started".into(),
        )
        .await;
    }
    if let Some((round, pending)) = lifecycle::resume_owed(&db, job.id).await? {
        jobs::publish_items(&ctx.queue, &job, &pending, Some(&round)).await?;
        lifecycle::resume_queued(&db, job.id, &round).await?;
        info!(job = %job.id, files = pending.len(), %round, "job resumed");
        publish_event(
            ctx,
            uj,
            EventType::Normal,
            "Resumed",
            format!("{} pending files queued", pending.len()),
        )
        .await;
    }
    if !changed {
        return Ok(job);
    }
    Ok(uploads::get_job(&db, job.id).await?)
}

/// Replays every dead letter of the job's files.
async fn replay(ctx: &Context, job: &JobRecord) -> Result<usize, Error> {
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
            jobs::replay_dead_letter(&ctx.db, &ctx.queue, seq).await?;
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
/// tasks, abort its open multipart uploads, delete its rows.
async fn cleanup(uj: &UploadJob, ctx: &Context) -> Result<Action, Error> {
    let uid = uj.uid().ok_or(Error::Metadata("uid"))?;
    let ns = uj.namespace().ok_or(Error::Metadata("namespace"))?;
    let name = uj.name_any();
    let mut db = ctx.db.get().await?;
    let Some(job) = lifecycle::find_job(&db, &uid).await? else {
        return Ok(Action::await_change());
    };
    lifecycle::cancel(&db, job.id).await?;
    let dropped = drop_tasks(ctx, &ns, &name).await?;
    let tx = db
        .transaction()
        .await
        .map_err(stowage_common::state::StateError::from)?;
    let open = lifecycle::lock_for_delete(&tx, job.id).await?;
    if !open.is_empty() {
        let client = ctx.s3.client(&job.spec.destination.endpoint)?;
        for upload in &open {
            abort(&client, upload).await?;
        }
    }
    lifecycle::delete(&tx, job.id).await?;
    tx.commit()
        .await
        .map_err(stowage_common::state::StateError::from)?;
    info!(%ns, %name, job = %job.id, dropped, aborted = open.len(), "upload job cleaned up");
    publish_event(
        ctx,
        uj,
        EventType::Normal,
        "CleanedUp",
        format!(
            "{dropped} queued tasks dropped, {} multipart uploads aborted",
            open.len()
        ),
    )
    .await;
    Ok(Action::await_change())
}

async fn abort(client: &aws_sdk_s3::Client, u: &lifecycle::OpenUpload) -> Result<(), Error> {
    use aws_sdk_s3::error::ProvideErrorMetadata;
    match client
        .abort_multipart_upload()
        .bucket(&u.bucket)
        .key(&u.object_key)
        .upload_id(&u.upload_id)
        .send()
        .await
    {
        Ok(_) => Ok(()),
        Err(e)
            if e.code() == Some("NoSuchUpload")
                || e.raw_response().is_some_and(|r| r.status().as_u16() == 404) =>
        {
            Ok(())
        }
        Err(e) => {
            warn!(key = u.object_key, error = %e, "abort failed; will retry");
            Err(Error::Abort {
                bucket: u.bucket.clone(),
                key: u.object_key.clone(),
                upload_id: u.upload_id.clone(),
                message: e.code().unwrap_or("transport error").to_string(),
            })
        }
    }
}

/// Time from now until `t` (zero if passed), at least a second.
fn until(t: chrono::DateTime<Utc>) -> Duration {
    (t - Utc::now())
        .to_std()
        .unwrap_or_default()
        .max(Duration::from_secs(1))
}
