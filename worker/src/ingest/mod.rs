//! Direct ingest: the `Ingest` gRPC service. A client streams one object per
//! `Upload` call; the bytes go through the same resumable, verified
//! multipart path as UploadJobs, registered as a one-file job keyed by the
//! client's request id. `Status` tells an interrupted client where to
//! resume.
//!
//! - [`header`]: the first message judged and turned into a job spec (pure).
//! - [`stream`]: the data messages as a transfer's source (exact size, idle
//!   timeout, how it ended).
//! - [`upload`]: one request start to finish.

pub mod header;
pub mod stream;
pub mod upload;

use std::sync::Arc;

use futures::StreamExt;
use stowage_common::state::ingest as state;
use stowage_common::state::uploads::{self as uploads, ItemState};
use stowage_proto::v1::ingest_server::Ingest;
use stowage_proto::v1::upload_request::Message;
use stowage_proto::v1::{
    IngestDeleteRequest, IngestDeleteResponse, IngestState, IngestStatusRequest,
    IngestStatusResponse, UploadRequest, UploadResponse,
};
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status, Streaming};

use crate::Context;
use crate::auth::Access;
use crate::upload::multipart::effective_part_size;
use upload::IngestError;

pub struct IngestService {
    pub ctx: Arc<Context>,
    /// One permit per stream this worker takes at once.
    pub streams: Arc<Semaphore>,
}

impl IngestService {
    pub fn new(ctx: Arc<Context>) -> Self {
        let streams = Arc::new(Semaphore::new(ctx.ingest.max_streams as usize));
        IngestService { ctx, streams }
    }
}

/// The first message, which must be the header.
async fn header(
    stream: &mut Streaming<UploadRequest>,
    idle: std::time::Duration,
) -> Result<stowage_proto::v1::UploadHeader, Status> {
    match tokio::time::timeout(idle, stream.message()).await {
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no header within {idle:?}"
        ))),
        Ok(Err(status)) => Err(status),
        Ok(Ok(Some(UploadRequest {
            message: Some(Message::Header(h)),
        }))) => Ok(h),
        Ok(Ok(_)) => Err(Status::invalid_argument(
            "the first message of an Upload must be its header",
        )),
    }
}

#[tonic::async_trait]
impl Ingest for IngestService {
    async fn upload(
        &self,
        request: Request<Streaming<UploadRequest>>,
    ) -> Result<Response<UploadResponse>, Status> {
        let ctx = &self.ctx;
        let permit = Arc::clone(&self.streams).try_acquire_owned().map_err(|_| {
            ctx.metrics.ingest("refused");
            Status::resource_exhausted(format!(
                "this worker takes {} streams at once and all are busy; try again shortly",
                ctx.ingest.max_streams
            ))
        })?;
        let (metadata, extensions, mut stream) = request.into_parts();
        let h = header(&mut stream, ctx.ingest.idle_timeout).await?;
        // Who asks is checked before anything about the request is looked
        // up or said (not even whether the header is valid).
        let caller = Request::from_parts(metadata, extensions, ());
        ctx.auth
            .check(
                &caller,
                &Access::Ingest {
                    namespace: h.namespace.clone(),
                },
            )
            .await?;
        let plan = header::plan(h, &ctx.ingest).map_err(|e| {
            ctx.metrics.ingest("refused");
            IngestError::from(e).status()
        })?;
        // On a task of its own: a client that goes away drops this call's
        // future, but the request must still see its stream end and record
        // what it stored (the parts in flight land, the item says where to
        // resume) — and hold its stream slot until then.
        let ctx = Arc::clone(ctx);
        let messages = stream.boxed();
        let work = tokio::spawn(async move {
            let _permit = permit;
            ctx.metrics.ingest_streams.inc();
            let result = upload::run(&ctx, plan, messages).await;
            ctx.metrics.ingest_streams.dec();
            result
        });
        match work.await {
            Ok(Ok(response)) => Ok(Response::new(response)),
            Ok(Err(e)) => Err(e.status()),
            Err(e) => {
                tracing::error!(error = %e, "an ingest request's task failed");
                Err(Status::internal(
                    "the upload stopped unexpectedly; ask Status and resume",
                ))
            }
        }
    }

    async fn status(
        &self,
        request: Request<IngestStatusRequest>,
    ) -> Result<Response<IngestStatusResponse>, Status> {
        let ctx = &self.ctx;
        let r = request.get_ref();
        ctx.auth
            .check(
                &request,
                &Access::Ingest {
                    namespace: r.namespace.clone(),
                },
            )
            .await?;
        let bounded = |s: &str| s.len() <= 253 && !s.chars().any(char::is_control);
        if !bounded(&r.namespace) || !bounded(&r.request_id) {
            return Err(Status::invalid_argument(
                "namespace and request_id are at most 253 characters without control characters",
            ));
        }
        status(ctx, &r.namespace, &r.request_id)
            .await
            .map(Response::new)
            .map_err(|e| e.status())
    }

    async fn delete(
        &self,
        request: Request<IngestDeleteRequest>,
    ) -> Result<Response<IngestDeleteResponse>, Status> {
        let ctx = &self.ctx;
        let namespace = request.get_ref().namespace.clone();
        ctx.auth
            .check(
                &request,
                &Access::Ingest {
                    namespace: namespace.clone(),
                },
            )
            .await?;
        let r = request.into_inner();
        let checked = header::validate_namespace(&namespace)
            .and_then(|()| header::destination(r.destination))
            .map_err(|e| IngestError::from(e).status())?;
        let (destination, key) = checked;
        upload::delete(ctx, &namespace, &destination, &key)
            .await
            .map(|existed| Response::new(IngestDeleteResponse { existed }))
            .map_err(|e| e.status())
    }
}

async fn status(
    ctx: &Context,
    namespace: &str,
    request_id: &str,
) -> Result<IngestStatusResponse, IngestError> {
    let db = ctx.db.get().await?;
    let request = state::find(&db, namespace, request_id)
        .await?
        .ok_or_else(|| IngestError::NotFound {
            namespace: namespace.into(),
            request_id: request_id.into(),
        })?;
    let item = &request.item;
    let size = item
        .size_bytes
        .and_then(|s| u64::try_from(s).ok())
        .unwrap_or(0);
    let parts = match uploads::get_multipart(&db, item.id).await? {
        Some((_, parts)) => parts,
        None => Vec::new(),
    };
    let committed: u64 = parts
        .iter()
        .map(|p| u64::try_from(p.size_bytes).unwrap_or(0))
        .sum();
    let part_size = effective_part_size(request.job.spec.part_size_bytes);
    let by_number = parts.iter().map(|p| (p.part_number, p.clone())).collect();
    let ended = item.state.is_terminal() && item.state != ItemState::Failed;
    let result = if ended {
        Some(upload::result_of(&db, &request, 0, 0).await?)
    } else {
        None
    };
    Ok(IngestStatusResponse {
        state: match item.state {
            ItemState::Pending => IngestState::Pending,
            ItemState::Running => IngestState::Running,
            ItemState::Succeeded | ItemState::SkippedDuplicate => IngestState::Succeeded,
            ItemState::SkippedExists => IngestState::Skipped,
            ItemState::Failed => IngestState::Failed,
        } as i32,
        size,
        committed_bytes: committed,
        parts_committed: parts.len() as u32,
        resume_offset: if ended {
            size
        } else {
            upload::resume_offset(&by_number, part_size, size)
        },
        result,
        error: item.last_error.clone().unwrap_or_default(),
    })
}
