//! One `Ingest.Upload` request, start to finish: registered (or found) by
//! its request id, the destination key's lock, the conflict policy and
//! dedup, then the client's bytes through the resumable multipart transfer
//! ([`crate::upload::multipart`]), the object history and its event
//! ([`crate::upload::item`]). What an interrupted call stored stays for
//! the next call of the same request ([`resume_offset`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use stowage_common::errors::{Classify, ErrorClass};
use stowage_common::locks::{LockClass, LockKey, SessionLock};
use stowage_common::spec::UploadJobSpec;
use stowage_common::state::ingest::{self as state, Request};
use stowage_common::state::uploads::{self as uploads, ItemRecord, ItemState, PartRecord};
use stowage_proto::v1::UploadResponse;
use tracing::{info, warn};

use super::header::{HeaderError, Plan, same_request};
use super::stream::{self, EndSlot, Ended, Messages};
use crate::Context;
use crate::config::Sha256Metadata;
use crate::upload::UploadError;
use crate::upload::encryption::Sse;
use crate::upload::item::{Destination, Written, archive_if_versioned, dedup, destination, finish};
use crate::upload::multipart::{
    self, Hashed, Input, Options, Target, Transfer, effective_part_size, hasher_after,
};

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("{0}")]
    Header(#[from] HeaderError),
    #[error(
        "request id {0} was used for another upload (another destination, size, SHA-256 or \
         policy): give this upload a new request id"
    )]
    RequestReused(String),
    #[error("offset {offset} is not a resume point of this request: resume from byte {resume}")]
    NotResumePoint { offset: u64, resume: u64 },
    #[error("{ended}; the {stored} bytes stored before it are kept: ask Status and resume")]
    Stream { ended: Ended, stored: u64 },
    #[error(
        "the bytes received hash to SHA-256 {received}, the header said {expected}: nothing \
         was stored"
    )]
    Sha256Mismatch { expected: String, received: String },
    #[error("another stream is writing {0} now; try again")]
    Busy(String),
    #[error("{0}")]
    Upload(#[from] UploadError),
    #[error("no request {request_id} in namespace {namespace}")]
    NotFound {
        namespace: String,
        request_id: String,
    },
}

impl From<stowage_common::state::StateError> for IngestError {
    fn from(e: stowage_common::state::StateError) -> Self {
        IngestError::Upload(e.into())
    }
}

impl From<stowage_common::storage::ClientError> for IngestError {
    fn from(e: stowage_common::storage::ClientError) -> Self {
        IngestError::Upload(e.into())
    }
}

impl From<stowage_common::db::PoolError> for IngestError {
    fn from(e: stowage_common::db::PoolError) -> Self {
        IngestError::Upload(e.into())
    }
}

impl IngestError {
    /// The gRPC status a client acts on (see `ingest.proto`).
    pub fn status(&self) -> tonic::Status {
        use tonic::Status;
        let message = self.to_string();
        match self {
            IngestError::Header(_)
            | IngestError::Sha256Mismatch { .. }
            | IngestError::Stream {
                ended: Ended::Long { .. } | Ended::SecondHeader,
                ..
            } => Status::invalid_argument(message),
            IngestError::RequestReused(_) | IngestError::NotResumePoint { .. } => {
                Status::failed_precondition(message)
            }
            IngestError::Stream {
                ended: Ended::Idle(_),
                ..
            } => Status::deadline_exceeded(message),
            IngestError::Stream { .. } | IngestError::Busy(_) => Status::aborted(message),
            IngestError::NotFound { .. } => Status::not_found(message),
            IngestError::Upload(UploadError::InvalidKey(_)) => Status::invalid_argument(message),
            IngestError::Upload(e) if e.class() == ErrorClass::Permanent => {
                Status::failed_precondition(message)
            }
            IngestError::Upload(_) => Status::unavailable(message),
        }
    }

    /// The metric label of a call that ended with this error.
    pub fn outcome(&self) -> &'static str {
        match self {
            IngestError::Stream { .. } | IngestError::Busy(_) => "interrupted",
            IngestError::Upload(e) if e.class() == ErrorClass::Retryable => "interrupted",
            IngestError::Header(_)
            | IngestError::RequestReused(_)
            | IngestError::NotResumePoint { .. }
            | IngestError::NotFound { .. } => "refused",
            IngestError::Sha256Mismatch { .. } | IngestError::Upload(_) => "failed",
        }
    }

    /// Whether the request can go on from what is stored (else it failed
    /// and its multipart upload is aborted).
    fn keeps_parts(&self) -> bool {
        match self {
            IngestError::Sha256Mismatch { .. } => false,
            IngestError::Upload(e) => e.class() == ErrorClass::Retryable,
            _ => true,
        }
    }
}

