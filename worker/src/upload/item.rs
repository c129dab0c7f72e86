//! One file of an UploadJob, start to finish: the destination key's lock,
//! the conflict policy, dedup, the transfer, the object history, the events.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use aws_sdk_s3::types::MetadataDirective;
use prost::Message as _;
use sha2::{Digest, Sha256};
use stowage_common::errors::{Classify, ErrorClass};
use stowage_common::locks::{LockClass, LockKey};
use stowage_common::queue::{ProgressKind, backoff_delay};
use stowage_common::spec::{ConflictPolicy, MAX_PART_SIZE, UploadJobSpec, validate_key};
use stowage_common::state::StateError;
use stowage_common::state::uploads::{
    self as state, ItemRecord, ItemState, JobRecord, JobState, ObjectWrite,
};
use stowage_proto::v1::{JobProgress, ObjectLanded};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::UploadError;
use super::checksum::PartChecksums;
use super::encryption::{Sse, with_copy_source_key, with_sse};
use super::multipart::{
    self, Hashed, Input, MissingParts, Opened, Options, StoredObject, Target, Transfer,
};
use super::source::{Source, SourceBody};
use crate::Context;
use crate::config::Sha256Metadata;
use crate::outcome::Outcome;

/// Runs the item and decides what happens to its task.
pub async fn run(
    ctx: &Context,
    job_id: Uuid,
    item_id: i64,
    cancel: &CancellationToken,
    progress: Arc<AtomicU64>,
) -> Outcome {
    let ran = attempt(ctx, job_id, item_id, cancel, progress).await;
    if let Some(end) = &ran.ended {
        announce(ctx, end).await;
    }
    ran.outcome
}

/// What an attempt at an item came to.
pub(crate) struct Ran {
    pub outcome: Outcome,
    /// The item reached its end in this attempt.
    pub ended: Option<Ended>,
}

pub(crate) struct Ended {
    pub job: Arc<CachedJob>,
    pub item_id: i64,
    pub state: ItemState,
}

impl From<Outcome> for Ran {
    fn from(outcome: Outcome) -> Ran {
        Ran {
            outcome,
            ended: None,
        }
    }
}

/// One attempt at the item: what happens to its task, and its end if it
/// reached one (for [`announce`]).
pub(crate) async fn attempt(
    ctx: &Context,
    job_id: Uuid,
    item_id: i64,
    cancel: &CancellationToken,
    progress: Arc<AtomicU64>,
) -> Ran {
    let (item, job) = match load(ctx, job_id, item_id).await {
        Ok(v) => v,
        // The job was deleted (its UploadJob is gone): nothing to do.
        Err(StateError::NotFound { .. }) => return Outcome::Done { label: "cancelled" }.into(),
        Err(e) => return retry_later(&e, 1).into(),
    };
    if item.state.is_terminal() {
        // A duplicate delivery of finished work — or a task whose worker
        // could not tell the indexer about the object it wrote (NATS was
        // down): say it again; the event's id makes a repeat a no-op.
        if item.state == ItemState::Succeeded
            && let Err(e) = republish_landed(ctx, &item, &job.record).await
        {
            return Outcome::Retry {
                delay: Duration::from_secs(5),
                error: format!("object-landed event not published: {e}"),
            }
            .into();
        }
        return Outcome::Done { label: "ok" }.into();
    }
    match item.job_state {
        // The operator re-publishes the pending files when the job resumes.
        JobState::Suspended => return Outcome::Done { label: "suspended" }.into(),
        JobState::Cancelled => return Outcome::Done { label: "cancelled" }.into(),
        _ => {}
    }
    let started = std::time::Instant::now();
    let (outcome, state) = match process(ctx, &item, &job, cancel, progress).await {
        Ok(state) => {
            info!(item = item.id, key = item.dest_key, state = state.as_str(), elapsed = ?started.elapsed(), "file done");
            let label = if state == ItemState::Succeeded {
                "ok"
            } else {
                "skipped"
            };
            (Outcome::Done { label }, state)
        }
        Err(UploadError::KeyBusy(key)) => {
            return Outcome::Wait {
                delay: backoff_delay(1, Duration::from_secs(2), Duration::from_secs(2)),
                reason: format!("destination {key} is being written by another worker"),
            }
            .into();
        }
        Err(UploadError::EventOwed(e)) => {
            // The item is done; only its event is missing.
            return Outcome::Retry {
                delay: Duration::from_secs(5),
                error: format!("object-landed event not published: {e}"),
            }
            .into();
        }
        Err(UploadError::Cancelled) => {
            // Hand the task back at once; the parts stored so far stay.
            if let Ok(db) = ctx.db.get().await
                && let Err(e) = state::hand_back_item(&db, item.id).await
            {
                warn!(item = item.id, error = %e, "could not hand the item back; its task is NAKed anyway");
            }
            return Outcome::Wait {
                delay: Duration::ZERO,
                reason: "worker shutting down".into(),
            }
            .into();
        }
        Err(e) => match fail(ctx, &item, &job.record, &e).await {
            Ok(outcome @ Outcome::Dead { .. }) => (outcome, ItemState::Failed),
            Ok(outcome) => return outcome.into(),
            Err(state_err) => return retry_later(&state_err, item.attempts as u32 + 1).into(),
        },
    };
    Ran {
        outcome,
        ended: Some(Ended {
            job,
            item_id: item.id,
            state,
        }),
    }
}

