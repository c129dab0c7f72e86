//! Progress events from the workers (`<prefix>.event.progress.>`) turned
//! into prompt reconciles of the resource they are about, so that status
//! follows the work without polling.

use prost::Message as _;
use stowage_common::queue::{ProgressKind, Queue};
use stowage_proto::v1::{CollectionProgress, JobProgress};
use tracing::{debug, warn};

use crate::controllers::Triggers;

/// Forwards events until the subscription or both receivers close.
pub async fn forward(queue: Queue, triggers: Triggers) {
    use futures::StreamExt;
    let mut sub = match queue
        .client()
        .subscribe(queue.topology().progress_wildcard())
        .await
    {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot subscribe to progress events; relying on resyncs");
            return;
        }
    };
    while let Some(msg) = sub.next().await {
        let target = match queue.topology().progress_kind(&msg.subject) {
            Some(ProgressKind::Upload) => JobProgress::decode(msg.payload.as_ref())
                .ok()
                .map(|p| (ProgressKind::Upload, p.namespace, p.name)),
            Some(ProgressKind::Index) => CollectionProgress::decode(msg.payload.as_ref())
                .ok()
                .map(|p| (ProgressKind::Index, p.namespace, p.name)),
            None => None,
        };
        let Some((kind, namespace, name)) = target else {
            debug!(subject = %msg.subject, "ignoring an undecodable progress event");
            continue;
        };
        if name.is_empty() {
            continue; // a job from stowctl, not from a resource
        }
        let sent = match kind {
            ProgressKind::Upload => triggers.upload(&namespace, &name),
            ProgressKind::Index => triggers.collection(&namespace, &name),
        };
        if !sent {
            return;
        }
    }
}
