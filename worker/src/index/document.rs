//! One document: an `IndexDocument` task.
//!
//! - Of a sync run: indexes the object as the run planned it into the run's
//!   generation, records how it ended on the run, and closes the run if it
//!   was the last. A task that cannot record an outcome (database, locks)
//!   is tried again; after [`MAX_ATTEMPTS`] the document is failed with the
//!   reason and the task dead-lettered, so the run still ends.
//! - From object events (an UploadJob landed it in a bucket a collection
//!   watches): brings the object up to date in every live generation — the
//!   active one and one being built — if it is new or changed there, or
//!   drops it if the object is gone. An object written again with the bytes
//!   and type a document holds (a new ETag: its `sha256` metadata or
//!   Stowage's record of writing it says so, or reading it does) only gets
//!   its new ETag recorded: nothing is embedded.
//!
//! Both under the document's lock.

use std::time::Duration;

use stowage_common::errors::{Classify, ErrorClass};
use stowage_common::queue::backoff_delay;
use stowage_common::spec::select::Selector;
use stowage_common::state::StateError;
use stowage_common::state::collections::{self, CollectionRecord, DocumentEnd, RunState};
use stowage_common::state::index::{self as store, DocumentState};
use tracing::{info, warn};
use uuid::Uuid;

use super::plan::{Listed, Recorded, content_hash};
use super::sync::{as_indexed, document, document_lock, embedder, head};
use crate::Context;
use crate::outcome::Outcome;

use super::IndexError;

/// Attempts at a run's document before it is failed and dead-lettered.
pub const MAX_ATTEMPTS: i32 = 5;

pub async fn run(ctx: &Context, collection_id: Uuid, key: &str, run_id: i64) -> Outcome {
    let collection = match current(ctx, collection_id).await {
        Ok(Some(c)) => c,
        Ok(None) => return Outcome::Done { label: "cancelled" },
        Err(e) => return retry(&e),
    };
    if run_id > 0 {
        return in_run(ctx, &collection, run_id, key).await;
    }
    match index(ctx, &collection, key).await {
        Ok(label) => Outcome::Done { label },
        Err(e) => retry(&e),
    }
}

async fn in_run(ctx: &Context, collection: &CollectionRecord, run_id: i64, key: &str) -> Outcome {
    let label = match index_in_run(ctx, collection, run_id, key).await {
        Ok(label) => label,
        Err(e) => return attempt_failed(ctx, collection, run_id, key, e).await,
    };
    // Closing waits for the collection's sync lock; if that fails, the
    // redelivered task finds its document done and tries closing again.
    match super::close_run(ctx, collection, run_id).await {
        Ok(()) => Outcome::Done { label },
        Err(e) => retry(&e),
    }
}