/// Tells whoever follows the job that an item ended (the operator
/// reconciles on it, stowctl --wait wakes up).
pub(crate) async fn announce(ctx: &Context, end: &Ended) {
    let job = &end.job.record;
    let event = JobProgress {
        job_id: job.id.to_string(),
        item_id: end.item_id,
        item_state: end.state.as_str().into(),
        namespace: job.namespace.clone(),
        name: job.name.clone(),
    };
    let subject =
        ctx.queue
            .topology()
            .progress_subject(ProgressKind::Upload, &job.namespace, &job.name);
    if let Err(e) = ctx
        .queue
        .publish_event(subject, event.encode_to_vec())
        .await
    {
        warn!(error = %e, "progress event not published");
    }
}

fn retry_later(e: &dyn std::fmt::Display, attempt: u32) -> Outcome {
    Outcome::Retry {
        delay: backoff_delay(attempt, Duration::from_secs(1), Duration::from_secs(30)),
        error: e.to_string(),
    }
}

/// Fails item `item_id` of a task that died without recording it (a panic,
/// say): its multipart upload is aborted and the item failed, so its job
/// can end. An item already finished is left as it is.
pub async fn fail_dead(
    ctx: &Context,
    item_id: i64,
    error: &str,
    class: ErrorClass,
) -> Result<(), UploadError> {
    let db = ctx.db.get().await?;
    let item = state::get_item(&db, item_id).await?;
    if item.state.is_terminal() {
        return Ok(());
    }
    if let Some((rec, _)) = state::get_multipart(&db, item.id).await?
        && let Ok(job) = state::get_job(&db, item.job_id).await
        && let Ok(client) = ctx
            .s3
            .client(&job.namespace, &job.spec.destination.endpoint)
            .await
    {
        multipart::abort(&client, &rec).await;
    }
    state::delete_multipart(&db, item.id).await?;
    state::fail_item(&db, &item, error, class.as_str(), true).await?;
    Ok(())
}

/// A job as its files need it, cached by each worker: the record (immutable
/// once registered: a new generation is a new job) and the verdict on its
/// spec. Both are read once per job, not per file: a spec lists every URL of
/// its job.
pub struct CachedJob {
    pub record: JobRecord,
    /// Why the spec is invalid, if it is: each file then fails for good.
    pub invalid: Option<String>,
}

async fn load(
    ctx: &Context,
    job_id: Uuid,
    item_id: i64,
) -> Result<(ItemRecord, Arc<CachedJob>), StateError> {
    let db = ctx.db.get().await?;
    let item = state::get_item(&db, item_id).await?;
    let cached = ctx
        .jobs
        .lock()
        .ok()
        .and_then(|jobs| jobs.get(&job_id).cloned());
    let job = match cached {
        Some(job) => job,
        None => {
            let record = state::get_job(&db, job_id).await?;
            let job = Arc::new(CachedJob {
                invalid: record.spec.validate().err().map(|e| e.to_string()),
                record,
            });
            if let Ok(mut jobs) = ctx.jobs.lock() {
                if jobs.len() >= 256 {
                    jobs.clear();
                }
                jobs.insert(job_id, Arc::clone(&job));
            }
            job
        }
    };
    Ok((item, job))
}

