//! Where indexing happens: IndexCollection sync runs.
//!
//! - [`extract`]: text from plain text, Markdown, HTML and PDF.
//! - [`chunk`]: recursive and Markdown-aware chunks with offsets and headings.
//! - [`embed`]: remote embedding providers (OpenAI-compatible, Ollama, TEI).
//! - [`plan`]: a sync run's plan: the listing diffed with the indexed documents.
//!
//! A run takes the collection's sync lock (one run per collection), marks a
//! run left in progress by a dead worker abandoned, and records its outcome.
//! Listing and diffing the bucket, embeddings and storage are not part of
//! this version yet: every run ends `failed` with the reason "indexing not
//! available yet", so the IndexCollection's status says so plainly instead
//! of claiming success.

pub mod chunk;
pub mod embed;
pub mod extract;
pub mod plan;

use std::time::Duration;

use prost::Message as _;
use stowage_common::locks::{LockClass, LockKey};
use stowage_common::queue::ProgressKind;
use stowage_common::state::StateError;
use stowage_common::state::collections::{self, RunCounts, RunState};
use stowage_proto::v1::CollectionProgress;
use tracing::{info, warn};
use uuid::Uuid;

use crate::Context;
use crate::tasks::Outcome;

/// Why every run fails until the index data plane exists.
pub const NOT_AVAILABLE: &str = "indexing not available yet";

pub async fn sync(ctx: &Context, collection_id: Uuid, trigger: &str) -> Outcome {
    match run(ctx, collection_id, trigger).await {
        Ok(outcome) => outcome,
        Err(e) => Outcome::Retry {
            delay: Duration::from_secs(5),
            reason: e,
        },
    }
}

async fn run(ctx: &Context, collection_id: Uuid, trigger: &str) -> Result<Outcome, String> {
    let mut db = ctx.db.get().await.map_err(|e| e.to_string())?;
    let collection = match collections::get(&db, collection_id).await {
        Ok(c) => c,
        Err(StateError::NotFound { .. }) => return Ok(Outcome::Done { label: "cancelled" }),
        Err(e) => return Err(e.to_string()),
    };
    let key = LockKey::new(LockClass::CollectionSync, collection_id.to_string());
    let Some(lock) = ctx.locks.try_lock(key).await.map_err(|e| e.to_string())? else {
        return Ok(Outcome::Retry {
            delay: Duration::from_secs(10),
            reason: "another sync run of this collection is in progress".into(),
        });
    };
    let run_id = collections::begin_run(&mut db, collection_id, trigger, collection.generation)
        .await
        .map_err(|e| e.to_string())?;
    lock.ensure_held().map_err(|e| e.to_string())?;
    collections::finish_run(
        &db,
        run_id,
        RunState::Failed,
        &RunCounts::default(),
        Some(NOT_AVAILABLE),
    )
    .await
    .map_err(|e| e.to_string())?;
    if let Err(e) = lock.release().await {
        warn!(error = %e, "releasing the collection sync lock");
    }
    info!(%collection_id, run_id, trigger, "sync run recorded as failed: {NOT_AVAILABLE}");
    let event = CollectionProgress {
        collection_id: collection_id.to_string(),
        run_id,
        run_state: RunState::Failed.as_str().into(),
        namespace: collection.namespace.clone(),
        name: collection.name.clone(),
    };
    let subject = ctx.queue.topology().progress_subject(
        ProgressKind::Index,
        &collection.namespace,
        &collection.name,
    );
    if let Err(e) = ctx
        .queue
        .publish_event(subject, event.encode_to_vec())
        .await
    {
        warn!(error = %e, "progress event not published");
    }
    Ok(Outcome::Done { label: "failed" })
}