/// The collection, `None` if it was deleted.
async fn current(ctx: &Context, id: Uuid) -> Result<Option<CollectionRecord>, IndexError> {
    let db = ctx.db.get().await?;
    match collections::get(&db, id).await {
        Ok(c) => Ok(Some(c)),
        Err(StateError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Another try when the error's class allows one, else a dead letter.
fn retry(e: &IndexError) -> Outcome {
    Outcome::from_error(e, Duration::from_secs(5))
}

/// Indexes a pending document of a run and records how it ended. A task
/// whose document is already done, or whose run ended, does nothing (the
/// next run plans what is left), except a replayed dead letter: its
/// document failed, and is brought up to date as for an object event.
async fn index_in_run(
    ctx: &Context,
    collection: &CollectionRecord,
    run_id: i64,
    key: &str,
) -> Result<&'static str, IndexError> {
    let db = ctx.db.get().await?;
    let Some(planned) = collections::run_document(&db, collection.id, run_id, key).await? else {
        return Ok("run-ended");
    };
    match (planned.run_state, planned.state) {
        (RunState::InProgress, DocumentState::Pending) => {}
        (RunState::InProgress, _) => return Ok("duplicate"),
        // A dead letter replayed after its run: bring the document up to
        // date as an object event would.
        (_, DocumentState::Failed) => {
            drop(db);
            return index(ctx, collection, key).await;
        }
        // Left over from an abandoned run: the run after it plans the rest.
        _ => return Ok("run-ended"),
    }
    collections::touch_run(&db, run_id).await?;
    let generation = match planned.generation_id {
        Some(id) => store::generation(&db, id).await?,
        None => None,
    };
    drop(db);
    let end = match generation {
        None => DocumentEnd::Failed {
            reason: "the run's embedding generation was replaced".into(),
        },
        Some(g) => {
            let embedder = embedder(ctx, &collection.namespace, &g.embedding).await?;
            let client = ctx
                .s3
                .client(&collection.namespace, &collection.spec.source.endpoint)
                .await?;
            let object = Listed {
                key: key.to_string(),
                etag: planned.document.etag,
                sha256_hex: None,
                size: planned.document.size,
            };
            document(ctx, &client, collection, &embedder, g.id, &object)
                .await?
                .end
        }
    };
    let db = ctx.db.get().await?;
    collections::finish_document(&db, run_id, key, &end, &ctx.worker_id).await?;
    Ok(match end {
        DocumentEnd::Indexed { .. } => "indexed",
        DocumentEnd::Skipped { .. } => "skipped",
        DocumentEnd::Failed { .. } => "failed",
    })
}

/// A run's document could not be indexed or recorded: try again later, or,
/// out of attempts, fail it with the reason (the run can then end) and
/// dead-letter the task.
async fn attempt_failed(
    ctx: &Context,
    collection: &CollectionRecord,
    run_id: i64,
    key: &str,
    error: IndexError,
) -> Outcome {
    let class = error.class();
    let attempts = if class == ErrorClass::Retryable {
        let Ok(db) = ctx.db.get().await else {
            return retry(&error);
        };
        let attempts = match collections::count_document_attempt(&db, run_id, key).await {
            Ok(n) => n,
            Err(_) => return retry(&error),
        };
        if attempts < MAX_ATTEMPTS {
            warn!(run_id, key, attempts, %error, "document attempt failed; will retry");
            return Outcome::Retry {
                delay: backoff_delay(
                    u32::try_from(attempts).unwrap_or(1),
                    Duration::from_secs(2),
                    Duration::from_secs(60),
                ),
                error: error.to_string(),
            };
        }
        attempts
    } else {
        1
    };
    let reason = if class == ErrorClass::Retryable {
        format!("gave up after {attempts} attempts: {error}")
    } else {
        error.to_string()
    };
    if let Err(e) = end_failed(ctx, collection, run_id, key, &reason).await {
        // The redelivered task finds its document failed and only closes.
        return retry(&e);
    }
    Outcome::Dead {
        error: reason,
        class,
        attempts: u32::try_from(attempts).unwrap_or(1),
    }
}

/// Fails a run's pending document with `reason` (a document done already
/// keeps its end) and closes the run if it was the last.
async fn end_failed(
    ctx: &Context,
    collection: &CollectionRecord,
    run_id: i64,
    key: &str,
    reason: &str,
) -> Result<(), IndexError> {
    let end = DocumentEnd::Failed {
        reason: reason.to_string(),
    };
    {
        let db = ctx.db.get().await?;
        collections::finish_document(&db, run_id, key, &end, &ctx.worker_id).await?;
    }
    super::close_run(ctx, collection, run_id).await
}

/// The task of a run's document died without recording its end (a panic,
/// say): fail the document so that its run still ends.
pub async fn fail_in_run(
    ctx: &Context,
    collection_id: Uuid,
    run_id: i64,
    key: &str,
    error: &str,
) -> Result<(), IndexError> {
    match current(ctx, collection_id).await? {
        Some(collection) => end_failed(ctx, &collection, run_id, key, error).await,
        None => Ok(()),
    }
}

async fn index(
    ctx: &Context,
    collection: &CollectionRecord,
    key: &str,
) -> Result<&'static str, IndexError> {
    let collection_id = collection.id;
    let db = ctx.db.get().await?;
    let selector =
        Selector::new(&collection.spec.source).map_err(|e| IndexError::Invalid(e.to_string()))?;
    if !selector.wants(key) {
        return Ok("excluded"); // the spec changed since the event
    }
    let generations = store::live_generations(&db, collection_id).await?;
    if generations.is_empty() {
        // Never synced: the first run indexes everything.
        return Ok("no-index");
    }
    drop(db);
    let client = ctx
        .s3
        .client(&collection.namespace, &collection.spec.source.endpoint)
        .await?;
    let source = &collection.spec.source;
    let Some((object, probed)) = head(&client, &source.bucket, key).await? else {
        let _lock = document_lock(ctx, collection_id, key).await?;
        let mut db = ctx.db.get().await?;
        for g in &generations {
            store::delete_document(&mut db, g.id, key).await?;
        }
        info!(%collection_id, key, "object gone: document removed");
        super::publish_progress(ctx, collection, 0, "document").await;
        return Ok("deleted");
    };
    let mut label = "unchanged";
    // Stowage's record of writing the object: looked up once, if needed.
    let mut recorded: Option<Option<Recorded>> = None;
    for g in &generations {
        let current = {
            let db = ctx.db.get().await?;
            store::document(&db, g.id, key).await?.map(as_indexed)
        };
        if let Some(doc) = &current {
            if doc.etag.as_deref() == Some(object.etag.as_str()) {
                continue;
            }
            // A new ETag: over the content the document holds?
            if let Some(indexed_sha) = doc.sha256_hex.as_deref().filter(|_| !doc.failed) {
                if probed.sha256_metadata.is_none() && recorded.is_none() {
                    recorded = Some(recorded_content(ctx, collection, key).await?);
                }
                let record = recorded.as_ref().and_then(Option::as_ref);
                if let Some(sha) = content_hash(&object.etag, doc, &probed, record)
                    && sha == indexed_sha
                {
                    let retag = store::Retag {
                        object_key: key.to_string(),
                        sha256_hex: sha,
                        etag: object.etag.clone(),
                    };
                    let mut db = ctx.db.get().await?;
                    store::retag_documents(&mut db, g.id, &[retag]).await?;
                    info!(
                        %collection_id, key, generation = g.id,
                        "content unchanged under a new ETag: ETag recorded, nothing embedded"
                    );
                    continue;
                }
            }
        }
        let indexed = index_one(ctx, &client, collection, g, &object).await?;
        if indexed != "unchanged" {
            label = indexed;
        }
    }
    if label != "unchanged" {
        super::publish_progress(ctx, collection, 0, "document").await;
    }
    Ok(label)
}

/// Stowage's record of writing the current object at `key`, if it wrote it
/// on the collection's store.
async fn recorded_content(
    ctx: &Context,
    collection: &CollectionRecord,
    key: &str,
) -> Result<Option<Recorded>, IndexError> {
    let source = &collection.spec.source;
    let db = ctx.db.get().await?;
    let mut records =
        store::recorded_contents(&db, source.endpoint.label(), &source.bucket, &[key]).await?;
    Ok(records
        .remove(key)
        .map(|(etag, sha256_hex)| Recorded { etag, sha256_hex }))
}

/// Indexes `object` into generation `g`: the task's label.
async fn index_one(
    ctx: &Context,
    client: &aws_sdk_s3::Client,
    collection: &CollectionRecord,
    g: &store::Generation,
    object: &Listed,
) -> Result<&'static str, IndexError> {
    let (collection_id, key) = (collection.id, object.key.as_str());
    let embedder = embedder(ctx, &collection.namespace, &g.embedding).await?;
    let indexing = document(ctx, client, collection, &embedder, g.id, object).await?;
    if indexing.unchanged {
        return Ok("unchanged");
    }
    Ok(match indexing.end {
        DocumentEnd::Indexed { chunks } => {
            info!(%collection_id, key, generation = g.id, chunks, "document indexed");
            "indexed"
        }
        DocumentEnd::Skipped { .. } => "skipped",
        // Recorded on the document with its reason; the next sync run
        // tries it again.
        DocumentEnd::Failed { .. } => "failed",
    })
}