/// Records a failed attempt: another try later, or the end of the item.
async fn fail(
    ctx: &Context,
    item: &ItemRecord,
    job: &JobRecord,
    e: &UploadError,
) -> Result<Outcome, StateError> {
    let spec = &job.spec;
    let attempt = item.attempts as u32 + 1;
    let class = e.class();
    let message = e.to_string();
    let db = ctx.db.get().await?;
    if class == ErrorClass::Retryable && attempt < spec.retry.max_attempts {
        state::record_retry(&db, item.id, &message).await?;
        let b = &spec.retry.backoff;
        let delay = backoff_delay(
            attempt,
            Duration::from_millis(b.base_millis),
            Duration::from_millis(b.max_millis),
        );
        warn!(item = item.id, key = item.dest_key, attempt, ?delay, error = %message, "upload attempt failed; will retry");
        return Ok(Outcome::Retry {
            delay,
            error: message,
        });
    }
    // Permanent, or out of attempts: abort what was started, then fail.
    if let Some((rec, _)) = state::get_multipart(&db, item.id).await?
        && let Ok(client) = ctx
            .s3
            .client(&job.namespace, &spec.destination.endpoint)
            .await
    {
        multipart::abort(&client, &rec).await;
    }
    state::delete_multipart(&db, item.id).await?;
    let attempts = state::fail_item(&db, item, &message, class.as_str(), true).await?;
    warn!(item = item.id, key = item.dest_key, attempts, class = class.as_str(), error = %message, "upload failed for good; dead-lettering");
    Ok(Outcome::Dead {
        error: message,
        class,
        attempts: attempts as u32,
    })
}

async fn process(
    ctx: &Context,
    item: &ItemRecord,
    job: &CachedJob,
    cancel: &CancellationToken,
    progress: Arc<AtomicU64>,
) -> Result<ItemState, UploadError> {
    if let Some(reason) = &job.invalid {
        return Err(UploadError::Invalid(reason.clone()));
    }
    let spec = &job.record.spec;
    validate_key(&item.dest_key)?;
    let dest = &spec.destination;
    let namespace = job.record.namespace.as_str();
    let client = ctx.s3.client(namespace, &dest.endpoint).await?;
    let sse = Sse::resolve(dest.encryption.as_ref(), namespace, ctx.s3.secrets()).await?;
    let endpoint = dest.endpoint.label().to_string();
    let lock_key = LockKey::new(
        LockClass::ObjectKey,
        format!("{endpoint}/{}/{}", dest.bucket, item.dest_key),
    );
    let lock = ctx
        .locks
        .try_lock(lock_key)
        .await?
        .ok_or_else(|| UploadError::KeyBusy(format!("{}/{}", dest.bucket, item.dest_key)))?;
    let resumable = {
        let db = ctx.db.get().await?;
        state::start_item(&db, item).await?
    };
    let target = Target {
        client: &client,
        endpoint: &endpoint,
        bucket: &dest.bucket,
        key: &item.dest_key,
        sse: sse.as_ref(),
        content_type: None,
    };
    let result = tokio::select! {
        r = transfer(ctx, namespace, item, spec, &target, &lock, progress, resumable) => r,
        reason = lock.lost() => Err(UploadError::LockLost(reason)),
        _ = cancel.cancelled() => Err(UploadError::Cancelled),
    };
    if lock.is_held()
        && let Err(e) = lock.release().await
    {
        warn!(error = %e, "releasing the key lock failed; closing its session releases it");
    }
    result
}

/// A server-side copy of `from` (as a HEAD found it) to `to`, then checked
/// with a fresh HEAD of `to`: an object that does not match is not counted.
async fn copy(
    target: &Target<'_>,
    from: &str,
    found: &StoredObject,
    to: &str,
    sha: Option<&str>,
) -> Result<(), UploadError> {
    if found.opaque {
        return Err(UploadError::Encryption(format!(
            "cannot copy {from} to {to}: {from} is encrypted with other parameters than this \
             job's (another SSE-C key, or none)"
        )));
    }
    let req = with_sse!(
        target
            .client
            .copy_object()
            .bucket(target.bucket)
            .key(to)
            .copy_source(multipart::copy_source(target.bucket, from))
            .metadata_directive(MetadataDirective::Copy),
        target.sse
    );
    with_copy_source_key!(req, target.sse)
        .send()
        .await
        .map_err(|e| stowage_common::storage::s3_error("CopyObject", e))?;
    multipart::verify_copy(target, to, found, sha).await
}

