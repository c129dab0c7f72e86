//! Where indexing happens: IndexCollection sync runs.
//!
//! - [`extract`]: text from plain text, Markdown, HTML and PDF, with the
//!   title and headings; [`html`]: the main content of a page.
//! - [`chunk`]: chunks that follow headings, with offsets and heading paths.
//! - [`embed`]: the built-in model (all-MiniLM-L6-v2 on candle) and remote
//!   providers (OpenAI-compatible, Ollama, TEI).
//! - [`plan`]: a sync run's plan: the listing diffed with the indexed documents.
//! - [`sync`]: a run: planned by one worker, its documents indexed by any.
//! - [`document`]: one document, of a sync run or from object events of
//!   collections that watch uploads.
//! - [`search`]: the `Search.Query` gRPC service.
//!
//! A run's planner takes the collection's sync lock: one run in progress
//! per collection. A run still in progress that is alive (dispatched, a
//! document started or finished within [`RUN_STALL_AFTER`], same spec)
//! makes a new sync wait; a stale one — its planner died, its tasks were lost, or the
//! spec changed — is marked abandoned by the new run.

pub mod chunk;
pub mod document;
pub mod embed;
pub mod error;
pub mod extract;
pub mod html;
pub mod plan;
pub mod search;
pub mod sync;

use std::time::Duration;

use prost::Message as _;
use stowage_common::locks::{LockClass, LockKey, SessionLock};
use stowage_common::queue::ProgressKind;
use stowage_common::state::StateError;
use stowage_common::state::collections::{self, CollectionRecord, RunCounts, RunState};
use stowage_proto::v1::CollectionProgress;
use tracing::{info, warn};
use uuid::Uuid;

pub use error::IndexError;

use crate::Context;
use crate::outcome::Outcome;

/// A run in progress in which no document started or finished for this
/// long is abandoned by the next sync (its tasks were lost: a purged
/// stream, say).
pub const RUN_STALL_AFTER: Duration = Duration::from_secs(15 * 60);

pub async fn sync(ctx: &Context, collection_id: Uuid, trigger: &str) -> Outcome {
    match run(ctx, collection_id, trigger).await {
        Ok(outcome) => outcome,
        Err(e) => {
            warn!(%collection_id, error = %e, "sync failed");
            Outcome::from_error(&e, Duration::from_secs(5))
        }
    }
}

async fn run(ctx: &Context, collection_id: Uuid, trigger: &str) -> Result<Outcome, IndexError> {
    let mut db = ctx.db.get().await?;
    let collection = match collections::get(&db, collection_id).await {
        Ok(c) => c,
        Err(StateError::NotFound { .. }) => return Ok(Outcome::Done { label: "cancelled" }),
        Err(e) => return Err(e.into()),
    };
    let Some(lock) = ctx.locks.try_lock(sync_lock(collection_id)).await? else {
        return Ok(Outcome::Wait {
            delay: Duration::from_secs(10),
            reason: "another sync run of this collection is being planned or closed".into(),
        });
    };
    if let Some(live) = collections::run_in_progress(&db, collection_id).await? {
        // Complete but left open (its closer failed): close it now; alive:
        // wait for it; stale: abandon it below.
        if let Some(state) = sync::close_if_done(ctx, live.id).await? {
            publish_progress(ctx, &collection, live.id, state.as_str()).await;
        } else if live.dispatched
            && live.idle < RUN_STALL_AFTER
            && live.generation >= collection.generation
        {
            release(lock).await;
            return Ok(Outcome::Wait {
                delay: Duration::from_secs(10),
                reason: format!(
                    "run {} of this collection is still indexing ({} documents left)",
                    live.id, live.pending
                ),
            });
        }
    }
    let run_id =
        collections::begin_run(&mut db, collection_id, trigger, collection.generation).await?;
    publish_progress(ctx, &collection, run_id, RunState::InProgress.as_str()).await;
    // A lost lock (its database session died) leaves the run undispatched:
    // the next sync marks it abandoned.
    let dispatched = tokio::select! {
        d = sync::dispatch(ctx, &collection, run_id) => d,
        reason = lock.lost() => return Err(IndexError::LockLost(reason)),
    };
    let ended = match dispatched {
        // Documents that finished while the tasks were still being
        // published could not close the run: it may be complete already.
        Ok(()) => sync::close_if_done(ctx, run_id).await?,
        Err(e) => {
            warn!(%collection_id, run_id, error = %e, "sync run failed");
            collections::finish_run(
                &db,
                run_id,
                RunState::Failed,
                &RunCounts::default(),
                Some(&e.to_string()),
            )
            .await?;
            Some(RunState::Failed)
        }
    };
    release(lock).await;
    if let Some(state) = ended {
        publish_progress(ctx, &collection, run_id, state.as_str()).await;
    }
    info!(%collection_id, run_id, trigger, "sync run planned");
    Ok(Outcome::Done {
        label: if ended == Some(RunState::Failed) {
            "failed"
        } else {
            "ok"
        },
    })
}

/// The lock of a collection's runs: held by the planner, and by whoever
/// closes a run.
fn sync_lock(collection_id: Uuid) -> LockKey {
    LockKey::new(LockClass::CollectionSync, collection_id.to_string())
}

/// Closes run `run_id` of `collection` if its documents are all done, under
/// the collection's sync lock (waiting for a planner or another closer),
/// and tells the operator.
pub(crate) async fn close_run(
    ctx: &Context,
    collection: &CollectionRecord,
    run_id: i64,
) -> Result<(), IndexError> {
    let db = ctx.db.get().await?;
    let progress = collections::run_progress(&db, run_id).await?;
    drop(db);
    if !progress.complete() {
        return Ok(());
    }
    let lock = ctx
        .locks
        .lock_with_timeout(sync_lock(collection.id), sync::DOCUMENT_LOCK_WAIT)
        .await?;
    let ended = sync::close_if_done(ctx, run_id).await;
    release(lock).await;
    if let Some(state) = ended? {
        publish_progress(ctx, collection, run_id, state.as_str()).await;
    }
    Ok(())
}

async fn release(lock: SessionLock) {
    if let Err(e) = lock.release().await {
        warn!(error = %e, "releasing the collection sync lock");
    }
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
