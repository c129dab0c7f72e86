//! Progress events from the workers (`<prefix>.event.progress.>`) turned
//! into prompt reconciles of the resource they are about, so that status
//! follows the work without polling.

use std::collections::HashMap;

use kube::runtime::reflector::ObjectRef;
use prost::Message as _;
use stowage_common::queue::{ProgressKind, Queue};
use stowage_proto::v1::{CollectionProgress, JobProgress};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::crd::{IndexCollection, Raw, UploadJob};

/// Senders of reconcile requests that progress events turn into, per
/// watched namespace (`None`: the controllers of every namespace).
#[derive(Default)]
pub struct Triggers {
    uploads: HashMap<Option<String>, mpsc::UnboundedSender<ObjectRef<Raw<UploadJob>>>>,
    collections: HashMap<Option<String>, mpsc::UnboundedSender<ObjectRef<Raw<IndexCollection>>>>,
}

impl Triggers {
    /// Where the reconcile requests of the UploadJobs of `scope` go.
    pub fn follow_uploads(
        &mut self,
        scope: Option<String>,
        tx: mpsc::UnboundedSender<ObjectRef<Raw<UploadJob>>>,
    ) {
        self.uploads.insert(scope, tx);
    }

    /// Where the reconcile requests of the IndexCollections of `scope` go.
    pub fn follow_collections(
        &mut self,
        scope: Option<String>,
        tx: mpsc::UnboundedSender<ObjectRef<Raw<IndexCollection>>>,
    ) {
        self.collections.insert(scope, tx);
    }

    /// Asks for a reconcile of UploadJob `namespace/name`; false once
    /// nobody listens any more.
    pub fn upload(&self, namespace: &str, name: &str) -> bool {
        send(
            &self.uploads,
            namespace,
            ObjectRef::new(name).within(namespace),
        )
    }

    /// Asks for a reconcile of IndexCollection `namespace/name`.
    pub fn collection(&self, namespace: &str, name: &str) -> bool {
        send(
            &self.collections,
            namespace,
            ObjectRef::new(name).within(namespace),
        )
    }
}

fn send<T>(
    senders: &HashMap<Option<String>, mpsc::UnboundedSender<T>>,
    namespace: &str,
    what: T,
) -> bool {
    match senders
        .get(&Some(namespace.to_string()))
        .or_else(|| senders.get(&None))
    {
        Some(tx) => tx.send(what).is_ok(),
        // Not a namespace this operator watches: nothing to do, but go on.
        None => !senders.is_empty(),
    }
}

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
