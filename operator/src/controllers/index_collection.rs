//! IndexCollection controller: registers the collection (following its
//! latest generation), publishes a sync task when the spec changes and on
//! the resync schedule, rolls the latest sync run up into `.status`, and on
//! deletion removes the collection's data before the finalizer goes.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, ResourceExt};
use stowage_common::locks::{LockClass, LockKey};
use stowage_common::queue::TaskKind;
use stowage_common::state::collections::{self, NewCollection, RunState};
use stowage_proto::v1::{SyncCollection, Task, task};
use tracing::info;
use uuid::Uuid;

use super::{Context, Error, apply_status, measured, publish_event};
use crate::crd::{FINALIZER, IndexCollection};
use crate::status::index_collection::{self as status, Snapshot};

const CONTROLLER: &str = "indexcollection";

pub async fn reconcile(ic: Arc<IndexCollection>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = ic.namespace().ok_or(Error::Metadata("namespace"))?;
    let api: Api<IndexCollection> = Api::namespaced(ctx.client.clone(), &ns);
    measured(&ctx, CONTROLLER, async {
        finalizer(&api, FINALIZER, ic, |event| async {
            match event {
                Finalizer::Apply(ic) => apply(&ic, &api, &ctx).await,
                Finalizer::Cleanup(ic) => cleanup(&ic, &ctx).await,
            }
        })
        .await
        .map_err(|e| Error::Finalizer(Box::new(e)))
    })
    .await
}

async fn apply(
    ic: &IndexCollection,
    api: &Api<IndexCollection>,
    ctx: &Context,
) -> Result<Action, Error> {
    let uid = ic.uid().ok_or(Error::Metadata("uid"))?;
    let ns = ic.namespace().ok_or(Error::Metadata("namespace"))?;
    let name = ic.name_any();
    let generation = ic.metadata.generation.unwrap_or(1);
    let invalid = ic
        .spec
        .index
        .validate()
        .map_err(|e| e.to_string())
        .and_then(|()| {
            status::parse_interval(&ic.spec.resync_interval)
                .map_err(|e| format!("resyncInterval: {e}"))
        });
    let interval = match invalid {
        Ok(i) => i,
        Err(message) => {
            let new = status::invalid(ic, &message);
            if ic.status.as_ref() != Some(&new) {
                publish_event(ctx, ic, EventType::Warning, "InvalidSpec", message).await;
            }
            apply_status(api, ic, ic.status.as_ref(), &new).await?;
            return Ok(Action::await_change());
        }
    };

    let db = ctx.db.get().await?;
    let registered = match collections::find(&db, &uid).await? {
        Some(id) => Some(collections::get(&db, id).await?),
        None => None,
    };
    let now = Utc::now();
    let due = status::sync_due(ic, registered.as_ref().map(|c| c.generation), now);
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
    let mut next_sync = ic.status.as_ref().and_then(|s| s.next_sync_time);
    if let Some(trigger) = due {
        publish_sync(ctx, id, &ns, &name, trigger, generation, next_sync).await?;
        next_sync = Some(now + interval);
        publish_event(
            ctx,
            ic,
            EventType::Normal,
            "SyncRequested",
            format!("sync run requested ({trigger})"),
        )
        .await;
    }
    let mut latest = collections::latest_run(&db, id).await?;
    let mut run_pending = 0;
    if let Some(run) = latest.as_mut().filter(|r| r.state == RunState::InProgress) {
        // A run's counts are summed when it closes; meanwhile, from its
        // documents so far.
        let progress = collections::run_progress(&db, run.id).await?;
        run.counts = progress.counts;
        run_pending = progress.pending;
    }
    let index = stowage_common::state::index::counts(&db, id).await?;
    let new = status::compute(
        ic,
        &Snapshot {
            collection_id: id,
            latest_run: latest.as_ref(),
            next_sync_time: next_sync,
            index,
            run_pending,
        },
    );
    apply_status(api, ic, ic.status.as_ref(), &new).await?;
    let mut wait = ctx.resync;
    if let Some(t) = new.next_sync_time {
        wait = wait.min(
            (t - Utc::now())
                .to_std()
                .unwrap_or_default()
                .max(Duration::from_secs(1)),
        );
    }
    Ok(Action::requeue(wait))
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
async fn cleanup(ic: &IndexCollection, ctx: &Context) -> Result<Action, Error> {
    let uid = ic.uid().ok_or(Error::Metadata("uid"))?;
    let ns = ic.namespace().ok_or(Error::Metadata("namespace"))?;
    let name = ic.name_any();
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
    info!(%ns, %name, collection = %id, dropped, "collection data removed");
    publish_event(
        ctx,
        ic,
        EventType::Normal,
        "CleanedUp",
        format!("index data removed; {dropped} queued tasks dropped"),
    )
    .await;
    Ok(Action::await_change())
}
