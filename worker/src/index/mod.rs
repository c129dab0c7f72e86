//! Where indexing happens: IndexCollection sync runs.
//!
//! - [`extract`]: text from plain text, Markdown, HTML and PDF.
//! - [`chunk`]: recursive and Markdown-aware chunks with offsets and headings.
//! - [`embed`]: the built-in model (all-MiniLM-L6-v2 on candle) and remote
//!   providers (OpenAI-compatible, Ollama, TEI).
//! - [`plan`]: a sync run's plan: the listing diffed with the indexed documents.
//! - [`sync`]: a run's work, from the listing to the stored chunks.
//! - [`document`]: one document between runs (object events of collections
//!   that watch uploads).
//! - [`search`]: the `Search.Query` gRPC service.
//!
//! A run takes the collection's sync lock (one run per collection), marks a
//! run left in progress by a dead worker abandoned, indexes, and records its
//! outcome and counts.

pub mod chunk;
pub mod document;
pub mod embed;
pub mod extract;
pub mod plan;
pub mod search;
pub mod sync;

use std::time::Duration;

use prost::Message as _;
use stowage_common::locks::{LockClass, LockKey};
use stowage_common::queue::ProgressKind;
use stowage_common::state::StateError;
use stowage_common::state::collections::{self, CollectionRecord, RunState};
use stowage_proto::v1::CollectionProgress;
use tracing::{info, warn};
use uuid::Uuid;

use crate::Context;
use crate::tasks::Outcome;

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
    publish_progress(ctx, &collection, run_id, RunState::InProgress.as_str()).await;
    // A lost lock (its database session died) abandons the run: the next
    // run marks it so.
    let ending = tokio::select! {
        ending = sync::run(ctx, &collection) => ending,
        reason = lock.lost() => return Err(format!("collection sync lock lost: {reason}")),
    };
    collections::finish_run(
        &db,
        run_id,
        ending.state,
        &ending.counts,
        ending.error.as_deref(),
    )
    .await
    .map_err(|e| e.to_string())?;
    if let Err(e) = lock.release().await {
        warn!(error = %e, "releasing the collection sync lock");
    }
    info!(
        %collection_id, run_id, trigger, state = ending.state.as_str(), counts = ?ending.counts,
        error = ending.error.as_deref().unwrap_or(""), "sync run finished"
    );
    publish_progress(ctx, &collection, run_id, ending.state.as_str()).await;
    Ok(Outcome::Done {
        label: if ending.state == RunState::Failed {
            "failed"
        } else {
            "ok"
        },
    })
}

/// Tells the operator that the collection's index changed: a run's state
/// (`run_id` > 0), or a `document` indexed between runs (`run_id` 0).
async fn publish_progress(ctx: &Context, collection: &CollectionRecord, run_id: i64, state: &str) {
    let event = CollectionProgress {
        collection_id: collection.id.to_string(),
        run_id,
        run_state: state.into(),
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
}
