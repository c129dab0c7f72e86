//! The worker's Prometheus metrics (`stowage_worker_*`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabels {
    pub kind: &'static str,
    /// `ok`, `retry`, `dead_letter`, `skipped`, `invalid`.
    pub outcome: &'static str,
}

#[derive(Clone, Default)]
pub struct WorkerMetrics {
    pub tasks: Family<TaskLabels, Counter>,
    pub in_flight: Gauge,
    pub bytes_uploaded: Counter,
    pub parts_uploaded: Counter,
    pub parts_resumed: Counter,
    pub part_retries: Counter,
    pub orphans_aborted: Counter,
    pub embedded_texts: Counter,
    pub embed_batches: Counter,
}

impl WorkerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = WorkerMetrics::default();
        let r = registry.sub_registry_with_prefix("stowage_worker");
        r.register(
            "tasks",
            "Tasks finished, by kind and outcome",
            m.tasks.clone(),
        );
        r.register("in_flight", "Tasks running now", m.in_flight.clone());
        r.register(
            "uploaded_bytes",
            "Bytes sent to object storage and acknowledged",
            m.bytes_uploaded.clone(),
        );
        r.register(
            "parts_uploaded",
            "Parts (or single PUTs) stored",
            m.parts_uploaded.clone(),
        );
        r.register(
            "parts_resumed",
            "Parts taken over from an earlier attempt instead of being sent again",
            m.parts_resumed.clone(),
        );
        r.register(
            "part_retries",
            "Parts sent again after a retryable error (e.g. a checksum the server rejected)",
            m.part_retries.clone(),
        );
        r.register(
            "orphan_uploads_aborted",
            "Orphaned multipart uploads aborted by the sweeper",
            m.orphans_aborted.clone(),
        );
        r.register(
            "builtin_embedded_texts",
            "Texts the built-in model embedded for indexing",
            m.embedded_texts.clone(),
        );
        r.register(
            "builtin_embed_batches",
            "Batches the built-in model ran for indexing (texts / batches = batch size)",
            m.embed_batches.clone(),
        );
        m
    }

    pub fn task(&self, kind: &'static str, outcome: &'static str) {
        self.tasks
            .get_or_create(&TaskLabels { kind, outcome })
            .inc();
    }
}
