//! Objects that UploadJobs land, indexed within seconds: object-landed
//! events become `IndexDocument` tasks for the IndexCollections that watch
//! uploads (`spec.watchUploads`) and select the object (endpoint, bucket,
//! prefix, include/exclude globs).
//!
//! Debounced per (collection, key): a burst of writes to one key yields one
//! task, published once the key has been quiet for `quiet` (and at most
//! `max_delay` after its first event, so a key written without pause is
//! still indexed). Events come from the durable consumer `indexer` of the
//! objects stream and are acked only once every task they led to is
//! published: a restart or a leader change loses none (the next leader gets
//! them again and publishes the same task ids, which JetStream
//! deduplicates).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use prost::Message as _;
use stowage_common::jobs::{DocumentOrigin, index_document_task};
use stowage_common::queue::{Message, TaskKind};
use stowage_common::spec::select::Selector;
use stowage_common::state::collections::{self, CollectionRecord};
use stowage_proto::v1::ObjectLanded;
use tokio::time::Instant;
use tracing::{debug, info, warn};
use uuid::Uuid;

use stowage_common::db::Pool;
use stowage_common::queue::Queue;

#[derive(Clone, Copy, Debug)]
pub struct Debounce {
    /// Quiet time after a key's last event before it is indexed.
    pub quiet: Duration,
    /// Longest wait after a key's first event.
    pub max_delay: Duration,
}

struct Pending {
    namespace: String,
    name: String,
    first: Instant,
    due: Instant,
    /// Stream sequence of the latest event: part of the task id.
    last_sequence: u64,
    /// The events this task answers; each is acked when no other pending
    /// task still holds it.
    events: Vec<Arc<Message>>,
}

/// Routes events until the future is dropped (leadership lost, shutdown).
/// `namespaces`: only collections there (the operator's watch namespaces;
/// empty: all).
pub async fn run(db: Pool, queue: Queue, namespaces: Vec<String>, debounce: Debounce) {
    loop {
        if let Err(e) = route(&db, &queue, &namespaces, debounce).await {
            warn!(error = %e, "object events: consumer failed; retrying in 5 s");
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

async fn route(
    db: &Pool,
    queue: &Queue,
    namespaces: &[String],
    debounce: Debounce,
) -> anyhow::Result<()> {
    let consumer = queue
        .object_consumer(debounce.max_delay + Duration::from_secs(30))
        .await?;
    let mut messages = consumer.messages().await?;
    let mut pending: HashMap<(Uuid, String), Pending> = HashMap::new();
    info!("routing object-landed events to collections that watch uploads");
    loop {
        let next_due = pending.values().map(|p| p.due).min();
        tokio::select! {
            msg = messages.next() => match msg {
                Some(Ok(msg)) => {
                    let targets = targets(db, namespaces, &msg).await?;
                    add(&mut pending, Arc::new(msg), targets, debounce).await;
                }
                Some(Err(e)) => warn!(error = %e, "object events: receive failed"),
                None => anyhow::bail!("the object event stream ended"),
            },
            _ = tokio::time::sleep_until(next_due.unwrap_or_else(Instant::now)), if next_due.is_some() => {
                fire(queue, &mut pending).await;
            }
        }
    }
}

/// The collections (and key) an event is for.
async fn targets(
    db: &Pool,
    namespaces: &[String],
    msg: &Message,
) -> anyhow::Result<Vec<(CollectionRecord, String)>> {
    let Ok(event) = ObjectLanded::decode(msg.payload.as_ref()) else {
        debug!(subject = %msg.subject, "ignoring an undecodable object event");
        return Ok(Vec::new());
    };
    let db = db.get().await?;
    let watching = collections::watching(&db, &event.bucket).await?;
    Ok(watching
        .into_iter()
        .filter(|c| namespaces.is_empty() || namespaces.contains(&c.namespace))
        .filter(|c| c.spec.source.endpoint.label() == event.endpoint)
        .filter(|c| Selector::new(&c.spec.source).is_ok_and(|s| s.wants(&event.key)))
        .map(|c| (c, event.key.clone()))
        .collect())
}

async fn add(
    pending: &mut HashMap<(Uuid, String), Pending>,
    msg: Arc<Message>,
    targets: Vec<(CollectionRecord, String)>,
    debounce: Debounce,
) {
    let sequence = msg.info().map(|i| i.stream_sequence).unwrap_or_default();
    if targets.is_empty() {
        ack(&msg).await;
        return;
    }
    let now = Instant::now();
    for (c, key) in targets {
        let p = pending.entry((c.id, key)).or_insert_with(|| Pending {
            namespace: c.namespace.clone(),
            name: c.name.clone(),
            first: now,
            due: now,
            last_sequence: 0,
            events: Vec::new(),
        });
        p.due = (now + debounce.quiet).min(p.first + debounce.max_delay);
        p.last_sequence = p.last_sequence.max(sequence);
        p.events.push(Arc::clone(&msg));
    }
}

/// Publishes the tasks that are due; a failed publish is tried again a
/// second later.
async fn fire(queue: &Queue, pending: &mut HashMap<(Uuid, String), Pending>) {
    let now = Instant::now();
    let due: Vec<(Uuid, String)> = pending
        .iter()
        .filter(|(_, p)| p.due <= now)
        .map(|(k, _)| k.clone())
        .collect();
    for (collection_id, key) in due {
        let Some(p) = pending.remove(&(collection_id, key.clone())) else {
            continue;
        };
        let task = index_document_task(
            collection_id,
            &key,
            DocumentOrigin::Event {
                sequence: p.last_sequence,
            },
        );
        let subject = queue
            .topology()
            .task_subject(TaskKind::IndexDocument, &p.namespace, &p.name);
        match queue.publish_task(&subject, &task).await {
            Ok(_) => {
                debug!(%collection_id, key, events = p.events.len(), "document task published");
                for event in p.events {
                    // The last holder acks.
                    if Arc::strong_count(&event) == 1 {
                        ack(&event).await;
                    }
                }
            }
            Err(e) => {
                warn!(%collection_id, key, error = %e, "document task not published; retrying");
                pending.insert(
                    (collection_id, key),
                    Pending {
                        due: now + Duration::from_secs(1),
                        ..p
                    },
                );
            }
        }
    }
}

async fn ack(msg: &Message) {
    if let Err(e) = msg.ack().await {
        // Redelivered after ack_wait and routed again: the same task id.
        warn!(error = %e, "object event not acked");
    }
}