#[allow(clippy::too_many_arguments)]
async fn transfer(
    ctx: &Context,
    namespace: &str,
    item: &ItemRecord,
    spec: &UploadJobSpec,
    target: &Target<'_>,
    lock: &stowage_common::locks::SessionLock,
    progress: Arc<AtomicU64>,
    resumable: bool,
) -> Result<ItemState, UploadError> {
    let existing = match destination(ctx, item, spec, target).await? {
        Destination::Skipped(state) => return Ok(state),
        Destination::Write(existing) => existing,
    };
    let source = Source::new(namespace, &spec.source, &ctx.s3, &ctx.http, ctx.min_rate).await?;
    let t = Transfer {
        db: ctx.db.clone(),
        metrics: ctx.metrics.clone(),
        hook: ctx.hook.clone(),
        progress,
    };
    let mut resume = if resumable {
        t.resume_point(item.id, target, spec.part_size_bytes, spec.checksum)
            .await?
    } else {
        None
    };
    // An upload whose hashing pass is recorded resumes by reading only the
    // parts it still has to send: no hashing pass, no re-read of the stored
    // parts (see Transfer::run for why the object is still the hashed bytes).
    let mut recorded = None;
    let mut missing = None;
    if let Some(r) = &resume
        && let Some(hashed) = r.hashed()
    {
        match MissingParts::open(
            &source,
            &item.source_ref,
            r,
            hashed.clone(),
            spec.part_size_bytes,
        )
        .await?
        {
            Opened::Ready(m) => {
                missing = Some(m);
                recorded = Some(hashed);
            }
            Opened::Unsupported => {
                // A source that serves no ranges is read whole, but the
                // hashing pass is not repeated: the upload's own hash must
                // match the recorded one before it is completed.
                info!(
                    key = target.key,
                    "the source serves no byte ranges; reading it whole to resume"
                );
                recorded = Some(hashed);
            }
            Opened::Changed(reason) => {
                info!(
                    key = target.key,
                    reason, "the source changed since the upload began; starting over"
                );
                t.forget(item.id, target).await?;
                resume = None;
            }
        }
    }
    let mut known: Option<Hashed> = None;
    if spec.dedup {
        let hashed = match &recorded {
            Some(h) => h.clone(),
            None => hash_source(&source, &item.source_ref, spec).await?,
        };
        let (sha, size) = (hashed.sha256.as_str(), hashed.size);
        if let Some(state) =
            dedup(ctx, item, spec, target, existing.as_ref(), lock, sha, size).await?
        {
            return Ok(state);
        }
        known = Some(hashed);
    }
    let archived = archive_if_versioned(ctx, spec, target, existing.as_ref()).await?;
    let input = match missing {
        Some(m) => {
            known = recorded;
            Input::Missing(m)
        }
        None => {
            if known.is_none() {
                known = recorded;
            }
            let mut body = source.open(&item.source_ref).await?;
            if known.is_none()
                && ctx.sha256_metadata == Sha256Metadata::Always
                && body.size.is_none_or(|size| size > spec.part_size_bytes)
            {
                // A multipart object's metadata is set when the upload is
                // created: hash the source first (the upload checks it gets
                // the same bytes, part by part and as a whole).
                let started = std::time::Instant::now();
                let hashed = hash_body(body, spec).await?;
                debug!(key = target.key, size = hashed.size, took = ?started.elapsed(), "source hashed up front");
                known = Some(hashed);
                body = source.open(&item.source_ref).await?;
            }
            Input::Stream(body)
        }
    };
    // Status shows the size of a file that takes a while; a small file's
    // size is recorded when it finishes.
    let size = match &input {
        Input::Missing(_) => known.as_ref().map(|k| k.size),
        Input::Stream(body) | Input::After { body, .. } => body.size,
    };
    if let Some(size) = size.filter(|s| *s > spec.part_size_bytes) {
        let db = ctx.db.get().await?;
        state::set_progress(&db, item.id, 0, Some(size as i64)).await?;
    }
    let opts = Options {
        part_size: spec.part_size_bytes,
        concurrency: spec.concurrency as usize,
        algorithm: spec.checksum,
        known,
        sha256_metadata_copy: ctx.sha256_metadata == Sha256Metadata::Copy,
    };
    let up = t.run(item.id, target, &opts, resume, input, lock).await?;
    if up.parts > 1 || up.parts_resumed > 0 {
        // Only the multipart path leaves bookkeeping to clear.
        let db = ctx.db.get().await?;
        state::delete_multipart(&db, item.id).await?;
    }
    let written = Written {
        target,
        etag: up.etag.as_deref(),
        archived: archived.as_deref(),
    };
    finish(
        ctx,
        item,
        ItemState::Succeeded,
        &up.sha256_hex,
        up.size as i64,
        Some(written),
    )
    .await
}

