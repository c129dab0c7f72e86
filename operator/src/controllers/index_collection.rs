//! IndexCollection controller: judges the resource, registers the
//! collection (following its latest generation), publishes a sync task when
//! the spec changes and on the resync schedule, rolls the latest sync run up
//! into `.status`, and on deletion removes the collection's data before the
//! finalizer goes. The steps of [`apply`] are the pipeline of [`super`].

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use stowage_common::db::Client;
use stowage_common::locks::{LockClass, LockKey};
use stowage_common::queue::TaskKind;
use stowage_common::state::collections::{self, NewCollection, RunState};
use stowage_proto::v1::{SyncCollection, Task, task};
use tracing::{info, warn};
use uuid::Uuid;

use super::{Context, Error, Note, Reconciler, apply_status, publish_event, publish_notes};
use crate::crd::condition::Condition;
use crate::crd::judge::validate;
use crate::crd::{IndexCollection, RawIndexCollection};
use crate::status::index_collection::{self as status, Snapshot};
use crate::status::upload_job::until;

impl Reconciler for IndexCollection {
    const CONTROLLER: &'static str = "indexcollection";

    async fn apply(raw: Arc<RawIndexCollection>, ctx: &Context) -> Result<Action, Error> {
        apply(&raw, ctx).await
    }

    async fn cleanup(raw: Arc<RawIndexCollection>, ctx: &Context) -> Result<Action, Error> {
        cleanup(&raw, ctx).await
    }

    fn conditions(status: &mut Self::Status) -> &mut Vec<Condition> {
        &mut status.conditions
    }
}

async fn apply(raw: &RawIndexCollection, ctx: &Context) -> Result<Action, Error> {
    let uid = raw.uid().ok_or(Error::Metadata("uid"))?;
    let ns = raw.namespace().ok_or(Error::Metadata("namespace"))?;
    let name = raw.name_any();
    let api: Api<RawIndexCollection> = Api::namespaced(ctx.client.clone(), &ns);
    // Validate (pure).
    let ic = match validate::<IndexCollection>(raw, ctx.allowed()) {
        Ok(ic) => ic,
        Err(why) => return refuse(raw, &api, ctx, &why).await,
    };
    let interval =
        status::parse_interval(&ic.spec.resync_interval).unwrap_or(chrono::Duration::minutes(10));
    let generation = ic.metadata.generation.unwrap_or(1);
    let now = Utc::now();
    let mut notes = Vec::new();
    let mut next_sync = ic.status.as_ref().and_then(|s| s.next_sync_time);
    let snapshot = {
        let db = ctx.db.get().await?;
        // Register (a new generation of the spec is registered again).
        let registered = match collections::find(&db, &uid).await? {
            Some(id) => Some(collections::get(&db, id).await?),
            None => None,
        };
        let due = status::sync_due(&ic, registered.as_ref().map(|c| c.generation), now);
        let id = match &registered {
            Some(c) if c.generation >= generation => c.id,
            _ => {
                let id = collections::register(
                    &db,
                    &NewCollection {
                        namespace: ns.clone(),
                        name: name.clone(),
                        source_uid: uid.clone(),
                        generation,
                        spec: ic.spec.index.clone(),
                    },
                )
                .await?;
                info!(%ns, %name, collection = %id, generation, "collection registered");
                id
            }
        };
        // Drive: a sync run when the spec changed or the schedule says so.
        if let Some(trigger) = due {
            publish_sync(ctx, id, &ns, &name, trigger, generation, next_sync).await?;
            next_sync = status::next_sync_after(now, interval);
            notes.push(Note::normal(
                "SyncRequested",
                format!("sync run requested ({trigger})"),
            ));
        }
        // Observe.
        observe(&db, id).await?
    };
    let new = status::compute(
        &ic,
        &Snapshot {
            collection_id: snapshot.id,
            latest_run: snapshot.latest.as_ref(),
            next_sync_time: next_sync,
            index: snapshot.index,
            run_pending: snapshot.run_pending,
        },
    );
    publish_notes(ctx, raw, notes).await;
    apply_status(&api, &name, ic.status.as_ref(), &new).await?;
    let mut wait = ctx.resync.max(Duration::from_secs(1));
    if let Some(t) = new.next_sync_time {
        wait = wait.min(until(Utc::now(), t));
    }
    Ok(Action::requeue(wait))
}

