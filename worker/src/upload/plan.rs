//! PlanUpload: list the job's source, register one item per file (keyed by
//! destination key, so planning twice adds nothing), publish the UploadFile
//! tasks of the items still to do (small files in batches,
//! [`stowage_common::jobs::batches`]), and a dead letter for each file
//! refused at planning (an unsafe destination key, say), so that it can be
//! replayed like any other failure.

use stowage_common::errors::ErrorClass;
use stowage_common::jobs;
use stowage_common::queue::TaskKind;
use stowage_common::spec::{UploadJobSpec, validate_key};
use stowage_common::state::StateError;
use stowage_common::state::uploads::{self as state, ItemRecord, JobState, NewItem};
use stowage_common::storage::s3_error;
use uuid::Uuid;

use super::UploadError;
use super::encryption::{self, Sse};
use crate::Context;
use crate::outcome::dead_letter;

/// Returns how many files are to do, or `None` when the job was cancelled
/// or deleted meanwhile (nothing to plan).
pub async fn run(ctx: &Context, job_id: Uuid) -> Result<Option<usize>, UploadError> {
    let job = {
        let db = ctx.db.get().await?;
        match state::get_job(&db, job_id).await {
            Ok(job) if job.state == JobState::Cancelled => return Ok(None),
            Ok(job) => job,
            Err(StateError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    };
    job.spec
        .validate()
        .map_err(|e| UploadError::Invalid(e.to_string()))?;
    check_encryption(ctx, &job).await?;
    let items = list_source(ctx, &job.namespace, &job.spec).await?;
    let (todo, refused) = {
        let db = ctx.db.get().await?;
        let todo = state::add_items(&db, job_id, &items).await?;
        (todo, state::failed_without_dead_letter(&db, job_id).await?)
    };
    if !refused.is_empty() {
        dead_letter_refused(ctx, &job, &refused).await?;
    }
    let files: Vec<_> = todo.iter().map(ItemRecord::queued).collect();
    jobs::publish_items(&ctx.queue, &job, &files, None)
        .await
        .map_err(|e| UploadError::Queue(e.to_string()))?;
    let db = ctx.db.get().await?;
    state::mark_planned(&db, job_id).await?;
    Ok(Some(todo.len()))
}

/// A job that asks for server-side encryption is refused before anything
/// is written when its key cannot be read or the store does not apply it.
async fn check_encryption(ctx: &Context, job: &state::JobRecord) -> Result<(), UploadError> {
    let dest = &job.spec.destination;
    let Some(sse) =
        Sse::resolve(dest.encryption.as_ref(), &job.namespace, ctx.s3.secrets()).await?
    else {
        return Ok(());
    };
    let client = ctx.s3.client(&job.namespace, &dest.endpoint).await?;
    let key = format!("{}.stowage-encryption-check-{}", dest.key_prefix, job.id);
    encryption::preflight(&client, &dest.bucket, &key, &sse).await
}

/// Dead-letters the files refused at planning, then records that they are.
async fn dead_letter_refused(
    ctx: &Context,
    job: &state::JobRecord,
    refused: &[(i64, String)],
) -> Result<(), UploadError> {
    let subject = ctx
        .queue
        .topology()
        .task_subject(TaskKind::Upload, &job.namespace, &job.name);
    for (item_id, error) in refused {
        let task = jobs::upload_task(job.id, &[*item_id], None);
        let letter = dead_letter(&task, &subject, error, ErrorClass::Permanent, 0);
        ctx.queue
            .dead_letter(&letter)
            .await
            .map_err(|e| UploadError::Queue(e.to_string()))?;
    }
    let ids: Vec<i64> = refused.iter().map(|(id, _)| *id).collect();
    let db = ctx.db.get().await?;
    state::mark_dead_lettered(&db, &ids).await?;
    Ok(())
}

async fn list_source(
    ctx: &Context,
    namespace: &str,
    spec: &UploadJobSpec,
) -> Result<Vec<NewItem>, UploadError> {
    let prefix = &spec.destination.key_prefix;
    if let Some(s3) = &spec.source.s3 {
        let client = ctx.s3.client(namespace, &s3.endpoint).await?;
        let mut items = Vec::new();
        let mut pages = client
            .list_objects_v2()
            .bucket(&s3.bucket)
            .prefix(&s3.prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| s3_error("ListObjectsV2 (source)", e))?;
            for o in page.contents() {
                let Some(key) = o.key() else { continue };
                if key.ends_with('/') {
                    continue; // folder marker
                }
                let relative = key.strip_prefix(s3.prefix.as_str()).unwrap_or(key);
                items.push(item(key.to_string(), prefix, relative, o.size()));
            }
        }
        return Ok(items);
    }
    let http = spec.source.http.as_ref().ok_or_else(|| {
        UploadError::Invalid("source: exactly one of s3 or http must be set".into())
    })?;
    Ok(http
        .urls
        .iter()
        .map(|u| {
            let path = reqwest::Url::parse(u)
                .map(|url| {
                    percent_encoding::percent_decode_str(url.path())
                        .decode_utf8_lossy()
                        .into_owned()
                })
                .unwrap_or_default();
            item(u.clone(), prefix, &path, None)
        })
        .collect())
}

fn item(source_ref: String, prefix: &str, relative: &str, size: Option<i64>) -> NewItem {
    let dest_key = format!("{prefix}{}", relative.trim_start_matches('/'));
    let invalid = validate_key(&dest_key)
        .err()
        .map(|e| format!("invalid destination key: {e}"));
    NewItem {
        source_ref,
        dest_key,
        size_bytes: size,
        invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destination_keys_are_checked_at_planning() {
        let ok = item("u".into(), "in/", "/docs/a.txt", None);
        assert_eq!(ok.dest_key, "in/docs/a.txt");
        assert!(ok.invalid.is_none());
        let bad = item("u".into(), "in/", "/docs/../../etc/passwd", None);
        assert!(
            bad.invalid.as_deref().is_some_and(|m| m.contains("`..`")),
            "{:?}",
            bad.invalid
        );
        let ctl = item("u".into(), "", "a\u{1b}[31m.txt", None);
        assert!(
            ctl.invalid
                .as_deref()
                .is_some_and(|m| m.contains("control character"))
        );
    }
}