/// What the destination holds before anything is written.
pub(crate) enum Destination {
    /// Conflict policy `skip` found an object there; the item is ended.
    Skipped(ItemState),
    /// Go on writing; the object already there, when the policy or dedup
    /// needs to know it.
    Write(Option<StoredObject>),
}

/// Applies the conflict policy before any byte is sent. Only the policies
/// that care about what is already there (and dedup) pay a HEAD.
pub(crate) async fn destination(
    ctx: &Context,
    item: &ItemRecord,
    spec: &UploadJobSpec,
    target: &Target<'_>,
) -> Result<Destination, UploadError> {
    if spec.conflict_policy == ConflictPolicy::Overwrite && !spec.dedup {
        return Ok(Destination::Write(None));
    }
    let existing = multipart::head_stored(target, target.key).await?;
    match existing {
        Some(e) if spec.conflict_policy == ConflictPolicy::Skip => {
            info!(key = target.key, "destination exists; conflict policy skip");
            let sha = e.sha256.as_deref().unwrap_or("");
            let state = finish(ctx, item, ItemState::SkippedExists, sha, e.size, None).await?;
            Ok(Destination::Skipped(state))
        }
        existing => Ok(Destination::Write(existing)),
    }
}

/// Dedup of content whose SHA-256 is known before any byte is sent: the
/// destination already holds it (skipped), or another object of the bucket
/// does and is copied server-side. `None`: it has to be uploaded.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn dedup(
    ctx: &Context,
    item: &ItemRecord,
    spec: &UploadJobSpec,
    target: &Target<'_>,
    existing: Option<&StoredObject>,
    lock: &stowage_common::locks::SessionLock,
    sha: &str,
    size: u64,
) -> Result<Option<ItemState>, UploadError> {
    if existing.and_then(|e| e.sha256.as_deref()) == Some(sha) {
        info!(key = target.key, "destination already holds this content");
        let state = finish(ctx, item, ItemState::SkippedExists, sha, size as i64, None).await?;
        return Ok(Some(state));
    }
    let twin = {
        let db = ctx.db.get().await?;
        state::object_with_content(&db, target.bucket, sha).await?
    };
    let Some(twin) = twin.filter(|t| t.object_key != target.key && size <= MAX_PART_SIZE) else {
        return Ok(None);
    };
    let Some(found) = usable_twin(target, &twin.object_key)
        .await?
        .filter(|h| h.sha256.as_deref() == Some(sha) && h.size == size as i64)
    else {
        return Ok(None);
    };
    let archived = archive_if_versioned(ctx, spec, target, existing).await?;
    lock.ensure_held()?;
    copy(target, &twin.object_key, &found, target.key, Some(sha)).await?;
    info!(
        key = target.key,
        from = twin.object_key,
        "duplicate content copied server-side"
    );
    let written = Written {
        target,
        etag: None,
        archived: archived.as_deref(),
    };
    let state = ItemState::SkippedDuplicate;
    Ok(Some(
        finish(ctx, item, state, sha, size as i64, Some(written)).await?,
    ))
}