/// What PostgreSQL says about a collection.
struct Observed {
    id: Uuid,
    latest: Option<collections::SyncRun>,
    index: stowage_common::state::index::IndexCounts,
    run_pending: i64,
}

async fn observe(db: &Client, id: Uuid) -> Result<Observed, Error> {
    let mut latest = collections::latest_run(db, id).await?;
    let mut run_pending = 0;
    if let Some(run) = latest.as_mut().filter(|r| r.state == RunState::InProgress) {
        // A run's counts are summed when it closes; meanwhile, from its
        // documents so far.
        let progress = collections::run_progress(db, run.id).await?;
        run.counts = progress.counts;
        run_pending = progress.pending;
    }
    let index = stowage_common::state::index::counts(db, id).await?;
    Ok(Observed {
        id,
        latest,
        index,
        run_pending,
    })
}

/// Refuses the spec: InvalidSpec condition, an event, and no requeue until
/// the resource changes.
async fn refuse(
    raw: &RawIndexCollection,
    api: &Api<RawIndexCollection>,
    ctx: &Context,
    message: &str,
) -> Result<Action, Error> {
    let prev = crate::crd::judge::previous_status(raw);
    let suspend = raw
        .spec
        .as_ref()
        .and_then(|s| s["suspend"].as_bool())
        .unwrap_or(false);
    let new = status::invalid(prev.as_ref(), raw.metadata.generation, suspend, message);
    if prev.as_ref() != Some(&new) {
        warn!(
            ns = raw.namespace().unwrap_or_default(),
            name = raw.name_any(),
            reason = message,
            "IndexCollection refused: invalid spec"
        );
        apply_status(api, &raw.name_any(), prev.as_ref(), &new).await?;
        publish_event(
            ctx,
            raw,
            EventType::Warning,
            crate::status::INVALID_SPEC,
            message.to_string(),
        )
        .await;
    }
    Ok(Action::await_change())
}

/// Publishes a sync task whose id names the collection, the generation and
/// the schedule slot: reconciling twice (or two replicas) queues one run.
async fn publish_sync(
    ctx: &Context,
    id: Uuid,
    ns: &str,
    name: &str,
    trigger: &str,
    generation: i64,
    slot: Option<chrono::DateTime<Utc>>,
) -> Result<(), Error> {
    let slot = slot.map_or(0, |t| t.timestamp());
    let task = Task {
        task_id: format!("index-sync/{id}/g{generation}/{trigger}/{slot}"),
        kind: Some(task::Kind::SyncCollection(SyncCollection {
            collection_id: id.to_string(),
            trigger: trigger.into(),
        })),
    };
    let subject = ctx
        .queue
        .topology()
        .task_subject(TaskKind::IndexSync, ns, name);
    ctx.queue.publish_task(&subject, &task).await?;
    Ok(())
}

/// Deletion: drop queued sync tasks, wait for a running sync to end (its
/// lock), delete the collection and everything indexed for it.
async fn cleanup(raw: &RawIndexCollection, ctx: &Context) -> Result<Action, Error> {
    let uid = raw.uid().ok_or(Error::Metadata("uid"))?;
    let ns = raw.namespace().ok_or(Error::Metadata("namespace"))?;
    let name = raw.name_any();
    let (id, dropped) = {
        let db = ctx.db.get().await?;
        let Some(id) = collections::find(&db, &uid).await? else {
            return Ok(Action::await_change());
        };
        let topology = ctx.queue.topology();
        let mut dropped = 0;
        for kind in [TaskKind::IndexSync, TaskKind::IndexDocument] {
            dropped += ctx
                .queue
                .purge_tasks(&topology.task_subject(kind, &ns, &name))
                .await?;
        }
        let key = LockKey::new(LockClass::CollectionSync, id.to_string());
        let Some(lock) = ctx.locks.try_lock(key).await? else {
            info!(%ns, %name, "a sync run is in progress; deleting the collection after it");
            return Ok(Action::requeue(Duration::from_secs(5)));
        };
        collections::delete(&db, id).await?;
        drop(lock);
        (id, dropped)
    };
    info!(%ns, %name, collection = %id, dropped, "collection data removed");
    publish_event(
        ctx,
        raw,
        EventType::Normal,
        "CleanedUp",
        format!("index data removed; {dropped} queued tasks dropped"),
    )
    .await;
    Ok(Action::await_change())
}
