//! One document brought up to date between sync runs: an `IndexDocument`
//! task (from an object an UploadJob landed in a bucket that a collection
//! watches) indexes the object in every live generation — the active one
//! and one being built — if it is new or changed there, or drops it if the
//! object is gone. Under the document's lock, like a sync run's documents.

use std::time::Duration;

use stowage_common::spec::select::Selector;
use stowage_common::state::StateError;
use stowage_common::state::collections::{self, CollectionRecord};
use stowage_common::state::index as store;
use tracing::info;
use uuid::Uuid;

use super::plan::Listed;
use super::sync::{document, document_lock, embedder};
use crate::Context;
use crate::s3::s3_error;
use crate::tasks::Outcome;

pub async fn run(ctx: &Context, collection_id: Uuid, key: &str) -> Outcome {
    match index(ctx, collection_id, key).await {
        Ok(label) => Outcome::Done { label },
        Err(e) => Outcome::Retry {
            delay: Duration::from_secs(5),
            reason: e,
        },
    }
}

async fn index(ctx: &Context, collection_id: Uuid, key: &str) -> Result<&'static str, String> {
    let db = ctx.db.get().await.map_err(|e| e.to_string())?;
    let collection = match collections::get(&db, collection_id).await {
        Ok(c) => c,
        Err(StateError::NotFound { .. }) => return Ok("cancelled"),
        Err(e) => return Err(e.to_string()),
    };
    let selector = Selector::new(&collection.spec.source).map_err(|e| e.to_string())?;
    if !selector.wants(key) {
        return Ok("excluded"); // the spec changed since the event
    }
    let generations = store::live_generations(&db, collection_id)
        .await
        .map_err(|e| e.to_string())?;
    if generations.is_empty() {
        // Never synced: the first run indexes everything.
        return Ok("no-index");
    }
    drop(db);
    let client = ctx
        .s3
        .client(&collection.spec.source.endpoint)
        .map_err(|e| e.to_string())?;
    let Some(object) = head(&client, &collection, key).await? else {
        let _lock = document_lock(ctx, collection_id, key).await?;
        let mut db = ctx.db.get().await.map_err(|e| e.to_string())?;
        for g in &generations {
            store::delete_document(&mut db, g.id, key)
                .await
                .map_err(|e| e.to_string())?;
        }
        info!(%collection_id, key, "object gone: document removed");
        super::publish_progress(ctx, &collection, 0, "document").await;
        return Ok("deleted");
    };
    let mut label = "unchanged";
    for g in &generations {
        let current = {
            let db = ctx.db.get().await.map_err(|e| e.to_string())?;
            store::document_etag(&db, g.id, key)
                .await
                .map_err(|e| e.to_string())?
        };
        if current.as_deref() == Some(object.etag.as_str()) {
            continue;
        }
        let embedder = embedder(ctx, &g.embedding).await?;
        match document(ctx, &client, &collection, &embedder, g.id, &object).await {
            Ok(Some(chunks)) => {
                info!(%collection_id, key, generation = g.id, chunks, "document indexed");
                label = "indexed";
            }
            Ok(None) => label = "skipped",
            // Recorded on the document with its reason; a retry would fail
            // the same way until the object changes.
            Err(_) => label = "failed",
        }
    }
    if label != "unchanged" {
        super::publish_progress(ctx, &collection, 0, "document").await;
    }
    Ok(label)
}

/// The object as a listing would show it; `None` when it is gone.
async fn head(
    client: &aws_sdk_s3::Client,
    collection: &CollectionRecord,
    key: &str,
) -> Result<Option<Listed>, String> {
    match client
        .head_object()
        .bucket(&collection.spec.source.bucket)
        .key(key)
        .send()
        .await
    {
        Ok(o) => Ok(Some(Listed {
            key: key.to_string(),
            etag: o.e_tag().unwrap_or_default().trim_matches('"').to_string(),
            sha256_hex: None,
            size: o.content_length().unwrap_or_default(),
        })),
        Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(None),
        Err(e) => Err(s3_error("HeadObject", e).to_string()),
    }
}