/// Where a request's next call should start: the end of the longest run of
/// recorded parts from part 1 that kept their running SHA-256 — short of
/// the object's end, so a call always has a part to send.
pub fn resume_offset(parts: &HashMap<i32, PartRecord>, part_size: u64, size: u64) -> u64 {
    let mut offset = 0u64;
    let mut number = 1;
    while let Some(p) = parts.get(&number) {
        let end = offset.saturating_add(part_size);
        if p.sha256_state.is_none() || p.size_bytes as u64 != part_size || end >= size {
            break;
        }
        offset = end;
        number += 1;
    }
    offset
}

/// Runs the request whose header is `plan`; `messages` are the call's
/// messages after the header.
pub async fn run(
    ctx: &Context,
    plan: Plan,
    messages: Messages,
) -> Result<UploadResponse, IngestError> {
    let request = {
        let db = ctx.db.get().await?;
        state::register(&db, &plan.namespace, &plan.source, &plan.spec, &plan.key).await?
    };
    if !same_request(&request.job.spec, &request.item.dest_key, &plan) {
        return Err(IngestError::RequestReused(plan.request_id));
    }
    match request.item.state {
        ItemState::Succeeded | ItemState::SkippedDuplicate | ItemState::SkippedExists => {
            ctx.metrics.ingest("replayed");
            let db = ctx.db.get().await?;
            return result_of(&db, &request, 0, 0).await;
        }
        ItemState::Failed => {
            // A new attempt of a request that failed (a wrong SHA-256, say).
            let db = ctx.db.get().await?;
            uploads::reset_for_replay(&db, &[request.item.id]).await?;
        }
        ItemState::Pending | ItemState::Running => {}
    }
    let spec = &request.job.spec;
    let dest = &spec.destination;
    let namespace = plan.namespace.as_str();
    let client = ctx.s3.client(namespace, &dest.endpoint).await?;
    let sse = Sse::resolve(dest.encryption.as_ref(), namespace, ctx.s3.secrets()).await?;
    let endpoint = dest.endpoint.label().to_string();
    let lock = ctx
        .locks
        .try_lock(LockKey::new(
            LockClass::ObjectKey,
            format!("{endpoint}/{}/{}", dest.bucket, plan.key),
        ))
        .await
        .map_err(UploadError::from)?
        .ok_or_else(|| IngestError::Busy(format!("{}/{}", dest.bucket, plan.key)))?;
    let target = Target {
        client: &client,
        endpoint: &endpoint,
        bucket: &dest.bucket,
        key: &plan.key,
        sse: sse.as_ref(),
        content_type: plan.source.content_type.as_deref(),
    };
    let item = &request.item;
    let end = EndSlot::default();
    let result = tokio::select! {
        r = store(ctx, &plan, spec, item, &target, &lock, messages, end.clone()) => r,
        reason = lock.lost() => Err(UploadError::LockLost(reason).into()),
    };
    // A stream that ended early is told as such, whatever the transfer
    // made of it.
    let result = match (result, end.get()) {
        (Err(_), Some(ended)) => Err(IngestError::Stream { ended, stored: 0 }),
        (r, _) => r,
    };
    let result = match result {
        Ok(state) => {
            let db = ctx.db.get().await?;
            let (received, resumed) = match state {
                ItemState::Succeeded => (plan.size - plan.offset, plan.offset),
                _ => (0, 0),
            };
            let response = result_of(&db, &request, received, resumed).await;
            ctx.metrics.ingest(match state {
                ItemState::SkippedDuplicate => "deduplicated",
                ItemState::SkippedExists => "skipped",
                _ => "ok",
            });
            response
        }
        Err(e) => Err(settle_failure(ctx, item, &target, spec, e).await),
    };
    if lock.is_held()
        && let Err(e) = lock.release().await
    {
        warn!(error = %e, "releasing the key lock failed; closing its session releases it");
    }
    result
}

