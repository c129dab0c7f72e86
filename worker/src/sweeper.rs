//! Aborts orphaned multipart uploads: uploads in a bucket Stowage writes to
//! that are older than a limit and that no live item owns (a worker died and
//! its job was deleted or failed before anyone resumed it). One sweeper per
//! bucket at a time, under a lock. Also gives up ingest requests that no
//! client resumed within the resume window ([`expire_ingest`]).

use std::collections::HashSet;
use std::time::Duration;

use stowage_common::locks::{LockClass, LockKey};
use stowage_common::spec::Endpoint;
use stowage_common::state::uploads as state;
use tracing::{info, warn};

use crate::Context;
use crate::upload::UploadError;
use stowage_common::storage::{abort_upload, s3_error};

/// One pass over every destination of the last 30 days' jobs; returns how
/// many uploads were aborted.
pub async fn sweep_once(ctx: &Context, older_than: Duration) -> Result<u64, UploadError> {
    let destinations = {
        let db = ctx.db.get().await?;
        state::recent_destinations(&db, 30).await?
    };
    let mut aborted = 0;
    let mut seen = HashSet::new();
    // A bucket is swept once, with the credentials of the first namespace
    // whose jobs wrote to it.
    for (
        namespace,
        stowage_common::spec::Destination {
            endpoint, bucket, ..
        },
    ) in destinations
    {
        let label = format!("{}/{bucket}", endpoint.label());
        if !seen.insert(label.clone()) {
            continue;
        }
        let Some(lock) = ctx
            .locks
            .try_lock(LockKey::new(LockClass::Sweeper, &label))
            .await?
        else {
            continue; // another worker sweeps this bucket now
        };
        match sweep_bucket(ctx, &namespace, &endpoint, &bucket, older_than).await {
            Ok(n) => aborted += n,
            Err(e) => warn!(bucket, error = %e, "sweeping failed"),
        }
        drop(lock);
    }
    Ok(aborted)
}

async fn sweep_bucket(
    ctx: &Context,
    namespace: &str,
    endpoint: &Endpoint,
    bucket: &str,
    older_than: Duration,
) -> Result<u64, UploadError> {
    let client = ctx.s3.client(namespace, endpoint).await?;
    let live = {
        let db = ctx.db.get().await?;
        state::live_upload_ids(&db, bucket).await?
    };
    let cutoff = std::time::SystemTime::now() - older_than;
    let mut aborted = 0;
    let (mut key_marker, mut id_marker) = (None::<String>, None::<String>);
    loop {
        let page = client
            .list_multipart_uploads()
            .bucket(bucket)
            .set_key_marker(key_marker.clone())
            .set_upload_id_marker(id_marker.clone())
            .send()
            .await
            .map_err(|e| s3_error("ListMultipartUploads", e))?;
        for u in page.uploads() {
            let (Some(key), Some(id)) = (u.key(), u.upload_id()) else {
                continue;
            };
            let old = u
                .initiated()
                .and_then(|t| std::time::SystemTime::try_from(*t).ok())
                .is_some_and(|t| t < cutoff);
            if !old || live.contains(id) {
                continue;
            }
            match abort_upload(&client, bucket, key, id).await {
                Ok(_) => {
                    aborted += 1;
                    ctx.metrics.orphans_aborted.inc();
                    info!(
                        bucket,
                        key,
                        upload_id = id,
                        "aborted orphaned multipart upload"
                    );
                }
                Err(e) => {
                    warn!(bucket, key, error = %e, "abort failed")
                }
            }
        }
        if page.is_truncated() == Some(true) {
            key_marker = page.next_key_marker().map(str::to_string);
            id_marker = page.next_upload_id_marker().map(str::to_string);
            if key_marker.is_none() {
                break;
            }
        } else {
            break;
        }
    }
    Ok(aborted)
}

/// Gives up ingest requests nobody resumed within `window`: their
/// multipart uploads are aborted and they are failed (a later call with the
/// same request id starts again from byte 0). Returns how many.
pub async fn expire_ingest(ctx: &Context, window: Duration) -> Result<u64, UploadError> {
    let db = ctx.db.get().await?;
    let stale = stowage_common::state::ingest::abandoned(&db, window).await?;
    let mut expired = 0;
    for request in stale {
        let (job, item) = (&request.job, &request.item);
        if let Some((rec, _)) = state::get_multipart(&db, item.id).await? {
            match ctx
                .s3
                .client(&job.namespace, &job.spec.destination.endpoint)
                .await
            {
                Ok(client) => crate::upload::multipart::abort(&client, &rec).await,
                // Its upload is then left to the orphan sweep.
                Err(e) => {
                    warn!(key = item.dest_key, error = %e, "no client to abort an abandoned ingest upload")
                }
            }
            state::delete_multipart(&db, item.id).await?;
        }
        let why = format!("abandoned: no call resumed it within {}s", window.as_secs());
        state::fail_item(&db, item, &why, "permanent", false).await?;
        info!(
            namespace = job.namespace,
            request = job.name,
            key = item.dest_key,
            "expired an abandoned ingest request"
        );
        expired += 1;
    }
    Ok(expired)
}