/// A HEAD of a dedup candidate: one the job's credentials or encryption
/// cannot read (another SSE-C key, a KMS key it may not use) is no
/// candidate, and the file is uploaded.
async fn usable_twin(target: &Target<'_>, key: &str) -> Result<Option<StoredObject>, UploadError> {
    match multipart::head_stored(target, key).await {
        Ok(found) => Ok(found.filter(|f| !f.opaque)),
        Err(UploadError::S3(e)) if e.status.is_some_and(|s| (400..500).contains(&s)) => {
            debug!(key, error = %e, "dedup candidate unreadable with this job's settings");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Conflict policy `version`: preserve the current object before replacing it.
pub(crate) async fn archive_if_versioned(
    ctx: &Context,
    spec: &UploadJobSpec,
    target: &Target<'_>,
    existing: Option<&StoredObject>,
) -> Result<Option<String>, UploadError> {
    let Some(existing) = existing.filter(|_| spec.conflict_policy == ConflictPolicy::Version)
    else {
        return Ok(None);
    };
    let current = {
        let db = ctx.db.get().await?;
        state::current_object(&db, target.bucket, target.key).await?
    };
    let version = current.map_or(0, |c| c.version);
    let archive = format!("{}.stowage-v{version}", target.key);
    copy(
        target,
        target.key,
        existing,
        &archive,
        existing.sha256.as_deref(),
    )
    .await?;
    info!(key = target.key, archive, "previous version preserved");
    Ok(Some(archive))
}

/// An object the item wrote: its history row and its object-landed event.
pub(crate) struct Written<'a> {
    pub target: &'a Target<'a>,
    pub etag: Option<&'a str>,
    /// Where the previous version was preserved (conflict policy `version`).
    pub archived: Option<&'a str>,
}

/// Ends the item, with the object it wrote if it wrote one.
pub(crate) async fn finish(
    ctx: &Context,
    item: &ItemRecord,
    state: ItemState,
    sha: &str,
    size: i64,
    written: Option<Written<'_>>,
) -> Result<ItemState, UploadError> {
    let object = written.as_ref().map(|w| ObjectWrite {
        bucket: w.target.bucket,
        key: w.target.key,
        etag: w.etag,
        archived_previous_to: w.archived,
    });
    let version = {
        let db = ctx.db.get().await?;
        state::finish_item(&db, item, state, sha, size, object.as_ref()).await?
    };
    if let (Some(w), Some(version)) = (written, version) {
        let event = ObjectLanded {
            endpoint: w.target.endpoint.to_string(),
            bucket: w.target.bucket.to_string(),
            key: w.target.key.to_string(),
            sha256_hex: sha.to_string(),
            size: size as u64,
            job_id: item.job_id.to_string(),
            version: version as u32,
        };
        // After the object row: a lost event only delays indexing until the
        // collection's next resync.
        publish_landed(ctx, &event).await?;
    }
    Ok(state)
}

/// Publishes an object-landed event, trying again for a few seconds: the
/// event is what makes collections that watch uploads index the object.
/// When NATS stays away, the item is finished but its event is owed: the
/// task is handed back, and its next delivery says it again.
async fn publish_landed(ctx: &Context, event: &ObjectLanded) -> Result<(), UploadError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match ctx.queue.publish_object_landed(event).await {
            Ok(()) => return Ok(()),
            Err(e) if attempt < 4 => {
                warn!(key = event.key, attempt, error = %e, "object-landed event not published; trying again");
                tokio::time::sleep(backoff_delay(
                    attempt,
                    Duration::from_millis(250),
                    Duration::from_secs(2),
                ))
                .await;
            }
            Err(e) => return Err(UploadError::EventOwed(e.to_string())),
        }
    }
}

/// The object-landed event of a finished item, said again.
async fn republish_landed(
    ctx: &Context,
    item: &ItemRecord,
    job: &JobRecord,
) -> Result<(), UploadError> {
    let dest = &job.spec.destination;
    let object = {
        let db = ctx.db.get().await?;
        state::current_object(&db, &dest.bucket, &item.dest_key).await?
    };
    let Some(o) = object else { return Ok(()) };
    let event = ObjectLanded {
        endpoint: dest.endpoint.label().to_string(),
        bucket: o.bucket,
        key: o.object_key,
        sha256_hex: o.sha256_hex,
        size: u64::try_from(o.size_bytes).unwrap_or_default(),
        job_id: item.job_id.to_string(),
        version: u32::try_from(o.version).unwrap_or_default(),
    };
    publish_landed(ctx, &event).await
}

/// Reads the whole source once for its SHA-256 and size (dedup).
async fn hash_source(
    source: &Source,
    source_ref: &str,
    spec: &UploadJobSpec,
) -> Result<Hashed, UploadError> {
    hash_body(source.open(source_ref).await?, spec).await
}

/// Reads `body` to its end: its SHA-256 (hex), size, the checksum of each
/// part-sized slice (what every part of the upload must then carry) and the
/// validator it came with.
async fn hash_body(mut body: SourceBody, spec: &UploadJobSpec) -> Result<Hashed, UploadError> {
    use futures::StreamExt;
    let mut h = Sha256::new();
    let mut parts = PartChecksums::new(
        spec.checksum,
        multipart::effective_part_size(spec.part_size_bytes),
    );
    let mut n = 0u64;
    while let Some(chunk) = body.stream.next().await {
        let chunk = chunk?;
        n += chunk.len() as u64;
        h.update(&chunk);
        parts.update(&chunk);
    }
    Ok(Hashed {
        sha256: hex::encode(h.finalize()),
        size: n,
        part_checksums: parts.finish(),
        validator: body.validator,
    })
}