/// Records how the call ended when it did not store the object: kept for a
/// resume (pending, with the error) or failed for good (upload aborted).
async fn settle_failure(
    ctx: &Context,
    item: &ItemRecord,
    target: &Target<'_>,
    spec: &UploadJobSpec,
    e: IngestError,
) -> IngestError {
    ctx.metrics.ingest(e.outcome());
    let recorded = async {
        let db = ctx.db.get().await?;
        if e.keeps_parts() {
            uploads::record_retry(&db, item.id, &e.to_string()).await?;
            let stored = match uploads::get_multipart(&db, item.id).await? {
                Some((_, parts)) => {
                    let parts = parts.into_iter().map(|p| (p.part_number, p)).collect();
                    let size = item.size_bytes.and_then(|s| u64::try_from(s).ok());
                    resume_offset(
                        &parts,
                        effective_part_size(spec.part_size_bytes),
                        size.unwrap_or(u64::MAX),
                    )
                }
                None => 0,
            };
            Ok::<_, IngestError>(stored)
        } else {
            if let Some((rec, _)) = uploads::get_multipart(&db, item.id).await? {
                multipart::abort(target.client, &rec).await;
                uploads::delete_multipart(&db, item.id).await?;
            }
            uploads::fail_item(
                &db,
                item,
                &e.to_string(),
                ErrorClass::Permanent.as_str(),
                false,
            )
            .await?;
            Ok(0)
        }
    }
    .await;
    match (e, recorded) {
        (IngestError::Stream { ended, .. }, Ok(stored)) => {
            info!(key = target.key, %ended, stored, "ingest stream ended early; parts kept");
            IngestError::Stream { ended, stored }
        }
        (e, Ok(_)) => e,
        (e, Err(state)) => {
            warn!(key = target.key, error = %e, state_error = %state, "could not record how the ingest call ended");
            e
        }
    }
}

/// The conflict policy, dedup, then the transfer of the client's bytes.
#[allow(clippy::too_many_arguments)]
async fn store(
    ctx: &Context,
    plan: &Plan,
    spec: &UploadJobSpec,
    item: &ItemRecord,
    target: &Target<'_>,
    lock: &SessionLock,
    messages: Messages,
    end: EndSlot,
) -> Result<ItemState, IngestError> {
    let resumable = {
        let db = ctx.db.get().await?;
        uploads::start_item(&db, item).await?
    };
    let existing = match destination(ctx, item, spec, target).await? {
        Destination::Skipped(state) => return Ok(state),
        Destination::Write(existing) => existing,
    };
    let size = plan.size;
    if spec.dedup
        && let Some(sha) = plan.source.sha256.as_deref()
        && let Some(state) =
            dedup(ctx, item, spec, target, existing.as_ref(), lock, sha, size).await?
    {
        return Ok(state);
    }
    let part_size = effective_part_size(spec.part_size_bytes);
    let t = Transfer {
        db: ctx.db.clone(),
        metrics: ctx.metrics.clone(),
        hook: ctx.hook.clone(),
        progress: Arc::new(AtomicU64::new(0)),
    };
    let resume = if resumable {
        t.resume_point(item.id, target, spec.part_size_bytes, spec.checksum)
            .await?
    } else {
        None
    };
    let stored = resume
        .as_ref()
        .map_or(0, |r| resume_offset(&r.done, part_size, size));
    if plan.offset > stored {
        return Err(IngestError::NotResumePoint {
            offset: plan.offset,
            resume: stored,
        });
    }
    let after = i32::try_from(plan.offset / part_size).unwrap_or(i32::MAX);
    let body = stream::body(messages, size - plan.offset, ctx.ingest.idle_timeout, end);
    let input = match (&resume, after) {
        (_, 0) => Input::Stream(body),
        (Some(r), after) => match hasher_after(&r.done, after) {
            Some(hasher) => Input::After {
                body,
                after,
                hasher: Box::new(hasher),
            },
            None => {
                return Err(IngestError::NotResumePoint {
                    offset: plan.offset,
                    resume: stored,
                });
            }
        },
        (None, _) => {
            return Err(IngestError::NotResumePoint {
                offset: plan.offset,
                resume: 0,
            });
        }
    };
    let archived = archive_if_versioned(ctx, spec, target, existing.as_ref()).await?;
    {
        let db = ctx.db.get().await?;
        uploads::set_progress(&db, item.id, plan.offset as i64, Some(size as i64)).await?;
    }
    let known = plan.source.sha256.clone().map(|sha256| Hashed {
        sha256,
        size,
        part_checksums: Vec::new(),
        validator: None,
    });
    let opts = Options {
        part_size: spec.part_size_bytes,
        concurrency: spec.concurrency as usize,
        algorithm: spec.checksum,
        sha256_metadata_copy: known.is_none() && ctx.sha256_metadata != Sha256Metadata::Known,
        known,
    };
    let up = match t.run(item.id, target, &opts, resume, input, lock).await {
        Ok(up) => up,
        Err(UploadError::SourceChangedDuringUpload { hashed, read }) => {
            return Err(IngestError::Sha256Mismatch {
                expected: hashed,
                received: read,
            });
        }
        Err(e) => return Err(e.into()),
    };
    ctx.metrics.ingest_received_bytes.inc_by(size - plan.offset);
    if up.size != size {
        return Err(UploadError::Verification {
            key: target.key.to_string(),
            message: format!("stored {} bytes of the {size} announced", up.size),
        }
        .into());
    }
    if up.parts > 1 || up.parts_resumed > 0 {
        let db = ctx.db.get().await?;
        uploads::delete_multipart(&db, item.id).await?;
    }
    let written = Written {
        target,
        etag: up.etag.as_deref(),
        archived: archived.as_deref(),
    };
    let sha = up.sha256_hex.clone();
    Ok(finish(
        ctx,
        item,
        ItemState::Succeeded,
        &sha,
        size as i64,
        Some(written),
    )
    .await?)
}

/// The answer for a request that reached its end.
pub(crate) async fn result_of(
    db: &stowage_common::db::Client,
    request: &Request,
    received: u64,
    resumed: u64,
) -> Result<UploadResponse, IngestError> {
    let dest = &request.job.spec.destination;
    let item = uploads::get_item(db, request.item.id).await?;
    let written = match item.state {
        ItemState::Succeeded | ItemState::SkippedDuplicate => {
            state::written_object(db, request.job.id, &dest.bucket, &item.dest_key).await?
        }
        _ => None,
    };
    Ok(UploadResponse {
        bucket: dest.bucket.clone(),
        key: item.dest_key.clone(),
        version: written
            .as_ref()
            .and_then(|o| u32::try_from(o.version).ok())
            .unwrap_or(0),
        sha256: item.sha256_hex.clone().unwrap_or_default(),
        size: item
            .size_bytes
            .and_then(|s| u64::try_from(s).ok())
            .unwrap_or(0),
        deduplicated: item.state == ItemState::SkippedDuplicate,
        skipped: item.state == ItemState::SkippedExists,
        bytes_received: received,
        bytes_resumed: resumed,
    })
}

/// Deletes `key` under its lock and records it gone; whether it existed.
pub async fn delete(
    ctx: &Context,
    namespace: &str,
    dest: &stowage_common::spec::Destination,
    key: &str,
) -> Result<bool, IngestError> {
    let client = ctx.s3.client(namespace, &dest.endpoint).await?;
    let endpoint = dest.endpoint.label();
    let lock = ctx
        .locks
        .try_lock(LockKey::new(
            LockClass::ObjectKey,
            format!("{endpoint}/{}/{key}", dest.bucket),
        ))
        .await
        .map_err(UploadError::from)?
        .ok_or_else(|| IngestError::Busy(format!("{}/{key}", dest.bucket)))?;
    let target = Target {
        client: &client,
        endpoint,
        bucket: &dest.bucket,
        key,
        sse: None,
        content_type: None,
    };
    let result = async {
        let existed = multipart::head_stored(&target, key).await?.is_some();
        if existed {
            client
                .delete_object()
                .bucket(&dest.bucket)
                .key(key)
                .send()
                .await
                .map_err(|e| stowage_common::storage::s3_error("DeleteObject", e))
                .map_err(UploadError::from)?;
        }
        let db = ctx.db.get().await?;
        uploads::object_deleted(&db, &dest.bucket, key).await?;
        info!(
            bucket = dest.bucket,
            key, existed, "object deleted through Ingest"
        );
        Ok::<_, IngestError>(existed)
    }
    .await;
    if let Err(e) = lock.release().await {
        warn!(error = %e, "releasing the key lock failed; closing its session releases it");
    }
    result
}
